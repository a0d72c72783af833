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
    ref_img, _ = _sample(run, out, extra=["--keep-parts"])  # kept, so that removing some stands for a kill
    parts = out.with_name(out.name + ".parts")
    kept = parts / "part_000001.npz"
    mtime = kept.stat().st_mtime_ns
    (parts / "part_000002.npz").unlink()
    out.unlink()
    img, _ = _sample(run, out, extra=["--keep-parts"])
    assert kept.stat().st_mtime_ns == mtime  # not recomputed
    assert np.array_equal(img, ref_img)


def test_a_finished_job_removes_its_parts_and_its_rerun_does_nothing(tmp_path, run, capsys):
    """The parts are as large as the npz (39 GB for 50,000 samples at 512 px): once the npz is written
    they go, unless --keep-parts. The same command run again finds the npz of its settings and
    stops; other settings sample again."""
    from mpdit_dist.sample import main

    out = tmp_path / "s.npz"
    argv = ["--run-dir", str(run), "--num-samples", "4", "--batch-size", "2", "--steps", "2", "--seed", "3",
            "--device", "cpu", "--out", str(out)]
    main(argv)
    assert not out.with_name(out.name + ".parts").exists()
    written = out.stat().st_mtime_ns
    capsys.readouterr()
    main(argv)
    assert f"{out} already holds these 4 samples" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == written and not out.with_name(out.name + ".parts").exists()
    main([*argv, "--seed", "4", "--keep-parts"])  # other settings: sampled again, parts kept
    assert out.stat().st_mtime_ns != written
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 4
    assert sorted(p.name for p in out.with_name(out.name + ".parts").iterdir()) == [
        "lock", "part_000000.npz", "part_000001.npz", "settings.json"]


def test_balanced_labels(tmp_path, run):
    _, lab = _sample(run, tmp_path / "b.npz", extra=["--balanced", "--classes", "0,1"])
    assert sorted(lab.tolist()) == [0] * 5 + [1] * 5


def _sample_in_process(run, out, *extra):
    from mpdit_dist.sample import main

    main(["--run-dir", str(run), "--steps", "2", "--cfg-scale", "2", "--seed", "3", "--device", "cpu",
          "--out", str(out), *extra])
    with np.load(out) as z:
        return z["arr_0"], z["arr_1"]


