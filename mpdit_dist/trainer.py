"""The training loop: build -> resume -> step -> log -> checkpoint -> sample.

One loop for every backend (none, DDP, FSDP2, DeepSpeed). The global batch is fixed by the
config; each rank takes ``global / world`` samples per optimizer step, in micro-batches of
``data.micro_batch_size`` with gradient accumulation. The random part of a step (t, noise, class
dropout) is drawn for the whole global batch from a generator keyed by (seed, step) and sliced per
rank, so the same run on 1 or N ranks computes the same loss, and a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import config as C
from . import preemption
from .checkpoint import CheckpointManager, code_version, fault_point, list_checkpoints, step_dir_name
from .distributed.env import DistInfo, all_gather_object, broadcast_object, init_distributed, shutdown
from .ema import EMA, local_tensor
from .flops import device_peak_flops, train_flops_per_image
from .flow import FlowMatching
from .sample import decode_to_uint8, generate, nonfinite_samples, save_grid

log = logging.getLogger("mpdit_dist.trainer")

STOP_VOTE_EVERY = 10  # steps between the ranks' agreement on a stop request
PREEMPTED_TRACKER_WAIT_S = 10.0  # how long a preempted run waits for queued MLflow calls
_NONE_BAD = 2**62  # "no non-finite step seen" in the ranks' MIN vote
FINAL_OUTPUTS = "final_outputs.json"  # <run_dir>/: the end-of-run sample grid and evaluation, once made
OUTPUTS = ("samples", "eval")  # what a step may owe besides its checkpoint (final_outputs.json, "owed")


def describe_outputs(outputs: list[str]) -> str:
    """``["samples", "eval"]`` -> ``"sample grid and evaluation"``, for the log."""
    return " and ".join({"samples": "sample grid", "eval": "evaluation"}.get(o, o) for o in outputs)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing of that state was saved."""


# ------------------------------------------------------------------------------------------------
# Small builders
# ------------------------------------------------------------------------------------------------

def resolve_backend(cfg: C.Config, world_size: int) -> str:
    b = cfg.parallel.backend
    if b == "auto":
        return "ddp" if world_size > 1 else "none"
    if b == "none" and world_size > 1:
        # each rank would train its own replica, never averaged, while the logged loss looked fine
        raise C.ConfigError(f"parallel.backend=none with {world_size} ranks: the replicas would never synchronise; "
                            f"use parallel.backend=ddp, fsdp2 or deepspeed (or auto)")
    return b


