"""Sampling: from a run directory (newest checkpoint, EMA weights) or an exported weights file.

``python -m mpdit_dist.sample --run-dir DIR [--num-per-class N | --num-samples N] [--cfg-scale S]
[--sampler euler|heun|dopri5|euler_maruyama] [--steps K] [--seed S] [--out FILE.npz] [--grid FILE.png]
[--precision auto|bf16|fp32] [--tf32] [--attention auto|sdpa|math|flash_attn]``

Latents are mapped back through the run's encoder (the VAE, or identity for pixel-space data)
and written as ADM's evaluator reads them: ``arr_0`` uint8 N x H x W x C, ``arr_1`` the labels.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError
from .config import refuse_bad_output, refuse_below_one
from .distributed.env import all_gather_object, barrier, broadcast_object, init_distributed, shutdown
from .fileio import atomic_write, lock_file, temp_files_of, write_text_atomic
from .flow import guided_velocity, sample
from .metrics.numerics import float32_mode
from .models import ATTENTION_BACKENDS, flash_attn_available


# ------------------------------------------------------------------------------------------------
# Generation, decoding, grids
# ------------------------------------------------------------------------------------------------

def initial_noise(n: int, shape: Sequence[int], seed: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Noise of samples [offset, offset + n) of a seeded stream: sample i's noise depends only on
    (seed, i), so a job split over ranks or resumed in parts gives the same samples."""
    out = torch.empty((n, *shape))
    for j in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + offset + j)
        out[j] = torch.randn(tuple(shape), generator=g)
    return out.to(device)


def _stream_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for sample ``index`` of ``seed``'s random stream ``stream`` (no collisions
    between seeds, indices or streams in practice)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def generate(model, args, classes: Sequence[int], *, seed: int, cfg_scale: float = 1.0, sampler: str = "euler",
             steps: int = 50, device: torch.device, bf16: bool = False, guidance_interval=None,
             offset: int = 0) -> torch.Tensor:
    """Latents (model space, i.e. normalised) for the given classes."""
    shape = (args.in_channels, args.input_size, args.input_size)
    noise = initial_noise(len(classes), shape, seed, device, offset)
    y = torch.as_tensor(list(classes), device=device, dtype=torch.long)
    was_training = model.training
    model.eval()

    def fwd(x, t, yy):
        # the velocity in fp32 whatever the model computes in (autocast, or bf16 weights under DeepSpeed)
        if bf16:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return model(x, t, yy).float()
        return model(x, t, yy).float()

    v = guided_velocity(fwd, args.num_classes, cfg_scale, guidance_interval)
    # the SDE's noise, like the initial noise, depends only on (seed, sample index): never on how
    # the samples are batched or split over ranks (the ODE samplers draw none)
    gens = None
    if sampler == "euler_maruyama":
        gens = [torch.Generator().manual_seed(_stream_seed(seed, offset + j, "sde")) for j in range(len(classes))]
    try:
        return sample(v, noise, y, sampler=sampler, steps=steps, generator=gens)
    finally:
        model.train(was_training)


_VAE_CACHE: dict[str, Any] = {}


def nonfinite_samples(latents: torch.Tensor) -> list[int]:
    """Indices (in the batch) of the samples whose latents hold NaN or inf: decoded, they would be
    black images (the cast to uint8 turns NaN into 0), scored as if the model had drawn them."""
    return (~torch.isfinite(latents.detach().flatten(1)).all(dim=1)).nonzero().flatten().tolist()


