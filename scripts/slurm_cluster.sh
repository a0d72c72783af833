#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for the tests and CI (issue 7, section 3).
#
#   scripts/slurm_cluster.sh install            apt-get Debian's SLURM, munge, slurmdbd, MariaDB
#   scripts/slurm_cluster.sh start  [STATE_DIR] write configs, start the daemons, wait until ready
#   scripts/slurm_cluster.sh stop   [STATE_DIR] cancel leftover jobs, stop the daemons we started
#   scripts/slurm_cluster.sh status [STATE_DIR] what runs (exit 0 when the whole cluster is up)
#   scripts/slurm_cluster.sh env    [STATE_DIR] print the export lines for clients
#
# Everything (configs, munge key and socket, MariaDB datadir, spool, logs, pid files) lives in
# STATE_DIR (default $MPDIT_SLURM_STATE or /tmp/mpdit-slurm). No systemd: each daemon runs in the
# foreground of its own session (setsid), and its pid is kept in STATE_DIR/run/<name>.pid; stop
# signals only those pids, so daemons started by anyone else are never touched.
# Clients need SLURM_CONF: `source STATE_DIR/env.sh` (start prints the same lines).
#
# Tunables (environment): MPDIT_SLURM_PORT_BASE (6817: slurmctld; +1 slurmd, +2 slurmdbd,
# +3 MariaDB), MPDIT_SLURM_PARTITION (debug), MPDIT_SLURM_CLUSTER (mpdit),
# MPDIT_SLURM_START_TIMEOUT (60 s per daemon).
set -euo pipefail

CMD="${1:-}"
STATE="${2:-${MPDIT_SLURM_STATE:-/tmp/mpdit-slurm}}"
PORT_BASE="${MPDIT_SLURM_PORT_BASE:-6817}"
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
PARTITION="${MPDIT_SLURM_PARTITION:-debug}"
CLUSTER="${MPDIT_SLURM_CLUSTER:-mpdit}"
START_TIMEOUT="${MPDIT_SLURM_START_TIMEOUT:-60}"
DB_USER=slurm
DB_PASS=mpdit-slurm-local # a private MariaDB bound to 127.0.0.1, created by this script
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd sbatch srun squeue scancel sinfo sacct sacctmgr scontrol munged mariadbd mariadb-install-db mariadb)
DAEMONS=(mariadb munged slurmdbd slurmctld slurmd) # start order; stop runs it backwards

log() { printf '[slurm_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

missing_binaries() {
    local b out=()
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
    echo "${out[*]:-}"
}

cmd_install() {
    if [[ -z "$(missing_binaries)" ]]; then
        log "already installed: $(slurmctld -V 2>/dev/null), $(munged -V 2>/dev/null | head -1)"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "install needs root (apt-get)"
    local t0=$SECONDS
    # policy-rc.d keeps the packages' maintainer scripts from starting daemons on their own:
    # this script starts exactly the daemons it owns, in its own state folder.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; trap - EXIT; fi
    local still
    still="$(missing_binaries)"
    [[ -z "$still" ]] || die "after apt-get install these binaries are still missing: $still"
    log "installed ${PACKAGES[*]} in $((SECONDS - t0)) s: $(slurmctld -V)"
}

pidfile() { echo "$STATE/run/$1.pid"; }

# The pid in the daemon's pid file, if that process is alive and is the program we started.
alive_pid() {
    local f pid comm
    f="$(pidfile "$1")"
    [[ -s "$f" ]] || return 1
    pid="$(cat "$f")"
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ -d /proc/$pid ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    case "$1" in
        mariadb) [[ "$comm" == mariadbd || "$comm" == mysqld ]] ;;
        *) [[ "$comm" == "$1" ]] ;;
    esac || return 1
    echo "$pid"
}

# Run a daemon in the foreground of a new session, detached from this shell, and record its pid.
# setsid does not fork here (a background job of a non-interactive shell is not a group leader),
# so $! is the daemon itself.
launch() {
    local name="$1" logfile="$STATE/log/$1.out"
    shift
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
    local pid=$! i
    echo "$pid" >"$(pidfile "$name")"
    # Until exec is done the process is still called bash/setsid/setpriv: wait for the real name,
    # so that alive_pid does not take a starting daemon for a dead one.
    for i in $(seq 1 100); do
        alive_pid "$name" >/dev/null && return 0
        [[ -d /proc/$pid ]] || return 0 # died at once: wait_until reports it with its log
        sleep 0.05
    done
}

