"""Launch training through submitit: SLURM (or a local/debug executor), preemption -> checkpoint -> requeue.

``submit(cfg, run_dir)`` builds a submitit ``AutoExecutor`` from the config's ``launch`` section
(one task per GPU through ``srun``; ``launch.tasks_per_node`` tasks for CPU jobs), records what was
launched in the run directory and submits a :class:`TrainingTask`. Every task of the job turns
submitit's ``JobEnvironment`` into the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and calls :func:`mpdit_dist.trainer.train`. The first
start uses the ``resume`` it was submitted with (``auto``, ``never`` or a checkpoint path); a requeued
start (SLURM_RESTART_COUNT > 0, or the local executor's own count) continues from the newest
checkpoint of its own run directory (``resume="auto"``) once the first start has taken what was
submitted (see :func:`resume_for_start`).

Preemption (the facts behind this are measured in docs/slurm_testing.md):

- SLURM sends the warning signal ``launch.signal_delay_s`` before the time limit (``#SBATCH
  --signal=USR2@N``, to every task of the job step), and ``scancel --signal=USR2`` does the same by
  hand. The signal is submitit's: USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` names another one when
  submitit is imported; submitit writes it into the sbatch script and :func:`warning_signal` reads
  the same setting, so what SLURM sends is what we handle. Each task replaces submitit's handlers
  by ours: the warning signal and SIGTERM set :mod:`mpdit_dist.preemption`'s flag.
  submitit's own handler would checkpoint and requeue on rank 0 only, while the other ranks keep
  training until ``scontrol requeue`` has them SIGKILLed, possibly in the middle of writing their
  checkpoint shards.
- The trainer makes all ranks agree at the step boundary, saves the checkpoint on every rank and
  returns ``"preempted"``. Then every rank checks in at a file barrier in the run directory, rank 0
  alone requeues the job (``scontrol requeue``) once all ranks are in, and every rank leaves with
  ``SystemExit``: a task that *returned* would write submitit's result file, which the submitter
  would take as the job's final result.
- A run that has reached its last step returns ``"finished"`` and is never requeued. A preemption
  beyond ``launch.max_requeues`` (counted by SLURM_RESTART_COUNT) raises
  :class:`RequeueLimitError` on every rank: the job fails with that message, its checkpoint intact.
- SIGTERM alone (``scancel``, or SLURM preempting with its own requeue) also saves a checkpoint when
  there is time (KillWait), but the job is not requeued by us: SLURM has decided what happens to
  it. The tasks leave with ``SystemExit`` too, so a cancelled job is never reported as finished.

``wait(job)`` polls the scheduler and never blocks forever: a job that dies (OOM, node failure,
``scancel``) raises :class:`JobFailedError` with the tail of every rank's log, as soon as the
scheduler reports it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from . import config as C

log = logging.getLogger("mpdit_dist.launch")

REPO = Path(__file__).resolve().parents[1]
LAUNCH_DIR = "launch"  # inside the run dir: sbatch scripts, code version, job records, barriers
LOGS_DIR = "logs"  # inside the run dir: per-rank log symlinks of the newest job
# The exit status that makes submitit's local controller start the tasks again (submitit.local).
LOCAL_REQUEUE_EXIT = 144


class RequeueLimitError(RuntimeError):
    """Preempted once more than ``launch.max_requeues`` allows: the job stops (its checkpoint stays)."""


class JobFailedError(RuntimeError):
    """A job ended without finishing: it raised, was cancelled, ran out of memory or lost its node."""

    def __init__(self, job_id: str, state: str, log_tail: str, detail: str = ""):
        self.job_id, self.state, self.log_tail = job_id, state, log_tail
        msg = f"job {job_id} ended without finishing (state: {state})"
        if detail:
            msg += f": {detail}"
        super().__init__(f"{msg}\n--- log tail ---\n{log_tail}")


# ------------------------------------------------------------------------------------------------
# Pure parts: what to ask the scheduler for, what to do after training
# ------------------------------------------------------------------------------------------------

def tasks_per_node(launch: C.LaunchConfig) -> int:
    """One task per GPU; CPU jobs (``gpus_per_node=0``) name their task count in ``tasks_per_node``."""
    gpus, tasks = launch.gpus_per_node, launch.tasks_per_node
    if gpus < 0:
        raise C.ConfigError(f"launch.gpus_per_node={gpus} must be >= 0")
    if tasks is None:
        if gpus == 0:
            raise C.ConfigError("launch.gpus_per_node=0 (a CPU job): set launch.tasks_per_node to the "
                                "number of processes per node")
        return gpus
    if tasks < 1:
        raise C.ConfigError(f"launch.tasks_per_node={tasks} must be >= 1")
    if gpus > 0 and tasks != gpus:
        raise C.ConfigError(f"launch.tasks_per_node={tasks} but launch.gpus_per_node={gpus}: the launcher "
                            "runs one task per GPU (leave tasks_per_node unset, or set gpus_per_node=0 "
                            "for a CPU job)")
    return tasks


def world_size(launch: C.LaunchConfig) -> int:
    return launch.nodes * tasks_per_node(launch)


def job_name(cfg: C.Config, run_dir: Path) -> str:
    return cfg.run_name or Path(run_dir).name or "mpdit"


def submitit_folder(cfg: C.Config, run_dir: Path) -> Path:
    """submitit's folder template (one sub-folder per job id): ``launch.folder`` or ``<run_dir>/submitit``."""
    base = Path(cfg.launch.folder) if cfg.launch.folder else Path(run_dir) / "submitit"
    return base.absolute() / "%j"


