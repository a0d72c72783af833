"""DeepSpeed ZeRO (stage 0, 1, 2 or 3) behind the trainer's interface.

What the trainer uses:

- :func:`build_engine`: a DeepSpeed config generated from ours (ZeRO stage, bf16, clipping,
  micro-batch and accumulation), overridden key by key by the user's JSON
  (``parallel.deepspeed_config``); torch's AdamW as the client optimizer (DeepSpeed's fused Adam
  needs a CUDA build, its CPU Adam a C++ build; torch's runs everywhere and is the optimizer of the
  other backends) and a ``LambdaLR`` that the engine steps once per optimizer step.
- :func:`make_ema`: an EMA sharded the way ZeRO-3 shards the weights (see :class:`ShardedEMA`),
  under every stage, so no rank ever holds the whole EMA.
- :func:`tensor_state` / :func:`set_tensor_state`: the part of the checkpoint that goes through
  ``torch.distributed.checkpoint`` (the EMA); :func:`save_engine` / :func:`load_engine`: the
  engine's own sharded files (weights, fp32 master, optimizer, LR schedule) in ``deepspeed/``
  inside the same atomic checkpoint directory. A checkpoint written by another world size is
  converted once to DeepSpeed's universal format (``ds_to_universal``) and loaded with
  ``load_universal``.
- :func:`load_consolidated`: full plain weights on CPU in one process, for export.

Gradient accumulation: the trainer divides each micro-batch's loss by the per-rank batch and calls
``engine.backward`` per micro-batch, ``engine.step`` once per optimizer step. The trainer marks the
last micro-batch with ``engine.set_gradient_accumulation_boundary`` (DeepSpeed counts micro-steps
in ``step()``, which the trainer calls once) and calls ``backward(loss, scale_wrt_gas=False)``
(the loss is already a per-rank mean); ZeRO's average over data-parallel ranks then gives the
global-batch mean, the same gradient as the other backends.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import config as C
from ..checkpoint import on_rank0
from ..ema import EMA, clean_name
from .env import DistInfo

log = logging.getLogger(__name__)

DS_SUBDIR = "deepspeed"  # the engine's files inside a checkpoint directory
DS_TAG = "ds"  # DeepSpeed's tag (sub-directory) inside DS_SUBDIR
UNIVERSAL_SUBDIR = "deepspeed_universal"  # cache of the universal conversion, inside the checkpoint
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


# ------------------------------------------------------------------------------------------------
# Config and engine
# ------------------------------------------------------------------------------------------------

def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` into ``base`` key by key (nested dicts merged, other values replaced)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(cfg: C.Config, world_size: int, micro: int, accum: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of this run: generated from ours, then the user's JSON on top."""
    stage = int(cfg.parallel.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise C.ConfigError(f"parallel.zero_stage={stage}: DeepSpeed ZeRO stages are 0, 1, 2 and 3")
    zero: dict[str, Any] = {"stage": stage}
    ds: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": max(0.0, float(cfg.optim.grad_clip)),
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        # torch's AdamW is on ZeRO's tested list; allow other client optimizers from a user JSON too
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our tracker logs; DeepSpeed's own progress lines would repeat it
        "wall_clock_breakdown": False,
    }
    if bf16:
        # gradients are reduced in parallel.reduce_dtype (fp32 by default, as FSDP2 does), not in
        # DeepSpeed's default, the bf16 of the parameters. (Accumulation stays in the parameters'
        # dtype: fp32 accumulation, data_types.grad_accum_dtype, would swap ZeRO-1's optimizer for
        # DeepSpeed's BF16_Optimizer, with another checkpoint layout; a user's JSON can still ask.)
        ds["communication_data_type"] = cfg.parallel.reduce_dtype
    path = cfg.parallel.deepspeed_config
    if path:
        p = Path(path)
        if not p.is_file():
            raise C.ConfigError(f"parallel.deepspeed_config={path}: file not found")
        try:
            user = json.loads(p.read_text())
        except ValueError as exc:
            raise C.ConfigError(f"parallel.deepspeed_config={path}: not valid JSON ({exc})") from exc
        if not isinstance(user, dict):
            raise C.ConfigError(f"parallel.deepspeed_config={path}: expected a JSON object")
        for key in _BATCH_KEYS:
            # the trainer splits the batch itself; a different split would silently change it
            if key in user and user[key] != ds[key]:
                raise C.ConfigError(
                    f"parallel.deepspeed_config={path} sets {key}={user[key]}, but data.global_batch_size="
                    f"{cfg.data.global_batch_size} and data.micro_batch_size={cfg.data.micro_batch_size} over "
                    f"{world_size} ranks give {ds[key]}: set the batch in our config, not in the JSON"
                )
        user_zero = user.get("zero_optimization")
        user_stage = user_zero.get("stage") if isinstance(user_zero, dict) else None
        if user_stage is not None and user_stage != stage:
            # the config's checks (compile, sharded sampling) and the resume check read
            # parallel.zero_stage: a different stage from the JSON would pass the first and make
            # every resume fail ("written with zero_stage=..., this run has ...")
            raise C.ConfigError(
                f"parallel.deepspeed_config={path} sets zero_optimization.stage={user_stage}, but "
                f"parallel.zero_stage={stage}: set the stage with parallel.zero_stage, not in the JSON"
            )
        ds = _merge(ds, user)
    return ds


