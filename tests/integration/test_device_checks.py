"""bench/device_checks.py, the prepared GPU run, at toy size on the CPU: device time is scarce, so
the script is kept working here (every check runs and lands in the summary; a budget too small for
a check skips it and says so)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_of_every_check(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "bench/device_checks.py", "--tiny", "--only", "backends,speed",
                           "--out", str(out), "--work", str(work), "--budget-s", "600"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "FAILED" not in summary and "SKIPPED" not in summary, summary
    for backend in ("deepspeed_zero2", "deepspeed_zero3", "fsdp2"):
        rows = [json.loads(line) for line in (out / f"{backend}.metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 30 and rows[-1]["img_per_s"] > 0
        assert (work / backend / "checkpoints" / "step_00000030").is_dir()
        assert not (out / backend).exists()  # run directories stay under --work
    for check in ("speed_model_profile", "speed_fsdp2", "speed_dit"):
        rows = json.loads((out / f"{check}.json").read_text())["results"]
        assert rows and all(r["status"] == "ok" and r["grad_clip"] == 0 for r in rows), rows
        if check == "speed_fsdp2":  # one GPU: the bf16 parameters are kept from forward to backward
            assert all(r["reshard_after_forward"] is False for r in rows), rows
    assert "profile ms/step" in summary and "compiled, fsdp2" in summary
    # the trainer's own profiler window (train.profile_at) on the FSDP2 run
    assert (out / "fsdp2.profile.txt").read_text().startswith("profile of steps 21-22, rank 0")
    assert "train.profile_at's window of the fsdp2 run" in summary
    # issue 8's speed checks come first, so a short lease measures them before the backend runs
    assert summary.index("compiled model") < summary.index("backends (")


def test_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/device_checks.py", "--tiny", "--only", "speed", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget-s", "30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary.count("SKIPPED") == 3 and "needs about 90 s" in summary


def test_autotune_runs_on_the_fastest_setting_measured_before(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from device_checks import fastest_setting
    finally:
        sys.path.remove(str(ROOT / "bench"))
    names = ("speed_model_profile", "speed_fsdp2")
    assert fastest_setting(tmp_path, names) == (["--compile", "model"], "the whole forward (no earlier result)")

    def row(label, img_s, scope, backend="none", **extra):
        return {"label": label, "status": "ok", "compile": True, "compile_scope": scope, "backend": backend,
                "img_per_s": img_s, **extra}

    (tmp_path / "speed_model_profile.json").write_text(json.dumps({"results": [row("one process", 1066.0, "model")]}))
    (tmp_path / "speed_fsdp2.json").write_text(json.dumps({"results": [
        row("fsdp2 model", 1180.5, "model", "fsdp2", reshard_after_forward=False),
        row("fsdp2 blocks", 1100.0, "blocks", "fsdp2", reshard_after_forward=False),
        {"label": "failed one", "status": "failed", "compile": True, "img_per_s": None}]}))
    args, basis = fastest_setting(tmp_path, names)
    assert args == ["--compile", "model", "--backend", "fsdp2", "--reshard-after-forward", "0"]
    assert basis == "fsdp2 model (1180.5 img/s before)"
    (tmp_path / "speed_fsdp2.json").write_text(json.dumps({"results": [row("fsdp2 blocks", 900.0, "blocks", "fsdp2")]}))
    assert fastest_setting(tmp_path, names)[0] == ["--compile", "model"]
