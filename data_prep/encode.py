"""Images (ImageFolder) -> latent shards (MDS and/or WebDataset) + ``manifest.json``.

    python -m data_prep.encode --images DIR --out DIR --resolution R \
        --vae {identity | diffusers id | local path} --formats mds,wds --samples-per-shard N \
        [--vae-dtype fp32|bf16|fp16] [--flip] [--batch-size B] [--strict] [--store moments|sample] \
        [--workers W] \
        [--rank R --world-size W] [--finalize] [--verify]

How the work is cut (and why the result does not depend on it): the sorted image listing is cut
into shards of ``--samples-per-shard`` consecutive images; shard ``s`` is written by part
``s % world_size``. A shard's bytes depend only on its images, so one process, two torchrun
ranks or a SLURM array produce identical files. Rank and world come from torchrun's
``RANK``/``WORLD_SIZE``, else SLURM's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` (tasks of an ``srun -n N``
step; an sbatch script's own process is one process) and an array's
``SLURM_ARRAY_TASK_ID`` (minus ``SLURM_ARRAY_TASK_MIN``) / ``SLURM_ARRAY_TASK_COUNT``, else from
``--rank/--world-size``, else 0/1; a flag that contradicts the environment is an error, and so are
``WORLD_SIZE`` without ``RANK`` (or the reverse) and an array whose task ids are not contiguous
(``--array=0-9:2``, ``--array=1,3,5``: submit ``--array=0-N``). No process group is needed. Each
process encodes on its own GPU: ``cuda:{LOCAL_RANK % GPUs}`` (``data_prep.encoders.pick_device``).

Several processes on one shard (a duplicate launch, overlapping jobs): each shard is claimed with an
exclusive ``flock`` on ``parts/.part-XXXXXX.lock`` before it is encoded; a process that finds the
claim taken leaves the shard to its holder and counts it as ``shards_busy``. Temp names carry the
host and pid (``.<name>.<host>-<pid>.tmp``); the claim holder removes any other temp file of its
shard (left by a killed process).

Resumable: every file of a shard is written under a temporary name, fsynced and renamed when
complete (directories fsynced too); the shard's record ``parts/part-XXXXXX.json`` is written last
and is the commit point. A rerun skips
shards that have a record and redoes any other (a half-written shard is never visible and never
read). Killing a run at any moment and running the same command again gives the same bytes as an
uninterrupted run.

Who writes ``manifest.json``: every process, after finishing its shards, checks whether all shard
records exist; the one that finds them all (the last to finish) merges the MDS index and writes
the manifest (identical content whoever does it; written atomically). ``--finalize`` does only
that step, e.g. as a job that depends on a SLURM array. Finalizers take turns (``flock`` of
``parts/.finalize.lock``); the one whose turn it is removes what killed processes left that no
shard claim removes: merge directories and manifest temp files of killed finalizers, and the lock
files of claims whose holder died after committing its shard.

A rerun with other settings (``--resolution``, ``--vae`` or other weights under the same name,
``--vae-dtype``, ``--formats``, ``--samples-per-shard``, ``--flip``, ``--store``, or an ImageFolder whose
listing changed) is refused before anything is written, naming ``encode_config.json`` and each setting; the
number of processes and ``--batch-size`` may change. ``--verify`` names the shard records to delete
to re-encode a damaged shard.

Per-sample checksums: every sample is stored with ``crc32`` (:func:`mpdit_dist.data.manifest.sample_crc32`
of its key, label and stored latents; an MDS column, a WebDataset member), recorded as
``sample_checksum`` in ``encode_config.json``, in each shard's record and in the manifest; the loader
checks it for every sample it reads. An output started by a version without them (no
``sample_checksum`` in its ``encode_config.json``) is finished without them, with a warning, so a
dataset never mixes the two layouts (``finalize`` refuses records that differ from the
configuration); a version without them refuses to resume an output that has them.

Bad images (unreadable, broken symlinks, and images whose latent is not finite in fp16: reason
``non-finite latent``) are skipped, listed in the manifest (path and reason) and counted in the
summary; ``--strict`` makes the first one fatal. Files outside the class folders, hidden files,
names that are not valid UTF-8, symlink loops and FIFOs/sockets/devices are not images of any
class: they are listed in the manifest's ``skipped_files`` and counted in the summary's
``files_skipped``. If every image fails, the command stops with an error (exit code 2).
``--verify`` checks a finished dataset's files against the sha256 checksums in its manifest, and
the merged MDS index against the manifest's shard order (the loader itself checks file sizes at
first open, the index's order, and each sample's crc32 as it reads it). It checks every file
whatever it finds (a repair after a storage incident needs the whole list at once): each missing,
unreadable (permission, I/O error), truncated or differing file is named with its reason, the
damaged ones are counted (``3 of 1,282 shard files damaged``), the hint names the records of
every shard to re-encode and the encode command, and the exit code is 2; a clean dataset prints
``{"verified_files": N, ...}``.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from mpdit_dist import fileio
from mpdit_dist.data import manifest as mf

from .encoders import DTYPE_FLAGS, load_encoder
from .images import BadImage, ImageEntry, list_image_folder, listing_sha256, load_image

FORMATS = ("mds", "wds")
# test hook: SIGKILL this process while writing the (N+1)-th shard, after its temp files exist
KILL_ENV = "MPDIT_ENCODE_KILL_AFTER_SHARDS"
NON_FINITE = "non-finite latent"
# the per-sample checksum new outputs get (mpdit_dist.data.manifest.sample_crc32), recorded in
# encode_config.json; None writes the layout from before it (tests use that for old datasets)
SAMPLE_CHECKSUM: Optional[str] = mf.SAMPLE_CHECKSUM_FIELD


class ConfigMismatch(ValueError):
    """The output directory holds shards written with another configuration."""


def _env_world() -> Optional[tuple[int, int, str, str]]:
    """(rank, world, rank variable, world variable) from the launcher's environment, or None.

    torchrun's ``RANK``/``WORLD_SIZE`` win; else SLURM: the tasks of an ``srun -n N`` step (``SLURM_STEP_ID``
    set; ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``, not the batch script itself)
    and array tasks (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN``/``SLURM_ARRAY_TASK_COUNT``); an array of
    multi-task jobs numbers task t of array task a as ``a * ntasks + t``.
    """
    env = os.environ

    def num(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None

    if "WORLD_SIZE" in env or "RANK" in env:
        # both or neither: WORLD_SIZE alone once made every process rank 0 (all writing the same shards)
        if "RANK" not in env or "WORLD_SIZE" not in env:
            have, lack = ("WORLD_SIZE", "RANK") if "RANK" not in env else ("RANK", "WORLD_SIZE")
            raise ValueError(f"{have}={env[have]!r} is set but {lack} is not: set both (torchrun does) or neither "
                             f"(then --rank/--world-size or SLURM's variables give the partition)")
        return num("RANK"), num("WORLD_SIZE"), "RANK", "WORLD_SIZE"
    # srun tasks only (SLURM_STEP_ID set): an sbatch script's own process also has SLURM_PROCID and
    # SLURM_NTASKS, but it is one process (the trainer's rule, mpdit_dist.distributed.env)
    from mpdit_dist.distributed.env import slurm_step_task

    tasks = slurm_step_task(env)
    array = None
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        first = num("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        count = num("SLURM_ARRAY_TASK_COUNT")
        # ranks are task id - first: with a stride (--array=0-9:2) or a list (--array=1,3,5) they
        # would leave gaps and repeat, and the shards of the missing ranks would never be written
        step = num("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        last = num("SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else first + count - 1
        if step != 1 or last - first + 1 != count:
            raise ValueError(f"SLURM array with task ids {first}..{last} in steps of {step} for {count} tasks "
                             f"(SLURM_ARRAY_TASK_MIN/MAX/STEP/COUNT): the ids are not contiguous, so they cannot "
                             f"number the parts; submit a contiguous array, --array=0-{count - 1}")
        array = (num("SLURM_ARRAY_TASK_ID") - first, count)
    if array and tasks and tasks[1] > 1:
        return (array[0] * tasks[1] + tasks[0], array[1] * tasks[1],
                "SLURM_ARRAY_TASK_ID/SLURM_PROCID", "SLURM_ARRAY_TASK_COUNT*SLURM_STEP_NUM_TASKS")
    if array:
        return array[0], array[1], "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"
    if tasks:
        return tasks[0], tasks[1], "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"
    return None


def world_from_env(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world) from the flags and the launcher's environment (see :func:`_env_world`), else 0/1.

    A flag fills in what the environment does not say and must agree with what it does say: a lone
    ``--world-size 4`` under torchrun still takes the rank from ``RANK`` (every process rank 0 would
    write the same shards and never the others), and ``--rank 1`` where ``RANK=2`` is an error.
    Without a launcher environment, ``--world-size`` above 1 needs ``--rank``.
    """
    env = _env_world()
    if env is not None:
        env_rank, env_world, rank_var, world_var = env
        if world_size is not None and int(world_size) != env_world:
            raise ValueError(f"--world-size {world_size} contradicts {world_var}={env_world} in the environment")
        if rank is not None and int(rank) != env_rank:
            raise ValueError(f"--rank {rank} contradicts {rank_var}={env_rank} in the environment")
        rank, world_size = env_rank, env_world
    elif world_size is not None and int(world_size) > 1 and rank is None:
        raise ValueError(f"--world-size {world_size} without --rank (and no RANK, SLURM_PROCID or "
                         f"SLURM_ARRAY_TASK_ID in the environment): every process would be rank 0")
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size")
    return rank, world_size


