"""Shared helpers for the data-loader tests."""
import torch

from mpdit_dist.data import build_loader


def encoded_digits(tmp, size: int, limit: int, formats: str, per_shard: int):
    """``limit`` digits at ``size`` px, encoded by the identity encoder into ``tmp/data`` (``formats``,
    ``per_shard`` samples per shard; the last shard may be short)."""
    from data_prep.encode import encode_dataset
    from data_prep.fixtures import write_digits_image_folder

    folder = write_digits_image_folder(tmp / "images", size=size, limit=limit)
    encode_dataset(folder, tmp / "data", size, "identity", formats, per_shard, progress=False)
    return tmp / "data"


def global_batches(cfg, world, steps, seed=0, state=None):
    """Run ``world`` simulated ranks for ``steps`` steps; returns ([(keys, x, y) per global step], loaders)."""
    loaders = [build_loader(cfg, rank=r, world_size=world, seed=seed) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        parts = [next(ld) for ld in loaders]
        out.append(([k for p in parts for k in p["keys"]], torch.cat([p["x"] for p in parts]),
                    torch.cat([p["y"] for p in parts])))
    return out, loaders
