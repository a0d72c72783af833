"""mpdit_dist.tracking against a real MLflow tracking server (HTTP, proxied artifacts).

Starts ``mlflow server`` on a free localhost port (one worker, no job runner: it starts in
seconds on a small machine), logs a run, resumes it, and reads it back over HTTP.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from mpdit_dist.config import TrackingConfig
from mpdit_dist.tracking import Tracker, read_metrics
from mpdit_dist.distributed.env import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield uri
    finally:
        # the server's own process group only (it was started in a new session)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_run_on_a_tracking_server_and_its_resume(server_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model:\n  name: MPDiT-S\n")
    cfg = TrackingConfig(uri=server_uri, experiment="server-test")
    params = {"optim.lr": 1e-4, "long": "y" * 7000}
    with Tracker(cfg, run_dir, rank=0, results_dir=tmp_path / "unused", params=params,
                 tags={"model": "MPDiT-S"}, console=False) as tracker:
        for step in (0, 10):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_artifact(run_dir / "config.yaml", "config")
        run_id = tracker.run_id
    with Tracker(cfg, run_dir, rank=0, results_dir=tmp_path / "unused", params=params,
                 console=False) as tracker:
        assert tracker.run_id == run_id
        tracker.log_metrics({"loss": 0.01}, step=20)

    client = MlflowClient(server_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0001" and len(run.data.params["long"]) <= 6000
    assert run.data.tags["model"] == "MPDiT-S"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 10, 20]
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/config.yaml"]
    assert not (tmp_path / "unused").exists()  # nothing local besides the run dir
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 10, 20]
