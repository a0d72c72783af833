"""Wrap a plain MPDiT from outside: activation checkpointing -> per-block compile -> FSDP2 | DDP.

The model stays a plain ``nn.Module``; the order follows torchtitan: checkpoint wrappers first
(so compile sees them), then ``torch.compile`` of each block (regional compilation keeps compile
time low and the graphs reusable across the identical blocks), then ``fully_shard`` per block,
per stage and the root last.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from ..models import MPDiT
from .env import DistInfo

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = tuple(_DTYPES)  # what parallel.param_dtype and parallel.reduce_dtype accept (config.validate)


def _replace_blocks(model: MPDiT, fn) -> None:
    for stage in model.stages:
        for i, block in enumerate(stage.blocks):
            stage.blocks[i] = fn(i, block)


def apply_activation_checkpointing(model: MPDiT, mode: str, every: int = 2) -> None:
    """``full``: every block; ``every_n``: every ``every``-th block (counted over all stages)."""
    if mode == "none":
        return
    counter = iter(range(10**9))

    def wrap(_i, block):
        k = next(counter)
        if mode == "full" or (mode == "every_n" and k % every == 0):
            return checkpoint_wrapper(block, preserve_rng_state=False)
        return block

    _replace_blocks(model, wrap)


def apply_compile(model: MPDiT, mode: str | None = None, scope: str = "blocks") -> None:
    """``blocks``: regional compilation, each block on its own (fullgraph); compiles fast and
    suits FSDP2's per-block wrapping. ``model``: the whole forward, which also fuses the glue
    between blocks, the stage entries and the FNO time embedder's small fp32 ops. Under FSDP2
    (wrapped after this) FSDP2's hooks are excluded from tracing (``torch._dynamo.disable``) and
    run eagerly, so the gathers and the casts of each block stay FSDP2's and the compiled pieces
    fuse what lies between them. Both compile in place (``Module.compile``), so parameter names do not change."""
    if scope == "model":
        model.compile(mode=mode)
        return
    for block in model.blocks():
        block.compile(fullgraph=True, mode=mode)


def build_mesh(dist_info: DistInfo, hsdp_replicas: int):
    from torch.distributed.device_mesh import init_device_mesh

    device_type = dist_info.device.type
    world = dist_info.world_size
    if hsdp_replicas > 1:
        if world % hsdp_replicas:
            raise ValueError(f"parallel.hsdp_replicas={hsdp_replicas} does not divide the world size {world}")
        return init_device_mesh(device_type, (hsdp_replicas, world // hsdp_replicas), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))


def apply_fsdp2(model: MPDiT, dist_info: DistInfo, pcfg, mixed_precision: bool) -> None:
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(dist_info, pcfg.hsdp_replicas)
    kwargs = {"mesh": mesh, "reshard_after_forward": pcfg.reshard_after_forward}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=_DTYPES[pcfg.param_dtype], reduce_dtype=_DTYPES[pcfg.reduce_dtype]
        )
    if pcfg.cpu_offload:
        # pinned host memory is a CUDA allocation: a CPU run (its weights are in host memory
        # already) offloads without it, so the same code path runs in the CPU tests
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dist_info.device.type == "cuda")
    for stage in model.stages:
        for block in stage.blocks:
            fully_shard(block, **kwargs)
        fully_shard(stage, **kwargs)
    # the root holds the embedders, shared modulation and final layer; never reshard it after
    # forward: backward needs it at once. It leaves its inputs as they come: a cast of every
    # floating input would round the timestep t to bf16 before the time embedder (fp32 under DDP
    # and autocast); the model itself brings the latents to its weights' dtype.
    root_kwargs = dict(kwargs, reshard_after_forward=False)
    if mixed_precision:
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=_DTYPES[pcfg.param_dtype], reduce_dtype=_DTYPES[pcfg.reduce_dtype], cast_forward_inputs=False
        )
    fully_shard(model, **root_kwargs)


def describe_wrappers(model: MPDiT) -> str:
    """What :func:`apply_checkpointing_and_compile` did, for the run's log."""
    blocks = model.blocks()
    ac = sum(isinstance(b, CheckpointWrapper) for b in blocks)
    compiled = sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    whole = getattr(model, "_compiled_call_impl", None) is not None
    return (f"activation checkpointing on {ac} of {len(blocks)} blocks; compiled: "
            + ("the whole forward" if whole else f"{compiled} of {len(blocks)} blocks"))


def apply_checkpointing_and_compile(model: MPDiT, pcfg, backend: str) -> None:
    """The wrappers every backend takes, in place: activation checkpointing, then compile. (The
    DeepSpeed engine is built around the model after them, as FSDP2 and DDP are.)"""
    apply_activation_checkpointing(model, pcfg.activation_checkpointing, pcfg.ac_every)
    if pcfg.compile:
        if pcfg.compile_scope == "model" and backend == "deepspeed":
            raise ValueError("parallel.compile_scope=model is not supported with deepspeed: use blocks")
        apply_compile(model, pcfg.compile_mode, pcfg.compile_scope)


def parallelize(model: MPDiT, pcfg, dist_info: DistInfo, backend: str, mixed_precision: bool) -> nn.Module:
    """Apply the configured wrappers; returns the module the trainer calls."""
    apply_checkpointing_and_compile(model, pcfg, backend)
    if backend == "fsdp2":
        apply_fsdp2(model, dist_info, pcfg, mixed_precision)
        return model
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        # the only buffers are the fixed sin-cos position tables, built alike on every rank: no
        # broadcast of them before each forward (DDP's default)
        return DDP(model, device_ids=ids, output_device=ids[0] if ids else None, broadcast_buffers=False)
    return model
