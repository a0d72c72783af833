"""Throughput of one MPDiT / DiT training step, measured exactly as the trainer takes it.

For each variant (model x attention backend x compile setting) this builds the model with
``create_model``, wraps it with ``parallelize`` (activation checkpointing, per-block compile), and
gives it the trainer's own optimizer (``build_optimizer``), LR schedule, ``EMA`` and
``FlowMatching`` objective. The step it times is ``Trainer.train_step`` itself, on a real
``Trainer`` whose data loader is replaced by one synthetic batch already on the device; nothing
of the step is re-implemented for the headline figure.

Two timed passes per variant:

- **fused**: ``--steps`` whole steps back to back, no synchronisation between them (CUDA events
  between steps, read once at the end; ``perf_counter`` on CPU). This is the headline img/s
  (= batch / mean step time), and what the trainer's own ``img_per_s`` and ``mfu`` agree with
  (same FLOP count, ``mpdit_dist.flops.train_flops_per_image``, same peak table).
- **phases**: the same step cut into data (host->device copy of a pinned CPU batch), draw
  (t, noise, class dropout), forward (+ loss), backward, optimizer (grad clip, AdamW, zero_grad,
  LR schedule) and EMA, each bracketed by CUDA events, with one synchronisation per step. The
  split is reported beside the fused figure; its sum is a little larger (the events and the
  per-step sync cost time). ``instrumented_step`` is checked against ``Trainer.train_step``
  (same losses and weights) by the unit tests, so the two cannot drift apart silently.

``--official PATH`` adds the official implementation (a copy of github quandao10/MPDiT's
``models/mpdit.py``; it imports timm) to the same harness: same optimizer, EMA, objective and
step, so the comparison isolates the model code. ``--profile`` runs torch.profiler over a few
steps and groups the kernel time as ``/work/shared/MEASUREMENTS.md`` does.

Example (one H100)::

    python bench/throughput.py --models MPDiT-XL/4x,DiT-XL/2 --batch 128 --precision bf16 \\
        --compile 0,1 --json results/bench.json --official /path/to/official_mpdit.py

CPU smoke run::

    python bench/throughput.py --models custom --device cpu --batch 4 --steps 2 --warmup 1 \\
        --input-size 8 --num-classes 10 \\
        --model-overrides "stages=[[4,2],[2,1]],hidden_size=64,num_heads=4,num_condition_tokens=4"
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import yaml

from mpdit_dist import config as C
from mpdit_dist import profiling
from mpdit_dist.distributed.parallelize import parallelize
from mpdit_dist.ema import EMA
from mpdit_dist.flops import device_peak_flops, train_flops_per_image
from mpdit_dist.flow import FlowMatching
from mpdit_dist.models import ATTENTION_BACKENDS, ModelArgs, count_parameters, create_model, model_args
from mpdit_dist.trainer import Trainer, build_optimizer, lr_lambda, step_generator

PHASES = ("data", "draw", "forward", "backward", "optimizer", "ema")
PRECISIONS = ("bf16", "fp32")
AC_MODES = ("none", "full")
BACKENDS = ("none", "fsdp2")
COMPILE_SCOPES = ("blocks", "model")
# keys of a model's overrides that the official constructor understands too
OFFICIAL_KEYS = ("input_size", "in_channels", "num_classes", "num_condition_tokens")


# ------------------------------------------------------------------------------------------------
# Building one variant: a real Trainer, with the model, optimizer and EMA the trainer would build
# ------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """Everything one variant's steps need. ``trainer.train_step(batch_device)`` is one step."""

    trainer: Trainer
    args: ModelArgs  # architecture, for the FLOP count (the official model's twin for --official)
    batch_cpu: dict[str, torch.Tensor]  # pinned on CUDA: what a data loader would hand over
    batch_device: dict[str, torch.Tensor]
    impl: str  # "ours" or "official"
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def bench_config(batch: int, precision: str, device: torch.device, *, seed: int = 0, compile: bool = False,
                 ac: str = "none", lr: Optional[float] = None, optimizer_fused: Optional[bool] = None,
                 compile_scope: str = "blocks", compile_mode: Optional[str] = None,
                 backend: str = "none", grad_clip: float = 0.0, reshard_after_forward: bool = True) -> C.Config:
    """The config sections ``Trainer.train_step`` reads: one rank, no accumulation, defaults elsewhere
    (AdamW lr 1e-4, EMA 0.9999 with warm-up, logit-normal t, 10% class dropout). ``grad_clip`` 0
    (no clipping, only the norm measured) as the paper recipes and the official script.
    ``backend`` ``fsdp2`` is FSDP2 over this one device: bf16 parameters for compute (fp32 master
    weights and reduction), as ``parallel.backend=fsdp2`` runs on one GPU; ``reshard_after_forward``
    False keeps each block's bf16 parameters from its forward to its backward (no second cast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing {ac!r}: choose one of {AC_MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {compile_scope!r}: choose one of {COMPILE_SCOPES}")
    cfg = C.Config()
    cfg.train.device = device.type
    cfg.train.precision = precision
    cfg.train.seed = seed
    cfg.data.global_batch_size = batch
    cfg.data.micro_batch_size = None
    cfg.parallel.backend = backend
    cfg.parallel.compile = compile
    cfg.parallel.compile_scope = compile_scope
    cfg.parallel.compile_mode = compile_mode
    cfg.parallel.activation_checkpointing = ac
    if lr is not None:
        cfg.optim.lr = lr
    cfg.optim.fused = optimizer_fused
    cfg.optim.grad_clip = grad_clip
    cfg.parallel.reshard_after_forward = reshard_after_forward
    return cfg


def load_official_module(path: str | Path):
    """Import the official ``mpdit.py`` by path (it needs timm)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--official {path}: no such file")
    spec = importlib.util.spec_from_file_location("official_mpdit_bench", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "MPDiT_models"):
        raise ValueError(f"--official {path}: the file defines no MPDiT_models table")
    return module


