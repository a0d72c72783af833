"""Images (ImageFolder) -> latent shards (MDS and/or WebDataset) + ``manifest.json``.

    python -m data_prep.encode --images DIR --out DIR --resolution R \
        --vae {identity | diffusers id | local path} --formats mds,wds --samples-per-shard N \
        [--flip] [--batch-size B] [--strict] [--store moments|sample] [--workers W] \
        [--rank R --world-size W] [--finalize]

How the work is cut (and why the result does not depend on it): the sorted image listing is cut
into shards of ``--samples-per-shard`` consecutive images; shard ``s`` is written by part
``s % world_size``. A shard's bytes depend only on its images, so one process, two torchrun
ranks or a SLURM array produce identical files. Rank and world come from ``--rank/--world-size``,
else torchrun's ``RANK``/``WORLD_SIZE``, else a SLURM array's ``SLURM_ARRAY_TASK_ID`` (minus
``SLURM_ARRAY_TASK_MIN``) / ``SLURM_ARRAY_TASK_COUNT``, else 0/1. No process group is needed.

Resumable: every file of a shard is written under a temporary name and renamed when complete; the
shard's record ``parts/part-XXXXXX.json`` is written last and is the commit point. A rerun skips
shards that have a record and redoes any other (a half-written shard is never visible and never
read). Killing a run at any moment and running the same command again gives the same bytes as an
uninterrupted run.

Who writes ``manifest.json``: every process, after finishing its shards, checks whether all shard
records exist; the one that finds them all (the last to finish) merges the MDS index and writes
the manifest (identical content whoever does it; written atomically). ``--finalize`` does only
that step, e.g. as a job that depends on a SLURM array.

Bad images are skipped, listed in the manifest (path and reason) and counted in the summary;
``--strict`` makes the first one fatal.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from mpdit_dist.data import manifest as mf

from .encoders import load_encoder
from .images import BadImage, ImageEntry, list_image_folder, listing_sha256, load_image

FORMATS = ("mds", "wds")
# test hook: SIGKILL this process while writing the (N+1)-th shard, after its temp files exist
KILL_ENV = "MPDIT_ENCODE_KILL_AFTER_SHARDS"


class ConfigMismatch(ValueError):
    """The output directory holds shards written with another configuration."""


def world_from_env(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world) from flags, torchrun env, SLURM array env, or 0/1 (in that order)."""
    if rank is None and world_size is None:
        env = os.environ
        if "WORLD_SIZE" in env:
            rank, world_size = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
        elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            rank, world_size = int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size")
    return rank, world_size


# ------------------------------------------------------------------------------------------ writing


def _to_fp16(a: np.ndarray) -> np.ndarray:
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
                mf.channel_stats_add(stats, out[prefix + "mean"], out[prefix + "std"])
            else:
                if std is not None:
                    center = np.stack([_sample_latent(c, s, e.index) for c, s, e in zip(center, std, good)])
                out[prefix + "latent"] = _to_fp16(center)
                mf.channel_stats_add(stats, out[prefix + "latent"])
        for j, e in enumerate(good):
            rec = {"key": mf.sample_key(e.index), "label": e.label, "path": e.relpath}
            rec.update({f: out[f][j] for f in fields})
            samples.append(rec)
    return {"samples": samples, "failures": failures, "stats": stats}


def _write_wds(tmp_tar: Path, tmp_idx: Path, tar_name: str, samples: list[dict[str, Any]], fields: list[str]):
    from webdataset import TarWriter

    with open(tmp_tar, "wb") as f:
        # fixed mtime: the same samples give byte-identical tars (checksums comparable across runs)
        with TarWriter(f, mtime=0.0) as w:
            for s in samples:
                rec = {"__key__": s["key"], "cls": s["label"], "json": {"path": s["path"], "label": s["label"]}}
                rec.update({f + ".npy": s[f] for f in fields})
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


def _write_mds(tmp_dir: Path, samples: list[dict[str, Any]], fields: list[str], latent_shape: list[int]):
    from streaming import MDSWriter

    shape = ",".join(str(d) for d in latent_shape)
    columns = {"key": "str", "label": "int", "path": "str"}
    columns.update({f: f"ndarray:float16:{shape}" for f in fields})
    # size_limit=None: exactly one .mds file per part, so part i is MDS shard i of the merged index
    with MDSWriter(out=str(tmp_dir), columns=columns, compression=None, size_limit=None) as w:
        for s in samples:
            w.write({k: s[k] for k in columns})


