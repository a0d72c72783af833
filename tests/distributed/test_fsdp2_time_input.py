"""FSDP2's bf16 parameters must not round the timestep the model is given.

Under DDP and one process (bf16 autocast) the time embedder receives ``t`` in fp32. FSDP2's root
used to cast every floating forward input to ``param_dtype``, so under FSDP2 (the configs' default
backend) ``t`` reached the time embedder rounded to bf16 (8 bits: 0.7431 -> 0.7422) and the two
backends trained on different timesteps. The latents may still go to bf16: the model brings them
to its weights' dtype itself."""
import textwrap

from tests.helpers.runs import torchrun_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from types import SimpleNamespace
    from mpdit_dist.distributed.env import DistInfo
    from mpdit_dist.distributed.parallelize import apply_fsdp2
    from mpdit_dist.models import create_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    pcfg = SimpleNamespace(hsdp_replicas=1, reshard_after_forward=True, param_dtype="bf16", reduce_dtype="fp32",
                           cpu_offload=False)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), backend="gloo")
    for time_embed in ("fno", "mlp"):
        model = create_model("custom", stages=[(4, 1), (2, 1)], hidden_size=32, num_heads=2, input_size=8,
                             num_classes=5, num_condition_tokens=2, attention="math", time_embed=time_embed)
        apply_fsdp2(model, info, pcfg, mixed_precision=True)
        seen = {}
        model.t_embedder.register_forward_pre_hook(lambda m, args: seen.update(t=args[0].clone()))
        model.stages[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[1].dtype))
        x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 3])
        t = torch.tensor([0.7431234, 0.0123457])
        out = model(x, t, y)
        out.float().square().mean().backward()  # the backward of the uncast t path runs too
        assert seen["t"].dtype == torch.float32, (time_embed, seen["t"].dtype)
        assert torch.equal(seen["t"], t), (time_embed, seen["t"].tolist(), t.tolist())
        assert seen["x"] == torch.bfloat16, (time_embed, seen["x"])  # the compute still runs in bf16
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    dist.barrier()
    if dist.get_rank() == 0:
        print("T-FP32-OK")
    dist.destroy_process_group()
    """
)


def test_fsdp2_gives_the_time_embedder_fp32_timesteps(tmp_path):
    torchrun_script(tmp_path, SCRIPT, "T-FP32-OK")