def build_engine(model: nn.Module, cfg: C.Config, dist_info: DistInfo, micro: int, accum: int,
                 lr_lambda_fn: Callable[[int], float], bf16: bool):
    """(engine, optimizer, LR scheduler) for ``model`` (plain, on its device, same init on every rank).

    The optimizer is the engine's (ZeRO's wrapper around torch AdamW, or DeepSpeed's own when the
    user's JSON has an ``optimizer`` section); the scheduler is a ``LambdaLR`` over the client
    optimizer (or over DeepSpeed's), stepped by the engine once per optimizer step; the engine's
    own when the user's JSON has a ``scheduler`` section."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(f"parallel.backend=deepspeed needs the DeepSpeed package, which did not import ({exc}); "
                          f"install it with `pip install -e '.[deepspeed]'`, or choose parallel.backend=fsdp2 or ddp") from exc

    from ..trainer import build_optimizer

    ds_cfg = deepspeed_config(cfg, dist_info.world_size, micro, accum, bf16)
    client_opt = sched = None
    if "optimizer" not in ds_cfg:
        client_opt = build_optimizer(model.parameters(), cfg.optim, dist_info.device)
        if "scheduler" not in ds_cfg:
            # built before ZeRO re-groups the parameters: ZeRO keeps the groups' other keys (lr,
            # initial_lr), so the schedule keeps driving the groups the optimizer steps
            sched = torch.optim.lr_scheduler.LambdaLR(client_opt, lr_lambda_fn)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=client_opt, lr_scheduler=sched, config=ds_cfg,
        model_parameters=None if client_opt is not None else model.parameters(),
    )
    if client_opt is None and "scheduler" not in ds_cfg:
        # the user's JSON brings its optimizer but no schedule: ours drives it (warm-up, cosine),
        # over the optimizer whose groups ZeRO steps, and the engine steps it like its own
        scheduler = torch.optim.lr_scheduler.LambdaLR(engine.basic_optimizer, lr_lambda_fn)
        engine.lr_scheduler = scheduler
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        _record_stage0_grad_norm(engine)
    if dist_info.is_main:
        log.info("DeepSpeed ZeRO stage %d, bf16=%s, micro=%d x accum=%d x world=%d", ds_cfg["zero_optimization"]["stage"],
                 ds_cfg.get("bf16", {}).get("enabled"), micro, accum, dist_info.world_size)
    return engine, optimizer, scheduler


def _record_stage0_grad_norm(engine) -> None:
    """Without ZeRO and in fp32 the engine clips with a torch-style optimizer that keeps no norm,
    so ``get_global_grad_norm()`` would be None: keep the norm the clipping computes."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


