"""EMA under FSDP2 when the root is left unsharded by a forward without backward.

FSDP2 registers the unsharded tensors as a module's parameters while it is unsharded; the root
(``reshard_after_forward=False``) stays so after a no-grad forward. ``EMA.swapped_into`` listed
the parameters before resharding and then cloned tensors whose storage the reshard had freed: a
segmentation fault (or the EMA copied into a throw-away tensor)."""
import textwrap

from tests.helpers.runs import torchrun_script

SCRIPT = textwrap.dedent(
    """
    import copy, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from mpdit_dist.ema import EMA
    from mpdit_dist.models import create_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = create_model("custom", stages=[(4, 1), (2, 1)], hidden_size=32, num_heads=2, input_size=8,
                         num_classes=5, num_condition_tokens=2, attention="math")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    plain = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for stage in model.stages:
        for block in stage.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(stage, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)

    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        model(x, t, y)  # the root stays unsharded: it holds the unsharded tensors as parameters
    ema = EMA(model, decay=0.5, warmup=False)
    assert all(hasattr(s, "to_local") for s in ema.shadow), "EMA built from unsharded parameters"
    with torch.no_grad():
        for s in ema.shadow:
            s.to_local().mul_(0.5)
        for p, s in zip(plain.parameters(), ema.shadow):
            p.copy_(s.full_tensor())
        want_ema = plain(x, t, y)
        raw = model(x, t, y)  # root unsharded again
        with ema.swapped_into(model):
            got_ema = model(x, t, y)
        after = model(x, t, y)
        model(x, t, y)
        ema.update(model, step=1)  # with the root unsharded: still the sharded parameters
    assert not torch.allclose(want_ema, raw)
    torch.testing.assert_close(got_ema, want_ema, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, raw, rtol=0, atol=0)
    if dist.get_rank() == 0:
        print("EMA-FSDP-OK")
    dist.destroy_process_group()
    """
)


def test_ema_swap_after_nograd_forward_under_fsdp2(tmp_path):
    torchrun_script(tmp_path, SCRIPT, "EMA-FSDP-OK")
