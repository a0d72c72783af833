"""Everything resumable, saved and loaded as one bundle: sharded, atomic, verified.

Layout of ``<run_dir>/checkpoints/step_XXXXXXXX/``:
- ``.metadata`` + ``*.distcp``: model, EMA and optimizer state through
  ``torch.distributed.checkpoint`` (each rank writes its own shards; resharding on load, so a run
  resumes on another world size);
- ``trainer.json``: step, epoch, data-loader state, LR schedule, the logged loss's window since the
  last log, the step's sample grid and evaluation that a stopping run left to the resumed one
  (``owed``), MLflow run id, world size, global batch, resolved config, code version (written by rank 0);
- ``rng/rank{R}.pt``: RNG states of each rank (torch CPU and CUDA, numpy, python);
- ``COMPLETE.json``: size and CRC32 of every file above, written last.

Atomicity: every rank writes into ``tmp-step_XXXXXXXX``; once all ranks are done (barrier) and
``COMPLETE.json`` is in place, rank 0 renames the directory to its final name in one ``rename``.
A crash at any moment leaves either the previous checkpoints or a ``tmp-`` directory. At the next
start, a ``tmp-`` directory whose write had finished (DCP's ``.metadata``, which DCP writes only
after every rank's shards, plus ``trainer.json`` and every rank's RNG file: an async save, or a
save killed between its write and its rename) is checksummed and made visible; any other is
deleted with a warning. A second save of a step that has a checkpoint replaces it without a moment
when neither exists: the old one is renamed aside (``replaced-step_XXXXXXXX``, which resume
ignores), the new one into place, and only then is the old one deleted; a start after a crash
between the two renames puts the old one back (:meth:`CheckpointManager.clean_partial`).
Resume takes the newest complete checkpoint by step number, verifies the
checksums and falls back to the one before, with a warning, when it is damaged; when every
checkpoint is damaged it stops with an error that names them, and deletes nothing.

Readers that are not the trainer (export, sampling, a warm start of another run) may read a run
that is still training and saving: :func:`read_published` verifies the checkpoint and reads it
whole, starts again on the then newest one when retention deletes it (or a second save replaces
it) under the reader, and changes nothing in the run directory.

One history per run directory: the checkpoints of a run directory are steps of one run.
:meth:`CheckpointManager.refuse_second_run` stops a second run from starting in a directory that
holds checkpoints (``--resume never``, or a checkpoint of another directory); after a resume from
an older checkpoint of the same directory (an explicit ``--resume PATH``, or a fallback past
damaged checkpoints), :meth:`CheckpointManager.supersede_after` moves the later checkpoints aside
into ``checkpoints/superseded-<time>/``, kept for the user but out of resume and retention.

The checksums are everyone's work: at a save, rank 0 lists the files (with their sizes) and
broadcasts the listing, each rank reads (checksums and fsyncs) its share, about equal in bytes
(:func:`split_by_size`, the same split on every rank), and rank 0 gathers the results into the
manifest; at resume rank 0 checks the manifest, presence and sizes, each rank checksums its share,
and the verdict is the one a single reader would give (:func:`verify` stays the one-process form).
For an XL run (8-11 GB a checkpoint) rank 0 alone would read every byte while the others wait.
Rank 0 alone does the rest of the file work (listing, the manifest, renames, retention). Errors
never leave a rank waiting at the next collective: :func:`on_rank0` broadcasts rank 0's outcome,
:func:`on_every_rank` gathers every rank's, so an error on any rank is raised on every rank, naming
the rank and the file. Durability: every file is fsynced by the rank that checksums it, then
``COMPLETE.json``, the directory and its subdirectories before the rename, and the checkpoints
directory after it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .distributed.env import all_gather_object, barrier, broadcast_object

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE.json"


class CheckpointError(RuntimeError):
    pass


def on_rank0(rank: int, fn: Callable[[], Any]) -> Any:
    """Collective: ``fn()`` on rank 0, its result returned on every rank. An exception in ``fn``
    is raised on every rank (rank 0 re-raises it, the others raise a :class:`CheckpointError` with
    its message), so no rank is left waiting at a later collective for a rank that has failed."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every error must reach the other ranks
            error = exc
    result, message = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"rank 0 failed: {message}")
    return result


def on_every_rank(rank: int, fn: Callable[[], Any], what: str) -> list[Any]:
    """Collective: ``fn()`` on every rank; every rank's result, in rank order, returned on every rank.
    An exception on any rank raises a :class:`CheckpointError` on every rank (``what``, then each
    failed rank and its message; chained to the exception on the rank where it happened), so no
    rank is left waiting at a later collective for one that has failed."""
    result, error, message = None, None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - every error must reach the other ranks
        error = exc
        text = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        message = f"rank {rank}: {text}"
    gathered = all_gather_object((result, message))
    failed = [m for _, m in gathered if m is not None]
    if failed:
        raise CheckpointError(f"{what}: {'; '.join(failed)}") from error
    return [r for r, _ in gathered]