def _commit_shard(out: Path, shard_id: int, result: dict[str, Any], formats: Sequence[str], fields: list[str],
                  latent_shape: list[int], first_image: int, num_images: int, kill_now: bool) -> dict[str, Any]:
    samples = result["samples"]
    pname = mf.part_name(shard_id)
    checksums: dict[str, str] = {}
    renames: list[tuple[Path, Path]] = []
    if samples:
        if "wds" in formats:
            wdir = out / mf.WDS_DIR
            tar, idx = wdir / mf.wds_name(shard_id), wdir / mf.wds_index_name(shard_id)
            ttar, tidx = wdir / f".{tar.name}.tmp", wdir / f".{idx.name}.tmp"
            _write_wds(ttar, tidx, tar.name, samples, fields)
            renames += [(ttar, tar), (tidx, idx)]
            checksums[f"{mf.WDS_DIR}/{tar.name}"] = mf.file_sha256(ttar)
            checksums[f"{mf.WDS_DIR}/{idx.name}"] = mf.file_sha256(tidx)
        if "mds" in formats:
            mdir = out / mf.MDS_DIR
            final, tmp = mdir / pname, mdir / f".{pname}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            _write_mds(tmp, samples, fields, latent_shape)
            renames.append((tmp, final))
            for p in sorted(tmp.iterdir()):
                checksums[f"{mf.MDS_DIR}/{pname}/{p.name}"] = mf.file_sha256(p)
    if kill_now:  # test hook: die with this shard's temp files on disk, before the commit
        os.kill(os.getpid(), signal.SIGKILL)
    for src, dst in renames:
        if dst.is_dir():
            shutil.rmtree(dst)  # left by a run killed between renames and the record
        os.replace(src, dst)
    record = {
        "shard_id": shard_id, "first_image": first_image, "num_images": num_images,
        "num_samples": len(samples), "failures": result["failures"], "stats": result["stats"],
        "class_counts": _class_counts(samples), "checksums": checksums,
    }
    mf.write_json_atomic(out / mf.PARTS_DIR / f"{pname}.json", record)
    return record


def _class_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        counts[str(s["label"])] = counts.get(str(s["label"]), 0) + 1
    return counts


# -------------------------------------------------------------------------------------- finalize


def _check_config(out: Path, config: dict[str, Any]) -> None:
    path = out / mf.ENCODE_CONFIG
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff if k != "images_sha256")
            if "images_sha256" in diff:
                detail += (", " if detail else "") + "the input image listing differs"
            raise ConfigMismatch(f"--out {out} holds shards of a different configuration ({detail}); "
                                 f"use another output directory or delete it")
    else:
        existing = [p for p in (out / mf.PARTS_DIR, out / mf.MDS_DIR, out / mf.WDS_DIR) if p.exists() and any(p.iterdir())]
        if existing:
            raise ConfigMismatch(f"--out {out} holds shards ({existing[0]}) but no {mf.ENCODE_CONFIG}; "
                                 f"use an empty output directory")
        mf.write_json_atomic(path, config)


