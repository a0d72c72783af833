"""Artifacts that never reached MLflow (it was off or failing, or a preempted run stopped waiting
for its queue) are added at the run's next start: real MLflow SQLite store, real files."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from mpdit_dist import fileio
from mpdit_dist.config import TrackingConfig
from mpdit_dist.profiling import TraceWindow
from mpdit_dist.tracking import (RUN_ARTIFACTS, Tracker, run_artifact_files,
                                 run_artifact_path)


@pytest.fixture
def uploads(monkeypatch) -> list[tuple[str, str]]:
    """Every file that a tracker uploads, as (run-dir relative path, artifact folder); the upload
    itself is MLflow's."""
    from mlflow.tracking import MlflowClient

    seen: list[tuple[str, str]] = []
    real = MlflowClient.log_artifact

    def log_artifact(self, run_id, local_path, artifact_path=None):
        seen.append((Path(local_path).name, artifact_path or ""))
        return real(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", log_artifact)
    return seen


def _start(run_dir: Path, results_dir: Path) -> Tracker:
    """A start of the run as the trainer makes it: config.yaml written, then logged at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("train:\n  steps: 8\n")
    return Tracker(TrackingConfig(experiment="backfill"), run_dir, rank=0, results_dir=results_dir,
                   console=False, artifacts=[run_dir / "config.yaml"])


def _grid(run_dir: Path, step: int, scale: float = 1.0) -> Path:
    path = run_dir / "samples" / f"step_{step:08d}_cfg{scale:g}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG grid " + bytes([step]) * (100 + step))
    return path


def _artifacts(client, run_id: str, folder: str) -> dict[str, int]:
    return {f.path: f.file_size for f in client.list_artifacts(run_id, folder)}


def _messages(caplog, text: str, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


def test_run_artifact_path_names_what_the_trainer_logs(tmp_path):
    run = tmp_path / "run"
    profile = TraceWindow(3, 2, run / "profile", 0, torch.device("cpu")).out_dir / "rank0.txt"
    assert run_artifact_path(run, run / "config.yaml") == "config.yaml"
    assert run_artifact_path(run, run / "samples" / "step_00000004_cfg4.png") == "samples/step_00000004_cfg4.png"
    assert run_artifact_path(run, profile) == "profile/step_00000003/rank0.txt"
    for other in (run / "metrics.jsonl", run / "samples" / "old" / "x.png", run / "launch" / "config.yaml",
                  run / "profile" / "step_00000003" / "rank1.txt", tmp_path / "config.yaml"):
        assert run_artifact_path(run, other) is None, other
    for path in (run / "config.yaml", run / "samples" / "a.png", profile, run / "metrics.jsonl"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(run_artifact_files(run)) == ["config.yaml", "profile/step_00000003/rank0.txt", "samples/a.png"]
    assert len(RUN_ARTIFACTS) == 3


def test_grids_mlflow_missed_mid_run_are_added_once_at_the_next_start(results_dir, client, tmp_path, caplog,
                                                                      uploads):
    caplog.set_level(logging.INFO, logger="mpdit_dist.tracking")
    run_dir = tmp_path / "run"
    first = _start(run_dir, results_dir)
    run_id = first.run_id
    first.log_metrics({"loss": 1.0}, step=1)
    first.log_run_file(_grid(run_dir, 1))
    assert first.flush(timeout=60)
    client.delete_run(run_id)  # MLflow goes off: the store refuses every write to this run
    first.log_metrics({"loss": 0.5}, step=2)
    missed = [_grid(run_dir, 2, 1.0), _grid(run_dir, 2, 4.0)]
    for path in missed:
        first.log_run_file(path)
    assert not first.flush(timeout=60) and not first.mlflow_active
    first.close()
    summary = _messages(caplog, "skipped after the failure", logging.INFO)
    assert len(summary) == 1 and "2 artifact(s): samples/step_00000002_cfg1.png, samples/step_00000002_cfg4.png" \
        in summary[0] and "next start adds them" in summary[0], summary
    client.restore_run(run_id)  # the store is back
    assert set(_artifacts(client, run_id, "samples")) == {"samples/step_00000001_cfg1.png"}

    caplog.clear()
    del uploads[:]
    with _start(run_dir, results_dir) as second:
        assert second.run_id == run_id
        assert second.flush(timeout=60)
    # exactly the two grids MLflow lacked, besides this start's own config.yaml; nothing twice
    assert sorted(uploads) == [("config.yaml", ""), ("step_00000002_cfg1.png", "samples"),
                               ("step_00000002_cfg4.png", "samples")]
    stored = _artifacts(client, run_id, "samples")
    assert stored == {f"samples/{p.name}": p.stat().st_size for p in sorted((run_dir / "samples").iterdir())}
    added = _messages(caplog, "artifact(s) MLflow lacked")
    assert len(added) == 1 and "added 2 artifact(s) MLflow lacked: samples/step_00000002_cfg1.png, " \
        "samples/step_00000002_cfg4.png" in added[0], added
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]  # the metric value too

    caplog.clear()
    del uploads[:]
    with _start(run_dir, results_dir) as third:
        assert third.flush(timeout=60)
    assert uploads == [("config.yaml", "")]  # nothing is missing any more
    assert not _messages(caplog, "lacked")


def test_a_run_with_nothing_missing_uploads_nothing(results_dir, client, tmp_path, caplog, uploads):
    run_dir = tmp_path / "complete"
    with _start(run_dir, results_dir) as first:
        first.log_metrics({"loss": 1.0}, step=1)
        for step in (1, 2):
            first.log_run_file(_grid(run_dir, step))
    run_id = first.run_id
    stored = results_dir / "mlartifacts" / run_id / "artifacts" / "samples"
    before = {p.name: p.stat().st_mtime_ns for p in stored.iterdir()}
    assert len(before) == 2
    caplog.clear()
    del uploads[:]
    with _start(run_dir, results_dir) as second:
        assert second.run_id == run_id and second.flush(timeout=60)
    assert uploads == [("config.yaml", "")]
    assert {p.name: p.stat().st_mtime_ns for p in stored.iterdir()} == before
    assert not _messages(caplog, "lacked")


def test_a_fresh_run_reports_nothing_missing(results_dir, tmp_path, caplog, uploads):
    """The first start of a run: its config.yaml is logged as it is made, not 'added' as missing."""
    with _start(tmp_path / "fresh", results_dir) as tracker:
        assert tracker.flush(timeout=60)
    assert uploads == [("config.yaml", "")]
    assert not _messages(caplog, "lacked") and not _messages(caplog, "missing")


def test_uploads_abandoned_by_a_preempted_run_are_added_at_the_next_start(results_dir, client, tmp_path, caplog,
                                                                           uploads):
    """A preempted run waits seconds for its queue (trainer.PREEMPTED_TRACKER_WAIT_S): here a server
    that hangs, then is gone. The warning names the uploads abandoned; the next start adds them."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    run_dir = tmp_path / "preempted"
    first = _start(run_dir, results_dir)
    run_id = first.run_id
    assert first.flush(timeout=60)
    release = threading.Event()

    def hung_server():
        release.wait(60)
        raise MlflowException("server gone", error_code=RESOURCE_DOES_NOT_EXIST)

    first._worker.submit(hung_server)
    first.log_run_file(_grid(run_dir, 4))
    worker = first._worker
    first.close("KILLED", timeout_s=0.2)
    abandoned = _messages(caplog, "abandoned")
    assert len(abandoned) == 1 and "1 artifact upload(s) among them: samples/step_00000004_cfg1.png" \
        in abandoned[0], abandoned
    release.set()
    worker._thread.join(30)
    assert worker.failed and worker.dropped_artifacts == ["samples/step_00000004_cfg1.png"]
    assert _artifacts(client, run_id, "samples") == {}

    caplog.clear()
    del uploads[:]
    with _start(run_dir, results_dir) as second:
        assert second.run_id == run_id and second.flush(timeout=60)
    assert sorted(uploads) == [("config.yaml", ""), ("step_00000004_cfg1.png", "samples")]
    assert set(_artifacts(client, run_id, "samples")) == {"samples/step_00000004_cfg1.png"}
    assert len(_messages(caplog, "added 1 artifact(s) MLflow lacked")) == 1


def test_a_failed_backfill_is_a_warning_and_mlflow_stays_on(results_dir, client, tmp_path, caplog, monkeypatch):
    """The run's artifact store refuses the folder (here a file stands where samples/ goes): one
    warning, the start goes on, and MLflow keeps logging."""
    monkeypatch.setattr(fileio, "RETRY_WAITS_S", (0.05,))
    run_dir = tmp_path / "refused"
    with _start(run_dir, results_dir) as first:
        first.log_metrics({"loss": 1.0}, step=1)
    run_id = first.run_id
    _grid(run_dir, 1)  # made while MLflow was off (never logged)
    (results_dir / "mlartifacts" / run_id / "artifacts" / "samples").write_text("in the way")
    caplog.clear()
    with _start(run_dir, results_dir) as second:
        assert second.flush(timeout=60) and second.mlflow_active
        second.log_metrics({"loss": 0.5}, step=2)
        assert second.flush(timeout=60) and second.mlflow_active
    failed = _messages(caplog, "could not add")
    assert len(failed) == 1 and "1 of the 1 missing artifact(s)" in failed[0] and "next start tries again" \
        in failed[0], failed
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_log_run_file_refuses_a_file_that_is_no_run_artifact(results_dir, tmp_path, caplog, uploads):
    run_dir = tmp_path / "other"
    with _start(run_dir, results_dir) as tracker:
        (run_dir / "notes.txt").write_text("x")
        tracker.log_run_file(run_dir / "notes.txt")
        assert tracker.flush(timeout=60)
    assert uploads == [("config.yaml", "")]
    assert len(_messages(caplog, "is no artifact of the run")) == 1


def test_a_file_the_start_added_is_not_uploaded_again_when_logged(results_dir, client, tmp_path, caplog, uploads):
    """A caller that logs config.yaml itself after the start (not through ``artifacts=``), on a resume
    that changed it: the start's comparison uploads it, and the caller's upload of the same content is
    skipped."""
    run_dir = tmp_path / "changed"
    with _start(run_dir, results_dir) as first:
        first.log_metrics({"loss": 1.0}, step=1)
    run_id = first.run_id
    (run_dir / "config.yaml").write_text("train:\n  steps: 16000\n")  # raised to train longer
    del uploads[:]
    with Tracker(TrackingConfig(experiment="backfill"), run_dir, rank=0, results_dir=results_dir,
                 console=False) as second:
        second.log_artifact(run_dir / "config.yaml")
        assert second.flush(timeout=60)
    assert uploads == [("config.yaml", "")]
    assert _artifacts(client, run_id, "")["config.yaml"] == (run_dir / "config.yaml").stat().st_size


def test_a_training_run_without_mlflow_gets_its_artifacts_at_the_next_start(tmp_path, npz):
    """End to end with the trainer: a run whose store is unavailable makes its config, sample grids
    and profile summary; the same command again, with the store back, puts every one of them into the
    MLflow run under the path the trainer logs it at."""
    from mlflow.tracking import MlflowClient

    from tests.helpers.runs import train

    run, store = tmp_path / "run", tmp_path / "store"
    store.write_text("not a folder")
    uri = f"sqlite:///{store}/mlflow.db"
    args = ["train.steps=4", "train.ckpt_every=2", "train.sample_every=2", "train.sample_steps=2",
            "train.sample_classes=[0,1]", "train.profile_at=2", "train.profile_steps=1", "tracking.enabled=true",
            f"tracking.uri={uri}", "tracking.experiment=e2e"]
    train(run, npz, args)
    assert not (run / "mlflow_run_id").exists()
    files = run_artifact_files(run)
    assert {"config.yaml", "profile/step_00000002/rank0.txt"} <= set(files)
    assert len([k for k in files if k.startswith("samples/")]) >= 2
    store.unlink()
    store.mkdir()
    proc = train(run, npz, args)  # at its last step: only opens the tracker
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=uri)

    def listed(folder=None):
        out = {}
        for f in client.list_artifacts(run_id, folder):
            out.update(listed(f.path) if f.is_dir else {f.path: f.file_size})
        return out

    assert listed() == {k: p.stat().st_size for k, p in files.items()}
    log = proc.stdout + proc.stderr
    assert f"added {len(files) - 1} artifact(s) MLflow lacked" in log, log[-3000:]  # all but config.yaml


def test_a_file_removed_before_its_upload_does_not_switch_mlflow_off(tmp_path, results_dir, client, caplog):
    """An artifact queued and then deleted (before the worker thread reached it) is skipped with a
    warning; it used to be retried for 20 s and then turn MLflow off for the rest of the run."""
    run_dir = tmp_path / "vanished"
    tracker = _start(run_dir, results_dir)
    gate = threading.Event()
    tracker._worker.submit(gate.wait)  # hold the worker while the file is queued and removed
    grid = _grid(run_dir, 2)
    tracker.log_run_file(grid)
    grid.unlink()
    gate.set()
    tracker.log_metrics({"loss": 0.5}, step=3)
    with caplog.at_level(logging.WARNING, logger="mpdit_dist.tracking"):
        assert tracker.flush(timeout=30)
    assert not tracker._worker.failed
    assert any("was removed before its upload" in r.getMessage() for r in caplog.records)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [0.5]
    tracker.close()
