"""Experiment tracking: MLflow (rank 0 only) and ``metrics.jsonl`` in the run directory.

``Tracker`` is the one object the trainer logs through. On rank 0 it

- appends one JSON object per ``log_metrics`` call to ``<run_dir>/metrics.jsonl`` and flushes
  it, whatever happens to MLflow: that file is the record any tool can read
  (``read_metrics``);
- mirrors metrics, params, tags and artifacts to an MLflow run. The default store is the
  embedded SQLite file ``<results_dir>/mlflow.db`` (nothing to start); ``tracking.uri`` points
  at any other store (a team's server, a file store). Runs sharing an SQLite file create it
  one at a time (``store_init_lock``). The run id is kept in
  ``<run_dir>/mlflow_run_id`` so that a resumed job continues the same MLflow run, even when
  the earlier process died and left the run RUNNING.

On every other rank it is a no-op with the same methods, so the trainer calls it
unconditionally.

MLflow is optional at run time: tracking switched off, a server that cannot be reached or a
store that fails gives exactly one warning and training goes on with ``metrics.jsonl``. After
start-up nothing MLflow does raises into the training loop: MLflow calls run on a background
thread (a slow server or a SQLite commit never stalls a step); a call that fails is tried again
for about 20 s, and one that still fails switches MLflow off for the rest of the run with one
warning. Each start of a run adds to its MLflow run the metric values of ``metrics.jsonl`` that
MLflow lacks, and the files of the run directory that are artifacts of the run (sample grids, the
config, the profile summary: :data:`RUN_ARTIFACTS`) that MLflow lacks, so a run whose MLflow logging
failed, or whose queue was abandoned when it was preempted, is complete again after its next start
(a requeue, a resume, or the same command once more after the end). The thread is ours rather than
MLflow's own async logging because we need the failure policy above, artifacts on the same
ordered queue, and a bounded flush on ``close``.
"""
from __future__ import annotations

import getpass
import json
import logging
import math
import os
import posixpath
import queue
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from .config import TrackingConfig
from .fileio import lock_file, with_retries, write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Keys every metrics.jsonl record carries besides the metrics themselves.
_RESERVED_KEYS = ("step", "time")

# MLflow's limits (mlflow.utils.validation); older releases had 500-character params, so read
# them from the installed MLflow where it has them.
try:  # pragma: no cover - depends on the installed MLflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as _MAX_PARAM_LEN
except Exception:  # pragma: no cover
    _MAX_PARAM_LEN = 500
try:  # pragma: no cover
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH as _MAX_TAG_LEN
except Exception:  # pragma: no cover
    _MAX_TAG_LEN = 5000
_MAX_KEY_LEN = 250
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def default_tracking_uri(results_dir: str | Path) -> str:
    """The embedded store: ``sqlite:///<absolute results_dir>/mlflow.db``."""
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Optional[Path]:
    """The database file of an ``sqlite:///`` URI (absolute or relative), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def store_init_lock(tracking_uri: str, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold ``<db>.init.lock`` (a ``flock``) while an SQLite store is opened.

    MLflow creates the tables of a new SQLite store, and runs its schema migrations, in
    whichever process opens it first, without any lock: two processes opening a fresh
    ``mlflow.db`` at once (the points of a scaling study, several runs started together in one
    results dir) fail with errors such as "duplicate column name" or "table
    _alembic_tmp_latest_metrics already exists", and can leave the store half-migrated, unusable
    by every later run. A process that finds no database (or an empty file) takes the lock
    exclusively and creates the store; one that finds a database takes it shared: it waits
    only while a store is being created, and processes opening an existing store do not wait
    for each other. Other URIs, and file systems without ``flock``, are not locked. Raises
    TimeoutError if another process holds the lock for more than ``timeout_s``.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db.with_name(db.name + ".init.lock")
    fd = _lock_store(lock_path, db, time.monotonic() + timeout_s, timeout_s)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _no_store(db: Path) -> bool:
    try:
        return db.stat().st_size == 0
    except FileNotFoundError:
        return True


def _lock_store(path: Path, db: Path, deadline: float, timeout_s: float) -> Optional[int]:
    """``flock`` the lock file ``path`` (:func:`~mpdit_dist.fileio.lock_file`): exclusively while
    there is no store ``db`` yet, else shared; the fd that holds it, None where the file system has
    no flock.

    Whether the store exists is asked again at each try: MLflow writes the database file only while
    its creator holds the lock exclusively, so a process that finds a database waits only for that
    creator, not for the others that were also waiting to create it. Polls until ``deadline``
    (TimeoutError).
    """
    while True:
        want_exclusive = _no_store(db)
        try:
            fd = lock_file(path, blocking=False, shared=not want_exclusive)
        except OSError as exc:  # no flock on this file system (some Lustre mounts)
            logger.debug("cannot lock %s (%s); opening the store unlocked", path, exc)
            return None
        if fd is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"another process has held {path} for over {timeout_s:g}s "
                                   f"while opening the MLflow store")
            time.sleep(0.05)
            continue
        if not want_exclusive or _no_store(db):
            return fd
        os.close(fd)  # another process created the store while this one waited: take it shared


def open_client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri``; an SQLite store is opened (created if new) under
    ``store_init_lock`` so that processes starting together do not race to create it."""
    from mlflow.tracking import MlflowClient

    with store_init_lock(tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri)  # opens the store (creates its tables)


def ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The shell command that opens the MLflow UI on a local store."""
    return f"mlflow ui --backend-store-uri {tracking_uri} --port {port}"


# --------------------------------------------------------------------------- metrics.jsonl


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (or of the given .jsonl file), one per step.

    A resumed run re-logs the steps between its checkpoint and the crash, so a step can appear
    more than once in the file. Records of the same step are merged in file order: each step
    appears once, and for every key the last value written wins (so a re-logged step replaces
    the values of the crashed attempt, and separate log calls at one step, say training
    metrics and an evaluation, are combined). The result is sorted by step.

    Lines that do not parse (a line cut short by a crash) are skipped with a warning that
    counts them. NaN and infinite values were written as ``null``.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    bad_lines: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                bad_lines.append(lineno)
                continue
            by_step.setdefault(step, {}).update(record)
    if bad_lines:
        logger.warning("%s: skipped %d unreadable line(s) (lines %s)", path, len(bad_lines),
                       bad_lines[:10])
    return [by_step[s] for s in sorted(by_step)]


def missing_metrics(client, run_id: str, records: list[dict[str, Any]]) -> tuple[list, int]:
    """The values of ``records`` (:func:`read_metrics`) that the MLflow run lacks, as MLflow
    ``Metric`` entities (one per metric and step, stamped with the record's time), and how many
    metrics they belong to. Values that were not finite (``null`` in the file) or not numbers are
    left out, as the tracker leaves non-numbers out."""
    from mlflow.entities import Metric

    keys = sorted({k for r in records for k in r if k not in _RESERVED_KEYS})
    missing: list = []
    short_of = 0
    for key in keys:
        mkey = _mlflow_key(key)
        logged = {m.step for m in client.get_metric_history(run_id, mkey)}
        before = len(missing)
        for r in records:
            number = _mlflow_value(r.get(key))
            if number is not None and int(r["step"]) not in logged:
                missing.append(Metric(mkey, number, int(float(r.get("time") or 0) * 1000), int(r["step"])))
        short_of += len(missing) > before
    return missing, short_of


# --------------------------------------------------------------------------- run-directory artifacts

# The files of a run directory that are artifacts of its MLflow run: glob patterns relative to the
# run directory, whose ``*`` stays within one folder. A file's artifact path in the run is its path
# in the run directory (:func:`run_artifact_path`). The trainer logs each one when it is made
# (:meth:`Tracker.log_run_file`), and each start of the run adds those that MLflow lacks
# (:func:`missing_artifacts`): both go through :func:`run_artifact_path`, so they cannot drift apart.
RUN_ARTIFACTS = (
    "config.yaml",  # the resolved config (trainer.fit, at every start)
    "samples/*.png",  # the sample grids (trainer.sample_grid)
    "profile/step_*/rank0.txt",  # the profiled window's summary (trainer._report_profile)
)


def run_artifact_path(run_dir: str | Path, path: str | Path) -> Optional[str]:
    """The artifact path in the MLflow run (as ``list_artifacts`` names it: ``samples/x.png``) of
    the run-directory file ``path``, or None when :data:`RUN_ARTIFACTS` does not name it."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(run_dir))
    except ValueError:
        return None
    rel = PurePosixPath(rel.as_posix())
    for pattern in RUN_ARTIFACTS:
        # PurePath.match anchors a relative pattern at the right only: equal lengths make it whole
        if len(rel.parts) == len(PurePosixPath(pattern).parts) and rel.match(pattern):
            return str(rel)
    return None


def run_artifact_files(run_dir: str | Path) -> dict[str, Path]:
    """The files of ``run_dir`` that are artifacts of its run (:data:`RUN_ARTIFACTS`), by artifact
    path."""
    run_dir = Path(run_dir)
    files: dict[str, Path] = {}
    for pattern in RUN_ARTIFACTS:
        for path in sorted(run_dir.glob(pattern)):
            key = run_artifact_path(run_dir, path)
            if key is not None and path.is_file():
                files[key] = path
    return files


def missing_artifacts(client, run_id: str, sizes: Mapping[str, int]) -> list[str]:
    """The artifact paths of ``sizes`` (artifact path -> size in bytes of the local file) that the
    MLflow run lacks: not listed, or listed with another size (an upload cut short). A store that
    does not report sizes is trusted by name. Lists only the folders that hold the paths."""
    by_folder: dict[str, list[str]] = {}
    for key in sizes:
        by_folder.setdefault(posixpath.dirname(key), []).append(key)
    missing = []
    for folder, keys in sorted(by_folder.items()):
        listed = {f.path: f.file_size for f in client.list_artifacts(run_id, folder or None) if not f.is_dir}
        missing += [k for k in keys if k not in listed or listed[k] not in (None, sizes[k])]
    return sorted(missing)


def _file_signature(path: Path) -> Optional[tuple[int, int]]:
    """(size, mtime in ns) of a file, or None if it is gone: its content changed when this did."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _listing(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _scalar(value: Any) -> Any:
    """torch / numpy scalars -> Python numbers; anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):  # not a one-element array
            return value
    return value


