"""ADM's evaluation suite in PyTorch: FID, sFID, Inception Score, precision and recall.

Command line (note: SAMPLES first, REFERENCE second -- the reverse of ADM's ``evaluator.py``)::

    python -m mpdit_dist.evaluate SAMPLES.npz REFERENCE.npz --inception pt_inception-2015-12-05-6726825d.pth \
        [--batch-size 100] [--device cuda] [--out metrics.json] [--cache-dir DIR] \
        [--mlflow-run-id ID --tracking-uri URI [--mlflow-step N]]

Both files are ADM-format npz: ``arr_0`` holds uint8 images ``(N, H, W, 3)``. A reference batch of
ADM (e.g. ``VIRTUAL_imagenet256_labeled.npz``) also holds ``mu``, ``sigma``, ``mu_s``, ``sigma_s``
computed over the whole dataset; those are used for FID and sFID when present, exactly as ADM does,
and its images (10,000 for ImageNet) give the reference manifold for precision and recall.

Python API (used by the trainer for in-training evaluation)::

    net = load_feature_net(path, device)                    # mpdit_dist.inception
    metrics = compute_metrics(samples_uint8, reference_npz_path, net, batch_size, device)

The reference batch's statistics and features are cached in a file keyed by the SHA-256 of the
reference file and the checksum of the feature network, next to the reference file (or in
``cache_dir``), and kept in memory for repeated calls in one process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from mpdit_dist.fileio import NPY_HEADER_ERRORS, atomic_write, object_arrays_refused, write_json_atomic
from mpdit_dist.inception import MIN_INPUT_SIZE, POOL_DIM, FeatureNetError, InceptionFeatures, load_feature_net
from mpdit_dist.metrics import (
    frechet_distance,
    frechet_distance_low_rank,
    gaussian_stats,
    inception_score,
    precision_recall,
)
from mpdit_dist.metrics.numerics import full_fp32

log = logging.getLogger(__name__)

METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")
CACHE_FORMAT = 1
PathLike = Union[str, os.PathLike]


class EvaluationError(ValueError):
    """Bad evaluation input: names the file, key or value at fault."""


# ---------------------------------------------------------------------------------------------
# ADM-format npz files, streamed (a 50,000-image 256x256 batch is 9.8 GB; it never sits in memory)


# what reading a damaged or truncated npz raises: zip, zlib and npy-header errors, a CRC mismatch found
# at the end of a member, a zip directory naming an unknown compression or version
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, *NPY_HEADER_ERRORS)


@contextlib.contextmanager
def _reading_npz(path: PathLike) -> Iterator[None]:
    """Turn what reading an npz raises into an :class:`EvaluationError` naming the file: an error of
    the file system (permission denied, the file removed meanwhile, an I/O error: an ``OSError`` with
    an errno) as such, the rest as a damaged or truncated file. Wrap reads only: a ``ValueError`` of
    other code inside would be taken for damage."""
    try:
        yield
    except EvaluationError:
        raise
    except OSError as err:
        if err.errno is None:  # raised by the zip or npy reader itself
            raise EvaluationError(
                f"{path}: damaged or truncated npz file ({type(err).__name__}: {err}); write or copy it again"
            ) from err
        raise EvaluationError(f"{path}: cannot be read ({err.strerror or err})") from err
    except _NPZ_READ_ERRORS as err:
        raise EvaluationError(
            f"{path}: damaged or truncated npz file ({type(err).__name__}: {err}); write or copy it again"
        ) from err


@dataclass
class NpzImages:
    """The uint8 ``(N, H, W, 3)`` image array ``key`` of an npz file, read in batches on demand."""

    path: Path
    key: str
    shape: tuple[int, ...]

    @property
    def num_images(self) -> int:
        return self.shape[0]

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:  # before the read: a ValueError inside it would be taken for a damaged file
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        with _reading_npz(self.path), zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            header = _read_npy_header(member)
            if header is None:  # a layout we do not stream: load it whole
                array = np.load(self.path)[self.key]
                for start in range(0, len(array), batch_size):
                    yield np.ascontiguousarray(array[start : start + batch_size])
                return
            image_bytes = int(np.prod(self.shape[1:]))
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                buffer = bytearray(count * image_bytes)  # writable, so torch.from_numpy does not copy
                view, filled = memoryview(buffer), 0
                while filled < len(buffer):
                    got = member.readinto(view[filled:])
                    if not got:
                        raise EvaluationError(f"{self.path}: {self.key} ends early (truncated file?)")
                    filled += got
                yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])


def _read_npy_header(fp) -> Optional[tuple[tuple[int, ...], bool, np.dtype]]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        return None
    if fortran:
        return None
    return shape, fortran, dtype


def npz_keys(path: PathLike) -> list[str]:
    """Names of the arrays in an npz file (without reading them)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file")
    with _reading_npz(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile as err:
            raise EvaluationError(f"{path}: not an npz file ({err})") from err


def open_npz_images(path: PathLike, key: str = "arr_0") -> NpzImages:
    """Check that ``key`` of ``path`` is a uint8 ``(N, H, W, 3)`` array, N >= 1, and open it."""
    path = Path(path)
    keys = npz_keys(path)
    if key not in keys:
        raise EvaluationError(f"{path}: no array '{key}' (holds {keys}); ADM's format keeps images in arr_0")
    with _reading_npz(path):
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            header = _read_npy_header(member)
        if header is None:
            array = np.load(path)[key]
            shape, dtype = array.shape, array.dtype
        else:
            shape, _, dtype = header
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise EvaluationError(
            f"{path}: '{key}' must be uint8 images (N, H, W, 3) as in ADM's format, got {dtype} {tuple(shape)}"
        )
    return NpzImages(path, key, tuple(int(s) for s in shape))


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield np.ascontiguousarray(images[start : start + batch_size])


# ---------------------------------------------------------------------------------------------
# features


@dataclass
class Features:
    """Inception features of an image set: pool_3 ``(N, 2048)``, spatial ``(N, 2023)``, logits ``(N, 1008)``."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


def extract_features(
    batches: Iterable[np.ndarray],
    feature_net: InceptionFeatures,
    device: Union[str, torch.device, None] = None,
    total: Optional[int] = None,
    desc: str = "features",
    progress: Optional[bool] = None,
) -> Features:
    """Run ``feature_net`` over uint8 NHWC batches; full float32 (TF32 off) for fidelity.

    ``progress=None`` shows a bar only on a terminal.
    """
    device = _resolve_device(device, feature_net)
    feature_net.to(device).eval()
    pools, spatials, logits = [], [], []
    with torch.inference_mode(), full_fp32():
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=None if progress is None else not progress):
            out = feature_net(torch.from_numpy(batch).to(device, non_blocking=True))
            pools.append(out.pool.float().cpu().numpy())
            spatials.append(out.spatial.float().cpu().numpy())
            logits.append(out.logits.float().cpu().numpy())
    if not pools:
        raise EvaluationError("no images to compute features of")
    features = Features(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))
    for what in ("pool", "spatial", "logits"):  # NaN would turn into a NaN score, or a point outside every ball
        finite = np.isfinite(getattr(features, what)).all(axis=1)
        if not finite.all():
            raise EvaluationError(
                f"{desc}: the feature network gave non-finite {what} features for {int((~finite).sum())} of "
                f"{len(finite)} images (first: image {int(np.argmin(finite))}); are its weights damaged?"
            )
    return features


def _resolve_device(device, feature_net: Optional[torch.nn.Module] = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if feature_net is not None:
        for p in feature_net.parameters():
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# reference batch: statistics, features, cache


@dataclass
class ReferenceStats:
    """What the metrics need of the reference batch.

    ``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s`` (spatial) feed FID and sFID;
    ``pool_features`` (the reference images' pool_3 features) feed precision and recall and may be
    None when the reference holds statistics only (then precision and recall are not computed).
    ``stats_source`` is ``"npz"`` when the statistics came precomputed in the reference file
    (ADM's reference batches), ``"computed"`` when computed from its images.
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool_features: Optional[np.ndarray] = None
    stats_source: str = "computed"
    num_images: int = 0
    image_size: Optional[tuple[int, int]] = None  # (H, W) of the reference images, when it holds any
    sha256: Optional[str] = None
    feature_net_checksum: Optional[str] = None
    cache: str = "off"  # off | miss | hit | memory
    cache_path: Optional[str] = None

    @classmethod
    def from_mapping(cls, stats: Mapping[str, Any]) -> "ReferenceStats":
        """From a dict with ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and optionally ``pool_features``."""
        missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k not in stats]
        if missing:
            raise EvaluationError(f"reference statistics lack {missing}")
        pool = stats.get("pool_features")
        reference = cls(
            mu=np.asarray(stats["mu"], np.float64),
            sigma=np.asarray(stats["sigma"], np.float64),
            mu_s=np.asarray(stats["mu_s"], np.float64),
            sigma_s=np.asarray(stats["sigma_s"], np.float64),
            pool_features=None if pool is None else np.asarray(pool, np.float32),
            stats_source=str(stats.get("stats_source", "given")),
            num_images=0 if pool is None else len(pool),
            cache="off",
        )
        check_statistics(reference, "reference statistics")
        return reference


def check_statistics(reference: ReferenceStats, source: str) -> None:
    """Raise :class:`EvaluationError` naming ``source`` and the key unless the means and covariances
    (and the pool features, when given) are arrays of fitting shapes holding finite values: a NaN
    would otherwise surface as an opaque linear-algebra error, or as points outside every ball."""
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        mean, cov = getattr(reference, mu_key), getattr(reference, sigma_key)
        if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
            raise EvaluationError(
                f"{source}: '{mu_key}' {mean.shape} and '{sigma_key}' {cov.shape} are not a mean (D,) "
                "and its covariance (D, D)"
            )
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise EvaluationError(f"{source}: '{mu_key}' or '{sigma_key}' holds non-finite values")
    pool = reference.pool_features
    if pool is not None and (pool.ndim != 2 or not np.isfinite(pool).all()):
        raise EvaluationError(f"{source}: 'pool_features' {pool.shape} must be (N, D) finite features")


_HASH_MEMO: dict[tuple[str, int, int, int, int], str] = {}
_REFERENCE_MEMO: dict[tuple, ReferenceStats] = {}


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file, remembered per (path, inode, size, mtime, ctime) for the life of the process
    (ctime too: a copy that keeps the size and the old mtime, as ``cp -p`` or ``rsync -a`` make, changes it)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASH_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(16 << 20), b""):
                digest.update(chunk)
        _HASH_MEMO[key] = digest.hexdigest()
    return _HASH_MEMO[key]


def reference_cache_path(reference: PathLike, ref_sha: str, net_checksum: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where the cached statistics of ``reference`` for one feature network live."""
    reference = Path(reference)
    directory = Path(cache_dir) if cache_dir is not None else reference.parent
    return directory / f"{reference.name}.ref-{ref_sha[:16]}.net-{net_checksum[:16]}.stats.npz"


def _is_cache_file(keys: Sequence[str]) -> bool:
    """Whether an npz holding ``keys`` is a reference cache written by :func:`_save_cache`."""
    return {"meta", "mu", "sigma", "mu_s", "sigma_s", "pool_features"} <= set(keys)


def _read_cache(path: Path) -> tuple[dict[str, Any], ReferenceStats]:
    """The meta and the statistics of a reference cache file (raises what :data:`_NPZ_READ_ERRORS` holds, or KeyError)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return meta, ReferenceStats(
            mu=data["mu"],
            sigma=data["sigma"],
            mu_s=data["mu_s"],
            sigma_s=data["sigma_s"],
            pool_features=data["pool_features"] if meta["has_pool_features"] else None,
            stats_source=meta["stats_source"],
            num_images=int(meta["num_images"]),
            image_size=tuple(meta["image_size"]) if meta.get("image_size") else None,  # older caches lack it
            sha256=meta.get("reference_sha256"),
            feature_net_checksum=meta.get("feature_net_checksum"),
            cache="hit",
            cache_path=str(path),
        )


def _load_cache(path: Path, ref_sha: str, net_checksum: str) -> Optional[ReferenceStats]:
    if not path.is_file():
        return None
    try:
        meta, stats = _read_cache(path)
    except (*_NPZ_READ_ERRORS, KeyError, TypeError) as err:  # TypeError: a meta entry of the wrong type
        log.warning("ignoring unreadable reference cache %s (%s); recomputing", path, err)
        return None
    if (
        meta.get("format") != CACHE_FORMAT
        or meta.get("reference_sha256") != ref_sha
        or meta.get("feature_net_checksum") != net_checksum
    ):
        log.warning("ignoring %s: made for another reference file or feature network", path)
        return None
    return stats


def _cache_file_as_reference(path: Path, net_checksum: str) -> ReferenceStats:
    """A reference cache file given as the reference: its statistics and pool features, as they are,
    when the same feature network made them (else the metrics would compare two networks' features)."""
    with _reading_npz(path):
        try:
            meta, stats = _read_cache(path)
        except KeyError as err:
            raise EvaluationError(f"{path}: a reference cache without {err}; pass the reference batch itself") from err
        except (TypeError, json.JSONDecodeError) as err:  # its meta entry: not JSON, or entries of the wrong type
            raise EvaluationError(f"{path}: a reference cache whose metadata cannot be read ({type(err).__name__}: "
                                  f"{err}); pass the reference batch itself") from err
    if meta.get("format") != CACHE_FORMAT or meta.get("feature_net_checksum") != net_checksum:
        raise EvaluationError(
            f"{path}: reference statistics made with another feature network or cache format (network "
            f"{str(meta.get('feature_net_checksum'))[:16]}, format {meta.get('format')}; this evaluation: network "
            f"{net_checksum[:16]}, format {CACHE_FORMAT}); pass the reference batch itself, or the Inception weights "
            "and input size that made them"
        )
    check_statistics(stats, str(path))
    return stats


def _save_cache(path: Path, stats: ReferenceStats) -> bool:
    meta = {
        "format": CACHE_FORMAT,
        "reference_sha256": stats.sha256,
        "feature_net_checksum": stats.feature_net_checksum,
        "stats_source": stats.stats_source,
        "num_images": stats.num_images,
        "image_size": None if stats.image_size is None else list(stats.image_size),
        "has_pool_features": stats.pool_features is not None,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename: a crash or a concurrent reader never sees half a file
        with atomic_write(path) as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                mu=stats.mu,
                sigma=stats.sigma,
                mu_s=stats.mu_s,
                sigma_s=stats.sigma_s,
                pool_features=stats.pool_features if stats.pool_features is not None else np.zeros((0, 0), np.float32),
            )
        return True
    except OSError as err:
        log.warning("could not write the reference cache %s (%s); continuing without it", path, err)
        return False


def load_reference(
    reference: PathLike,
    feature_net: InceptionFeatures,
    batch_size: int = 100,
    device: Union[str, torch.device, None] = None,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    progress: Optional[bool] = None,
) -> ReferenceStats:
    """Statistics and features of an ADM reference npz, from memory, the cache file, or computed.

    FID/sFID statistics come from the file's ``mu``/``sigma``/``mu_s``/``sigma_s`` when present
    (all four, or it is an error), else from its images; the images' pool features are kept for
    precision and recall.
    """
    reference = Path(reference)
    keys = npz_keys(reference)
    ref_sha = file_sha256(reference)
    net_checksum = feature_net.checksum()
    memo_key = (ref_sha, net_checksum)
    if use_cache and memo_key in _REFERENCE_MEMO:
        return dataclasses.replace(_REFERENCE_MEMO[memo_key], cache="memory")
    cache_path = reference_cache_path(reference, ref_sha, net_checksum, cache_dir)
    if _is_cache_file(keys):  # a cache file given as the reference (it is not cached again)
        stats = _cache_file_as_reference(reference, net_checksum)
        log.info("reference statistics read from the cache file %s", reference)
    elif use_cache and (stats := _load_cache(cache_path, ref_sha, net_checksum)) is not None:
        log.info("reference statistics read from cache %s", cache_path)
    else:
        stats = _compute_reference(reference, keys, feature_net, batch_size, device, progress)
        stats.sha256, stats.feature_net_checksum = ref_sha, net_checksum
        if use_cache:
            stats.cache = "miss"
            if _save_cache(cache_path, stats):
                stats.cache_path = str(cache_path)
    if use_cache:
        _REFERENCE_MEMO.clear()  # one reference at a time: its features can be 100s of MB
        _REFERENCE_MEMO[memo_key] = stats
    return stats


def _compute_reference(
    reference: Path, keys: list[str], feature_net: InceptionFeatures, batch_size: int, device, progress
) -> ReferenceStats:
    stat_keys = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys]
    if stat_keys and len(stat_keys) != 4:
        missing = sorted({"mu", "sigma", "mu_s", "sigma_s"} - set(stat_keys))
        raise EvaluationError(f"{reference}: has {stat_keys} but lacks {missing}; need all four or none")
    if "arr_0" not in keys and not stat_keys:
        raise EvaluationError(f"{reference}: neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
    if stat_keys:  # checked before the reference images cost any feature extraction
        not_numeric = f"{reference}: mu, sigma, mu_s, sigma_s must be numeric arrays"
        with _reading_npz(reference):  # damage named as such
            with np.load(reference, allow_pickle=False) as data:
                try:
                    arrays = [data[k] for k in ("mu", "sigma", "mu_s", "sigma_s")]
                except ValueError as err:
                    if not object_arrays_refused(err):
                        raise
                    raise EvaluationError(f"{not_numeric} ({err})") from err  # an object array
        try:
            mu, sigma, mu_s, sigma_s = (np.asarray(a, np.float64) for a in arrays)
        except (ValueError, TypeError) as err:  # strings, ...
            raise EvaluationError(f"{not_numeric} ({err})") from err
        given = ReferenceStats(mu, sigma, mu_s, sigma_s)
        check_statistics(given, str(reference))
        if feature_net.input_size is not None:  # then the feature sizes are known without an image
            check_reference_fits(given, POOL_DIM, feature_net.spatial_dim(), str(reference))
    features, image_size = None, None
    if "arr_0" in keys:
        images = open_npz_images(reference)
        image_size = images.shape[1:3]
        log.info("computing reference features of %d images from %s", images.num_images, reference)
        features = extract_features(
            images.iter_batches(batch_size), feature_net, device,
            total=math.ceil(images.num_images / batch_size), desc="reference", progress=progress,
        )
    if stat_keys:
        source = "npz"
    else:
        if len(features) < 2:
            raise EvaluationError(f"{reference}: a covariance needs at least 2 images, got {len(features)}")
        pool_stats = gaussian_stats(features.pool, device)
        spatial_stats = gaussian_stats(features.spatial, device)
        mu, sigma, mu_s, sigma_s = pool_stats.mu, pool_stats.sigma, spatial_stats.mu, spatial_stats.sigma
        source = "computed"
    return ReferenceStats(
        mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
        pool_features=None if features is None else features.pool,
        stats_source=source,
        num_images=0 if features is None else len(features),
        image_size=image_size,
    )


# ---------------------------------------------------------------------------------------------
# metrics


def check_settings(batch_size: int = 100, k: int = 3, is_split_size: int = 5000) -> None:
    """Reject settings that would fail (or mean nothing) only after all features are extracted."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be positive, got {batch_size}")
    if k < 1:
        raise EvaluationError(f"k (precision/recall neighbourhood) must be at least 1, got {k}")
    if is_split_size < 1:
        raise EvaluationError(f"is_split_size (Inception Score split) must be at least 1, got {is_split_size}")


def check_reference_fits(reference: ReferenceStats, pool_dim: int, spatial_dim: int, source: str = "reference") -> None:
    """Raise :class:`EvaluationError` naming ``source`` unless the reference's FID and sFID statistics
    fit sample features of ``pool_dim`` and ``spatial_dim`` values (called before the samples'
    features are extracted, and again on the features)."""
    for mu_key, sigma_key, what, dim in (
        ("mu", "sigma", "pool_3", pool_dim),
        ("mu_s", "sigma_s", "spatial", spatial_dim),
    ):
        mu, sigma = np.shape(getattr(reference, mu_key)), np.shape(getattr(reference, sigma_key))
        if mu != (dim,) or sigma != (dim, dim):
            raise EvaluationError(
                f"{source}: reference '{mu_key}' {mu} / '{sigma_key}' {sigma} do not fit the samples' {dim}-dim "
                f"{what} features: was the reference made with another feature network or input size?"
            )
    pool = np.shape(reference.pool_features) if reference.pool_features is not None else None
    if pool is not None and pool[1:] != (pool_dim,):
        raise EvaluationError(
            f"{source}: reference 'pool_features' {pool} do not fit the samples' {pool_dim}-dim pool_3 features"
        )


def resolution_warning(reference: ReferenceStats, sample_size: Sequence[int], source: str = "reference") -> Optional[str]:
    """A warning when the reference images (``source``) are of another resolution than the samples, else None.

    Both are resized to the network's input, so the metrics are computed, but they then compare
    resolutions as well as models (e.g. 512x512 samples against ADM's 256x256 reference batch)."""
    if reference.image_size is None or tuple(reference.image_size) == tuple(sample_size):
        return None
    (h, w), (rh, rw) = sample_size, reference.image_size
    return (
        f"the samples are {h}x{w} but the reference images of {source} are {rh}x{rw}: the metrics compare "
        "resolutions as well as models; use the reference batch of the samples' resolution"
    )


def check_counts(num_samples: int, reference: Optional[ReferenceStats], k: int = 3, source: str = "samples",
                 knn: bool = False) -> None:
    """Raise :class:`EvaluationError` unless there are samples enough for a covariance and, where the
    reference holds images, samples and reference images enough for k-NN balls (called before the
    samples' features are extracted, and again on them); ``source`` names the samples. Without the
    reference yet (``None``), ``knn`` says whether it will hold images."""
    if num_samples < 2:
        raise EvaluationError(f"{source}: need at least 2 samples for a covariance, got {num_samples}")
    if reference is None:
        if knn and num_samples <= k:
            raise EvaluationError(f"{source}: precision/recall with k={k} need more than {k} samples, got {num_samples}")
        return
    if reference.pool_features is not None and (num_samples <= k or len(reference.pool_features) <= k):
        raise EvaluationError(
            f"{source}: precision/recall with k={k} need more than {k} samples and reference images, "
            f"got {num_samples} and {len(reference.pool_features)}"
        )


def _check_before_features(reference: ReferenceStats, num_samples: int, image_size: Sequence[int], feature_net,
                           k: int, source: str, samples_source: str = "samples") -> list[str]:
    """What must hold before the samples' features are computed, so that a reference that cannot fit
    or too few samples cost no feature extraction (:func:`check_reference_fits`, :func:`check_counts`);
    returns the warnings (logged): a reference of another resolution."""
    check_reference_fits(reference, POOL_DIM, feature_net.spatial_dim(image_size), source)
    check_counts(num_samples, reference, k, samples_source)
    warning = resolution_warning(reference, image_size, source)
    if warning:
        log.warning("%s", warning)
    return [warning] if warning else []


def label_order_warning(labels: np.ndarray, split_size: int = 5000) -> Optional[str]:
    """A warning when the sample labels (``arr_1``) are grouped so that the Inception Score's
    consecutive splits are not class-balanced, else None.

    The Inception Score is the mean over consecutive splits of ``split_size`` (as ADM computes it);
    it rewards each split for covering many classes, so a class-sorted file (e.g. 50 samples of each
    of 1,000 classes in class order: 100 classes per split of 5,000) caps it near the number of
    classes per split. A full split is flagged when it holds at most half the distinct classes
    that a random order of the same labels would give it on average."""
    from scipy.stats import hypergeom

    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if n <= split_size:
        return None  # one split: the order does not matter
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        return None
    # expected distinct classes in a split drawn at random, without replacement, from all n labels
    expected = float(np.sum(1.0 - hypergeom.pmf(0, n, counts, split_size)))
    worst = None
    for start in range(0, n - split_size + 1, split_size):  # full splits: a short last one proves little
        got = len(np.unique(inverse[start : start + split_size]))
        if got <= 0.5 * expected and (worst is None or got < worst[1]):
            worst = (start, got)
    if worst is None:
        return None
    start, got = worst
    order = "sorted by class" if np.all(np.diff(labels) >= 0) else "grouped by class"
    return (
        f"the sample labels (arr_1) are {order}: the Inception Score split at samples {start}..."
        f"{start + split_size - 1} holds {got} class{'' if got == 1 else 'es'} where a random order would give "
        f"about {expected:.0f}, so the score is capped by the order, not by the model. Shuffle the samples "
        "(images and labels together) before evaluating; mpdit_dist.sample writes them shuffled"
    )


def read_labels(path: PathLike, num_images: int) -> Optional[np.ndarray]:
    """``arr_1`` of an ADM-format samples npz (the labels) when it holds one label per image."""
    if "arr_1" not in npz_keys(path):
        return None
    with _reading_npz(path):  # a damaged file is an error, even where only its labels are damaged
        try:
            with np.load(path, allow_pickle=False) as data:
                labels = data["arr_1"]
        except ValueError as err:  # an object array: only the order check needs the labels
            if not object_arrays_refused(err):
                raise  # a damaged header: named by _reading_npz
            log.info("%s: arr_1 not readable as labels (%s); not used", path, err)
            return None
    if labels.ndim != 1 or len(labels) != num_images or not np.issubdtype(labels.dtype, np.integer):
        log.info("%s: arr_1 is not one integer label per image (%s %s); not used", path, labels.dtype, labels.shape)
        return None
    return labels


def metrics_from_features(
    samples: Features,
    reference: ReferenceStats,
    k: int = 3,
    is_split_size: int = 5000,
    pr_batch_size: int = 10000,
    device: Union[str, torch.device, None] = None,
) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall of sample features against a reference."""
    check_settings(k=k, is_split_size=is_split_size)
    n = len(samples)
    check_counts(n, reference, k)
    check_reference_fits(reference, samples.pool.shape[1], samples.spatial.shape[1])
    notes: list[str] = []
    fid, fid_route = _frechet("FID", samples.pool, reference.mu, reference.sigma, device, notes)
    sfid, sfid_route = _frechet("sFID", samples.spatial, reference.mu_s, reference.sigma_s, device, notes)
    result: dict[str, Any] = {
        "inception_score": inception_score(samples.logits, is_split_size),
        "fid": fid,
        "sfid": sfid,
        "precision": None,
        "recall": None,
    }
    if reference.pool_features is None:
        log.warning("the reference holds no images: precision and recall not computed (reported as null)")
    else:
        result["precision"], result["recall"] = precision_recall(
            reference.pool_features, samples.pool, k=k, batch_size=pr_batch_size, device=device
        )
    result.update(
        num_samples=n,
        num_reference_images=reference.num_images,
        reference_stats_source=reference.stats_source,
        reference_cache=reference.cache,
        reference_sha256=reference.sha256,
        feature_net_checksum=reference.feature_net_checksum,
        fid_route=fid_route,
        sfid_route=sfid_route,
        pr_k=k,
        is_split_size=is_split_size,
        is_num_splits=math.ceil(n / is_split_size),
        warnings=notes,
    )
    return result


def _frechet(name: str, sample_features: np.ndarray, ref_mu, ref_sigma, device, notes: list[str]):
    """ADM's route (statistics, scipy sqrtm), or the exact low-rank one for fewer samples than dims.
    A warning of the sqrtm route (a singular product, taken with ``eps`` on the diagonals) is logged
    and added to ``notes``; its failure (a root with a large imaginary part) is an EvaluationError."""
    if len(sample_features) < sample_features.shape[1]:
        return frechet_distance_low_rank(sample_features, ref_mu, ref_sigma, device), "low_rank"
    stats = gaussian_stats(sample_features, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = frechet_distance(stats.mu, stats.sigma, ref_mu, ref_sigma)
        except ValueError as err:
            if "imaginary component" not in str(err):
                raise
            raise EvaluationError(f"{name}: {err}; the sample and reference covariances give no real "
                                  "matrix square root") from err
    for w in caught:
        note = f"{name}: {w.message}"
        log.warning("%s", note)
        notes.append(note)
    return value, "sqrtm"


def _reference_stats(reference, feature_net, batch_size, device, cache_dir, use_cache, progress) -> ReferenceStats:
    if isinstance(reference, ReferenceStats):
        return reference
    if isinstance(reference, Mapping):
        return ReferenceStats.from_mapping(reference)
    return load_reference(reference, feature_net, batch_size, device, cache_dir, use_cache, progress)


def compute_metrics(
    samples_uint8: np.ndarray,
    reference: Union[PathLike, Mapping[str, Any], ReferenceStats],
    feature_net: InceptionFeatures,
    batch_size: int = 100,
    device: Union[str, torch.device, None] = None,
    *,
    k: int = 3,
    is_split_size: int = 5000,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    progress: Optional[bool] = False,
) -> dict[str, Any]:
    """ADM's metrics of ``samples_uint8`` (``(N, H, W, 3)`` uint8) against ``reference``.

    ``reference`` is an ADM reference npz path (statistics cached, see :func:`load_reference`),
    a dict with ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (and ``pool_features`` for precision and
    recall), or a :class:`ReferenceStats`. ``device=None`` uses the feature network's device;
    another device moves the network there.
    Returns a dict with ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall`` and
    bookkeeping (counts, cache status, checksums).
    """
    start = time.perf_counter()
    check_settings(batch_size, k, is_split_size)
    samples_uint8 = np.asarray(samples_uint8)
    if samples_uint8.dtype != np.uint8 or samples_uint8.ndim != 4 or samples_uint8.shape[-1] != 3:
        raise EvaluationError(
            f"samples must be uint8 (N, H, W, 3), got {samples_uint8.dtype} {samples_uint8.shape}"
        )
    device = _resolve_device(device, feature_net)
    ref = _reference_stats(reference, feature_net, batch_size, device, cache_dir, use_cache, progress)
    source = "reference statistics" if isinstance(reference, (Mapping, ReferenceStats)) else str(reference)
    notes = _check_before_features(ref, len(samples_uint8), samples_uint8.shape[1:3], feature_net, k, source)
    features = extract_features(
        _array_batches(samples_uint8, batch_size), feature_net, device,
        total=math.ceil(len(samples_uint8) / batch_size), desc="samples", progress=progress,
    )
    result = metrics_from_features(features, ref, k=k, is_split_size=is_split_size, device=device)
    result["sample_image_size"] = list(samples_uint8.shape[1:3])
    result["eval_seconds"] = time.perf_counter() - start
    result["warnings"] = notes + result["warnings"]
    return result


def evaluate_npz(
    samples: PathLike,
    reference: PathLike,
    feature_net: InceptionFeatures,
    batch_size: int = 100,
    device: Union[str, torch.device, None] = None,
    *,
    k: int = 3,
    is_split_size: int = 5000,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    progress: Optional[bool] = None,
) -> dict[str, Any]:
    """:func:`compute_metrics` for a samples npz, streamed from disk batch by batch.

    The result also holds ``warnings``: a list of messages (also logged), e.g. when the labels in
    ``arr_1`` are sorted by class so that the Inception Score's splits are not class-balanced."""
    start = time.perf_counter()
    check_settings(batch_size, k, is_split_size)
    samples, reference = Path(samples), Path(reference)
    sample_keys, reference_keys = npz_keys(samples), npz_keys(reference)
    if "mu" in sample_keys and "mu" not in reference_keys:
        log.warning(
            "%s holds reference statistics but %s does not: are the arguments swapped? "
            "This command takes SAMPLES first (ADM's evaluator.py takes the reference first).",
            samples, reference,
        )
    images = open_npz_images(samples)
    notes = []
    labels = read_labels(samples, images.num_images)
    order_warning = None if labels is None else label_order_warning(labels, is_split_size)
    if order_warning:
        log.warning("%s: %s", samples, order_warning)
        notes.append(order_warning)
    # the samples' own count before the reference costs any features; with the reference's after
    check_counts(images.num_images, None, k, str(samples), knn="arr_0" in reference_keys)
    device = _resolve_device(device, feature_net)
    ref = load_reference(reference, feature_net, batch_size, device, cache_dir, use_cache, progress)
    notes += _check_before_features(ref, images.num_images, images.shape[1:3], feature_net, k, str(reference),
                                    str(samples))
    features = extract_features(
        images.iter_batches(batch_size), feature_net, device,
        total=math.ceil(images.num_images / batch_size), desc="samples", progress=progress,
    )
    result = metrics_from_features(features, ref, k=k, is_split_size=is_split_size, device=device)
    result.update(
        samples=str(samples),
        reference=str(reference),
        sample_image_size=list(images.shape[1:3]),
        eval_seconds=time.perf_counter() - start,
        warnings=notes + result["warnings"],
    )
    return result


# ---------------------------------------------------------------------------------------------
# output: JSON, MLflow


def write_json(metrics: Mapping[str, Any], path: PathLike) -> None:
    """Write the metrics as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dict(metrics), indent=2)


def log_to_mlflow(
    metrics: Mapping[str, Any],
    run_id: str,
    tracking_uri: Optional[str],
    step: int = 0,
    prefix: str = "eval/",
) -> None:
    """Log the five metrics (``{prefix}fid``, ...) at ``step`` to an existing MLflow run.

    Uses a plain client (:func:`~mpdit_dist.tracking.open_client`), so it neither starts nor ends runs and leaves the
    process's active run alone. Metrics that are None (precision/recall without reference images)
    are not logged; the bookkeeping goes in as tags.
    """
    from mlflow.entities import Metric, RunTag

    from .tracking import open_client

    client = open_client(tracking_uri)
    now = int(time.time() * 1000)
    values = [
        Metric(prefix + key, float(metrics[key]), now, int(step))
        for key in METRIC_KEYS
        if metrics.get(key) is not None
    ]
    tags = [
        RunTag(prefix + key, str(metrics[key]))
        for key in ("samples", "reference", "num_samples", "reference_sha256", "feature_net_checksum", "feature_net")
        if metrics.get(key) is not None
    ]
    client.log_batch(run_id, metrics=values, tags=tags)


# ---------------------------------------------------------------------------------------------
# command line


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from mpdit_dist.config import refuse_bad_output

    parser = argparse.ArgumentParser(
        prog="python -m mpdit_dist.evaluate",
        description="ADM's FID, sFID, Inception Score, precision and recall, in PyTorch.",
    )
    parser.add_argument("samples", help="samples npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("reference", help="reference npz of ADM (arr_0 images; optional mu, sigma, mu_s, sigma_s)")
    parser.add_argument("--inception", default=None, help="local FID-Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="write the metrics JSON here")
    parser.add_argument("--cache-dir", default=None, help="where reference statistics are cached (default: beside the reference)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size of the precision/recall manifolds (ADM: 3)")
    parser.add_argument("--is-split-size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    parser.add_argument(
        "--input-size", type=int, default=299,
        help="resize images to this size before the network (ADM: 299; other values only for tests, "
        "their metrics are not comparable)",
    )
    parser.add_argument("--mlflow-run-id", default=None, help="log the metrics to this MLflow run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (e.g. sqlite:///path/mlflow.db)")
    parser.add_argument("--mlflow-step", type=int, default=0, help="step to log the metrics at")
    parser.add_argument("--mlflow-prefix", default="eval/", help="prefix of the MLflow metric names")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.k < 1:
        parser.error(f"--k must be at least 1 (ADM: 3), got {args.k}")
    if args.is_split_size < 1:
        parser.error(f"--is-split-size must be at least 1 (ADM: 5000), got {args.is_split_size}")
    if args.input_size < MIN_INPUT_SIZE:
        parser.error(f"--input-size must be at least {MIN_INPUT_SIZE} (the network's smallest input), "
                     f"got {args.input_size}")
    if args.tracking_uri and not args.mlflow_run_id:
        parser.error("--tracking-uri given without --mlflow-run-id")
    if args.device is not None:  # a bad one ended in a traceback, a missing GPU after the reference was read
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r}: give cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available here")
    # the metrics JSON is written once every feature is computed: a bad path would lose them
    refuse_bad_output(parser, "--out", args.out)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Entry point of ``python -m mpdit_dist.evaluate``; returns the metrics dict."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = _resolve_device(args.device)
    feature_net = load_feature_net(args.inception, device, input_size=args.input_size)
    metrics = evaluate_npz(
        args.samples, args.reference, feature_net, args.batch_size, device,
        k=args.k, is_split_size=args.is_split_size,
        cache_dir=args.cache_dir, use_cache=not args.no_cache,
    )
    metrics.update(feature_net=str(args.inception), input_size=args.input_size, device=str(device))
    if args.out:
        write_json(metrics, args.out)
    if args.mlflow_run_id:
        log_to_mlflow(metrics, args.mlflow_run_id, args.tracking_uri, step=args.mlflow_step, prefix=args.mlflow_prefix)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (EvaluationError, FeatureNetError) as err:  # bad input: a message, not a traceback
        sys.exit(f"error: {err}")
