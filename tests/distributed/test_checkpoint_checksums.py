"""The checksum work of a checkpoint is shared by all ranks (2 gloo ranks, real files): each file is
read by exactly one rank at a save, damage in any rank's share is found at resume, and an I/O error on
one rank raises on every rank at once, naming the rank and the file."""
import datetime
import errno
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mpdit_dist import checkpoint as ck
from tests.helpers.runs import spawn_ranks

PG_TIMEOUT_S = 20
PROMPT_S = 8


def test_split_by_size_is_balanced_and_deterministic():
    files = [(f"f{i}", size) for i, size in enumerate([100, 90, 50, 40, 30, 20, 10, 5, 5, 0])]
    shares = ck.split_by_size(files, 3)
    assert shares == ck.split_by_size(list(reversed(files)), 3)  # independent of the listing order
    assert sorted(f for share in shares for f in share) == sorted(f for f, _ in files)  # each file once
    sizes = dict(files)
    loads = [sum(sizes[f] for f in share) for share in shares]
    assert max(loads) - min(loads) <= 10 and sum(loads) == 350, loads
    assert ck.split_by_size(files, 1) == [sorted(f for f, _ in files)]
    assert ck.split_by_size([("a", 1)], 4) == [["a"], [], [], []]  # more ranks than files


def _worker(rank, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    root = Path(root)
    results = {}
    read = []  # (file, bytes) this rank checksummed
    real_checksum = ck._checksum_file
    fail_on_rank1 = {"on": False}

    def counting(path, sync=False):
        if rank == 1 and fail_on_rank1["on"]:
            raise OSError(errno.EIO, "Input/output error (injected)", str(path))
        info = real_checksum(path, sync)
        read.append((str(path), info["size"]))
        return info

    ck._checksum_file = counting

    def attempt(name, fn):
        dist.barrier()
        t0 = time.monotonic()
        try:
            results[name] = ["returned", str(fn()), 0.0]
        except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
            results[name] = [type(exc).__name__, str(exc), 0.0]
        results[name][2] = time.monotonic() - t0

    def tensors(step):  # sharded like FSDP: each rank holds its own rows, several files
        return {f"w{i}": torch.full((64 * (i + 1),), float(step * 10 + rank)) for i in range(4)}

    try:
        m = ck.CheckpointManager(root / "run", rank=rank)
        m.save(1, tensors(1), {"step": 1, "world_size": 2})
        read.clear()
        m.save(2, tensors(2), {"step": 2, "world_size": 2})
        results["save_read"] = list(read)
        # the newest is damaged in a file of rank 1's share: found, and the resume falls back
        step2 = m.root / "step_00000002"
        victim = ck.split_by_size(ck._listing(step2), 2)[1][0]
        if rank == 0:
            with open(step2 / victim, "r+b") as f:
                f.seek(os.path.getsize(step2 / victim) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
        results["victim"] = victim
        attempt("find_latest_damaged", m.find_latest)
        # an I/O error on rank 1 while checksumming a save: every rank raises promptly
        fail_on_rank1["on"] = True
        m2 = ck.CheckpointManager(root / "run2", rank=rank)
        attempt("save_eio", lambda: m2.save(1, tensors(1), {"step": 1, "world_size": 2}))
        # ... and while verifying at resume: the resume stops (unreadable), no fallback
        fail_on_rank1["on"] = False
        m3 = ck.CheckpointManager(root / "run3", rank=rank)
        m3.save(1, tensors(1), {"step": 1, "world_size": 2})
        fail_on_rank1["on"] = True
        attempt("find_latest_eio", m3.find_latest)
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def test_checksums_are_shared_and_errors_reach_every_rank(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    spawn_ranks(_worker, (str(tmp_path / "runs"), str(out)), nprocs=2, deadline_s=10 * PG_TIMEOUT_S)
    r = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    # the save: every file of the checkpoint read exactly once, by one of the two ranks, both working
    step2 = tmp_path / "runs" / "run" / "checkpoints" / "step_00000002"
    manifest = json.loads((step2 / ck.COMPLETE).read_text())["files"]
    read = [Path(p).name for rank in (0, 1) for p, _ in r[rank]["save_read"]]
    assert sorted(read) == sorted(Path(rel).name for rel in manifest)
    assert all(r[rank]["save_read"] for rank in (0, 1)), "a rank checksummed nothing"
    # ... and the manifest is what one process computes alone (but for the byte the test flipped)
    victim = r[0]["victim"]
    for rel, info in manifest.items():
        assert (ck._checksum_file(step2 / rel) == info) == (rel != victim), rel

    for rank in (0, 1):
        kind, msg, _ = r[rank]["find_latest_damaged"]
        assert kind == "returned" and msg.endswith("step_00000001"), (rank, kind, msg)
        kind, msg, seconds = r[rank]["save_eio"]
        assert kind == "CheckpointError" and "rank 1" in msg and "injected" in msg, (rank, msg)
        assert seconds < PROMPT_S, (rank, seconds)
        kind, msg, seconds = r[rank]["find_latest_eio"]
        assert kind == "CheckpointError" and "could not be read (unreadable:" in msg and "injected" in msg, (rank, msg)
        assert seconds < PROMPT_S, (rank, seconds)