def executor_parameters(cfg: C.Config, run_dir: Path) -> dict[str, Any]:
    """The ``AutoExecutor.update_parameters`` keywords for ``cfg.launch`` (pure; no scheduler needed).

    Generic submitit names where they exist (nodes, tasks_per_node, gpus_per_node, cpus_per_task,
    mem_gb, timeout_min, name), ``slurm_*`` for the SLURM-only ones. ``launch.mem_gb`` is memory
    *per task*; SLURM is asked for ``mem_gb * tasks_per_node`` per node (``--mem``).
    ``launch.extra_sbatch`` goes verbatim into the sbatch header (``slurm_additional_parameters``,
    e.g. ``{"exclusive": true, "mail-type": "END"}``) and wins over the generated values.
    """
    L = cfg.launch
    if L.nodes < 1:
        raise C.ConfigError(f"launch.nodes={L.nodes} must be >= 1")
    if L.cpus_per_task < 1:
        raise C.ConfigError(f"launch.cpus_per_task={L.cpus_per_task} must be >= 1")
    if L.time_min < 1:
        raise C.ConfigError(f"launch.time_min={L.time_min} must be >= 1")
    if L.max_requeues < 0:
        raise C.ConfigError(f"launch.max_requeues={L.max_requeues} must be >= 0")
    if L.signal_delay_s < 0 or L.signal_delay_s >= L.time_min * 60:
        raise C.ConfigError(f"launch.signal_delay_s={L.signal_delay_s} must be >= 0 and shorter than "
                            f"launch.time_min={L.time_min} minutes")
    tpn = tasks_per_node(L)
    if L.cluster == "debug" and L.nodes * tpn != 1:
        raise C.ConfigError(f"launch.cluster=debug runs one process in this one; got launch.nodes={L.nodes} x "
                            f"{tpn} tasks (set launch.nodes=1 launch.gpus_per_node=0 launch.tasks_per_node=1, "
                            "or use launch.cluster=local)")
    if L.cluster == "local" and L.nodes != 1:
        raise C.ConfigError(f"launch.cluster=local runs on this machine only: launch.nodes={L.nodes} must be 1")
    # The job must import the code that was submitted (the code version recorded for the run),
    # and torch must not start more threads than the task has CPUs.
    setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"export OMP_NUM_THREADS={L.cpus_per_task}", *L.setup]
    params: dict[str, Any] = dict(
        name=job_name(cfg, run_dir),
        nodes=L.nodes,
        tasks_per_node=tpn,
        cpus_per_task=L.cpus_per_task,
        timeout_min=L.time_min,
        slurm_signal_delay_s=L.signal_delay_s,
        # a task that fails ends the job step: the other ranks would otherwise wait in their next
        # collective until the process group's timeout (NCCL does not notice a dead peer)
        slurm_srun_args=["--kill-on-bad-exit=1"],
        slurm_setup=setup,
        local_setup=setup,
    )
    if L.gpus_per_node > 0:
        params["gpus_per_node"] = L.gpus_per_node
    if L.mem_gb is not None:
        if L.mem_gb <= 0:
            raise C.ConfigError(f"launch.mem_gb={L.mem_gb} must be > 0 (memory per task, GB)")
        params["mem_gb"] = L.mem_gb * tpn
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(L, key)
        if value:
            params[f"slurm_{key}"] = value
    if L.extra_sbatch:
        params["slurm_additional_parameters"] = {str(k): v for k, v in L.extra_sbatch.items()}
    return params