def _json_value(value: Any) -> Any:
    """A metric value as JSON: numbers stay numbers (NaN/inf -> null), tensors become numbers."""
    value = _scalar(value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _mlflow_value(value: Any) -> Optional[float]:
    """A metric value as MLflow takes it (a float; NaN and inf allowed) or None if not numeric."""
    value = _scalar(value)
    if isinstance(value, str) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _mlflow_key(key: str) -> str:
    """A metric/param key MLflow accepts: its character set, no path tricks, at most 250 chars."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    norm = posixpath.normpath(key)
    if norm != key or norm in (".", "..") or norm.startswith(("/", "..")):
        key = key.replace("/", "_")
    return key[:_MAX_KEY_LEN]


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[{len(text)} chars]"
    return text[: limit - len(marker)] + marker


def _git_commit(path: Path) -> Optional[str]:
    """HEAD of the git repository holding ``path``, or None (no git, not a repo, too slow)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


# --------------------------------------------------------------------------- background worker

_STOP = object()
# MlflowException codes that no retry changes (a request the store refuses)
_PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                     "PERMISSION_DENIED", "UNAUTHENTICATED")


class _Metrics:
    """One queued ``log_metrics`` call (kept apart so consecutive ones merge into one batch)."""

    __slots__ = ("items",)

    def __init__(self, items: list):
        self.items = items


class _Artifact:
    """One queued artifact upload: ``local`` (a file, or a folder's files) into the run under the
    folder ``folder`` (None: the root). ``key``: the artifact path of a run-directory file
    (:func:`run_artifact_path`), whose content the worker uploads at most once."""

    __slots__ = ("local", "folder", "key")

    def __init__(self, local: Path, folder: Optional[str], key: Optional[str] = None):
        self.local, self.folder, self.key = local, folder, key

    def name(self) -> str:
        return self.key or str(self.local)


def _retryable(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) not in _PERMANENT_ERRORS


