"""mpdit_dist.tracking against a real MLflow SQLite store (one store shared by the module:
creating its tables takes several seconds)."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mpdit_dist.config import Config, TrackingConfig, flatten, to_dict
from mpdit_dist.tracking import RUN_ID_FILE, Tracker, read_metrics

REPO = Path(__file__).resolve().parents[2]


def _params() -> dict:
    return flatten(to_dict(Config()))


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_run_holds_params_metrics_artifacts_and_tags(results_dir, client, tmp_path, capsys):
    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model:\n  name: MPDiT-S\n")
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "step_000020.png").write_bytes(b"\x89PNG fake grid")
    params = _params()
    params["custom.long_value"] = "x" * 10_000  # over MLflow's param limit
    params["custom.odd:key%"] = 3  # characters MLflow does not accept in a key
    tags = {"model": "MPDiT-S", "world_size": 1, "backend": "none"}

    with Tracker(TrackingConfig(experiment="unit"), run_dir, rank=0, results_dir=results_dir,
                 params=params, tags=tags) as tracker:
        run_id = tracker.run_id
        assert run_id and (run_dir / RUN_ID_FILE).read_text().strip() == run_id
        tracker.log_metrics({"loss": torch.tensor(0.5), "lr": np.float32(1e-4), "grad_norm": 2.0},
                            step=0)
        tracker.log_metrics({"loss": 0.25, "lr": 2e-4, "grad_norm": float("nan")}, step=10)
        tracker.log_metrics({"loss": 0.125, "lr": 3e-4, "grad_norm": 1.0}, step=20)
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "samples" / "step_000020.png", "samples")
    assert run_id in capsys.readouterr().out  # the run id and store are printed at start

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "demo-run"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    # every param, under MLflow-safe keys; the long value truncated with a marker
    assert len(run.data.params) == len(params)
    assert run.data.params["optim.lr"] == str(params["optim.lr"])
    assert run.data.params["model.name"] == params["model.name"]
    long_value = run.data.params["custom.long_value"]
    assert len(long_value) <= 6000 and long_value.endswith("...[10000 chars]")
    assert run.data.params["custom.odd_key_"] == "3"
    assert {"model": "MPDiT-S", "world_size": "1", "backend": "none"}.items() <= run.data.tags.items()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if commit:
        assert run.data.tags["mlflow.source.git.commit"] == commit
    # metrics at their explicit steps
    assert _history(client, run_id, "loss") == [(0, 0.5), (10, 0.25), (20, 0.125)]
    assert [s for s, _ in _history(client, run_id, "lr")] == [0, 10, 20]
    grad = _history(client, run_id, "grad_norm")
    assert grad[0] == (0, 2.0) and np.isnan(grad[1][1]) and grad[2] == (20, 1.0)
    # artifacts, stored next to the database rather than in the current directory
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "samples"]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_000020.png"]
    assert list(results_dir.glob(f"mlartifacts/{run_id}/artifacts/samples/step_000020.png"))
    # metrics.jsonl: one record per call, step and time first, NaN as null
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 10, 20]
    assert list(lines[0])[:2] == ["step", "time"]
    assert lines[0]["loss"] == 0.5 and lines[1]["grad_norm"] is None
    assert read_metrics(run_dir) == lines


def test_resume_after_close_continues_the_same_run(results_dir, client, tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(experiment="unit")
    params = _params()
    with Tracker(cfg, run_dir, rank=0, results_dir=results_dir, params=params,
                 console=False) as first:
        for step in (1, 2, 3):
            first.log_metrics({"loss": 1.0 / step}, step=step)
    run_id = first.run_id

    # same params (no error from MLflow's refusal to change a param), one new, one changed
    params["train.steps"] = 999
    params["custom.new"] = "added on resume"
    with Tracker(cfg, run_dir, rank=0, results_dir=results_dir, params=params,
                 console=False) as second:
        assert second.run_id == run_id
        for step in (4, 5):
            second.log_metrics({"loss": 1.0 / step}, step=step)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, run_id, "loss") == [(s, 1.0 / s) for s in (1, 2, 3, 4, 5)]
    assert run.data.params["train.steps"] == str(Config().train.steps)  # MLflow keeps the first
    assert run.data.tags["resume_changed.train.steps"] == "999"
    assert run.data.params["custom.new"] == "added on resume"
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "train.steps" in warnings[0].getMessage()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'run'")) == 1


_CRASHING_CHILD = textwrap.dedent("""
    import os, sys
    from mpdit_dist.config import TrackingConfig
    from mpdit_dist.tracking import Tracker
    tracker = Tracker(TrackingConfig(experiment="unit"), sys.argv[1], rank=0,
                      results_dir=sys.argv[2], console=False)
    for step in range(1, 7):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.flush(timeout=60)
    os._exit(1)  # die without closing: the MLflow run stays RUNNING