def _wrap_official_blocks(model: nn.Module, fn: Callable[[nn.Module], nn.Module]) -> int:
    """Apply ``fn`` to every transformer block of an official model (its ``*blocks*`` lists)."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and "blocks" in name:
            for i, block in enumerate(child):
                child[i] = fn(block)
                count += 1
    return count


def build_official(module, name: str, overrides: dict[str, Any]) -> tuple[nn.Module, ModelArgs, list[str]]:
    """The official model ``name`` with the harness's input size, channels, classes and class tokens.

    Its forward is already ``(x, t, y) -> velocity`` with our time convention, so it is called as is.
    """
    if name not in module.MPDiT_models:
        raise KeyError(f"official MPDiT_models has no {name!r}; it has {sorted(module.MPDiT_models)}")
    common = {k: overrides[k] for k in OFFICIAL_KEYS if k in overrides}
    ignored = sorted(k for k in overrides if k not in OFFICIAL_KEYS and k != "attention")
    notes = [f"official: ignored overrides {ignored}"] if ignored else []
    common.setdefault("num_condition_tokens", 16)
    model = module.MPDiT_models[name](time_emb="fno", **common)
    return model, model_args(name, **common), notes


def build_setup(model_name: str, overrides: Optional[dict[str, Any]] = None, *, batch: int, precision: str = "fp32",
                compile: bool = False, ac: str = "none", device: str | torch.device = "cpu", seed: int = 0,
                lr: Optional[float] = None, optimizer_fused: Optional[bool] = None,
                compile_scope: str = "blocks", compile_mode: Optional[str] = None, backend: str = "none",
                official_module=None, grad_clip: float = 0.0, reshard_after_forward: bool = True) -> Setup:
    """A ``Trainer`` ready to step: the pieces ``Trainer.build`` makes, minus the data loader and files.

    ``overrides`` go to ``create_model`` (e.g. ``attention``, ``input_size``, ``stages``). With
    ``official_module`` the model is the official implementation of ``model_name`` instead.
    """
    device = torch.device(device)
    overrides = dict(overrides or {})
    if official_module is not None and backend != "none":
        raise ValueError(f"the official model runs with backend none only, not {backend!r}")
    cfg = bench_config(batch, precision, device, seed=seed, compile=compile, ac=ac, lr=lr,
                       optimizer_fused=optimizer_fused, compile_scope=compile_scope, compile_mode=compile_mode,
                       backend=backend, grad_clip=grad_clip, reshard_after_forward=reshard_after_forward)
    # the real constructor: batch split, precision choice, device; build() (loader, run dir) is not called
    trainer = Trainer(cfg, run_dir=Path(tempfile.gettempdir()) / "mpdit-bench-unused")
    if device.type == "cuda":  # as Trainer.build
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)  # identical initial weights for every variant of a model
    notes: list[str] = []
    if official_module is None:
        # built on the device: initialising ~500M parameters on the host costs GPU-lease time for
        # nothing (the weights then differ from a CPU-built model's, the step's cost does not)
        with device:
            model = create_model(model_name, **overrides)
        args = model.args
        model.to(device)
        wrapped = parallelize(model, cfg.parallel, trainer.dist, trainer.backend, mixed_precision=trainer.bf16)
        impl = "ours"
    else:
        with device:
            model, args, notes = build_official(official_module, model_name, overrides)
        model.to(device)
        # the same wrappers as parallelize, on the official block lists
        if ac != "none":
            apply_ac_official = lambda b: _checkpoint(b)  # noqa: E731
            _wrap_official_blocks(model, apply_ac_official)
        if compile and compile_scope == "model":
            model.compile(mode=compile_mode)
        elif compile:
            _wrap_official_blocks(model, lambda b: torch.compile(b, fullgraph=True, mode=compile_mode))
        wrapped = model
        impl = "official"
    trainer.raw_model = model
    trainer.model = wrapped
    trainer.model_args = args
    trainer.flops_per_image = train_flops_per_image(args)
    trainer.flow = FlowMatching.from_config(cfg.flow, args.num_classes)
    trainer.sample_shape = (args.in_channels, args.input_size, args.input_size)
    trainer.optimizer = build_optimizer(model.parameters(), cfg.optim, device)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    trainer.ema = EMA(model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step)
    trainer.peak_flops = device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    batch_cpu = synthetic_batch(batch, args, seed)
    if device.type == "cuda":
        batch_cpu = {k: v.pin_memory() for k, v in batch_cpu.items()}
    batch_device = {k: v.to(device) for k, v in batch_cpu.items()}
    return Setup(trainer, args, batch_cpu, batch_device, impl, notes)


def _checkpoint(block: nn.Module) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapper(block, preserve_rng_state=False)


def synthetic_batch(batch: int, args: ModelArgs, seed: int, step: int = 0) -> dict[str, torch.Tensor]:
    """A latent batch and labels on the CPU, a function of (seed, step) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, args.in_channels, args.input_size, args.input_size, generator=g)
    y = torch.randint(0, args.num_classes, (batch,), generator=g)
    return {"x": x, "y": y}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times named phases of a step: CUDA events on GPU (read once per step), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.totals_ms: dict[str, float] = {p: 0.0 for p in PHASES}
        self.step_ms: list[float] = []
        self._pending: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._pending.append((name, t0, time.perf_counter()))

    def end_step(self) -> None:
        """Close one step: one synchronisation (GPU), then fold its phases into the totals."""
        if not self._pending:
            return
        if self.cuda:
            self._pending[-1][2].synchronize()
            times = [(n, s.elapsed_time(e)) for n, s, e in self._pending]
            whole = self._pending[0][1].elapsed_time(self._pending[-1][2])
        else:
            times = [(n, (e - s) * 1e3) for n, s, e in self._pending]
            whole = (self._pending[-1][2] - self._pending[0][1]) * 1e3
        for n, ms in times:
            self.totals_ms[n] += ms
        self.step_ms.append(whole)
        self._pending = []

    def mean_ms(self) -> dict[str, float]:
        n = max(1, len(self.step_ms))
        return {p: self.totals_ms[p] / n for p in PHASES}