# ------------------------------------------------------------------------------------------ writing


def _to_fp16(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float16's range -> inf, which the callers check for
        return np.ascontiguousarray(a.astype(np.float16))


def _image_batches(root: Path, entries: list[ImageEntry], resolution: int, batch_size: int,
                   pool: ThreadPoolExecutor, strict: bool):
    """Yields (good entries, uint8 array (n, R, R, 3), failures) per batch, in listing order."""
    def load(e: ImageEntry):
        try:
            return load_image(root, e, resolution)
        except BadImage as exc:
            return exc

    for i in range(0, len(entries), batch_size):
        chunk = entries[i:i + batch_size]
        good, arrays, failures = [], [], []
        for e, res in zip(chunk, pool.map(load, chunk)):  # map keeps order
            if isinstance(res, BadImage):
                if strict:
                    raise res
                failures.append({"path": e.relpath, "reason": res.reason})
            else:
                good.append(e)
                arrays.append(res)
        yield good, (np.stack(arrays) if arrays else None), failures


def _sample_latent(center: np.ndarray, std: np.ndarray, image_index: int) -> np.ndarray:
    # store=sample: the draw depends on the image only, so any partition gives the same bytes
    from mpdit_dist.data.order import sample_seed

    g = torch.Generator().manual_seed(sample_seed(0, 0, image_index, salt=2))
    eps = torch.randn(center.shape, generator=g).numpy()
    return center + std * eps


def _encode_shard(encoder, root: Path, entries: list[ImageEntry], *, resolution: int, batch_size: int,
                  store: str, flip: bool, pool: ThreadPoolExecutor, strict: bool, progress) -> dict[str, Any]:
    """Encode the images of one shard; returns samples (fp16 arrays), failures and statistics."""
    fields = mf.latent_fields(store, flip)
    samples: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    stats = mf.channel_stats_init(encoder.latent_shape[0])
    for good, arr, bad in _image_batches(root, entries, resolution, batch_size, pool, strict):
        failures += bad
        if progress is not None:
            progress.update(len(good) + len(bad))
        if arr is None:
            continue
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        views = {"": images}
        if flip:
            views["flip_"] = images.flip(-1)
        out: dict[str, np.ndarray] = {}
        for prefix, view in views.items():
            center, std = encoder.encode(view)
            if store == "moments":
                out[prefix + "mean"], out[prefix + "std"] = _to_fp16(center), _to_fp16(std)
            else:
                if std is not None:
                    center = np.stack([_sample_latent(c, s, e.index) for c, s, e in zip(center, std, good)])
                out[prefix + "latent"] = _to_fp16(center)
        # an image whose stored latent is not finite (NaN from the VAE, or beyond fp16's range) is a
        # failure like an unreadable image: written, it would poison the statistics and every batch
        finite = np.ones(len(good), dtype=bool)
        for f in fields:
            finite &= np.isfinite(out[f]).reshape(len(good), -1).all(axis=1)
        if not finite.all():
            for j in np.flatnonzero(~finite).tolist():
                if strict:
                    raise BadImage(good[j].relpath, NON_FINITE)
                failures.append({"path": good[j].relpath, "reason": NON_FINITE})
            good = [e for e, ok in zip(good, finite.tolist()) if ok]
            out = {f: a[finite] for f, a in out.items()}
        if not good:
            continue
        for prefix in views:
            if store == "moments":
                mf.channel_stats_add(stats, out[prefix + "mean"], out[prefix + "std"])
            else:
                mf.channel_stats_add(stats, out[prefix + "latent"])
        for j, e in enumerate(good):
            rec = {"key": mf.sample_key(e.index), "label": e.label, "path": e.relpath}
            rec.update({f: out[f][j] for f in fields})
            samples.append(rec)
    return {"samples": samples, "failures": failures, "stats": stats}


def _write_wds(tmp_tar: Path, tmp_idx: Path, tar_name: str, samples: list[dict[str, Any]], fields: list[str],
               checksum: Optional[str] = None):
    from webdataset import TarWriter

    with open(tmp_tar, "wb") as f:
        # fixed mtime: the same samples give byte-identical tars (checksums comparable across runs)
        with TarWriter(f, mtime=0.0) as w:
            for s in samples:
                rec = {"__key__": s["key"], "cls": s["label"], "json": {"path": s["path"], "label": s["label"]}}
                rec.update({f + ".npy": s[f] for f in fields})
                if checksum:  # decimal text, like cls
                    rec[checksum] = str(s[checksum])
                w.write(rec)
        f.flush()
        os.fsync(f.fileno())
    # the index: byte offset and size of every member of every sample, for random access
    keys: list[str] = []
    members: Optional[list[str]] = None
    offsets: list[list[int]] = []
    sizes: list[list[int]] = []
    with tarfile.open(tmp_tar, "r") as tf:
        cur_key, cur = None, {}
        rows = []
        for ti in tf:
            key, _, member = ti.name.partition(".")
            if key != cur_key:
                if cur_key is not None:
                    rows.append((cur_key, cur))
                cur_key, cur = key, {}
            cur[member] = (ti.offset_data, ti.size)
        if cur_key is not None:
            rows.append((cur_key, cur))
    for key, cur in rows:
        names = sorted(cur)
        if members is None:
            members = names
        elif names != members:
            raise RuntimeError(f"{tmp_tar}: sample {key} has members {names}, expected {members}")
        keys.append(key)
        offsets.append([cur[m][0] for m in members])
        sizes.append([cur[m][1] for m in members])
    index = {"version": 1, "tar": tar_name, "tar_size": tmp_tar.stat().st_size, "num_samples": len(keys),
             "keys": keys, "members": members or [], "offsets": offsets, "sizes": sizes}
    with open(tmp_idx, "w") as f:
        json.dump(index, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())


def _write_mds(tmp_dir: Path, samples: list[dict[str, Any]], fields: list[str], latent_shape: list[int],
               checksum: Optional[str] = None):
    from streaming import MDSWriter

    shape = ",".join(str(d) for d in latent_shape)
    columns = {"key": "str", "label": "int", "path": "str"}
    columns.update({f: f"ndarray:float16:{shape}" for f in fields})
    if checksum:
        columns[checksum] = "int"  # int64 holding the uint32 crc (a column kind the reader's fast plan decodes)
    # size_limit=None: exactly one .mds file per part, so part i is MDS shard i of the merged index
    with MDSWriter(out=str(tmp_dir), columns=columns, compression=None, size_limit=None) as w:
        for s in samples:
            w.write({k: s[k] for k in columns})
    # MDSWriter does not fsync; the shard's record (the commit point) must never outlive its data
    for p in sorted(tmp_dir.iterdir()):
        fileio.fsync_path(p)
    fileio.fsync_path(tmp_dir)


def _shard_temps(out: Path, shard_id: int) -> list[Path]:
    """Temp files and directories of one shard, left by any process (``.<final name>.<host>-<pid>.tmp``)."""
    pname = mf.part_name(shard_id)
    found = []
    for d, name in ((mf.WDS_DIR, mf.wds_name(shard_id)), (mf.WDS_DIR, mf.wds_index_name(shard_id)),
                    (mf.MDS_DIR, pname), (mf.PARTS_DIR, f"{pname}.json")):
        if (out / d).is_dir():
            found += sorted((out / d).glob(f".{name}.*.tmp"))
    return found


_NO_FLOCK_WARNED: list[str] = []


def _warn_no_flock(path: Path, exc: OSError) -> None:
    # a file system without flock (some NFS and Lustre mounts): the claims cannot be taken, so
    # shards are not protected from a second process running the same command at once (the
    # rename of a half-written file then fails loudly). Say so once and go on unprotected.
    if not _NO_FLOCK_WARNED:
        _NO_FLOCK_WARNED.append(str(path))
        print(f"warning: {path}: flock is not supported here ({exc}); shards are not claimed, so do "
              f"not run two encodes of the same --out at once (Lustre: mount with -o flock)", file=sys.stderr)


def _claim_shard(out: Path, shard_id: int) -> Optional[int]:
    """An exclusive claim on one shard (``flock`` of ``parts/.part-XXXXXX.lock``, :func:`lock_file`):
    the open fd, or None if another process holds it. The holder removes the lock file once the
    shard is committed. Where the file system has no flock, every claim succeeds, with one warning.
    """
    path = out / mf.PARTS_DIR / f".{mf.part_name(shard_id)}.lock"
    try:
        return fileio.lock_file(path, blocking=False)
    except OSError as exc:
        _warn_no_flock(path, exc)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _release_shard(out: Path, shard_id: int, fd: int) -> None:
    pname = mf.part_name(shard_id)
    if (out / mf.PARTS_DIR / f"{pname}.json").is_file():  # committed: later claimants will see the record
        (out / mf.PARTS_DIR / f".{pname}.lock").unlink(missing_ok=True)
    os.close(fd)


def _commit_shard(out: Path, shard_id: int, result: dict[str, Any], formats: Sequence[str], fields: list[str],
                  latent_shape: list[int], first_image: int, num_images: int, kill_now: bool,
                  sample_checksum: Optional[str] = SAMPLE_CHECKSUM) -> dict[str, Any]:
    """Write one shard's files under temp names, rename them, then write its record (the commit).

    The caller holds the shard's claim (or is the only writer, as in :func:`write_latents`), so the
    temp files of this shard found on disk are a dead process's leftovers and are removed first.
    ``sample_checksum`` (the output's ``encode_config.json`` value; None: the layout from before
    per-sample checksums) is stored with every sample and named in the record.
    """
    samples = result["samples"]
    if sample_checksum:
        for s in samples:  # of the arrays as stored (fp16), in the manifest's field order
            s[sample_checksum] = mf.sample_crc32(s["key"], s["label"], [s[f] for f in fields])
    pname = mf.part_name(shard_id)
    tag = fileio.temp_tag()
    for stale in _shard_temps(out, shard_id):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    checksums: dict[str, str] = {}
    renames: list[tuple[Path, Path]] = []
    if samples:
        if "wds" in formats:
            wdir = out / mf.WDS_DIR
            tar, idx = wdir / mf.wds_name(shard_id), wdir / mf.wds_index_name(shard_id)
            ttar, tidx = wdir / f".{tar.name}.{tag}.tmp", wdir / f".{idx.name}.{tag}.tmp"
            _write_wds(ttar, tidx, tar.name, samples, fields, sample_checksum)
            renames += [(ttar, tar), (tidx, idx)]
            checksums[f"{mf.WDS_DIR}/{tar.name}"] = mf.file_sha256(ttar)
            checksums[f"{mf.WDS_DIR}/{idx.name}"] = mf.file_sha256(tidx)
        if "mds" in formats:
            mdir = out / mf.MDS_DIR
            final, tmp = mdir / pname, mdir / f".{pname}.{tag}.tmp"
            _write_mds(tmp, samples, fields, latent_shape, sample_checksum)
            renames.append((tmp, final))
            for p in sorted(tmp.iterdir()):
                checksums[f"{mf.MDS_DIR}/{pname}/{p.name}"] = mf.file_sha256(p)
    if kill_now:  # test hook: die with this shard's temp files on disk, before the commit
        os.kill(os.getpid(), signal.SIGKILL)
    for src, dst in renames:
        if dst.is_dir():
            shutil.rmtree(dst)  # left by a run killed between renames and the record
        os.replace(src, dst)
    for d in sorted({dst.parent for _, dst in renames}):
        fileio.fsync_path(d)  # the renames are durable before the record that commits them
    record = {
        "shard_id": shard_id, "first_image": first_image, "num_images": num_images,
        "num_samples": len(samples), "failures": result["failures"], "stats": result["stats"],
        "class_counts": _class_counts(samples), "checksums": checksums,
    }
    if sample_checksum:  # (absent, as in records written before it: no per-sample checksums)
        record["sample_checksum"] = sample_checksum
    fileio.write_json_atomic(out / mf.PARTS_DIR / f"{pname}.json", record)
    return record


def _class_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        counts[str(s["label"])] = counts.get(str(s["label"]), 0) + 1
    return counts


# -------------------------------------------------------------------------------------- finalize


# which setting (flag) each recorded configuration key comes from, for the mismatch message
_SETTINGS = {"resolution": "--resolution", "samples_per_shard": "--samples-per-shard", "formats": "--formats",
             "flip": "--flip", "store": "--store", "encoder": "--vae", "encoder_weights_sha256": "--vae",
             "class_names": "--images", "num_images": "--images", "images_sha256": "--images"}
# keys recorded only by later versions: not compared when the recorded configuration lacks them
# (sample_checksum: see _check_config)
_ADDED_KEYS = ("encoder_weights_sha256", "sample_checksum")


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ, as the user gives them (``--samples-per-shard 4 -> 5``)."""
    diff = sorted(k for k in set(old) | set(new) if k != "skipped_files" and old.get(k) != new.get(k)
                  and not (k in _ADDED_KEYS and k not in old))
    # latent_shape and num_shards follow from the settings: named only if no setting explains them
    # (and store, where the encoder changed: identity has no posterior, so it always stores samples)
    derived = ("latent_shape", "num_shards") + (("store",) if "encoder" in diff else ())
    if any(k not in derived for k in diff):
        diff = [k for k in diff if k not in derived]
    shown = []
    for k in diff:
        a, b = old.get(k), new.get(k)
        if k == "formats":
            shown.append(f"--formats {','.join(a or [])} -> {','.join(b or [])}")
        elif k == "flip":
            shown.append(f"--flip {'on' if a else 'off'} -> {'on' if b else 'off'}")
        elif k == "encoder":
            a, b = a or {}, b or {}
            changed = sorted(j for j in set(a) | set(b) if a.get(j) != b.get(j))
            if a.get("id") != b.get("id"):
                shown.append(f"--vae {a.get('id')} -> {b.get('id')}")
            elif changed == ["dtype"]:  # data_prep.encoders.VAE_DTYPES; before --vae-dtype, GPUs encoded in bf16
                shown.append(f"--vae-dtype {DTYPE_FLAGS.get(a.get('dtype'), a.get('dtype'))} -> "
                             f"{DTYPE_FLAGS.get(b.get('dtype'), b.get('dtype'))}")
            else:
                sub = ", ".join(f"{j}: {a.get(j)!r} -> {b.get(j)!r}" for j in changed)
                shown.append(f"--vae {b.get('id')}: the encoder differs ({sub})")
        elif k == "encoder_weights_sha256":
            shown.append(f"--vae {new['encoder'].get('id')}: other weights under the same name "
                         f"(sha256 {str(a)[:12]}... -> {str(b)[:12]}...)")
        elif k in ("class_names", "images_sha256", "num_images"):
            if not any(t.startswith("--images") for t in shown):
                na, nb = old.get("num_images"), new.get("num_images")
                what = f"{na} -> {nb} images" if na != nb else f"{nb} images, but other names or sizes"
                ca, cb = old.get("class_names") or [], new.get("class_names") or []
                if ca != cb:
                    what += f", classes {len(ca)} -> {len(cb)}" if len(ca) != len(cb) else ", other class names"
                shown.append(f"--images: the image listing differs ({what})")
        elif k == "sample_checksum":  # no flag: the output was started by a version that wrote other ones
            shown.append(f"per-sample checksums {a or 'none'} -> {b or 'none'} (another version of "
                         f"data_prep.encode started it)")
        elif k in _SETTINGS:
            shown.append(f"{_SETTINGS[k]} {a} -> {b}")
        else:
            shown.append(f"{k}: {a!r} -> {b!r}")
    return shown


def _start_output(out: Path, config: dict[str, Any], formats: Sequence[str]) -> dict[str, Any]:
    """The output's folders, once ``config`` (this run's settings, with the per-sample checksum of this
    code) agrees with what an earlier run there recorded; returns the config the run goes on with."""
    if SAMPLE_CHECKSUM:
        config["sample_checksum"] = SAMPLE_CHECKSUM
    out.mkdir(parents=True, exist_ok=True)
    config = _check_config(out, config)  # before any folder of the formats is made: a refused run leaves no trace
    for d in (mf.PARTS_DIR, *(mf.MDS_DIR if f == "mds" else mf.WDS_DIR for f in formats)):
        (out / d).mkdir(exist_ok=True)
    return config


def _check_config(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Record ``config`` as the output's configuration, or check that it equals the recorded one;
    returns the configuration to write shards with.

    The file is created exclusively (a complete temp file hard-linked to the final name), so of two
    runs that start at once with different configurations exactly one gets to write it.

    An output started before per-sample checksums existed (its configuration has no
    ``sample_checksum``) is finished in its own layout, without them, with a warning: every shard of
    a dataset has the same layout (:func:`finalize` checks the records), and a resume never throws
    away the shards already encoded. To have checksums, encode into a new ``--out``.
    """
    path = out / mf.ENCODE_CONFIG
    if not path.is_file():
        existing = [p for p in (out / mf.PARTS_DIR, out / mf.MDS_DIR, out / mf.WDS_DIR)
                    if p.exists() and any(q for q in p.iterdir() if not q.name.startswith("."))]
        if existing:
            raise ConfigMismatch(f"--out {out} holds shards ({existing[0]}) but no {mf.ENCODE_CONFIG}; "
                                 f"use an empty output directory")
        if fileio.write_json_exclusive(path, config):
            return config
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigMismatch(f"{path}: not valid JSON ({exc}); use an empty output directory") from None
    # skipped_files is information, not configuration: stray or hidden files (.nfs*, .DS_Store) come
    # and go between reruns and ranks without changing the images, and older outputs lack the key
    shown = _config_differences(old, config)
    if shown:
        done = len(list((out / mf.PARTS_DIR).glob("part-*.json")))
        raise ConfigMismatch(
            f"--out {out} was started with other settings ({path} records them; {done} of "
            f"{old.get('num_shards')} shards done): {'; '.join(shown)}. Nothing was written: run with the "
            f"recorded settings to resume, or give another --out (or empty this one) to start over")
    if config.get("sample_checksum") and not old.get("sample_checksum"):
        done = len(list((out / mf.PARTS_DIR).glob("part-*.json")))
        print(f"warning: --out {out} was started by a version of data_prep.encode that stores no per-sample "
              f"checksums ({path} records none; {done} of {old.get('num_shards')} shards done): its other shards are "
              f"written the same way, so the loader cannot tell a flipped bit inside a latent from data. To have "
              f"them checked, encode into a new --out (`--verify` checks whole files against the manifest either "
              f"way)", file=sys.stderr)
        config = {k: v for k, v in config.items() if k != "sample_checksum"}
    return config


