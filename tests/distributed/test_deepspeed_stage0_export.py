"""Consolidated weights of a DeepSpeed ZeRO stage 0 checkpoint are the fp32 master weights.

Under bf16, stage 0 keeps bf16 working weights in the module and the fp32 masters in its
mixed-precision optimizer (``fp32_groups``). ``load_consolidated(..., "model")`` (what the
export of raw weights reads) returned the module's bf16 copies, cast to fp32: every weight
rounded to bf16 (up to ~1e-3 off after 4 steps), while its docstring promises the fp32 masters."""
import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import spawn_ranks, train

COMMON = ["train.steps=2", "train.ckpt_every=2", "optim.warmup_steps=0", "parallel.backend=deepspeed",
          "data.micro_batch_size=6", "parallel.zero_stage=0"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_stage0_consolidated_weights_are_fp32_masters(tmp_path, npz, precision):
    from mpdit_dist.distributed.deepspeed_backend import load_consolidated

    run = tmp_path / "run"
    train(run, npz, COMMON + [f"train.precision={precision}"], nproc=2)
    ckpt = run / "checkpoints" / "step_00000002"
    sd = load_consolidated(ckpt, "model")
    (states,) = (ckpt / "deepspeed" / "ds").glob("mp_rank_*_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    module = saved["module"]
    assert sd.keys() == module.keys()
    assert all(v.dtype == torch.float32 and v.shape == module[k].shape for k, v in sd.items())
    if precision == "bf16":
        masters = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
        for (name, got), want in zip(sd.items(), masters):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        # the masters are not the bf16 working copies (which are what the module holds)
        assert any(not torch.equal(v, v.bfloat16().float()) for v in sd.values())
    else:
        for name, got in sd.items():
            torch.testing.assert_close(got, module[name], rtol=0, atol=0, msg=name)


def _one_rank_reads_ema(rank, port, ckpt, out):
    """Rank 0 alone reads the EMA (as one rank of ``torchrun -m mpdit_dist.sample`` retrying after a
    deletion that only it met); rank 1 waits for it at a barrier."""
    import torch.distributed as dist

    from mpdit_dist.distributed.deepspeed_backend import load_consolidated

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    if rank == 0:
        try:
            sd = load_consolidated(ckpt, "ema")
            result = {"sum": {k: float(v.double().sum()) for k, v in sd.items()}}
        except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
            result = {"error": f"{type(exc).__name__}: {exc}"}
        (Path(out) / "rank0.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def test_consolidated_ema_is_read_by_one_process_inside_a_process_group(tmp_path, npz):
    """``load_consolidated(..., "ema")`` reads in this process alone, also where a process group is up:
    its DCP read was collective, so one rank reading (or re-reading) alone waited in a collective the
    other ranks never joined, and the ranks fell out of step."""
    from mpdit_dist.distributed.deepspeed_backend import load_consolidated

    run = tmp_path / "run"
    train(run, npz, COMMON + ["train.precision=fp32"], nproc=2)
    ckpt = run / "checkpoints" / "step_00000002"
    spawn_ranks(_one_rank_reads_ema, (str(ckpt), str(tmp_path)), nprocs=2, deadline_s=120)
    got = json.loads((tmp_path / "rank0.json").read_text())
    want = {k: float(v.double().sum()) for k, v in load_consolidated(ckpt, "ema").items()}
    assert got == {"sum": want}