def test_num_per_class_is_shuffled_balanced_and_rank_independent(tmp_path, run):
    """--num-per-class writes each class N times in a seeded shuffled order (the Inception Score
    averages consecutive splits, so a class-sorted file caps it): the same samples as
    --num-samples C*N --balanced, whatever the batch size or the number of ranks."""
    from mpdit_dist.sample import plan_labels

    classes = ["--classes", "0,1,2,3"]
    img, lab = _sample_in_process(run, tmp_path / "npc.npz", "--num-per-class", "3", "--batch-size", "5", *classes)
    assert sorted(lab.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert lab.tolist() != sorted(lab.tolist())  # not in class order
    assert lab.tolist() == plan_labels([0, 1, 2, 3], None, 3, seed=3)
    bal_img, bal_lab = _sample_in_process(run, tmp_path / "bal.npz", "--num-samples", "12", "--balanced",
                                          "--batch-size", "4", *classes)
    assert np.array_equal(lab, bal_lab) and np.array_equal(img, bal_img)
    # another seed, another order
    assert plan_labels(range(4), None, 3, seed=4) != plan_labels(range(4), None, 3, seed=3)
    # two ranks, another batch size: the same file
    out = tmp_path / "two.npz"
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "mpdit_dist.sample", "--run-dir", str(run),
         "--num-per-class", "3", *classes, "--batch-size", "2", "--steps", "2", "--cfg-scale", "2", "--seed", "3",
         "--device", "cpu", "--out", str(out)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        assert np.array_equal(z["arr_1"], lab) and np.array_equal(z["arr_0"], img)
    assert json.loads(out.with_suffix(".json").read_text())["num_per_class"] == 3


def test_num_per_class_resumes_from_parts(tmp_path, run):
    out = tmp_path / "s.npz"
    args = ("--num-per-class", "2", "--classes", "1,2,5", "--batch-size", "2")
    ref_img, ref_lab = _sample_in_process(run, out, *args, "--keep-parts")
    parts = out.with_name(out.name + ".parts")
    kept = parts / "part_000000.npz"
    mtime = kept.stat().st_mtime_ns
    (parts / "part_000002.npz").unlink()
    out.unlink()
    img, lab = _sample_in_process(run, out, *args, "--keep-parts")
    assert kept.stat().st_mtime_ns == mtime  # not recomputed
    assert np.array_equal(img, ref_img) and np.array_equal(lab, ref_lab)


def test_merge_parts_fills_one_array(tmp_path):
    """The final npz is assembled in one preallocated array: peak memory about 1x the images, not the
    parts plus their concatenation (2x; 50,000 samples at 512 px are 39 GB)."""
    import tracemalloc

    from mpdit_dist.sample import _atomic_savez, merge_parts

    rng = np.random.default_rng(0)
    sizes = [16] * 15 + [7]
    images = rng.integers(0, 256, (sum(sizes), 96, 96, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, sum(sizes))
    start = 0
    for p, n in enumerate(sizes):
        _atomic_savez(tmp_path / f"part_{p:06d}.npz", images=images[start:start + n], labels=labels[start:start + n])
        start += n
    tracemalloc.start()
    try:
        arr, lab = merge_parts(tmp_path, len(sizes), sum(sizes))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(arr, images) and np.array_equal(lab, labels) and lab.dtype == np.int64
    # the images once, plus a few parts being read (about 1.2x here); concatenating the parts was 2.0x
    assert peak < 1.5 * images.nbytes, (peak, images.nbytes)
    with pytest.raises(SystemExit, match="hold 247 samples, 248 planned"):
        merge_parts(tmp_path, len(sizes), sum(sizes) + 1)


@pytest.mark.parametrize("argv,message", [
    (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
    (["--num-per-class", "-1"], "--num-per-class must be at least 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--guidance-interval", "0.5"], "--guidance-interval '0.5': give lo,hi"),
    (["--guidance-interval", "0.8,0.2"], "--guidance-interval '0.8,0.2': give lo,hi"),
    (["--guidance-interval", "a,b"], "--guidance-interval 'a,b'"),
    (["--classes", "1,x"], "--classes '1,x'"),
])
def test_bad_arguments_stop_before_loading(tmp_path, capsys, argv, message):
    from mpdit_dist.sample import main

    # the run directory does not exist: the argument must be refused before anything is loaded
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(tmp_path / "missing"), "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dopri5_warns_that_steps_are_ignored_and_tf32_is_recorded(tmp_path, run, capsys):
    import torch

    before = torch.get_float32_matmul_precision()
    _sample_in_process(run, tmp_path / "d.npz", "--num-samples", "1", "--sampler", "dopri5", "--precision", "fp32",
                       "--tf32")
    assert "--steps is ignored by the dopri5 sampler" in capsys.readouterr().err
    settings = json.loads((tmp_path / "d.json").read_text())
    assert settings["tf32"] is True and settings["precision"] == "fp32"
    assert torch.get_float32_matmul_precision() == before  # restored


def _forge_flash_attn(checkpoint):
    """Rewrite a checkpoint's trainer.json as if the run had been trained with model.attention=flash_attn
    (and fix the checksum manifest), which a CPU machine cannot train."""
    import zlib

    from mpdit_dist.checkpoint import COMPLETE

    path = checkpoint / "trainer.json"
    state = json.loads(path.read_text())
    state["config"]["model"]["attention"] = "flash_attn"
    path.write_text(json.dumps(state))
    manifest = json.loads((checkpoint / COMPLETE).read_text())
    data = path.read_bytes()
    manifest["files"]["trainer.json"] = {"size": len(data), "crc32": zlib.crc32(data)}
    (checkpoint / COMPLETE).write_text(json.dumps(manifest))


def test_run_trained_with_flash_attn_samples_and_exports_without_it(tmp_path, run, caplog):
    """The attention kernel is the loading machine's choice: a saved flash_attn falls back to auto
    (logged) where flash-attn is not importable, and --attention overrides."""
    import shutil

    from mpdit_dist.export import main as export_main
    from mpdit_dist.models import flash_attn_available
    from mpdit_dist.sample import main

    if flash_attn_available():
        pytest.skip("flash-attn is installed here: the fallback is not exercised")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpts = sorted((copy / "checkpoints").glob("step_*"))
    _forge_flash_attn(ckpts[-1])
    ref_img, _ = _sample_in_process(run, tmp_path / "ref.npz", "--num-samples", "2")
    img, _ = _sample_in_process(copy, tmp_path / "flash.npz", "--num-samples", "2")
    assert "attention='flash_attn', which is not importable here" in caplog.text
    assert np.array_equal(img, ref_img)  # auto, as the run that was trained with it
    img, _ = _sample_in_process(copy, tmp_path / "math.npz", "--num-samples", "2", "--attention", "math")
    assert np.abs(img.astype(int) - ref_img.astype(int)).max() <= 1  # kernels agree to rounding
    # --checkpoint DIR, and an export of it sampled with --checkpoint FILE
    main(["--checkpoint", str(ckpts[-1]), "--num-samples", "2", "--steps", "2", "--cfg-scale", "2", "--seed", "3",
          "--device", "cpu", "--out", str(tmp_path / "dir.npz")])
    with np.load(tmp_path / "dir.npz") as z:
        assert np.array_equal(z["arr_0"], ref_img)
    export_main([str(copy), "--out", str(tmp_path / "e.safetensors"), "--ema"])
    img, _ = _sample_in_process_checkpoint(tmp_path / "e.safetensors", tmp_path / "exp.npz")
    assert np.array_equal(img, ref_img)
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(copy), "--attention", "flash_attn", "--device", "cpu"])
    assert exc.value.code == 2


def _sample_in_process_checkpoint(checkpoint, out):
    from mpdit_dist.sample import main

    main(["--checkpoint", str(checkpoint), "--num-samples", "2", "--steps", "2", "--cfg-scale", "2", "--seed", "3",
          "--device", "cpu", "--out", str(out)])
    with np.load(out) as z:
        return z["arr_0"], z["arr_1"]