def is_zero3(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Sharded EMA
# ------------------------------------------------------------------------------------------------

def _flat_chunk(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(chunk size, start, end) of ``rank``'s piece of a flattened parameter: ZeRO-3's partition
    (ceil(numel / world) elements each, the padding at the end) which is also DTensor's Shard(0)."""
    size = math.ceil(numel / world)
    start = min(numel, rank * size)
    return size, start, min(numel, start + size)


class ShardedEMA(EMA):
    """EMA in fp32, each rank keeping its ZeRO-3 partition of every flattened parameter.

    Under ZeRO-3 the local piece is updated from the local partition ``p.ds_tensor`` (no gather);
    under ZeRO 0/1/2 (full weights on every rank) from the same slice of the full weight, so the
    layout, and the checkpoint, are the same at every stage. ``shadow`` holds 1-D DTensors
    (``Shard(0)`` over all ranks, uneven at the end like ZeRO's partition) so that
    ``torch.distributed.checkpoint`` reshards the EMA to another world size.

    With bf16 weights the EMA follows the optimizer's fp32 masters, never the bf16 working copies
    (a step smaller than a bf16 rounding step would not move those): ZeRO-3's fp32 partitions,
    which have the EMA's layout; ZeRO 0's unpartitioned masters (sliced like the weights). ZeRO 1/2
    partition their masters in another layout, the parameter groups flattened and cut into equal
    pieces, so there each rank averages its own fragment of each master in place (``frags``, no
    communication per step) and the layout above is assembled from the fragments only when the EMA
    is saved or swapped in (:meth:`state_dict`, :meth:`swapped_into`: one all-reduce per
    parameter, collective) and written back to them when it is loaded. That layout stays allocated
    beside the fragments: the EMA takes twice its share there (2 x 4 bytes x parameters / ranks, for
    MPDiT-XL/4x on 8 ranks 0.24 GB more). With the optimizer offloaded to the CPU the fragments, and
    so the per-step average, are on the CPU, beside the CPU optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, start_step: int = 0,
                 device_type: str = "cpu", release: Optional[Callable[[], None]] = None,
                 optimizer: Optional[Any] = None):
        """``release``: ZeRO-3's ``engine.empty_partition_cache`` (every parameter back to its
        partition alone), called around a swap so no gathered copy outlives it. ``optimizer``: the
        engine's optimizer, whose fp32 masters the EMA follows under bf16 at ZeRO 0."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.zero3 = is_zero3(model)
        self.release = release
        params = list(model.parameters())
        self.names = [clean_name(n) for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.ds_shape) if self.zero3 else tuple(p.shape) for p in params]
        self.numels = [math.prod(s) for s in self.shapes]
        self.bounds = [_flat_chunk(n, self.rank, self.world) for n in self.numels]
        if self.zero3:
            for name, p, (size, _, _) in zip(self.names, params, self.bounds):
                if p.ds_tensor.numel() != size:
                    raise RuntimeError(f"ZeRO-3 partition of {name} has {p.ds_tensor.numel()} elements, expected "
                                       f"{size}: a partitioning other than plain data-parallel is not supported here")
        # ZeRO 0 with bf16: id(param) -> its whole fp32 master
        self.masters = {} if self.zero3 else _unpartitioned_masters(optimizer)
        # ZeRO 1/2 with bf16: this rank's fragment of the master (every rank has the attribute,
        # ``None`` where it holds no piece, so every rank agrees on which parameters these are)
        self.fragmented = [not self.zero3 and p.dtype != torch.float32 and hasattr(p, "_hp_mapping")
                           for p in params]
        without = [n for n, p, f in zip(self.names, params, self.fragmented) if not self.zero3 and not f
                   and p.requires_grad and p.dtype != torch.float32 and id(p) not in self.masters]
        if without and self.rank == 0:
            log.warning("EMA: no fp32 master found for %d low-precision parameter(s) (%s%s) under %s: the EMA "
                        "averages their %s working copies", len(without), ", ".join(without[:3]),
                        ", ..." if len(without) > 3 else "", type(optimizer).__name__, params[0].dtype)
        self.frag_at: list[Optional[tuple[int, int]]] = [None] * len(params)  # (start, numel) in the flat param
        self.frags: list[Optional[torch.Tensor]] = [None] * len(params)
        with torch.no_grad():
            for i, p in enumerate(params):
                if self.fragmented[i]:
                    self.frag_at[i], hp = self._fragment(p)
                    self.frags[i] = hp.detach().clone()
            self.local = [p.new_zeros(end - start, dtype=torch.float32) if s is None else s.detach().clone()
                          for p, s, (_, start, end) in zip(params, self._fp32_sources(params), self.bounds)]
        mesh = init_device_mesh(device_type, (self.world,))
        self.shadow = [DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=(n,), stride=(1,))
                       for t, n in zip(self.local, self.numels)]
        self._assemble()

    @staticmethod
    def _fragment(p: torch.Tensor) -> tuple[tuple[int, int], torch.Tensor]:
        """(start, numel) in the flattened parameter and the fp32 values of this rank's fragment
        of the master of ``p`` under ZeRO 1/2 (empty where this rank holds none of it)."""
        mapping = p._hp_mapping
        if mapping is None:
            return (0, 0), torch.zeros(0, dtype=torch.float32, device=p.device)
        at = (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
        return at, mapping.get_hp_fragment().view(-1)

    def _sources(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's piece of each (flattened) live weight, as views."""
        out = []
        for p, (_, start, end) in zip(params, self.bounds):
            if self.zero3:
                out.append(p.ds_tensor.data.view(-1)[: end - start])
            else:
                out.append(p.data.view(-1)[start:end])
        return out

    def _fp32_sources(self, params: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """What the EMA averages, in its layout: the fp32 master partition under ZeRO-3 with bf16
        weights (same layout as ``ds_tensor``, already local), the slice of the whole master
        under ZeRO 0, else the working weights (fp32, or not trained); ``None`` for the fragmented
        parameters (see :meth:`update`)."""
        out: list[Optional[torch.Tensor]] = list(self._sources(params))
        for i, (p, (_, start, end)) in enumerate(zip(params, self.bounds)):
            if self.fragmented[i]:
                out[i] = None
            elif out[i].dtype != torch.float32 and p.requires_grad:
                if self.zero3:
                    from deepspeed.utils import safe_get_local_fp32_param

                    master = safe_get_local_fp32_param(p)
                    if master is not None:
                        out[i] = master.view(-1)[: end - start]
                elif id(p) in self.masters:
                    out[i] = self.masters[id(p)].view(-1)[start:end]
        return [s if s is None or s.dtype == torch.float32 else s.float() for s in out]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        params = list(model.parameters())
        dst, src = [], []
        for i, (p, s) in enumerate(zip(params, self._fp32_sources(params))):
            if s is not None:
                dst.append(self.local[i])
                src.append(s.to(self.local[i].device))
                continue
            at, hp = self._fragment(p)
            if at != self.frag_at[i]:
                raise RuntimeError(f"EMA of {self.names[i]}: DeepSpeed now keeps elements {at} of its fp32 master "
                                   f"on rank {self.rank}, the EMA was laid out for {self.frag_at[i]}")
            if hp.numel():
                dst.append(self.frags[i])
                src.append(hp.to(self.frags[i].device))
        torch._foreach_lerp_(dst, src, weight)

    def _whole(self, i: int, start: int, piece: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s whole EMA (flat, fp32) from every rank's ``piece`` starting at ``start``
        (its fragment, or its chunk of the saved layout): collective."""
        full = torch.zeros(self.numels[i], dtype=torch.float32, device=self.local[i].device)
        full[start:start + piece.numel()] = piece.to(full.device)
        if self.world > 1:
            dist.all_reduce(full)  # the pieces are disjoint and cover the parameter
        return full

    def _full_from_fragments(self, i: int) -> torch.Tensor:
        return self._whole(i, self.frag_at[i][0], self.frags[i])

    @torch.no_grad()
    def _assemble(self) -> None:
        """The EMA's layout (``local``, under ``shadow``) from the fragments: collective."""
        for i in range(len(self.local)):
            if self.fragmented[i]:
                _, start, end = self.bounds[i]
                self.local[i].copy_(self._full_from_fragments(i)[start:end])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA in its sharded layout (collective where fragments are assembled: every rank calls it)."""
        self._assemble()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Collective where the EMA is kept in fragments: every rank calls it."""
        self._require_all(state)
        with torch.no_grad():
            for name, local, shadow, (_, start, end) in zip(self.names, self.local, self.shadow, self.bounds):
                src = state[name]
                if src is shadow:  # loaded in place by DCP
                    continue
                local.copy_(src.to_local() if hasattr(src, "to_local") else src.reshape(-1)[start:end])
            for i, (_, start, _) in enumerate(self.bounds):
                if self.fragmented[i]:
                    at, numel = self.frag_at[i]
                    self.frags[i].copy_(self._whole(i, start, self.local[i])[at:at + numel])

    def _write_partitions(self, params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        # gathered full copies (persistent small parameters, the prefetch cache) would keep the old
        # values: drop them first, the next forward gathers from the partitions written here
        if self.release is not None:
            self.release()
        for dst, v in zip(self._sources(params), values):
            dst.copy_(v)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model``, e.g. to sample (collective: every rank
        calls it). ZeRO-3: written into the local partitions, nothing gathered beyond what the
        forward gathers anyway; ZeRO 0/1/2: one parameter's EMA gathered at a time."""
        params = list(model.parameters())
        with torch.no_grad():
            if self.zero3:
                backup = [s.clone() for s in self._sources(params)]
                self._write_partitions(params, self.local)
            else:
                backup = [p.data.clone() for p in params]
                for i, (p, s) in enumerate(zip(params, self.shadow)):
                    full = self._full_from_fragments(i) if self.fragmented[i] else s.full_tensor()
                    p.data.copy_(full.view(p.shape))
        try:
            yield model
        finally:
            with torch.no_grad():
                if self.zero3:
                    self._write_partitions(params, backup)
                else:
                    for p, b in zip(params, backup):
                        p.data.copy_(b)


def _unpartitioned_masters(optimizer: Optional[Any]) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master under DeepSpeed's unpartitioned mixed-precision optimizers
    (ZeRO 0 with bf16 or fp16): ``fp16_groups`` beside ``fp32_groups`` (one master per parameter, the
    unfused optimizer, torch's AdamW) or ``fp32_groups_flat`` (one flat master per group, the fused
    one, DeepSpeed's FusedAdam; views of it, in the group's order, unpadded); empty otherwise. Both
    load their checkpoints into these tensors in place, so the views stay valid."""
    low = getattr(optimizer, "fp16_groups", None)
    if not low:
        return {}
    high = getattr(optimizer, "fp32_groups", None)
    if not high:
        flat = getattr(optimizer, "fp32_groups_flat", None) or []
        high = [torch.split(f, [p.numel() for p in lg]) if f.numel() == sum(p.numel() for p in lg) else []
                for lg, f in zip(low, flat)]
    return {id(p): m.view(p.shape) for lg, hg in zip(low, high) for p, m in zip(lg, hg)
            if torch.is_tensor(m) and m.dtype == torch.float32 and m.numel() == p.numel()}


def make_ema(trainer) -> ShardedEMA:
    """The trainer's EMA under DeepSpeed (call after :func:`build_engine`)."""
    e = trainer.cfg.ema
    return ShardedEMA(trainer.raw_model, e.decay, e.warmup, e.start_step, device_type=trainer.device.type,
                      release=trainer.engine.empty_partition_cache, optimizer=trainer.engine.optimizer)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def _deepspeed_safe_globals() -> list:
    """The plain DeepSpeed classes pickled in its checkpoint files (an enum, the loss scaler's
    settings, a fragment's address): allow-listed for ``weights_only`` loading, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs whatever a
    pickle says; within this block every ``torch.load`` is ``weights_only=True`` with DeepSpeed's
    few plain classes allowed, so a checkpoint from elsewhere cannot run code. A file that needs
    another class fails with an error that names it. (Not thread-safe: it swaps ``torch.load``.)"""
    original = torch.load
    allowed = _deepspeed_safe_globals()

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def tensor_state(trainer) -> dict[str, Any]:
    """What goes through ``torch.distributed.checkpoint``: the sharded EMA. Weights, optimizer
    and schedule are written by the engine itself (:func:`save_engine`)."""
    return {"ema": trainer.ema.state_dict()}


def set_tensor_state(trainer, state: dict[str, Any]) -> None:
    trainer.ema.load_state_dict(state["ema"])


def save_engine(trainer, ckpt_dir: Path) -> None:
    """Collective: the engine's sharded files into ``<ckpt_dir>/deepspeed/`` (the checkpoint's
    temporary directory; the manager checksums and renames it with the rest)."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    # ds_to_universal needs the client to declare the layout (ZeRO 1/2); plain data parallelism has
    # no tensor- or pipeline-parallel patterns, so the version alone describes it
    client = {"step": trainer.step,
              UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    trainer.engine.save_checkpoint(str(Path(ckpt_dir) / DS_SUBDIR), tag=DS_TAG, client_state=client, save_latest=False)


def to_universal(ckpt_dir: Path) -> Path:
    """DeepSpeed's universal checkpoint of ``ckpt_dir`` (converted once, by the calling process,
    into ``<ckpt_dir>/deepspeed_universal`` through a temporary directory and one rename). Returns
    the directory to pass to ``load_checkpoint`` (its tag is :data:`DS_TAG`)."""
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / UNIVERSAL_SUBDIR
    if (out / DS_TAG).is_dir():
        return out
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = ckpt_dir / (UNIVERSAL_SUBDIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    args = Namespace(input_folder=str(ckpt_dir / DS_SUBDIR / DS_TAG), output_folder=str(tmp / DS_TAG),
                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=False)
    with weights_only_loading():
        ds_to_universal(args)
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _names_of_saved_folders(engine, zero_dir: Path) -> Iterator[None]:
    """For one universal load: DeepSpeed reads each parameter's state from the folder named after
    the parameter as the *saving* model named it (``zero/<name>/``), and looks it up under the name
    this model gives it. Activation checkpointing wraps blocks, and so names
    (``..._checkpoint_wrapped_module.``): a run that switched it on or off would find no folder, or
    one without the optimizer state.
    Within this block each parameter whose folder is missing (or incomplete) goes by the saved folder of the same
    name without wrappers (:func:`~mpdit_dist.ema.clean_name`); the names are restored after.
    (The conversion also writes a folder under the module's own, unwrapped, state-dict name with
    the weights alone, ``fp32.pt``: of the folders of one parameter, the one with the most files,
    the optimizer state included, is the one taken.)"""
    files = ({f.name: sum(1 for _ in f.iterdir()) for f in zero_dir.iterdir() if f.is_dir()}
             if zero_dir.is_dir() else {})
    by_clean: dict[str, str] = {}
    for name in sorted(files):
        best = by_clean.get(clean_name(name))
        if best is None or files[name] > files[best]:
            by_clean[clean_name(name)] = name
    tables: list[dict] = []  # the engine's table, and the optimizer's when it keeps another
    for table in (getattr(engine, "param_names", None), getattr(engine.optimizer, "param_names", None)):
        if isinstance(table, dict) and all(table is not t for t in tables):
            tables.append(table)
    backups = [dict(t) for t in tables]
    try:
        for table in tables:
            for param, name in list(table.items()):
                best = by_clean.get(clean_name(name))
                if best is not None and files.get(name, 0) < files[best]:
                    table[param] = best
        yield
    finally:
        for table, backup in zip(tables, backups):
            table.clear()
            table.update(backup)


def load_engine(trainer, ckpt_dir: Path) -> None:
    """Collective: restore the engine from ``<ckpt_dir>/deepspeed/``.

    ZeRO partitions the optimizer state by rank, so a checkpoint written by another world size
    goes through DeepSpeed's universal format (rank 0 converts it once, the others wait). Without
    ZeRO partitions (stage 0 in fp32: the whole state in one file) it loads as is. Another ZeRO
    stage is refused (ZeRO-3 names its files differently; not tested either way)."""
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / DS_SUBDIR / DS_TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(
            f"checkpoint {ckpt_dir} has no DeepSpeed state ({DS_SUBDIR}/{DS_TAG}); was it written by "
            f"parallel.backend=deepspeed?"
        )
    tstate = json.loads((ckpt_dir / "trainer.json").read_text())
    saved_world = int(tstate.get("world_size", trainer.dist.world_size))
    saved_stage = int(tstate.get("config", {}).get("parallel", {}).get("zero_stage", trainer.cfg.parallel.zero_stage))
    stage = trainer.engine.zero_optimization_stage()
    partitioned = any(tag_dir.glob("*optim_states.pt"))
    engine = trainer.engine
    if saved_stage != stage:
        raise C.ConfigError(
            f"checkpoint {ckpt_dir} was written with parallel.zero_stage={saved_stage}, this run has "
            f"parallel.zero_stage={stage}: resume with parallel.zero_stage={saved_stage}"
        )
    if not partitioned or saved_world == trainer.dist.world_size:
        with weights_only_loading():
            path, _ = engine.load_checkpoint(str(ckpt_dir / DS_SUBDIR), tag=DS_TAG)
    else:
        if trainer.dist.is_main:
            log.info("checkpoint %s was written by %d ranks, this run has %d: loading it through "
                     "DeepSpeed's universal format", ckpt_dir, saved_world, trainer.dist.world_size)
        # rank 0 converts; a failure there (e.g. a read-only checkpoint) is raised on every rank
        on_rank0(trainer.dist.rank, lambda: to_universal(ckpt_dir))
        # the engine reads this switch when loading only; DeepSpeed has no argument for it
        engine._config.load_universal_checkpoint = True
        try:
            with weights_only_loading(), _names_of_saved_folders(engine, ckpt_dir / UNIVERSAL_SUBDIR / DS_TAG / "zero"):
                path, _ = engine.load_checkpoint(str(ckpt_dir / UNIVERSAL_SUBDIR), tag=DS_TAG)
        finally:
            engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir / DS_SUBDIR}")


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {clean_name(k): v for k, v in sd.items()}


def load_consolidated(ckpt_path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Full plain fp32 weights on CPU, in this process, no process group needed.

    ``key="model"``: the fp32 master weights, merged from the ZeRO partitions (DeepSpeed's
    zero_to_fp32; stage 0: the module state). ``key="ema"``: the EMA shards from the DCP part,
    reshaped to the parameters' shapes."""
    ckpt_path = Path(ckpt_path)
    if key == "model":
        ds_dir = ckpt_path / DS_SUBDIR
        tag_dir = ds_dir / DS_TAG
        if any(tag_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with weights_only_loading():
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
        else:  # ZeRO stage 0: the module's weights are in the model states file
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise FileNotFoundError(f"no DeepSpeed model states in {tag_dir}")
            with weights_only_loading():
                states = torch.load(files[0], map_location="cpu")
            sd = _stage0_fp32_weights(states, files[0])
        return {k: v.float() for k, v in _strip_module(sd).items()}
    if key == "ema":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(ckpt_path)).read_metadata()
        sizes = {k[len("ema."):]: tuple(v.size) for k, v in meta.state_dict_metadata.items()
                 if k.startswith("ema.") and hasattr(v, "size")}
        if not sizes:
            raise KeyError(f"checkpoint {ckpt_path} holds no EMA")
        flat = {name: torch.empty(size) for name, size in sizes.items()}
        dcp.load({"ema": flat}, checkpoint_id=str(ckpt_path), no_dist=True)  # this process alone, also under torchrun
        shapes = _param_shapes(ckpt_path)
        return {name: t.view(shapes[name]) if name in shapes else t for name, t in flat.items()}
    raise ValueError(f"key must be 'model' or 'ema', not {key!r}")


def _stage0_fp32_weights(states: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """The weights of a ZeRO stage 0 model-states file, fp32 master copies where there are some.

    In fp32 the module holds the weights themselves. In bf16 (or fp16) the module holds the
    low-precision working copies and DeepSpeed's mixed-precision optimizer the fp32 masters
    (``optimizer["fp32_groups"]``: per parameter group, the group's parameters in order, or one
    flat tensor), which are the trained weights."""
    module = states["module"]
    optimizer = states.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups:
        return module
    masters: list[torch.Tensor] = []
    for group in groups:
        masters.extend(group if isinstance(group, (list, tuple)) else [group])
    buffers = set(states.get("buffer_names") or ())  # persistent buffers: in the module, not the optimizer
    names = [n for n in module if n not in buffers]
    shapes = [tuple(module[n].shape) for n in names]
    if len(masters) == 1 and len(names) > 1 and masters[0].numel() == sum(math.prod(s) for s in shapes):
        masters = list(torch.split(masters[0].reshape(-1), [math.prod(s) for s in shapes]))
    if len(masters) != len(names) or any(m.numel() != math.prod(s) for m, s in zip(masters, shapes)):
        raise RuntimeError(
            f"{source}: the fp32 master weights ({len(masters)} tensors) do not line up with the module's "
            f"{len(names)} parameters; cannot tell which master belongs to which parameter"
        )
    weights = dict(module)
    weights.update({n: m.reshape(s) for n, m, s in zip(names, masters, shapes)})
    return weights


def _param_shapes(ckpt_path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes from the architecture in trainer.json (the EMA is stored flattened)."""
    from ..config import from_dict, model_args_from
    from ..models import MPDiT

    tstate = json.loads((ckpt_path / "trainer.json").read_text())
    with torch.device("meta"):
        model = MPDiT(model_args_from(from_dict(tstate["config"]).model))
    return {clean_name(n): tuple(p.shape) for n, p in model.named_parameters()}
