"""The launcher (slurm/submit.py, mpdit_dist.launch) against the real one-node SLURM cluster.

Each test trains the tiny demo model on scikit-learn digits with 2 CPU tasks (gloo) and checks
what happened: a run submitted with ``slurm/submit.py`` trains and lands in MLflow; the warning
signal mid-run checkpoints, requeues and resumes to exactly the losses of an uninterrupted
torchrun run; a job cancelled from outside is reported failed at once with its log tail, and so is
a job whose rank 0 alone failed; a preemption beyond ``launch.max_requeues`` fails the job with a
clear message.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mpdit_dist import config as C
from mpdit_dist import launch
from tests.helpers.runs import PY, REPO, TINY, TORCHRUN, digits_npz, env

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

DEMO = REPO / "configs" / "demo.yaml"


def overrides(tmp: Path, npz: Path, steps: int, tracking: bool = False) -> list[str]:
    """The tiny demo on 2 CPU tasks of the test cluster."""
    return [f"data.path={npz}", *TINY, f"train.steps={steps}", "train.ckpt_every=0", "parallel.backend=ddp",
            f"results_dir={tmp / 'results'}", f"tracking.enabled={str(tracking).lower()}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "launch.cluster=slurm", "launch.partition=debug",
            "launch.gpus_per_node=0", "launch.tasks_per_node=2", "launch.cpus_per_task=1", "launch.mem_gb=1",
            "launch.time_min=10", "launch.signal_delay_s=60"]


def wait_for_steps(run: Path, n: int, job, timeout: float) -> int:
    """Block until metrics.jsonl holds ``n`` records (the run is training); returns how many it holds."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        lines = metrics.read_text().count("\n") if metrics.exists() else 0
        if lines >= n:
            return lines
        if time.monotonic() > deadline:
            pytest.fail(f"{metrics} has {lines} records after {timeout} s; state {launch.job_state(job)}\n"
                        f"{launch.log_tail(job, 20)}")
        time.sleep(0.1)