def _read_records(out: Path, config: dict[str, Any], quiet: bool) -> Optional[list[dict[str, Any]]]:
    """Every shard's record, checked to tile the image listing; None while a shard is not done."""
    records = []
    spp, n_images = config["samples_per_shard"], config["num_images"]
    for sid in range(config["num_shards"]):
        p = out / mf.PARTS_DIR / f"{mf.part_name(sid)}.json"
        if not p.is_file():
            if not quiet:
                print(f"finalize: shard {sid} not done yet ({p} missing); manifest not written", file=sys.stderr)
            return None
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: shard {sid}'s record is not valid JSON ({exc})") from None
        # shard s holds images [s * spp, min((s + 1) * spp, N)): anything else means records of
        # another configuration or partition got mixed in, and samples would be duplicated or lost
        want = {"shard_id": sid, "first_image": sid * spp, "num_images": min(spp, n_images - sid * spp)}
        got = {k: r.get(k) for k in want}
        if got != want:
            raise ValueError(f"{p}: shard {sid}'s record says {got}, expected {want} "
                             f"(records of different runs mixed in {out / mf.PARTS_DIR}?)")
        if r.get("num_samples", -1) + len(r.get("failures", [])) != r["num_images"]:
            raise ValueError(f"{p}: shard {sid}'s record has {r.get('num_samples')} samples and "
                             f"{len(r.get('failures', []))} failures for {r['num_images']} images")
        if r.get("sample_checksum") != config.get("sample_checksum"):
            # one layout per dataset: a reader checks every sample or none
            raise ValueError(f"{p}: shard {sid} was written with per-sample checksums "
                             f"{r.get('sample_checksum') or 'none'}, {out / mf.ENCODE_CONFIG} says "
                             f"{config.get('sample_checksum') or 'none'} (written by another version of "
                             f"data_prep.encode): delete the record and run the encode command again to write "
                             f"that shard anew")
        for k in r.get("class_counts", {}):
            if not 0 <= int(k) < len(config["class_names"]):
                raise ValueError(f"{p}: shard {sid} has label {k}, outside the {len(config['class_names'])} classes")
        records.append(r)
    return records


