"""Everything resumable, saved and loaded as one bundle: sharded, atomic, verified.

Layout of ``<run_dir>/checkpoints/step_XXXXXXXX/``:
- ``.metadata`` + ``*.distcp``: model, EMA and optimizer state through
  ``torch.distributed.checkpoint`` (each rank writes its own shards; resharding on load, so a run
  resumes on another world size);
- ``trainer.json``: step, epoch, data-loader state, LR schedule, MLflow run id, world size,
  global batch, resolved config, code version (written by rank 0);
- ``rng/rank{R}.pt``: RNG states of each rank (torch CPU and CUDA, numpy, python);
- ``COMPLETE.json``: size and CRC32 of every file above, written last.

Atomicity: every rank writes into ``tmp-step_XXXXXXXX``; once all ranks are done (barrier) and
``COMPLETE.json`` is in place, rank 0 renames the directory to its final name in one ``rename``.
A crash at any moment leaves either the previous checkpoints or a ``tmp-`` directory that resume
ignores and deletes. Resume takes the newest complete checkpoint by step number, verifies the
checksums and falls back to the one before, with a warning, when it is damaged.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .distributed.env import barrier, broadcast_object

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE.json"


class CheckpointError(RuntimeError):
    pass


def fault_point(name: str, step: int) -> None:
    """Test hook: ``MPDIT_FAULT=<name>:<step>`` kills this process with SIGKILL right here, to
    prove that a crash at that point (mid-save included) never leaves a loadable half checkpoint."""
    if os.environ.get("MPDIT_FAULT") == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints, newest first (by step number, never by time or size)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_manifest(d: Path) -> None:
    entries = {str(p.relative_to(d)): {"size": p.stat().st_size, "crc32": _crc32(p)} for p in _files(d)}
    tmp = d / (COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / COMPLETE)


def verify(d: Path) -> Optional[str]:
    """None when the checkpoint is complete and intact, else what is wrong."""
    meta = d / COMPLETE
    if not meta.is_file():
        return f"{meta.name} missing"
    try:
        entries = json.loads(meta.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{meta.name} unreadable: {exc}"
    for rel, info in entries.items():
        p = d / rel
        if not p.is_file():
            return f"{rel} missing"
        if p.stat().st_size != info["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {info['size']}"
        if _crc32(p) != info["crc32"]:
            return f"{rel} checksum mismatch"
    return None


def code_version(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parents[1]
    info: dict[str, Any] = {}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["dirty"] = bool(dirty)
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists only, so they load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointManager:
    """Saves and restores the training bundle of one run directory."""

    run_dir: Path
    rank: int = 0
    keep_last: int = 3
    keep_every: int = 0
    _pending: Optional[tuple] = field(default=None, repr=False)  # (step, tmp, final, future) not yet visible
    _group: Any = field(default=None, repr=False)  # gloo group of the async writes

    @property
    def root(self) -> Path:
        return self.run_dir / "checkpoints"

    # -------------------------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, Any], trainer_state: dict[str, Any],
             extra_writer: Optional[Callable[[Path], None]] = None, async_save: bool = False) -> Path:
        """Collective: every rank calls it with its (sharded) tensors; rank 0 adds ``trainer_state``.

        ``extra_writer(tmp_dir)``, called on every rank, adds files written by another library (the
        DeepSpeed engine) into the same directory, so they are checksummed and made visible with
        the rest in one rename.

        ``async_save``: the tensors are staged to host memory and written by a background thread
        (``dcp.async_save`` on its own gloo process group), so training goes on while the disk
        works; the checkpoint becomes visible (manifest + rename) at the next ``save`` or at
        ``finalize()``. Until then it is a ``tmp-`` directory that resume ignores."""
        self.finalize()
        final = self.root / step_dir_name(step)
        tmp = self.root / ("tmp-" + step_dir_name(step))
        if self.rank == 0:
            if final.exists():  # a re-save of the same step (e.g. end of run right after a periodic save)
                shutil.rmtree(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        if self.rank == 0:
            with open(tmp / "trainer.json", "w") as f:
                json.dump(trainer_state, f, indent=1, default=str)
        if extra_writer is not None:
            extra_writer(tmp)
        if async_save:
            future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._async_group())
            self._pending = (step, tmp, final, future)
            return final
        dcp.save(tensors, checkpoint_id=str(tmp))
        self._pending = (step, tmp, final, None)
        self.finalize()
        return final

    def _async_group(self):
        # async writes coordinate on their own gloo group, never on the training (NCCL) group
        if dist.is_available() and dist.is_initialized():
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            return self._group
        return None

    def finalize(self) -> None:
        """Make the pending checkpoint visible once every rank's shards are on disk (collective)."""
        if self._pending is None:
            return
        step, tmp, final, future = self._pending
        self._pending = None
        if future is not None:
            future.result()
        fault_point("save", step)
        barrier()
        if self.rank == 0:
            write_manifest(tmp)
            os.replace(tmp, final)
            self._retain(step)
        barrier()

    def _retain(self, newest: int) -> None:
        ckpts = list_checkpoints(self.root)
        keep = {s for s, _ in ckpts[: max(1, self.keep_last)]}
        if self.keep_every > 0:
            keep |= {s for s, _ in ckpts if s % self.keep_every == 0}
        keep.add(newest)
        for s, p in ckpts:
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------------------------------
    def clean_partial(self) -> None:
        """Remove temp directories left by a crash mid-save (rank 0, before anyone saves)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob("tmp-step_*"):
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
                shutil.rmtree(p, ignore_errors=True)
        barrier()

    def find_latest(self) -> Optional[Path]:
        """Newest intact checkpoint (rank 0 verifies; all ranks get the same answer)."""
        choice = None
        if self.rank == 0:
            for step, path in list_checkpoints(self.root):
                problem = verify(path)
                if problem is None:
                    choice = str(path)
                    break
                log.warning("checkpoint %s is damaged (%s); falling back to the one before", path, problem)
        choice = broadcast_object(choice)
        return Path(choice) if choice else None

    def load(self, path: Path, tensors: dict[str, Any],
             extra_reader: Optional[Callable[[Path], None]] = None) -> dict[str, Any]:
        """Load ``tensors`` in place (DCP reshards to this run's layout); returns trainer.json.
        ``extra_reader(path)``, called on every rank after the verification, reads what an
        ``extra_writer`` wrote."""
        if self.rank == 0:
            problem = verify(path)
            if problem is not None:
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        barrier()
        dcp.load(tensors, checkpoint_id=str(path))
        if extra_reader is not None:
            extra_reader(path)
        state = json.loads((path / "trainer.json").read_text())
        rng = path / "rng" / f"rank{self.rank}.pt"
        if rng.is_file() and state.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1):
            set_rng_state(torch.load(rng, weights_only=True))
        return state