def instrumented_step(trainer: Trainer, batch_cpu: dict[str, torch.Tensor], timer: PhaseTimer) -> torch.Tensor:
    """``Trainer.train_step`` for one rank without accumulation (plain or FSDP2), cut into timed phases.

    Same calls in the same order as the trainer (tests check losses and weights agree), except that
    the batch arrives as a (pinned) CPU batch, so the host->device copy is timed as ``data``.
    """
    tr = trainer
    if tr.accum != 1 or tr.dist.world_size != 1 or tr.backend not in BACKENDS or tr.engine is not None:
        raise ValueError("instrumented_step covers one rank without gradient accumulation, backend none or fsdp2")
    if tr.backend == "fsdp2":
        tr.model.set_requires_gradient_sync(True)  # as train_step at the last (here only) micro-batch
    with timer.phase("data"):
        x = batch_cpu["x"].to(tr.device, non_blocking=True)
        y = batch_cpu["y"].to(tr.device, non_blocking=True)
    with timer.phase("draw"):
        gen = step_generator(tr.cfg.train.seed, tr.step, tr.device)
        draw = tr.flow.draw(tr.cfg.data.global_batch_size, tr.sample_shape, gen, tr.device).slice(0, tr.per_rank)
    with timer.phase("forward"), tr._autocast():
        loss = tr.flow.per_sample_loss(tr.model, x, y, draw).sum() / tr.per_rank
    with timer.phase("backward"):
        loss.backward()
    with timer.phase("optimizer"):
        tr.optimizer_step()
    tr.step += 1
    with timer.phase("ema"):
        tr.ema.update(tr.raw_model, tr.step)
    timer.end_step()
    return loss.detach()