def finalize(out: str | os.PathLike, quiet: bool = False) -> Optional[dict[str, Any]]:
    """Write ``manifest.json`` (and the merged MDS index) if every shard is done; else return None."""
    out = Path(out)
    config = json.loads((out / mf.ENCODE_CONFIG).read_text())
    records = _read_records(out, config, quiet)
    if records is None:
        return None
    nonempty = [r for r in records if r["num_samples"] > 0]
    if not nonempty:
        failures = [f for r in records for f in r["failures"]]
        first = f"; the first: {failures[0]['path']}: {failures[0]['reason']}" if failures else ""
        raise ValueError(f"{out}: every image failed ({len(failures)} of {config['num_images']}{first}); "
                         f"all are listed in {out / mf.PARTS_DIR}/*.json")
    # one finalizer at a time (ranks finishing together wait a moment): the holder knows that every
    # temp file of a finalizer is a killed one's, and removes them with the claims' lock files
    lock_path = out / mf.PARTS_DIR / ".finalize.lock"
    try:
        lock = fileio.lock_file(lock_path, blocking=True)
    except OSError:
        lock = None  # no flock here: finalizers may run at once, so only this process's leftovers go
    try:
        _remove_leftovers(out, everyone=lock is not None)
        return _write_manifest(out, config, records, nonempty)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # a failed write (a full disk) names no file
            raise OSError(exc.errno, f"{exc.strerror}: writing {out / mf.MANIFEST} or the merged MDS index "
                                     f"(merged first under {tempfile.gettempdir()})") from exc
        raise
    finally:
        lock_path.unlink(missing_ok=True)  # (a waiting finalizer then finds another inode and tries again)
        if lock is not None:
            os.close(lock)


