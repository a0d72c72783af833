"""Consolidated weights from any checkpoint, and weights-only warm starts.

``python -m mpdit_dist.export RUN_DIR_OR_CHECKPOINT --out FILE.safetensors [--ema]``

Reads a sharded checkpoint (torch.distributed.checkpoint) in one process, with no process group
and no GPU, and writes one safetensors file whose metadata holds the model architecture, the data
manifest and where it came from. Nothing here unpickles code: safetensors, DCP tensors, JSON.
The run may still be training and saving: a run directory gives its newest intact checkpoint,
read whole (see :func:`~mpdit_dist.checkpoint.read_published`), and nothing in it is changed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp

from .checkpoint import COMPLETE, CheckpointError, read_published
from .config import refuse_bad_output
from .fileio import atomic_path
from .models import ATTENTION_BACKENDS, MPDiT, ModelArgs, flash_attn_available

log = logging.getLogger(__name__)


def inference_attention(saved: str, override: Optional[str] = None, source: str = "the weights") -> str:
    """The attention kernel to build a model with when loading saved weights on this machine.

    The kernel is not part of the weights but of the machine that runs them: ``override`` (e.g.
    ``mpdit_dist.sample --attention``) wins; otherwise the saved kernel, except that a saved
    ``flash_attn`` falls back to ``auto`` (logged) where the flash-attn package is not importable,
    so that a run trained with flash-attn can be exported, sampled and converted anywhere."""
    if override is not None:
        if override not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={override!r}: choose one of {ATTENTION_BACKENDS}")
        if override == "flash_attn" and not flash_attn_available():
            raise ValueError("attention='flash_attn' but the flash-attn package is not importable here")
        return override
    if saved == "flash_attn" and not flash_attn_available():
        log.warning("%s were saved with attention='flash_attn', which is not importable here: "
                    "using attention='auto' (SDPA) instead", source)
        return "auto"
    return saved


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights as loaded: each tensor's name, dtype, shape and bytes, in name
    order. What tells apart two sets of weights found under the same path or name (a file exported
    again, a VAE directory overwritten, a newer cache snapshot)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory (read: its newest checkpoint), not a checkpoint directory."""
    path = Path(path)
    if re.match(r"^([a-z]+-)?step_\d+$", path.name):  # step_*, and tmp-/replaced-/deleting-: refused by name
        return False
    return not any((path / name).exists() for name in (COMPLETE, "trainer.json", ".metadata"))


def _model_args_from_state(tstate: dict[str, Any]) -> ModelArgs:
    from .config import from_dict, model_args_from

    return model_args_from(from_dict(tstate["config"]).model)


def load_checkpoint_weights(run_dir: Optional[str] = None, checkpoint: Optional[str] = None,
                            use_ema: bool = True, attention: Optional[str] = None,
                            ) -> tuple[MPDiT, dict[str, Any], dict[str, Any]]:
    """(plain model with the checkpoint's weights, data manifest, info) on CPU, from the checkpoint
    directory ``checkpoint`` or the newest intact checkpoint of ``run_dir``.

    The run may still be training and saving: the checkpoint is verified, then read whole, and one
    deleted under the reader by the run's retention is read again from the then newest (see
    :func:`~mpdit_dist.checkpoint.read_published`); nothing in the run directory is changed. Under
    a process group every rank calls it and gets the same checkpoint's weights.

    ``attention``: the kernel to build the model with (default: the run's, see
    :func:`inference_attention`)."""
    if not (checkpoint or run_dir):
        raise ValueError("give a run directory or a checkpoint directory")
    key = "ema" if use_ema else "model"

    def read(path: Path, tstate: dict[str, Any]) -> MPDiT:
        args = _model_args_from_state(tstate)
        model = MPDiT(replace(args, attention=inference_attention(args.attention, attention,
                                                                  f"the weights of {path}")))
        if tstate.get("backend") == "deepspeed" and (path / "deepspeed").is_dir():
            from .distributed.deepspeed_backend import load_consolidated

            sd = load_consolidated(path, key)
        else:
            sd = {k: v for k, v in model.state_dict().items()}
            # each process reads the whole model itself (no_dist): whatever world size wrote the shards,
            # and with no collective, so that a checkpoint deleted under one rank cannot hang the others
            dcp.load({key: sd}, checkpoint_id=str(path), no_dist=True)
        model.load_state_dict(sd)
        return model

    path, tstate, model = read_published(Path(checkpoint or run_dir), read, newest=not checkpoint)
    manifest = tstate.get("manifest") or _manifest_of(tstate)
    info = {"source": str(path.resolve()), "step": tstate.get("step"), "config": tstate.get("config", {}), "ema": use_ema}
    return model, manifest, info


def _manifest_of(tstate: dict[str, Any]) -> dict[str, Any]:
    from .data import read_manifest

    data = tstate.get("config", {}).get("data", {})
    root = data.get("path")
    if data.get("format") != "memory" and root and (Path(root) / "manifest.json").is_file():
        from .data.manifest import with_latent_stats

        return with_latent_stats(read_manifest(Path(root) / "manifest.json"), data.get("latent_stats", "measured"))
    return {}


def save_exported(model: MPDiT, out: str | Path, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"model_args": json.dumps(model.args.to_dict())}
    header.update({k: json.dumps(v) for k, v in meta.items()})
    # whole or not at all: a kill or a full disk mid-write leaves the previous file (or none), never a
    # truncated one that a later sampling job or warm start would fail on
    with atomic_path(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=header)
    return out