""")


def test_resume_after_a_crash_leaves_run_running(results_dir, client, tmp_path):
    run_dir = tmp_path / "crashed"
    child = subprocess.run([sys.executable, "-c", _CRASHING_CHILD, str(run_dir), str(results_dir)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 1, child.stderr
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert client.get_run(run_id).info.status == "RUNNING"

    # the last checkpoint was at step 4: steps 5 and 6 are logged again, then 7
    with Tracker(TrackingConfig(experiment="unit"), run_dir, rank=0, results_dir=results_dir,
                 console=False) as tracker:
        assert tracker.run_id == run_id
        assert client.get_run(run_id).info.status == "RUNNING"
        for step in (5, 6, 7):
            tracker.log_metrics({"loss": 10.0 * step}, step=step)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert max(s for s, _ in _history(client, run_id, "loss")) == 7
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0, 70.0]


def test_failed_status_from_an_exception(results_dir, client, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(TrackingConfig(experiment="unit"), tmp_path / "r", rank=0,
                     results_dir=results_dir, console=False) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        tracker.close("DONE")


def test_disabled_warns_once_and_writes_metrics(tmp_path, caplog):
    run_dir = tmp_path / "off"
    with Tracker(TrackingConfig(enabled=False), run_dir, rank=0, results_dir=tmp_path / "res",
                 params={"a": 1}, tags={"b": 2}) as tracker:
        assert tracker.run_id is None
        tracker.log_metrics({"loss": 0.5}, step=3)
        tracker.log_params({"c": 3})
        tracker.set_tags({"d": 4})
        tracker.log_artifact(run_dir / "missing.png")
    assert len(_warnings(caplog)) == 1
    assert "tracking.enabled=false" in _warnings(caplog)[0].getMessage()
    assert not (run_dir / RUN_ID_FILE).exists() and not (tmp_path / "res").exists()
    assert [r["loss"] for r in read_metrics(run_dir)] == [0.5]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_once_and_writes_metrics(tmp_path, caplog):
    run_dir = tmp_path / "unreachable"
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    tracker = Tracker(TrackingConfig(uri=uri), run_dir, rank=0, results_dir=tmp_path,
                      params={"a": 1})
    assert time.monotonic() - start < 10
    assert tracker.run_id is None
    for step in (1, 2):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.log_artifact(run_dir / "metrics.jsonl")
    tracker.close()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_silent_server_start_up_is_bounded(tmp_path, caplog):
    # a socket that accepts connections and never answers (a hung server or a black hole)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        tracker = Tracker(TrackingConfig(uri=uri), tmp_path / "silent", rank=0,
                          results_dir=tmp_path, probe_timeout_s=1.0)
        elapsed = time.monotonic() - start
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    assert tracker.run_id is None and elapsed < 5
    assert len(_warnings(caplog)) == 1


def test_store_failure_mid_run_warns_once_and_training_goes_on(results_dir, client, tmp_path,
                                                              caplog):
    run_dir = tmp_path / "midrun"
    tracker = Tracker(TrackingConfig(experiment="unit"), run_dir, rank=0,
                      results_dir=results_dir, console=False)
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.flush(timeout=60)
    client.delete_run(tracker.run_id)  # the store now refuses every write to this run
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)  # must not raise
    assert not tracker.flush(timeout=60)
    assert not tracker.mlflow_active
    tracker.log_artifact(run_dir / "metrics.jsonl")
    tracker.close()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "failed" in warnings[0].getMessage()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_unknown_run_id_starts_a_new_run(results_dir, client, tmp_path, caplog):
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    with Tracker(TrackingConfig(experiment="unit"), run_dir, rank=0, results_dir=results_dir,
                 console=False) as tracker:
        assert tracker.run_id not in (None, "0123456789abcdef0123456789abcdef")
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id
    assert len(_warnings(caplog)) == 1 and "does not exist" in _warnings(caplog)[0].getMessage()


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "rank1"
    with Tracker(TrackingConfig(), run_dir, rank=1, results_dir=tmp_path / "res",
                 params={"a": 1}) as tracker:
        assert tracker.run_id is None
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_params({"b": 1})
        tracker.set_tags({"c": 1})
        tracker.log_artifact(tmp_path)
    assert not run_dir.exists() and not (tmp_path / "res").exists()


def test_metric_values_and_reserved_keys(tmp_path, caplog):
    run_dir = tmp_path / "values"
    with Tracker(TrackingConfig(enabled=False), run_dir, rank=0, results_dir=tmp_path) as tracker:
        with pytest.raises(ValueError, match="step"):
            tracker.log_metrics({"step": 1}, step=1)
        tracker.log_metrics({"loss": torch.tensor(2.0), "epoch": 3, "phase": "warmup",
                             "inf": float("inf"), "vec": np.arange(2)}, step=np.int64(5))
    (record,) = read_metrics(run_dir)
    assert record["step"] == 5 and record["loss"] == 2.0 and record["epoch"] == 3
    assert record["phase"] == "warmup" and record["inf"] is None and record["vec"] == "[0 1]"


def test_read_metrics_one_record_per_step_last_write_wins(tmp_path, caplog):
    run_dir = tmp_path / "dups"
    run_dir.mkdir()
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
            {"step": 2, "fid": 50.0},  # a second log call at step 2 (an evaluation)
            # the process died here, then resumed from a checkpoint at step 1:
            {"step": 2, "loss": 2.5}, {"step": 3, "loss": 3.5}, {"step": 4, "loss": 4.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 5, "lo')  # a line cut by a crash
    # a tracker resuming in this run dir starts on a fresh line
    with Tracker(TrackingConfig(enabled=False), run_dir, rank=0, results_dir=tmp_path) as tracker:
        tracker.log_metrics({"loss": 5.5}, step=5)
    caplog.clear()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [1.0, 2.5, 3.5, 4.5, 5.5]
    assert records[1]["fid"] == 50.0
    assert len(_warnings(caplog)) == 1 and "1 unreadable line" in _warnings(caplog)[0].getMessage()


def test_close_waits_at_most_the_given_time_for_a_busy_store(tmp_path, caplog):
    """A preempted run passes a short wait: a store call that hangs (here one that sleeps 30 s in
    the real worker thread) is abandoned after that, with a warning; the file is complete."""
    import time

    run_dir = tmp_path / "busy"
    tracker = Tracker(TrackingConfig(experiment="unit"), run_dir, rank=0, results_dir=tmp_path, console=False)
    assert tracker.mlflow_active
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.flush(timeout=60)
    tracker._worker.submit(lambda: time.sleep(30))  # a call to a server that stopped answering
    tracker.log_metrics({"loss": 2.0}, step=2)
    t0 = time.monotonic()
    tracker.close("KILLED", timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    busy = [r.getMessage() for r in _warnings(caplog) if "still busy after" in r.getMessage()]
    # step 2's values and the end of the run (set_terminated): the worker's stop marker is no call
    assert len(busy) == 1 and "2 queued call(s) abandoned, 0 artifact upload(s)" in busy[0], busy
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_values_mlflow_missed_are_added_at_the_next_start(results_dir, client, tmp_path, caplog):
    """A store that cannot be opened at the first start (here its folder is a file): the run
    goes on with metrics.jsonl only. The next start, with the store back, puts every value
    MLflow lacks into the run (once: a third start adds nothing)."""
    run_dir, store = tmp_path / "run", tmp_path / "store"
    store.write_text("not a folder")
    cfg = TrackingConfig(experiment="unit", uri=f"sqlite:///{store}/mlflow.db")
    with Tracker(cfg, run_dir, rank=0, results_dir=results_dir, console=False) as first:
        assert first.run_id is None  # unavailable: one warning, metrics.jsonl only
        for step in (1, 2, 3):
            first.log_metrics({"loss": 1.0 / step, "img_per_s": 10.0 * step, "note": "text"}, step=step)
    store.unlink()
    store.mkdir()
    caplog.clear()
    from mlflow.tracking import MlflowClient

    other = MlflowClient(tracking_uri=cfg.uri)
    with Tracker(cfg, run_dir, rank=0, results_dir=results_dir, console=False) as second:
        run_id = second.run_id
        assert run_id is not None
        second.log_metrics({"loss": 0.2, "img_per_s": 40.0}, step=4)
    assert _history(other, run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.2)]
    assert _history(other, run_id, "img_per_s") == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    added = [r.getMessage() for r in _warnings(caplog) if "lacked" in r.getMessage()]
    assert len(added) == 1 and "lacked 6 value(s) of 2 metric(s)" in added[0], added
    caplog.clear()
    with Tracker(cfg, run_dir, rank=0, results_dir=results_dir, console=False) as third:
        assert third.run_id == run_id
    assert _history(other, run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.2)]  # nothing twice
    assert not [r for r in _warnings(caplog) if "lacked" in r.getMessage()]


def test_a_failed_call_is_tried_again_before_mlflow_is_switched_off(results_dir, client, tmp_path, monkeypatch):
    """A store or server that fails for a moment (a lock held past SQLite's busy timeout, a
    restart) costs nothing: the call is tried again after a pause, and logging goes on."""
    from mpdit_dist import fileio

    monkeypatch.setattr(fileio, "RETRY_WAITS_S", (0.05, 0.05, 0.05))
    tracker = Tracker(TrackingConfig(experiment="unit"), tmp_path / "flaky", rank=0, results_dir=results_dir,
                      console=False)
    tries = []

    def flaky():  # fails twice, as a store that is busy for a moment
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ConnectionError("store busy")

    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker._worker.submit(flaky)
    tracker.log_metrics({"loss": 2.0}, step=2)
    assert tracker.flush(timeout=60) and tracker.mlflow_active and len(tries) == 3
    run_id = tracker.run_id
    tracker.close()
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 2.0)]
