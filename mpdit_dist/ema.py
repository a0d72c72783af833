"""Exponential moving average of the weights, sharded like the weights.

The EMA keeps one tensor per parameter, cloned from the parameter itself: under FSDP2 that is a
DTensor with the same sharding, so no rank ever holds the whole EMA; under DDP or one process it
is a plain tensor. Updates run on the local shards with one ``torch._foreach_lerp_``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

_WRAPPER_TOKENS = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def clean_name(name: str) -> str:
    """Parameter name without the wrappers' prefixes (activation checkpointing, compile, DDP)."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, start_step: int = 0):
        self.decay = decay
        self.warmup = warmup
        self.start_step = start_step
        # FSDP2 registers the unsharded tensors as the parameters while a module is unsharded (the
        # root after a forward without backward): reshard first, so these are the sharded DTensors
        _reshard(model)
        self.names = [clean_name(n) for n, _ in model.named_parameters()]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in model.parameters()]

    def decay_at(self, step: int) -> float:
        """Decay for the update after optimizer step ``step`` (1-based). With warm-up the decay
        grows as (1 + n) / (10 + n) until it reaches ``decay``: a short run's EMA is not stuck near
        the initial weights."""
        if step <= self.start_step:
            return 0.0  # copy the weights until EMA starts
        if not self.warmup:
            return self.decay
        n = step - self.start_step
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        _reshard(model)  # the sharded parameters, not an unsharded copy (see __init__)
        params = [local_tensor(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_([local_tensor(s) for s in self.shadow], params, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def _require_all(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._require_all(state)
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow):
                src = state[name]
                if src is not s:
                    local_tensor(s).copy_(local_tensor(src))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (shard by shard), e.g. to sample.

        Under FSDP2 the copies go into the sharded parameters, so every FSDP module is resharded on
        the way in and out: an unsharded copy left by a forward without backward (the root, or any
        module with ``reshard_after_forward=False``) would otherwise keep the other weights, and the
        next forward would use them without gathering again. The parameters are listed after
        that reshard: while a module is unsharded FSDP2 registers its unsharded tensors as the
        parameters, whose storage the reshard frees."""
        _reshard(model)
        params = list(model.parameters())
        with torch.no_grad():
            backup = [local_tensor(p.detach()).clone() for p in params]
            for p, s in zip(params, self.shadow):
                local_tensor(p.detach()).copy_(local_tensor(s))
        try:
            yield model
        finally:
            _reshard(model)
            with torch.no_grad():
                for p, b in zip(params, backup):
                    local_tensor(p.detach()).copy_(b)


def _reshard(model: nn.Module) -> None:
    """Free the unsharded parameters of every FSDP2 module of ``model`` (no-op without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
