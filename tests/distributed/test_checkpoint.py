"""Sharded, atomic checkpoints under real crashes (SIGKILL), damage and world-size changes (FSDP2)."""
import shutil

import pytest
import torch

from tests.helpers.runs import losses, train

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
    train(run, npz, COMMON + ["train.steps=7"], nproc=0)
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
    assert not list((run / "checkpoints").glob("tmp-*"))
    wa, _ = _weights(run)
    wb, _ = _weights(reference)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