def finalize(out: str | os.PathLike, quiet: bool = False) -> Optional[dict[str, Any]]:
    """Write ``manifest.json`` (and the merged MDS index) if every shard is done; else return None."""
    out = Path(out)
    config = json.loads((out / mf.ENCODE_CONFIG).read_text())
    records = []
    for sid in range(config["num_shards"]):
        p = out / mf.PARTS_DIR / f"{mf.part_name(sid)}.json"
        if not p.is_file():
            if not quiet:
                print(f"finalize: shard {sid} not done yet ({p} missing); manifest not written", file=sys.stderr)
            return None
        records.append(json.loads(p.read_text()))
    nonempty = [r for r in records if r["num_samples"] > 0]
    if not nonempty:
        raise RuntimeError(f"{out}: every image failed; see {out / mf.PARTS_DIR}/*.json")
    if "mds" in config["formats"]:
        from streaming.base.util import merge_index

        mds = out / mf.MDS_DIR
        # merge into a private directory, then rename: atomic, and safe if two ranks finalize at once
        tmp = mds / f".merge-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        merge_index([str(mds / mf.part_name(r["shard_id"]) / "index.json") for r in nonempty], str(tmp),
                    keep_local=True)
        os.replace(tmp / "index.json", mds / "index.json")
        tmp.rmdir()
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
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
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
    n = len(labels)
    shape = list(latents[fields[0]].shape[1:])
    formats = sorted(set(formats))
    num_shards = (n + samples_per_shard - 1) // samples_per_shard
    config = {
        "version": 1, "resolution": None, "encoder": encoder or {"id": "precomputed", "scaling_factor": 1.0},
        "formats": formats, "samples_per_shard": samples_per_shard, "flip": flip, "store": store,
        "latent_shape": shape, "class_names": list(class_names), "num_images": n, "num_shards": num_shards,
        "images_sha256": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    for d in (mf.PARTS_DIR, *(mf.MDS_DIR if f == "mds" else mf.WDS_DIR for f in formats)):
        (out / d).mkdir(exist_ok=True)
    _check_config(out, config)
    for s in range(num_shards):
        lo, hi = s * samples_per_shard, min(n, (s + 1) * samples_per_shard)
        stats = mf.channel_stats_init(shape[0])
        samples = []
        for i in range(lo, hi):
            rec = {"key": mf.sample_key(i), "label": int(labels[i]), "path": ""}
            rec.update({f: _to_fp16(latents[f][i]) for f in fields})
            samples.append(rec)
        for prefix in ("", "flip_") if flip else ("",):
            if store == "moments":
                mf.channel_stats_add(stats, _to_fp16(latents[prefix + "mean"][lo:hi]),
                                     _to_fp16(latents[prefix + "std"][lo:hi]))
            else:
                mf.channel_stats_add(stats, _to_fp16(latents[prefix + "latent"][lo:hi]))
        result = {"samples": samples, "failures": [], "stats": stats}
        _commit_shard(out, s, result, formats, fields, shape, lo, hi - lo, kill_now=False)
    manifest = finalize(out)
    assert manifest is not None
    return manifest


# ------------------------------------------------------------------------------------------ driver


def encode_dataset(images: str | os.PathLike, out: str | os.PathLike, resolution: int, vae: str = "identity",
                   formats: Sequence[str] | str = ("mds", "wds"), samples_per_shard: int = 1000, flip: bool = False,
                   batch_size: int = 64, strict: bool = False, store: str = "moments", rank: int = 0,
                   world_size: int = 1, workers: Optional[int] = None, device: Optional[str] = None,
                   progress: bool = True) -> dict[str, Any]:
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
    root, out = Path(images), Path(out)
    classes, entries = list_image_folder(root)
    encoder = load_encoder(vae, resolution, device)
    if not encoder.has_posterior:
        store = "sample"
    num_shards = (len(entries) + samples_per_shard - 1) // samples_per_shard
    config = {
        "version": 1, "resolution": resolution, "encoder": encoder.describe(), "formats": formats,
        "samples_per_shard": samples_per_shard, "flip": bool(flip), "store": store,
        "latent_shape": encoder.latent_shape, "class_names": classes, "num_images": len(entries),
        "num_shards": num_shards, "images_sha256": listing_sha256(classes, entries),
    }
    out.mkdir(parents=True, exist_ok=True)
    for d in (mf.PARTS_DIR, *(mf.MDS_DIR if f == "mds" else mf.WDS_DIR for f in formats)):
        (out / d).mkdir(exist_ok=True)
    _check_config(out, config)

    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo = [s for s in mine if not (out / mf.PARTS_DIR / f"{mf.part_name(s)}.json").is_file()]
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    fields = mf.latent_fields(store, flip)
    n_todo_images = sum(len(entries[s * samples_per_shard:(s + 1) * samples_per_shard]) for s in todo)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_todo_images, unit="img", desc=f"encode rank {rank}/{world_size}", disable=None)
    encoded = failed = 0
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n_done, s in enumerate(todo):
            chunk = entries[s * samples_per_shard:(s + 1) * samples_per_shard]
            result = _encode_shard(encoder, root, chunk, resolution=resolution, batch_size=batch_size, store=store,
                                   flip=flip, pool=pool, strict=strict, progress=bar)
            rec = _commit_shard(out, s, result, formats, fields, encoder.latent_shape, chunk[0].index, len(chunk),
                                kill_now=(n_done == kill_after))
            encoded += rec["num_samples"]
            failed += len(rec["failures"])
    if bar is not None:
        bar.close()
    manifest = finalize(out, quiet=True)
    seconds = time.perf_counter() - t0
    summary = {
        "rank": rank, "world_size": world_size, "shards_written": len(todo), "shards_skipped": len(mine) - len(todo),
        "images_encoded": encoded, "images_failed": failed, "seconds": round(seconds, 3),
        "images_per_s": round((encoded + failed) / seconds, 1) if seconds > 0 else None,
        "manifest": str(out / mf.MANIFEST) if manifest else None,
    }
    if manifest:
        summary.update(dataset_samples=manifest["num_samples"], dataset_failed=manifest["num_failed"])
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.encode", description=__doc__.split("\n")[0])
    p.add_argument("--images", help="ImageFolder root (one subfolder per class)")
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--resolution", type=int)
    p.add_argument("--vae", default="identity", help="identity, a diffusers model id in the local cache, or a directory")
    p.add_argument("--formats", default="mds,wds")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--flip", action="store_true", help="also store the encoding of the mirrored image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--strict", action="store_true", help="the first bad image is fatal")
    p.add_argument("--store", choices=("moments", "sample"), default="moments")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default min(8, cpus))")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--finalize", action="store_true", help="only write manifest.json (all shards must be done)")
    args = p.parse_args(argv)
    try:
        if args.finalize:
            manifest = finalize(args.out)
            if manifest is None:
                return 1
            print(json.dumps({"manifest": str(Path(args.out) / mf.MANIFEST), "samples": manifest["num_samples"],
                              "failed": manifest["num_failed"]}))
            return 0
        if not args.images or not args.resolution:
            p.error("--images and --resolution are required (unless --finalize)")
        rank, world = world_from_env(args.rank, args.world_size)
        summary = encode_dataset(args.images, args.out, args.resolution, args.vae, args.formats,
                                 args.samples_per_shard, flip=args.flip, batch_size=args.batch_size,
                                 strict=args.strict, store=args.store, rank=rank, world_size=world,
                                 workers=args.workers, device=args.device)
    except (BadImage, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
