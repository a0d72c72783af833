"""Command lines the docs give for the helper scripts: scripts/make_synthetic_latents.py
(configs/gpu_smoke.yaml) and the --dir of bench/checkpoint_io.py and bench/data_throughput.py
(docs/performance.md), at toy sizes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_make_synthetic_latents_help_prints_usage_and_writes_nothing(tmp_path):
    # it took every first argument as the output path: --help wrote a 64 MB "--help.npz"
    res = _run([str(REPO / "scripts" / "make_synthetic_latents.py"), "--help"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_make_synthetic_latents_names_the_file_it_writes(tmp_path):
    res = _run([str(REPO / "scripts" / "make_synthetic_latents.py"), str(tmp_path / "lat"), "8"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "lat.npz"  # np.savez adds the suffix; the message must name that file
    assert f"wrote {out}:" in res.stdout
    with np.load(out) as f:
        assert f["x"].shape == (8, 4, 32, 32) and f["y"].shape == (8,) and int(f["num_classes"]) == 1000


def test_data_throughput_creates_a_missing_dir(tmp_path):
    target = tmp_path / "not" / "yet"
    res = _run([str(REPO / "bench" / "data_throughput.py"), "--samples", "32", "--batch", "8", "--seconds", "0.1",
                "--workers", "0", "--dir", str(target)], cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert target.is_dir() and "latents_per_s" in res.stdout


def test_checkpoint_io_creates_a_missing_dir(tmp_path):
    target = tmp_path / "not" / "yet"
    res = _run([str(REPO / "bench" / "checkpoint_io.py"), "--ranks", "1", "--mb", "1", "--dir", str(target)], cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert target.is_dir() and "find_latest" in res.stdout
