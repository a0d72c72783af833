"""In-training evaluation on the demo's data with a small randomly initialised feature network."""
import math

import numpy as np
import torch

from tests.helpers.runs import digits_npz, train


def _eval_run(tmp_path, extra=()):
    """2 ranks train 2 steps on digits and evaluate 12 samples at step 2 against 40 real digits with a
    small random feature network; the process and its metrics by step."""
    from mpdit_dist.inception import random_feature_net
    from mpdit_dist.tracking import read_metrics

    npz = digits_npz(tmp_path / "digits.npz", n=120)
    with np.load(npz) as z:  # the reference batch: real digits as ADM-format uint8 images
        ref = ((z["x"][:40].transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    torch.save(random_feature_net(0, input_size=75).state_dict(), tmp_path / "inception.pth")
    proc = train(tmp_path / "run", npz, ["train.steps=2", "train.ckpt_every=0", "train.eval_every=2",
                                         "train.eval_num_samples=12", "train.sample_steps=2",
                                         f"train.eval_reference={tmp_path / 'ref.npz'}",
                                         f"train.eval_inception={tmp_path / 'inception.pth'}",
                                         "train.eval_input_size=75", *extra], nproc=2)
    return proc, {r["step"]: r for r in read_metrics(tmp_path / "run")}


def test_eval_every_logs_metrics(tmp_path):
    _, rows = _eval_run(tmp_path)
    for key in ("eval/fid", "eval/sfid", "eval/inception_score", "eval/precision", "eval/recall"):
        assert key in rows[2] and math.isfinite(rows[2][key]), key
    assert rows[2]["eval/fid"] > 0


def test_non_finite_samples_skip_the_evaluation_counted(tmp_path):
    """A guidance scale that overflows (1e38) gives NaN latents on both ranks: decoded they were black
    images, and the FID of those was logged as the model's. Now the evaluation is skipped, with the
    count of such samples over all ranks logged and a warning."""
    proc, rows = _eval_run(tmp_path, ["train.eval_cfg_scale=1e38"])
    assert rows[2]["eval/nonfinite_samples"] == 12
    assert not any(k in rows[2] for k in ("eval/fid", "eval/sfid", "eval/inception_score"))
    assert "evaluation at step 2 skipped: 12 of 12 samples came out non-finite" in proc.stderr


def test_eval_needs_reference_and_network(tmp_path):
    npz = digits_npz(tmp_path / "digits.npz", n=60)
    proc = train(tmp_path / "run", npz, ["train.steps=2", "train.eval_every=2"], check=False)
    assert proc.returncode != 0 and "train.eval_reference" in proc.stderr


def test_what_sampling_needs_is_checked_before_the_first_step(tmp_path):
    """A VAE missing on this machine, or an evaluation file that does not exist, stops the run at
    start-up on every rank with the key named: not at the first sample grid, on rank 0 alone,
    after ``train.sample_every`` steps of training."""
    import shutil

    from data_prep.encode import encode_dataset
    from data_prep.fixtures import save_tiny_vae, write_test_image_folder

    root, _ = write_test_image_folder(tmp_path / "imgs", per_class=2)
    vae = save_tiny_vae(tmp_path / "vae")
    encode_dataset(root, tmp_path / "lat", 16, str(vae), "mds", 4, batch_size=4, progress=False)
    latents = [f"data.path={tmp_path / 'lat'}", "data.format=mds", "data.global_batch_size=2",
               "model.input_size=8", "model.in_channels=4", "model.num_classes=2", "train.steps=4",
               "train.ckpt_every=0", "train.sample_every=2", "train.sample_steps=2", "train.sample_classes=[0,1]"]
    # the VAE is there: the run samples its grids through it
    train(tmp_path / "ok", tmp_path / "unused.npz", latents, nproc=2)
    assert len(list((tmp_path / "ok" / "samples").glob("step_00000002_*.png"))) == 2

    shutil.rmtree(vae)  # as on a node whose cache lacks the dataset's VAE
    proc = train(tmp_path / "novae", tmp_path / "unused.npz", latents, nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "train.sample_every=2 decode samples through the dataset's encoder" in proc.stderr
    assert str(vae) in proc.stderr
    assert not (tmp_path / "novae" / "metrics.jsonl").exists()  # before the first step

    npz = digits_npz(tmp_path / "digits.npz", n=60)
    proc = train(tmp_path / "noref", npz, ["train.steps=2", "train.eval_every=2",
                                           f"train.eval_reference={tmp_path / 'missing.npz'}",
                                           f"train.eval_inception={tmp_path / 'missing.pth'}"], nproc=2, check=False,
                 timeout=120)
    assert proc.returncode != 0
    assert f"no such file: train.eval_reference={tmp_path / 'missing.npz'}, train.eval_inception=" in proc.stderr
    assert not (tmp_path / "noref" / "metrics.jsonl").exists()