def _remove_leftovers(out: Path, everyone: bool) -> None:
    """Remove what killed processes left that no rerun would otherwise remove: a finalizer's merge
    directory (``mds/.merge-<host>-<pid>``) and manifest temp file, and the lock files of shard
    claims whose holder died after committing. Every shard is committed when this runs, so no claim
    is in use; ``everyone=False`` (no finalize lock): only this process's own merge directory (one
    left by an earlier process of the same host and pid, e.g. a restarted container), which would
    otherwise stop the merge ("Destination path ... already exists")."""
    mine = out / mf.MDS_DIR / f".merge-{fileio.temp_tag()}"
    stale = [mine] if mine.exists() else []
    if everyone:
        stale = sorted((out / mf.MDS_DIR).glob(".merge-*")) if (out / mf.MDS_DIR).is_dir() else []
        stale += sorted(out.glob(f".{mf.MANIFEST}.*.tmp")) + sorted((out / mf.PARTS_DIR).glob(".part-*.lock"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _write_manifest(out: Path, config: dict[str, Any], records: list[dict[str, Any]],
                    nonempty: list[dict[str, Any]]) -> dict[str, Any]:
    mds_index_sha256 = None
    if "mds" in config["formats"]:
        from streaming.base.util import merge_index

        mds = out / mf.MDS_DIR
        # merge into a private directory, then rename: atomic, and safe if two ranks finalize at once
        tmp = mds / f".merge-{fileio.temp_tag()}"
        tmp.mkdir(exist_ok=True)
        merge_index([str(mds / mf.part_name(r["shard_id"]) / "index.json") for r in nonempty], str(tmp),
                    keep_local=True)
        fileio.fsync_path(tmp / "index.json")
        # the merged index's content depends on the parts only, so every finalizer records the same digest
        mds_index_sha256 = mf.file_sha256(tmp / "index.json")
        os.replace(tmp / "index.json", mds / "index.json")
        tmp.rmdir()
        fileio.fsync_path(mds)
    stats = mf.channel_stats_merge([r["stats"] for r in records])
    mean, std = mf.channel_stats_final(stats)
    class_counts = [0] * len(config["class_names"])
    for r in records:
        for k, v in r["class_counts"].items():
            class_counts[int(k)] += v
    failures = [f for r in records for f in r["failures"]]
    manifest = {
        "version": mf.MANIFEST_VERSION,
        "formats": config["formats"],
        "num_samples": sum(r["num_samples"] for r in records),
        "num_images": config["num_images"],
        "num_failed": len(failures),
        "failures": failures,
        "num_skipped_files": len(config.get("skipped_files", [])),
        "skipped_files": config.get("skipped_files", []),
        "resolution": config["resolution"],
        "latent_shape": config["latent_shape"],
        "latent_dtype": "float16",
        "store": config["store"],
        "flip": config["flip"],
        "fields": mf.latent_fields(config["store"], config["flip"]),
        "num_classes": len(config["class_names"]),
        "class_names": config["class_names"],
        "class_counts": class_counts,
        "encoder": config["encoder"],
        "latent_mean": mean,
        "latent_std": std,
        "latent_stats": "per channel over all stored latents (incl. flips); with moments the std is of "
                        "drawn latents mean + std * eps: sqrt(Var(mean) + E[std^2])",
        "samples_per_shard": config["samples_per_shard"],
        "shards": [{"shard_id": r["shard_id"], "num_samples": r["num_samples"], "first_image": r["first_image"],
                    "num_images": r["num_images"], "checksums": r["checksums"]} for r in nonempty],
        "encode_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }
    if "mds" in config["formats"]:
        manifest["mds_index_sha256"] = mds_index_sha256  # checked by --verify and on remote download
    if config.get("sample_checksum"):  # every record has it (_read_records)
        manifest["sample_checksum"] = mf.sample_checksum_spec(manifest["fields"])
    fileio.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------------------------ writing precomputed latents


def write_latents(out: str | os.PathLike, latents: dict[str, np.ndarray], labels: np.ndarray,
                  class_names: Sequence[str], samples_per_shard: int, formats: Sequence[str] = FORMATS,
                  encoder: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write already computed latents as a dataset (same writer, shards and manifest as encode).

    ``latents`` maps field names to arrays ``(N, C, H, W)``: ``{"latent": ...}`` (store=sample) or
    ``{"mean": ..., "std": ...}`` (store=moments), plus ``flip_*`` for flips. For converting latents
    made elsewhere (e.g. per-image .npy files) and for benchmarks. Single process.
    """
    out = Path(out)
    store = "moments" if "mean" in latents else "sample"
    flip = any(k.startswith("flip_") for k in latents)
    fields = mf.latent_fields(store, flip)
    if sorted(fields) != sorted(latents):
        raise ValueError(f"latents has fields {sorted(latents)}, expected {fields}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats {list(formats)}: choose from {list(FORMATS)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    n = len(labels)
    shape = list(np.shape(latents[fields[0]])[1:])
    for f in fields:
        got = tuple(np.shape(latents[f]))
        if len(got) != 4 or got != (n, *shape):
            raise ValueError(f"latents[{f!r}] has shape {got}, expected {(n, *shape)} "
                             f"(N = len(labels), (C, H, W) as latents[{fields[0]!r}])")
    out_of_range = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if len(out_of_range):
        i = int(out_of_range[0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside [0, {len(class_names)}) "
                         f"({len(class_names)} class_names; {len(out_of_range)} labels out of range)")
    formats = sorted(set(formats))
    num_shards = (n + samples_per_shard - 1) // samples_per_shard
    config = {
        "version": 1, "resolution": None, "encoder": encoder or {"id": "precomputed", "scaling_factor": 1.0},
        "formats": formats, "samples_per_shard": samples_per_shard, "flip": flip, "store": store,
        "latent_shape": shape, "class_names": list(class_names), "num_images": n, "num_shards": num_shards,
        "images_sha256": None,
    }
    config = _start_output(out, config, formats)
    for s in range(num_shards):
        lo, hi = s * samples_per_shard, min(n, (s + 1) * samples_per_shard)
        stored = {f: _to_fp16(latents[f][lo:hi]) for f in fields}
        for f, a in stored.items():
            finite = np.isfinite(a).reshape(len(a), -1).all(axis=1)
            if not finite.all():
                i = lo + int(np.flatnonzero(~finite)[0])
                raise ValueError(f"latents[{f!r}][{i}] is not finite in float16 (NaN, inf or beyond +-65504); "
                                 f"{int((~finite).sum())} such samples in {f!r}[{lo}:{hi}]")
        stats = mf.channel_stats_init(shape[0])
        samples = []
        for i in range(lo, hi):
            rec = {"key": mf.sample_key(i), "label": int(labels[i]), "path": ""}
            rec.update({f: stored[f][i - lo] for f in fields})
            samples.append(rec)
        for prefix in ("", "flip_") if flip else ("",):
            if store == "moments":
                mf.channel_stats_add(stats, stored[prefix + "mean"], stored[prefix + "std"])
            else:
                mf.channel_stats_add(stats, stored[prefix + "latent"])
        result = {"samples": samples, "failures": [], "stats": stats}
        _commit_shard(out, s, result, formats, fields, shape, lo, hi - lo, kill_now=False,
                      sample_checksum=config.get("sample_checksum"))
    manifest = finalize(out)
    assert manifest is not None
    return manifest


# ------------------------------------------------------------------------------------------ driver


def encode_dataset(images: str | os.PathLike, out: str | os.PathLike, resolution: int, vae: str = "identity",
                   formats: Sequence[str] | str = ("mds", "wds"), samples_per_shard: int = 1000, flip: bool = False,
                   batch_size: int = 64, strict: bool = False, store: str = "moments", rank: int = 0,
                   world_size: int = 1, workers: Optional[int] = None, device: Optional[str] = None,
                   progress: bool = True, vae_dtype: str = "fp32") -> dict[str, Any]:
    """Encode this rank's shards; write the manifest if that completes the dataset.

    Returns a summary dict (images encoded/failed, shards written/skipped, seconds, images/s,
    ``manifest`` path or None). ``store`` is forced to ``sample`` for ``identity`` (no posterior).
    """
    t0 = time.perf_counter()
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = sorted(set(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--formats {','.join(formats)}: choose from {list(FORMATS)}")
    if store not in ("moments", "sample"):
        raise ValueError(f"--store {store!r}: choose moments or sample")
    if resolution < 1 or samples_per_shard < 1 or batch_size < 1:
        raise ValueError(f"--resolution {resolution}, --samples-per-shard {samples_per_shard} and "
                         f"--batch-size {batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size")
    if workers is not None and workers < 1:  # 0 was taken as the default, silently
        raise ValueError(f"--workers {workers} must be >= 1 (default: min(8, cpus))")
    root, out = Path(images), Path(out)
    skipped: list[dict[str, str]] = []
    classes, entries = list_image_folder(root, skipped)
    encoder = load_encoder(vae, resolution, device, vae_dtype)
    if not encoder.has_posterior:
        store = "sample"
    num_shards = (len(entries) + samples_per_shard - 1) // samples_per_shard
    config = {
        "version": 1, "resolution": resolution, "encoder": encoder.describe(), "formats": formats,
        "samples_per_shard": samples_per_shard, "flip": bool(flip), "store": store,
        "latent_shape": encoder.latent_shape, "class_names": classes, "num_images": len(entries),
        "num_shards": num_shards, "images_sha256": listing_sha256(classes, entries),
        "skipped_files": skipped,
    }
    weights = encoder.weights_sha256()
    if weights is not None:
        config["encoder_weights_sha256"] = weights
    config = _start_output(out, config, formats)

    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo = [s for s in mine if not (out / mf.PARTS_DIR / f"{mf.part_name(s)}.json").is_file()]
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    fields = mf.latent_fields(store, flip)
    n_todo_images = sum(len(entries[s * samples_per_shard:(s + 1) * samples_per_shard]) for s in todo)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_todo_images, unit="img", desc=f"encode rank {rank}/{world_size}", disable=None)
    encoded = failed = written = busy = 0
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in todo:
            claim = _claim_shard(out, s)
            if claim is None:  # another process (a duplicate launch, an overlapping job) is writing it
                busy += 1
                continue
            try:
                if (out / mf.PARTS_DIR / f"{mf.part_name(s)}.json").is_file():
                    continue  # committed by another process since the listing above
                chunk = entries[s * samples_per_shard:(s + 1) * samples_per_shard]
                result = _encode_shard(encoder, root, chunk, resolution=resolution, batch_size=batch_size,
                                       store=store, flip=flip, pool=pool, strict=strict, progress=bar)
                rec = _commit_shard(out, s, result, formats, fields, encoder.latent_shape, chunk[0].index,
                                    len(chunk), kill_now=(written == kill_after),
                                    sample_checksum=config.get("sample_checksum"))
            except OSError as exc:
                if exc.filename is None and exc.errno is not None:  # a failed write (a full disk) names no file
                    raise OSError(exc.errno, f"{exc.strerror}: writing shard {s} under {out}") from exc
                raise
            finally:
                _release_shard(out, s, claim)
            written += 1
            encoded += rec["num_samples"]
            failed += len(rec["failures"])
    if bar is not None:
        bar.close()
    manifest = finalize(out, quiet=True)
    seconds = time.perf_counter() - t0
    summary = {
        "rank": rank, "world_size": world_size, "shards_written": written,
        "shards_skipped": len(mine) - written - busy, "shards_busy": busy,
        "images_encoded": encoded, "images_failed": failed, "files_skipped": len(skipped),
        "seconds": round(seconds, 3),
        "images_per_s": round((encoded + failed) / seconds, 1) if seconds > 0 else None,
        "manifest": str(out / mf.MANIFEST) if manifest else None,
    }
    if manifest:
        summary.update(dataset_samples=manifest["num_samples"], dataset_failed=manifest["num_failed"])
    return summary


def _rerun_command(out: Path) -> tuple[Optional[str], bool]:
    """The command that encodes ``out``'s shards as they were, from its ``encode_config.json``, with
    ``IMAGES`` for the ImageFolder (not recorded), or None where the configuration cannot be read;
    and whether the dataset was written from precomputed latents (``write_latents``: no command)."""
    try:
        config = json.loads((out / mf.ENCODE_CONFIG).read_text())
        if config.get("resolution") is None:
            return None, True
        args = ["--images", "IMAGES", "--out", str(out), "--resolution", str(config["resolution"]),
                "--vae", config["encoder"]["id"], "--formats", ",".join(config["formats"]),
                "--samples-per-shard", str(config["samples_per_shard"]), "--store", config["store"]]
        dtype = DTYPE_FLAGS.get(config["encoder"].get("dtype"))
        if dtype and dtype != "fp32":
            args += ["--vae-dtype", dtype]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, False
    return "python -m data_prep.encode " + shlex.join(args + (["--flip"] if config.get("flip") else [])), False


def _repair_hint(out: Path, damage: mf.DamagedDataset) -> str:
    """What to do about the problems ``--verify`` found: re-encode every shard with a damaged file
    (which also writes the merged MDS index again), else write the merged MDS index again."""
    shards = damage.damaged_shards
    if shards:
        n = f"{len(shards):,} damaged shard{'s' if len(shards) > 1 else ''}"
        command, precomputed = _rerun_command(out)
        if precomputed:
            return (f"the {n} ({', '.join(map(str, shards))}) hold precomputed latents (write_latents): write "
                    f"the dataset again from them, then --verify")
        records = " ".join(shlex.quote(str(out / mf.PARTS_DIR / f"{mf.part_name(s)}.json")) for s in shards)
        how = f" (`{command}`, where IMAGES is the ImageFolder it was encoded from)" if command else ""
        return (f"to re-encode the {n}, delete their records ({records}) and run the encode command "
                f"again{how}, then --verify")
    if damage.problems and not any("--finalize" in why for _, why, _ in damage.problems):
        return (f"`python -m data_prep.encode --out {shlex.quote(str(out))} --finalize` writes the merged MDS "
                f"index again")
    return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.encode", description=__doc__.split("\n")[0])
    p.add_argument("--images", help="ImageFolder root (one subfolder per class)")
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--resolution", type=int)
    p.add_argument("--vae", default="identity",
                   help="identity, a diffusers model id in the local cache, or a directory")
    p.add_argument("--formats", default="mds,wds")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--flip", action="store_true", help="also store the encoding of the mirrored image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--strict", action="store_true", help="the first bad image is fatal")
    p.add_argument("--vae-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the VAE's precision: fp32 as the official feature extraction (default); bf16/fp16 faster")
    p.add_argument("--store", choices=("moments", "sample"), default="moments",
                   help="moments: the posterior's mean and std, a latent drawn anew each epoch; sample: one "
                        "latent drawn per image at encoding, as the official feature extraction stores")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default min(8, cpus))")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--finalize", action="store_true", help="only write manifest.json (all shards must be done)")
    p.add_argument("--verify", action="store_true",
                   help="only check every shard file of --out against the sha256 in its manifest.json, "
                        "and the merged MDS index against the manifest's shards")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a dataset directory")
    if args.finalize and not args.verify and not (Path(args.out) / mf.ENCODE_CONFIG).is_file():
        p.error(f"--finalize: no {mf.ENCODE_CONFIG} in {args.out}: nothing was encoded there (run without "
                "--finalize first)")
    try:
        if args.verify:
            try:
                n = mf.verify_checksums(args.out)
            except mf.DamagedDataset as exc:  # every damaged file is in it, and the hint covers them all
                hint = _repair_hint(Path(args.out), exc)
                raise ValueError(f"{exc}\n{hint}" if hint else str(exc)) from None
            print(json.dumps({"verified_files": n, "dataset": str(args.out)}))
            return 0
        if args.finalize:
            manifest = finalize(args.out)
            if manifest is None:
                return 1
            print(json.dumps({"manifest": str(Path(args.out) / mf.MANIFEST), "samples": manifest["num_samples"],
                              "failed": manifest["num_failed"]}))
            return 0
        if not args.images or args.resolution is None:  # --resolution 0: refused below, naming it
            p.error("--images and --resolution are required (unless --finalize or --verify)")
        rank, world = world_from_env(args.rank, args.world_size)
        summary = encode_dataset(args.images, args.out, args.resolution, args.vae, args.formats,
                                 args.samples_per_shard, flip=args.flip, batch_size=args.batch_size,
                                 strict=args.strict, store=args.store, rank=rank, world_size=world,
                                 workers=args.workers, device=args.device, vae_dtype=args.vae_dtype)
    except (BadImage, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print("the disk (or quota) is full: free space and run the same command again (finished shards "
                  "are kept; temp files of unfinished ones are removed)", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
