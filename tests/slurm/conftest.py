"""Fixtures for tests that run against a real one-node SLURM cluster on localhost.

The cluster is the one ``scripts/slurm_cluster.sh`` manages (munge, slurmdbd with MariaDB,
slurmctld, slurmd; see docs/slurm_testing.md). ``slurm_cluster`` (session) uses the running
cluster or starts it, and stops it at the end only if it started it. ``slurm_jobs`` (function)
gives each test its own submitit folder and cancels every job the test submitted, so that no
test leaves jobs holding the node's CPUs.

When SLURM is not installed the tests are skipped with the command that installs it; with
``MPDIT_REQUIRE_SLURM=1`` (CI) they fail instead, so a broken install cannot pass silently.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
DEFAULT_STATE = Path(os.environ.get("MPDIT_SLURM_STATE", "/tmp/mpdit-slurm"))
PARTITION = os.environ.get("MPDIT_SLURM_PARTITION", "debug")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "squeue", "scancel",
                     "sacct", "sacctmgr", "munged", "mariadbd")


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to know about the local cluster."""

    state_dir: Path
    slurm_conf: Path
    script: Path  # scripts/slurm_cluster.sh
    partition: str
    node_name: str
    node_cpus: int
    started_here: bool  # True when this pytest session started it (and will stop it)


def pytest_collection_modifyitems(config, items):
    """Every test under tests/slurm needs the cluster: mark it, so ``-m 'not slurm'`` leaves it out."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slurm)


def _unavailable(reason: str):
    if os.environ.get("MPDIT_REQUIRE_SLURM") == "1":
        pytest.fail(f"MPDIT_REQUIRE_SLURM=1 but the SLURM test cluster is unavailable: {reason}")
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def _run_script(command: str, state: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command, str(state)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM cluster, started if it is not running; sets SLURM_CONF for the session."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        _unavailable(f"missing {', '.join(missing)}; install with `scripts/slurm_cluster.sh install` "
                     "(root, Debian/Ubuntu apt; CI runs it before the tests)")
    state = DEFAULT_STATE
    started_here = False
    if _run_script("status", state, timeout=30).returncode != 0:
        if os.geteuid() != 0:
            _unavailable(f"the cluster in {state} is not running and starting it needs root: "
                         f"run `sudo scripts/slurm_cluster.sh start {state}`")
        t0 = time.monotonic()
        proc = _run_script("start", state, timeout=180)
        if proc.returncode != 0:
            # Installed but broken: a real failure, never a skip.
            pytest.fail(f"`scripts/slurm_cluster.sh start {state}` failed (rc {proc.returncode}):\n"
                        f"{proc.stdout}\n{proc.stderr}")
        started_here = True
        print(f"\n[slurm_cluster] started in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    conf = state / "etc" / "slurm.conf"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(
            state_dir=state,
            slurm_conf=conf,
            script=SCRIPT,
            partition=PARTITION,
            node_name=(state / "node_name").read_text().strip(),
            node_cpus=int((state / "node_cpus").read_text()),
            started_here=started_here,
        )
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if started_here:
            _run_script("stop", state, timeout=120)


def queued_job_ids() -> set[str]:
    """Ids of the jobs in the queue (pending, running, completing), without array/step suffixes."""
    out = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, check=True)
    return {line.strip() for line in out.stdout.split() if line.strip()}


def _import_root(module) -> str:
    """The sys.path entry from which ``import <module.__name__>`` finds this test module."""
    return str(Path(module.__file__).resolve().parents[module.__name__.count(".")])


class SlurmJobs:
    """Per-test submitit access to the cluster: its own folder, and its jobs cancelled at the end."""

    def __init__(self, cluster: SlurmCluster, folder: Path):
        self.cluster = cluster
        self.folder = folder

    def executor(self, name: str = "job", **params):
        """An AutoExecutor on the local cluster writing into this test's folder.

        Defaults that keep tests small: 1 task, 1 CPU, 1 GB, 5 min; ``params`` override them
        (submitit names: tasks_per_node, cpus_per_task, timeout_min, slurm_signal_delay_s, ...).
        """
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder / name / "%j", cluster="slurm")
        defaults = dict(slurm_partition=self.cluster.partition, nodes=1, tasks_per_node=1,
                        cpus_per_task=1, mem_gb=1, timeout_min=5)
        executor.update_parameters(**{**defaults, **params})
        return executor

    queued_job_ids = staticmethod(queued_job_ids)

    @staticmethod
    def wait_for_file(path: Path, timeout: float, job=None) -> float:
        """Wait until ``path`` exists; returns when it appeared (time.time()). Fails with the job's
        logs when it does not appear in time."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                logs = ""
                if job is not None:
                    logs = f"\nstate {job.state}\nstdout:\n{job.stdout()}\nstderr:\n{job.stderr()}"
                pytest.fail(f"{path} did not appear within {timeout} s{logs}")
            time.sleep(0.1)
        return time.time()


@pytest.fixture
def slurm_jobs(slurm_cluster, tmp_path, request, monkeypatch):
    """A :class:`SlurmJobs` for this test; every job submitted during the test is cancelled after it.

    Jobs inherit the submitting environment (sbatch --export=ALL): PYTHONPATH gets the test
    module's import root so that callables defined in test modules unpickle inside the job.
    """
    root = _import_root(request.module)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    before = queued_job_ids()
    yield SlurmJobs(slurm_cluster, tmp_path / "submitit")
    leftover = sorted(queued_job_ids() - before)
    if leftover:
        subprocess.run(["scancel", "--full", *leftover], capture_output=True, text=True)
        # Wait until their CPUs are free again (KillWait is 5 s on the test cluster).
        deadline = time.monotonic() + 30
        while set(leftover) & queued_job_ids() and time.monotonic() < deadline:
            time.sleep(0.5)
