"""Latent shard readers: exactly-once, resumable global batches from MDS, WebDataset or memory.

Public API::

    loader = build_loader(cfg.data, rank=r, world_size=W, seed=cfg.train.seed, run_dir=run_dir)
    batch = next(loader)            # {"x": (G/W, C, H, W) float32, "y": (G/W,) int64, "keys": [...]}
    state = loader.state_dict()     # small, JSON-able, the same on every rank
    loader.load_state_dict(state)   # any world size with the same global batch
    loader.manifest, loader.steps_per_epoch, loader.epoch
    read_manifest(path); normalize(x, manifest); denormalize(x, manifest)
"""
from .loader import ShardLoader, build_loader, read_audit
from .manifest import denormalize, normalize, read_manifest
from .order import GlobalOrder, sample_seed
from .sources import MDSSource, MemorySource, WDSSource, open_source

__all__ = [
    "GlobalOrder", "MDSSource", "MemorySource", "ShardLoader", "WDSSource", "build_loader", "denormalize",
    "normalize", "open_source", "read_audit", "read_manifest", "sample_seed",
]