def warning_signal() -> signal.Signals:
    """The signal SLURM sends before the time limit: submitit's (``#SBATCH --signal=<it>@N``), i.e.
    USR2 unless the environment variable SUBMITIT_PREEMPT_SIGNAL named another one when submitit
    was imported. SIGTERM is refused: it must stay the "stop, SLURM decides" signal."""
    import submitit

    name = f"SIG{submitit.JobEnvironment.USR_SIG}"
    try:
        sig = signal.Signals[name]
    except KeyError:
        raise C.ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG!r} names no signal "
                            f"({name} does not exist); unset it (USR2) or name one such as USR1") from None
    if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):
        raise C.ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG!r} cannot be the warning "
                            "signal (SIGTERM means stop without requeue; KILL/STOP/CONT cannot be handled); "
                            "unset it (USR2) or name one such as USR1")
    return sig


def preempt_signals() -> tuple[signal.Signals, signal.Signals]:
    """The signals each task turns into a stop request: the warning signal, then SIGTERM."""
    return warning_signal(), signal.SIGTERM


def resume_for_start(submitted: str, restart: int, run_dir: Path) -> str:
    """The ``resume`` of this start of the job (pure but for a look into ``<run_dir>/checkpoints``).

    The first start (``restart == 0``) uses what was submitted (``auto``, ``never`` or a path). A
    requeued start continues the run: ``never`` becomes ``auto`` (the same thing in an empty run
    directory, and the only right thing once the first start has saved). A submitted path stays
    until the first start has taken it:

    - a checkpoint of this run directory (going back to an older step): taken once the later
      checkpoints are gone (the trainer moves them aside right after loading it); while they are
      still there, the first start never got that far, so the path is used again;
    - a checkpoint of another directory: taken once this directory holds a checkpoint of its own
      (complete, or an async write that finished, which the trainer then makes visible).
    """
    if restart == 0 or submitted == "auto":
        return submitted
    if submitted == "never":
        return "auto"
    from .checkpoint import COMPLETE, CheckpointManager, list_checkpoints, write_finished

    ckpt = CheckpointManager(Path(run_dir))
    root, path = ckpt.root, Path(submitted)
    saved = list_checkpoints(root)
    if ckpt.holds(path):
        mine = [s for s, p in saved if p.resolve() == path.resolve()]
        later = [s for s, p in saved if mine and s > mine[0] and (p / COMPLETE).is_file()]
        return submitted if later else "auto"
    own = any((p / COMPLETE).is_file() for _, p in saved) or (
        root.is_dir() and any(write_finished(p) is None for p in root.glob("tmp-step_*")))
    return "auto" if own else submitted


def requeue_action(status: str, restart_count: int, max_requeues: int, signals: tuple[str, ...] = ("SIGUSR2",),
                   warning: str = "SIGUSR2") -> str:
    """What a task does after ``train`` returned (pure).

    - ``"done"``: the run finished: return the result, never requeue;
    - ``"stop"``: stopped (checkpoint saved) by SIGTERM or by code, without the warning signal:
      SLURM (``scancel``, its own preemption with requeue) decides what happens next, not us; leave
      without a result, so that the submitter does not take the job as finished;
    - ``"requeue"``: the warning signal (``warning``, SIGUSR2 by default; the names of
      ``signals`` are those seen) stopped it and fewer than ``max_requeues`` requeues
      happened so far (``restart_count``, SLURM_RESTART_COUNT);
    - ``"limit"``: the warning signal stopped it, but the job was requeued ``max_requeues`` times
      already: fail with :class:`RequeueLimitError`.
    """
    if status == "finished":
        return "done"
    if status != "preempted":
        raise ValueError(f"unknown training status {status!r}")
    if warning not in signals:
        return "stop"
    return "requeue" if restart_count < max_requeues else "limit"


