"""The launcher's parts that need no SLURM: sbatch parameters, requeue decisions, the per-task
environment from submitit's JobEnvironment, the file barrier, the code version, and whole runs on
submitit's debug (in-process) and local (subprocess) executors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
from submitit.slurm import slurm as submitit_slurm

from mpdit_dist import config as C
from mpdit_dist import launch
from tests.helpers.runs import REPO, TINY, digits_npz

DEMO = REPO / "configs" / "demo.yaml"


def cfg_with(*overrides: str) -> C.Config:
    return C.load_config(None, list(overrides))


def render_sbatch(params: dict, folder: Path) -> str:
    """The sbatch script submitit's SLURM executor writes for these AutoExecutor parameters
    (generic names translated the way submitit does; no SLURM needed)."""
    eq = submitit_slurm.SlurmExecutor._equivalence_dict()
    args = {eq[k]: v for k, v in params.items() if k in eq}
    if "mem" in args:
        args["mem"] = submitit_slurm._convert_mem(args["mem"])
    args.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    return submitit_slurm._make_sbatch_string(command="python -m submitit.core._submit X", folder=folder, **args)


# ----- sbatch parameters -----

def test_gpu_job_parameters_and_sbatch_script(tmp_path):
    cfg = cfg_with("launch.nodes=4", "launch.gpus_per_node=8", "launch.cpus_per_task=12", "launch.mem_gb=40",
                   "launch.partition=gpu", "launch.account=proj", "launch.qos=high", "launch.constraint=h100",
                   "launch.time_min=1440", "launch.signal_delay_s=180", "launch.extra_sbatch.exclusive=true",
                   "launch.extra_sbatch.mail-type=END", "launch.setup=[module load cuda]", "run_name=xl")
    params = launch.executor_parameters(cfg, tmp_path / "run")
    assert {k: params[k] for k in ("name", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb",
                                   "timeout_min", "slurm_partition", "slurm_account", "slurm_qos",
                                   "slurm_constraint", "slurm_signal_delay_s")} == dict(
        name="xl", nodes=4, tasks_per_node=8, gpus_per_node=8, cpus_per_task=12, mem_gb=320, timeout_min=1440,
        slurm_partition="gpu", slurm_account="proj", slurm_qos="high", slurm_constraint="h100",
        slurm_signal_delay_s=180)
    assert launch.world_size(cfg.launch) == 32
    text = render_sbatch(params, tmp_path / "%j")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=320GB", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@180", "#SBATCH --exclusive", "#SBATCH --mail-type=END",
                 "#SBATCH --job-name=xl", f"export PYTHONPATH={REPO}", "export OMP_NUM_THREADS=12",
                 "module load cuda", "srun --unbuffered"):
        assert line in text, f"{line!r} not in\n{text}"
    # the user's setup runs after ours, before srun
    assert text.index("OMP_NUM_THREADS") < text.index("module load cuda") < text.index("srun")


def test_cpu_job_parameters():
    params = launch.executor_parameters(cfg_with("launch.gpus_per_node=0", "launch.tasks_per_node=2",
                                                 "launch.cpus_per_task=1"), Path("/tmp/r"))
    assert params["tasks_per_node"] == 2 and params["cpus_per_task"] == 1
    assert "gpus_per_node" not in params and "mem_gb" not in params and "slurm_partition" not in params
    assert params["name"] == "r"  # no run_name: the run dir's name


@pytest.mark.parametrize("overrides, words", [
    (["launch.gpus_per_node=0"], "set launch.tasks_per_node"),
    (["launch.gpus_per_node=8", "launch.tasks_per_node=4"], "one task per GPU"),
    (["launch.cluster=debug", "launch.gpus_per_node=0", "launch.tasks_per_node=2"], "launch.cluster=debug"),
    (["launch.cluster=local", "launch.nodes=2"], "launch.nodes=2 must be 1"),
    (["launch.time_min=2", "launch.signal_delay_s=120"], "launch.signal_delay_s=120"),
    (["launch.max_requeues=-1"], "launch.max_requeues=-1"),
    (["launch.mem_gb=0"], "launch.mem_gb=0"),
])
def test_bad_launch_settings_name_the_key(overrides, words):
    with pytest.raises(C.ConfigError, match=words.replace(".", r"\.")):
        launch.executor_parameters(cfg_with(*overrides), Path("/tmp/r"))


# ----- requeue decisions -----

@pytest.mark.parametrize("status, restarts, limit, signals, action", [
    ("finished", 0, 3, ("SIGUSR2",), "done"),  # a finished run never requeues, signal or not
    ("finished", 9, 3, (), "done"),
    ("preempted", 0, 3, ("SIGUSR2",), "requeue"),
    ("preempted", 2, 3, ("SIGUSR2", "SIGTERM"), "requeue"),
    ("preempted", 3, 3, ("SIGUSR2",), "limit"),
    ("preempted", 0, 0, ("SIGUSR2",), "limit"),
    ("preempted", 0, 3, ("SIGTERM",), "stop"),  # scancel / SLURM's own preemption: SLURM decides
    ("preempted", 0, 3, (), "stop"),
])
def test_requeue_action(status, restarts, limit, signals, action):
    assert launch.requeue_action(status, restarts, limit, signals) == action


def test_requeue_action_follows_the_warning_signal():
    """With SUBMITIT_PREEMPT_SIGNAL=USR1 the warning signal is USR1: it requeues, USR2 does not."""
    assert launch.requeue_action("preempted", 0, 3, ("SIGUSR1",), warning="SIGUSR1") == "requeue"
    assert launch.requeue_action("preempted", 0, 3, ("SIGUSR2",), warning="SIGUSR1") == "stop"


def test_requeue_action_rejects_unknown_status():
    with pytest.raises(ValueError, match="crashed"):
        launch.requeue_action("crashed", 0, 3)


def test_requeue_limit_message_says_what_to_do():
    msg = launch.requeue_limit_message("42", 1200, 3, 3, Path("/r/run"))
    for words in ("job 42", "step 1200", "3 requeue(s)", "launch.max_requeues=3", "/r/run/checkpoints",
                  "slurm/submit.py --config /r/run/config.yaml --run-dir /r/run"):
        assert words in msg


def test_restart_count_from_slurm_or_local_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert launch.restart_count("slurm", tmp_path, "7") == 2
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert launch.restart_count("slurm", tmp_path, "7") == 0
    assert launch.restart_count("local", tmp_path, "7") == 0
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "requeues_7").write_text("11\n23\n")
    assert launch.restart_count("local", tmp_path, "7") == 2


def _checkpoint_dir(run_dir: Path, step: int, complete: bool = True) -> Path:
    from mpdit_dist.checkpoint import COMPLETE, step_dir_name

    d = run_dir / "checkpoints" / step_dir_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text("{}")
    return d


@pytest.mark.parametrize("submitted", ["never", "/other/run/checkpoints/step_00001000", "auto"])
def test_resume_for_start_first_start_uses_what_was_submitted(tmp_path, submitted):
    _checkpoint_dir(tmp_path, 5)
    assert launch.resume_for_start(submitted, 0, tmp_path) == submitted


@pytest.mark.parametrize("submitted", ["never", "/other/run/checkpoints/step_00001000", "auto"])
def test_resume_for_start_requeue_resumes_from_its_run_dir(tmp_path, submitted):
    _checkpoint_dir(tmp_path, 5)
    assert launch.resume_for_start(submitted, 1, tmp_path) == "auto"
    assert launch.resume_for_start(submitted, 4, tmp_path) == "auto"


def test_resume_for_start_requeue_before_any_save_starts_like_the_first(tmp_path):
    """A requeue during start-up (submitit's handler, nothing saved yet) keeps a submitted path;
    a half-written checkpoint does not count as saved."""
    path = "/other/run/checkpoints/step_00001000"
    assert launch.resume_for_start(path, 1, tmp_path) == path
    _checkpoint_dir(tmp_path, 5, complete=False)
    assert launch.resume_for_start(path, 1, tmp_path) == path
    assert launch.resume_for_start("never", 1, tmp_path) == "auto"  # the same in an empty run dir
    # an async save that finished writing before the process died is the run's own checkpoint
    tmp = tmp_path / "checkpoints" / "tmp-step_00000008"
    (tmp / "rng").mkdir(parents=True)
    (tmp / ".metadata").write_bytes(b"x")
    (tmp / "trainer.json").write_text('{"world_size": 1}')
    (tmp / "rng" / "rank0.pt").write_bytes(b"x")
    assert launch.resume_for_start(path, 1, tmp_path) == "auto"


def test_resume_for_start_requeue_keeps_a_rollback_until_it_was_taken(tmp_path):
    """--resume of an older checkpoint of the same run dir: requeued before the first start loaded
    it (the later checkpoints still there), the path again; after (they were moved aside), auto."""
    older = _checkpoint_dir(tmp_path, 100)
    later = [_checkpoint_dir(tmp_path, 200), _checkpoint_dir(tmp_path, 300)]
    assert launch.resume_for_start(str(older), 1, tmp_path) == str(older)
    aside = tmp_path / "checkpoints" / "superseded-1"
    aside.mkdir()
    for d in later:
        d.rename(aside / d.name)
    assert launch.resume_for_start(str(older), 1, tmp_path) == "auto"


def _slurm_task_env(monkeypatch, restarts: int) -> None:
    """The environment of task 0 of a one-task SLURM job (as srun gives it to submitit's task)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NODELIST="node1", SLURM_CPUS_PER_TASK="1",
                     SLURM_RESTART_COUNT=str(restarts)).items():
        monkeypatch.setenv(k, v)


def test_requeued_task_resumes_from_its_run_dir_whatever_was_submitted(tmp_path, monkeypatch):
    """A job submitted with ``--resume never`` is requeued (SLURM_RESTART_COUNT=1) after saving step
    3: the requeued start, the same task as submitit's start-up requeue (``checkpoint()``) hands
    back, continues from step 3 instead of training from step 0 again."""
    import torch

    from mpdit_dist.tracking import METRICS_FILE

    npz = digits_npz(tmp_path / "d.npz", n=96)
    run = tmp_path / "run"
    base = [f"data.path={npz}", *TINY, f"results_dir={tmp_path}", "launch.gpus_per_node=0",
            "launch.tasks_per_node=1", "launch.cpus_per_task=1"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        _slurm_task_env(monkeypatch, restarts=0)
        first = launch.TrainingTask(C.to_dict(C.load_config(DEMO, [*base, "train.steps=3"])), str(run), "never")
        assert first()["step"] == 3
        _slurm_task_env(monkeypatch, restarts=1)
        task = launch.TrainingTask(C.to_dict(C.load_config(DEMO, [*base, "train.steps=5"])), str(run), "never")
        result = task.checkpoint().function()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
    assert (result["status"], result["step"], result["restart"]) == ("finished", 5, 1)
    steps = [json.loads(line)["step"] for line in (run / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # not 1, 2, 3, 1, 2, 3, 4, 5: the requeue did not start again


_SIGNAL_PROBE = """
import json, os, signal, sys, threading, time
from pathlib import Path
from mpdit_dist import config as C, launch
from tests.helpers.runs import TINY
from tests.unit.test_launch import render_sbatch

npz, run = sys.argv[1], Path(sys.argv[2])
sbatch = [ln for ln in render_sbatch(launch.executor_parameters(C.load_config(None, []), run), run).splitlines()
          if "--signal" in ln]
cfg = C.load_config("configs/demo.yaml", [f"data.path={npz}", *TINY, "train.steps=500", f"results_dir={run.parent}",
                                          "launch.cluster=debug", "launch.gpus_per_node=0", "launch.tasks_per_node=1",
                                          "launch.cpus_per_task=1"])

def warn_when_training():
    while not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends with --signal=USR1@N

threading.Thread(target=warn_when_training, daemon=True).start()
[result] = launch.wait(launch.submit(cfg, run, echo=None))
print(json.dumps({"sbatch": sbatch, "status": result["status"], "step": result["step"]}))
"""


def test_warning_signal_is_submitits_in_sbatch_and_in_the_handlers(tmp_path):
    """SUBMITIT_PREEMPT_SIGNAL=USR1 changes submitit's ``#SBATCH --signal`` line; the tasks then
    handle USR1, so the warning stops training at a step boundary (it used to kill the process:
    USR1's default action, as the tasks handled USR2 only)."""
    npz = digits_npz(tmp_path / "d.npz", n=96)
    env = dict(os.environ, SUBMITIT_PREEMPT_SIGNAL="USR1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_PROBE, str(npz), str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sbatch"] == ["#SBATCH --signal=USR1@120"]
    assert out["status"] == "preempted" and out["step"] < 500


@pytest.mark.parametrize("value, words", [("TERM", "cannot be the warning signal"), ("NOPE", "names no signal")])
def test_unusable_preempt_signal_is_refused_naming_the_variable(tmp_path, value, words):
    code = ("from mpdit_dist import launch\n"
            "try:\n    launch.warning_signal()\nexcept launch.C.ConfigError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SUBMITIT_PREEMPT_SIGNAL=value))
    assert f"SUBMITIT_PREEMPT_SIGNAL='{value}'" in proc.stdout and words in proc.stdout, proc.stdout + proc.stderr


def test_early_signal_requeues_the_same_submission():
    """submitit's handler (active until the task installs ours) calls checkpoint() on rank 0."""
    task = launch.TrainingTask({"x": 1}, "/tmp/run")
    delayed = task.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is task and delayed.args == () and delayed.kwargs == {}


# ----- inside the job -----

def test_master_port_is_per_job():
    assert launch.master_port("123") == launch.master_port("123") == 20123
    assert launch.master_port("41") != launch.master_port("42")
    assert 20000 <= launch.master_port("4567890_3") < 40000  # array ids too


def test_distributed_environ_from_slurm_job_environment(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in dict(SLURM_JOB_ID="77", SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2", SLURM_PROCID="9",
                     SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[03-04]").items():
        monkeypatch.setenv(k, v)
    env = submitit.JobEnvironment()
    assert env.cluster == "slurm"
    assert launch.distributed_environ(env, "slurm") == dict(
        RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_WORLD_SIZE="8", MASTER_ADDR="gpu03",
        MASTER_PORT=str(launch.master_port("77")))


def test_distributed_environ_from_local_job_environment(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for k, v in dict(SUBMITIT_LOCAL_JOB_ID="4242", SUBMITIT_LOCAL_NTASKS="2", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                     SUBMITIT_LOCAL_GLOBALID="1", SUBMITIT_LOCAL_LOCALID="1").items():
        monkeypatch.setenv(k, v)
    env = submitit.JobEnvironment()
    assert env.cluster == "local"
    assert launch.distributed_environ(env, "local") == dict(
        RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(launch.master_port("4242")))


def test_file_barrier_waits_for_every_rank(tmp_path):
    folder = tmp_path / "b"
    arrived = {}

    def late_rank():
        time.sleep(0.5)
        launch.file_barrier(folder, 1, 2, timeout_s=5, wait=False)
        arrived["t"] = time.monotonic()

    t = threading.Thread(target=late_rank)
    t.start()
    launch.file_barrier(folder, 0, 2, timeout_s=10)
    released = time.monotonic()
    t.join()
    assert released >= arrived["t"]


def test_file_barrier_times_out_naming_missing_ranks(tmp_path):
    with pytest.raises(TimeoutError, match=r"ranks \[1, 2\]"):
        launch.file_barrier(tmp_path / "b", 0, 3, timeout_s=0.3)


def test_code_version_records_commit_and_diff(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "first")
    clean = launch.write_code_version(tmp_path / "clean", repo)
    assert clean["commit"] == git("rev-parse", "HEAD").strip() and clean["dirty"] is False
    assert (tmp_path / "clean" / "code.diff").read_text() == ""

    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 1\n")
    dirty = launch.write_code_version(tmp_path / "dirty", repo)
    diff = (tmp_path / "dirty" / "code.diff").read_text()
    assert dirty["dirty"] is True and "-x = 1" in diff and "+x = 2" in diff
    assert dirty["untracked"] == ["new.py"]
    assert json.loads((tmp_path / "dirty" / "code_version.json").read_text())["commit"] == clean["commit"]


# ----- whole runs without SLURM -----

def test_debug_executor_trains_in_process_and_restores_state(tmp_path):
    npz = digits_npz(tmp_path / "d.npz", n=96)
    cfg = C.load_config(DEMO, [f"data.path={npz}", *TINY, "train.steps=3", f"results_dir={tmp_path}",
                               "launch.cluster=debug", "launch.gpus_per_node=0", "launch.tasks_per_node=1",
                               "launch.cpus_per_task=1"])
    handler = signal.getsignal(signal.SIGUSR2)
    lines: list[str] = []
    job = launch.submit(cfg, tmp_path / "run", echo=lines.append)
    assert lines[0].startswith("submitted job") and "debug" in lines[0]
    [result] = launch.wait(job)
    assert (result["status"], result["step"], result["rank"], result["restart"]) == ("finished", 3, 0, 0)
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "launch" / "jobs.jsonl").exists()
    assert (run / "checkpoints" / "step_00000003").is_dir()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # the submitter's env is its own again
    assert signal.getsignal(signal.SIGUSR2) is handler
    # a second run into the same run dir is refused before anything of the first one is overwritten
    before = (run / "config.yaml").read_text()
    other = C.load_config(DEMO, [f"data.path={npz}", *TINY, "train.steps=5", "optim.lr=0.5",
                                 f"results_dir={tmp_path}", "launch.cluster=debug", "launch.gpus_per_node=0",
                                 "launch.tasks_per_node=1", "launch.cpus_per_task=1"])
    with pytest.raises(Exception, match="--resume never would start a second run"):
        launch.submit(other, run, resume="never", echo=None)
    assert (run / "config.yaml").read_text() == before


def test_submit_cli_debug_trains_without_wait(tmp_path):
    """``slurm/submit.py`` with ``launch.cluster=debug`` trains in its own process and reports the
    end, ``--wait`` or not (submitit's debug job runs only when waited for)."""
    npz = digits_npz(tmp_path / "d.npz", n=96)
    proc = subprocess.run(
        [sys.executable, str(REPO / "slurm" / "submit.py"), "--config", str(DEMO), "--run-dir", str(tmp_path / "run"),
         f"data.path={npz}", *TINY, "train.steps=2", f"results_dir={tmp_path}", "launch.cluster=debug",
         "launch.gpus_per_node=0", "launch.tasks_per_node=1", "launch.cpus_per_task=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 2" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_local_executor_failure_is_reported_with_log_tail(tmp_path):
    """A job whose training raises (here: its data file is missing) is reported failed, with the
    error in the log tail, without waiting on result files."""
    cfg = C.load_config(DEMO, [f"data.path={tmp_path / 'missing.npz'}", *TINY, "train.steps=2",
                               f"results_dir={tmp_path}", "launch.cluster=local", "launch.gpus_per_node=0",
                               "launch.tasks_per_node=1", "launch.cpus_per_task=1", "launch.time_min=5"])
    job = launch.submit(cfg, tmp_path / "run", echo=None)
    with pytest.raises(launch.JobFailedError) as info:
        launch.wait(job, timeout_s=120, poll_s=0.5)
    assert "missing.npz" in info.value.log_tail
    assert "----- rank 0 stderr" in info.value.log_tail
    assert (tmp_path / "run" / "logs" / "rank0.err").resolve().exists()


def test_local_jobs_get_the_configured_warning_delay(tmp_path):
    """launch.cluster=local: the warning signal comes launch.signal_delay_s before the time limit,
    as on SLURM (AutoExecutor passes the delay to SLURM only; submitit's local default is 30 s)."""
    cfg = cfg_with("launch.cluster=local", "launch.gpus_per_node=0", "launch.tasks_per_node=1",
                   "launch.time_min=10", "launch.signal_delay_s=150", f"results_dir={tmp_path}")
    # a lambda travels by value (cloudpickle): the job's process need not import this test module
    job = launch.make_executor(cfg, tmp_path / "run").submit(
        lambda: __import__("os").environ["SUBMITIT_LOCAL_SIGNAL_DELAY_S"])
    assert job.result() == "150"


@pytest.mark.parametrize("rank", [0, 1])
def test_every_task_of_a_stopped_job_takes_the_action_the_ranks_agreed_on(tmp_path, monkeypatch, rank):
    """The warning signal reached one task only (or reached the others after the stop), while all
    ranks stopped together at the trainer's vote: every task still takes the requeue path, which the
    trainer's agreed ``stop_reasons`` say, not the "stop" (exit 143) of its own empty record. Before,
    a rank 0 that had seen nothing left with 143 (no requeue), and a rank 0 that alone had seen the
    signal waited at the requeue barrier for ranks that had left with 143, until its timeout."""
    import mpdit_dist.trainer as trainer

    run = tmp_path / "run"
    cfg = C.load_config(DEMO, [f"results_dir={tmp_path}", "launch.gpus_per_node=0", "launch.tasks_per_node=2",
                               "launch.cpus_per_task=1", "launch.cluster=slurm"])
    _slurm_task_env(monkeypatch, restarts=0)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", str(rank))
    monkeypatch.setenv("SLURM_LOCALID", str(rank))
    monkeypatch.setattr(trainer, "train", lambda cfg, run_dir, resume: {
        "status": "preempted", "step": 7, "run_dir": str(run_dir), "stop_reasons": ["SIGUSR2"]})
    calls = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    barrier = run / launch.LAUNCH_DIR / "barriers" / "preempt-4242-0"
    if rank == 0:  # the other rank has checked in already
        barrier.mkdir(parents=True)
        (barrier / "rank1").touch()
    import torch

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            launch.TrainingTask(C.to_dict(cfg), str(run), "auto", barrier_timeout_s=5)()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
    assert exit_.value.code == 0  # not 128 + SIGTERM: the job is requeued, not stopped
    assert (barrier / f"rank{rank}").exists()
    assert calls == ([["scontrol", "requeue", "4242"]] if rank == 0 else [])