def fault_point(name: str, step: int, path: Optional[Path] = None) -> None:
    """Test hook: ``MPDIT_FAULT=<name>:<step>`` kills this process with SIGKILL right here, to
    prove that a crash at that point (mid-save included) never leaves a loadable half checkpoint.

    ``<name>:<step>:<SIGNAL>`` sends that signal instead (``SIGUSR2``, ``SIGTERM``: a stop request
    at an awkward moment), and ``<name>:<step>:<ERRNO>`` (``EIO``, ``ENOSPC``...) raises that
    ``OSError`` on ``path`` (a failed write); ``...@<rank>`` limits an entry to that rank (the
    ``RANK`` variable); several entries are separated by commas, each one that matches applies."""
    spec = os.environ.get("MPDIT_FAULT")
    if not spec:
        return
    import signal

    for entry in spec.split(","):
        where, _, only = entry.strip().partition("@")
        if only and only != os.environ.get("RANK", "0"):
            continue
        parts = where.split(":")
        if parts[:2] != [name, str(step)]:
            continue
        what = parts[2] if len(parts) > 2 else "SIGKILL"
        if what.startswith("SIG"):
            os.kill(os.getpid(), signal.Signals[what])
        else:
            code = getattr(errno, what)
            raise OSError(code, f"{os.strerror(code)} (MPDIT_FAULT)", None if path is None else str(path))


_DELETING = "deleting-"  # a checkpoint retention is removing: renamed first, so never half-deleted as step_*
_REPLACED = "replaced-"  # a complete checkpoint a new save of its step replaces: kept until that one is in place


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed to ``deleting-<name>`` first (atomic), so that a crash
    part-way never leaves a half-deleted ``step_*``; a deletion that fails is logged, not hidden."""
    gone = path if path.name.startswith(_DELETING) else path.with_name(_DELETING + path.name)
    try:
        if gone != path:
            os.replace(path, gone)
        shutil.rmtree(gone)
    except OSError as exc:
        log.warning("could not delete old checkpoint %s: %s", path, exc)


def _move_into_place(tmp: Path, final: Path, step: int) -> None:
    """Rename the complete checkpoint ``tmp`` to ``final``, durably. When ``final`` exists (a second
    save of step ``step``), it is renamed aside to ``replaced-<name>`` first and deleted only once
    the new one is in place (the rename made durable): deleting it first would lose the step's
    checkpoint to a crash before the new one is published. A crash between the two renames leaves
    the old one aside, under a name that resume ignores, and :meth:`CheckpointManager.clean_partial`
    puts it back at the next start."""
    aside = final.with_name(_REPLACED + final.name)
    if final.exists():
        if aside.exists():  # left by a replacement whose deletion failed: ``final`` is complete
            shutil.rmtree(aside)
        os.replace(final, aside)
        fault_point("replace", step, final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside.exists():
        try:
            shutil.rmtree(aside)
        except OSError as exc:  # the new checkpoint is in place; the next start deletes the old one
            log.warning("could not delete the replaced checkpoint %s: %s", aside, exc)


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


def _listing(d: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file of checkpoint directory ``d`` but its manifest, sorted."""
    return [(str(p.relative_to(d)), p.stat().st_size)
            for p in sorted(d.rglob("*")) if p.is_file() and p.name not in (COMPLETE, COMPLETE + ".tmp")]


