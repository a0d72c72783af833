"""The sampling CLI's resume bookkeeping and argument checks, on a tiny exported model (CPU, in process)."""
import json

import numpy as np
import pytest
import torch

from mpdit_dist.export import save_exported
from mpdit_dist.models import MPDiT
from mpdit_dist.models.mpdit import ModelArgs
from mpdit_dist.sample import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    args = ModelArgs(stages=((4, 1), (2, 1)), hidden_size=32, num_heads=2, input_size=8, in_channels=3,
                     num_classes=6, num_condition_tokens=4)
    manifest = {"num_classes": 6, "encoder": {"id": "identity"}, "latent_mean": [0.0] * 3, "latent_std": [1.0] * 3}
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_exported(MPDiT(args), path, {"manifest": manifest, "step": 1, "config": {"data": {"normalize": True}}})


def _sample(weights, out, *extra):
    main(["--checkpoint", str(weights), "--num-samples", "6", "--batch-size", "2", "--steps", "2", "--seed", "1",
          "--device", "cpu", "--out", str(out), "--keep-parts", *extra])
    with np.load(out) as z:
        return z["arr_0"], z["arr_1"]


def test_other_classes_discard_the_parts_of_an_earlier_job(tmp_path, weights, capsys):
    """A rerun into the same --out with other --classes starts afresh (as for any other setting);
    it used to sample every missing part with the new classes and then refuse the merge."""
    out = tmp_path / "s.npz"
    _, first = _sample(weights, out, "--classes", "0,1")
    assert set(first.tolist()) <= {0, 1}
    (out.with_name(out.name + ".parts") / "part_000002.npz").unlink()  # an interrupted job
    img, lab = _sample(weights, out, "--classes", "4,5")
    assert set(lab.tolist()) <= {4, 5} and len(lab) == 6
    err = capsys.readouterr().err
    assert "holds 2 parts sampled with other settings (classes: [0, 1] -> [4, 5]); discarding them" in err
    assert json.loads(out.with_suffix(".json").read_text())["classes"] == [4, 5]
    # the same samples as a fresh job with those classes
    fresh_img, fresh_lab = _sample(weights, tmp_path / "fresh.npz", "--classes", "4,5")
    assert np.array_equal(lab, fresh_lab) and np.array_equal(img, fresh_img)


def test_negative_seed_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(tmp_path / "missing"), "--device", "cpu", "--seed", "-1"])
    assert exc.value.code == 2
    assert "--seed must be at least 0, got -1" in capsys.readouterr().err
