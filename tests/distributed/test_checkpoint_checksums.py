"""The checksum work of a checkpoint is shared by all ranks (2 gloo ranks, real files): each file is
read by exactly one rank at a save and the manifest is the one a single process writes; damage in any
rank's share is found at resume, with the verdict a single reader gives; an error on one rank (I/O or
other) raises on every rank at once, naming the rank and the file. Without a process group the
manager works as one process, as before."""
import datetime
import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mpdit_dist import checkpoint as ck
from tests.helpers.runs import attempt as record, spawn_ranks

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
    # any listing: every file once, each share sorted, the same split for any order of the listing,
    # and no share more than one file (the largest) above another
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        files = [(f"d{rng.randint(0, 2)}/f{i}", rng.choice([0, 1, rng.randint(1, 10**9)]))
                 for i in range(rng.randint(0, 30))]
        shares = ck.split_by_size(files, n)
        shuffled = files[:]
        rng.shuffle(shuffled)
        assert ck.split_by_size(shuffled, n) == shares and len(shares) == n
        assert sorted(f for share in shares for f in share) == sorted(f for f, _ in files)
        assert all(share == sorted(share) for share in shares)
        sizes = dict(files)
        loads = [sum(sizes[f] for f in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes.values(), default=0), (files, n, loads)


def test_one_process_without_a_group(tmp_path, caplog, monkeypatch):
    """No process group: the manager does what it did before, every file read by this one process."""
    assert not dist.is_initialized()
    assert ck.all_gather_object({"a": 1}) == [{"a": 1}]
    m = ck.CheckpointManager(tmp_path / "run")
    for step in (1, 2):
        m.save(step, {"w": torch.full((100,), float(step))}, {"step": step, "world_size": 1})
    step1, step2 = (m.root / ck.step_dir_name(s) for s in (1, 2))
    alone = tmp_path / "alone"
    shutil.copytree(step2, alone)
    (alone / ck.COMPLETE).unlink()
    ck.write_manifest(alone)
    assert (alone / ck.COMPLETE).read_text() == (step2 / ck.COMPLETE).read_text()
    assert ck.verify(step2) is None and m.find_latest() == step2
    victim = sorted(json.loads((step2 / ck.COMPLETE).read_text())["files"])[-1]
    flip(step2 / victim)
    assert ck.verify(step2) == m._shared_verify(step2) == f"{victim} checksum mismatch"
    with caplog.at_level("WARNING"):
        assert ck.CheckpointManager(tmp_path / "run").find_latest() == step1
    assert f"{step2} is damaged ({victim} checksum mismatch)" in caplog.text
    # a file that cannot be read at a save: an error naming it
    real = ck._checksum_file

    def failing(path, sync=False):
        if Path(path).name == "trainer.json":
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(path, sync)

    monkeypatch.setattr(ck, "_checksum_file", failing)
    with pytest.raises(ck.CheckpointError, match=r"rank 0: trainer.json: \[Errno 5\] Input/output error \(injected\)"):
        m.save(3, {"w": torch.zeros(4)}, {"step": 3, "world_size": 1})
    assert (m.root / "tmp-step_00000003").is_dir() and not (m.root / "step_00000003").exists()


def flip(path):
    """Damage ``path`` in place, size unchanged: one byte in the middle inverted."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _worker(rank, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    root = Path(root)
    results = {}
    read = []  # (file, bytes) this rank checksummed
    real_checksum = ck._checksum_file
    fail_on_rank1 = {"on": False, "kind": OSError}
    unreadable = {"name": None}  # a file no rank can read

    def counting(path, sync=False):
        if rank == 1 and fail_on_rank1["on"]:
            if fail_on_rank1["kind"] is OSError:  # like a failed read(): the error names no file
                raise OSError(errno.EIO, "Input/output error (injected)")
            raise fail_on_rank1["kind"]("injected")
        if Path(path).name == unreadable["name"]:
            raise OSError(errno.EIO, "Input/output error (injected)")
        info = real_checksum(path, sync)
        read.append((str(path), info["size"]))
        return info

    ck._checksum_file = counting

    def attempt(name, fn):
        record(results, name, fn)

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
            flip(step2 / victim)
        results["victim"] = victim
        attempt("find_latest_damaged", m.find_latest)
        # several problems in both shares: the shared verdict is the one verify() gives alone (the
        # first file by name), whatever share each problem falls in
        shares = ck.split_by_size(ck._listing(step2), 2)
        other = shares[0][0]  # damaged too, in rank 0's share
        if rank == 0:
            flip(step2 / other)
        dist.barrier()
        verdicts = []
        for bad in (None, other, victim):  # and one of the two unreadable
            unreadable["name"] = bad and Path(bad).name
            verdicts.append([m._shared_verify(step2), ck.verify(step2) if rank == 0 else None])
        unreadable["name"] = None
        results["verdicts"] = verdicts
        results["other"] = other
        results["victim_in"] = [victim in share for share in shares]
        # an I/O error on rank 1 while checksumming a save: every rank raises promptly, naming the
        # rank and the file (the injected error, like a failed read(), names none itself)
        fail_on_rank1["on"] = True
        m2 = ck.CheckpointManager(root / "run2", rank=rank)
        tmp2 = m2.root / ("tmp-" + ck.step_dir_name(1))
        attempt("save_eio", lambda: m2.save(1, tensors(1), {"step": 1, "world_size": 2}))
        results["save_eio_share1"] = ck.split_by_size(ck._listing(tmp2), 2)[1]
        # any other error there too (no rank is left waiting at the next collective)
        fail_on_rank1["kind"] = MemoryError
        m4 = ck.CheckpointManager(root / "run4", rank=rank)
        attempt("save_other", lambda: m4.save(1, tensors(1), {"step": 1, "world_size": 2}))
        fail_on_rank1["kind"] = OSError
        # ... and while verifying at resume: the resume stops (unreadable), no fallback
        fail_on_rank1["on"] = False
        m3 = ck.CheckpointManager(root / "run3", rank=rank)
        m3.save(1, tensors(1), {"step": 1, "world_size": 2})
        fail_on_rank1["on"] = True
        attempt("find_latest_eio", m3.find_latest)
        results["find_latest_eio_share1"] = ck.split_by_size(ck._listing(m3.root / ck.step_dir_name(1)), 2)[1]
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
    # ... and the manifest is what one process computes alone (but for the bytes the test flipped)
    victim, other = r[0]["victim"], r[0]["other"]
    for rel, info in manifest.items():
        assert (ck._checksum_file(step2 / rel) == info) == (rel not in (victim, other)), rel
    # the untouched checkpoint: its manifest, byte for byte, is the one write_manifest writes alone
    step1 = step2.with_name("step_00000001")
    alone = tmp_path / "alone"
    shutil.copytree(step1, alone)
    (alone / ck.COMPLETE).unlink()
    ck.write_manifest(alone)
    assert (alone / ck.COMPLETE).read_text() == (step1 / ck.COMPLETE).read_text()

    # the verdict with problems in both shares is verify()'s, on every rank: the first file by name
    assert r[0]["victim_in"] == [False, True]
    first = min(victim, other)
    (none, none1), (other_bad, other_bad1), (victim_bad, victim_bad1) = r[0]["verdicts"]
    assert r[1]["verdicts"] == [[none, None], [other_bad, None], [victim_bad, None]]
    assert none == none1 == f"{first} checksum mismatch"
    assert other_bad == other_bad1 and victim_bad == victim_bad1
    first_bad, second_bad = (other_bad, victim_bad) if first == other else (victim_bad, other_bad)
    # the first file unreadable: the resume stops; the second one unreadable: the first one's
    # mismatch is found first, and the resume falls back (an unreadable file does not always win)
    assert first_bad.startswith(ck.UNREADABLE) and f"({first})" in first_bad, first_bad
    assert second_bad == f"{first} checksum mismatch", second_bad

    share1 = r[0]["save_eio_share1"]
    for rank in (0, 1):
        kind, msg, _ = r[rank]["find_latest_damaged"]
        assert kind == "returned" and msg.endswith("step_00000001"), (rank, kind, msg)
        kind, msg, seconds = r[rank]["save_eio"]
        assert kind == "CheckpointError" and "rank 1" in msg and "injected" in msg, (rank, msg)
        assert f"{share1[0]}: " in msg, (rank, share1, msg)  # the file is named
        assert seconds < PROMPT_S, (rank, seconds)
        kind, msg, seconds = r[rank]["save_other"]
        assert kind == "CheckpointError" and "rank 1" in msg and "MemoryError: injected" in msg, (rank, msg)
        assert share1[0] in msg and seconds < PROMPT_S, (rank, msg, seconds)
        kind, msg, seconds = r[rank]["find_latest_eio"]
        assert kind == "CheckpointError" and "could not be read (unreadable:" in msg and "injected" in msg, (rank, msg)
        assert r[0]["find_latest_eio_share1"][0] in msg, (rank, msg)
        assert seconds < PROMPT_S, (rank, seconds)
