"""Run under torchrun by test_deepspeed.py: the sharded EMA under DeepSpeed, checked from inside.

``torchrun --nproc_per_node N ds_ema_swap_check.py RUN_DIR NPZ STAGE [ds.json]``: trains 3 steps
with the real Trainer, then checks on every rank that
- inside ``ema.swapped_into`` the engine computes what a plain model holding the EMA weights
  computes (so the EMA, not the live weights, is in, persistent ZeRO-3 parameters included);
- after it, the engine computes exactly what it computed before (the live weights are back);
- the EMA differs from the live weights (so the first check can fail);
- before that, after the steps: an inf in one rank's partition of the weights stops every rank (the
  divergence check before a save).
Prints ``EMA-SWAP-OK`` on rank 0 when all hold.
"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mpdit_dist import config as C  # noqa: E402
from mpdit_dist.distributed.env import shutdown  # noqa: E402
from mpdit_dist.models import MPDiT  # noqa: E402
from mpdit_dist.trainer import Trainer, TrainingDiverged, _leave  # noqa: E402
from tests.helpers.runs import TINY  # noqa: E402


def check_divergence_sees_partitions(tr: Trainer) -> None:
    """The divergence check before a save looks at this rank's ZeRO-3 partition of the weights (the
    parameters themselves are empty between steps): an inf in one rank's partition stops every rank."""
    none_seen = torch.full((), -1, dtype=torch.long)
    tr._stop_if_diverged(none_seen, weights=True)  # all finite: returns on every rank
    partitioned = [p for p in tr.raw_model.parameters() if p.numel() == 0 and p.ds_tensor.numel()]
    assert partitioned, "no partitioned parameter after a step: the check below would be void"
    part = partitioned[0].ds_tensor.view(-1)
    kept = part[0].item()
    if tr.dist.rank == tr.dist.world_size - 1:
        part[0] = float("inf")
    try:
        tr._stop_if_diverged(none_seen, weights=True)
        raise AssertionError("a non-finite ZeRO-3 weight partition went unnoticed")
    except TrainingDiverged:
        pass
    part[0] = kept


def main() -> None:
    run_dir, npz, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = [f"parallel.deepspeed_config={sys.argv[4]}"] if len(sys.argv) > 4 else []
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), TINY + [
        f"data.path={npz}", "train.steps=3", "train.ckpt_every=0", "optim.warmup_steps=0",
        "parallel.backend=deepspeed", f"parallel.zero_stage={stage}", "data.micro_batch_size=3", *extra])
    tr = Trainer(cfg, run_dir, resume="never")
    try:
        tr.build()
        it = iter(tr.loader)
        for _ in range(3):
            tr.train_step(next(it))
        check_divergence_sees_partitions(tr)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(4, *tr.sample_shape, generator=g)
        t = torch.rand(4, generator=g)
        y = torch.tensor([0, 3, 7, 10])
        with torch.no_grad():
            live_before = tr.model(x, t, y)
            with tr.ema.swapped_into(tr.raw_model):
                with_ema = tr.model(x, t, y)
            live_after = tr.model(x, t, y)
            ref = MPDiT(tr.model_args)
            full = {n: s.full_tensor().view(shape) for n, s, shape in zip(tr.ema.names, tr.ema.shadow, tr.ema.shapes)}
            ref.load_state_dict(full)
            want = ref(x, t, y)
        assert torch.equal(live_after, live_before), "live weights not restored after the EMA swap"
        torch.testing.assert_close(with_ema, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(with_ema, live_before, atol=1e-4), "EMA equals the live weights: check is void"

        if tr.dist.is_main:
            print("EMA-SWAP-OK", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
    _leave(0)  # as train.py under several ranks: no interpreter teardown, where gloo ranks abort now and then