def split_by_size(files: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Deal ``files`` ((name, size) pairs) to ``n`` ranks with about equal bytes each: largest first,
    each to the rank with the fewest bytes so far (the lowest rank on a tie). A pure function of
    its arguments, so every rank computes the same split."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = min(range(n), key=lambda i: (load[i], i))
        shares[r].append(name)
        load[r] += size
    return [sorted(share) for share in shares]


def _checksum_file(path: Path, sync: bool = False) -> dict[str, int]:
    """{"size", "crc32"} of one file, read once; with ``sync`` the file is also fsynced while it is
    open (DCP syncs its own shards; trainer.json, the RNG files and DeepSpeed's files are not)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "crc32": crc}


def _naming(exc: OSError, rel: str) -> str:
    """``exc``'s message, with the file ``rel`` named when the error does not name one (a failed
    ``read`` does not; a failed ``open`` does)."""
    return str(exc) if exc.filename is not None else f"{exc} ({rel})"


def _checksum_files(d: Path, rels: list[str], sync: bool) -> dict[str, dict[str, int]]:
    """{rel: {"size", "crc32"}} of the files ``rels`` of ``d`` (see :func:`_checksum_file`); an
    error names the file it happened on."""
    out: dict[str, dict[str, int]] = {}
    for rel in rels:
        try:
            out[rel] = _checksum_file(d / rel, sync=sync)
        except OSError as exc:
            raise CheckpointError(f"{rel}: {_naming(exc, rel)}") from exc
        except Exception as exc:  # noqa: BLE001 - named and passed on
            raise CheckpointError(f"{rel}: {type(exc).__name__}: {exc}") from exc
    return out


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a no-op where the file system refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_manifest(d: Path, entries: Optional[dict[str, dict[str, int]]] = None) -> None:
    """Write ``COMPLETE.json`` into ``d`` with ``entries`` (by default computed here, one process
    reading every file), then make the whole directory tree durable."""
    if entries is None:
        entries = {rel: _checksum_file(d / rel, sync=True) for rel, _ in _listing(d)}
    tmp = d / (COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / COMPLETE)
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(sub)
    _fsync_dir(d)


UNREADABLE = "unreadable"  # verify's reason for an I/O error (not damage: find_latest stops on it)


def verify(d: Path) -> Optional[str]:
    """None when the checkpoint is complete and intact, else what is wrong (an unreadable file
    included: an ``OSError`` is a reason, never an exception). One process reads every file; a
    :class:`CheckpointManager` shares the reading among its ranks."""
    problem, entries = _manifest_head(d)
    if problem is not None:
        return problem
    found = _crc_problem(d, sorted(entries), entries)
    return None if found is None else found[1]


def _manifest_head(d: Path) -> tuple[Optional[str], dict[str, Any]]:
    """The cheap half of :func:`verify`: (problem, {}) when the manifest is missing or
    unreadable, or a file is missing or has another size; else (None, the manifest's entries)."""
    try:
        meta = d / COMPLETE
        if not meta.is_file():
            return f"{meta.name} missing", {}
        try:
            entries = json.loads(meta.read_text())["files"]
            for rel, info in entries.items():
                p = d / rel
                if not p.is_file():
                    return f"{rel} missing", {}
                if p.stat().st_size != info["size"]:
                    return f"{rel} has {p.stat().st_size} bytes, expected {info['size']}", {}
                int(info["crc32"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{meta.name} unreadable: {exc!r}", {}
        return None, entries
    except OSError as exc:
        return f"{UNREADABLE}: {exc}", {}


def _crc_problem(d: Path, rels: list[str], entries: dict[str, Any]) -> Optional[tuple[str, str]]:
    """The expensive half of :func:`verify`, for the files ``rels`` in their order: (the file, what is
    wrong) for the first whose checksum differs or that cannot be read, or None. Reading stops at
    the first problem, so with ``rels`` sorted the answer is that of the first file in name order:
    for shares of one sorted list, the smallest of the shares' answers is the whole list's."""
    for rel in rels:
        try:
            crc = _checksum_file(d / rel)["crc32"]
        except OSError as exc:
            return rel, f"{UNREADABLE}: {_naming(exc, rel)}"
        if crc != entries[rel]["crc32"]:
            return rel, f"{rel} checksum mismatch"
    return None


def write_finished(d: Path) -> Optional[str]:
    """None when every rank's part of the save in ``d`` (a ``tmp-`` directory) is on disk, else what
    is missing. DCP writes ``.metadata`` once every rank's shards are written; each rank writes its
    RNG file and rank 0 ``trainer.json`` (and the DeepSpeed files) before DCP starts."""
    try:
        if not (d / ".metadata").is_file():
            return "tensor shards incomplete (.metadata missing)"
        world = int(json.loads((d / "trainer.json").read_text())["world_size"])
        missing = [f"rng/rank{r}.pt" for r in range(world) if not (d / "rng" / f"rank{r}.pt").is_file()]
        return f"{', '.join(missing)} missing" if missing else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"trainer.json unreadable: {exc}"


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
        # one state per GPU the saving process saw; this process may see fewer (srun binding one
        # GPU per task after a torchrun start): restore those it has. They drive no training
        # randomness (that is keyed on the step), so a difference costs nothing.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _not_a_checkpoint(p: Path) -> Optional[str]:
    """None when ``p`` looks like a published checkpoint directory (a directory with its
    ``COMPLETE.json``), else why not and what to pass instead (see
    :meth:`CheckpointManager.check_resume_path`)."""
    if p.name.startswith("tmp-"):
        final = p.with_name(p.name[len("tmp-"):])
        after = (f"; it has since been made visible (checksummed and renamed) as {final}: resume from that"
                 if (final / COMPLETE).is_file() else "")
        return (f"a half-written checkpoint (its save was interrupted or never made visible), which is never "
                f"resumed from{after}. Pass a published step_* directory, or --resume auto with the run's --run-dir")
    if not p.exists():
        return "no such checkpoint directory"
    if not p.is_dir():
        return "not a directory (a checkpoint is a checkpoints/step_* directory)"
    if (p / COMPLETE).is_file():
        return None
    for root, what in ((p / "checkpoints", "a run directory"), (p, "a checkpoints directory")):
        found = list_checkpoints(root)
        if found:
            return (f"{what}, not a checkpoint: pass one of its checkpoints (newest: {found[0][1]}), or "
                    f"continue that run with --run-dir {root.parent} --resume auto")
    if (p / "trainer.json").is_file() or (p / ".metadata").is_file():
        return (f"an incomplete checkpoint ({COMPLETE} missing: its save did not finish, or it was damaged). "
                f"Pass a published step_* directory")
    return f"not a checkpoint directory (no {COMPLETE}, trainer.json or tensor shards in it)"


@dataclass
class CheckpointManager:
    """Saves and restores the training bundle of one run directory."""

    run_dir: Path
    rank: int = 0
    keep_last: int = 3
    keep_every: int = 0
    _pending: Optional[tuple] = field(default=None, repr=False)  # (step, tmp, final, future) not yet visible
    _group: Any = field(default=None, repr=False)  # gloo group of the async writes
    _verified: Optional[Path] = field(default=None, repr=False)  # just verified by find_latest (every rank)

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
        ``finalize()``, or, when the process dies first, at the next start (:meth:`clean_partial`)
        if its write had finished. Until then it is a ``tmp-`` directory that resume ignores."""
        self.finalize()
        final = self.root / step_dir_name(step)
        tmp = self.root / ("tmp-" + step_dir_name(step))

        def prepare() -> None:
            # a checkpoint of this step already there (a second save of the step) stays until the
            # new one is complete: it is replaced in the final rename (:func:`_move_into_place`)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with open(tmp / "trainer.json", "w") as f:
                json.dump(trainer_state, f, indent=1, default=str)

        on_rank0(self.rank, prepare)

        def write_own() -> None:
            (tmp / "rng").mkdir(exist_ok=True)
            rng_file = tmp / "rng" / f"rank{self.rank}.pt"
            torch.save(rng_state(), rng_file)
            fault_point("save_write", step, rng_file)
            if extra_writer is not None:
                extra_writer(tmp)

        # each rank's own files, before the tensor shards: a write that fails on one rank (a full or
        # read-only disk) raises on every rank, naming the rank and the file; otherwise the other
        # ranks would go on into DCP's collectives and meet the dead rank there ("connection
        # closed by peer" under gloo, a hang until the timeout under NCCL), never told why
        on_every_rank(self.rank, write_own, f"cannot write checkpoint {tmp}")
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
        self._publish(step, tmp, final, then=lambda: self._retain(step))

    def _publish(self, step: int, tmp: Path, final: Path, then: Callable[[], None]) -> None:
        """Collective: checksum ``tmp`` (shared by the ranks), then on rank 0 write its manifest,
        rename it to ``final`` durably (replacing a checkpoint of that step safely, see
        :func:`_move_into_place`), and ``then()``."""
        entries = self._shared_manifest(tmp)

        def publish() -> None:
            write_manifest(tmp, entries)
            _move_into_place(tmp, final, step)
            then()

        on_rank0(self.rank, publish)

    def _world(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _shared_manifest(self, d: Path) -> dict[str, dict[str, int]]:
        """Collective: the manifest entries of ``d``. Each rank reads (checksums and fsyncs) its
        share of the files (:func:`split_by_size`), so a save's checksum work is spread over all
        ranks instead of rank 0 reading every byte; an error on any rank (I/O or other) raises on
        every rank, naming the rank and the file (:func:`on_every_rank`)."""
        listing = on_rank0(self.rank, lambda: _listing(d))  # one listing: a lagging file system agrees
        share = split_by_size(listing, self._world())[self.rank]
        entries: dict[str, dict[str, int]] = {}
        for part in on_every_rank(self.rank, lambda: _checksum_files(d, share, sync=True),
                                  f"cannot checksum checkpoint {d}"):
            entries.update(part)
        return entries

    def _shared_verify(self, d: Path) -> Optional[str]:
        """Collective :func:`verify`, with the same answer on every rank and the same answer as
        :func:`verify`: rank 0 checks the manifest, the presence and the sizes; the checksums are
        shared out like a save's, each rank reporting the first problem of its (sorted) share, and
        the first of those by file name is the answer (the one a single reader stops at)."""
        problem, entries = on_rank0(self.rank, lambda: _manifest_head(d))
        if problem is not None:
            return problem
        share = split_by_size([(rel, int(info["size"])) for rel, info in entries.items()], self._world())[self.rank]
        found = [f for f in on_every_rank(self.rank, lambda: _crc_problem(d, share, entries),
                                          f"cannot verify checkpoint {d}") if f is not None]
        return min(found)[1] if found else None

    def wait_pending(self, timeout_s: float = 600.0) -> None:
        """This rank only (no collective, safe on an error path): wait for a pending async write to
        reach the disk, so that the next start can make it visible (:meth:`clean_partial`) instead
        of the process exit (and the process-group teardown) cutting it off."""
        if self._pending is None or self._pending[3] is None:
            return
        step, tmp, _, future = self._pending
        self._pending = None
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - already on an error path; the next start decides
            log.warning("async checkpoint %s did not finish writing: %s", tmp, exc)

    def _retain(self, newest: int) -> None:
        ckpts = list_checkpoints(self.root)
        keep = {s for s, _ in ckpts[: max(1, self.keep_last)]}
        if self.keep_every > 0:
            keep |= {s for s, _ in ckpts if s % self.keep_every == 0}
        keep.add(newest)
        for s, p in ckpts:
            if s not in keep:
                _remove(p)

    # -------------------------------------------------------------------------------------------
    def clean_partial(self) -> None:
        """Collective, before anyone saves or resumes: put back a checkpoint that a second save of its
        step had renamed aside (``replaced-``) when the run stopped before the new one was in place,
        or delete it when the new one is; make visible each ``tmp-`` directory whose write had
        finished (see :func:`write_finished`; an async save whose process died before its rename),
        remove the others (a save that was interrupted)."""

        def scan() -> list[str]:
            finished: list[str] = []
            if not self.root.is_dir():
                return finished
            for p in sorted(self.root.glob(f"{_DELETING}step_*")):
                log.warning("removing %s (retention had begun to delete it when the run stopped)", p)
                _remove(p)
            # before the tmp- directories: the put-back checkpoint is the step's complete one
            for p in sorted(self.root.glob(f"{_REPLACED}step_*")):
                final = self.root / p.name[len(_REPLACED):]
                if final.exists():
                    log.warning("removing %s (a new save of that step had replaced it with %s when the run "
                                "stopped)", p, final.name)
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, final)
                    _fsync_dir(self.root)
                    log.warning("restored checkpoint %s from %s (a new save of that step was replacing it when "
                                "the run stopped, before the new one was in place)", final.name, p.name)
            for p in sorted(self.root.glob("tmp-step_*")):
                final = self.root / p.name[len("tmp-"):]
                problem = "a complete checkpoint of that step exists" if final.exists() else write_finished(p)
                if problem is None:
                    finished.append(str(p))
                else:
                    log.warning("removing incomplete checkpoint %s (a save was interrupted: %s)", p, problem)
                    shutil.rmtree(p, ignore_errors=True)
            return finished

        for p in map(Path, on_rank0(self.rank, scan)):
            final = self.root / p.name[len("tmp-"):]
            named = _STEP_DIR.match(final.name)
            step = int(named.group(1)) if named else -1
            self._publish(step, p, final, then=lambda p=p, final=final: log.warning(
                "checkpoint %s had been written but not made visible (the run stopped first): checksummed "
                "and renamed to %s", p, final.name))

    def refuse_second_run(self, resume: str) -> None:
        """Collective: raise when ``resume`` would begin a second run in this run directory while it
        holds checkpoints: ``--resume never``, or ``--resume PATH`` of another directory's checkpoint.
        Two runs' checkpoints would mix, and a later ``--resume auto`` continue the wrong one.
        (``auto`` continues the run; a PATH of this directory goes back in it, see
        :meth:`supersede_after`.)"""
        if resume == "never":
            why = "--resume never"
        elif resume != "auto" and not self.holds(Path(resume)):
            why = f"--resume {resume} (a checkpoint of another run directory)"
        else:
            return
        found = on_rank0(self.rank, lambda: [str(p) for _, p in list_checkpoints(self.root)])
        if found:
            raise CheckpointError(
                f"run directory {self.run_dir} already holds {len(found)} checkpoint(s) "
                f"(newest: {found[0]}); {why} would start a second run in it. Choose another --run-dir, "
                f"continue that run with --resume auto, or remove {self.root}"
            )

    def check_resume_path(self, resume: str) -> None:
        """Collective: raise when ``--resume PATH`` does not name a published checkpoint directory
        (a ``step_*`` directory with its ``COMPLETE.json``), before anything is built or written: a
        missing path, a file, a half-written ``tmp-`` directory, a run directory or its
        ``checkpoints/`` directory, or any other directory. The error names the path, what it is,
        and which path to pass instead. (Its checksums are verified at the load.)"""
        if resume in ("auto", "never"):
            return
        problem = on_rank0(self.rank, lambda: _not_a_checkpoint(Path(resume)))
        if problem is not None:
            raise CheckpointError(f"--resume {resume}: {problem}")

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is a checkpoint directory of this run directory."""
        return Path(path).resolve().parent == self.root.resolve()

    def supersede_after(self, step: int) -> Optional[Path]:
        """Collective, after a resume at ``step``: move the checkpoints of later steps (the future
        of an older history: left behind by an explicit ``--resume PATH`` of an older checkpoint, or
        damaged ones skipped by the fallback) into ``checkpoints/superseded-<time>/``, out of the
        way of resume and retention, so that the new checkpoints never mix with them. Returns that
        directory, or None when there was nothing to move."""

        def move() -> Optional[str]:
            later = [p for s, p in list_checkpoints(self.root) if s > step]
            if not later:
                return None
            stamp = time.strftime("superseded-%Y%m%d-%H%M%S")
            aside, n = self.root / stamp, 1
            while aside.exists():  # two in the same second
                aside, n = self.root / f"{stamp}-{n}", n + 1
            aside.mkdir()
            for p in later:
                os.replace(p, aside / p.name)
            log.warning("resumed at step %d: moved the %d later checkpoint(s) of this run directory (%s) "
                        "aside into %s", step, len(later), ", ".join(p.name for p in later), aside)
            return str(aside)

        aside = on_rank0(self.rank, move)
        return Path(aside) if aside else None

    def find_latest(self) -> Optional[Path]:
        """Collective: the newest intact checkpoint (all ranks verify, and get the same answer). None when
        there is no checkpoint at all; a :class:`CheckpointError` naming each checkpoint and what is
        wrong with it when there are checkpoints but none is intact (never a silent restart)."""

        listed = on_rank0(self.rank, lambda: [str(p) for _, p in list_checkpoints(self.root)])
        damaged = []
        for path in map(Path, listed):
            problem = self._shared_verify(path)  # the same answer on every rank: they raise together
            if problem is None:
                self._verified = path
                return path
            if problem.startswith(UNREADABLE):
                # an I/O error may pass (a file system hiccup): falling back would roll the run
                # back and move the newer checkpoints aside, so stop and let a retry decide
                raise CheckpointError(f"checkpoint {path} could not be read ({problem}); nothing was "
                                      f"moved or deleted: start again once the file system is healthy, "
                                      f"or resume from another checkpoint with --resume PATH")
            damaged.append(f"{path} ({problem})")
            if self.rank == 0:
                log.warning("checkpoint %s is damaged (%s); falling back to the one before", path, problem)
        if damaged:
            raise CheckpointError(
                f"every checkpoint in {self.root} is damaged: {'; '.join(damaged)}. Nothing was deleted; "
                f"repair or remove them, or resume from another checkpoint with --resume PATH"
            )
        return None

    def load(self, path: Path, tensors: dict[str, Any],
             extra_reader: Optional[Callable[[Path], None]] = None,
             check: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
        """Load ``tensors`` in place (DCP reshards to this run's layout); returns trainer.json.

        All ranks verify the checkpoint together (unless :meth:`find_latest` just did); rank 0 reads
        trainer.json and every rank gets it, or raises rank 0's error. ``check(trainer_state)``, called on every
        rank before any tensor is read, raises when this run cannot load the checkpoint (another
        backend or model). ``extra_reader(path)``, called on every rank after the verification,
        reads what an ``extra_writer`` wrote."""
        path = Path(path)

        if path != self._verified:
            problem = self._shared_verify(path)
            if problem is not None:
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        state = on_rank0(self.rank, lambda: json.loads((path / "trainer.json").read_text()))
        if check is not None:
            check(state)
        dcp.load(tensors, checkpoint_id=str(path))
        if extra_reader is not None:
            extra_reader(path)
        rng = path / "rng" / f"rank{self.rank}.pt"
        world = self._world()
        if state.get("world_size") != world:
            if self.rank == 0:
                log.info("checkpoint %s was written by %s ranks, this run has %d: RNG states not restored "
                         "(training draws its randomness from (seed, step), so the run is unaffected)",
                         path, state.get("world_size"), world)
        elif rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        return state


# -----------------------------------------------------------------------------------------------
# Reading the checkpoints of a run that may still be training (export, sampling, warm starts)
# -----------------------------------------------------------------------------------------------

class CheckpointGone(CheckpointError):
    """The checkpoint directory was deleted or replaced while it was being read: the run that owns
    it is still at work (its retention deletes old checkpoints, a second save of a step replaces its
    checkpoint). The directory of a published checkpoint never changes in place, so this is the one
    way a reader can meet a changing checkpoint."""


class _Damaged(CheckpointError):
    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} is damaged: {problem}")
        self.named = f"{path} ({problem})"


def _inode(path: Path) -> Optional[int]:
    """The inode of directory ``path`` (which directory it is), None when nothing is at ``path``.
    A checkpoint is deleted by renaming it first and replaced by a rename over its name, so the
    directory found at its name after a read is the one read from only if it is the same inode."""
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno == errno.ESTALE:
            return None  # ESTALE: an NFS client's handle of a directory deleted or replaced on the server
        raise


def _still(path: Path, ino: int) -> bool:
    """Whether ``path`` is still the directory ``ino`` (True when that cannot be told: an I/O error
    is reported as such, not taken for a deletion)."""
    try:
        return _inode(path) == ino
    except OSError:
        return True


def _failure(exc: BaseException) -> str:
    """One line for ``exc``. DCP's ``CheckpointException`` (a ``BaseException``) holds each rank's
    exception with its traceback in its message: the first rank's exception is what went wrong."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException) and exc.failures:
        first = next(iter(exc.failures.values()))
        exc = first[0] if isinstance(first, tuple) else first
    return f"{type(exc).__name__}: {exc}"


_LEFT_BY_THE_WRITER = (
    ("tmp-", "a save in progress, or one a stopped run did not make visible"),
    (_REPLACED, "a checkpoint that a new save of its step is replacing, or that a stopped run left renamed aside"),
    (_DELETING, "a checkpoint that retention is deleting"),
)


def _not_published(root: Path) -> str:
    """What a checkpoints directory without a published checkpoint holds instead (for an error)."""
    seen = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            for prefix, what in _LEFT_BY_THE_WRITER:
                if p.name.startswith(prefix + "step_"):
                    seen.append(f"{p.name} ({what})")
    return ("; it holds " + ", ".join(seen) + ". The training run's next start makes visible or removes what a "
            "stopped run left; these are never read") if seen else ""


def _pick_checkpoint(path: Path) -> tuple[str, int, dict[str, Any]]:
    """(path, inode, trainer.json) of the published checkpoint directory ``path`` once it is verified
    (:func:`verify`); :class:`CheckpointGone` when it disappears meanwhile, :class:`_Damaged` when
    its manifest or checksums fail, :class:`CheckpointError` on an I/O error. Reads, never writes."""
    ino = _inode(path)
    if ino is None:
        raise CheckpointGone(f"checkpoint {path} was removed before it could be read")
    problem = verify(path)
    state: dict[str, Any] = {}
    if problem is None:
        try:
            state = json.loads((path / "trainer.json").read_text())
        except OSError as exc:
            problem = f"{UNREADABLE}: trainer.json: {exc}"
        except ValueError as exc:  # checksummed as written: written wrong
            problem = f"trainer.json unreadable: {exc}"
    if _inode(path) != ino:  # the damage seen, if any, was the deletion
        raise CheckpointGone(f"checkpoint {path} was removed while it was being verified")
    if problem is None:
        return str(path), ino, state
    if problem.startswith(UNREADABLE):
        raise CheckpointError(f"checkpoint {path} could not be read ({problem}); nothing was read from it: try "
                              f"again once the file system is healthy, or name another checkpoint")
    raise _Damaged(path, problem)


def _pick_published(source: Path, newest: bool) -> tuple[str, int, dict[str, Any]]:
    """The checkpoint to read (see :func:`read_published`), verified; one process, read-only."""
    if not newest:
        if not source.exists():
            raise FileNotFoundError(f"checkpoint directory not found: {source}")
        if not source.is_dir():
            raise ValueError(f"{source} is a file, not a checkpoint directory (step_*): give an exported "
                             f".safetensors, or convert an official checkpoint with python -m mpdit_dist.models.official")
        for prefix, what in _LEFT_BY_THE_WRITER:
            if source.name.startswith(prefix + "step_"):
                raise CheckpointError(f"{source} is not a published checkpoint ({what}): name a step_* directory, "
                                      f"or the run directory for its newest checkpoint")
        if not (source / COMPLETE).exists():
            for root, what in ((source / "checkpoints", "a run directory"), (source, "a checkpoints directory")):
                inside = list_checkpoints(root)
                if inside:
                    raise CheckpointError(f"{source} is {what}, not a checkpoint: name one of its checkpoints "
                                          f"(newest: {inside[0][1]}), or give the run directory {root.parent} "
                                          f"as such for its newest checkpoint")
        return _pick_checkpoint(source)
    root = source / "checkpoints"
    if not root.is_dir():
        inside = list_checkpoints(source)
        if inside:
            raise FileNotFoundError(f"{source} is a checkpoints directory: name its run directory {source.parent}, "
                                    f"or one of its checkpoints (newest: {inside[0][1]})")
        raise FileNotFoundError(f"no checkpoints/ in {source}: not a run directory, or its run has not saved a "
                                f"checkpoint yet")
    listed = list_checkpoints(root)
    if not listed:
        raise FileNotFoundError(f"no published checkpoint under {root}{_not_published(root)}")
    damaged = []
    for _, path in listed:
        try:
            return _pick_checkpoint(path)
        except _Damaged as exc:
            damaged.append(exc.named)
            log.warning("%s; falling back to the one before", exc)
    raise CheckpointError(f"every published checkpoint in {root} is damaged: {'; '.join(damaged)}. Nothing was "
                          f"read or changed")


def read_published(source: Path, read: Callable[[Path, dict[str, Any]], Any], *,
                   newest: bool) -> tuple[Path, dict[str, Any], Any]:
    """``(checkpoint, its trainer.json, read(checkpoint, trainer.json))`` from a published checkpoint,
    for the tools that read a run's checkpoints while the run may still be training and saving
    (export, sampling, a warm start of another run). They are not the trainer: nothing in the run
    directory is changed (no :meth:`CheckpointManager.clean_partial`; ``tmp-``, ``replaced-`` and
    ``deleting-`` directories are left alone and never read).

    ``newest``: ``source`` is a run directory and its newest intact checkpoint is read (damaged ones
    are skipped with a warning, as at resume); otherwise ``source`` is the checkpoint directory.

    The checkpoint is verified (:func:`verify`), then ``read``; a checkpoint deleted (retention) or
    replaced under the reader, found by its directory's inode, makes the whole read start again
    with the then newest checkpoint, after each wait of :data:`~mpdit_dist.fileio.RETRY_WAITS_S`,
    with a warning naming it: what is returned was read whole from one verified checkpoint, or an
    error names the checkpoint and what happened. A named checkpoint (``newest=False``) that
    disappears is an error (there is no other to read).

    Under a process group (every rank calls it, as ``torchrun`` sampling and a warm start of a
    multi-rank run do), rank 0 picks and verifies the checkpoint and every rank reads that one:
    no two ranks read different steps; ``read`` must involve no collective. A rank that meets a
    deleted checkpoint makes every rank start again; an error on any rank raises on every rank."""
    from .fileio import RETRY_WAITS_S, with_retries

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    source = Path(source)

    def pick() -> tuple[str, Any]:
        try:
            return "ok", _pick_published(source, newest)
        except CheckpointGone as exc:
            return "gone", str(exc)

    def attempt() -> tuple[Path, dict[str, Any], Any]:
        kind, picked = on_rank0(rank, pick)
        if kind == "gone":
            raise CheckpointGone(picked)
        path, ino, state = Path(picked[0]), picked[1], picked[2]
        result, error, outcome = None, None, ("ok", "")
        try:
            if not _still(path, ino):
                raise CheckpointGone(f"checkpoint {path} was removed before it could be read")
            with _dcp_tracebacks_muted():
                result = read(path, state)
            now = _inode(path)
            # another directory under its name now: the files read may be of either. (None: deleted since;
            # every file was opened before that, in the directory verified, and read whole)
            if now is not None and now != ino:
                raise CheckpointGone(f"checkpoint {path} was replaced (a new save of its step) while it was read")
        except CheckpointGone as exc:
            error, outcome = exc, ("gone", str(exc))
        except (Exception, _dcp_failure()) as exc:  # noqa: BLE001 - named, and raised on every rank
            error = exc
            if not _still(path, ino):
                outcome = ("gone", f"checkpoint {path} was removed while it was being read ({_failure(exc)})")
            else:
                outcome = ("error", f"cannot read checkpoint {path}: {_failure(exc)}")
        outcomes = all_gather_object(outcome)
        if any(kind == "error" for kind, _ in outcomes):
            if len(outcomes) == 1:
                if isinstance(error, Exception):
                    raise error  # as it came (a ValueError of the model's arguments stays one)
                raise CheckpointError(outcome[1]) from error
            raise CheckpointError("; ".join(f"rank {r}: {m}" for r, (k, m) in enumerate(outcomes) if k == "error")) \
                from error
        gone = [m for kind, m in outcomes if kind == "gone"]
        if gone:
            raise CheckpointGone(gone[0]) from error
        return path, state, result

    if not newest:
        try:
            return attempt()
        except CheckpointGone as exc:
            raise CheckpointError(f"{exc}: the run that owns it is still saving (its retention deletes old "
                                  f"checkpoints, checkpoint.keep_last and keep_every; a second save of a step replaces "
                                  f"its checkpoint). Name a newer checkpoint, or give its run directory for the "
                                  f"newest") from exc

    def told(exc: BaseException, wait: float) -> None:
        if rank == 0:
            log.warning("%s; the run is still saving checkpoints: reading the newest checkpoint of %s again in "
                        "%g s", exc, source, wait)

    try:
        return with_retries(attempt, retry_if=lambda exc: isinstance(exc, CheckpointGone), on_retry=told)
    except CheckpointGone as exc:
        raise CheckpointError(
            f"could not read a checkpoint of {source}: {len(RETRY_WAITS_S) + 1} times in a row the checkpoint was "
            f"removed or replaced while it was read (last: {exc}). The run deletes checkpoints faster than they can "
            f"be read: keep more of them (checkpoint.keep_last), or read a copy of one") from exc


class _MuteDcpTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "torch/distributed/checkpoint/" in record.pathname.replace(os.sep, "/"))


@contextlib.contextmanager
def _dcp_tracebacks_muted():
    """DCP logs a warning with a full traceback to the root logger (twice) when a checkpoint's
    ``.metadata`` cannot be opened, then raises: for a checkpoint deleted under the reader, the
    one line :func:`read_published` prints says it all, and the traceback would bury it."""
    mute = _MuteDcpTracebacks()
    logging.getLogger().addFilter(mute)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(mute)


def _dcp_failure() -> type:
    """DCP's ``CheckpointException``: a ``BaseException``, which ``except Exception`` lets through."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException
