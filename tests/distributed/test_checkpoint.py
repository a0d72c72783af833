"""Sharded, atomic checkpoints under real crashes (SIGKILL), damage and world-size changes (FSDP2)."""
import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers.runs import attempt as record, losses, spawn_ranks, train

COMMON = ["parallel.backend=fsdp2", "train.ckpt_every=2", "checkpoint.keep_last=3", "data.audit=true"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, npz):
    """The uninterrupted 2-rank run: 10 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(run, npz, COMMON + ["train.steps=10"], nproc=2)
    return run


def _weights(run, ema=False):
    from mpdit_dist.export import load_checkpoint_weights

    model, _, info = load_checkpoint_weights(run_dir=str(run), use_ema=ema)
    return model.state_dict(), info["step"]


def _audit(run):
    """{step: sorted keys trained on at that step, over all ranks}."""
    from mpdit_dist.data import read_audit

    out = {}
    for steps in read_audit(str(run)).values():
        for step, keys in steps.items():
            out.setdefault(step, []).extend(keys)
    return {s: sorted(k) for s, k in out.items()}


def test_sigkill_anywhere_then_resume_is_exact(tmp_path, npz, reference):
    run = tmp_path / "run"
    # killed right after step 3 (last checkpoint: step 2)
    assert train(run, npz, COMMON + ["train.steps=10"], nproc=2, fault="step:3", check=False).returncode != 0
    # killed in the middle of saving step 6 (DCP shards written, no COMPLETE.json, not renamed)
    assert train(run, npz, COMMON + ["train.steps=10"], nproc=2, fault="save:6", check=False).returncode != 0
    assert (run / "checkpoints" / "tmp-step_00000006").is_dir()
    assert not (run / "checkpoints" / "step_00000006").exists()
    train(run, npz, COMMON + ["train.steps=10"], nproc=2)
    assert not list((run / "checkpoints").glob("tmp-*"))
    # every step once, the same losses bit for bit, the same weights and EMA
    assert losses(run) == losses(reference)
    for ema in (False, True):
        (a, sa), (b, sb) = _weights(run, ema), _weights(reference, ema)
        assert sa == sb == 10
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_damaged_newest_falls_back(tmp_path, npz, reference, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / "step_00000010"
    victim = next(p for p in sorted(newest.glob("*.distcp")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = train(run, npz, COMMON + ["train.steps=12"], nproc=2)
    assert "step_00000010 is damaged" in proc.stderr and "checksum" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000008" in proc.stderr
    got, ref = losses(run), losses(reference)
    assert [got[s] for s in (9, 10)] == [ref[s] for s in (9, 10)]
    assert max(got) == 12


def test_world_size_2_to_1_to_3(tmp_path, npz, reference):
    run = tmp_path / "run"
    train(run, npz, COMMON + ["train.steps=4"], nproc=2)
    proc = train(run, npz, COMMON + ["train.steps=7"], nproc=0)
    assert "written by 2 ranks, this run has 1: RNG states not restored" in proc.stderr
    train(run, npz, COMMON + ["train.steps=10"], nproc=3)
    got, ref = losses(run), losses(reference)
    assert sorted(got) == list(range(1, 11))
    for s in ref:  # other reduction orders: equal to float32 rounding
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
    # the same samples at every step, whatever the number of ranks
    a, b = _audit(run), _audit(reference)
    assert sorted(a) == sorted(b) == list(range(10))
    for step in range(10):
        assert a[step] == b[step] and len(a[step]) == 12, step
    wa, _ = _weights(run)
    wb, _ = _weights(reference)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_changed_global_batch_is_refused(tmp_path, npz, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = train(run, npz, COMMON + ["train.steps=12", "data.global_batch_size=6"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "data.global_batch_size=12" in proc.stderr and "allow_batch_change" in proc.stderr


def test_export_matches_across_backends(tmp_path, npz, reference):
    """A 1-process plain run and the 2-rank FSDP2 run export the same weights."""
    from safetensors.torch import load_file

    from mpdit_dist.export import main as export_main

    plain = tmp_path / "plain"
    train(plain, npz, ["train.steps=10", "train.ckpt_every=10"])
    export_main([str(plain), "--out", str(tmp_path / "plain.safetensors"), "--ema"])
    export_main([str(reference), "--out", str(tmp_path / "fsdp2.safetensors"), "--ema"])
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "fsdp2.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_async_save_and_retention(tmp_path, npz, reference):
    """dcp.async_save on its own gloo group gives the same run; keep_last + keep_every milestones."""
    run = tmp_path / "run"
    train(run, npz, COMMON + ["train.steps=10", "checkpoint.async_save=true", "checkpoint.keep_last=2",
                              "checkpoint.keep_every=4"], nproc=2)
    assert losses(run) == losses(reference)
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert steps == [4, 8, 10]  # the last two (8, 10) and the milestones (4, 8)
    assert not list((run / "checkpoints").glob("tmp-*")) and not list((run / "checkpoints").glob("deleting-*"))
    wa, _ = _weights(run)
    wb, _ = _weights(reference)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_finished_async_save_survives_a_crash(tmp_path, npz, reference):
    """An async checkpoint whose write finished but which was not made visible yet (killed before
    its manifest and rename) is made visible at the next start, not deleted."""
    run = tmp_path / "run"
    common = COMMON + ["train.steps=10", "checkpoint.async_save=true"]
    # the finalisation of step 4 runs at the save of step 6, after step 4's write; killed there
    assert train(run, npz, common, nproc=2, fault="save:4", check=False).returncode != 0
    assert (run / "checkpoints" / "tmp-step_00000004" / ".metadata").is_file()
    assert not (run / "checkpoints" / "step_00000004").exists()
    proc = train(run, npz, common, nproc=2)
    assert "renamed to step_00000004" in proc.stderr, proc.stderr[-3000:]
    assert str(run / "checkpoints" / "step_00000004") in proc.stderr and "at step 4" in proc.stderr
    assert losses(run) == losses(reference)
    assert not list((run / "checkpoints").glob("tmp-*"))


# ------------------------------------------------------------------------------------------------
# Errors on rank 0 reach every rank (2 gloo ranks, real files)
# ------------------------------------------------------------------------------------------------

PG_TIMEOUT_S = 20  # a rank left waiting for rank 0 fails only after this
PROMPT_S = 8


def _rank0_errors_worker(rank, port, root, out):
    from mpdit_dist.checkpoint import COMPLETE, CheckpointManager

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    root = Path(root)
    results = {}

    def attempt(name, fn):
        record(results, name, fn)

    def tensors():
        return {"w": torch.arange(4.0)}

    def state(step):
        return {"step": step, "world_size": 2}

    try:
        # a checkpoint path that does not exist
        m = CheckpointManager(root / "a", rank=rank)
        attempt("load_missing", lambda: m.load(m.root / "step_00000100", tensors()))
        # find_latest: an unreadable file (EIO) stops the resume (no fallback: that would roll back)
        m = CheckpointManager(root / "b", rank=rank)
        m.save(1, tensors(), state(1))
        m.save(2, tensors(), state(2))
        if rank == 0:
            (m.root / "step_00000002" / COMPLETE).unlink()
            (m.root / "step_00000002" / COMPLETE).symlink_to("/proc/self/mem")
        attempt("find_latest_eio", m.find_latest)
        # ... and when every checkpoint is damaged, an error on every rank
        if rank == 0:
            (m.root / "step_00000002" / COMPLETE).unlink()
            (m.root / "step_00000001" / COMPLETE).unlink()
        attempt("find_latest_all_damaged", m.find_latest)
        # the manifest cannot be written when an async save is made visible
        m = CheckpointManager(root / "c", rank=rank)
        m.save(3, tensors(), state(3), async_save=True)
        if rank == 0:
            (m.root / "tmp-step_00000003" / (COMPLETE + ".tmp")).mkdir()
        attempt("finalize_manifest", m.finalize)
        # rank 0 cannot create the checkpoint directory
        m = CheckpointManager(root / "d", rank=rank)
        if rank == 0:
            m.root.parent.mkdir(parents=True)
            m.root.write_text("not a directory")
        attempt("save_mkdir", lambda: m.save(4, tensors(), state(4)))
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def test_rank0_errors_raise_on_every_rank_promptly(tmp_path):
    """What rank 0 alone does (verify, manifest, renames) fails on rank 0 alone: the other rank must
    raise the same error at once, not wait at the next collective until the process-group timeout."""
    out = tmp_path / "out"
    out.mkdir()
    spawn_ranks(_rank0_errors_worker, (str(tmp_path / "runs"), str(out)), nprocs=2, deadline_s=10 * PG_TIMEOUT_S)
    r = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    names = ["load_missing", "find_latest_eio", "find_latest_all_damaged", "finalize_manifest", "save_mkdir"]
    for rank in (0, 1):
        assert list(r[rank]) == names, r[rank]
        for name, (_, _, seconds) in r[rank].items():
            assert seconds < PROMPT_S, (rank, name, r[rank][name])
    for rank in (0, 1):
        kind, msg, _ = r[rank]["load_missing"]
        assert kind == "CheckpointError" and "step_00000100 is damaged: COMPLETE.json missing" in msg, msg
        kind, msg, _ = r[rank]["find_latest_eio"]
        assert kind == "CheckpointError" and "step_00000002 could not be read (unreadable: [Errno 5]" in msg, msg
        kind, msg, _ = r[rank]["find_latest_all_damaged"]
        assert kind == "CheckpointError" and "every checkpoint" in msg, msg
        assert "step_00000002 (COMPLETE.json missing" in msg and "step_00000001 (COMPLETE.json missing" in msg, msg
        kind, msg, _ = r[rank]["finalize_manifest"]
        want = "IsADirectoryError" if rank == 0 else "CheckpointError"
        assert kind == want and "COMPLETE.json.tmp" in msg, (kind, msg)
        kind, msg, _ = r[rank]["save_mkdir"]
        assert kind != "returned" and (rank == 0 or "rank 0 failed" in msg), (kind, msg)


def test_retention_never_leaves_a_half_deleted_checkpoint(tmp_path):
    """Retention renames a checkpoint to ``deleting-*`` before removing it, so a crash part-way leaves
    no half-deleted ``step_*`` that looks like a checkpoint; the next start removes the rest."""
    from mpdit_dist.checkpoint import CheckpointManager, list_checkpoints

    ckpt = CheckpointManager(tmp_path / "run", keep_last=1)
    for step in (2, 4):
        (ckpt.root / f"step_{step:08d}" / "model").mkdir(parents=True)
        (ckpt.root / f"step_{step:08d}" / "model" / "shard").write_bytes(b"x")
    ckpt._retain(4)
    assert [s for s, _ in list_checkpoints(ckpt.root)] == [4] and sorted(os.listdir(ckpt.root)) == ["step_00000004"]
    # what a crash in the middle of a deletion leaves
    (ckpt.root / "deleting-step_00000002" / "model").mkdir(parents=True)
    ckpt.clean_partial()
    assert sorted(os.listdir(ckpt.root)) == ["step_00000004"]
