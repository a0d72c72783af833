"""Global batches from latent shards: exactly once per epoch, resumable across world sizes.

``build_loader(cfg.data, rank=r, world_size=W, seed=s)`` returns a :class:`ShardLoader`; each
``next()`` gives this rank's part of one global optimizer step (see :mod:`mpdit_dist.data.order`
for the order and its guarantees). Reading happens in DataLoader worker processes: item ``k`` of
the underlying map-style dataset is the whole rank-batch of global step ``k``, so the DataLoader's
in-order delivery keeps the order fixed whatever the number of workers, and prefetching reads
ahead whole steps.

The state (``state_dict()``) is a handful of integers: the step counter and the stream position
it corresponds to, plus what must match on load (global batch, dataset fingerprint, seed, and the
name of the order's definition, :data:`~mpdit_dist.data.order.ORDER_SCHEME`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..fileio import atomic_write
from . import manifest as mf
from .order import ORDER_SCHEME, GlobalOrder, sample_seed
from .sources import Source, open_source

def _outlive_outside_sigterm(worker_id: int) -> None:
    """DataLoader worker set-up: a SIGTERM that is not the main process's leaves the worker alive.

    SLURM (scancel, a time limit, a preemption) and torchrun deliver SIGTERM to every process of the
    job step or process group, the DataLoader workers included. PyTorch's own worker handler exits
    quietly when its main process sends it and otherwise dies of it; the main process then failed with
    "DataLoader worker ... is killed by signal: Terminated" before the checkpoint its own SIGTERM handler
    asks for (every run with workers stopped so lost the steps since its last checkpoint). Here SIGTERM
    is blocked in the worker's threads and taken by one thread with ``sigwaitinfo``, which sees the
    sender: the main process (the DataLoader ending a worker that did not stop in time) ends it at
    once, anyone else is ignored; the main process ends its workers itself once it has saved, and a
    worker whose main process is gone stops on its own (PyTorch's watchdog)."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads made later inherit the mask

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="sigterm", daemon=True).start()


STATE_VERSION = 2  # 2: the order is ORDER_SCHEME (1: numpy's Generator.permutation)

log = logging.getLogger(__name__)

# next() waiting this long for one batch is reported (a slow or hung file system), and again at 2x, 4x...
# this: without it a stalled read shows nothing until the other ranks' collective times out
STALL_WARN_S = 60.0
STALL_EXIT_CODE = 1  # the exit status of a process ended by data.read_timeout_s (num_workers=0)


