"""A DeepSpeed checkpoint resumed with another precision or ZeRO stage: refused before anything is
read, with an error that names the checkpoint and the setting with both values.

DeepSpeed writes a bf16 run's optimizer state into other files (``bf16_zero_pp_rank_*``) with
other contents than an fp32 run's, so ``train.precision`` bf16 -> fp32 used to stop deep inside
DeepSpeed with ``FileNotFoundError: .../zero_pp_rank_0_mp_rank_00_optim_states.pt`` (and fp32 ->
bf16 with ``KeyError: 'dynamic_loss_scale'``), after the EMA had been loaded.
"""
import json

import pytest

from tests.helpers.runs import losses, train

pytestmark = pytest.mark.slow

DS = ["parallel.backend=deepspeed", "data.micro_batch_size=3", "train.ckpt_every=2", "parallel.zero_stage=1"]


def test_other_precision_or_zero_stage_is_refused_before_loading(tmp_path, npz):
    from mpdit_dist.checkpoint import write_manifest

    run = tmp_path / "run"
    train(run, npz, DS + ["train.steps=2", "train.precision=bf16"], nproc=2)
    ckpt = run / "checkpoints" / "step_00000002"

    def refused(overrides: list[str]) -> str:
        proc = train(run, npz, DS + ["train.steps=3"] + overrides, nproc=2, check=False)
        assert proc.returncode != 0
        assert losses(run).keys() == {1, 2}
        return proc.stderr

    err = refused(["train.precision=fp32"])
    assert (f"checkpoint {ckpt} was written by DeepSpeed with bf16.enabled=True, this run has bf16.enabled=False "
            f"(train.precision=bf16 there, fp32 here)") in err, err[-3000:]
    assert "Resume with train.precision=bf16" in err and "FileNotFoundError" not in err
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["deepspeed"] == {"zero_stage": 1, "bf16": True, "fp16": False}  # what the engine ran
    err = refused(["train.precision=bf16", "parallel.zero_stage=2"])
    assert (f"checkpoint {ckpt} was written with parallel.zero_stage=1, this run has parallel.zero_stage=2"
            in err), err[-3000:]

    # a checkpoint written before the engine's settings were recorded: its config tells
    del state["deepspeed"]
    (ckpt / "trainer.json").write_text(json.dumps(state))
    write_manifest(ckpt)
    err = refused(["train.precision=fp32"])
    assert f"checkpoint {ckpt} was written by DeepSpeed with bf16.enabled=True" in err, err[-3000:]


@pytest.mark.parametrize("saved_ac, resumed_ac", [("none", "full"), ("full", "none")])
def test_activation_checkpointing_switched_with_another_world_size(tmp_path, npz, saved_ac, resumed_ac):
    """2 ranks -> 1 (DeepSpeed's universal checkpoint, one folder per parameter, named as the saving
    model named it) with activation checkpointing switched on or off, which wraps the blocks and so
    the parameter names: the run continues as the plain one-process run (weights and optimizer
    state: two steps after the resume). It used to stop in DeepSpeed with ``FileNotFoundError:
    .../deepspeed_universal/ds/zero/stages.0.blocks.0._checkpoint_wrapped_module.attn.qkv.weight``
    (switched on) or ``AssertionError: Steps [...] are not equal`` (switched off)."""
    common = ["train.ckpt_every=2", "optim.warmup_steps=0", "data.micro_batch_size=3"]
    plain = tmp_path / "plain"
    train(plain, npz, common + ["train.steps=4"])
    run = tmp_path / "run"
    ds = common + ["parallel.backend=deepspeed", "parallel.zero_stage=1"]
    train(run, npz, ds + ["train.steps=2", f"parallel.activation_checkpointing={saved_ac}"], nproc=2)
    proc = train(run, npz, ds + ["train.steps=4", f"parallel.activation_checkpointing={resumed_ac}"])
    assert "written by 2 ranks, this run has 1: loading it through DeepSpeed's universal format" in proc.stderr
    got, ref = losses(run), losses(plain)
    assert sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