def decode_to_uint8(latents: torch.Tensor, manifest: dict[str, Any], device: torch.device,
                    normalized: bool = True) -> np.ndarray:
    """Model-space latents -> uint8 images (N, H, W, C) through the manifest's encoder.

    ``normalized`` must be the training run's ``data.normalize`` (how the model-space latents were
    made from the stored ones). :func:`denormalize` returns the encoder's own latents, which is
    what ``vae.decode`` takes: no scaling factor is applied here."""
    from .data import denormalize

    z = denormalize(latents.float(), manifest, normalized)
    enc = manifest.get("encoder", {})
    kind = enc.get("id", enc.get("name", "identity")) if isinstance(enc, dict) else str(enc)
    if kind in ("identity", "memory"):  # pixel-space data: the latents are the images in [-1, 1]
        imgs = z
    else:
        from diffusers.models import AutoencoderKL

        path = enc.get("path") or kind
        if path not in _VAE_CACHE:
            _VAE_CACHE[path] = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        vae = _VAE_CACHE[path]
        with torch.no_grad():
            imgs = vae.decode(z.to(device, vae.dtype)).sample.float()
    imgs = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return imgs.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str | Path, ncol: Optional[int] = None, pad: int = 2, upscale: int = 0) -> Path:
    """Write N x H x W x C uint8 images as one PNG grid. Small images are upscaled for viewing."""
    from PIL import Image

    n, h, w, c = images.shape
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    im = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    factor = upscale or max(1, 256 // max(h, w))
    if factor > 1:
        im = im.resize((im.width * factor, im.height * factor), Image.NEAREST)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension (use .png)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # whole or not at all: a cut-short grid would be uploaded to MLflow as is
        im.save(f, format=fmt)
    return path


# ------------------------------------------------------------------------------------------------
# Loading a model to sample from
# ------------------------------------------------------------------------------------------------

def load_for_sampling(run_dir: Optional[str] = None, checkpoint: Optional[str] = None, use_ema: bool = True,
                      device: torch.device = torch.device("cpu"), attention: Optional[str] = None):
    """(model, manifest, info) from a run dir / checkpoint dir (sharded) or an exported file. The run
    may still be training: its newest checkpoint is read whole, and under ``torchrun`` every rank
    gets the same checkpoint (see :func:`mpdit_dist.export.load_checkpoint_weights`).

    ``attention``: the kernel to run with (default: the saved one, or ``auto`` where the saved
    ``flash_attn`` is not importable; see :func:`mpdit_dist.export.inference_attention`)."""
    from .export import load_checkpoint_weights, load_exported

    if checkpoint and Path(checkpoint).suffix == ".safetensors":
        model, meta = load_exported(checkpoint, attention=attention)
        manifest = meta.get("manifest") or {}
        # resolved, as for a checkpoint directory: the same file named another way is the same source
        return model.to(device), manifest, {"source": str(Path(checkpoint).resolve()), "step": meta.get("step"),
                                            "config": meta.get("config") or {}}
    model, manifest, info = load_checkpoint_weights(run_dir=run_dir, checkpoint=checkpoint, use_ema=use_ema,
                                                    attention=attention)
    return model.to(device), manifest, info


def plan_labels(classes: Sequence[int], num_samples: Optional[int], num_per_class: Optional[int], seed: int,
                balanced: bool = False) -> list[int]:
    """The labels of every sample, fixed by the arguments alone (never by the number of ranks).

    ``num_samples``: uniform at random over the classes, or, with ``balanced``, as even as possible
    (shuffled). ``num_per_class``: each class that many times, in a seeded shuffled order: the same
    labels as ``num_samples = len(classes) * num_per_class`` with ``balanced``. Never in class order:
    the Inception Score is averaged over consecutive splits of 5,000 samples (as ADM computes it),
    and a class-sorted file gives each split only a few classes, capping the score."""
    classes = list(classes)
    if num_samples is None:
        return plan_labels(classes, len(classes) * (num_per_class or 8), None, seed, balanced=True)
    rng = np.random.default_rng(seed)
    if balanced:
        labels = [classes[i % len(classes)] for i in range(num_samples)]
        rng.shuffle(labels)
        return [int(c) for c in labels]
    return [int(c) for c in rng.choice(classes, size=num_samples)]


def grid_order(labels: Sequence[int]) -> np.ndarray:
    """Indices that put samples in class order (stable), for a grid with one row per class."""
    return np.argsort(np.asarray(labels), kind="stable")


def _remove_tmp_files(path: Path) -> None:
    """Remove what writers of ``path`` killed mid-write left (also ``<name>.tmp-*`` and
    ``<name>.tmp.npz``, the names of earlier versions)."""
    for tmp in [*temp_files_of(path), *path.parent.glob(glob.escape(path.name) + ".tmp-*"),
                path.with_name(path.name + ".tmp.npz")]:
        tmp.unlink(missing_ok=True)


def _atomic_savez(path: Path, **arrays) -> None:
    """``path`` whole or not at all (:func:`~mpdit_dist.fileio.atomic_write`). A failed write (a full
    disk) ends with a message naming ``path``."""
    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise SystemExit(f"could not write {path}: {e}; the finished parts are kept, rerun the same command to "
                         "resume") from e


def weights_fingerprint(model: torch.nn.Module, manifest: dict[str, Any], normalized: bool) -> str:
    """A digest of what makes the images besides the sampling options: the architecture (with the
    attention kernel it runs), every weight, and the decoding (manifest, ``data.normalize``). Parts
    are resumed only under the same digest: another file exported to the same path, or another
    checkpoint at the same step, is not the same weights."""
    from .export import weights_sha256

    h = hashlib.sha256()
    h.update(json.dumps([model.args.to_dict(), manifest, normalized], sort_keys=True, default=str).encode())
    h.update(weights_sha256(model).encode())
    return h.hexdigest()[:32]


def _lock_parts(parts_dir: Path) -> Optional[int]:
    """Hold ``<parts>/lock`` for this job (:func:`~mpdit_dist.fileio.lock_file`; the lock ends with
    the process, also when it is killed): a second job writing the same ``--out`` at the same time
    is refused, naming the holder. It would discard or overwrite the first job's parts, and each
    job would merge the other's parts as its own. Returns the fd that holds the lock (None where the
    file system takes no locks: a warning says that this is not checked)."""
    path = parts_dir / "lock"
    try:
        fd = lock_file(path, blocking=False)
    except OSError as e:
        print(f"warning: cannot lock {path} ({e}): two jobs sampling into the same --out at once "
              "would not be detected", file=sys.stderr)
        return None
    if fd is None:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        raise SystemExit(f"another sampling job ({holder or 'a process'}) is writing {parts_dir}: wait for it to "
                         "end, or give this job another --out")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _setting_changes(old: Optional[dict], new: dict) -> list[str]:
    """``key: old -> new`` for each setting that differs. Parts recorded with a weights digest are
    matched on it, not on the path they were loaded from (the same weights moved or named by
    another path give the same images); parts from before the digest on the path and step alone."""
    if old is None:
        return []
    new = json.loads(json.dumps(new))
    if "weights" in old:
        old, new = ({k: v for k, v in d.items() if k != "source"} for d in (old, new))
    else:
        new.pop("weights", None)
    missing = "(unset)"
    return [f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}" for k in sorted({*old, *new})
            if old.get(k, missing) != new.get(k, missing)]


