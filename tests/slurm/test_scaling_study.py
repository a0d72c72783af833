"""slurm/scaling_study.py on the real one-node SLURM cluster: two points (1 and 2 CPU tasks, gloo),
the report (CSV, markdown, PNG), the MLflow runs tagged with the study, and a resubmission that
skips the finished points."""
from __future__ import annotations

import csv
import json
import subprocess

import pytest

from tests.helpers.runs import PY, REPO, TINY, digits_npz

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_two_point_study_reports_table_plot_and_mlflow(slurm_jobs, tmp_path):
    npz = digits_npz(tmp_path / "digits.npz")
    study_dir = tmp_path / "study"
    db = tmp_path / "mlflow.db"
    over = [f"data.path={npz}", *TINY, f"results_dir={tmp_path / 'results'}", "tracking.enabled=true",
            f"tracking.uri=sqlite:///{db}", "launch.partition=debug", "launch.gpus_per_node=0",
            "launch.tasks_per_node=2", "launch.cpus_per_task=1", "launch.mem_gb=1", "launch.time_min=10",
            "launch.signal_delay_s=60"]
    cmd = [PY, str(REPO / "slurm" / "scaling_study.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--gpus", "1,2", "--backends", "ddp", "--per-gpu-batch", "6", "--steps", "6", "--warmup", "2",
           "--name", "cpu-weak", "--study-dir", str(study_dir), "--peak-tflops", "0.1"]
    proc = subprocess.run([*cmd, "--wait", "--timeout", "200", "--report", *over], cwd=tmp_path,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "ddp-g1: submitted job" in proc.stdout and "ddp-g2: submitted job" in proc.stdout

    rows = list(csv.DictReader(open(study_dir / "scaling.csv")))
    assert [(r["backend"], int(r["gpus"]), int(r["global_batch"])) for r in rows] == [("ddp", 1, 6), ("ddp", 2, 12)]
    for r in rows:
        assert int(r["steps"]) == 6 and int(r["warmup_steps"]) == 2
        assert float(r["img_per_s"]) > 0 and 0 < float(r["mfu"]) < 1
        assert float(r["img_per_s_per_gpu"]) == pytest.approx(float(r["img_per_s"]) / int(r["gpus"]), rel=1e-6)
    assert float(rows[0]["scaling_efficiency"]) == pytest.approx(1.0)
    assert float(rows[1]["scaling_efficiency"]) == pytest.approx(
        float(rows[1]["img_per_s_per_gpu"]) / float(rows[0]["img_per_s_per_gpu"]), rel=1e-6)
    md = (study_dir / "scaling.md").read_text()
    assert "# Scaling study 'cpu-weak' (weak scaling)" in md and "| ddp | 2 | 1 | 12 |" in md
    assert "Points without results" not in md
    import matplotlib.image

    img = matplotlib.image.imread(study_dir / "scaling.png")
    assert img.ndim == 3 and img.shape[0] > 200

    # The figures come from the measured steps only: recompute one from the point's own metrics.
    metrics = [json.loads(line) for line in (study_dir / "ddp-g2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    mean_t = sum(m["step_time_s"] for m in metrics[2:]) / 6
    assert float(rows[1]["img_per_s"]) == pytest.approx(12 / mean_t, rel=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    for point, gpus in (("ddp-g1", 1), ("ddp-g2", 2)):
        run = client.get_run((study_dir / point / "mlflow_run_id").read_text().strip())
        assert run.info.run_name == f"cpu-weak/{point}"
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert (tags["study"], tags["study_point"], tags["study_gpus"], tags["study_mode"], tags["world_size"]) == \
            ("cpu-weak", point, str(gpus), "weak", str(gpus))
        assert run.data.metrics["study_img_per_s"] == pytest.approx(float(rows[gpus - 1]["img_per_s"]))
        assert "study_scaling_efficiency" in run.data.metrics

    # Resubmitting the study submits nothing: both points are done.
    before = slurm_jobs.queued_job_ids()
    again = subprocess.run([*cmd, *over], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "ddp-g1: done, skipped" in again.stdout and "ddp-g2: done, skipped" in again.stdout
    assert "submitted job" not in again.stdout
    assert not slurm_jobs.queued_job_ids() - before  # no job added (a point's job may leave the queue meanwhile)