wait_until() { # wait_until DESCRIPTION DAEMON COMMAND...: poll until COMMAND succeeds
    local what="$1" daemon="$2" t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! alive_pid "$daemon" >/dev/null; then
            log "$daemon died while waiting for: $what; last lines of its logs:"
            tail -n 20 "$STATE/log/$daemon"*.log "$STATE/log/$daemon.out" >&2 2>/dev/null || true
            exit 1
        fi
        if ((SECONDS - t0 > START_TIMEOUT)); then
            log "timed out after ${START_TIMEOUT} s waiting for: $what; last lines of $daemon logs:"
            tail -n 20 "$STATE/log/$daemon"*.log "$STATE/log/$daemon.out" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

write_configs() {
    local hw node_name cpus boards sockets cores threads mem def_mem
    # The node's real topology and memory, as slurmd itself detects them.
    hw="$(slurmd -C | head -1)"
    node_name="$(sed -n 's/.*NodeName=\([^ ]*\).*/\1/p' <<<"$hw")"
    cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
    boards="$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$hw")"
    sockets="$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")"
    cores="$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")"
    threads="$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    [[ -n "$node_name" && -n "$cpus" && -n "$mem" ]] || die "cannot parse 'slurmd -C': $hw"
    # Jobs that ask for no memory get an equal share per CPU instead of the whole node, so that
    # two 1-CPU jobs fit side by side under CR_Core_Memory.
    def_mem=$((mem / cpus))
    local topology="CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1}"
    # With hyper-threads, CR_Core_Memory would hand out whole cores (2 CPUs for a 1-CPU task).
    # Declaring CPUs alone makes slurmd lay the node out as CPUs single-core sockets ("Node
    # reconfigured socket/core boundaries", a harmless info message), so each hardware thread
    # is one allocatable core and two 1-CPU tasks still run side by side.
    if [[ "${threads:-1}" -gt 1 ]]; then topology="CPUs=$cpus"; fi

    cat >"$STATE/etc/slurm.conf.new" <<EOF
# Written by scripts/slurm_cluster.sh; regenerated by every start.
ClusterName=$CLUSTER
SlurmctldHost=$node_name(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.daemon.pid
SlurmdPidFile=$STATE/run/slurmd.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
JobRequeue=1
ReturnToService=2
# Short timeouts: a test cluster on one machine, where waiting only slows the tests down.
MinJobAge=10
KillWait=5
WaitTime=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
UnkillableStepTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Clients talking to slurmdbd (sacct, sacctmgr) take the munge socket from here, not AuthInfo.
AccountingStoragePass=$STATE/munge/munge.socket.2
JobCompType=jobcomp/none
NodeName=$node_name NodeAddr=127.0.0.1 $topology RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node_name Default=YES MaxTime=INFINITE State=UP
EOF

    cat >"$STATE/etc/slurmdbd.conf.new" <<EOF
# Written by scripts/slurm_cluster.sh; regenerated by every start.
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
DbdHost=$node_name
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.daemon.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf.new" # slurmdbd refuses a config others can read
    # Daemons already running keep the config they read at start: never change it under them.
    local f name running=""
    for name in "${DAEMONS[@]}"; do alive_pid "$name" >/dev/null && running+=" $name"; done
    for f in slurm.conf slurmdbd.conf; do
        if [[ -n "$running" && -f "$STATE/etc/$f" ]] && ! cmp -s "$STATE/etc/$f" "$STATE/etc/$f.new"; then
            rm -f "$STATE/etc/$f.new"
            die "$STATE/etc/$f would change but$running already run with the old one: run 'stop $STATE' first"
        fi
        mv -f "$STATE/etc/$f.new" "$STATE/etc/$f"
    done

    cat >"$STATE/env.sh" <<EOF
export SLURM_CONF=$STATE/etc/slurm.conf
export MPDIT_SLURM_STATE=$STATE
EOF
    echo "$node_name" >"$STATE/node_name"
    echo "$cpus" >"$STATE/node_cpus"
}

start_mariadb() {
    alive_pid mariadb >/dev/null && return 0
    local data="$STATE/mysql/data"
    if [[ ! -d "$data/mysql" ]]; then
        rm -rf "$data"
        mkdir -p "$data"
        chown mysql:mysql "$data"
        mariadb-install-db --no-defaults --datadir="$data" --user=mysql --skip-test-db \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.out" 2>&1 ||
            { tail -n 20 "$STATE/log/mariadb-install.out" >&2; die "mariadb-install-db failed"; }
    fi
    # Small buffers: the accounting tables of a test cluster hold a few hundred rows.
    launch mariadb mariadbd --no-defaults --datadir="$data" --user=mysql \
        --socket="$STATE/mysql/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$STATE/mysql/mysqld.pid" --log-error="$STATE/log/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900
    wait_until "MariaDB accepting connections" mariadb \
        mariadb --no-defaults --socket="$STATE/mysql/mysqld.sock" -uroot -e 'SELECT 1'
    mariadb --no-defaults --socket="$STATE/mysql/mysqld.sock" -uroot <<EOF
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
EOF
}

start_munged() {
    alive_pid munged >/dev/null && return 0
    local m="$STATE/munge"
    if [[ ! -s "$m/munge.key" ]]; then
        dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$m"
    chmod 755 "$m" # munged wants the socket directory searchable by all
    chmod 400 "$m/munge.key"
    rm -f "$m/munge.socket.2" "$m/munge.socket.2.lock"
    launch munged setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --key-file="$m/munge.key" --socket="$m/munge.socket.2" \
        --pid-file="$m/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$m/munged.seed"
    wait_until "munge credentials" munged bash -c "munge -n -S '$m/munge.socket.2' | unmunge -S '$m/munge.socket.2'"
}

