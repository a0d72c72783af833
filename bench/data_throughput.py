"""Latents/s of the shard loaders (MDS and WebDataset) from local disk. Not a timed test.

    python bench/data_throughput.py [--samples 20000] [--batch 256] [--seconds 4] [--store sample|moments]

Writes a synthetic dataset of 32x32x4 fp16 latents with data_prep's writer (both formats), then
reads global batches with ``build_loader`` for a fixed time and prints latents/s:

* ``workers=0``: one process doing everything (reading, decoding, drawing, normalising,
  collating) with one torch thread, as inside a DataLoader worker: the per-process rate;
* ``workers=W``: W DataLoader worker processes feeding the trainer process (what training uses);
  on a machine with few cores this adds little or nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.encode import write_latents  # noqa: E402
from mpdit_dist.config import DataConfig  # noqa: E402
from mpdit_dist.data import build_loader  # noqa: E402


def measure(root: Path, fmt: str, batch: int, seconds: float, workers: int) -> float:
    cfg = DataConfig(format=fmt, path=str(root), global_batch_size=batch, num_workers=workers,
                     prefetch_factor=4 if workers else 2, pin_memory=True)
    loader = build_loader(cfg, rank=0, world_size=1, seed=0)
    for _ in range(3):  # warm-up: worker start, file opens, page cache
        next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(loader)["x"].shape[0]
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def main() -> None:
    torch.set_num_threads(1)  # what a DataLoader worker uses; more threads only contend on small CPUs
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--store", choices=("sample", "moments"), default="sample")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write the dataset (default: a temp dir)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.samples, 4, 32, 32)
    if args.store == "sample":
        latents = {"latent": rng.standard_normal(shape, dtype=np.float32).astype(np.float16)}
    else:
        latents = {"mean": rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
                   "std": np.full(shape, 0.05, dtype=np.float16)}
    labels = rng.integers(0, 1000, args.samples)
    if args.dir:  # a --dir that does not exist yet is created, as for any output path
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "bench"
        t0 = time.perf_counter()
        write_latents(root, latents, labels, [str(i) for i in range(1000)], samples_per_shard=2000)
        print(f"wrote {args.samples} latents (4x32x32 fp16, store={args.store}) in both formats "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        results = {}
        for fmt in ("mds", "wds"):
            for workers in (0, args.workers):
                rate = measure(root, fmt, args.batch, args.seconds, workers)
                results[f"{fmt}/workers={workers}"] = round(rate)
                print(f"{fmt:4s} workers={workers}: {rate:10,.0f} latents/s", flush=True)
        print(json.dumps({"store": args.store, "batch": args.batch, "cpus": os.cpu_count(), "latents_per_s": results}))


if __name__ == "__main__":
    main()
