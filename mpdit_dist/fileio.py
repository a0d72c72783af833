"""Files written whole or not at all, and file or store calls tried again after a failure.

One way for the whole package (the encoder, the loader, the sampler, export, evaluation, MLflow):

- :func:`atomic_path` / :func:`atomic_write`: the new content goes to a temporary file beside the
  target (same directory, so the rename never crosses file systems), which is renamed onto the
  target only once it is complete. A reader, or a later job, sees the old file or the new one,
  never half of one. A failed write (a full disk, an exception, Ctrl-C) removes the temporary
  file and the error goes on; a process killed mid-write leaves only a temporary file named
  ``.<name>.<host>-<pid>-<thread>.tmp``, which :func:`temp_files_of` finds for whoever cleans up.
  ``durable=True`` also fsyncs the file and its directory (the rename survives a power cut).
- :func:`write_json_atomic`, :func:`write_text_atomic`: the common cases.
- :func:`lock_file`: a ``flock`` on a lock file, the one lock of the package (shard claims and the
  finalizer of the encoder, the sampler's ``--out``, the creation of an MLflow SQLite store). The
  kernel drops it when its holder dies, so a killed job never leaves a stale lock.
- :data:`NPY_HEADER_ERRORS`: what numpy raises reading a damaged ``.npy`` header;
  :func:`object_arrays_refused` tells an object array refused from those.
- :func:`with_retries`: a call tried again after each of :data:`RETRY_WAITS_S` while it fails in a
  way that may pass (a file missing for a moment, an I/O error or stale handle on a parallel file
  system, a busy tracking server).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import threading
import time
import tokenize
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, TypeVar, Union

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

# the waits before trying a failed call again; after the last one its error stands
RETRY_WAITS_S = (1.0, 4.0, 15.0)


# What numpy raises while parsing a damaged ``.npy`` header: mostly ValueError; TypeError for a dtype it
# cannot read; and tokenize.TokenError, which escapes from numpy's fallback parser (``_filter_header``,
# tried after a SyntaxError, e.g. for a damaged quote).
NPY_HEADER_ERRORS = (ValueError, TypeError, SyntaxError, tokenize.TokenError)


def object_arrays_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is numpy refusing an object array under ``allow_pickle=False``: a file of another
    kind, not a damaged one (that ValueError is also among :data:`NPY_HEADER_ERRORS`)."""
    return isinstance(exc, ValueError) and "Object arrays cannot be loaded" in str(exc)


def temp_tag() -> str:
    """``<host>-<pid>``: a temp-name part unique among the processes sharing a file system."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_path(path: PathLike) -> Path:
    """The temporary name of this process and thread for writing ``path`` (two writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{temp_tag()}-{threading.get_ident()}.tmp")


def temp_files_of(path: PathLike) -> list[Path]:
    """The temporary files that writers of ``path`` left, of every process (to be removed only by a
    process that knows no other writer of ``path`` is at work)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def fsync_path(path: PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames into it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary name for the caller to write ``path`` under (for writers that take a file
    name, such as safetensors); renamed onto ``path`` when the block ends without error, removed
    when it raises."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", durable: bool = False) -> Iterator[IO[Any]]:
    """Yield a file open (``mode``: ``"wb"`` or ``"w"``) on a temporary name; its content replaces
    ``path`` when the block ends without error (see :func:`atomic_path`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode {mode!r}, expected 'wb' or 'w'")
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())


def write_text_atomic(path: PathLike, text: str, durable: bool = False) -> None:
    with atomic_write(path, "w", durable=durable) as f:
        f.write(text)


def json_text(obj: Any, indent: int = 1) -> str:
    """The package's JSON files: keys sorted, one line per key, ending with a newline."""
    return json.dumps(obj, indent=indent, sort_keys=True) + "\n"


def write_json_atomic(path: PathLike, obj: Any, durable: bool = True, indent: int = 1) -> None:
    """``obj`` as JSON (:func:`json_text`) at ``path``, never half-visible; durable by default (the
    records that commit a shard or a run's outputs)."""
    write_text_atomic(path, json_text(obj, indent), durable=durable)


def write_json_exclusive(path: PathLike, obj: Any) -> bool:
    """Create ``path`` holding ``obj`` only if it does not exist (a complete, fsynced temporary file
    hard-linked to the name, so the file is never seen half-written); False if it already existed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(json_text(obj))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True


def lock_file(path: PathLike, *, blocking: bool, shared: bool = False) -> Optional[int]:
    """A ``flock`` of the lock file ``path`` (created if missing): exclusive, or ``shared``. Returns
    the open fd that holds it (``os.close`` releases it), or None when another process holds it and
    ``blocking`` is False. A holder may remove the file while it holds it (so that no lock files
    stay behind): a process that locked the removed file finds another inode at the path and tries
    again. Raises ``OSError`` (no fd left open) where the file system has no ``flock`` (some NFS and
    Lustre mounts: Lustre needs ``-o flock``); the caller decides whether to go on unlocked."""
    import fcntl

    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def is_oserror(exc: BaseException) -> bool:
    return isinstance(exc, OSError)


def with_retries(fn: Callable[[], T], *, retry_if: Callable[[BaseException], bool] = is_oserror,
                 on_retry: Optional[Callable[[BaseException, float], None]] = None,
                 first_error: Optional[BaseException] = None) -> T:
    """``fn()``, tried again after each wait of :data:`RETRY_WAITS_S` while it raises an exception
    that ``retry_if`` accepts (``OSError`` by default); ``on_retry(error, wait)`` is told before
    each wait (to log it). The last try's error, or one that ``retry_if`` refuses, is raised.
    ``first_error``: the first try's error, when the caller made that try itself (a fast path)."""
    for wait in RETRY_WAITS_S:
        if first_error is None:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - retry_if decides
                first_error = exc
        if not retry_if(first_error):
            raise first_error
        if on_retry is not None:
            on_retry(first_error, wait)
        time.sleep(wait)
        first_error = None
    return fn()