def load_directory_weights(path: Path, use_ema: bool = True) -> tuple[MPDiT, dict[str, Any], dict[str, Any]]:
    """:func:`load_checkpoint_weights` of a run directory (its newest intact checkpoint) or of a
    checkpoint directory, told apart by :func:`is_run_dir`."""
    run_dir = is_run_dir(path)
    return load_checkpoint_weights(run_dir=str(path) if run_dir else None, checkpoint=None if run_dir else str(path),
                                   use_ema=use_ema)


def load_exported(path: str | Path, attention: Optional[str] = None) -> tuple[MPDiT, dict[str, Any]]:
    """(model, metadata) of an exported file; ``attention`` as in :func:`load_checkpoint_weights`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except SafetensorError as exc:  # another kind of file named .safetensors, or a cut-short one
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if "model_args" not in header:
        raise ValueError(f"{path}: no model_args in the safetensors metadata (not written by mpdit_dist.export)")
    margs = json.loads(header["model_args"])
    margs["stages"] = tuple(tuple(s) for s in margs["stages"])
    margs["attention"] = inference_attention(margs.get("attention", "auto"), attention, f"the weights of {path}")
    model = MPDiT(ModelArgs(**margs))
    model.load_state_dict(load_file(str(path)))
    meta = {k: json.loads(v) for k, v in header.items() if k != "model_args"}
    return model, meta


def load_weights_into(model: MPDiT, source: str, manifest: Optional[dict[str, Any]] = None) -> None:
    """Warm start (``train.init_from``): weights only, from an export, an official checkpoint, a
    checkpoint directory or a run directory (its newest intact checkpoint; EMA weights from either),
    also of a run that is still training (see :func:`load_checkpoint_weights`). Every rank calls it.
    ``manifest``: the run's data manifest (with the statistics it standardises with): a warning where
    the weights were trained on latents standardised otherwise."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    trained_on: Optional[dict[str, Any]] = None  # the manifest the weights were trained with, where known
    if path.suffix == ".safetensors":
        other, meta = load_exported(path)
        trained_on = meta.get("manifest")
    elif path.is_dir():
        try:
            other, trained_on, info = load_directory_weights(path)
        except (CheckpointError, FileNotFoundError) as exc:
            raise type(exc)(f"train.init_from={source}: {exc}") from exc
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            log.info("train.init_from: the EMA weights of %s (step %s)", info["source"], info["step"])
    else:
        from .models.official import load_official, official_manifest

        other = load_official(path)
        trained_on = official_manifest(other.args)
    # input_size may differ (the positions are fixed tables, not weights: a 256 px model can start a
    # 512 px run); attention is a kernel choice
    differ = [f"{f}: {theirs!r} there, {ours!r} configured" for f, (ours, theirs)
              in model.args.differences(other.args, ignore=("attention", "input_size")).items()]
    if differ:
        raise ValueError(f"train.init_from={source}: the weights' architecture differs from the configured model: "
                         + "; ".join(differ))
    model.load_state_dict(other.state_dict())
    _warn_other_statistics(source, trained_on, manifest)


def _warn_other_statistics(source: str, theirs: Optional[dict[str, Any]], ours: Optional[dict[str, Any]]) -> None:
    """A warning (rank 0) where the warm-start weights learned on latents standardised with other
    per-channel statistics than this run uses (e.g. official weights, trained with the official
    constants, fine-tuned on a dataset's measured statistics: ``data.latent_stats=official`` fits)."""
    if not theirs or not ours or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    pairs = [(k, theirs.get(k), ours.get(k)) for k in ("latent_mean", "latent_std")]
    if any(a is None or b is None for _, a, b in pairs):
        return
    if all(len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-3) for x, y in zip(a, b))
           for _, a, b in pairs):
        return
    shown = "; ".join(f"{k} {[round(x, 4) for x in a]} there, {[round(x, 4) for x in b]} here" for k, a, b in pairs)
    log.warning("train.init_from=%s: the weights were trained on latents standardised with other statistics (%s, "
                "data.latent_stats picks this run's): the model starts on inputs of another scale than it learned",
                source, shown)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Export consolidated weights from a (sharded) checkpoint")
    ap.add_argument("source", help="a run directory (newest checkpoint) or a checkpoint directory step_*")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (default: the raw weights)")
    args = ap.parse_args(argv)
    # the suffix is how mpdit_dist.sample --checkpoint and train.init_from tell an export from the rest
    refuse_bad_output(ap, "--out", args.out, (".safetensors",))
    src = Path(args.source)
    if not src.exists():
        ap.error(f"{src} does not exist (give a run directory or a checkpoint directory step_*)")
    if not src.is_dir():
        ap.error(f"{src} is a file, not a run directory or a checkpoint directory (step_*); an official MPDiT "
                 "checkpoint converts with python -m mpdit_dist.models.official")
    try:
        model, manifest, info = load_directory_weights(src, use_ema=args.ema)
    except (CheckpointError, FileNotFoundError) as exc:  # what happened, named: no traceback to read through
        raise SystemExit(f"mpdit_dist.export: {exc}") from exc
    out = save_exported(model, args.out, {"manifest": manifest, "source": info["source"], "step": info["step"],
                                          "ema": args.ema, "config": info["config"]})
    print(f"exported {info['source']} (step {info['step']}, {'EMA' if args.ema else 'raw'} weights) -> {out}")


if __name__ == "__main__":
    main()