class DataStallError(RuntimeError):
    """No batch after ``data.read_timeout_s`` (a hung read: a file system that stopped answering)."""


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset: item ``k`` is rank ``rank``'s slice of global step ``k``."""

    def __init__(self, source: Source, order: GlobalOrder, *, rank: int, rank_batch: int,
                 global_batch: int, base_step: int, base_position: int, normalize: bool):
        self.source = source
        self.order = order
        self.rank = rank
        self.rank_batch = rank_batch
        self.global_batch = global_batch
        self.base_step = base_step
        self.base_position = base_position
        self.normalize = normalize
        man = source.manifest
        self.shape = tuple(man["latent_shape"])
        self.moments = man.get("store", "sample") == "moments"
        self.flip = bool(man.get("flip", False))
        self.dtype = np.float16 if man.get("latent_dtype", "float16") == "float16" else np.float32

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with x * scale + shift == :func:`manifest.normalize` (applied in place)."""
        if not hasattr(self, "_scale_shift"):
            man = self.source.manifest
            if self.normalize:
                mean = torch.tensor(man["latent_mean"], dtype=torch.float64)
                std = torch.tensor(man["latent_std"], dtype=torch.float64)
                scale, shift = 1.0 / std, -mean / std
            else:
                c = len(man["latent_mean"])
                scale = torch.full((c,), float(man["encoder"].get("scaling_factor", 1.0)), dtype=torch.float64)
                shift = torch.zeros(c, dtype=torch.float64)
            view = (1, -1) + (1,) * (len(self.shape) - 1)
            self._scale_shift = (scale.float().view(view), shift.float().view(view))
        return self._scale_shift

    def position(self, step: int) -> int:
        """Stream position of the first sample of global step ``step``."""
        return self.base_position + (step - self.base_step) * self.global_batch

    def __getitem__(self, step: int) -> dict[str, Any]:
        start = self.position(step) + self.rank * self.rank_batch
        indices, epochs = self.order.lookup(start, start + self.rank_batch)
        b = self.rank_batch
        # copy the stored fp16 as is (a memcpy per sample) and convert the whole batch at once
        center = np.empty((b, *self.shape), dtype=self.dtype)
        std = np.empty((b, *self.shape), dtype=self.dtype) if self.moments else None
        eps = torch.empty((b, *self.shape), dtype=torch.float32) if self.moments else None
        labels = np.empty(b, dtype=np.int64)
        keys: list[str] = []
        gen = torch.Generator()
        random = self.flip or self.moments
        for j, (index, epoch) in enumerate(zip(indices.tolist(), epochs.tolist())):
            rec = self.source.read(index)
            keys.append(rec["key"])
            labels[j] = rec["label"]
            if random:  # the randomness of a sample depends on (seed, epoch, index) only, never on rank/worker
                gen.manual_seed(sample_seed(self.order.seed, epoch, index, salt=1))
            prefix = ""
            if self.flip and bool(torch.rand((), generator=gen) < 0.5):
                prefix = "flip_"
            if self.moments:
                center[j] = rec[prefix + "mean"]
                std[j] = rec[prefix + "std"]
                torch.randn(self.shape, generator=gen, out=eps[j])
            else:
                center[j] = rec[prefix + "latent"]
        scale, shift = self._affine()
        if self.moments:
            x = torch.from_numpy(center).float().addcmul_(torch.from_numpy(std), eps)
            x = x.mul_(scale).add_(shift)
        else:
            x = torch.mul(torch.from_numpy(center), scale).add_(shift)  # converts and scales in one pass
        if not bool(torch.isfinite(x).all()):
            # the writer stores finite latents only, so this is a corrupt shard (one pass over the batch)
            bad = torch.nonzero(~torch.isfinite(x).flatten(1).all(dim=1)).flatten().tolist()
            index = int(indices[bad[0]])
            raise ValueError(f"{self.source.shard_file(index)}: sample {index} (key {keys[bad[0]]}) gives a "
                             f"non-finite latent ({len(bad)} of {b} samples in the batch of step {step + 1}); the "
                             f"shard file is corrupt\n{self.source.damage_hint(index)}")
        return {"x": x.contiguous(), "y": torch.from_numpy(labels), "keys": keys, "step": step}

    def __len__(self) -> int:  # endless stream; DataLoader only needs this for warnings
        return 2**62


def _as_is(item):
    # item is already tensors + a key list; default_convert would walk every key (~10 us/sample)
    return item


class _Steps(torch.utils.data.Sampler):
    """Yields global step numbers ``start, start + 1, ...`` forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1


