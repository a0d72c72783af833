"""The on-disk layout of a latent dataset and its ``manifest.json``.

Shared by the writer (``data_prep.encode``) and the readers in this package, so both agree on
file names and fields without either importing the other's internals.

Layout of a dataset root (everything ``data_prep.encode`` writes)::

    <root>/manifest.json          what is in the dataset (see below); written last
    <root>/encode_config.json     the encode configuration; a rerun with another one is refused
    <root>/parts/part-000012.json one record per finished shard (the commit point of a shard)
    <root>/mds/index.json         Streaming index merged over all parts (``streaming.base.util.merge_index``):
                                  entry i is the part of the manifest's shards[i]; its sha256 is the
                                  manifest's ``mds_index_sha256`` (absent in datasets written before it)
    <root>/mds/part-000012/       one MDS sub-dataset per shard (index.json + shard.00000.mds)
    <root>/wds/shard-000012.tar   one WebDataset tar per shard
    <root>/wds/shard-000012.idx.json  every sample's key and member byte offsets in that tar

Sample ``i`` of the dataset (``0 <= i < num_samples``) is the same sample in both formats: shards
are taken in shard-id order and samples in write order within a shard.

Sample fields (names in MDS columns; WebDataset members are ``<key>.<field>.npy`` etc.):

* ``key``   unique, stable key: the image's index in the sorted ImageFolder listing (``%09d``).
* ``label`` class index (sorted folder order).
* ``path``  the source image, relative to the ImageFolder root (for audits).
* ``latent``                       store=sample: one latent, fp16, shape ``latent_shape``.
* ``mean``, ``std``                store=moments: the posterior mean and std, fp16.
* ``flip_latent`` / ``flip_mean``, ``flip_std``  with ``flip``: the same for the mirrored image.
* ``crc32`` (MDS column ``int``; WebDataset member ``<key>.crc32``, decimal text) where the manifest has
  ``sample_checksum``: :func:`sample_crc32` of the sample as written. The readers check it for every
  sample they read, so a flipped bit inside a latent that leaves it finite is named instead of being
  trained on. Datasets written before it lack both the field and the manifest key, and are read
  without the check.

Latents are stored raw (as the encoder returns them, without the scaling factor).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import zlib
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

MANIFEST = "manifest.json"
ENCODE_CONFIG = "encode_config.json"
PARTS_DIR = "parts"
MDS_DIR = "mds"
WDS_DIR = "wds"
MANIFEST_VERSION = 1


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:06d}"


def wds_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def wds_index_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.idx.json"


def sample_key(image_index: int) -> str:
    # digits only: no dots (webdataset splits member names at the first dot) and sortable
    return f"{image_index:09d}"


def latent_fields(store: str, flip: bool) -> list[str]:
    """The array fields one sample carries, in a fixed order."""
    base = ["latent"] if store == "sample" else ["mean", "std"]
    return base + (["flip_" + f for f in base] if flip else [])


SAMPLE_CHECKSUM_FIELD = "crc32"


def sample_checksum_spec(fields: Sequence[str]) -> dict[str, Any]:
    """The manifest's ``sample_checksum`` for samples with these latent fields: which field holds the
    checksum, how it is computed, and what it covers, in order (:func:`sample_crc32`)."""
    return {"field": SAMPLE_CHECKSUM_FIELD, "algorithm": "zlib.crc32", "covers": ["key", "label", *fields]}


def sample_crc32(key: str, label: int, arrays: Sequence[np.ndarray]) -> int:
    """The per-sample checksum: ``zlib.crc32`` over the key (UTF-8), the label (int64, little-endian)
    and the raw bytes of each latent array (as stored: float16, C order), in the manifest's field
    order. The bytes are the same in MDS and WebDataset, so a sample has one checksum in both; the
    ``path`` column (audit information only) is not covered. About 10 us for 32 KB."""
    crc = zlib.crc32(key.encode("utf-8"))
    crc = zlib.crc32(int(label).to_bytes(8, "little", signed=True), crc)
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a), crc)  # no copy: stored arrays are contiguous
    return crc


REQUIRED_KEYS = ("latent_shape", "num_classes", "latent_mean", "latent_std", "encoder", "num_samples",
                 "formats", "shards", "store", "flip")


def read_manifest(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read ``manifest.json`` from a dataset root (or the file itself) and check its fields."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest at {path}: run `python -m data_prep.encode` (or its --finalize step) first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks {', '.join(repr(k) for k in missing)}")
    shape = manifest["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{path}: latent_shape must be [C, H, W] of positive integers, got {shape!r}")
    channels = shape[0]
    for key in ("latent_mean", "latent_std"):
        values = manifest[key]
        if not isinstance(values, list) or len(values) != channels:
            raise ValueError(f"{path}: {key} has {len(values) if isinstance(values, list) else values!r} entries, "
                             f"latent_shape has {channels} channels")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"{path}: {key} must be finite numbers, got {values} "
                             f"(a non-finite latent was written into the dataset; re-encode it)")
    if any(s <= 0 for s in manifest["latent_std"]):
        raise ValueError(f"{path}: latent_std must be positive, got {manifest['latent_std']}")
    if manifest["store"] not in ("sample", "moments"):
        raise ValueError(f"{path}: store {manifest['store']!r}: expected 'sample' or 'moments'")
    for key in ("num_classes", "num_samples"):  # labels are checked against num_classes at each read
        value = manifest[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= (key == "num_classes")):
            raise ValueError(f"{path}: {key} must be a {'positive' if key == 'num_classes' else 'non-negative'} "
                             f"integer, got {value!r}")
    dtype = manifest.get("latent_dtype", "float16")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"{path}: latent_dtype {dtype!r}: expected 'float16' or 'float32'")
    if not isinstance(manifest["shards"], list):
        raise ValueError(f"{path}: shards must be a list, got {type(manifest['shards']).__name__}")
    for i, shard in enumerate(manifest["shards"]):
        lacking = [k for k in ("shard_id", "num_samples", "checksums") if k not in shard]
        if lacking:
            raise ValueError(f"{path}: shards[{i}] lacks {', '.join(repr(k) for k in lacking)}")
        for k in ("shard_id", "num_samples"):
            if not (isinstance(shard[k], int) and not isinstance(shard[k], bool) and shard[k] >= 0):
                raise ValueError(f"{path}: shards[{i}].{k} must be a non-negative integer, got {shard[k]!r}")
    checksum = manifest.get("sample_checksum")
    if checksum is not None:  # absent: written before per-sample checksums (read without them)
        want = sample_checksum_spec(latent_fields(manifest["store"], manifest["flip"]))
        if checksum != want:
            raise ValueError(f"{path}: sample_checksum {checksum!r}: this code checks only {want!r} (a dataset "
                             f"written by another version of data_prep.encode? read it with that version)")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        raise ValueError(f"{path}: the shards hold {sum(s['num_samples'] for s in manifest['shards'])} samples, "
                         f"num_samples says {manifest['num_samples']}")
    return manifest


def mds_shard_basename(shard: dict[str, Any]) -> str:
    """The MDS data file of one manifest shard, relative to ``mds/`` (what the merged index names)."""
    files = sorted(rel[len(MDS_DIR) + 1:] for rel in shard.get("checksums", {})
                   if rel.startswith(f"{MDS_DIR}/") and rel.endswith(".mds"))
    return files[0] if len(files) == 1 else f"{part_name(shard['shard_id'])}/shard.00000.mds"


def check_mds_index(index: Any, manifest: dict[str, Any], where: str, limit: int = 5) -> list[str]:
    """What is wrong with a merged MDS ``index.json`` for this manifest (empty list: nothing).

    Entry ``i`` of the index must be manifest shard ``i``: its data file (``raw_data.basename``) and
    its sample count. The loader addresses samples by their position in the index, so two entries
    swapped would silently reorder the samples (and a stale index mix in another dataset's shards)
    while the shard files and their checksums are all fine. At most ``limit`` problems are listed.
    """
    shards = manifest["shards"]
    try:
        entries = [(e["raw_data"]["basename"], e["samples"]) for e in index["shards"]]
    except (KeyError, TypeError) as exc:
        return [f"{where}: not a valid MDS index ({type(exc).__name__}: {exc})"]
    problems = []
    if len(entries) != len(shards):
        problems.append(f"{where}: {len(entries)} shards, manifest.json lists {len(shards)}")
    wrong = 0
    for i, ((basename, samples), shard) in enumerate(zip(entries, shards)):
        want = mds_shard_basename(shard)
        if basename != want or samples != shard["num_samples"]:
            wrong += 1
            if wrong <= limit:
                problems.append(f"{where}: shards[{i}] is {basename} with {samples} samples, manifest.json's "
                                f"shards[{i}] is {want} with {shard['num_samples']} samples")
    if wrong > limit:
        problems.append(f"{where}: and {wrong - limit} more entries that differ from manifest.json")
    return problems


class DamagedDataset(ValueError):
    """What :func:`verify_checksums` found wrong: every damaged file, not just the first.

    ``problems`` holds one ``(path, reason, shard_id)`` per damaged file (``shard_id`` None for the
    merged MDS index, which may have several); ``checked`` counts every file checked and
    ``shard_files`` the shard files among them. The message lists them all, one per line.
    """

    def __init__(self, root: Path, problems: list[tuple[Path, str, int | None]], checked: int, shard_files: int):
        self.root, self.problems, self.checked, self.shard_files = root, problems, checked, shard_files
        damaged = len({p for p, _, sid in problems if sid is not None})
        head = (f"{damaged:,} of {shard_files:,} shard files damaged" if damaged
                else f"all {shard_files:,} shard files intact")
        index = sum(sid is None for _, _, sid in problems)
        if index:
            head += f", {index} problem{'s' if index > 1 else ''} with the merged MDS index"
        super().__init__(f"{root}: {head} ({checked:,} files checked against the manifest):\n  "
                         + "\n  ".join(f"{p}: {reason}" for p, reason, _ in problems))

    @property
    def damaged_shards(self) -> list[int]:
        """The ids of the shards with a damaged file (re-encoding them repairs those files)."""
        return sorted({sid for _, _, sid in self.problems if sid is not None})


def _unreadable(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"unreadable: {exc.strerror or exc}" + (f" ({name})" if name else "")


def _recorded_sizes(rel: str, data: bytes) -> dict[str, tuple[int, str]]:
    """The sizes a shard's own index (whose sha256 matched) records for its data files:
    ``{rel of the data file: (bytes, rel of the index)}``; empty for other files."""
    try:
        index = json.loads(data)
        if rel.startswith(f"{WDS_DIR}/") and rel.endswith(".idx.json"):
            return {f"{WDS_DIR}/{index['tar']}": (int(index["tar_size"]), rel)}
        if rel.startswith(f"{MDS_DIR}/") and rel.endswith("/index.json"):
            folder = rel.rpartition("/")[0]
            return {f"{folder}/{s['raw_data']['basename']}": (int(s["raw_data"]["bytes"]), rel)
                    for s in index["shards"]}
    except (ValueError, KeyError, TypeError):
        pass  # not the index layout this version writes: the checksum alone decides
    return {}


def _shard_file_problem(p: Path, rel: str, digest: str, sizes: dict[str, tuple[int, str]]) -> str | None:
    """Why shard file ``p`` is damaged (None: its sha256 is the manifest's). A shard's index file
    that is intact adds what it records about its data files to ``sizes``."""
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if rel in sizes and st.st_size != sizes[rel][0]:
            # the shard's intact index records another size: damaged whatever its bytes (no need to read them)
            want, where = sizes[rel]
            what = "truncated" if st.st_size < want else "longer than written"
            return f"{what}: {st.st_size:,} bytes, {where} records {want:,}"
        if rel.endswith(".json"):  # a shard's index: small, parsed for the sizes of its data files
            data = p.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
        else:
            actual = file_sha256(p)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:  # permission, I/O error, stale handle: the rest is still checked
        return _unreadable(exc)
    if actual != digest:
        return ("empty (0 bytes); " if st.st_size == 0 else "") + f"sha256 differs from the manifest's {digest[:16]}..."
    if rel.endswith(".json"):
        sizes.update(_recorded_sizes(rel, data))
    return None


def verify_checksums(root: Union[str, os.PathLike], manifest: dict[str, Any] | None = None) -> int:
    """Check every shard file listed in the manifest against its sha256, and the merged MDS index
    against the manifest; returns the number of files checked.

    Reads every byte of the dataset, so it is not done on every open (the readers check sizes
    only): run it after copying a dataset, or when a size check or a non-finite batch points at
    corruption (``python -m data_prep.encode --out ROOT --verify``). The merged ``mds/index.json``
    (MDS datasets) must exist, match ``mds_index_sha256`` where the manifest records it, and list
    the manifest's shards in its order with its sample counts (:func:`check_mds_index`).

    Every file is checked whatever the others' state: a missing, unreadable (permission, I/O
    error), truncated (shorter than its shard's intact index records) or differing file is noted
    and the check goes on. Raises :class:`DamagedDataset` (a ``ValueError``) naming every damaged
    file with its reason, the count, and the shards to re-encode.
    """
    root = Path(root)
    manifest = manifest if manifest is not None else read_manifest(root)
    problems: list[tuple[Path, str, int | None]] = []
    n = 0
    for shard in manifest["shards"]:
        sizes: dict[str, tuple[int, str]] = {}
        found = {}
        # a shard's index files first: an intact one tells its data files' sizes (truncation, not just a mismatch)
        for rel, digest in sorted(shard["checksums"].items(), key=lambda kv: (not kv[0].endswith(".json"), kv[0])):
            n += 1
            found[rel] = _shard_file_problem(root / rel, rel, digest, sizes)
        problems += [(root / rel, why, shard["shard_id"]) for rel, why in sorted(found.items()) if why]
    shard_files = n
    if "mds" in manifest.get("formats", []):
        p = root / MDS_DIR / "index.json"
        n += 1
        digest = manifest.get("mds_index_sha256")
        index_problems = []
        try:
            data = p.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            index_problems.append(f"missing (the merged MDS index; `python -m data_prep.encode --out {root} "
                                  f"--finalize` writes it again)")
        except OSError as exc:
            index_problems.append(_unreadable(exc))
        else:
            if digest is not None and hashlib.sha256(data).hexdigest() != digest:
                index_problems.append(f"sha256 differs from the manifest's mds_index_sha256 {digest[:16]}...")
            try:
                index = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                index_problems.append(f"not valid JSON ({exc})")
            else:
                index_problems += [line[len(f"{p}: "):] for line in check_mds_index(index, manifest, str(p))]
        problems += [(p, why, None) for why in index_problems]
    if problems:
        raise DamagedDataset(root, problems, n, shard_files)
    return n


def _channel_view(manifest: dict[str, Any], x: torch.Tensor, key: str) -> torch.Tensor:
    v = torch.as_tensor(manifest[key], dtype=x.dtype, device=x.device)
    return v.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() >= 2 else v


# The official MPDiT code standardises raw SD-VAE latents per channel with these fixed ImageNet
# statistics (hard-coded in its train.py and sample.py), at 256 and 512 px alike, instead of
# statistics measured over the encoded dataset (``data.latent_stats``).
OFFICIAL_LATENT_MEAN = [5.81, 3.25, 0.12, -2.15]
OFFICIAL_LATENT_STD = [4.17, 4.62, 3.71, 3.28]
OFFICIAL_STATS_SOURCE = "official: the fixed constants of the official MPDiT code"


def with_latent_stats(manifest: dict[str, Any], which: str, source: str = "the dataset") -> dict[str, Any]:
    """``manifest`` standardising with the statistics ``which`` names (``data.latent_stats``):
    ``measured``, the manifest's own (unchanged); ``official``, the official code's constants, for
    latents of 4 channels (SD-VAE). A copy says so in ``latent_stats_source`` and keeps the measured
    ones in ``measured_latent_mean``/``measured_latent_std``; the trainer records it with every
    checkpoint, so sampling and export decode with what training used."""
    from ..config import LATENT_STATS, ConfigError  # a setting that does not fit the data: named as the setting

    if which not in LATENT_STATS:
        raise ConfigError(f"data.latent_stats={which!r}: choose one of {list(LATENT_STATS)}")
    if which == "measured":
        return manifest
    channels = len(manifest["latent_mean"])
    if channels != len(OFFICIAL_LATENT_MEAN):
        raise ConfigError(f"data.latent_stats=official: the official constants are for SD-VAE latents of "
                         f"{len(OFFICIAL_LATENT_MEAN)} channels, {source} has {channels} "
                         f"(encoder {manifest.get('encoder', {}).get('id')!r})")
    return {**manifest, "latent_mean": list(OFFICIAL_LATENT_MEAN), "latent_std": list(OFFICIAL_LATENT_STD),
            "measured_latent_mean": manifest["latent_mean"], "measured_latent_std": manifest["latent_std"],
            "latent_stats_source": OFFICIAL_STATS_SOURCE}


def normalize(x: torch.Tensor, manifest: dict[str, Any], normalized: bool = True) -> torch.Tensor:
    """Encoder latents ``(N, C, ...)`` -> model space.

    ``normalized=True``: per-channel standardisation with the manifest's ``latent_mean``/``latent_std``
    (what ``data.normalize=true`` gives). ``normalized=False``: multiply by the encoder's
    ``scaling_factor`` (the usual Stable-Diffusion/DiT convention; 1.0 for ``identity``).
    """
    if normalized:
        return (x - _channel_view(manifest, x, "latent_mean")) / _channel_view(manifest, x, "latent_std")
    return x * float(manifest["encoder"].get("scaling_factor", 1.0))


def denormalize(x: torch.Tensor, manifest: dict[str, Any], normalized: bool = True) -> torch.Tensor:
    """Model space -> encoder latents (the inverse of :func:`normalize`).

    The result is what the encoder produced: feed it to ``vae.decode`` directly (no scaling
    factor to apply), or for ``identity`` it is the image in [-1, 1].
    """
    if normalized:
        return x * _channel_view(manifest, x, "latent_std") + _channel_view(manifest, x, "latent_mean")
    return x / float(manifest["encoder"].get("scaling_factor", 1.0))


def channel_stats_init(channels: int) -> dict[str, Any]:
    return {"count": 0, "sum": [0.0] * channels, "sumsq": [0.0] * channels, "var_sum": [0.0] * channels}


def channel_stats_add(stats: dict[str, Any], center: np.ndarray, std: np.ndarray | None = None) -> None:
    """Accumulate per-channel sums of a batch ``(N, C, H, W)`` of latents (float64).

    ``center`` is the stored latent or posterior mean; ``std`` the posterior std if stored, so the
    statistics describe the latents the trainer actually draws: ``mean + std * eps``.
    """
    c = center.astype(np.float64)
    stats["count"] += int(c.shape[0] * c.shape[2] * c.shape[3])
    stats["sum"] = (np.asarray(stats["sum"]) + c.sum(axis=(0, 2, 3))).tolist()
    stats["sumsq"] = (np.asarray(stats["sumsq"]) + (c * c).sum(axis=(0, 2, 3))).tolist()
    if std is not None:
        s = std.astype(np.float64)
        stats["var_sum"] = (np.asarray(stats["var_sum"]) + (s * s).sum(axis=(0, 2, 3))).tolist()


def channel_stats_merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = channel_stats_init(len(parts[0]["sum"]))
    for p in parts:  # fixed order -> identical floats whoever merges
        out["count"] += p["count"]
        for k in ("sum", "sumsq", "var_sum"):
            out[k] = [a + b for a, b in zip(out[k], p[k])]
    return out


def channel_stats_final(stats: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of drawn latents: Var = Var(center) + E[std^2]."""
    n = max(stats["count"], 1)
    mean = np.asarray(stats["sum"]) / n
    var = np.asarray(stats["sumsq"]) / n - mean * mean + np.asarray(stats["var_sum"]) / n
    std = np.sqrt(np.maximum(var, 1e-12))
    return mean.tolist(), std.tolist()


def file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_id(manifest: dict[str, Any]) -> str:
    """A short fingerprint of the dataset content (shard checksums), stored in loader state."""
    h = hashlib.sha256()
    h.update(str(manifest.get("num_samples")).encode())
    for shard in manifest.get("shards", []):
        h.update(json.dumps(shard.get("checksums", {}), sort_keys=True).encode())
    if not manifest.get("shards"):
        h.update(json.dumps(manifest.get("content_sha256", "")).encode())
    return h.hexdigest()[:16]