def time_fused(trainer: Trainer, batch: dict[str, torch.Tensor], steps: int) -> tuple[list[float], torch.Tensor]:
    """Per-step milliseconds of ``steps`` back-to-back ``Trainer.train_step`` calls (no sync between
    steps), and the last loss."""
    device = trainer.device
    _sync(device)
    loss = torch.zeros(())
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            loss, _ = trainer.train_step(batch)
            events[i + 1].record()
        events[-1].synchronize()
        return [events[i].elapsed_time(events[i + 1]) for i in range(steps)], loss
    marks = [time.perf_counter()]
    for _ in range(steps):
        loss, _ = trainer.train_step(batch)
        marks.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:])], loss


# ------------------------------------------------------------------------------------------------
# Profile: kernel time by category
# ------------------------------------------------------------------------------------------------

def profile_steps(trainer: Trainer, batch: dict[str, torch.Tensor], steps: int = 3, top: int = 15) -> dict[str, Any]:
    """torch.profiler over ``steps`` fused steps, grouped by :func:`mpdit_dist.profiling.summarize`
    (GPU kernel time on CUDA, operator self CPU time on CPU)."""
    from torch.profiler import profile

    device = trainer.device
    _sync(device)
    with profile(activities=profiling.activities(device)) as prof:
        for _ in range(steps):
            trainer.train_step(batch)
        _sync(device)
    return profiling.summarize(prof, steps, cuda=device.type == "cuda", top=top)


# ------------------------------------------------------------------------------------------------
# One variant
# ------------------------------------------------------------------------------------------------

