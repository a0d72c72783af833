"""Several processes tracking into one SQLite MLflow store at once, as the points of a scaling
study or several runs in one results dir do: real processes, real MLflow, a real store file."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mpdit_dist.tracking import default_tracking_uri, read_metrics, sqlite_path, store_init_lock

REPO = Path(__file__).resolve().parents[2]
STEPS = 300

# One writer: imports done, it waits for the "go" file so that all writers open the store together,
# then starts a run (params, tags), logs a metric record per step as fast as it can, two artifacts,
# and closes. It prints its run id and every warning it logged.
WRITER = textwrap.dedent("""
    import json, logging, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    results, index, steps = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    from mpdit_dist.config import Config, TrackingConfig, flatten, to_dict
    from mpdit_dist.tracking import Tracker
    import mlflow.tracking  # noqa: F401 - imported before the start, like a trainer has

    warnings = []
    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage()[:300])
    logging.getLogger().addHandler(Collect())
    run_dir = results / f"run{index}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"writer: {index}\\n")
    (run_dir / "grid.png").write_bytes(bytes(range(256)) * 8)
    (results / f"ready{index}").touch()
    deadline = time.time() + 120
    while not (results / "go").exists() and time.time() < deadline:
        time.sleep(0.005)
    params = flatten(to_dict(Config()))
    tracker = Tracker(TrackingConfig(experiment="race"), run_dir, rank=0, results_dir=results,
                      params=params, tags={"writer": index}, console=False)
    tracker.log_artifact(run_dir / "config.yaml")
    for step in range(1, steps + 1):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-4, "grad_norm": float(step)}, step=step)
        if step == steps // 2:
            tracker.log_artifact(run_dir / "grid.png", "samples")
    tracker.close()
    print(json.dumps({"run_id": tracker.run_id, "params": len(params), "warnings": warnings}))
""")


def _writers(results: Path, n: int) -> list[dict]:
    """Start ``n`` writers, release them together once all are ready, return their reports."""
    results.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(results), str(i), str(STEPS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    try:
        deadline = time.time() + 120
        while not all((results / f"ready{i}").exists() for i in range(n)):
            assert time.time() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.02)
        (results / "go").touch()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.mark.timeout(300)
def test_writers_starting_together_on_a_fresh_store_lose_nothing(tmp_path):
    """Without the creation lock, MLflow's table creation and migrations ran in every writer at
    once: 'duplicate column name: step', 'table _alembic_tmp_latest_metrics already exists',
    'Online migration expected to match one row': most writers lost MLflow for the whole run
    (metrics.jsonl only), and the store could be left half-migrated, refused by every later run."""
    from mlflow.tracking import MlflowClient

    results = tmp_path / "results"
    n = 4
    reports = _writers(results, n)
    for i, r in enumerate(reports):
        assert r["run_id"] and not r["warnings"], f"writer {i}: {r}"

    client = MlflowClient(default_tracking_uri(results))  # MLflow checks the schema is complete
    [exp] = [e for e in client.search_experiments() if e.name == "race"]
    assert len(client.search_runs([exp.experiment_id])) == n
    for i, r in enumerate(reports):
        run = client.get_run(r["run_id"])
        assert run.info.status == "FINISHED" and run.info.experiment_id == exp.experiment_id
        assert len(run.data.params) == r["params"] and run.data.tags["writer"] == str(i)
        jsonl_steps = [rec["step"] for rec in read_metrics(results / f"run{i}")]
        assert jsonl_steps == list(range(1, STEPS + 1))
        for key in ("loss", "lr", "grad_norm"):  # nothing in metrics.jsonl is missing from MLflow
            assert sorted(m.step for m in client.get_metric_history(r["run_id"], key)) == jsonl_steps
        assert {a.path for a in client.list_artifacts(r["run_id"])} == {"config.yaml", "samples"}
        assert [a.path for a in client.list_artifacts(r["run_id"], "samples")] == ["samples/grid.png"]


def test_store_lock_is_shared_once_the_store_exists(tmp_path):
    """Only creating a store is exclusive: processes opening an existing store do not queue."""
    import fcntl

    uri = default_tracking_uri(tmp_path)
    db = sqlite_path(uri)
    assert db == tmp_path.resolve() / "mlflow.db"
    assert sqlite_path("sqlite:///rel/m.db?mode=ro") == Path("rel/m.db")
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("http://host:5000") is None
    lock = db.with_name("mlflow.db.init.lock")

    def held(mode) -> bool:  # whether another open file description is refused ``mode``
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    with store_init_lock(uri):  # no database yet: exclusive
        assert held(fcntl.LOCK_SH)
        db.write_bytes(b"SQLite format 3\0")
    assert not held(fcntl.LOCK_EX)
    with store_init_lock(uri):  # a database: shared
        assert not held(fcntl.LOCK_SH) and held(fcntl.LOCK_EX)
    with open(lock, "a") as f:  # a creator that does not finish: waiters give up after the timeout
        fcntl.flock(f, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="init.lock"):
            with store_init_lock(uri, timeout_s=0.3):
                pass
        assert time.monotonic() - start < 5


def test_scaling_study_creates_the_store_before_its_first_point_is_submitted(tmp_path, monkeypatch):
    """A study's points start together: their SQLite store is made by the submitter, before any job
    (this also covers file systems where the trainer's lock does not reach across nodes)."""
    import importlib.util

    from mpdit_dist import launch

    spec = importlib.util.spec_from_file_location("scaling_study_store_under_test",
                                                  REPO / "slurm" / "scaling_study.py")
    study = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = study  # dataclasses look their module up while the class is made
    spec.loader.exec_module(study)
    results = tmp_path / "results"
    s = study.Study(config=str(REPO / "configs" / "demo.yaml"), overrides=[f"results_dir={results}"],
                    points=[study.Point("ddp", 1), study.Point("ddp", 2)], name="s", study_dir=tmp_path / "s",
                    strong=False, per_gpu_batch=2, global_batch=None, steps=2, warmup=1)
    seen = []

    class Job:
        job_id = "1"

    def submit(cfg, run_dir, resume, echo):  # what a point's job would find when it starts
        from mlflow.tracking import MlflowClient

        db = results / "mlflow.db"
        seen.append(db.exists() and db.stat().st_size > 0)
        MlflowClient(default_tracking_uri(results)).search_experiments()  # complete: no migration left
        return Job()

    monkeypatch.setattr(launch, "submit", submit)
    assert len(study.submit_study(s, echo=lambda *_: None)) == 2
    assert seen == [True, True]