def _prepare_parts(parts_dir: Path, settings: dict) -> None:
    """Keep the parts of the same settings; discard (saying which settings changed) those of others,
    and those of unknown settings; record this job's settings."""
    plan = parts_dir / "settings.json"
    parts = sorted(parts_dir.glob("part_*.npz"))
    changes: list[str] = []
    if plan.is_file():
        try:
            changes = _setting_changes(json.loads(plan.read_text()), settings)
        except (ValueError, OSError) as e:
            changes = [f"{plan} is unreadable ({e})"]
    elif parts:
        changes = [f"{plan} is missing"]
    if parts and changes:
        # parts of another job (other settings or checkpoint) must not be mixed into this one
        print(f"warning: {parts_dir} holds {len(parts)} parts sampled with other settings "
              f"({'; '.join(changes)}); discarding them, starting afresh", file=sys.stderr)
        for part in parts:
            part.unlink()
    write_text_atomic(plan, json.dumps(settings, indent=1))


def _warn_replacing(out: Path, settings: dict) -> None:
    """Say at the start, not hours later, that an existing npz of other (or unknown) settings is replaced."""
    if not out.is_file():
        return
    described = out.with_suffix(".json")
    try:
        changes = _setting_changes(json.loads(described.read_text()), settings)
    except (ValueError, OSError):
        changes = [f"{described} is missing or unreadable"]
    if changes:
        print(f"warning: {out} exists, sampled with other settings ({'; '.join(changes)}); this job replaces it "
              "when it ends", file=sys.stderr)


