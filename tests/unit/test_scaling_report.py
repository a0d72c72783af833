"""slurm/scaling_study.py without SLURM: the plan, each point's config, the figures and the report."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from mpdit_dist import config as C
from tests.helpers.runs import REPO

_spec = importlib.util.spec_from_file_location("scaling_study", REPO / "slurm" / "scaling_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["scaling_study"] = study  # dataclasses look their module up while the class is made
_spec.loader.exec_module(study)


def records(step_times: list[float], **extra) -> list[dict]:
    return [dict(step=i + 1, loss=1.0, step_time_s=t, data_wait_frac=0.25, **extra) for i, t in enumerate(step_times)]


def test_point_layout_fills_whole_nodes():
    assert study.point_layout(1, 8) == (1, 1)
    assert study.point_layout(8, 8) == (1, 8)
    assert study.point_layout(32, 8) == (4, 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        study.point_layout(12, 8)


def test_weak_and_strong_batches():
    p = study.Point("fsdp2", 16)
    assert study.global_batch_for(p, strong=False, per_gpu_batch=32, global_batch=None) == 512
    assert study.global_batch_for(p, strong=True, per_gpu_batch=None, global_batch=1024) == 1024
    with pytest.raises(ValueError, match="not divisible by 16"):
        study.global_batch_for(p, strong=True, per_gpu_batch=None, global_batch=1000)


def test_point_config_is_a_short_tagged_benchmark():
    p = study.Point("fsdp2", 16)
    over = study.point_overrides(p, study="s1", strong=False, global_batch=512, steps=20, warmup=5, slots_per_node=8,
                                 on_gpus=True)
    cfg = C.load_config(None, over)
    assert (cfg.parallel.backend, cfg.data.global_batch_size, cfg.train.steps, cfg.train.log_every) == \
        ("fsdp2", 512, 25, 1)
    assert (cfg.train.ckpt_every, cfg.train.sample_every, cfg.launch.nodes, cfg.launch.gpus_per_node) == (0, 0, 2, 8)
    assert cfg.tracking.run_name == "s1/fsdp2-g16"
    assert cfg.launch.tags == {"study": "s1", "study_point": "fsdp2-g16", "study_backend": "fsdp2",
                               "study_gpus": "16", "study_mode": "weak"}
    cpu = C.load_config(None, study.point_overrides(study.Point("ddp", 2), study="s", strong=True, global_batch=12,
                                                    steps=3, warmup=1, slots_per_node=2, on_gpus=False))
    assert (cpu.launch.tasks_per_node, cpu.launch.nodes, cpu.launch.tags["study_mode"]) == (2, 1, "strong")


def test_summary_leaves_warmup_out():
    # 2 slow warm-up steps, then 4 steps of 0.1 s and 0.3 s: mean 0.2 s
    recs = records([5.0, 3.0, 0.1, 0.3, 0.1, 0.3])
    s = study.summarize_point(recs, warmup=2, total_steps=6, global_batch=64, gpus=4)
    assert s["steps"] == 4 and s["warmup_steps"] == 2
    assert s["step_time_ms"] == pytest.approx(200.0)
    assert s["img_per_s"] == pytest.approx(64 / 0.2)  # images over time, not the mean of per-step rates
    assert s["img_per_s_per_gpu"] == pytest.approx(64 / 0.2 / 4)
    assert s["data_wait_ms"] == pytest.approx(50.0)
    assert s["mfu"] is None and s["peak_mem_gib"] is None
    with_peak = study.summarize_point(recs, warmup=2, total_steps=6, global_batch=64, gpus=4, flops_per_image=1e9,
                                      peak_flops_per_gpu=1e12)
    assert with_peak["mfu"] == pytest.approx(320 * 1e9 / (4 * 1e12))


def test_summary_prefers_trainer_mfu_and_reports_peak_memory():
    recs = records([1.0, 0.5, 0.5], mfu=0.4, peak_mem_gib=10.0)
    recs[2]["peak_mem_gib"] = 12.0
    s = study.summarize_point(recs, warmup=1, total_steps=3, global_batch=8, gpus=1, flops_per_image=1.0,
                              peak_flops_per_gpu=1.0)
    assert s["mfu"] == pytest.approx(0.4) and s["peak_mem_gib"] == 12.0


def test_summary_refuses_unfinished_runs():
    with pytest.raises(ValueError, match="lack 2 of 6 steps"):
        study.summarize_point(records([1.0] * 4), warmup=1, total_steps=6, global_batch=8, gpus=1)
    with pytest.raises(ValueError, match="no timed steps after"):
        study.summarize_point(records([1.0] * 2), warmup=2, total_steps=2, global_batch=8, gpus=1)


def test_summary_leaves_profiled_steps_out():
    # a point run with train.profile_at=4 (2 steps): those steps log no rate, and are not counted
    recs = records([5.0, 0.2, 0.2, 0.0, 0.0, 0.2])
    for r in recs[3:5]:
        del r["step_time_s"], r["data_wait_frac"]
    recs[4]["profiled_steps"] = 2
    s = study.summarize_point(recs, warmup=1, total_steps=6, global_batch=8, gpus=1)
    assert s["steps"] == 3 and s["step_time_ms"] == pytest.approx(200.0)


def _row(backend, gpus, img_s):
    return dict(backend=backend, gpus=gpus, nodes=1, global_batch=8 * gpus, img_per_s=img_s,
                img_per_s_per_gpu=img_s / gpus, step_time_ms=1.0, data_wait_ms=0.0, mfu=None, peak_mem_gib=None,
                steps=10, warmup_steps=2, point=f"{backend}-g{gpus}", run_dir="/nonexistent", mode="weak")


def test_efficiency_against_smallest_point_per_backend():
    rows = study.add_efficiency([_row("ddp", 4, 360.0), _row("ddp", 1, 100.0), _row("ddp", 2, 190.0),
                                 _row("fsdp2", 2, 200.0), _row("fsdp2", 8, 600.0)])
    got = {(r["backend"], r["gpus"]): (r["speedup"], r["ideal_speedup"], r["scaling_efficiency"]) for r in rows}
    assert got[("ddp", 1)] == pytest.approx((1.0, 1.0, 1.0))
    assert got[("ddp", 2)] == pytest.approx((1.9, 2.0, 0.95))
    assert got[("ddp", 4)] == pytest.approx((3.6, 4.0, 0.90))
    assert got[("fsdp2", 2)] == pytest.approx((1.0, 1.0, 1.0))  # its own smallest point
    assert got[("fsdp2", 8)] == pytest.approx((3.0, 4.0, 0.75))


def test_report_files(tmp_path):
    rows = study.add_efficiency([_row("ddp", 1, 100.0), _row("ddp", 2, 190.0)])
    study.write_csv(rows, tmp_path / "s.csv")
    table = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [int(r["gpus"]) for r in table] == [1, 2]
    assert float(table[1]["scaling_efficiency"]) == pytest.approx(0.95)
    assert table[0]["mfu"] == ""  # unknown, not zero
    md = study.markdown_table(rows, [{"point": "ddp-g4", "state": "not submitted"}], "t")
    assert "| ddp | 2 | 1 | 16 | 190 | 95 |" in md and "95.0%" in md and "n/a" in md
    assert "- ddp-g4: not submitted" in md  # nothing silently dropped
    study.plot(rows, tmp_path / "s.png", "t")
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "s.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 200


def test_gather_marks_finished_point_done(tmp_path):
    """A point whose run reached its last step gets result.json; one that did not stays open."""
    s = study.Study(config=str(REPO / "configs" / "demo.yaml"), overrides=[], points=[study.Point("ddp", 2)],
                    name="s", study_dir=tmp_path, strong=False, per_gpu_batch=4, global_batch=None, steps=3,
                    warmup=1)
    p = s.points[0]
    d = s.point_dir(p)
    d.mkdir()
    C.save_config(C.load_config(None, ["train.steps=4", "data.global_batch_size=8", "launch.gpus_per_node=0",
                                       "launch.tasks_per_node=2"]), d / "config.yaml")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records([1.0, 0.5, 0.5])))
    summary, state = study.gather_point(s, p)
    assert summary is None and "incomplete: step 3 of 4" in state and not (d / study.RESULT_FILE).exists()
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps(records([1.0, 0.5, 0.5, 0.5])[-1]) + "\n")
    summary, state = study.gather_point(s, p)
    assert state == "done" and summary["img_per_s"] == pytest.approx(16.0) and summary["steps"] == 3
    assert json.loads((d / study.RESULT_FILE).read_text())["img_per_s"] == pytest.approx(16.0)
