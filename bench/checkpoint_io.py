"""Checkpoint save and verification time with the checksum work shared by the ranks, against one
process doing it alone (what rank 0 did before). Not a timed test.

    python bench/checkpoint_io.py [--ranks 2] [--mb 1024] [--dir DIR] [--json out.json]

Starts ``--ranks`` gloo processes on the CPU; each holds ``--mb / --ranks`` MB of fp32 tensors (its
shard of a model, EMA and optimizer state) and saves them with ``CheckpointManager.save``. Then it
times, on the written checkpoint:

* ``manifest, shared``: the checksums (and fsyncs) of a save, each rank reading its share;
* ``manifest, one process``: the same work by rank 0 alone while the others wait;
* ``verify, shared`` and ``verify, one process``: the resume's verification, the same way.

The files were just written, so they are read from the page cache: the figures are the CPU cost of
CRC32 and the syscalls, the part that sharing divides. On a parallel file system with cold caches
the reads themselves are shared too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpdit_dist import checkpoint as ck  # noqa: E402


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, root: str, mb: float, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    n = int(mb * 2**20 / world / 4 / 8)
    tensors = {f"rank{rank}.t{i}": torch.randn(n) for i in range(8)}  # 8 tensors of this rank's shard
    m = ck.CheckpointManager(Path(root), rank=rank)
    t = {"save (sync, total)": _timed(lambda: m.save(1, tensors, {"step": 1, "world_size": world}))}
    d = m.root / ck.step_dir_name(1)
    t["manifest, shared"] = _timed(lambda: m._shared_manifest(d))
    t["manifest, one process"] = _timed(
        lambda: rank == 0 and [ck._checksum_file(d / rel, sync=True) for rel, _ in ck._listing(d)])
    t["verify, shared"] = _timed(lambda: m._shared_verify(d))
    t["verify, one process"] = _timed(lambda: rank == 0 and ck.verify(d))
    if rank == 0:
        size = sum(s for _, s in ck._listing(d))
        Path(out).write_text(json.dumps({"ranks": world, "bytes": size, "files": len(ck._listing(d)),
                                         "seconds": t}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mb", type=float, default=1024.0, help="total tensor MB over all ranks")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(tmp) / "result.json"
        mp.start_processes(_worker, args=(args.ranks, port, str(Path(tmp) / "run"), args.mb, str(out)),
                           nprocs=args.ranks, start_method="spawn")
        res = json.loads(out.read_text())
    gb = res["bytes"] / 1e9
    print(f"{res['ranks']} ranks, {res['files']} files, {gb:.2f} GB")
    print(f"| {'step':<24} | {'s':>7} | {'GB/s':>6} |")
    print(f"| {'-' * 24} | {'-' * 7} | {'-' * 6} |")
    for name, sec in res["seconds"].items():
        print(f"| {name:<24} | {sec:7.2f} | {gb / sec:6.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