start_slurmdbd() {
    alive_pid slurmdbd >/dev/null && return 0
    SLURM_CONF="$STATE/etc/slurm.conf" launch slurmdbd slurmdbd -D
    wait_until "slurmdbd answering sacctmgr" slurmdbd \
        env SLURM_CONF="$STATE/etc/slurm.conf" sacctmgr -n -i show cluster
}

start_slurmctld() {
    alive_pid slurmctld >/dev/null && return 0
    SLURM_CONF="$STATE/etc/slurm.conf" launch slurmctld slurmctld -D -i
    wait_until "slurmctld answering" slurmctld env SLURM_CONF="$STATE/etc/slurm.conf" scontrol ping
}

start_slurmd() {
    alive_pid slurmd >/dev/null && return 0
    SLURM_CONF="$STATE/etc/slurm.conf" launch slurmd slurmd -D -N "$(cat "$STATE/node_name")"
}

node_ready() { # the node is idle (or already running jobs) and not drained/down
    local s
    s="$(SLURM_CONF="$STATE/etc/slurm.conf" sinfo -h -N -o %T 2>/dev/null | head -1)"
    case "$s" in idle | mixed | allocated) return 0 ;; *) return 1 ;; esac
}

print_env() { cat "$STATE/env.sh"; }

cmd_start() {
    local missing t0=$SECONDS
    missing="$(missing_binaries)"
    [[ -z "$missing" ]] || die "missing: $missing; run 'scripts/slurm_cluster.sh install' first (as root)"
    [[ $(id -u) -eq 0 ]] || die "start needs root (SlurmUser=root, munged runs as the munge user)"
    mkdir -p "$STATE"/{etc,munge,mysql,run,log,slurmctld,slurmd}
    chmod 755 "$STATE" "$STATE/mysql"
    chown -R mysql:mysql "$STATE/mysql" # uids may differ after a reinstall
    write_configs
    start_mariadb
    start_munged
    start_slurmdbd
    start_slurmctld
    start_slurmd
    # A node left drained/down by an earlier run (e.g. a killed slurmd) is put back to service.
    local t1=$SECONDS
    until node_ready; do
        alive_pid slurmd >/dev/null || { tail -n 20 "$STATE/log/slurmd.log" >&2; die "slurmd died"; }
        if ((SECONDS - t1 > 5)); then
            SLURM_CONF="$STATE/etc/slurm.conf" scontrol update nodename="$(cat "$STATE/node_name")" \
                state=resume >/dev/null 2>&1 || true
        fi
        ((SECONDS - t1 < START_TIMEOUT)) || {
            SLURM_CONF="$STATE/etc/slurm.conf" sinfo -N -l >&2 || true
            die "node not idle after ${START_TIMEOUT} s"
        }
        sleep 0.2
    done
    log "cluster '$CLUSTER' up in $((SECONDS - t0)) s: node $(cat "$STATE/node_name"), $(cat "$STATE/node_cpus") CPUs, partition $PARTITION; state in $STATE"
    print_env
}

cancel_jobs() {
    local conf="$STATE/etc/slurm.conf" t0=$SECONDS
    [[ -f "$conf" ]] || return 0
    alive_pid slurmctld >/dev/null || return 0
    SLURM_CONF="$conf" scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
    # Let slurmd reap the job steps before it goes away, so no orphan keeps the CPUs.
    while [[ -n "$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null)" ]] && ((SECONDS - t0 < 30)); do
        sleep 0.5
    done
}

# SIGTERM to each named daemon we started, then wait for all of them (SIGKILL after 15 s).
stop_daemons() {
    local name pid i
    local -a names=() pids=()
    for name in "$@"; do
        if pid="$(alive_pid "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            names+=("$name")
            pids+=("$pid")
        fi
        rm -f "$(pidfile "$name")"
    done
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        for _ in $(seq 1 150); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            log "${names[$i]} (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped ${names[$i]} (pid $pid)"
    done
}

cmd_stop() {
    [[ -d "$STATE/run" ]] || { log "nothing to stop in $STATE"; return 0; }
    local t0=$SECONDS
    cancel_jobs
    # slurmctld sends its last records to slurmdbd, which needs munge and MariaDB: two phases.
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd munged mariadb
    log "stopped in $((SECONDS - t0)) s"
}

cmd_status() {
    local name pid up=0
    for name in "${DAEMONS[@]}"; do
        if pid="$(alive_pid "$name")"; then
            printf '%-10s running  pid %s\n' "$name" "$pid"
            up=$((up + 1))
        else
            printf '%-10s stopped\n' "$name"
        fi
    done
    if [[ $up -eq ${#DAEMONS[@]} ]]; then
        SLURM_CONF="$STATE/etc/slurm.conf" sinfo -N -o '%N %P %T %c %m' 2>/dev/null || true
        SLURM_CONF="$STATE/etc/slurm.conf" squeue 2>/dev/null || true
        node_ready || return 1
        return 0
    fi
    return 1
}

case "$CMD" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) [[ -f "$STATE/env.sh" ]] || die "no $STATE/env.sh: run start first"; print_env ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