def requeue_limit_message(job_id: str, step: int, restart_count: int, max_requeues: int, run_dir: Path) -> str:
    return (f"job {job_id}: preempted at step {step} after {restart_count} requeue(s), and launch.max_requeues="
            f"{max_requeues}: not requeueing again. The checkpoint of step {step} is in {run_dir}/checkpoints; "
            f"continue with `python slurm/submit.py --config {run_dir}/config.yaml --run-dir {run_dir}` "
            f"(or raise launch.max_requeues).")


def master_port(job_id: str) -> int:
    """A port derived from the job id: every task of a job computes the same one, and concurrent jobs
    on one node (different ids) do not collide."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


# ------------------------------------------------------------------------------------------------
# Inside the job
# ------------------------------------------------------------------------------------------------

_SIGNALS_SEEN: list[str] = []


def _stop_handler(signum, _frame) -> None:
    from . import preemption

    name = signal.Signals(signum).name
    _SIGNALS_SEEN.append(name)
    preemption.request_stop(name)


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def distributed_environ(env, cluster: str) -> dict[str, str]:
    """torchrun-style variables from a submitit ``JobEnvironment`` (set before ``train``)."""
    ntasks, nnodes = env.num_tasks, max(1, env.num_nodes)
    if cluster == "slurm":
        addr, port = env.hostnames[0], master_port(env.job_id)
    elif cluster == "local":
        addr, port = "127.0.0.1", master_port(env.job_id)
    else:  # debug: in the submitting process, a single rank
        from .distributed.env import free_port

        addr, port = "127.0.0.1", free_port()
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(ntasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(ntasks // nnodes), "MASTER_ADDR": str(addr), "MASTER_PORT": str(port)}


def restart_count(cluster: str, run_dir: Path, job_id: str) -> int:
    """How often this job was requeued: SLURM_RESTART_COUNT on SLURM; our own record on a local cluster."""
    if cluster == "slurm":
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    record = Path(run_dir) / LAUNCH_DIR / f"requeues_{job_id}"
    return len(record.read_text().split()) if record.exists() else 0


def file_barrier(folder: Path, rank: int, world: int, timeout_s: float, wait: bool = True) -> None:
    """Every rank checks in by creating ``folder/rank<R>``; with ``wait`` block until all ``world`` did.

    A file barrier because the trainer has already torn its process group down when it returns,
    and the run directory is shared by all nodes anyway (checkpoints live there)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}").touch()
    if not wait:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(world) if not (folder / f"rank{r}").exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} did not reach the barrier {folder} within {timeout_s} s")
        time.sleep(0.05)


def _resolve_tracking_uri(cfg: C.Config) -> str:
    from .tracking import default_tracking_uri

    return cfg.tracking.uri or default_tracking_uri(cfg.results_dir)


def set_mlflow_tags(cfg: C.Config, run_dir: Path, tags: dict[str, str], timeout_s: float = 5.0) -> bool:
    """Set ``tags`` on the run's MLflow run (named in ``<run_dir>/mlflow_run_id``); False when there
    is no such run or MLflow fails (a warning: tracking never fails a job).

    Bounded by a small multiple of ``timeout_s`` (a probe, then one retry at most):
    MLflow's own HTTP defaults retry for many minutes, which at the end of a job would hold its
    allocation, and before a requeue would run into the time limit."""
    from .tracking import RUN_ID_FILE, bounded_http, open_client, probe_http

    id_file = Path(run_dir) / RUN_ID_FILE
    if not tags or not cfg.tracking.enabled or not id_file.exists():
        return False
    try:
        from mlflow.entities import RunTag

        uri = _resolve_tracking_uri(cfg)
        if uri.startswith(("http://", "https://")):
            probe_http(uri, timeout_s)
        with bounded_http(timeout_s):
            client = open_client(uri)
            run_id = id_file.read_text().strip()
            client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])
        return True
    except Exception as exc:  # noqa: BLE001 - tracking must not fail the job
        log.warning("could not set MLflow tags %s on the run of %s: %s", tags, run_dir, exc)
        return False


