"""The local SLURM cluster through submitit, the way the launcher will use it.

Each test submits real jobs to the one-node cluster of scripts/slurm_cluster.sh (2 CPUs on the
CI machine) and checks what SLURM and submitit did: results come back, a 2-task job runs both
tasks side by side with their ranks, the preemption signal requeues a checkpointable job, and a
job killed from outside is reported as failed within a bounded time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]


# ----- callables that run inside the jobs (imported there through PYTHONPATH) -----

def describe_task(x: int) -> dict:
    env = submitit.JobEnvironment()
    return dict(value=x * x, job_id=env.job_id, global_rank=env.global_rank,
                local_rank=env.local_rank, num_tasks=env.num_tasks, num_nodes=env.num_nodes,
                slurm_conf=os.environ.get("SLURM_CONF"))


def meet_then_describe(folder: str, timeout: float) -> dict:
    """Each task announces itself and waits for all others: only passes if they run concurrently."""
    env = submitit.JobEnvironment()
    Path(folder, f"rank{env.global_rank}").touch()
    deadline = time.time() + timeout
    while len(list(Path(folder).glob("rank*"))) < env.num_tasks:
        if time.time() > deadline:
            raise TimeoutError(f"task {env.global_rank} alone after {timeout} s")
        time.sleep(0.05)
    return describe_task(env.global_rank)


class SignalRecorder(submitit.helpers.Checkpointable):
    """Runs until signalled; the first run of every task logs the signals it receives (and passes
    them on to submitit's handlers), ``checkpoint`` logs which rank called it; the run after the
    requeue returns at once."""

    def __init__(self, folder: str, run_seconds: float):
        self.folder = folder
        self.run_seconds = run_seconds

    def _log(self, rank: int, event: str) -> None:
        with open(Path(self.folder, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(dict(t=time.time(), event=event,
                                    restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")))) + "\n")

    def __call__(self) -> dict:
        rank = submitit.JobEnvironment().global_rank
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self._log(rank, "start")
        if restart > 0:
            return dict(rank=rank, restart=restart)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            chained = signal.getsignal(sig)  # submitit's: checkpoint_and_try_requeue / bypass

            def handler(signum, frame, chained=chained, rank=rank):
                self._log(rank, signal.Signals(signum).name)
                if callable(chained):
                    chained(signum, frame)

            signal.signal(sig, handler)
        Path(self.folder, f"ready{rank}").touch()
        time.sleep(self.run_seconds)
        return dict(rank=rank, restart=restart, finished_without_signal=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        self._log(submitit.JobEnvironment().global_rank, "checkpoint")
        return super().checkpoint(*args, **kwargs)


def read_events(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def sacct_records(job_id: str) -> list[tuple[str, str]]:
    """(JobID, State) of every record of the job, including the runs before requeues (-D)."""
    out = subprocess.run(["sacct", "-D", "-n", "-X", "-j", job_id, "-o", "JobID,State", "--parsable2"],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")[:2]) for line in out.splitlines() if line]


def eventual_state(job, timeout: float) -> str:
    """The job's state from sacct (forced refresh), once it is no longer running, or after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        state = job.get_info(mode="force").get("State", "UNKNOWN")
        if state not in ("UNKNOWN", "PENDING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def wait_running(job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while job.state != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} not running after {timeout} s: {job.state}"
        time.sleep(0.3)


# ----- tests -----

def test_start_is_idempotent_and_quick(slurm_cluster):
    pids = {p.name: p.read_text() for p in (slurm_cluster.state_dir / "run").glob("*.pid")
            if not p.name.endswith(".daemon.pid")}
    assert set(pids) == {"mariadb.pid", "munged.pid", "slurmdbd.pid", "slurmctld.pid", "slurmd.pid"}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(slurm_cluster.script), "start", str(slurm_cluster.state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 10
    assert f"export SLURM_CONF={slurm_cluster.slurm_conf}" in proc.stdout
    after = {name: (slurm_cluster.state_dir / "run" / name).read_text() for name in pids}
    assert after == pids, "start restarted daemons that were already running"


def test_one_task_job_returns_its_result(slurm_jobs):
    job = slurm_jobs.executor("one").submit(describe_task, 7)
    result = job.result()
    assert result["value"] == 49
    assert result["job_id"] == job.job_id
    assert (result["global_rank"], result["num_tasks"], result["num_nodes"]) == (0, 1, 1)
    assert result["slurm_conf"] == os.environ["SLURM_CONF"]  # the job sees the submitter's env
    assert eventual_state(job, 15) == "COMPLETED"  # accounting (sacct) has the job


def test_two_task_job_runs_both_tasks_side_by_side(slurm_jobs, slurm_cluster, tmp_path):
    assert slurm_cluster.node_cpus >= 2, "the test cluster needs 2 CPUs"
    meet = tmp_path / "meet"
    meet.mkdir()
    job = slurm_jobs.executor("two", tasks_per_node=2, cpus_per_task=1).submit(
        meet_then_describe, str(meet), 30.0)
    results = job.results()
    assert len(results) == 2
    assert sorted(r["global_rank"] for r in results) == [0, 1]
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert {r["num_tasks"] for r in results} == {2}
    assert {r["job_id"] for r in results} == {job.job_id}


def test_usr2_reaches_every_task_and_rank0_requeues(slurm_jobs, tmp_path):
    """``scancel --signal=USR2`` (what SLURM sends before a time limit with --signal=USR2@N)
    reaches every task; submitit's handler checkpoints and requeues on rank 0 only; the job runs
    again (SLURM_RESTART_COUNT=1) and finishes."""
    events = tmp_path / "events"
    events.mkdir()
    executor = slurm_jobs.executor("requeue", tasks_per_node=2, cpus_per_task=1)
    job = executor.submit(SignalRecorder(str(events), run_seconds=60))
    slurm_jobs.wait_for_file(events / "ready0", 30, job)
    slurm_jobs.wait_for_file(events / "ready1", 30, job)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["restart"] for r in results} == {1}, results
    first = {rank: [e["event"] for e in read_events(events, rank) if e["restart"] == 0] for rank in (0, 1)}
    assert "SIGUSR2" in first[0] and "SIGUSR2" in first[1], first
    assert "checkpoint" in first[0] and "checkpoint" not in first[1], first
    restarted = min(e["t"] for rank in (0, 1) for e in read_events(events, rank) if e["restart"] == 1)
    delay = restarted - signalled
    print(f"\nrequeue: signal -> second run started in {delay:.1f} s")
    # cred_expire=10 holds a requeued job ~11 s, sched_interval=2 adds up to 2 s; SLURM's default
    # (120 s) would fail here.
    assert delay < 45
    # Accounting keeps both runs: the first one REQUEUED, the second COMPLETED (once the job
    # record is closed, a moment after the results are written).
    deadline = time.monotonic() + 15
    while (states := [state for _, state in sacct_records(job.job_id)])[-1:] != ["COMPLETED"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states == ["REQUEUED", "COMPLETED"], states


def test_job_killed_from_outside_is_reported_failed(slurm_jobs):
    job = slurm_jobs.executor("killed").submit(time.sleep, 120)
    wait_running(job, 30)
    killed = time.monotonic()
    subprocess.run(["scancel", job.job_id], check=True)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    waited = time.monotonic() - killed
    print(f"\nkilled job reported failed after {waited:.1f} s")
    # sacct notices within seconds; submitit then waits 15 s (Job._results_timeout_s) for a result
    # file that never comes.
    assert waited < 45
    assert job.state.startswith("CANCELLED")
    assert job.job_id not in slurm_jobs.queued_job_ids()