class ShardLoader:
    """Iterator over this rank's part of successive global batches, with resumable state.

    Attributes: ``manifest`` (parsed), ``steps_per_epoch`` (``ceil(N / G)``: global batches
    to see every sample at least once; batches straddle epoch boundaries), ``epoch`` (epoch of
    the next sample to be read), ``step`` (global batches delivered so far).
    """

    def __init__(self, cfg, source: Source, *, rank: int, world_size: int, seed: int,
                 run_dir: Optional[str] = None):
        self.cfg = cfg
        self.source = source
        self.manifest = source.manifest
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.global_batch = int(cfg.global_batch_size)
        self.rank_batch = self.global_batch // world_size
        self.num_samples = source.num_samples
        self.order = GlobalOrder(self.num_samples, self.seed, cfg.shuffle)
        self.dataset_id = mf.dataset_id(self.manifest)
        self.step = 0
        self._base_step = 0
        self._base_position = 0
        self._it = None
        self._dl = None
        self._audit = None
        self._waiting: Optional[tuple[int, float]] = None  # (step, since) while next() waits for a batch
        self._stalled: Optional[int] = None  # the step whose wait was reported
        self._watcher: Optional[threading.Thread] = None
        if cfg.audit:
            if not run_dir:
                raise ValueError("data.audit=true needs a run directory (build_loader(..., run_dir=...))")
            audit_dir = Path(run_dir) / "audit"
            audit_dir.mkdir(parents=True, exist_ok=True)
            self._audit_path = audit_dir / f"rank{rank}.jsonl"

    # ---------------------------------------------------------------------------------- iteration
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    @property
    def samples_seen(self) -> int:
        """Stream positions consumed by the global batches delivered so far (all ranks)."""
        return self._base_position + (self.step - self._base_step) * self.global_batch

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.num_samples

    def _make_iter(self):
        ds = StepBatches(self.source, self.order, rank=self.rank, rank_batch=self.rank_batch,
                         global_batch=self.global_batch, base_step=self._base_step,
                         base_position=self._base_position, normalize=self.cfg.normalize)
        workers = int(self.cfg.num_workers)
        self._dl = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=_Steps(self.step), num_workers=workers, collate_fn=_as_is,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            pin_memory=bool(self.cfg.pin_memory) and torch.cuda.is_available(),
            persistent_workers=False, timeout=self.read_timeout_s if workers > 0 else 0,
            worker_init_fn=_outlive_outside_sigterm if workers > 0 else None)
        return iter(self._dl)

    def _waiting_for(self, step: int, waited: float) -> str:
        workers = int(self.cfg.num_workers)
        who = f"{workers} DataLoader workers read" if workers else "this process reads"
        return (f"rank {self.rank}: the batch of step {step + 1} has not come after {waited:.0f} s ({who} "
                f"{self.cfg.remote or self.cfg.path})")

    def _stall_message(self, step: int, waited: float) -> str:
        return (f"{self._waiting_for(step, waited)}: a slow or stalled file system? The other ranks wait for "
                f"this one at their next collective, up to the process group's timeout")

    @property
    def read_timeout_s(self) -> float:
        return float(getattr(self.cfg, "read_timeout_s", 0) or 0)

    def _timeout_message(self, step: int, waited: float) -> str:
        return (f"{self._waiting_for(step, waited)}, data.read_timeout_s="
                f"{self.read_timeout_s:g}: ending this rank (a hung read; raise data.read_timeout_s, or set it to "
                f"0 to wait forever, if the file system is only slow)")

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._make_iter()
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=_watch_stalls, args=(weakref.ref(self),), daemon=True,
                                                 name=f"data-stall-watch-rank{self.rank}")
                self._watcher.start()
        self._waiting = (self.step, time.monotonic())
        try:
            batch = next(self._it)
        except RuntimeError as exc:
            # with workers: the DataLoader's own timeout (data.read_timeout_s); without, the watcher
            # thread ends the process (_watch_stalls), as nothing can interrupt this thread's read
            if self.read_timeout_s > 0 and "DataLoader timed out" in str(exc):
                raise DataStallError(self._timeout_message(self.step, time.monotonic() - self._waiting[1])) from exc
            raise
        finally:
            since, self._waiting = self._waiting[1], None
        if self._stalled == self.step:
            log.warning("rank %d: the batch of step %d came after %.0f s", self.rank, self.step + 1,
                        time.monotonic() - since)
            self._stalled = None
        if batch["step"] != self.step:  # DataLoader delivers in order; this guards our bookkeeping
            raise RuntimeError(f"data loader out of order: got step {batch['step']}, expected {self.step}")
        self.step += 1
        if self.cfg.audit:
            self._write_audit(batch["step"], batch["keys"])
        return {"x": batch["x"], "y": batch["y"], "keys": batch["keys"]}

    def _write_audit(self, step: int, keys: list[str]) -> None:
        if self._audit is None:
            # this rank's records from here on start at `step`: older records of steps >= step belong to
            # a history this one replaces (a run killed after its last checkpoint, resumed from it).
            # Rank 0 also retires them for the ranks this run does not have (resumed on fewer ranks),
            # which would otherwise stay beside the new records: more keys than the global batch.
            files = [self._audit_path]
            if self.rank == 0:
                files += [p for p in sorted(self._audit_path.parent.glob("rank*.jsonl"))
                          if p.stem[4:].isdigit() and int(p.stem[4:]) >= self.world_size]
            for p in files:
                _truncate_audit(p, step)
            self._audit = open(self._audit_path, "a", buffering=1)
        self._audit.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` starts new ones at the current step)."""
        self._it = None
        self._dl = None
        if self._audit is not None:
            self._audit.close()
            self._audit = None

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state; identical on every rank (it does not depend on rank or world)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "base_step": self._base_step,
            "base_position": self._base_position,
            "global_batch_size": self.global_batch,
            "num_samples": self.num_samples,
            "dataset_id": self.dataset_id,
            "seed": self.seed,
            "shuffle": bool(self.cfg.shuffle),
            "order": ORDER_SCHEME,
        }

    def load_state_dict(self, state: dict[str, Any], allow_batch_change: bool = False) -> None:
        """Continue exactly where ``state`` left off (any world size with the same global batch).

        A different global batch or dataset changes which samples make up the remaining batches;
        that is refused unless ``allow_batch_change=True``, in which case the stream continues at
        the same sample position (the rest of the current epoch is still seen exactly once).
        A different seed or shuffle setting would change the order itself and is always refused.
        """
        changes = self.check_state(state, allow_batch_change)
        self.close()
        self.step = int(state["step"])
        if changes:
            warnings.warn("resuming the data loader with " + "; ".join(changes) + f": continuing at sample position "
                          f"{state['samples_seen']} (epoch {state['samples_seen'] // self.num_samples}); the batches "
                          f"from here differ from the original run's", stacklevel=2)
            self._base_step = self.step
            self._base_position = int(state["samples_seen"])
        else:
            self._base_step = int(state["base_step"])
            self._base_position = int(state["base_position"])

    def check_state(self, state: dict[str, Any], allow_batch_change: bool = False) -> list[str]:
        """What :meth:`load_state_dict` would refuse (a ``ValueError``), checked without changing
        anything; else the changes it would continue with (``allow_batch_change``), as text."""
        if state.get("version") != STATE_VERSION or state.get("order") != ORDER_SCHEME:
            raise ValueError(
                f"data loader state version {state.get('version')!r} with sample order "
                f"{state.get('order', 'numpy-permutation')!r}; this code has version {STATE_VERSION} with order "
                f"{ORDER_SCHEME!r}, so the rest of the epoch would not be the one the run started. Resume with the "
                f"code that wrote the checkpoint, or start a new run warm-started from it (train.init_from)")
        if state["seed"] != self.seed or state["shuffle"] != bool(self.cfg.shuffle):
            raise ValueError(f"data loader state was saved with seed={state['seed']}, shuffle={state['shuffle']}; "
                             f"this run has train.seed={self.seed}, data.shuffle={bool(self.cfg.shuffle)}")
        changes = []
        if state["global_batch_size"] != self.global_batch:
            changes.append(f"data.global_batch_size {state['global_batch_size']} -> {self.global_batch}")
        if state["num_samples"] != self.num_samples or state["dataset_id"] != self.dataset_id:
            changes.append(f"dataset {state['dataset_id']} ({state['num_samples']} samples) -> "
                           f"{self.dataset_id} ({self.num_samples} samples)")
        if changes and not allow_batch_change:
            raise ValueError("cannot resume the data loader exactly: " + "; ".join(changes)
                             + ". Pass allow_batch_change=True (checkpoint.allow_batch_change=true) to continue anyway")
        return changes


def _watch_stalls(ref: "weakref.ref[ShardLoader]") -> None:
    """A loader's daemon thread: warns when ``next()`` has waited :data:`STALL_WARN_S`, then twice,
    four times... that, for one batch; it ends with the loader (closed or gone). Without DataLoader
    workers, a wait beyond ``data.read_timeout_s`` ends the process (:data:`STALL_EXIT_CODE`): the
    training thread itself is blocked in the read, and nothing else would end a single process."""
    reported = (None, 0)  # (the wait, warnings given for it)
    while True:
        time.sleep(min(1.0, STALL_WARN_S / 4))
        loader = ref()
        if loader is None or loader._it is None:
            return
        waiting = loader._waiting
        if waiting is not None:
            count = reported[1] if reported[0] == waiting else 0
            waited = time.monotonic() - waiting[1]
            if waited >= STALL_WARN_S * 2 ** count:
                loader._stalled = waiting[0]
                log.warning(loader._stall_message(waiting[0], waited))
                reported = (waiting, count + 1)
            timeout = loader.read_timeout_s
            if timeout > 0 and waited >= timeout and int(loader.cfg.num_workers) == 0:
                log.critical(loader._timeout_message(waiting[0], waited))
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(STALL_EXIT_CODE)
        del loader


def build_loader(cfg, *, rank: int, world_size: int, seed: int, run_dir: Optional[str] = None) -> ShardLoader:
    """The data loader of one rank for ``cfg`` (a :class:`mpdit_dist.config.DataConfig`)."""
    g = int(cfg.global_batch_size)
    if g < 1 or g % world_size:
        raise ValueError(f"data.global_batch_size={g} is not divisible by the world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if cfg.audit and not run_dir:
        raise ValueError("data.audit=true needs a run directory (build_loader(..., run_dir=...))")
    source = open_source(cfg.format, cfg.path, cfg.remote, cfg.cache_dir)
    source.manifest = mf.with_latent_stats(source.manifest, cfg.latent_stats, f"data.path={cfg.path}")
    return ShardLoader(cfg, source, rank=rank, world_size=world_size, seed=seed, run_dir=run_dir)


def _audit_step(line: bytes) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return None


def _truncate_audit(path: Path, step: int) -> None:
    """Drop the records of steps >= ``step`` (and lines cut short by a crash) from an audit file;
    a file left with none is removed. The records of a file are in increasing step order (each
    session appends from its first step after this truncation), so the usual case reads the tail only."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read().split(b"\n")
    if size == 0:
        return
    # a file that ends with a whole line: tail[-1] is empty and tail[-2] that line (whole, as a
    # newline comes before it in the block)
    if tail[-1] == b"" and len(tail) > 2:
        last = _audit_step(tail[-2])
        if last is not None and last < step:
            return
    kept = 0
    with open(path, "rb") as src, atomic_write(path) as dst:
        for line in src:
            s = _audit_step(line) if line.endswith(b"\n") else None
            if s is not None and s < step:
                dst.write(line)
                kept += 1
    if not kept:
        path.unlink()


def read_audit(run_dir: str) -> dict[int, dict[int, list[str]]]:
    """``{rank: {step: keys}}`` from ``<run_dir>/audit/rank*.jsonl`` (a later line for a step wins).

    A run resumed at step ``s`` first drops the records of steps ``>= s`` of every rank it has, and
    rank 0 those of the ranks it does not have, so the log is the history of the resumed run."""
    out: dict[int, dict[int, list[str]]] = {}
    for p in sorted((Path(run_dir) / "audit").glob("rank*.jsonl")):
        rank = int(p.stem[4:])
        steps = out.setdefault(rank, {})
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                steps[rec["step"]] = rec["keys"]
    return out


__all__ = ["ShardLoader", "StepBatches", "build_loader", "read_audit"]
