"""Sampling split over ranks gives the same samples as one rank, and resumes from finished parts."""
import json
import subprocess

import numpy as np
import pytest

from tests.helpers.runs import PY, REPO, TORCHRUN, digits_npz, env, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    npz = digits_npz(root / "digits.npz", n=120)
    train(root / "run", npz, ["train.steps=2", "train.ckpt_every=2"])
    return root / "run"


def _sample(run, out, nproc=0, extra=()):
    args = ["-m", "mpdit_dist.sample", "--run-dir", str(run), "--num-samples", "10", "--batch-size", "3",
            "--steps", "3", "--cfg-scale", "2", "--sampler", "euler_maruyama", "--seed", "5", "--out", str(out),
            "--device", "cpu", *extra]
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args] if nproc else [PY, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        return z["arr_0"], z["arr_1"]


def test_two_ranks_same_samples_as_one(tmp_path, run):
    a_img, a_lab = _sample(run, tmp_path / "one.npz")
    b_img, b_lab = _sample(run, tmp_path / "two.npz", nproc=2)
    assert a_img.shape == (10, 16, 16, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_lab, b_lab) and np.array_equal(a_img, b_img)
    settings = json.loads((tmp_path / "two.json").read_text())
    assert settings["sampler"] == "euler_maruyama" and settings["cfg_scale"] == 2.0 and settings["seed"] == 5


def test_resume_keeps_finished_parts(tmp_path, run):
    out = tmp_path / "s.npz"
    ref_img, _ = _sample(run, out)
    parts = out.with_name(out.name + ".parts")
    kept = parts / "part_000001.npz"
    mtime = kept.stat().st_mtime_ns
    (parts / "part_000002.npz").unlink()
    out.unlink()
    img, _ = _sample(run, out)
    assert kept.stat().st_mtime_ns == mtime  # not recomputed
    assert np.array_equal(img, ref_img)


def test_balanced_labels(tmp_path, run):
    _, lab = _sample(run, tmp_path / "b.npz", extra=["--balanced", "--classes", "0,1"])
    assert sorted(lab.tolist()) == [0] * 5 + [1] * 5
