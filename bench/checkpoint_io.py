"""Checkpoint save, publish and resume-verification time with the checksum work shared by the ranks.
Not a timed test.

    python bench/checkpoint_io.py [--ranks 2] [--mb 1024] [--dir DIR] [--json out.json]
                                  [--checkpoint-module OTHER/checkpoint.py]

Starts ``--ranks`` gloo processes on the CPU; each holds ``--mb / --ranks`` MB of fp32 tensors (its
shard of a model, EMA and optimizer state) and times, between barriers:

* ``save (sync, total)``: ``CheckpointManager.save`` end to end (DCP write, checksums and fsyncs,
  manifest, rename, retention);
* ``publish (finalize)``: making an async save visible once its write has finished: the barrier,
  the checksums and fsyncs, the manifest, the rename;
* ``find_latest (verify)``: a resume's choice of checkpoint, a fresh manager verifying the newest;
* with this repository's module, the parts alone: ``manifest, shared`` against ``manifest, one
  process`` (rank 0 reading every file while the others wait, what a save did before), and
  ``verify, shared`` against ``verify, one process``.

``--checkpoint-module`` times another version of ``mpdit_dist/checkpoint.py`` (e.g. the rank-0-only
one: ``git show 6230502^:mpdit_dist/checkpoint.py > /tmp/old/checkpoint.py``), imported as a module
of the ``mpdit_dist`` package, for the first three lines.

The files were just written, so they are read from the page cache: the figures are the CPU cost of
CRC32 and the syscalls, the part that sharing divides. On a parallel file system with cold caches
the reads themselves are shared too.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpdit_dist.distributed.env import free_port  # noqa: E402


def _checkpoint_module(path: str | None):
    if not path:
        from mpdit_dist import checkpoint

        return checkpoint
    import mpdit_dist  # noqa: F401 - the package its relative imports resolve in

    spec = importlib.util.spec_from_file_location("mpdit_dist._bench_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, root: str, mb: float, module: str | None, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    ck = _checkpoint_module(module)
    n = int(mb * 2**20 / world / 4 / 8)
    tensors = {f"rank{rank}.t{i}": torch.randn(n) for i in range(8)}  # 8 tensors of this rank's shard
    m = ck.CheckpointManager(Path(root), rank=rank)
    t = {"save (sync, total)": _timed(lambda: m.save(1, tensors, {"step": 1, "world_size": world}))}
    m.save(2, tensors, {"step": 2, "world_size": world}, async_save=True)
    m._pending[3].result()  # the write is on disk: what is left is the publish
    t["publish (finalize)"] = _timed(m.finalize)
    found = {}
    t["find_latest (verify)"] = _timed(lambda: found.setdefault("path", ck.CheckpointManager(Path(root), rank=rank)
                                                                .find_latest()))
    d = m.root / ck.step_dir_name(2)
    assert found["path"] == d, found
    if hasattr(m, "_shared_manifest"):
        t["manifest, shared"] = _timed(lambda: m._shared_manifest(d))
        t["manifest, one process"] = _timed(
            lambda: rank == 0 and [ck._checksum_file(d / rel, sync=True) for rel, _ in ck._listing(d)])
        t["verify, shared"] = _timed(lambda: m._shared_verify(d))
        t["verify, one process"] = _timed(lambda: rank == 0 and ck.verify(d))
    if rank == 0:
        files = [p for p in d.rglob("*") if p.is_file() and p.name != "COMPLETE.json"]
        Path(out).write_text(json.dumps({"ranks": world, "module": module or "mpdit_dist/checkpoint.py",
                                         "bytes": sum(p.stat().st_size for p in files), "files": len(files),
                                         "seconds": t}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mb", type=float, default=1024.0, help="total tensor MB over all ranks")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--json", default=None)
    p.add_argument("--checkpoint-module", default=None,
                   help="time this checkpoint.py instead of mpdit_dist/checkpoint.py (e.g. an older version)")
    args = p.parse_args()
    module = str(Path(args.checkpoint_module).resolve()) if args.checkpoint_module else None
    if args.dir:  # a --dir that does not exist yet is created, as for any output path
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        port = free_port()
        out = Path(tmp) / "result.json"
        mp.start_processes(_worker, args=(args.ranks, port, str(Path(tmp) / "run"), args.mb, module, str(out)),
                           nprocs=args.ranks, start_method="spawn")
        res = json.loads(out.read_text())
    gb = res["bytes"] / 1e9
    print(f"{res['module']}: {res['ranks']} ranks, {res['files']} files, {gb:.2f} GB a checkpoint")
    print(f"| {'step':<24} | {'s':>7} | {'GB/s':>6} |")
    print(f"| {'-' * 24} | {'-' * 7} | {'-' * 6} |")
    for name, sec in res["seconds"].items():
        print(f"| {name:<24} | {sec:7.2f} | {gb / sec:6.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
