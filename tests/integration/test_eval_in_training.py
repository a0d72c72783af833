"""In-training evaluation on the demo's data with a small randomly initialised feature network."""
import math

import numpy as np
import torch

from tests.helpers.runs import digits_npz, train


def test_eval_every_logs_metrics(tmp_path):
    from mpdit_dist.inception import random_feature_net
    from mpdit_dist.tracking import read_metrics

    npz = digits_npz(tmp_path / "digits.npz", n=120)
    with np.load(npz) as z:  # the reference batch: real digits as ADM-format uint8 images
        ref = ((z["x"][:40].transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    torch.save(random_feature_net(0, input_size=75).state_dict(), tmp_path / "inception.pth")
    train(tmp_path / "run", npz, ["train.steps=2", "train.ckpt_every=0", "train.eval_every=2",
                                  "train.eval_num_samples=12", "train.sample_steps=2",
                                  f"train.eval_reference={tmp_path / 'ref.npz'}",
                                  f"train.eval_inception={tmp_path / 'inception.pth'}", "train.eval_input_size=75"],
          nproc=2)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    for key in ("eval/fid", "eval/sfid", "eval/inception_score", "eval/precision", "eval/recall"):
        assert key in rows[2] and math.isfinite(rows[2][key]), key
    assert rows[2]["eval/fid"] > 0


def test_eval_needs_reference_and_network(tmp_path):
    npz = digits_npz(tmp_path / "digits.npz", n=60)
    proc = train(tmp_path / "run", npz, ["train.steps=2", "train.eval_every=2"], check=False)
    assert proc.returncode != 0 and "train.eval_reference" in proc.stderr