def _part_problem(path: Path, chunk: Sequence[int]) -> Optional[str]:
    """Why the finished part ``path`` cannot be used for the samples ``chunk`` (None: it can). Read
    in full: a truncated file, or one with a bad checksum, is found here, not at the merge."""
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises (zip, npy header, missing key)
        return f"unreadable ({type(e).__name__}: {e})"
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(chunk) or labels.tolist() != list(chunk):
        return (f"does not hold the planned samples ({len(labels)} labels, images {images.dtype}{list(images.shape)}; "
                f"planned {len(chunk)})")
    return None


def _parse_classes(ap: argparse.ArgumentParser, text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        ap.error(f"--classes {text!r}: give comma-separated class indices, e.g. 0,3,7")


def _parse_interval(ap: argparse.ArgumentParser, text: Optional[str]) -> Optional[tuple[float, float]]:
    if not text:
        return None
    usage = "give lo,hi: two times with 0 <= lo < hi <= 1 (guidance applies for lo <= t <= hi)"
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        ap.error(f"--guidance-interval {text!r}: {usage}")
    if not 0.0 <= lo < hi <= 1.0:
        ap.error(f"--guidance-interval {text!r}: {usage}")
    return lo, hi


def default_out(run_dir: Optional[str], checkpoint: Optional[str]) -> Path:
    """Where the npz goes without ``--out``: ``<run dir>/samples/samples.npz``. A checkpoint
    directory ``<run dir>/checkpoints/step_*`` names its run dir; an exported ``.safetensors`` file
    has none, so its samples go beside it (not two folders up, outside the file's own folder)."""
    if run_dir is not None:
        return Path(run_dir) / "samples" / "samples.npz"
    path = Path(checkpoint)
    base = path.parent if path.is_file() else path.parent.parent
    return base / "samples" / "samples.npz"


def _parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The command line, checked before anything is loaded: bad values end here with the flag named."""
    ap = argparse.ArgumentParser(description="Sample from a trained MPDiT")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="run directory: newest checkpoint, EMA weights")
    src.add_argument("--checkpoint", help="a checkpoint directory (step_*) or an exported .safetensors")
    ap.add_argument("--num-per-class", type=int, default=None,
                    help="each class this many times (default 8), written in a seeded shuffled order (the same "
                         "samples as --num-samples CLASSES*N --balanced); the grid shows one row per class")
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--balanced", action="store_true", help="with --num-samples: equal counts per class")
    ap.add_argument("--classes", type=str, default=None, help="comma-separated class indices (default: all)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the run's train.sample_cfg_scale")
    ap.add_argument("--guidance-interval", type=str, default=None,
                    help="lo,hi in t (0 <= lo < hi <= 1): guidance only for lo <= t <= hi")
    ap.add_argument("--sampler", default="euler", choices=["euler", "heun", "dopri5", "euler_maruyama"])
    ap.add_argument("--steps", type=int, default=None,
                    help="integration steps (default: the run's train.sample_steps); dopri5 ignores it (adaptive)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--out", default=None,
                    help="npz path (default: <run-dir>/samples/samples.npz; with --checkpoint: its run dir's "
                         "samples/ for a step_* directory, samples/ beside the file for a .safetensors)")
    ap.add_argument("--grid", default=None, help="png path (default: beside the npz)")
    ap.add_argument("--keep-parts", action="store_true",
                    help="keep <out>.parts/ once the npz is written (default: removed; a rerun of the same "
                         "command then finds the npz complete and does nothing)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: a GPU if there is one; under torchrun each rank takes its own (LOCAL_RANK)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="the model's forward: bf16 autocast (auto on a GPU) or fp32 (auto on a CPU); fp32 is "
                         "strict fp32 unless --tf32")
    ap.add_argument("--tf32", action="store_true",
                    help="let fp32 matrix products and convolutions use TF32 on Ampere and newer GPUs (the "
                         "official sample.py's default, its --tf32); without it they run in full fp32")
    ap.add_argument("--attention", default=None, choices=list(ATTENTION_BACKENDS),
                    help="attention kernel on this machine (default: the saved one; a saved flash_attn falls back "
                         "to auto where flash-attn is not installed)")
    args = ap.parse_args(argv)
    if args.num_samples is not None and args.num_per_class is not None:
        ap.error("give --num-samples or --num-per-class, not both")
    if args.num_samples is None and args.num_per_class is None:
        args.num_per_class = 8
    refuse_below_one(ap, (("--num-samples", args.num_samples), ("--num-per-class", args.num_per_class),
                          ("--batch-size", args.batch_size), ("--steps", args.steps)))
    if args.seed < 0:  # numpy's label generator takes none (it failed after the model was loaded)
        ap.error(f"--seed must be at least 0, got {args.seed}")
    if args.attention == "flash_attn" and not flash_attn_available():
        ap.error("--attention flash_attn: the flash-attn package is not importable here")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):  # nan/inf: every image black
        ap.error(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    # the npz's settings go beside it as .json, its grid as .png: another suffix could be overwritten by them
    refuse_bad_output(ap, "--out", args.out, (".npz",))
    if args.grid is not None:  # an extension PIL cannot write failed once every sample was drawn
        from PIL import Image

        refuse_bad_output(ap, "--grid", args.grid)
        if Image.registered_extensions().get(Path(args.grid).suffix.lower()) not in Image.SAVE:
            ap.error(f"--grid {args.grid}: not an image file name PIL can write (use .png)")
    args.class_list = _parse_classes(ap, args.classes)
    args.interval = _parse_interval(ap, args.guidance_interval)
    return args, ap


def main(argv: Optional[list[str]] = None) -> None:
    """Sampling CLI; under ``torchrun`` the work is split over ranks in fixed parts.

    Part p holds samples [p*B, (p+1)*B) (B = ``--batch-size``) and goes to rank p % world. A
    sample's noise depends only on (seed, its index), and parts have the same shape whatever the
    number of ranks, so 1 rank and N ranks write the same images. Finished parts are kept in
    ``<out>.parts/`` until the npz is written (then removed, unless ``--keep-parts``): a rerun of
    an interrupted command skips them (resumable), on any number of ranks, and samples again those
    it cannot read back whole; a rerun of a finished one finds the npz of its settings and stops.
    Parts of other settings or other weights (by digest) are discarded, naming what changed. Files are written whole or not at all (renamed
    into place); a second job on the same ``--out`` while one runs is refused (``<out>.parts/lock``)."""
    args, ap = _parse_args(argv)

    dist_info = init_distributed("auto" if args.device == "auto" else args.device)
    try:
        _sample(args, ap, dist_info)
    except BaseException:
        shutdown(failed=True)  # no barrier: the other ranks may be waiting in another collective
        raise
    shutdown()


def _sample(args: argparse.Namespace, ap: argparse.ArgumentParser, dist_info) -> None:
    device = dist_info.device
    if args.sampler == "dopri5" and args.steps is not None and dist_info.is_main:
        print("warning: --steps is ignored by the dopri5 sampler (adaptive step size)", file=sys.stderr)
    try:
        model, manifest, info = load_for_sampling(args.run_dir, args.checkpoint, not args.no_ema, device,
                                                  args.attention)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:  # what is wrong with the source, named
        raise SystemExit(f"mpdit_dist.sample: {exc}") from exc
    bf16 = device.type == "cuda" if args.precision == "auto" else args.precision == "bf16"
    margs = model.args
    run_cfg = info.get("config", {}).get("train", {})
    # how the run mapped stored latents into model space (config.DataConfig.normalize)
    normalized = bool(info.get("config", {}).get("data", {}).get("normalize", True))
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else float(run_cfg.get("sample_cfg_scale", 1.0))
    steps = args.steps if args.steps is not None else int(run_cfg.get("sample_steps", 50))
    classes_all = args.class_list or list(range(manifest.get("num_classes", margs.num_classes)))
    bad = [c for c in classes_all if not 0 <= c < margs.num_classes]
    if bad:
        ap.error(f"--classes {bad} outside [0, {margs.num_classes})")
    labels = plan_labels(classes_all, args.num_samples, args.num_per_class, args.seed, args.balanced)
    interval = args.interval
    out = Path(args.out) if args.out else default_out(args.run_dir, args.checkpoint)
    settings = {"sampler": args.sampler, "steps": steps, "cfg_scale": cfg_scale, "guidance_interval": interval,
                "seed": args.seed, "num_samples": len(labels), "batch_size": args.batch_size,
                "balanced": args.balanced, "ema": not args.no_ema, "source": info.get("source"),
                "precision": "bf16" if bf16 else "fp32",
                "checkpoint_step": info.get("step")}
    # added only when used, so that parts of --num-samples jobs begun before these options existed
    # still match their settings and resume
    if args.num_per_class is not None:
        settings["num_per_class"] = args.num_per_class  # its label order is shuffled (was class order)
    if args.class_list is not None:
        settings["classes"] = args.class_list  # parts of other classes are discarded, not merged and refused
    if args.tf32:
        settings["tf32"] = True
    if args.attention is not None:
        settings["attention"] = args.attention
    parts_dir = out.with_name(out.name + ".parts")
    lock = None
    try:
        done = False
        if dist_info.is_main:
            settings["weights"] = weights_fingerprint(model, manifest, normalized)
            parts_dir.mkdir(parents=True, exist_ok=True)
            lock = _lock_parts(parts_dir)  # held to the end: no other job writes these parts or this --out
            done = _already_written(out, settings)
        if broadcast_object(done):
            if dist_info.is_main:
                print(f"{out} already holds these {len(labels)} samples (settings in {out.with_suffix('.json')}): "
                      "nothing to do; delete it to sample again")
                _remove_parts(parts_dir, lock, keep=args.keep_parts)
                lock = None
            return
        if dist_info.is_main:
            for stale in [*parts_dir.glob("*.tmp"), *parts_dir.glob("*.tmp-*"), *parts_dir.glob("*.tmp.npz")]:
                stale.unlink(missing_ok=True)  # of writers killed mid-write (no job writes now)
            _remove_tmp_files(out)
            _remove_tmp_files(out.with_suffix(".json"))
            _prepare_parts(parts_dir, settings)
            _warn_replacing(out, settings)
        barrier()
        problem = _sample_parts(args, dist_info, model, margs, manifest, labels, parts_dir, device=device, bf16=bf16,
                                cfg_scale=cfg_scale, steps=steps, interval=interval, normalized=normalized)
        # a collective every rank reaches, also the one that stopped early: all leave with its message
        problems = [p for p in all_gather_object(problem) if p]
        if problems:
            raise SystemExit(f"mpdit_dist.sample: {problems[0]}")
        if dist_info.is_main:
            _write_out(args, out, parts_dir, labels, settings)
            _remove_parts(parts_dir, lock, keep=args.keep_parts)
            lock = None
    finally:
        if lock is not None:
            os.close(lock)


def _already_written(out: Path, settings: dict) -> bool:
    """Whether ``out`` holds the samples of exactly these settings (and weights). Its settings file
    is written only after the npz is complete (and removed before an npz is replaced), so a settings
    file equal to this job's means a finished npz of this job's samples: a rerun of a finished
    command does not sample again (its parts are gone)."""
    described = out.with_suffix(".json")
    if not (out.is_file() and described.is_file()):
        return False
    try:
        return not _setting_changes(json.loads(described.read_text()), settings)
    except (ValueError, OSError):
        return False


def _remove_parts(parts_dir: Path, lock: Optional[int], keep: bool) -> None:
    """Once the npz is written: remove the parts (as large as the npz: 39 GB for 50,000 samples at
    512 px) unless ``--keep-parts``, then release the lock. The lock file goes last, while still
    held, so that no other job can take it in between; an empty folder is removed."""
    if not keep:
        for p in [*parts_dir.glob("part_*.npz"), parts_dir / "settings.json"]:
            p.unlink(missing_ok=True)
        (parts_dir / "lock").unlink(missing_ok=True)
    if lock is not None:
        os.close(lock)
    if not keep:
        try:
            parts_dir.rmdir()
        except OSError:  # another job's lock file is already there, or files of the user's
            pass


def _sample_parts(args, dist_info, model, margs, manifest, labels, parts_dir: Path, *, device, bf16, cfg_scale,
                  steps, interval, normalized) -> Optional[str]:
    """This rank's parts that are missing, or that cannot be read back whole (sampled again). Returns
    why it stopped before its last part (a part of non-finite samples, not written), else None."""
    n_parts = math.ceil(len(labels) / args.batch_size)
    mine = [p for p in range(n_parts) if p % dist_info.world_size == dist_info.rank]
    todo = []
    for p in mine:
        path = parts_dir / f"part_{p:06d}.npz"
        if not path.is_file():
            todo.append(p)
            continue
        problem = _part_problem(path, labels[p * args.batch_size:(p + 1) * args.batch_size])
        if problem:
            print(f"warning: {path}: {problem}; sampling it again", file=sys.stderr)
            path.unlink()
            todo.append(p)
    bar = None
    if dist_info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sample (rank 0 of {dist_info.world_size})")
    # fp32 is strict fp32 (TF32 off) unless --tf32; under bf16 autocast PyTorch's defaults stay
    # (the VAE's cuDNN convolutions use TF32) unless --tf32 asks for TF32 matmuls too
    precision_mode = float32_mode(tf32=args.tf32) if (args.tf32 or not bf16) else contextlib.nullcontext()
    failure = None
    with precision_mode:
        for p in todo:
            start = p * args.batch_size
            chunk = labels[start:start + args.batch_size]
            lat = generate(model, margs, chunk, seed=args.seed, cfg_scale=cfg_scale, sampler=args.sampler, steps=steps,
                           device=device, bf16=bf16, guidance_interval=interval, offset=start)
            bad = nonfinite_samples(lat)
            if bad:  # written, they would be black images in the npz, and its FID that of a broken model
                failure = (f"{len(bad)} of {len(chunk)} samples of part {p} came out non-finite (NaN or inf latents; "
                           f"samples {[start + i for i in bad[:8]]}{' ...' if len(bad) > 8 else ''}): the weights or "
                           f"the settings (--cfg-scale {cfg_scale:g}, --sampler {args.sampler}, --precision) give no "
                           f"image there; the parts written so far are kept")
                break
            _atomic_savez(parts_dir / f"part_{p:06d}.npz", images=decode_to_uint8(lat, manifest, device, normalized),
                          labels=np.asarray(chunk, dtype=np.int64))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return failure


def _write_out(args, out: Path, parts_dir: Path, labels: list[int], settings: dict) -> None:
    """The npz from the parts, then its settings file. An older settings file is removed first: a job
    stopped in between leaves an npz without settings (rerun), never one described by another's."""
    arr, lab = merge_parts(parts_dir, math.ceil(len(labels) / args.batch_size), len(labels))
    if lab.tolist() != labels:
        raise SystemExit(f"parts in {parts_dir} do not match the planned labels; remove the folder and rerun")
    out.parent.mkdir(parents=True, exist_ok=True)
    described = out.with_suffix(".json")
    described.unlink(missing_ok=True)
    _atomic_savez(out, arr_0=arr, arr_1=lab)
    write_text_atomic(described, json.dumps(settings, indent=1))
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")
    if args.num_per_class is not None:  # one row per class, although the file is shuffled
        save_grid(arr[grid_order(lab)[:256]], grid, ncol=args.num_per_class)
    else:
        save_grid(arr[: min(len(arr), 256)], grid)
    print(f"wrote {len(arr)} samples to {out} (settings in {described}), grid {grid}")


def merge_parts(parts_dir: Path, n_parts: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``part_000000.npz`` ... in order, filled into one preallocated array
    (one copy of the images in memory, not the parts plus their concatenation)."""
    images: Optional[np.ndarray] = None
    labels = np.empty(total, dtype=np.int64)
    filled = 0
    for p in range(n_parts):
        path = parts_dir / f"part_{p:06d}.npz"
        try:
            with np.load(path) as z:
                part, part_labels = z["images"], z["labels"]
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises
            raise SystemExit(f"cannot read {path} ({type(e).__name__}: {e}): rerun the same command, a damaged part "
                             "is sampled again") from e
        if images is None:
            images = np.empty((total, *part.shape[1:]), dtype=part.dtype)
        if filled + len(part) > total or part.shape[1:] != images.shape[1:] or len(part_labels) != len(part):
            raise SystemExit(f"{path} does not fit the planned samples; remove {parts_dir} and rerun")
        images[filled:filled + len(part)] = part
        labels[filled:filled + len(part)] = part_labels
        filled += len(part)
    if images is None or filled != total:
        raise SystemExit(f"parts in {parts_dir} hold {filled} samples, {total} planned; remove the folder and rerun")
    return images, labels


if __name__ == "__main__":
    main()