def use_bf16(cfg: C.Config, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def lr_lambda(ocfg: C.OptimConfig, total_steps: int):
    def fn(step: int) -> float:  # step: optimizer steps taken so far
        if ocfg.warmup_steps > 0 and step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        if ocfg.schedule == "cosine":
            span = max(1, total_steps - ocfg.warmup_steps)
            progress = min(1.0, (step - ocfg.warmup_steps) / span)
            return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return fn


def build_optimizer(params, ocfg: C.OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = ocfg.fused if ocfg.fused is not None else device.type == "cuda"
    kwargs: dict[str, Any] = {"lr": ocfg.lr, "betas": tuple(ocfg.betas), "eps": ocfg.eps,
                              "weight_decay": ocfg.weight_decay}
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(params, **kwargs)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``: a function of (seed, step) only, never of rank."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1))
    return g


def _local_shard(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of parameter ``p``: FSDP2's local shard of a DTensor, ZeRO-3's partition
    (``ds_tensor``: the parameter itself is an empty placeholder outside a forward), else ``p``."""
    part = getattr(p, "ds_tensor", None)
    return part if part is not None and p.numel() == 0 else local_tensor(p)


def split_batch(global_batch: int, world: int, micro: Optional[int]) -> tuple[int, int, int]:
    """(per-rank batch, micro-batch, accumulation steps), with errors that name the keys."""
    if global_batch % world:
        raise C.ConfigError(
            f"data.global_batch_size={global_batch} is not divisible by the world size {world}"
        )
    per_rank = global_batch // world
    micro = micro or per_rank
    if micro < 1 or per_rank % micro:
        raise C.ConfigError(
            f"data.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
            f"(data.global_batch_size={global_batch} over {world} ranks)"
        )
    return per_rank, micro, per_rank // micro


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------

def _saved_section(tstate: dict[str, Any], section: str) -> dict[str, Any]:
    """One section of the config recorded in a checkpoint's trainer.json ({} when not recorded)."""
    return (tstate.get("config") or {}).get(section) or {}


class Trainer:
    def __init__(self, cfg: C.Config, run_dir: str | Path, resume: str = "auto"):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.dist: DistInfo = init_distributed(
            cfg.train.device, need_group=cfg.parallel.backend in ("fsdp2", "deepspeed")
        )
        self.device = self.dist.device
        self.backend = resolve_backend(cfg, self.dist.world_size)
        if self.backend == "ddp" and self.dist.world_size == 1:
            self.backend = "none"  # DDP over one rank only adds hooks
        self.bf16 = use_bf16(cfg, self.device)
        self.per_rank, self.micro, self.accum = split_batch(
            cfg.data.global_batch_size, self.dist.world_size, cfg.data.micro_batch_size
        )
        self.step = 0
        self.tracker = None
        self.engine = None  # DeepSpeed engine, when that backend is used
        self._feature_net = None  # the evaluation's Inception network (rank 0), loaded once
        self.trace_window = None  # train.profile_at's profiler window (mpdit_dist.profiling.TraceWindow)
        # the logged loss's window: this rank's summed step losses since the last log, and their
        # count; saved with a checkpoint, so a resume between two log steps logs the same mean
        self._window_loss = torch.zeros((), device=self.device)
        self._window_n = 0
        # the sample grid and/or evaluation of the resumed step that the stopped run left for this
        # one (its checkpoint's "owed"), made before the first step: see _make_owed_outputs
        self._owed: list[str] = []
        self.ckpt = CheckpointManager(self.run_dir, rank=self.dist.rank, keep_last=cfg.checkpoint.keep_last,
                                      keep_every=cfg.checkpoint.keep_every)

    # -------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            C.save_config(cfg, self.run_dir / "config.yaml")
        if d.distributed:
            dist.barrier()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        from .data import build_loader

        self.loader = build_loader(cfg.data, rank=d.rank, world_size=d.world_size, seed=cfg.train.seed,
                                   run_dir=str(self.run_dir))
        self.manifest = self.loader.manifest
        self.model_args = C.model_args_from(cfg.model)
        self._check_data_fits_model()
        if d.is_main:
            self._report_dataset()

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and run
        from .models import MPDiT

        model = MPDiT(self.model_args)
        if cfg.train.init_from:
            from .export import load_weights_into

            load_weights_into(model, cfg.train.init_from, self.manifest if cfg.data.normalize else None)
        self.model_args = model.args
        self.flops_per_image = train_flops_per_image(self.model_args)
        model.to(self.device)
        self.flow = FlowMatching.from_config(cfg.flow, self.model_args.num_classes)
        self.sample_shape = (self.model_args.in_channels, self.model_args.input_size, self.model_args.input_size)

        if self.backend == "deepspeed":
            from .distributed.deepspeed_backend import build_engine
            from .distributed.parallelize import apply_checkpointing_and_compile

            apply_checkpointing_and_compile(model, cfg.parallel, self.backend)
            self.raw_model = model
            self.engine, self.optimizer, self.scheduler = build_engine(
                model, cfg, self.dist, self.micro, self.accum, lr_lambda(cfg.optim, cfg.train.steps), self.bf16
            )
            self.model = self.engine
        else:
            from .distributed.parallelize import parallelize

            self.raw_model = model
            self.model = parallelize(model, cfg.parallel, d, self.backend, mixed_precision=self.bf16)
            self.optimizer = build_optimizer(self.raw_model.parameters(), cfg.optim, self.device)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim, cfg.train.steps))
        if d.is_main:
            from .distributed.parallelize import describe_wrappers

            log.info("model %s, backend %s: %s", cfg.model.name, self.backend, describe_wrappers(self.raw_model))
        if self.engine is not None:
            from .distributed.deepspeed_backend import make_ema

            self.ema = make_ema(self)  # sharded like ZeRO-3's partitions, at every stage
        else:
            self.ema = EMA(self.raw_model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step)
        self.peak_flops = device_peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self._check_sampling_inputs()

    def _check_sampling_inputs(self) -> None:
        """Collective: rank 0, which decodes the sample grids and computes the evaluation, checks
        before the first step what they will need: the dataset's VAE (a dry decode of one latent,
        which also loads it), the reference batch and the Inception weights (loaded). A problem is a
        :class:`ConfigError` on every rank. Found only at the first grid, it would have stopped the
        run on rank 0 alone, after ``train.sample_every`` steps of training."""
        cfg = self.cfg
        if cfg.train.sample_every <= 0 and cfg.train.eval_every <= 0:
            return
        problems: list[str] = []
        if self.dist.is_main:
            due = [f"train.{k}={getattr(cfg.train, k)}" for k in ("sample_every", "eval_every")
                   if getattr(cfg.train, k) > 0]
            try:
                decode_to_uint8(torch.zeros((1, *self.sample_shape)), self.manifest, self.device, cfg.data.normalize)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                problems.append(f"{' and '.join(due)} decode samples through the dataset's encoder "
                                f"{self.manifest.get('encoder')!r} (from its manifest), which failed here: "
                                f"{type(exc).__name__}: {exc}")
            if cfg.train.eval_every > 0:
                missing = [f"train.{k}={getattr(cfg.train, k)}" for k in ("eval_reference", "eval_inception")
                           if not Path(getattr(cfg.train, k)).is_file()]
                if missing:
                    problems.append(f"train.eval_every={cfg.train.eval_every}: no such file: {', '.join(missing)}")
                else:
                    try:
                        self._load_feature_net()
                    except Exception as exc:  # noqa: BLE001 - reported on every rank below
                        problems.append(f"train.eval_inception={cfg.train.eval_inception} could not be loaded: "
                                        f"{type(exc).__name__}: {exc}")
        if self.dist.distributed:
            problems = broadcast_object(problems)
        if problems:
            raise C.ConfigError("; ".join(problems))

    def _load_feature_net(self):
        if self._feature_net is None:
            from .inception import load_feature_net

            cfg = self.cfg.train
            self._feature_net = load_feature_net(cfg.eval_inception, self.device, input_size=cfg.eval_input_size)
        return self._feature_net

    def _check_data_fits_model(self) -> None:
        m, a = self.manifest, self.model_args
        shape = list(m.get("latent_shape", []))
        want = [a.in_channels, a.input_size, a.input_size]
        if shape and shape != want:
            raise C.ConfigError(
                f"data at {self.cfg.data.path} holds latents of shape {shape}, but the model expects {want}: "
                f"set model.in_channels={shape[0]} model.input_size={shape[1]}"
            )
        n = m.get("num_classes")
        if n is not None and n > a.num_classes:
            raise C.ConfigError(
                f"data at {self.cfg.data.path} has {n} classes but model.num_classes={a.num_classes}"
            )

    def dataset_facts(self) -> dict[str, Any]:
        """What the training data is, for the log and the MLflow params (``dataset.*``): its id, size,
        and what the encode left out (images that failed, files skipped), which only its manifest
        records (absent keys: a memory dataset or an older manifest)."""
        m = self.manifest
        facts = {"id": getattr(self.loader, "dataset_id", None), "num_samples": m.get("num_samples")}
        for key in ("num_failed", "num_skipped_files", "encoder"):
            if m.get(key) is not None:
                facts[key] = m[key]
        return {k: v for k, v in facts.items() if v is not None}

    def _report_dataset(self) -> None:
        f = self.dataset_facts()
        left_out = f.get("num_failed", 0) + f.get("num_skipped_files", 0)
        log.log(logging.WARNING if left_out else logging.INFO,
                "data %s (%s): %s samples; at encode time %s image(s) failed and %s file(s) were skipped%s",
                self.cfg.data.path, f.get("id", "-"), f.get("num_samples", "?"), f.get("num_failed", "?"),
                f.get("num_skipped_files", "?"), " (listed in its manifest.json)" if left_out else "")

    # -------------------------------------------------------------------------------------------
    def _tensor_state(self) -> dict[str, Any]:
        """Model, EMA and optimizer state under clean parameter names (DCP-friendly)."""
        if self.engine is not None:
            from .distributed.deepspeed_backend import tensor_state

            return tensor_state(self)
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.raw_model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema.state_dict()}

    def _set_tensor_state(self, state: dict[str, Any]) -> None:
        if self.engine is not None:
            from .distributed.deepspeed_backend import set_tensor_state

            return set_tensor_state(self, state)
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.raw_model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.ema.load_state_dict(state["ema"])

    def trainer_state(self, log_window: Optional[dict[str, Any]] = None,
                      owed: Optional[list[str]] = None) -> dict[str, Any]:
        """What trainer.json records. ``owed``: the outputs of this step (``"samples"``, ``"eval"``)
        that a stopping run skipped, for the resumed run to make first (see :meth:`_owed_from`)."""
        return {
            "step": self.step,
            "log_window": log_window,
            "owed": {"step": self.step, "outputs": list(owed)} if owed else None,
            "epoch": getattr(self.loader, "epoch", None),
            "data": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
            "world_size": self.dist.world_size,
            "global_batch_size": self.cfg.data.global_batch_size,
            "backend": self.backend,
            "deepspeed": self._deepspeed_settings(),
            "model_args": self.model_args.to_dict(),
            "config": C.to_dict(self.cfg),
            "manifest": self.manifest,
            "code": code_version(),
        }

    def _deepspeed_settings(self) -> Optional[dict[str, Any]]:
        """What the DeepSpeed engine's checkpoint files depend on (its ZeRO stage and its precision,
        as the engine runs them: a user JSON may set them), or None under the other backends."""
        if self.engine is None:
            return None
        e = self.engine
        return {"zero_stage": int(e.zero_optimization_stage()), "bf16": bool(e.bfloat16_enabled()),
                "fp16": bool(e.fp16_enabled())}

    def _check_deepspeed_resumable(self, tstate: dict[str, Any], path: Path) -> None:
        """DeepSpeed's files differ by ZeRO stage and precision (bf16 or fp16 runs keep fp32 masters in
        optimizer files of other names and contents): refuse another stage or precision before
        anything is read, naming the keys. Checkpoints that predate the record: their config's
        ``parallel.zero_stage``, and ``train.precision`` when it was explicit (bf16 or fp32). Called
        for a DeepSpeed checkpoint only, so this run is a DeepSpeed run too (``_check_resumable``)."""
        mine = self._deepspeed_settings()
        saved_parallel = _saved_section(tstate, "parallel")
        saved_precision = _saved_section(tstate, "train").get("precision")
        theirs = dict(tstate.get("deepspeed") or {})
        if not theirs:
            stage = saved_parallel.get("zero_stage")
            if stage is not None:
                theirs["zero_stage"] = int(stage)
            if saved_precision in ("bf16", "fp32") and not saved_parallel.get("deepspeed_config"):
                theirs["bf16"], theirs["fp16"] = saved_precision == "bf16", False
        if "zero_stage" in theirs and theirs["zero_stage"] != mine["zero_stage"]:
            raise C.ConfigError(
                f"checkpoint {path} was written with parallel.zero_stage={theirs['zero_stage']}, this run has "
                f"parallel.zero_stage={mine['zero_stage']}: DeepSpeed's files of one ZeRO stage do not load into "
                f"another. Resume with parallel.zero_stage={theirs['zero_stage']}"
            )
        changed = [k for k in ("bf16", "fp16") if k in theirs and bool(theirs[k]) != mine[k]]
        if changed:
            raise C.ConfigError(
                f"checkpoint {path} was written by DeepSpeed with "
                + ", ".join(f"{k}.enabled={bool(theirs[k])}" for k in changed)
                + ", this run has " + ", ".join(f"{k}.enabled={mine[k]}" for k in changed)
                + f" (train.precision={saved_precision} there, {self.cfg.train.precision} here): DeepSpeed keeps the "
                f"weights and the optimizer state of a bf16/fp16 run in other files than those of an fp32 run, "
                f"and cannot load one into the other. Resume with train.precision="
                f"{'bf16' if theirs.get('bf16') else 'fp32'}"
                + (" and the checkpoint's parallel.deepspeed_config"
                   if saved_parallel.get("deepspeed_config") or self.cfg.parallel.deepspeed_config
                   else "")
                + ", or start a new run dir with train.init_from=<exported weights>"
            )

    def _engine_io(self):
        """(writer, reader) of DeepSpeed's own sharded files inside a checkpoint directory."""
        if self.engine is None:
            return None, None
        from .distributed.deepspeed_backend import load_engine, save_engine

        return (lambda d: save_engine(self, d)), (lambda d: load_engine(self, d))

    def _log_window_state(self) -> dict[str, Any]:
        """Collective: the logged loss's window since the last log, {"steps": n, "loss": [each rank's
        sum, in rank order]}. Every rank has taken the same steps, so all skip the gather alike when
        the window is empty (a save at a log step)."""
        if self._window_n == 0:
            return {"steps": 0, "loss": []}
        local = self._window_loss.detach().float().reshape(1)
        parts = [local]
        if self.dist.distributed:
            parts = [torch.empty_like(local) for _ in range(self.dist.world_size)]
            dist.all_gather(parts, local)
        return {"steps": self._window_n, "loss": [float(p) for p in parts]}

    def _restore_log_window(self, window: Optional[dict[str, Any]]) -> None:
        """The window of :meth:`_log_window_state` back on this run's ranks: each rank its own sum on
        the same world size (bit for bit); on another, rank 0 holds the old ranks' mean times this
        world size (the logged mean is the sum over ranks / world / steps), the others nothing."""
        sums, n = (window or {}).get("loss") or [], int((window or {}).get("steps") or 0)
        if not sums or n == 0:
            return
        world, rank = self.dist.world_size, self.dist.rank
        if len(sums) == world:
            mine = sums[rank]
        else:
            mine = sum(sums) / len(sums) * world if rank == 0 else 0.0
        self._window_loss = torch.tensor(mine, dtype=torch.float32, device=self.device)
        self._window_n = n

    def save_checkpoint(self, owed: Optional[list[str]] = None) -> Path:
        """Collective. ``owed``: this step's sample grid and/or evaluation, skipped by a stopping run
        and recorded in the checkpoint for the resumed run to make."""
        path = self.ckpt.save(self.step, self._tensor_state(), self.trainer_state(self._log_window_state(), owed),
                              extra_writer=self._engine_io()[0],
                              async_save=self.cfg.checkpoint.async_save and self.engine is None)
        if self.dist.is_main:
            log.info("saved checkpoint %s", path)
        return path

    def check_run_dir(self) -> None:
        """Before anything is written into the run directory (collective): finish what a crash left
        (:meth:`CheckpointManager.clean_partial`), refuse a ``--resume PATH`` that is no published
        checkpoint (:meth:`CheckpointManager.check_resume_path`), and refuse to start a second run in a directory
        that holds checkpoints: ``--resume never``, or ``--resume PATH`` of another directory's
        checkpoint. (``--resume PATH`` of an older checkpoint of this directory is a decision to go
        back: the later checkpoints are moved aside after the load, see :meth:`maybe_resume`.)"""
        self.ckpt.clean_partial()
        self.ckpt.check_resume_path(self.resume)
        self.ckpt.refuse_second_run(self.resume)

    def maybe_resume(self) -> None:
        """Load the checkpoint that ``resume`` names (``auto``: the newest intact one of this run
        directory). Checkpoints of later steps in this directory (skipped as damaged, or the future
        of an older ``--resume PATH``) are then moved into ``checkpoints/superseded-<time>/``: one
        history per run directory."""
        if self.resume == "never":
            return
        path = Path(self.resume) if self.resume != "auto" else self.ckpt.find_latest()
        if path is None:
            return
        state = self._tensor_state()
        tstate = self.ckpt.load(path, state, extra_reader=self._engine_io()[1],
                                check=lambda t: self._check_resumable(t, path))
        self._set_tensor_state(state)
        self.step = int(tstate["step"])
        if self.scheduler is not None and tstate.get("scheduler"):
            self.scheduler.load_state_dict(tstate["scheduler"])
        self._apply_optim_config()
        self._report_flow_changes(tstate, path)
        self.loader.load_state_dict(tstate["data"], allow_batch_change=self.cfg.checkpoint.allow_batch_change)
        self._restore_log_window(tstate.get("log_window"))
        self._owed = self._owed_from(tstate, path)
        if self.ckpt.holds(path):
            self.ckpt.supersede_after(self.step)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (written by %d ranks, now %d)", path, self.step,
                     tstate.get("world_size", 0), self.dist.world_size)

    def _owed_from(self, tstate: dict[str, Any], path: Path) -> list[str]:
        """The outputs of the checkpoint's step that the run which wrote it owes (stopped at that step
        before making them), which this run's config still asks for. Every rank gets rank 0's
        trainer.json, so every rank gets the same list (the outputs are collective). A checkpoint of
        older code has no ``owed``: nothing owed."""
        owed = tstate.get("owed")
        if not owed:
            return []
        step = int(tstate["step"])
        outputs = owed.get("outputs") if isinstance(owed, dict) and owed.get("step") == step else None
        if not isinstance(outputs, list) or any(o not in OUTPUTS for o in outputs):
            if self.dist.is_main:
                log.warning("checkpoint %s: unreadable record of owed outputs %r (expected {\"step\": %d, "
                            "\"outputs\": a list of %s}); nothing made for it", path, owed, step, ", ".join(OUTPUTS))
            return []
        t = self.cfg.train
        wanted = {"samples": t.sample_every > 0, "eval": t.eval_every > 0}
        dropped = [o for o in outputs if not wanted[o]]
        if dropped and self.dist.is_main:
            log.warning("checkpoint %s: its run stopped before making the %s of step %d; not made, since this "
                        "run's config turns the %s off (train.sample_every=%d, train.eval_every=%d)", path,
                        describe_outputs(outputs), step, describe_outputs(dropped), t.sample_every, t.eval_every)
        return [o for o in outputs if wanted[o]]

    def _apply_optim_config(self) -> None:
        """After a resume: the learning rate, betas, eps and weight decay are this run's config's.
        The optimizer and scheduler states carry the values they were saved with, which would
        otherwise silently win, so resuming with, say, a lower ``optim.lr`` after a divergence
        would change nothing. Unchanged settings leave the state bit for bit as saved (an exact
        resume); changed ones are logged. A scheduler from a user's DeepSpeed JSON is left alone."""
        sched = self.scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return
        o = self.cfg.optim
        want = {"betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        changed: dict[str, tuple[Any, Any]] = {}
        if any(b != o.lr for b in sched.base_lrs):
            changed["lr"] = (sched.base_lrs[0], o.lr)
        sched.base_lrs = [o.lr] * len(sched.base_lrs)
        for group, lmbda in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            for key, value in want.items():
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changed[key] = (old, value)
                    group[key] = value
            group["initial_lr"] = o.lr
            group["lr"] = o.lr * lmbda(sched.last_epoch)  # what the scheduler's last step would have set
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]  # get_last_lr() agrees
        if changed and self.dist.is_main:
            log.warning("resumed with optimizer settings other than the checkpoint's; this run's config applies "
                        "from here: %s", ", ".join(f"optim.{k} {a} -> {b}" for k, (a, b) in changed.items()))

    def _report_flow_changes(self, tstate: dict[str, Any], path: Path) -> None:
        """The training objective's settings (``flow.*``) apply from the resume on, like the
        optimizer's: changed ones are logged, naming both values, never taken silently."""
        saved = _saved_section(tstate, "flow")
        mine = C.to_dict(self.cfg)["flow"]
        changed = [f"flow.{k} {saved[k]} -> {v}" for k, v in mine.items() if k in saved and saved[k] != v]
        if changed and self.dist.is_main:
            log.warning("resumed from %s with training objective settings other than the checkpoint's; this run's "
                        "config applies from here: %s", path, ", ".join(changed))

    def _check_resumable(self, tstate: dict[str, Any], path: Path) -> None:
        """Raise, naming the checkpoint and the keys, when this run cannot continue it. Called on
        every rank with rank 0's trainer.json, before any tensor is read."""
        old = tstate.get("global_batch_size")
        if old != self.cfg.data.global_batch_size and not self.cfg.checkpoint.allow_batch_change:
            raise C.ConfigError(
                f"checkpoint {path} was trained with data.global_batch_size={old}, this run has "
                f"{self.cfg.data.global_batch_size}: resuming would change the data order and the optimisation. "
                f"Set checkpoint.allow_batch_change=true to continue anyway."
            )
        # none, DDP and FSDP2 save the same DCP state (get_state_dict), so they resume each other;
        # DeepSpeed keeps weights and optimizer in its own files and shards the EMA flat
        saved = tstate.get("backend")
        if saved is not None and (saved == "deepspeed") != (self.backend == "deepspeed"):
            raise C.ConfigError(
                f"checkpoint {path} was written with parallel.backend={saved}, this run has "
                f"parallel.backend={self.backend}: DeepSpeed checkpoints and those of the other backends "
                f"(none, ddp, fsdp2) cannot load each other. Resume with parallel.backend={saved}, or "
                f"start a new run dir with train.init_from=<exported weights>"
            )
        if saved == "deepspeed":
            self._check_deepspeed_resumable(tstate, path)
        from .models import ModelArgs

        try:  # model_args, or the config of a checkpoint written before model_args was recorded
            saved_args = (ModelArgs(**tstate["model_args"]) if tstate.get("model_args")
                          else C.model_args_from(C.from_dict(tstate["config"]).model))
        except Exception:  # noqa: BLE001 - a record that no longer parses: DCP will tell
            saved_args = None
        if saved_args is not None:
            diff = [f"model.{k}={theirs} there, {mine} here"
                    for k, (mine, theirs) in self.model_args.differences(saved_args).items()]
            if diff:
                raise C.ConfigError(
                    f"checkpoint {path} holds another model architecture: {'; '.join(diff)}. "
                    f"Resume with the checkpoint's model settings, or start a new run dir"
                )
        # the model's input space: standardised latents or the stored ones, and with which statistics
        # (sampling decodes alike); checkpoints from before data.latent_stats used the measured ones
        saved, data = _saved_section(tstate, "data"), self.cfg.data
        input_space = [("normalize", saved.get("normalize"), bool(data.normalize),
                        "of another scale than it learned (and its samples be decoded wrongly)")]
        if data.normalize:
            input_space.append(("latent_stats", saved.get("latent_stats", "measured"), data.latent_stats,
                                "standardised with other statistics"))
        for key, theirs, ours, what in input_space:
            if theirs is not None and theirs != ours:
                raise C.ConfigError(
                    f"checkpoint {path} was trained with data.{key}={theirs}, this run has data.{key}={ours}: the "
                    f"model would continue on latents {what}. Resume with data.{key}={theirs}, or start a new run "
                    f"dir with train.init_from=<exported weights>"
                )
        # the data stream (seed, shuffle, dataset): refused here, before the tensors are read
        try:
            self.loader.check_state(tstate["data"], allow_batch_change=self.cfg.checkpoint.allow_batch_change)
        except ValueError as exc:
            saved_data = _saved_section(tstate, "data").get("path")
            where = (f" (data.path={saved_data} there, {self.cfg.data.path} here)"
                     if saved_data is not None and saved_data != self.cfg.data.path else "")
            raise C.ConfigError(f"checkpoint {path} cannot continue its data stream in this run{where}: {exc}") from exc

    # -------------------------------------------------------------------------------------------
    @property
    def autocast_bf16(self) -> bool:
        """bf16 autocast for DDP, FSDP2 and one device. Under DeepSpeed the engine owns precision:
        its bf16 mode keeps bf16 weights and it switches an outer CUDA autocast off inside forward
        anyway (a ``torch_autocast`` section in a user's JSON is its own way to ask for autocast),
        so the trainer adds none, and a CPU run takes the same path as a CUDA run. The model brings
        its fp32 inputs to the weights' dtype itself (MPDiT.forward)."""
        return self.bf16 and self.engine is None

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _no_sync(self, last: bool):
        if last or self.accum == 1:
            return contextlib.nullcontext()
        if self.backend == "ddp":
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's part of the global batch. Returns (loss, grad_norm)
        as device tensors (no host synchronisation)."""
        x = batch["x"].to(self.device, non_blocking=True)
        y = batch["y"].to(self.device, non_blocking=True)
        gen = step_generator(self.cfg.train.seed, self.step, self.device)
        draw = self.flow.draw(self.cfg.data.global_batch_size, self.sample_shape, gen, self.device)
        start = self.dist.rank * self.per_rank
        draw = draw.slice(start, start + self.per_rank)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(self.accum):
            sl = slice(i * self.micro, (i + 1) * self.micro)
            last = i == self.accum - 1
            if self.backend == "fsdp2":
                self.model.set_requires_gradient_sync(last)
            elif self.engine is not None:
                # the trainer calls engine.step() once per optimizer step, so DeepSpeed's own
                # micro-step count cannot tell the boundary: say it (reduction happens there)
                self.engine.set_gradient_accumulation_boundary(last)
            with self._no_sync(last), self._autocast():
                per_sample = self.flow.per_sample_loss(self.model, x[sl], y[sl], draw.slice(sl.start, sl.stop))
                # sum / per-rank batch: accumulation adds up to this rank's mean; the data-parallel
                # gradient average over ranks then gives the global-batch mean
                loss = per_sample.sum() / self.per_rank
            if self.engine is not None:
                # the loss is already divided by the per-rank batch: no extra 1/accum scaling
                self.engine.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
            loss_sum += loss.detach()
        self.last_lr = self.current_lr()  # the rate this step applies (the scheduler moves on below)
        if self.engine is not None:
            self.engine.step()
            grad_norm = torch.as_tensor(self.engine.get_global_grad_norm() or 0.0, device=self.device)
        else:
            grad_norm = self.optimizer_step()
        self.step += 1
        self.ema.update(self.raw_model, self.step)
        return loss_sum, grad_norm

    def optimizer_step(self) -> torch.Tensor:
        """Gradient norm, clipping (``optim.grad_clip > 0``), AdamW, zero_grad and the LR schedule
        (every backend but DeepSpeed, whose engine does its own). Returns the total gradient norm
        before clipping, a device tensor (a replicated DTensor under FSDP2).

        With clipping off (the paper recipes) the norm is only measured: ``clip_grad_norm_`` with an
        infinite bound would still multiply every gradient by 1.0, a full read and write of the
        gradients (about 1.3 ms a step for MPDiT-XL/4x on an H100) that changes nothing."""
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.raw_model.parameters(), clip, grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -------------------------------------------------------------------------------------------
    def _make_tracker(self):
        from .tracking import Tracker

        params = C.flatten(C.to_dict(self.cfg))
        params.update({f"dataset.{k}": v for k, v in self.dataset_facts().items()})
        tags = {
            "model": self.cfg.model.name,
            "world_size": str(self.dist.world_size),
            "backend": self.backend,
            "num_nodes": str(self.dist.num_nodes),
        }
        # config.yaml: rewritten by every start (build), logged before the start compares the run
        # directory with the MLflow run's artifacts
        return Tracker(self.cfg.tracking, self.run_dir, rank=self.dist.rank,
                       results_dir=Path(self.cfg.results_dir), params=params, tags=tags,
                       artifacts=[self.run_dir / "config.yaml"])

    def _stop_if_diverged(self, first_bad: torch.Tensor, weights: bool = False) -> None:
        """Collective, at steps every rank reaches alike: raise :class:`TrainingDiverged` on every
        rank once any rank has seen a non-finite loss or gradient norm (or, with ``weights``, holds
        a non-finite weight: an update can overflow after a finite step). Called at every log step and
        before any sample grid, evaluation or checkpoint, so a diverged state is never saved: retention would otherwise delete
        the good checkpoints one save after another, and a resume would continue the divergence."""
        bad = torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, _NONE_BAD))
        if weights:
            local = [_local_shard(p) for p in self.raw_model.parameters()]
            checks = [torch.isfinite(t).all() for t in local if t.numel()]
            if checks:
                finite = torch.stack(checks).all().to(bad.device)
                bad = torch.where(finite, bad, torch.minimum(bad, torch.full_like(bad, self.step)))
        if self.dist.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        step = int(bad)
        if step == _NONE_BAD:
            return
        ckpts = [p.name for _, p in list_checkpoints(self.ckpt.root)]
        raise TrainingDiverged(
            f"training diverged: the loss, the gradient norm or the weights were not finite at step {step} (the "
            f"first such step on any rank); stopped at step {self.step} without saving this state. Newest checkpoint: "
            f"{ckpts[0] if ckpts else 'none'} in {self.ckpt.root}. Resume from it (--resume auto) or, since the "
            f"last steps before a divergence may already have ruined the weights, from an earlier one (--resume "
            f"PATH), with for example a lower optim.lr, a longer optim.warmup_steps or optim.grad_clip > 0")

    def _reduce_loss(self, loss: torch.Tensor) -> float:
        if self.dist.distributed:
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= self.dist.world_size
        return float(loss)

    def final_outputs(self) -> list[str]:
        """What a run makes at its last step, after the final checkpoint: the sample grid (whenever
        ``train.sample_every`` > 0) and the evaluation (when ``train.steps`` is a multiple of
        ``train.eval_every``, as during training)."""
        t = self.cfg.train
        return (["samples"] if t.sample_every > 0 else []) + \
            (["eval"] if t.eval_every > 0 and t.steps % t.eval_every == 0 else [])

    def _record_final_outputs(self) -> None:
        if self.dist.is_main:
            from .fileio import write_json_atomic

            write_json_atomic(self.run_dir / FINAL_OUTPUTS, {"step": self.step, "outputs": self.final_outputs()})

    def _make_owed_outputs(self) -> list[str]:
        """Collective (every rank has the same list, see :meth:`_owed_from`; sampling and evaluation
        are collective): before the first step, make the sample grid and/or evaluation that the run
        stopped at the resumed step skipped (recorded as owed in its checkpoint), at that step from
        the checkpoint's weights and EMA, as an uninterrupted run made them: the grid files of that
        step, the ``eval/*`` metrics logged at that step. Returns what was made. A run that stops
        again before this is done resumes from the same checkpoint and makes them then."""
        owed, self._owed = self._owed, []
        if not owed:
            return []
        if self.dist.is_main:
            log.info("making the %s of step %d first: the run stopped at that step before making %s",
                     describe_outputs(owed), self.step, "them" if len(owed) > 1 else "it")
        if "samples" in owed:
            self.sample_grid()
        if "eval" in owed:
            self.evaluate()
        if self.dist.is_main:
            log.info("made the postponed %s of step %d; training on", describe_outputs(owed), self.step)
        return owed

    def _make_missing_final_outputs(self, made: Optional[list[str]] = None) -> None:
        """Collective. A run started again at its last step (stopped after the final checkpoint but
        before its final sample grid or evaluation was made: a crash or an out-of-memory error in the
        evaluation, a kill) makes what ``final_outputs.json`` does not list yet. A run finished before
        that file existed makes them again. ``made``: those just made as owed by a stopped run
        (:meth:`_make_owed_outputs`), not made twice."""
        record = None
        if self.dist.is_main:
            path = self.run_dir / FINAL_OUTPUTS
            try:
                record = json.loads(path.read_text())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                log.warning("%s is unreadable (%s): making the end-of-run outputs again", path, exc)
        record = broadcast_object(record)
        done = set(record.get("outputs", [])) if isinstance(record, dict) and record.get("step") == self.step else set()
        todo = [o for o in self.final_outputs() if o not in done and o not in (made or [])]
        if not todo:
            if made:
                self._record_final_outputs()
            return
        if self.dist.is_main:
            log.info("run at its last step %d without its end-of-run %s: making them now", self.step,
                     " and ".join(todo))
        if "samples" in todo:
            self.sample_grid()
        if "eval" in todo:
            self.evaluate()
        self._record_final_outputs()

    def sample_grid(self) -> Optional[Path]:
        fault_point("sample", self.step)
        classes = [c % self.model_args.num_classes for c in self.cfg.train.sample_classes]
        paths = []
        with self.ema.swapped_into(self.raw_model):
            for scale in (1.0, self.cfg.train.sample_cfg_scale):
                lat = generate(self.model, self.model_args, classes, seed=self.cfg.train.seed, cfg_scale=scale,
                               sampler=self.cfg.train.sample_sampler, steps=self.cfg.train.sample_steps,
                               device=self.device, bf16=self.autocast_bf16)
                if self.dist.is_main:
                    bad = nonfinite_samples(lat)
                    if bad:
                        log.warning("sample grid of step %d (cfg %g): %d of %d samples are non-finite (NaN or inf "
                                    "latents), black in the grid: %s", self.step, scale, len(bad), len(classes), bad)
                    imgs = decode_to_uint8(lat, self.manifest, self.device, self.cfg.data.normalize)
                    path = self.run_dir / "samples" / f"step_{self.step:08d}_cfg{scale:g}.png"
                    distinct = len(set(classes))
                    save_grid(imgs, path, ncol=distinct if distinct <= 16 else None)
                    paths.append(path)
        if self.dist.is_main and self.tracker is not None:
            for p in paths:
                self.tracker.log_run_file(p)
        return paths[-1] if paths else None

    def evaluate(self) -> Optional[dict[str, Any]]:
        """FID & co. of ``train.eval_num_samples`` EMA samples (balanced classes, split over ranks),
        computed on rank 0 and logged as ``eval/*`` at this step."""
        from .sample import plan_labels

        fault_point("eval", self.step)
        cfg, d = self.cfg, self.dist
        labels = plan_labels(range(self.model_args.num_classes), cfg.train.eval_num_samples, None,
                             cfg.train.seed, balanced=True)
        per = math.ceil(len(labels) / d.world_size)
        start = d.rank * per
        mine = labels[start:start + per]
        images, nonfinite = [], 0
        with self.ema.swapped_into(self.raw_model):
            for i in range(0, per, self.micro):  # every rank runs the same number of forwards (FSDP)
                chunk = mine[i:i + self.micro] or [0]
                lat = generate(self.model, self.model_args, chunk, seed=cfg.train.seed + 1, cfg_scale=cfg.train.eval_cfg_scale,
                               sampler=cfg.train.sample_sampler, steps=cfg.train.sample_steps, device=self.device,
                               bf16=self.autocast_bf16, offset=start + i)
                if mine[i:i + self.micro]:
                    nonfinite += len(nonfinite_samples(lat))
                    images.append(decode_to_uint8(lat, self.manifest, self.device, self.cfg.data.normalize))
        local = (np.concatenate(images) if images else np.zeros((0,), np.uint8), nonfinite)
        if d.distributed:
            gathered = [None] * d.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        if not d.is_main:
            return None
        nonfinite = sum(n for _, n in gathered)
        if nonfinite:
            # decoded they are black images: an FID of them would describe a broken model, silently
            log.warning("evaluation at step %d skipped: %d of %d samples came out non-finite (NaN or inf latents); "
                        "logged as eval/nonfinite_samples", self.step, nonfinite, len(labels))
            scalars = {"eval/nonfinite_samples": float(nonfinite)}
            self.tracker.log_metrics(scalars, step=self.step)
            return scalars
        from .evaluate import compute_metrics

        samples = np.concatenate([g for g, _ in gathered if g.size])
        metrics = compute_metrics(samples, cfg.train.eval_reference, self._load_feature_net(), device=self.device)
        scalars = {f"eval/{k}": float(metrics[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall")
                   if metrics.get(k) is not None}
        self.tracker.log_metrics(scalars, step=self.step)
        return scalars

    def fit(self) -> dict[str, Any]:
        self.check_run_dir()
        self.build()
        self.maybe_resume()
        self.tracker = self._make_tracker()
        status = "finished"
        try:
            status = self._loop()
        except BaseException:
            # no collective here (the other ranks may be elsewhere): let a pending async write reach
            # the disk, and the next start make it visible
            self.ckpt.wait_pending()
            if self.tracker:
                self.tracker.close("FAILED")
                self.tracker = None
            raise
        finally:
            if self.trace_window is not None:
                try:
                    self.trace_window.close()  # a run stopped inside the window keeps what was recorded
                except Exception as exc:  # noqa: BLE001 - a trace must not hide how the run ended
                    log.warning("could not write the profile under %s: %s: %s", self.trace_window.out_dir,
                                type(exc).__name__, exc)
            if self.tracker:
                # a preempted job's time until SIGKILL (launch.signal_delay_s) is for the requeue:
                # a tracking server that stopped answering gets seconds, not the usual minute
                self.tracker.close("FINISHED" if status == "finished" else "KILLED",
                                   timeout_s=None if status == "finished" else PREEMPTED_TRACKER_WAIT_S)
            close = getattr(self.loader, "close", None)
            if close is not None:
                close()
        result = {"status": status, "step": self.step, "run_dir": str(self.run_dir)}
        if status == "preempted":
            result["stop_reasons"] = self.stop_reasons
        return result

    def _make_trace_window(self):
        """``train.profile_at``'s window, or None when it is off or already behind this run."""
        tcfg = self.cfg.train
        if tcfg.profile_at <= 0 or self.step >= tcfg.profile_at + tcfg.profile_steps - 1:
            return None
        from .profiling import TraceWindow

        return TraceWindow(tcfg.profile_at, tcfg.profile_steps, self.run_dir / "profile", self.dist.rank, self.device)

    def _report_profile(self, tracer, summary_path: Path) -> None:
        """Rank 0: the profiled window's time by category in the log, its summary in MLflow."""
        cats = tracer.summary["categories"]
        total = tracer.summary["total_ms_per_step"] or 1.0
        log.info("profiled %s (%s per step: %.1f ms; %s); traces of every rank in %s",
                 tracer.steps_label(), tracer.summary["unit"], total,
                 ", ".join(f"{c} {100 * ms / total:.0f}%" for c, ms in list(cats.items())[:6]), tracer.out_dir)
        if self.tracker is not None:
            self.tracker.log_run_file(summary_path)

    def _agreed_stop_reasons(self) -> list[str]:
        """Collective, once the run stops: the reasons (signal names) of the stop requests seen on
        any rank so far, the same list on every rank. The ranks stop together at a vote, but the
        signals may have reached only some of them (or at different steps): what happens next (a
        requeue after the warning signal, or not) must be decided alike on every rank."""
        mine = preemption.stop_reasons()
        gathered = all_gather_object(mine) if self.dist.distributed else [mine]
        return sorted({r for part in gathered for r in part})

    def _loop(self) -> str:
        cfg, d = self.cfg, self.dist
        total = cfg.train.steps
        made = self._make_owed_outputs()
        if self.step >= total:
            if self.step == total:
                self._make_missing_final_outputs(made)
            return "finished"
        bar = None
        if d.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, dynamic_ncols=True, desc="train")
        it = iter(self.loader)
        # the first step whose loss or gradient norm was not finite (-1: none), kept on the device:
        # read only where the loop synchronises anyway (logging, before sampling and checkpoints)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        # window_other: time in sampling, evaluation, checkpointing and profiled steps, which img/s leaves out.
        # window_steps counts this process's steps (for the rates); the loss's window
        # (self._window_loss, self._window_n) may begin before a resume
        window_steps, window_data, window_other, t_window = 0, 0.0, 0.0, time.perf_counter()
        window_profiled = 0  # steps of the window under train.profile_at's profiler
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tracer = self.trace_window = self._make_trace_window()
        while self.step < total:
            t0 = time.perf_counter()
            if tracer is not None:
                tracer.begin_step(self.step + 1)
            batch = next(it)
            t_data = time.perf_counter() - t0
            loss, grad_norm = self.train_step(batch)
            fault_point("step", self.step)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor (no communication)
                grad_norm = grad_norm.full_tensor()
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))
            first_bad.masked_fill_(~finite & (first_bad < 0), self.step)
            self._window_loss += loss
            self._window_n += 1
            step = self.step
            if tracer is not None and tracer.covers(step):
                # a profiled step runs slower than the others: img/s and step_time_s leave it out
                written = tracer.end_step(step)
                window_other += time.perf_counter() - t0
                window_profiled += 1
                if written is not None and d.is_main:
                    self._report_profile(tracer, written)
            else:
                window_data += t_data
                window_steps += 1
            # A stop request during the last step changes nothing: the run finishes (its final
            # sample grid included), and a launcher does not requeue a finished job.
            stop = preemption.stop_requested() and step < total
            # every rank must agree to stop at the same step; the vote is a host sync, so it is
            # taken every STOP_VOTE_EVERY steps (a second or two), not at every step
            if d.distributed:
                if step % STOP_VOTE_EVERY == 0 and step < total:
                    flag = torch.tensor([1.0 if stop else 0.0], device=self.device if d.backend == "nccl" else "cpu")
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop = bool(flag.item())
                else:
                    stop = False  # a rank's own flag waits for the next vote
            log_due = step % cfg.train.log_every == 0 or step == total
            sample_due = cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0
            eval_due = cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0
            ckpt_due = (cfg.train.ckpt_every > 0 and step % cfg.train.ckpt_every == 0) or step == total or stop
            # a stopping run skips this step's sample grid and evaluation: they would take minutes (an
            # FID) of the time before SIGKILL that the requeue needs. Its checkpoint records them as
            # owed, and the resumed run makes them first, from the same weights and EMA at this step
            owed = [o for o, due in zip(OUTPUTS, (sample_due, eval_due)) if due] if stop else []
            if log_due or sample_due or eval_due or ckpt_due:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the step's own kernels count for the step
                # one vote per step, at steps every rank reaches alike: never log, sample from or
                # save a diverged state (the weights too before a save)
                self._stop_if_diverged(first_bad, weights=ckpt_due)
            if log_due:
                elapsed = max(time.perf_counter() - t_window - window_other, 1e-9)
                loss_v = self._reduce_loss(self._window_loss / self._window_n)
                metrics = {
                    "loss": loss_v,
                    "lr": self.last_lr,
                    "grad_norm": float(grad_norm),
                    "epoch": float(getattr(self.loader, "epoch", 0) or 0),
                }
                img_s = None
                if window_steps:  # none when every step of the window was profiled
                    img_s = window_steps * cfg.data.global_batch_size / elapsed
                    metrics.update(img_per_s=img_s, img_per_s_per_gpu=img_s / d.world_size,
                                   data_wait_frac=window_data / elapsed, step_time_s=elapsed / window_steps)
                    if self.peak_flops:
                        metrics["mfu"] = img_s * self.flops_per_image / (self.peak_flops * d.world_size)
                if window_profiled:
                    metrics["profiled_steps"] = window_profiled
                if self.device.type == "cuda" and cfg.train.profile_memory:
                    metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.tracker.log_metrics(metrics, step=step)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_v:.4f}", img_s=f"{img_s:.0f}" if img_s else "-")
                self._window_loss.zero_()
                self._window_n = 0
                window_steps, window_data, window_other, t_window = 0, 0.0, 0.0, time.perf_counter()
                window_profiled = 0
            if bar is not None:
                bar.update(1)
            if sample_due or eval_due or ckpt_due:
                # their time is not the steps': img/s and step_time_s of the window leave it out.
                # The checkpoint first: a sample grid or an evaluation that fails must not cost the
                # step's checkpoint (a resume would then fail at the same step again)
                t_other = time.perf_counter()
                if ckpt_due:
                    self.save_checkpoint(owed)
                    fault_point("after_save", step)
                if sample_due and not stop:
                    self.sample_grid()
                if eval_due and not stop:
                    self.evaluate()
                window_other += time.perf_counter() - t_other
            if stop:
                self.ckpt.finalize()  # the preemption checkpoint must be complete before we leave
                self.stop_reasons = self._agreed_stop_reasons()
                if d.is_main:
                    log.warning("stop requested (%s): stopped at step %d of %d with its checkpoint %s; continue "
                                "with --resume auto", ", ".join(self.stop_reasons) or "?", step, total,
                                self.ckpt.root / step_dir_name(step))
                    if owed:
                        log.warning("skipped the %s due at step %d, recorded as owed in its checkpoint: the "
                                    "resumed run makes %s for that step before it trains on",
                                    describe_outputs(owed), step, "them" if len(owed) > 1 else "it")
                if bar is not None:
                    bar.close()
                return "preempted"
        self.ckpt.finalize()
        if bar is not None:
            bar.close()
        if cfg.train.sample_every > 0 and total % cfg.train.sample_every != 0:
            self.sample_grid()
        self._record_final_outputs()
        return "finished"


def train(cfg: C.Config, run_dir: str | Path, resume: str = "auto") -> dict[str, Any]:
    """Run (or continue) a training run; returns {"status", "step", "run_dir"}, and for a stopped run
    ("preempted") "stop_reasons": the stop requests' reasons seen on any rank (the same on every rank)."""
    trainer = Trainer(cfg, run_dir, resume)
    try:
        result = trainer.fit()
    except BaseException:
        shutdown(failed=True)  # no barrier: the other ranks may be waiting in another collective
        raise
    shutdown()
    return result


def default_run_dir(cfg: C.Config) -> Path:
    name = cfg.run_name or cfg.model.name.replace("/", "-")
    return Path(cfg.results_dir) / name


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """The ``train.py`` command line. Under a multi-rank launch it ends the process itself once the
    run is over (see the end), and a stopped run leaves with :func:`stop_exit_status`, so call
    :func:`train` rather than this from other Python code."""
    import argparse

    ap = argparse.ArgumentParser(description="Train an MPDiT model.",
                                 epilog="Overrides: key.sub=value, e.g. data.global_batch_size=256 train.steps=1000")
    C.add_run_arguments(ap)
    args = ap.parse_intermixed_args(argv)  # overrides also after an option: a=1 --run-dir D b=2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = C.load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
        preemption.install_signal_handlers()
        result = train(cfg, run_dir, args.resume)
    except C.ConfigError as exc:  # a mistake in the config or the command line: its message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        _leave(2)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(json.dumps(result))
    status = stop_exit_status(result)
    if status and rank0:
        log.warning("exit status %d: the run stopped at step %d, before its last step", status, result["step"])
    _leave(status)
    return result


def _leave(status: int) -> None:
    """End ``train.py`` with ``status`` (returns for 0 in a lone process). Under several ranks the
    process group is destroyed by now, and multi-rank gloo runs were seen to abort in the
    interpreter's teardown now and then ("terminate called without an active exception", SIGABRT),
    which turned a finished run into a failed job: leave without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    if status:
        raise SystemExit(status)


def stop_exit_status(result: dict[str, Any]) -> int:
    """The exit status of ``train.py`` for a run's result: 0 once it has reached its last step. A run
    stopped before (by a signal, checkpointed at a step boundary) exits as a process that signal ended
    would: 128 + its number, 143 where SIGTERM was among the signals (and for a stop asked by code),
    140 for SIGUSR2 alone. So a job system, a shell loop or ``torchrun --max-restarts`` does not take
    a stopped run for a finished one; one that restarts on such statuses continues it."""
    if result["status"] != "preempted":
        return 0
    signals = [r for r in result.get("stop_reasons", ()) if r in signal.Signals.__members__]
    first = "SIGTERM" if "SIGTERM" in signals or not signals else signals[0]
    return 128 + int(signal.Signals[first])
