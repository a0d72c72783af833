"""Run under torchrun by test_deepspeed_bf16_ema.py: under DeepSpeed bf16 the EMA follows the
optimizer's fp32 masters, not the bf16 working weights, at ZeRO 0, 1 and 2.

``torchrun --nproc_per_node N ds_bf16_ema_check.py RUN_DIR NPZ STAGE``: trains 3 steps with the real
Trainer (the EMA copying the weights: ``ema.start_step`` beyond them), then checks on every rank that
- the EMA, as saved (``state_dict``, assembled from the ranks' fragments at ZeRO 1/2), is exactly the
  fp32 masters, which differ from the bf16 weights (so the check can fail);
- one more step with decay 0.5 moves it exactly half-way to the new masters;
- what DCP loads in place into the saved layout reaches the per-step state (ZeRO 1/2: each rank's
  fragments), and a load from other tensors too;
- inside ``swapped_into`` the model holds the EMA (rounded to bf16), and the live weights are back
  exactly after it.
Prints ``BF16-EMA-OK`` on rank 0 when all hold.
"""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mpdit_dist import config as C  # noqa: E402
from mpdit_dist.distributed.env import shutdown  # noqa: E402
from mpdit_dist.trainer import Trainer, _leave  # noqa: E402
from tests.helpers.runs import TINY  # noqa: E402


def masters(tr: Trainer) -> list[torch.Tensor]:
    """The fp32 master of every parameter, whole (collective at ZeRO 1/2)."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = tr.engine.optimizer
    stage0 = {id(p): m for lg, hg in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
              for p, m in zip(lg, hg)}
    out = []
    for p in tr.raw_model.parameters():
        m = stage0.get(id(p)) if stage0 else safe_get_full_fp32_param(p)
        assert m is not None and m.dtype == torch.float32, "no fp32 master: the check would be void"
        out.append(m.detach().clone().view(-1))
    return out


def saved(tr: Trainer) -> list[torch.Tensor]:
    """The EMA as a checkpoint gets it, each parameter whole."""
    sd = tr.ema.state_dict()
    return [sd[n].full_tensor().clone() for n in tr.ema.names]


def main() -> None:
    run_dir, npz, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = C.load_config(str(REPO / "configs/demo.yaml"), TINY + [
        f"data.path={npz}", "train.steps=4", "train.ckpt_every=0", "optim.warmup_steps=0", "train.precision=bf16",
        "parallel.backend=deepspeed", f"parallel.zero_stage={stage}", "data.micro_batch_size=3",
        "ema.start_step=100"])
    tr = Trainer(cfg, run_dir, resume="never")
    try:
        tr.build()
        params = list(tr.raw_model.parameters())
        assert all(p.dtype == torch.bfloat16 for p in params), "not bf16 weights: the check would be void"
        it = iter(tr.loader)
        for _ in range(3):
            tr.train_step(next(it))
        m3, e3 = masters(tr), saved(tr)
        for name, e, m in zip(tr.ema.names, e3, m3):
            assert torch.equal(e, m), f"{name}: EMA is not the fp32 master (max diff {(e - m).abs().max():.3g})"
        assert any(not torch.equal(m, p.detach().float().view(-1)) for m, p in zip(m3, params)), \
            "fp32 masters equal the bf16 weights: the check would be void"

        tr.ema.start_step, tr.ema.decay, tr.ema.warmup = 0, 0.5, False
        tr.train_step(next(it))
        m4, e4 = masters(tr), saved(tr)
        for name, e, before, m in zip(tr.ema.names, e4, e3, m4):
            torch.testing.assert_close(e, before + 0.5 * (m - before), rtol=0, atol=1e-7, msg=lambda s: f"{name}: {s}")

        # a DCP load writes into the saved layout in place; load_state_dict passes it on
        sd = tr.ema.state_dict()
        for s in sd.values():
            s.to_local().zero_()
        for f in tr.ema.frags:
            if f is not None:
                f.fill_(7.0)
        for s, want, (_, start, end) in zip(sd.values(), e4, tr.ema.bounds):
            s.to_local().copy_(want[start:end])
        tr.ema.load_state_dict(sd)
        for name, e, want in zip(tr.ema.names, saved(tr), e4):
            assert torch.equal(e, want), f"{name}: not back after an in-place load"
        # ... and a load from other tensors (plain full ones)
        tr.ema.load_state_dict({n: (w * 0 + 3.0).view(shape) for n, w, shape in zip(tr.ema.names, e4, tr.ema.shapes)})
        assert all(torch.equal(e, torch.full_like(e, 3.0)) for e in saved(tr)), "a load from full tensors was lost"
        tr.ema.load_state_dict({n: w.view(shape) for n, w, shape in zip(tr.ema.names, e4, tr.ema.shapes)})

        live = [p.detach().clone() for p in params]
        with torch.no_grad(), tr.ema.swapped_into(tr.raw_model):
            for name, p, e in zip(tr.ema.names, params, e4):
                assert torch.equal(p.detach().view(-1), e.to(p.dtype)), f"{name}: the EMA is not swapped in"
        for name, p, before in zip(tr.ema.names, params, live):
            assert torch.equal(p.detach(), before), f"{name}: live weight not restored after the swap"
        if tr.dist.is_main:
            print("BF16-EMA-OK", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
    _leave(0)  # as train.py under several ranks: no interpreter teardown, where gloo ranks abort now and then
