"""slurm/scaling_study.py: MFU consistent with img/s, the median step time, the ideal speed-up as
printed, and point folders made with other settings (never reported or skipped as this study's)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from mpdit_dist import config as C
from tests.helpers.runs import REPO

_spec = importlib.util.spec_from_file_location("scaling_study_settings_under_test", REPO / "slurm" / "scaling_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["scaling_study_settings_under_test"] = study  # dataclasses look their module up while the class is made
_spec.loader.exec_module(study)


def records(step_times, batch=None, flops=None, peak=None, gpus=1):
    out = []
    for i, t in enumerate(step_times):
        r = dict(step=i + 1, loss=1.0, step_time_s=t, data_wait_frac=0.0)
        if flops:  # what the trainer logs on GPUs with log_every=1: that step's img/s as MFU
            r["mfu"] = batch / t * flops / (peak * gpus)
        out.append(r)
    return out


def test_trainer_mfu_matches_the_reported_throughput():
    # one slow step among fast ones: the mean of per-step MFUs is a mean of rates (about 2.3x too high here)
    recs = records([9.0, 0.1, 0.1, 1.0], batch=64, flops=1e9, peak=1e12, gpus=2)
    s = study.summarize_point(recs, warmup=1, total_steps=4, global_batch=64, gpus=2)
    assert s["img_per_s"] == pytest.approx(64 / 0.4)
    assert s["mfu"] == pytest.approx(s["img_per_s"] * 1e9 / (1e12 * 2))


def test_median_step_time_of_an_even_count():
    s = study.summarize_point(records([5.0, 0.1, 0.2, 0.3, 0.4]), warmup=1, total_steps=5, global_batch=8, gpus=1)
    assert s["step_time_p50_ms"] == pytest.approx(250.0)


def _row(gpus, img_s):
    return dict(backend="ddp", gpus=gpus, nodes=1, global_batch=8 * gpus, img_per_s=img_s,
                img_per_s_per_gpu=img_s / gpus, step_time_ms=1.0, data_wait_ms=0.0, mfu=None, peak_mem_gib=None,
                steps=10, warmup_steps=2, point=f"ddp-g{gpus}", run_dir="/nonexistent", mode="weak")


def test_markdown_prints_a_fractional_ideal_speedup():
    rows = study.add_efficiency([_row(2, 100.0), _row(3, 140.0)])
    md = study.markdown_table(rows, [], "t")
    assert "1.40 (1.5)" in md  # not "(2)"


def _study(tmp_path, steps=3, warmup=1, per_gpu=4):
    return study.Study(config=str(REPO / "configs" / "demo.yaml"), overrides=[], points=[study.Point("ddp", 2)],
                       name="s", study_dir=tmp_path, strong=False, per_gpu_batch=per_gpu, global_batch=None,
                       steps=steps, warmup=warmup)


def _finished_point(s, total_steps, global_batch):
    d = s.point_dir(s.points[0])
    d.mkdir(parents=True)
    C.save_config(C.load_config(None, [f"train.steps={total_steps}", f"data.global_batch_size={global_batch}",
                                       "launch.gpus_per_node=0", "launch.tasks_per_node=2"]), d / "config.yaml")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records([1.0] + [0.5] * (total_steps - 1))))
    return d


def test_result_of_another_warmup_is_not_reported_as_this_studys(tmp_path):
    s = _study(tmp_path, steps=3, warmup=1)
    _finished_point(s, total_steps=4, global_batch=8)
    summary, state = study.gather_point(s, s.points[0])
    assert state == "done" and summary["warmup_steps"] == 1
    # the same folder, reported later with --steps 2 --warmup 2: the cached result was measured otherwise
    summary, state = study.gather_point(_study(tmp_path, steps=2, warmup=2), s.points[0])
    assert summary is None and "made with other settings" in state and "1 warm-up steps, not 2" in state


def test_run_of_another_batch_or_length_is_neither_reported_nor_reused(tmp_path, capsys):
    s = _study(tmp_path, steps=3, warmup=1, per_gpu=4)
    d = _finished_point(s, total_steps=4, global_batch=8)
    other = _study(tmp_path, steps=5, warmup=1, per_gpu=6)  # another --per-gpu-batch and --steps
    summary, state = study.gather_point(other, other.points[0])
    assert summary is None and "global batch 8, not 12" in state and "4 steps in all, not 1 warm-up + 5" in state
    assert not (d / study.RESULT_FILE).exists()
    out = study.report(other, echo=lambda *_: None)
    assert out["rows"] == [] and out["missing"][0]["state"].startswith("made with other settings")
    with pytest.raises(SystemExit, match="made with other settings"):
        study.submit_study(other, echo=lambda *_: None)
    assert d.exists() and not list(tmp_path.glob("*.attempt-*"))  # left in place, nothing submitted


def _row_with_run(tmp_path, uri_override=None):
    from mpdit_dist.tracking import Tracker

    d = tmp_path / "ddp-g2"
    over = [f"results_dir={tmp_path}"] + ([f"tracking.uri={uri_override}"] if uri_override else [])
    cfg = C.load_config(None, over)
    if uri_override is None:
        tracker = Tracker(cfg.tracking, d, rank=0, results_dir=tmp_path, console=False)
        tracker.close()
        run_id = tracker.run_id
    else:
        d.mkdir()
        run_id = "0123456789abcdef"
        (d / "mlflow_run_id").write_text(run_id + "\n")
    C.save_config(cfg, d / "config.yaml")
    row = dict(_row(2, 190.0), point="ddp-g2", run_dir=str(d), speedup=1.0, ideal_speedup=1.0,
               scaling_efficiency=1.0, mfu=0.25)
    return cfg, row, run_id


def test_report_logs_each_point_summary_to_its_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from mpdit_dist.tracking import default_tracking_uri

    cfg, row, run_id = _row_with_run(tmp_path)
    assert study.log_to_mlflow(_study(tmp_path), [row]) == 1
    run = MlflowClient(default_tracking_uri(tmp_path)).get_run(run_id)
    assert run.data.metrics["study_img_per_s"] == pytest.approx(190.0) and run.data.metrics["study_mfu"] == 0.25
    assert (run.data.tags["study_point"], run.data.tags["study_gpus"]) == ("ddp-g2", "2")


def test_report_does_not_hang_on_a_silent_tracking_server(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        _, row, _ = _row_with_run(tmp_path, f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        assert study.log_to_mlflow(_study(tmp_path), [row]) == 0
        assert time.monotonic() - start < 20  # MLflow's defaults: minutes
    assert "could not log ddp-g2 to MLflow" in capsys.readouterr().err
