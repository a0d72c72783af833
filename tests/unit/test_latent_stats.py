"""``data.latent_stats``: which per-channel statistics standardise the latents.

``measured`` (the default): the dataset manifest's, measured over the encoded latents. ``official``:
the fixed constants the official MPDiT code standardises raw SD-VAE latents with (its train.py and
sample.py), what the paper recipes in ``configs/`` train with. The choice travels with the run:
trainer.json and exports record the statistics used, so sampling decodes with them; a resume with
the other choice is refused; a warm start from weights trained with other statistics is warned.
"""
import json

import numpy as np
import pytest
import torch

from mpdit_dist.config import ConfigError, DataConfig
from mpdit_dist.data import build_loader
from mpdit_dist.data.manifest import OFFICIAL_LATENT_MEAN, OFFICIAL_LATENT_STD, with_latent_stats
from tests.helpers.runs import train

SD = ["model.in_channels=4", "model.input_size=8", "optim.warmup_steps=0", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def sd_npz(tmp_path_factory):
    """48 latents of 4 channels, 8x8, with SD-VAE-like raw scale (per-channel means 5, 3, 0, -2)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(48, 4, 8, 8)) * 4 + np.array([5.0, 3.0, 0.0, -2.0])[None, :, None, None])
    path = tmp_path_factory.mktemp("sd") / "sd.npz"
    np.savez(path, x=x.astype(np.float32), y=np.arange(48) % 10, num_classes=10)
    return path, x.astype(np.float32)


def test_official_statistics_standardise_the_batches(sd_npz):
    path, x = sd_npz
    for which, mean, std in (("official", OFFICIAL_LATENT_MEAN, OFFICIAL_LATENT_STD), ("measured", None, None)):
        cfg = DataConfig(format="memory", path=str(path), global_batch_size=8, num_workers=0, shuffle=False,
                         latent_stats=which)
        loader = build_loader(cfg, rank=0, world_size=1, seed=0)
        batch = next(iter(loader))
        if which == "measured":  # the manifest's own, measured over x
            mean, std = loader.manifest["latent_mean"], loader.manifest["latent_std"]
            assert abs(mean[0] - 5.0) < 0.5 and "latent_stats_source" not in loader.manifest
        else:
            assert loader.manifest["latent_stats_source"].startswith("official")
            assert abs(loader.manifest["measured_latent_mean"][0] - 5.0) < 0.5
        m = torch.tensor(mean).view(1, 4, 1, 1)
        s = torch.tensor(std).view(1, 4, 1, 1)
        raw = torch.from_numpy(x[[int(k) for k in batch["keys"]]])
        torch.testing.assert_close(batch["x"], (raw - m) / s, rtol=1e-5, atol=1e-5)


def test_official_statistics_need_sd_vae_latents_and_normalisation():
    manifest = {"latent_mean": [0.0, 0.0, 0.0], "latent_std": [1.0, 1.0, 1.0], "encoder": {"id": "identity"}}
    with pytest.raises(ConfigError, match=r"data.latent_stats=official: the official constants are for SD-VAE "
                                          r"latents of 4 channels, the dataset has 3 \(encoder 'identity'\)"):
        with_latent_stats(manifest, "official")
    assert with_latent_stats(manifest, "measured") is manifest


def test_a_run_records_them_refuses_the_other_at_resume_and_warns_a_warm_start(sd_npz, tmp_path):
    path, _ = sd_npz
    run = tmp_path / "official"
    train(run, path, SD + ["train.steps=2", "data.latent_stats=official"])
    tstate = json.loads((run / "checkpoints" / "step_00000002" / "trainer.json").read_text())
    assert tstate["manifest"]["latent_mean"] == OFFICIAL_LATENT_MEAN  # what sampling and export decode with
    assert tstate["config"]["data"]["latent_stats"] == "official"

    proc = train(run, path, SD + ["train.steps=3"], check=False)  # the default: measured
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("was trained with data.latent_stats=official, this run has data.latent_stats=measured"
            in proc.stderr), proc.stderr[-2000:]

    proc = train(run, path, SD + ["train.steps=2", "data.latent_stats=other"], check=False)
    assert proc.returncode == 2 and "data.latent_stats='other': choose measured or official" in proc.stderr
    proc = train(run, path, SD + ["train.steps=2", "data.latent_stats=official", "data.normalize=false"], check=False)
    assert proc.returncode == 2 and "data.latent_stats=official with data.normalize=false" in proc.stderr

    warm = tmp_path / "warm"
    proc = train(warm, path, SD + ["train.steps=1", f"train.init_from={run}"])
    assert "trained on latents standardised with other statistics" in proc.stderr, proc.stderr[-2000:]
    same = tmp_path / "same"
    proc = train(same, path, SD + ["train.steps=1", f"train.init_from={run}", "data.latent_stats=official"])
    assert "other statistics" not in proc.stderr