class _MlflowWorker:
    """Runs MLflow calls in order on a daemon thread. A call that fails is tried again after
    pauses (:data:`mpdit_dist.fileio.RETRY_WAITS_S`, ~20 s in all: a store held locked past
    SQLite's 20 s busy timeout, a server restarting); one that still fails switches MLflow off for
    the rest of the run. What is skipped then is counted (calls, metric values and artifacts: ``metrics.jsonl`` and
    the run directory have them, and the run's next start adds them to MLflow,
    :func:`missing_metrics`, :func:`missing_artifacts`)."""

    def __init__(self, client, run_id: str, describe: str, jsonl: Path):
        self._client = client
        self._run_id = run_id
        self._describe = describe
        self._jsonl = jsonl
        self._queue: queue.Queue = queue.Queue()
        self.failed = False
        self.dropped = 0
        self.dropped_values = 0  # metric values among the dropped calls
        self.dropped_artifacts: list[str] = []  # the artifacts among them (_Artifact.name)
        # artifact path -> _file_signature of the run-directory files uploaded by this process
        # (worker thread only): the same content is not uploaded twice
        self.uploaded: dict[str, tuple[int, int]] = {}
        self._thread = threading.Thread(target=self._loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[], None] | _Metrics | _Artifact) -> None:
        self._queue.put(op)

    def pending(self) -> int:
        """The calls still queued (the worker's own stop marker not counted)."""
        with self._queue.mutex:
            return sum(item is not _STOP for item in self._queue.queue)

    def pending_artifacts(self) -> list[str]:
        """The artifacts still queued (names, :meth:`_Artifact.name`)."""
        with self._queue.mutex:
            return [item.name() for item in self._queue.queue if isinstance(item, _Artifact)]

    def call(self, op: Callable[[], Any]) -> Any:
        """``op()`` with the store's retry policy; its error once that gives up."""
        return with_retries(op, retry_if=_retryable, on_retry=self._note_retry)

    def upload(self, item: _Artifact) -> None:
        """Upload one artifact (no retry: see :meth:`call`); a run-directory file whose content
        this process uploaded already is skipped."""
        sig = _file_signature(item.local) if item.key is not None else None
        if sig is not None and self.uploaded.get(item.key) == sig:
            return
        if not item.local.exists():
            # removed after it was queued (a user cleaning the run dir, a test): nothing to upload, and
            # no reason to try again for 20 s and then switch MLflow off for the rest of the run
            logger.warning("MLflow: %s was removed before its upload; not logged", item.local)
            return
        if item.local.is_dir():
            self._client.log_artifacts(self._run_id, str(item.local), item.folder)
        else:
            self._client.log_artifact(self._run_id, str(item.local), item.folder)
        if sig is not None:
            self.uploaded[item.key] = sig

    def _loop(self) -> None:
        held = None
        while True:
            item = held if held is not None else self._queue.get()
            held = None
            if item is _STOP:
                return
            if isinstance(item, _Metrics):
                # Merge whatever metric calls are already waiting into one log_batch request.
                metrics = list(item.items)
                while len(metrics) < _MAX_METRICS_PER_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(nxt, _Metrics) and len(metrics) + len(nxt.items) <= _MAX_METRICS_PER_BATCH:
                        metrics.extend(nxt.items)
                    else:
                        held = nxt
                        break
                op = (lambda m=metrics: self._client.log_batch(self._run_id, metrics=m))
            elif isinstance(item, _Artifact):
                op = (lambda a=item: self.upload(a))
            else:
                op = item
            if not self.failed:
                self._run(op)
            if self.failed:
                self.dropped += 1
                if isinstance(item, _Metrics):
                    self.dropped_values += len(metrics)
                elif isinstance(item, _Artifact):
                    self.dropped_artifacts.append(item.name())

    def _note_retry(self, exc: BaseException, pause: float) -> None:
        logger.info("MLflow call to %s failed (%s: %s); trying again in %gs", self._describe,
                    type(exc).__name__, _truncate(str(exc), 200), pause)

    def _run(self, op: Callable[[], None]) -> None:
        try:
            self.call(op)
        except Exception as exc:  # noqa: BLE001 - any failure of the store ends MLflow logging
            self.failed = True
            logger.warning(
                "MLflow logging to %s failed (%s: %s); MLflow tracking is off for the rest "
                "of this run, metrics continue in %s (the run's next start adds to MLflow the "
                "metric values and run-directory artifacts it lacks)",
                self._describe, type(exc).__name__, _truncate(str(exc), 300), self._jsonl)

    def close(self, timeout: float) -> bool:
        """Flush and stop; False if the thread was still busy after ``timeout`` seconds."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()


# --------------------------------------------------------------------------- the tracker


@contextmanager
def bounded_http(timeout_s: float) -> Iterator[None]:
    """Cap MLflow's HTTP retries and timeout for start-up calls (its defaults retry for minutes).

    MLflow reads these variables at each request; a value the user has set is left alone.
    """
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(math.ceil(timeout_s))))}
    added = [n for n in names if n not in os.environ]
    for n in added:
        os.environ[n] = names[n]
    try:
        yield
    finally:
        for n in added:
            os.environ.pop(n, None)


def probe_http(uri: str, timeout_s: float) -> None:
    """Raise ConnectionError if nothing answers HTTP at ``uri`` within ``timeout_s`` seconds.

    Any HTTP answer counts as reachable (a proxy or an auth layer may answer /health with 404
    or 401): only a refused connection or a timeout is "unreachable".
    """
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.exceptions.SSLError:
        return  # something answered; TLS settings (MLFLOW_TRACKING_INSECURE_TLS, ...) are MLflow's
    except requests.RequestException as exc:
        raise ConnectionError(f"no answer within {timeout_s:g}s ({type(exc).__name__})") from None


class Tracker:
    """Metrics, params, tags and artifacts of one training run (MLflow + ``metrics.jsonl``).

    Args:
        cfg: the ``tracking`` section of the config (enabled, uri, experiment, run_name).
        run_dir: the run directory; receives ``metrics.jsonl`` and ``mlflow_run_id``.
        rank: the global rank; only rank 0 writes anything.
        results_dir: where the default SQLite store ``mlflow.db`` lives.
        params: the flattened resolved config, logged as MLflow params. Values longer than
            MLflow's limit are truncated (marked ``...[N chars]``). On resume only params the
            run does not hold yet are logged; a value that changed is kept as the tag
            ``resume_changed.<key>`` (MLflow refuses to change a param) with a warning.
        tags: run tags (git commit, model, world size, backend, ...). ``mlflow.source.git.commit``
            is added when this package sits in a git repository.
        artifacts: run-directory files that this start (re)writes and logs at once, such as the
            resolved ``config.yaml`` (:meth:`log_run_file`). They are queued before the start compares
            the run directory with the run's artifacts, so they are neither reported as missing
            nor uploaded twice.
        console: print the MLflow run id and store at start (rank 0).
        probe_timeout_s: how long start-up waits for an HTTP tracking server.
        close_timeout_s: how long ``close`` waits for queued MLflow calls to finish.

    Each start of a run that has earlier starts behind it (a ``metrics.jsonl`` with records, or
    an MLflow run to resume) adds, on the background thread, what MLflow lacks: the metric values
    of ``metrics.jsonl`` (:func:`missing_metrics`) and the run-directory files of
    :data:`RUN_ARTIFACTS` (:func:`missing_artifacts`, by path and size), each counted in one
    warning. A failure there is a warning; training does not wait for it.

    ``run_id`` is the MLflow run id on rank 0 while MLflow is reachable, else None (other
    ranks, tracking off, store unavailable). Call the methods from one thread (the training
    loop's).

    Use it as a context manager, or call ``close``: an exception leaving the ``with`` block
    ends the MLflow run FAILED (KILLED for KeyboardInterrupt), a normal exit FINISHED.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str | Path,
        *,
        rank: int,
        results_dir: str | Path,
        params: Optional[Mapping[str, Any]] = None,
        tags: Optional[Mapping[str, Any]] = None,
        artifacts: Iterable[str | Path] = (),
        console: bool = True,
        probe_timeout_s: float = 5.0,
        close_timeout_s: float = 60.0,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.tracking_uri: Optional[str] = None
        self.metrics_path = self.run_dir / METRICS_FILE
        self._close_timeout_s = close_timeout_s
        self._closed = False
        self._file = None
        self._worker: Optional[_MlflowWorker] = None
        self._known_params: dict[str, str] = {}
        self._non_numeric_warned: set[str] = set()
        self._artifact_warned = False
        self._write_warned = False
        if rank != 0:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        earlier_start = self.metrics_path.exists() and self.metrics_path.stat().st_size > 0
        self._open_metrics_file()
        if not cfg.enabled:
            logger.warning("MLflow tracking is off (tracking.enabled=false); metrics go to %s "
                           "only", self.metrics_path)
            return
        self.tracking_uri = cfg.uri or default_tracking_uri(results_dir)
        try:
            client, run_id, experiment_id, resumed = self._start(params or {}, dict(tags or {}),
                                                                 probe_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a broken store must not stop training
            logger.warning(
                "MLflow tracking unavailable at %s (%s: %s); training continues with metrics in "
                "%s only", self.tracking_uri, type(exc).__name__, _truncate(str(exc), 1000),
                self.metrics_path)
            self.tracking_uri = self.run_id = None
            return
        self.run_id, self.experiment_id = run_id, experiment_id
        self._worker = _MlflowWorker(client, run_id, self.tracking_uri, self.metrics_path)
        logged_now = set()
        for path in artifacts:
            self.log_run_file(path)
            logged_now.add(run_artifact_path(self.run_dir, path))
        if earlier_start:  # records of earlier starts of this run
            records = read_metrics(self.metrics_path)
            self._worker.submit(lambda: self._add_missing_metrics(client, run_id, records))
        if earlier_start or resumed:
            # the files of earlier starts (those this start makes are logged as they are made)
            files = {k: p for k, p in run_artifact_files(self.run_dir).items() if k not in logged_now}
            if files:
                self._worker.submit(lambda: self._add_missing_artifacts(client, run_id, files))
        if console:
            print(f"MLflow run {run_id} (experiment '{cfg.experiment}') in {self.tracking_uri}",
                  flush=True)
            if self.tracking_uri.startswith(("http://", "https://")):
                print(f"  {self.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/"
                      f"{run_id}", flush=True)
            elif self.tracking_uri.startswith("sqlite:"):
                print(f"  UI: {ui_command(self.tracking_uri)}", flush=True)

    # ----------------------------------------------------------------- start-up (rank 0)

    def _open_metrics_file(self) -> None:
        # A crash can leave a last line without its newline; start on a fresh line so the
        # next record is not glued to it.
        needs_newline = False
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            with open(self.metrics_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
            self._file.flush()

    def _start(self, params: Mapping[str, Any], tags: dict[str, Any], probe_timeout_s: float):
        """Find or create the experiment, resume or create the run, log params and tags. Returns
        the client, the run id, the experiment id and whether the run was resumed."""
        uri = self.tracking_uri
        assert uri is not None
        if uri.startswith(("http://", "https://")):
            probe_http(uri, probe_timeout_s)
        from mlflow.exceptions import MlflowException

        with bounded_http(probe_timeout_s):
            client = open_client(uri)
            run = self._resume_run(client)
            resumed = run is not None
            if run is None:
                experiment_id = self._experiment_id(client, MlflowException)
                commit = _git_commit(Path(__file__).resolve().parent)
                system_tags = {"mlflow.source.name": sys.argv[0] or "python",
                               "mlflow.source.type": "LOCAL"}
                if commit:
                    system_tags["mlflow.source.git.commit"] = commit
                try:
                    system_tags["mlflow.user"] = getpass.getuser()
                except Exception:  # noqa: BLE001 - no user name in some containers
                    pass
                run = client.create_run(
                    experiment_id, run_name=self.cfg.run_name or self.run_dir.name,
                    tags={k: _truncate(str(v), _MAX_TAG_LEN) for k, v in system_tags.items()})
                self._write_run_id(run.info.run_id)
            else:
                experiment_id = run.info.experiment_id
                client.update_run(run.info.run_id, status="RUNNING")
            run_id = self.run_id = run.info.run_id  # (reset below if start-up fails)
            self._known_params = dict(run.data.params)
            param_entities, changed = self._new_params(params)
            tags.update({f"resume_changed.{k}": v for k, v in changed.items()})
            self._log_params_now(client, run_id, param_entities)
            self._set_tags_now(client, run_id, tags)
        return client, run_id, experiment_id, resumed

    def _add_missing_metrics(self, client, run_id: str, records: list[dict[str, Any]]) -> None:
        """Worker thread: the values of earlier starts that never reached MLflow (it was off,
        unreachable or failed then), from ``metrics.jsonl``."""
        missing, keys = missing_metrics(client, run_id, records)
        for i in range(0, len(missing), _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=missing[i:i + _MAX_METRICS_PER_BATCH])
        if missing:
            logger.warning("MLflow run %s lacked %d value(s) of %d metric(s) that %s holds (logged while MLflow "
                           "was off or failing); added them", run_id, len(missing), keys, self.metrics_path)

    def _add_missing_artifacts(self, client, run_id: str, files: Mapping[str, Path]) -> None:
        """Worker thread: upload the run-directory files ``files`` (artifact path -> file) of earlier
        starts that the MLflow run lacks (uploaded while MLflow was off or failing, or still queued
        when a preempted run stopped waiting). Never switches MLflow off: a failure, after the
        store's retries, is one warning, and the next start tries again."""
        worker = self._worker
        sizes = {}
        for key, path in files.items():
            sig = _file_signature(path)
            if sig is not None:  # a file removed since the start is no longer owed
                sizes[key] = sig[0]
        missing: Optional[list[str]] = None
        added: list[str] = []
        try:
            missing = worker.call(lambda: missing_artifacts(client, run_id, sizes))
            for key in missing:
                worker.call(lambda k=key: worker.upload(_Artifact(files[k], posixpath.dirname(k) or None, k)))
                added.append(key)
        except Exception as exc:  # noqa: BLE001 - a repair must never cost the run
            left = "the" if missing is None else f"{len(missing) - len(added)} of the {len(missing)}"
            logger.warning("could not add %s missing artifact(s) of %s to MLflow run %s (%s: %s); the run's next "
                           "start tries again", left, self.run_dir, run_id, type(exc).__name__,
                           _truncate(str(exc), 300))
        if added:
            logger.warning("MLflow run %s: added %d artifact(s) MLflow lacked: %s (files of %s logged while MLflow "
                           "was off or failing, or still queued when a start of the run stopped)", run_id,
                           len(added), _listing(added), self.run_dir)

    def _resume_run(self, client):
        """The run named in ``<run_dir>/mlflow_run_id``, or None to start a new one."""
        from mlflow.exceptions import MlflowException

        path = self.run_dir / RUN_ID_FILE
        if not path.exists():
            return None
        run_id = path.read_text().strip()
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            logger.warning("%s names MLflow run %r, which %s in %s; starting a new MLflow run",
                           path, run_id, "is deleted" if run else "does not exist",
                           self.tracking_uri)
            return None
        return run

    def _experiment_id(self, client, MlflowException) -> str:
        name = self.cfg.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            artifact_location = None
            if self.tracking_uri and self.tracking_uri.startswith("sqlite:///"):
                # MLflow's default artifact root for a database store is ./mlruns in the
                # current directory; keep artifacts next to the database instead.
                db = Path(self.tracking_uri[len("sqlite:///"):])
                artifact_location = (db.resolve().parent / "mlartifacts").as_uri()
            try:
                return client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as exc:  # another job created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)
        if exp.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment '{name}' is deleted; restore it "
                               f"(mlflow experiments restore) or set tracking.experiment")
        return exp.experiment_id

    def _write_run_id(self, run_id: str) -> None:
        write_text_atomic(self.run_dir / RUN_ID_FILE, run_id + "\n")

    def _new_params(self, params: Mapping[str, Any]):
        """Params the run does not hold yet, and those whose value changed (MLflow refuses)."""
        from mlflow.entities import Param

        new, changed = [], {}
        for key, value in params.items():
            k, v = _mlflow_key(key), _truncate(str(value), _MAX_PARAM_LEN)
            if k not in self._known_params:
                self._known_params[k] = v
                new.append(Param(k, v))
            elif self._known_params[k] != v:
                changed[k] = v
        if changed:
            logger.warning(
                "MLflow run %s already holds different values for %d param(s) (%s); MLflow "
                "cannot change a param, the new values are kept as tags resume_changed.<key>",
                self.run_id or "(resumed)", len(changed), ", ".join(sorted(changed)[:10]))
        return new, changed

    @staticmethod
    def _log_params_now(client, run_id: str, entities: list) -> None:
        for i in range(0, len(entities), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=entities[i:i + _MAX_PARAMS_PER_BATCH])

    @staticmethod
    def _set_tags_now(client, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entities = [RunTag(_mlflow_key(k), _truncate(str(v), _MAX_TAG_LEN)) for k, v in tags.items()]
        for i in range(0, len(entities), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=entities[i:i + _MAX_PARAMS_PER_BATCH])

    # ----------------------------------------------------------------- logging (any rank)

    @property
    def mlflow_active(self) -> bool:
        """True while metrics still go to MLflow (rank 0, tracking on, no failure so far)."""
        return self._worker is not None and not self._worker.failed and not self._closed

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl (flushed) and queue for MLflow.

        Every rank may call it; only rank 0 writes. ``step`` is always explicit (MLflow puts
        metrics logged without one at step 0). Values may be Python/numpy/torch scalars;
        non-numeric values go to metrics.jsonl only (one warning per key).
        """
        if self._file is None or self._closed:
            return
        step = int(step)
        for key in _RESERVED_KEYS:
            if key in metrics:
                raise ValueError(f"log_metrics: '{key}' is written by the tracker; rename the "
                                 f"metric (got keys {sorted(metrics)})")
        now = time.time()
        record = {"step": step, "time": round(now, 3)}
        record.update({str(k): _json_value(v) for k, v in metrics.items()})
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            if not self._write_warned:
                self._write_warned = True
                logger.warning("cannot write %s (%s); metrics of this run may be incomplete",
                               self.metrics_path, exc)
        if self._worker is None or self._worker.failed:
            return
        from mlflow.entities import Metric

        stamp = int(now * 1000)
        items = []
        for key, value in metrics.items():
            number = _mlflow_value(value)
            if number is None:
                if key not in self._non_numeric_warned:
                    self._non_numeric_warned.add(key)
                    logger.warning("metric %r=%r is not a number: written to metrics.jsonl, not "
                                   "to MLflow", key, value)
                continue
            items.append(Metric(_mlflow_key(key), number, stamp, step))
        if items:
            self._worker.submit(_Metrics(items))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values truncated to MLflow's limit); already-logged keys are skipped."""
        if self._worker is None or self._closed:
            return
        entities, changed = self._new_params(params)
        client, run_id = self._worker._client, self.run_id
        if entities:
            self._worker.submit(lambda: self._log_params_now(client, run_id, entities))
        if changed:
            tags = {f"resume_changed.{k}": v for k, v in changed.items()}
            self._worker.submit(lambda: self._set_tags_now(client, run_id, tags))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values truncated to MLflow's limit; a tag may be overwritten)."""
        if self._worker is None or self._closed:
            return
        client, run_id, tags = self._worker._client, self.run_id, dict(tags)
        self._worker.submit(lambda: self._set_tags_now(client, run_id, tags))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Copy a file (or a directory's files) into the MLflow run, under ``artifact_path``.

        Uploads happen on the background thread: the file must stay in place until ``close``
        (files in the run directory do).
        """
        if self._worker is None or self._closed:
            return
        path = Path(path)
        if not path.exists():
            if not self._artifact_warned:
                self._artifact_warned = True
                logger.warning("log_artifact: %s does not exist; not logged", path)
            return
        key = run_artifact_path(self.run_dir, path)
        if key is not None and (posixpath.dirname(key) or None) != (artifact_path or None):
            key = None  # logged under another path than the one each start compares
        self._worker.submit(_Artifact(path, artifact_path, key))

    def log_run_file(self, path: str | Path) -> None:
        """Log a file of the run directory under its artifact path :func:`run_artifact_path` (its
        path in the run directory): the path each start of the run compares with the run's
        artifacts to add those that MLflow lacks. A file that :data:`RUN_ARTIFACTS` does not name
        is not logged (one warning: add its pattern there).

        Uploads happen on the background thread, as :meth:`log_artifact`'s.
        """
        if self._worker is None or self._closed:
            return
        key = run_artifact_path(self.run_dir, path)
        if key is None:
            logger.warning("log_run_file: %s is no artifact of the run (mpdit_dist.tracking.RUN_ARTIFACTS "
                           "names none such under %s); not logged", path, self.run_dir)
            return
        self.log_artifact(path, posixpath.dirname(key) or None)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until queued MLflow calls are done (True) or ``timeout`` passes (False)."""
        if self._worker is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        done = threading.Event()
        self._worker.submit(done.set)
        while not done.is_set():
            if self._worker.failed or not self._worker._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            done.wait(0.05)
        return True

    def close(self, status: str = "FINISHED", timeout_s: Optional[float] = None) -> None:
        """End the MLflow run with ``status`` (FINISHED, FAILED or KILLED) and close the file.

        Waits at most ``timeout_s`` (default ``close_timeout_s``) for queued MLflow calls, then
        abandons them (metrics.jsonl and the run directory hold everything, and the run's next start
        adds what MLflow lacks); safe to call twice. The log counts the calls abandoned, or skipped
        after a failure, and names the artifacts among them.
        """
        wait_s = self._close_timeout_s if timeout_s is None else timeout_s
        if status not in _STATUSES:
            raise ValueError(f"Tracker.close: status={status!r}, choose one of {list(_STATUSES)}")
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            client, run_id = self._worker._client, self.run_id
            self._worker.submit(lambda: client.set_terminated(run_id, status))
            if not self._worker.close(wait_s):
                artifacts = self._worker.pending_artifacts()
                logger.warning("MLflow still busy after %.0fs; %d queued call(s) abandoned, %d artifact "
                               "upload(s) among them%s (metrics.jsonl and the run directory are complete; the "
                               "run's next start adds to MLflow the metric values and run-directory artifacts "
                               "it lacks)", wait_s, self._worker.pending(), len(artifacts),
                               f": {_listing(artifacts)}" if artifacts else "")
            elif self._worker.dropped:
                artifacts = self._worker.dropped_artifacts
                logger.info("%d MLflow call(s) skipped after the failure (%d metric value(s), %d artifact(s)%s; "
                            "%s and the run directory have them, and the run's next start adds them to MLflow)",
                            self._worker.dropped, self._worker.dropped_values, len(artifacts),
                            f": {_listing(artifacts)}" if artifacts else "", self.metrics_path)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")