def sacct_states(job_id: str, final: str | None = None, timeout: float = 15) -> list[str]:
    """States of every run of the job (-D keeps the runs before requeues); waits for ``final`` last."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["sacct", "-D", "-n", "-X", "-j", job_id, "-o", "State", "--parsable2"],
                             capture_output=True, text=True, check=True).stdout
        states = [s.strip() for s in out.splitlines() if s.strip()]
        if final is None or (states and states[-1].startswith(final)) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def raw_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def raw_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


# ----- tests -----

def test_submit_cli_trains_two_tasks_into_mlflow(slurm_jobs, tmp_path):
    npz = digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "run"
    steps = 6
    proc = subprocess.run([PY, str(REPO / "slurm" / "submit.py"), "--config", str(DEMO), "--run-dir", str(run),
                           "--wait", "--timeout", "180", *overrides(tmp_path, npz, steps, tracking=True)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    job_id = out.split("submitted job ", 1)[1].split()[0]
    assert f"logs:     {run}/logs/rank{{0..1}}" in out
    assert f"the run id appears in {run}/mlflow_run_id" in out
    assert f"job {job_id} finished at step {steps}" in out

    # What the run dir records about the launch.
    cfg = OmegaConf.load(run / "config.yaml")  # plain YAML: teammates may extend the schema meanwhile
    assert (cfg.launch.tasks_per_node, cfg.parallel.backend, cfg.train.steps) == (2, "ddp", steps)
    script = (run / "launch" / f"{job_id}_submission.sh").read_text()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=2GB",
                 "#SBATCH --partition=debug", "#SBATCH --signal=USR2@60", "#SBATCH --time=10", "srun ",
                 " --kill-on-bad-exit=1 "):
        assert line in script, script
    code = json.loads((run / "launch" / "code_version.json").read_text())
    # a commit of this repository's history (teammates may have committed since the submission)
    assert subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", code["commit"], "HEAD"]).returncode == 0
    diff = (run / "launch" / "code.diff").read_text()
    assert code["dirty"] == bool(diff.strip())
    record = json.loads((run / "launch" / "jobs.jsonl").read_text().splitlines()[-1])
    assert record["job_id"] == job_id and record["tasks_per_node"] == 2
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.err").read_text()  # symlink into the submitit folder
        assert f"job {job_id} task {rank}/2 (restart 0, resume auto)" in log and "1 threads" in log, log

    # Every step trained once, by both ranks together, and mirrored to MLflow.
    assert raw_steps(run) == list(range(1, steps + 1))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["world_size"] == "2" and mlrun.data.tags["backend"] == "ddp"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(raw_losses(run), rel=1e-6)
    assert sacct_states(job_id, "COMPLETED") == ["COMPLETED"]


def test_warning_signal_checkpoints_requeues_and_resumes_exactly(slurm_jobs, tmp_path):
    npz = digits_npz(tmp_path / "digits.npz")
    run, ref = tmp_path / "run", tmp_path / "ref"
    steps = 120
    over = overrides(tmp_path, npz, steps)
    job = launch.submit(C.load_config(DEMO, over), run, echo=None)
    wait_for_steps(run, 8, job, timeout=90)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    signalled = time.monotonic()

    # The uninterrupted reference (torchrun, 2 processes, same config) runs while SLURM holds the
    # requeued job back (~15 s).
    reference = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "train.py"), "--config", str(DEMO),
         "--run-dir", str(ref), *[o for o in over if not o.startswith("launch.")]],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        results = launch.wait(job, timeout_s=180, poll_s=1)
    finally:
        ref_out, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_out[-3000:]
    print(f"\nsignal -> job finished after requeue in {time.monotonic() - signalled:.1f} s")

    assert [(r["rank"], r["status"], r["step"], r["restart"]) for r in results] == \
        [(0, "finished", steps, 1), (1, "finished", steps, 1)]
    assert sacct_states(job.job_id, "COMPLETED") == ["REQUEUED", "COMPLETED"]
    log0 = (run / "logs" / "rank0.err").read_text()
    log1 = (run / "logs" / "rank1.err").read_text()
    stopped = int(log0.split("rank 0 stopped at step ", 1)[1].split()[0])
    assert 8 <= stopped < steps, log0
    assert f"rank 1 stopped at step {stopped} (signals ['SIGUSR2']): requeue" in log1
    assert f"requeued job {job.job_id} (requeue 1 of at most 10)" in log0
    assert f"resumed from {run}/checkpoints/step_{stopped:08d} at step {stopped}" in log0
    assert sorted(p.name for p in (run / "launch" / "barriers" / f"preempt-{job.job_id}-0").iterdir()) == \
        ["rank0", "rank1"]

    # Every step exactly once in the raw file (the preemption falls between log and next step),
    # with the losses of the uninterrupted run.
    assert raw_steps(run) == list(range(1, steps + 1))
    got, want = raw_losses(run), raw_losses(ref)
    assert sorted(want) == list(range(1, steps + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    assert worst <= 1e-6, f"largest relative loss difference {worst:.3g}"


def test_job_cancelled_from_outside_is_reported_failed_with_log_tail(slurm_jobs, tmp_path):
    npz = digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "run"
    job = launch.submit(C.load_config(DEMO, overrides(tmp_path, npz, 100_000)), run, echo=None)
    wait_for_steps(run, 2, job, timeout=90)
    subprocess.run(["scancel", job.job_id], check=True)
    cancelled = time.monotonic()
    with pytest.raises(launch.JobFailedError) as info:
        launch.wait(job, timeout_s=90, poll_s=1)
    waited = time.monotonic() - cancelled
    print(f"\ncancelled job reported failed after {waited:.1f} s")
    err = info.value
    assert err.job_id == job.job_id and err.state.startswith("CANCELLED"), err
    assert "left no result" in str(err)
    assert f"job {job.job_id} task 0/2" in err.log_tail and f"job {job.job_id} task 1/2" in err.log_tail
    assert "----- rank 1 stderr" in err.log_tail
    # sacct knows within seconds; no wait for result files that never come (submitit's 15 s).
    assert waited < 14
    assert not list((run / "submitit" / job.job_id).glob("*_result.pkl"))


def test_an_error_on_one_rank_fails_the_job_at_once_with_that_error(slurm_jobs, tmp_path):
    """Rank 0 alone fails (it cannot write its first sample grid: ``samples`` is a file) while rank 1
    goes on into the next step: the job fails within seconds, not at the process group's timeout,
    and its log tail holds rank 0's error."""
    npz = digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").write_text("not a directory")
    cfg = C.load_config(DEMO, [*overrides(tmp_path, npz, 100_000), "train.sample_every=2", "train.sample_steps=2",
                               "train.sample_classes=[0,1]"])
    job = launch.submit(cfg, run, echo=None)
    with pytest.raises(launch.JobFailedError) as info:
        launch.wait(job, timeout_s=120, poll_s=1)
    tail = info.value.log_tail
    assert "NotADirectoryError" in tail or "FileExistsError" in tail, tail
    assert sacct_states(job.job_id, "FAILED") == ["FAILED"]


def test_preemption_beyond_max_requeues_fails_with_clear_message(slurm_jobs, tmp_path):
    npz = digits_npz(tmp_path / "digits.npz")
    run = tmp_path / "run"
    cfg = C.load_config(DEMO, [*overrides(tmp_path, npz, 100_000), "launch.max_requeues=0"])
    job = launch.submit(cfg, run, echo=None)
    wait_for_steps(run, 3, job, timeout=90)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    with pytest.raises(launch.JobFailedError) as info:
        launch.wait(job, timeout_s=90, poll_s=1)
    msg = str(info.value)
    assert "RequeueLimitError" in msg and "launch.max_requeues=0: not requeueing again" in msg, msg
    step = int(msg.split("preempted at step ", 1)[1].split()[0])
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()  # the checkpoint is kept for a resubmission
    assert sacct_states(job.job_id, "FAILED") == ["FAILED"]
