"""mpdit_dist.launch and the tracking store: a tracking server that does not answer never holds a
job's end or its requeue; ``launch.tags`` still reach a working store."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mpdit_dist import config as C
from mpdit_dist import launch
from tests.helpers.runs import REPO, digits_npz, env


def test_launch_tags_reach_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from mpdit_dist.tracking import Tracker

    cfg = C.load_config(None, [f"results_dir={tmp_path}"])
    run = tmp_path / "run"
    tracker = Tracker(cfg.tracking, run, rank=0, results_dir=tmp_path, console=False)
    tracker.close()
    assert launch.set_mlflow_tags(cfg, run, {"study": "s", "study_gpus": "2"})
    tags = MlflowClient(launch._resolve_tracking_uri(cfg)).get_run(tracker.run_id).data.tags
    assert (tags["study"], tags["study_gpus"]) == ("s", "2")


def test_silent_tracking_server_does_not_hold_the_end_of_a_job(tmp_path):
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        cfg = C.load_config(None, [f"tracking.uri=http://127.0.0.1:{server.getsockname()[1]}"])
        (tmp_path / "mlflow_run_id").write_text("0123456789abcdef\n")
        start = time.monotonic()
        ok = launch.set_mlflow_tags(cfg, tmp_path, {"study": "s"})
        elapsed = time.monotonic() - start
    assert not ok and elapsed < 20  # MLflow's defaults: minutes


_PREEMPTED_TASK = """
import json, os, signal, sys, threading, time
from pathlib import Path
from mpdit_dist import config as C, launch
from tests.helpers.runs import TINY

npz, run, uri = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = C.load_config("configs/demo.yaml", [f"data.path={npz}", *TINY, "train.steps=500", f"results_dir={run.parent}",
                                          "tracking.enabled=true", f"tracking.uri={uri}", "launch.tags.study=s",
                                          "launch.gpus_per_node=0", "launch.tasks_per_node=1",
                                          "launch.cpus_per_task=1"])

def warn_when_training():
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's warning signal

threading.Thread(target=warn_when_training, daemon=True).start()
try:
    launch.TrainingTask(C.to_dict(cfg), str(run))()
except SystemExit as exc:
    print("exit", exc.code)
"""


def test_requeue_does_not_wait_for_a_silent_tracking_server(tmp_path):
    """SLURM's warning signal: the task saves and requeues at once, although the tracking server
    that held the run's MLflow run stopped answering. Tags wait for the job's end;
    setting them first would hold the requeue for MLflow's retries (minutes), past the time limit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records the requeue instead of asking a controller
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    npz = digits_npz(tmp_path / "d.npz", n=96)
    # the run's MLflow run, made while the server still answered (it hung since)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mlflow_run_id").write_text("0123456789abcdef\n")
    task_env = env(dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
                        SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NODELIST="node1",
                        SLURM_CPUS_PER_TASK="1", SLURM_RESTART_COUNT="0",
                        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _PREEMPTED_TASK, str(npz), str(tmp_path / "run"), uri],
                              cwd=REPO, env=task_env, capture_output=True, text=True, timeout=150)
        elapsed = time.monotonic() - start
    assert "exit 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert elapsed < 60, f"requeued after {elapsed:.0f} s"
    assert list((Path(tmp_path) / "run" / "checkpoints").glob("step_*"))


def test_submit_cli_refusal_of_a_second_run_is_an_error_line(tmp_path):
    """``--resume never`` into a run dir that holds checkpoints: exit 2 with the trainer's reason, no
    traceback, nothing of the run dir overwritten."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "--config", str(REPO / "configs/demo.yaml"),
                           "--run-dir", str(run), "--resume", "never", "launch.cluster=debug",
                           "launch.gpus_per_node=0", "launch.tasks_per_node=1"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: run directory") and "already holds 1 checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "config.yaml").exists()