@dataclass
class Variant:
    model: str
    compile: bool
    attention: str = "auto"
    official: bool = False
    scope: str = "blocks"  # what torch.compile covers: each block alone, or the whole forward
    mode: Optional[str] = None  # torch.compile mode (None: the default)
    backend: str = "none"  # none, or fsdp2 over the one device (bf16 parameters)

    @property
    def label(self) -> str:
        impl = "official " if self.official else ""
        attn = "timm" if self.official else self.attention
        how = "eager"
        if self.compile:
            how = "compiled" if self.scope == "blocks" else "compiled model"
            if self.mode:
                how += f" {self.mode}"
        extra = "" if self.backend == "none" else f", {self.backend}"
        return f"{impl}{self.model} [{attn}, {how}{extra}]"


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_variant(v: Variant, *, batch: int, precision: str, steps: int, warmup: int, device: torch.device,
                phase_steps: Optional[int] = None,
                overrides: dict[str, Any], ac: str = "none", optimizer_fused: Optional[bool] = None,
                official_module=None, profile: bool = False, profile_steps_n: int = 3, seed: int = 0,
                grad_clip: float = 0.0, reshard_after_forward: bool = True) -> dict[str, Any]:
    """Build, warm up (compiles here), time fused, time phases, optionally profile; never raises
    for a failure of the variant itself: the row says ``status: failed`` and why."""
    row: dict[str, Any] = {"label": v.label, "model": v.model, "impl": "official" if v.official else "ours",
                           "compile": v.compile, "compile_scope": v.scope if v.compile else None,
                           "compile_mode": v.mode if v.compile else None, "backend": v.backend,
                           "attention": "timm" if v.official else v.attention,
                           "precision": precision, "batch": batch, "ac": ac, "grad_clip": grad_clip, "status": "ok"}
    if v.backend == "fsdp2":
        row["reshard_after_forward"] = reshard_after_forward
    setup = tr = timer = loss = None
    free_device_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if v.compile:
        torch._dynamo.reset()  # each variant compiles afresh, and never runs into the recompile limit
    stage = "build"
    try:
        over = dict(overrides)
        if not v.official:
            over["attention"] = v.attention
        setup = build_setup(v.model, over, batch=batch, precision=precision, compile=v.compile, ac=ac,
                            device=device, seed=seed, optimizer_fused=optimizer_fused,
                            compile_scope=v.scope, compile_mode=v.mode, backend=v.backend,
                            official_module=official_module if v.official else None, grad_clip=grad_clip,
                            reshard_after_forward=reshard_after_forward)
        tr = setup.trainer
        row["params"] = count_parameters(setup.trainer.raw_model)
        row["flops_per_image"] = train_flops_per_image(setup.args)
        row["optimizer"] = "AdamW fused" if tr.optimizer.defaults.get("fused") else "AdamW foreach"
        if setup.notes:
            row["notes"] = setup.notes

        stage = "warmup (compile)" if v.compile else "warmup"
        t0 = time.perf_counter()
        tr.train_step(setup.batch_device)
        _sync(device)
        row["first_step_s"] = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            tr.train_step(setup.batch_device)

        stage = "fused timing"
        per_step, loss = time_fused(tr, setup.batch_device, steps)
        mean_ms = statistics.fmean(per_step)
        row["step_ms_median"] = statistics.median(per_step)
        row["step_ms_mean"] = mean_ms
        row["step_ms_min"] = min(per_step)
        row["img_per_s"] = batch * 1e3 / mean_ms
        row["loss"] = float(loss)

        stage = "phase timing"
        timer = PhaseTimer(device)
        for _ in range(phase_steps or steps):
            instrumented_step(tr, setup.batch_cpu, timer)
        row["phases_ms"] = timer.mean_ms()
        row["phases_step_ms_mean"] = statistics.fmean(timer.step_ms)
        row["phases_img_per_s"] = batch * 1e3 / row["phases_step_ms_mean"]

        if tr.peak_flops:
            row["peak_flops"] = tr.peak_flops
            row["mfu"] = row["img_per_s"] * row["flops_per_image"] / tr.peak_flops
        else:
            row["mfu"] = None
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            row["peak_mem_gib"] = None

        if not math.isfinite(row["loss"]):
            row["status"] = "failed"
            row["error"] = f"non-finite loss {row['loss']}"
        if profile:
            stage = "profile"
            try:
                row["profile"] = profile_steps(tr, setup.batch_device, profile_steps_n)
            except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timings
                row["profile_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - compile errors, OOM, ...: reported per variant
        row["status"] = "failed"
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        row["traceback"] = traceback.format_exc(limit=8)
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        # drop every reference to the model, optimizer and EMA before emptying the cache
        setup = tr = timer = loss = None  # noqa: F841
        if v.compile:
            torch._dynamo.reset()
        free_device_memory()
    return row


# ------------------------------------------------------------------------------------------------
# Numerics: per-step losses of the plain and the optimised paths
# ------------------------------------------------------------------------------------------------

def run_losses(model_name: str = "custom", overrides: Optional[dict[str, Any]] = None, steps: int = 100,
               compile: bool = False, attention: str = "auto", precision: str = "fp32", *, batch: int = 8,
               seed: int = 0, device: str = "cpu", lr: Optional[float] = None, compile_scope: str = "blocks",
               backend: str = "none", grad_clip: float = 1.0) -> list[float]:
    """Per-step training losses of ``steps`` ``Trainer.train_step`` calls with a fixed seed.

    Initial weights, data (a fresh synthetic batch per step) and the step's randomness depend only
    on ``seed`` and the step, so two calls differing only in ``compile``/``attention`` compute the
    same mathematics and their losses differ by floating-point reordering alone (``backend`` fsdp2
    with bf16 also rounds the parameters and the activations between blocks to bf16). Gradients are
    clipped at ``grad_clip`` (1.0, the config default): at the tests' high learning rate an unclipped
    step lets those rounding differences grow faster.
    """
    over = dict(overrides or {})
    over["attention"] = attention
    setup = build_setup(model_name, over, batch=batch, precision=precision, compile=compile, device=device,
                        seed=seed, lr=lr, compile_scope=compile_scope, backend=backend, grad_clip=grad_clip)
    tr = setup.trainer
    losses = []
    for step in range(steps):
        losses.append(tr.train_step(synthetic_batch(batch, setup.args, seed, step))[0])
    return [float(v) for v in torch.stack(losses).cpu()]  # one host sync, at the end


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """``key=value,key=value`` (values in YAML; commas inside brackets belong to the value)."""
    if not text:
        return {}
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out: dict[str, Any] = {}
    for part in (p.strip() for p in parts if p.strip()):
        if "=" not in part:
            raise SystemExit(f"--model-overrides: {part!r} is not key=value")
        key, value = part.split("=", 1)
        out[key.strip()] = yaml.safe_load(value.replace("(", "[").replace(")", "]"))
    return out


def _compile_list(text: str) -> list[tuple[bool, str]]:
    """``--compile``: (compiled, scope) per item; 0 = eager, 1 or blocks = each block, model = the whole forward."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("0", "false", "no", "eager"):
            out.append((False, "blocks"))
        elif item in ("1", "true", "yes", "compiled", "blocks"):
            out.append((True, "blocks"))
        elif item == "model":
            out.append((True, "model"))
        else:
            raise SystemExit(f"--compile {text!r}: expected a comma list of 0, 1 (= blocks), blocks or model")
    return out


def _list(text: str, flag: str, allowed: Sequence[str]) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return items


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device_type": device.type, "host": platform.node(),
                           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(device)
        env["device_memory_gib"] = props.total_memory / 2**30
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        env["device_name"] = name
        env["cpu_count"] = os.cpu_count()
    from mpdit_dist.models import flash_attn_available

    env["flash_attn"] = flash_attn_available()
    return env


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'variant':<46} {'img/s':>8} {'ms med':>8} {'ms mean':>8} | {'data':>6} {'draw':>6} {'fwd':>7} "
            f"{'bwd':>7} {'optim':>7} {'ema':>6} {'sum':>7} | {'MFU':>5} {'peak GiB':>8} {'params':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok" and "img_per_s" not in r:
            lines.append(f"{r['label']:<46} {r['status'].upper()}: {r.get('error', '')}"[:len(head)])
            continue
        ph = r.get("phases_ms", {})
        mfu = r.get("mfu")
        lines.append(
            f"{r['label']:<46} {r['img_per_s']:>8.1f} {r['step_ms_median']:>8.2f} {r['step_ms_mean']:>8.2f} | "
            + " ".join(f"{ph.get(p, float('nan')):>{w}.2f}" for p, w in zip(PHASES, (6, 6, 7, 7, 7, 6)))
            + f" {r.get('phases_step_ms_mean', float('nan')):>7.2f} | "
            f"{('-' if mfu is None else f'{100 * mfu:.1f}%'):>5} {_fmt(r.get('peak_mem_gib'), '.2f'):>8} "
            f"{r.get('params', 0) / 1e6:>7.1f}M"
            + ("" if r["status"] == "ok" else f"  {r['status'].upper()}: {r.get('error', '')}")
        )
    return "\n".join(lines)


def loss_agreement(rows: list[dict[str, Any]]) -> list[str]:
    """Every variant of one model (same implementation) took the same steps from the same weights on
    the same data, so their last fused-pass losses differ only by rounding: a cheap numerics check on
    the device itself. Adds ``loss_rel_diff`` (to the first such variant) to each row."""
    lines = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["impl"], r["model"]), []).append(r)
    for (impl, model), group in groups.items():
        ref = group[0]
        for r in group:
            r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) if ref["loss"] else float("nan")
        if len(group) > 1:
            worst = max(group, key=lambda r: r["loss_rel_diff"])
            lines.append(f"loss agreement, {'official ' if impl == 'official' else ''}{model}: last losses of "
                         f"{len(group)} variants within {worst['loss_rel_diff']:.2e} relative "
                         f"(of {ref['label']}: {ref['loss']:.6f})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Throughput of one MPDiT/DiT training step (the trainer's own step).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Variants: every model x attention x compile setting, then the official "
                                        "implementation of each model that has one (--official).")
    ap.add_argument("--models", default="MPDiT-XL/4x,DiT-XL/2", help="comma list of model names (or custom)")
    ap.add_argument("--batch", type=int, default=128, help="images per step (one device)")
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS, help="bf16 autocast or plain fp32")
    ap.add_argument("--compile", default="0,1",
                    help="comma list of 0 (eager), 1 or blocks (per-block torch.compile), model (the whole forward)")
    ap.add_argument("--compile-mode", default="default",
                    help="comma list of torch.compile modes for the compiled variants, e.g. "
                         "default,max-autotune-no-cudagraphs")
    ap.add_argument("--backend", default="none",
                    help=f"comma list of {'|'.join(BACKENDS)}; fsdp2 = FSDP2 over the one device (bf16 parameters)")
    ap.add_argument("--attention", default="auto", help=f"comma list of {'|'.join(ATTENTION_BACKENDS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per pass")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--phase-steps", type=int, default=10, help="steps of the instrumented (phase split) pass")
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--input-size", type=int, default=32, help="latent side (256 px / 8)")
    ap.add_argument("--in-channels", type=int, default=4)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--model-overrides", default=None,
                    help="key=value,... for create_model, e.g. 'stages=[[4,2],[2,1]],hidden_size=64,num_heads=4'")
    ap.add_argument("--ac", default="none", choices=AC_MODES, help="activation checkpointing of every block")
    ap.add_argument("--optimizer-fused", default="auto", choices=("auto", "0", "1"),
                    help="AdamW fused (auto: as the trainer, fused on CUDA) or foreach (0)")
    ap.add_argument("--grad-clip", type=float, default=0.0,
                    help="optim.grad_clip of the step (0: the norm is measured, nothing clipped, as the paper "
                         "recipes and the official script; runs 1 and 2 of docs/performance.md clipped at 1.0)")
    ap.add_argument("--reshard-after-forward", type=int, default=1, choices=(0, 1),
                    help="fsdp2 variants: parallel.reshard_after_forward (1, the config default: each block's "
                         "bf16 parameters are cast again for its backward; 0: kept from forward to backward)")
    ap.add_argument("--official", default=None, metavar="PATH",
                    help="also benchmark the official models/mpdit.py at PATH (needs timm)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler: kernel time by category per variant")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (CPU; 1 is fastest on a shared, oversubscribed machine)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    return ap


@contextlib.contextmanager
def own_process_group():
    """The one-rank process group that FSDP2 variants start (``init_distributed`` sets torchrun's
    variables and initialises it) is destroyed afterwards, and those variables are restored."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.steps, args.warmup, args.phase_steps) < 1:
        raise SystemExit(f"--steps {args.steps} --warmup {args.warmup} --phase-steps {args.phase_steps}: "
                         f"each must be >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    bad = [a for a in attentions if a not in ATTENTION_BACKENDS]
    if bad:
        raise SystemExit(f"--attention {bad}: choose from {ATTENTION_BACKENDS}")
    compiles = _compile_list(args.compile)
    modes = [None if m == "default" else m for m in (t.strip() for t in args.compile_mode.split(",")) if m]
    backends = _list(args.backend, "--backend", BACKENDS)
    overrides = {"input_size": args.input_size, "in_channels": args.in_channels, "num_classes": args.num_classes}
    overrides.update(parse_overrides(args.model_overrides))
    for m in models:  # fail before any device time is spent
        try:
            model_args(m, **{k: v for k, v in overrides.items()})
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--models {m!r} with overrides {overrides}: {exc}") from None
    fused = None if args.optimizer_fused == "auto" else args.optimizer_fused == "1"

    def settings(official: bool = False):
        for (c, scope) in compiles:
            for mode in (modes if c else [None]):
                for b in (["none"] if official else backends):
                    yield c, scope, mode, b

    variants, skipped = [], []
    for m in models:
        for a in attentions:
            for c, scope, mode, b in settings():
                variants.append(Variant(m, c, a, scope=scope, mode=mode, backend=b))
    official_module = None
    if args.official:
        official_module = load_official_module(args.official)
        for m in models:
            if m in official_module.MPDiT_models:
                variants += [Variant(m, c, official=True, scope=scope, mode=mode)
                             for c, scope, mode, _ in settings(official=True)]
            else:
                skipped.append({"label": f"official {m}", "status": "skipped",
                                "error": f"the official MPDiT_models has no {m!r}"})

    env = environment(device)
    print(f"# torch {env['torch']} on {env['device_name']} ({device.type}); batch {args.batch}, {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, AC {args.ac}", flush=True)
    rows = []
    with own_process_group():  # fsdp2 variants start one; the caller's process is left as it was
        for v in variants:
            print(f"# {v.label} ...", flush=True)
            row = run_variant(v, batch=args.batch, precision=args.precision, steps=args.steps, warmup=args.warmup,
                              phase_steps=args.phase_steps, device=device, overrides=overrides, ac=args.ac,
                              optimizer_fused=fused, official_module=official_module, profile=args.profile,
                              profile_steps_n=args.profile_steps, seed=args.seed, grad_clip=args.grad_clip,
                              reshard_after_forward=bool(args.reshard_after_forward))
            for note in row.get("notes", []):
                print(f"#   note: {note}", flush=True)
            if row["status"] != "ok":
                print(f"#   {row['status']}: {row.get('error')}", flush=True)
            if "profile" in row:
                print(profiling.format_summary(v.label, row["profile"]), flush=True)
            elif "profile_error" in row:
                print(f"#   profile failed: {row['profile_error']}", flush=True)
            rows.append(row)
    agreement = loss_agreement(rows)
    print()
    print(format_table(rows))
    for line in agreement:
        print(line)
    for s in skipped:
        print(f"{s['label']}: skipped ({s['error']})")
    result = {
        "env": env,
        "settings": {k: getattr(args, k) for k in ("models", "batch", "precision", "compile", "compile_mode", "backend",
                                                   "attention", "steps",
                                                   "warmup", "phase_steps", "ac", "optimizer_fused", "grad_clip",
                                                   "reshard_after_forward", "seed",
                                                   "official")},
        "overrides": overrides,
        "phases": list(PHASES),
        "notes": ("img_per_s = batch / step_ms_mean of the fused pass (Trainer.train_step back to back, "
                  "batch already on the device); phases_ms from a separate instrumented pass with one sync "
                  "per step; data = host->device copy of a pinned CPU batch (not part of the fused step); "
                  "mfu = img_per_s * flops_per_image / peak_flops (mpdit_dist.flops)"),
        "results": rows + skipped,
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