class TrainingTask:
    """The callable submitit runs on every task of the job (picklable: plain data only).

    Returns ``{"status", "step", "run_dir", "rank", "restart", "job_id"}`` when the run finished (on
    the debug executor also when it was stopped); leaves with ``SystemExit`` after a stop (requeued
    by rank 0 after the warning signal, or not after SIGTERM); raises :class:`RequeueLimitError`
    when the warning signal comes once the job was requeued ``launch.max_requeues`` times.
    """

    def __init__(self, cfg: dict[str, Any], run_dir: str, resume: str = "auto", barrier_timeout_s: float = 300.0):
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.barrier_timeout_s = barrier_timeout_s

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's own handler of the warning signal calls this, on rank 0, only when the signal
        comes before ``__call__`` has installed ours (during start-up). The requeued job runs this
        same task with SLURM_RESTART_COUNT > 0, so it resumes like any requeue: ``"auto"`` from the
        run directory (:func:`resume_for_start`; the submitted ``resume`` only while nothing was
        saved there)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        import submitit

        from . import preemption

        cfg = C.from_dict(self.cfg)
        C.validate(cfg)
        run_dir = Path(self.run_dir)
        env = submitit.JobEnvironment()
        cluster = env.cluster
        job_id = str(env.job_id)
        rank, world = env.global_rank, env.num_tasks
        if cluster != "debug":
            logging.basicConfig(level=logging.INFO,
                                format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
        restart = restart_count(cluster, run_dir, job_id)
        resume = resume_for_start(self.resume, restart, run_dir)
        signals_handled = preempt_signals()
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", cfg.launch.cpus_per_task))
        values = distributed_environ(env, cluster)
        values["OMP_NUM_THREADS"] = str(threads)
        log.info("job %s task %d/%d (restart %d, resume %s) on %s: %s threads, MASTER=%s:%s", job_id, rank, world,
                 restart, resume, socket.gethostname(), threads, values["MASTER_ADDR"], values["MASTER_PORT"])

        # Our handlers replace the ones submitit installed before calling us (see the module doc).
        previous = {sig: signal.getsignal(sig) for sig in signals_handled}
        preemption.clear()
        _SIGNALS_SEEN.clear()
        for sig in signals_handled:
            signal.signal(sig, _stop_handler)
        old_threads = None
        try:
            import torch

            old_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            from .trainer import train

            with _patched_environ(values):
                result = train(cfg, run_dir, resume)
        finally:
            if cluster == "debug":  # we ran inside the submitter: give it its state back
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                if old_threads is not None:
                    torch.set_num_threads(old_threads)
        result = dict(result, rank=rank, restart=restart, job_id=job_id)
        # what any rank saw up to the stop (the trainer's agreement: the same on every rank, so that
        # all of them take the same action; the file barrier of a requeue waits for every rank),
        # with what this rank saw since
        signals = tuple(dict.fromkeys([*result.get("stop_reasons", ()), *_SIGNALS_SEEN]))
        action = requeue_action(result["status"], restart, cfg.launch.max_requeues, signals,
                                warning=signals_handled[0].name)
        if rank == 0 and cfg.launch.tags and action != "requeue":
            # when the job ends; not before a requeue, whose time is the checkpoint's and the barrier's
            set_mlflow_tags(cfg, run_dir, cfg.launch.tags)
        if result["status"] == "preempted":
            log.warning("rank %d stopped at step %d (signals %s): %s", rank, result["step"], list(signals), action)
        if action == "done" or cluster == "debug":
            if action != "done":
                log.warning("debug executor: no requeue; resubmit to continue from step %d", result["step"])
            return result
        if action == "stop":
            raise SystemExit(128 + signal.SIGTERM)
        if action == "limit":
            raise RequeueLimitError(requeue_limit_message(job_id, result["step"], restart, cfg.launch.max_requeues,
                                                          run_dir))
        # All ranks have saved (the checkpoint is collective); rank 0 requeues only once every rank
        # has checked in, so that the SIGTERM/SIGKILL of the requeue cannot cut a rank short.
        barrier = run_dir / LAUNCH_DIR / "barriers" / f"preempt-{job_id}-{restart}"
        file_barrier(barrier, rank, world, self.barrier_timeout_s, wait=rank == 0)
        if rank != 0:
            raise SystemExit(0)
        if cluster == "slurm":
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
            log.warning("requeued job %s (requeue %d of at most %d)", job_id, restart + 1, cfg.launch.max_requeues)
            raise SystemExit(0)
        # submitit's local controller starts every task again when one exits with this status.
        with open(run_dir / LAUNCH_DIR / f"requeues_{job_id}", "a") as f:
            f.write(f"{result['step']}\n")
        raise SystemExit(LOCAL_REQUEUE_EXIT)


# ------------------------------------------------------------------------------------------------
# Submitting side
# ------------------------------------------------------------------------------------------------

def make_executor(cfg: C.Config, run_dir: Path):
    import submitit

    executor = submitit.AutoExecutor(folder=submitit_folder(cfg, run_dir), cluster=cfg.launch.cluster)
    executor.update_parameters(**executor_parameters(cfg, run_dir))
    if cfg.launch.cluster == "local":
        # AutoExecutor passes the warning delay to SLURM only (it refuses a local_ form): without
        # this a local job would get submitit's own 30 s whatever launch.signal_delay_s says
        executor._executor.update_parameters(signal_delay_s=int(cfg.launch.signal_delay_s))
    return executor


def _git(repo: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def write_code_version(launch_dir: Path, repo: Path = REPO) -> dict[str, Any]:
    """``code_version.json`` (commit, branch, dirty, untracked files) and ``code.diff`` (``git diff HEAD``:
    the uncommitted changes to tracked files) of the repository the job will import."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    commit = (_git(repo, "rev-parse", "HEAD") or "").strip() or None
    diff = _git(repo, "diff", "HEAD") or ""
    untracked = (_git(repo, "ls-files", "--others", "--exclude-standard") or "").split()
    info = {"repo": str(repo), "commit": commit,
            "branch": (_git(repo, "rev-parse", "--abbrev-ref", "HEAD") or "").strip(),
            "dirty": bool(diff.strip()), "untracked": untracked, "diff_file": "code.diff"}
    (launch_dir / "code.diff").write_text(diff)
    (launch_dir / "code_version.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _absolutise(cfg: C.Config) -> None:
    """Relative paths in the config resolve against the submitting directory, as in the job (whose
    working directory is the same); written absolute so the recorded config says where things are."""
    cfg.results_dir = str(Path(cfg.results_dir).absolute())
    if cfg.data.path and not os.path.isabs(cfg.data.path) and Path(cfg.data.path).exists():
        cfg.data.path = str(Path(cfg.data.path).absolute())


def _log_paths(folder_template: Path, job_id: str, ntasks: int) -> list[tuple[Path, Path]]:
    from submitit.core.utils import JobPaths

    return [(JobPaths(folder_template, job_id, r).stdout, JobPaths(folder_template, job_id, r).stderr)
            for r in range(ntasks)]


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(os.path.relpath(target, link.parent))
    except ValueError:  # different drives (Windows); not expected on clusters
        link.symlink_to(target)


def submit(cfg: C.Config, run_dir: str | Path, resume: str = "auto",
           echo: Optional[Callable[[str], None]] = print):
    """Submit the training run of ``cfg`` into ``run_dir``; returns the submitit job.

    ``resume`` applies to the job's first start; its requeued starts resume from ``run_dir``
    (:func:`resume_for_start`). On ``launch.cluster=debug`` nothing runs until :func:`wait` (or
    ``job.result()``) is called: the training then runs in the calling process.

    Writes into the run dir: ``config.yaml`` (resolved), ``launch/<job>_submission.sh`` (the sbatch
    script submitit generated), ``launch/code_version.json`` + ``launch/code.diff``,
    ``launch/jobs.jsonl`` (one record per submission), and ``logs/rank<R>.{out,err}`` symlinks to
    the job's per-rank logs. ``echo`` (print by default; None for silence) gets the job id, where
    the logs are and the MLflow run.
    """
    run_dir = Path(run_dir).absolute()
    cfg = C.from_dict(C.to_dict(cfg))  # a copy: the caller's config is left as it was
    _absolutise(cfg)
    C.validate(cfg)
    params = executor_parameters(cfg, run_dir)  # config errors before anything is written
    warning_signal()  # and a SUBMITIT_PREEMPT_SIGNAL the tasks could not handle
    ntasks = params["nodes"] * params["tasks_per_node"]
    executor = make_executor(cfg, run_dir)  # fails here, before any file is written, without srun
    from .checkpoint import CheckpointManager

    # the trainer's own refusal, before config.yaml and launch/ of the run already there are overwritten
    manager = CheckpointManager(run_dir)
    manager.check_resume_path(resume)  # a --resume PATH that is no checkpoint: now, not after the queue
    manager.refuse_second_run(resume)
    launch_dir = run_dir / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    C.save_config(cfg, run_dir / "config.yaml")
    code = write_code_version(launch_dir)
    job = executor.submit(TrainingTask(C.to_dict(cfg), str(run_dir), resume))
    job_id = str(job.job_id)

    script = None
    if cfg.launch.cluster == "slurm":
        from submitit.core.utils import JobPaths

        src = JobPaths(submitit_folder(cfg, run_dir), job_id).submission_file
        if src.exists():
            script = launch_dir / f"{job_id}_submission.sh"
            shutil.copyfile(src, script)
    logs: list[tuple[Path, Path]] = []
    if cfg.launch.cluster != "debug":
        logs_dir = run_dir / LOGS_DIR
        logs_dir.mkdir(exist_ok=True)
        for r, (out, err) in enumerate(_log_paths(submitit_folder(cfg, run_dir), job_id, ntasks)):
            _link(out, logs_dir / f"rank{r}.out")
            _link(err, logs_dir / f"rank{r}.err")
            logs.append((out, err))
    record = {"job_id": job_id, "cluster": cfg.launch.cluster, "submitted": datetime.datetime.now().isoformat(),
              "nodes": params["nodes"], "tasks_per_node": params["tasks_per_node"], "resume": resume,
              "commit": code["commit"], "dirty": code["dirty"],
              "submitit_folder": str(submitit_folder(cfg, run_dir)).replace("%j", job_id),
              "sbatch_script": str(script) if script else None}
    with open(launch_dir / "jobs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")

    if echo is not None:
        for line in describe_submission(cfg, run_dir, job_id, ntasks, script, bool(logs)):
            echo(line)
    return job


def describe_submission(cfg: C.Config, run_dir: Path, job_id: str, ntasks: int, script: Optional[Path],
                        has_logs: bool) -> list[str]:
    from .tracking import RUN_ID_FILE

    L = cfg.launch
    lines = [f"submitted job {job_id} ({L.cluster}: {L.nodes} node(s) x {ntasks // L.nodes} task(s), "
             f"backend {cfg.parallel.backend}, partition {L.partition or 'default'})",
             f"  run dir:  {run_dir}"]
    if has_logs:
        lines.append(f"  logs:     {run_dir / LOGS_DIR}/rank{{0..{ntasks - 1}}}.{{out,err}} -> "
                     f"{str(submitit_folder(cfg, run_dir)).replace('%j', job_id)}")
    if script:
        lines.append(f"  sbatch:   {script}")
    if cfg.tracking.enabled:
        id_file = run_dir / RUN_ID_FILE
        uri = _resolve_tracking_uri(cfg)
        if id_file.exists():
            lines.append(f"  mlflow:   run {id_file.read_text().strip()} in experiment '{cfg.tracking.experiment}' "
                         f"at {uri} (continued by this job)")
        else:
            lines.append(f"  mlflow:   experiment '{cfg.tracking.experiment}' at {uri}; the run id appears in "
                         f"{id_file} once the job starts training")
    else:
        lines.append(f"  metrics:  {run_dir / 'metrics.jsonl'} (tracking.enabled=false)")
    return lines


def log_tail(job, lines: int = 40) -> str:
    """The last ``lines`` lines of every rank's stderr and stdout (what exists of them)."""
    ntasks = job.num_tasks
    folder = job.paths.folder
    parts = []
    for r in range(ntasks):
        for name, path in zip(("stderr", "stdout"), _log_paths(folder, str(job.job_id), ntasks)[r][::-1]):
            if not path.exists():
                parts.append(f"----- rank {r} {name}: {path} does not exist -----")
                continue
            text = path.read_text(errors="replace").splitlines()
            parts.append(f"----- rank {r} {name} (last {min(lines, len(text))} of {len(text)} lines, {path}) -----")
            parts.extend(text[-lines:])
    return "\n".join(parts)


def _result_files(job) -> list[Path]:
    from submitit.core.utils import JobPaths

    return [JobPaths(job.paths.folder, str(job.job_id), r).result_pickle for r in range(job.num_tasks)]


def job_state(job) -> str:
    """The scheduler's state of the job, freshly asked (sacct on SLURM)."""
    try:
        return str(job.get_info(mode="force").get("State", "UNKNOWN"))
    except Exception:  # noqa: BLE001 - local/debug jobs, or sacct hiccups
        return str(job.state)


def wait(job, timeout_s: Optional[float] = None, poll_s: float = 2.0, tail_lines: int = 40) -> list[Any]:
    """Wait for ``job`` and return every task's result (a list, rank order).

    Polls ``job.done(force_check=True)`` (the scheduler, not only result files) every ``poll_s``:
    a job that died without results (cancelled, out of memory, node failure, killed) raises
    :class:`JobFailedError` with its log tail as soon as the scheduler says so, and so does a job
    whose code raised. ``timeout_s`` bounds the wait (``TimeoutError``; the job keeps running).
    """
    import submitit
    from submitit.local.debug import DebugJob

    if isinstance(job, DebugJob):  # runs in this process, now
        try:
            return job.results()
        except Exception as exc:  # noqa: BLE001 - in-process: the exception itself is the log
            raise JobFailedError(str(job.job_id), "FAILED", f"{type(exc).__name__}: {exc}") from exc
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if all(p.exists() for p in _result_files(job)):
            break
        # A multi-task job's done() asks its per-task jobs without forcing the scheduler query,
        # so refresh the shared state cache first (sacct on SLURM).
        job_state(job)
        if job.done(force_check=True):
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {job_state(job)} after {timeout_s} s; logs in "
                               f"{job.paths.folder}")
        time.sleep(poll_s)
    if not all(p.exists() for p in _result_files(job)):
        state = job_state(job)
        if not state.startswith("COMPLETED"):
            # No result will ever come: say so now instead of waiting for result files.
            raise JobFailedError(str(job.job_id), state, log_tail(job, tail_lines),
                                 "it left no result (killed from outside, out of memory or a lost node)")
    try:
        return job.results()
    except submitit.core.utils.FailedJobError as exc:
        raise JobFailedError(str(job.job_id), job_state(job), log_tail(job, tail_lines),
                             _last_line_of(str(exc))) from None
    except submitit.core.utils.UncompletedJobError as exc:
        raise JobFailedError(str(job.job_id), job_state(job), log_tail(job, tail_lines),
                             _last_line_of(str(exc))) from None


def _last_line_of(text: str) -> str:
    """The most telling line of a traceback: the last non-empty one that names an error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln
    return lines[-1] if lines else ""


__all__ = ["JobFailedError", "RequeueLimitError", "TrainingTask", "executor_parameters", "file_barrier",
           "job_state", "log_tail", "make_executor", "master_port", "preempt_signals", "requeue_action",
           "resume_for_start", "submit", "tasks_per_node", "wait", "warning_signal", "world_size",
           "write_code_version"]
