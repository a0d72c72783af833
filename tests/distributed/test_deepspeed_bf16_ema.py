"""DeepSpeed bf16: the EMA averages the optimizer's fp32 masters, not the bf16 working weights.

ZeRO-3 kept its EMA on the fp32 master partitions from the start; ZeRO 0/1/2 averaged the bf16
working copies (rounded to 8 bits of mantissa: after 3 steps 6e-4 away from the masters on the tiny
model, and a step smaller than half a bf16 spacing does not move them at all). ZeRO 1/2 keep each
rank's masters as fragments of a flat partition laid out by parameter groups, which the EMA now
averages in place and assembles only to save or swap in; these tests check the values, the
per-step update, the load into the fragments, the swap, and resuming a bf16 run on the same and
on another number of ranks.

Slow: each torchrun process spends 10-20 s importing DeepSpeed and building the engine.
"""
import shutil
import subprocess

import pytest
import torch

from tests.helpers.runs import REPO, TORCHRUN, env, losses, train
from tests.distributed.test_deepspeed import ckpt, exported

pytestmark = pytest.mark.slow

BF16 = ["parallel.backend=deepspeed", "data.micro_batch_size=3", "train.precision=bf16", "optim.warmup_steps=0",
        "train.steps=6", "train.ckpt_every=3"]


@pytest.mark.parametrize("stage", [0, 2])  # ZeRO 0: whole masters; 2 (as 1): fragments
def test_ema_follows_the_fp32_masters(stage, tmp_path, npz):
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tests/distributed/ds_bf16_ema_check.py"),
                           str(tmp_path / "run"), str(npz), str(stage)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "BF16-EMA-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_bf16_zero2_resume_keeps_the_ema(tmp_path, npz):
    """The EMA saved from the fragments of 2 ranks comes back into them: resumed on 2 ranks the run
    is bitwise the uninterrupted one. On 1 rank (another fragment layout, through DCP's resharding
    and the universal checkpoint) with the EMA held still (decay 1) it is saved at step 6 exactly
    as it was loaded at step 3. (With the EMA moving, 1 rank and 2 differ by up to 1e-3 after 3
    steps: bf16 accumulation in another order, Adam's first steps moving each weight by about lr.)"""
    full = tmp_path / "full"
    train(full, npz, BF16 + ["parallel.zero_stage=2"], nproc=2)
    same = tmp_path / "same"
    train(same, npz, BF16 + ["parallel.zero_stage=2", "--resume", str(ckpt(full, 3))], nproc=2)
    want = losses(full)
    assert losses(same) == {s: want[s] for s in (4, 5, 6)}
    a, b = exported(full, tmp_path, ema=True), exported(same, tmp_path, ema=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    source = tmp_path / "source"
    shutil.copytree(ckpt(full, 3), source)
    one = tmp_path / "one"
    train(one, npz, BF16 + ["parallel.zero_stage=2", "ema.decay=1.0", "ema.warmup=false", "--resume", str(source)])
    assert sorted(losses(one)) == [4, 5, 6]
    loaded, kept = exported(source, tmp_path, ema=True), exported(one, tmp_path, ema=True)
    assert not all(torch.equal(loaded[k], a[k]) for k in a), "the EMA did not move after step 3: the check is void"
    for k in loaded:
        assert torch.equal(kept[k], loaded[k]), k


def test_zero0_masters_of_the_fused_optimizer_are_found():
    """ZeRO 0 with bf16 and DeepSpeed's fused Adam (a user JSON's ``"optimizer": {"type": "AdamW"}``,
    CUDA only) keeps one flat fp32 master per group (``fp32_groups_flat``), not one per parameter
    (``fp32_groups``, the unfused optimizer the suite runs): the EMA takes views of it, in the group's
    order, so it follows the masters there too (it fell back to the bf16 copies)."""
    from types import SimpleNamespace

    from mpdit_dist.distributed.deepspeed_backend import _unpartitioned_masters

    params = [torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    flat = torch.arange(10, dtype=torch.float32)
    masters = _unpartitioned_masters(SimpleNamespace(fp16_groups=[params], fp32_groups_flat=[flat]))
    assert torch.equal(masters[id(params[0])], flat[:6].view(2, 3)) and torch.equal(masters[id(params[1])], flat[6:])
    flat.add_(1)  # views: an optimizer step (or a checkpoint load, in place) is seen
    assert masters[id(params[1])][0].item() == 7.0
    unfused = [torch.ones(2, 3), torch.ones(4)]
    masters = _unpartitioned_masters(SimpleNamespace(fp16_groups=[params], fp32_groups=[unfused]))
    assert masters[id(params[0])] is not None and torch.equal(masters[id(params[1])], unfused[1])
    assert _unpartitioned_masters(None) == {} and _unpartitioned_masters(SimpleNamespace()) == {}
