"""Load checkpoints of the official MPDiT code (github quandao10/MPDiT) into our model.

The official train.py saves ``{"model": ..., "ema": ..., "opt": ..., "args": ...}``; a bare state
dict works too. The architecture (one or two upsampling levels, width, patch sizes, depths,
classes, class tokens, time embedding) is inferred from tensor shapes; the head count, which
shapes do not reveal, comes from the matching named config or ``num_heads``.

CLI: ``python -m mpdit_dist.models.official CKPT.pt --out FILE.safetensors [--num-heads H] [--no-ema]
[--vae PATH]`` writes the format of ``mpdit_dist.export``: the weights, the architecture and a data
manifest with the official latent statistics, so ``mpdit_dist.sample --checkpoint FILE`` and
``train.init_from=FILE`` take it as they take our own exports. A checkpoint without ``ema`` gives
its raw weights, with a warning; the metadata's ``ema`` and ``checkpoint_key`` say which were taken.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .mpdit import MODEL_CONFIGS, MPDiT, ModelArgs

log = logging.getLogger(__name__)

# official prefix -> our prefix, per layout
_V1_MAP = {
    "x_embedder.": "stages.0.patch_embed.",
    "downsample_blocks.": "stages.0.blocks.",
    "upsampler.": "stages.1.upsampler.",
    "x_embedder_skip.": "stages.1.skip_embed.",
    "linear_skip.": "stages.1.skip_proj.",
    "upsample_blocks.": "stages.1.blocks.",
}
_V2_MAP = {
    "x_embedder.": "stages.0.patch_embed.",
    "downsample_blocks.": "stages.0.blocks.",
    "upsampler_lvl1.": "stages.1.upsampler.",
    "x_embedder_lvl1.": "stages.1.skip_embed.",
    "linear_skip_lvl1.": "stages.1.skip_proj.",
    "upsample_blocks_lvl1.": "stages.1.blocks.",
    "upsampler_lvl2.": "stages.2.upsampler.",
    "x_embedder_lvl2.": "stages.2.skip_embed.",
    "linear_skip_lvl2.": "stages.2.skip_proj.",
    "upsample_blocks_lvl2.": "stages.2.blocks.",
}
_SHARED = ("t_embedder.", "y_embedder.", "time_modulation.", "final_layer.")
# fixed sin-cos tables: rebuilt by our model, compared on load
_POSITION_KEYS = ("pos_embed", "pos_embed_downsampled", "pos_embed_lvl1", "pos_embed_lvl2")


class OfficialCheckpointError(ValueError):
    pass


def _extract_state_dict(obj: Any, use_ema: bool,
                        source: str = "the checkpoint") -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """(state dict, the key it was taken from: ``"ema"``, ``"model"``, or None for a bare state dict).

    Without ``"ema"`` the raw ``"model"`` weights are taken, with a warning: they are not what
    ``use_ema`` asked for, and the caller records which weights were used."""
    key = None
    if isinstance(obj, Mapping) and ("model" in obj or "ema" in obj):
        key = "ema" if use_ema else "model"
        if key not in obj:
            if not use_ema:
                raise OfficialCheckpointError(
                    f"{source} has no raw 'model' weights (only 'ema'): convert it without --no-ema / use_ema=False"
                )
            log.warning("%s has no 'ema' weights (keys: %s): converting the raw 'model' weights instead",
                        source, sorted(str(k) for k in obj))
            key = "model"
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialCheckpointError(f"{source} is not an official MPDiT checkpoint: expected a state dict or "
                                      "{'model', 'ema'}")
    sd = {k: v for k, v in obj.items()}
    # accelerate / torch.compile wrappers prefix the names
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, key


def _depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def infer_args(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None, input_size: Optional[int] = None) -> ModelArgs:
    """Architecture of an official state dict, from names and shapes."""
    required = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "time_modulation.1.weight",
                "final_layer.linear.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise OfficialCheckpointError(
            f"state dict matches no MPDiT architecture: missing {missing}; it has e.g. {sorted(sd)[:8]}"
        )
    two_level = "upsampler_lvl1.proj.weight" in sd
    one_level = "upsampler.proj.weight" in sd
    if not (one_level or two_level):
        raise OfficialCheckpointError(
            "state dict matches no MPDiT architecture: neither 'upsampler.proj.weight' (MPDiT) nor "
            "'upsampler_lvl1.proj.weight' (MPDiTv2) is present"
        )
    w = sd["x_embedder.proj.weight"]
    d, c, p0 = w.shape[0], w.shape[1], w.shape[2]
    table = sd["y_embedder.embedding_table.weight"]
    num_classes = table.shape[0] - 1
    if table.shape[1] % d:
        raise OfficialCheckpointError(f"y_embedder.embedding_table has width {table.shape[1]}, not a multiple of {d}")
    k = table.shape[1] // d
    final_out = sd["final_layer.linear.weight"].shape[0]
    p_last = int(round((final_out / c) ** 0.5))
    if p_last * p_last * c != final_out:
        raise OfficialCheckpointError(f"final_layer.linear.weight has {final_out} outputs, not p*p*{c}")
    time_embed = "fno" if "t_embedder.fc0.weight" in sd else "mlp"
    if two_level:
        f1 = int(round((sd["upsampler_lvl1.proj.weight"].shape[0] / d) ** 0.5))
        f2 = int(round((sd["upsampler_lvl2.proj.weight"].shape[0] / d) ** 0.5))
        patches = [p0, p0 // f1, p0 // f1 // f2]
        depths = [_depth(sd, "downsample_blocks."), _depth(sd, "upsample_blocks_lvl1."), _depth(sd, "upsample_blocks_lvl2.")]
        skip = "x_embedder_lvl1.proj.weight" in sd
        pos_key = "pos_embed_lvl2"
    else:
        f = int(round((sd["upsampler.proj.weight"].shape[0] / d) ** 0.5))
        patches = [p0, p0 // f]
        depths = [_depth(sd, "downsample_blocks."), _depth(sd, "upsample_blocks.")]
        skip = "x_embedder_skip.proj.weight" in sd
        pos_key = "pos_embed"
    if patches[-1] != p_last:
        raise OfficialCheckpointError(
            f"inconsistent patch sizes: upsamplers give {patches}, final layer patch {p_last}"
        )
    if input_size is None:
        if pos_key not in sd:
            raise OfficialCheckpointError(f"cannot infer the latent size: {pos_key!r} missing; pass input_size")
        input_size = int(round(sd[pos_key].shape[1] ** 0.5)) * p_last
    mlp_hidden = sd["downsample_blocks.0.mlp.fc1.weight"].shape[0] if "downsample_blocks.0.mlp.fc1.weight" in sd else 4 * d
    stages = tuple(zip(patches, depths))
    if num_heads is None:
        for name, cfg in MODEL_CONFIGS.items():
            if cfg["hidden_size"] == d and tuple(cfg["stages"]) == stages:
                num_heads = cfg["num_heads"]
                break
        else:
            raise OfficialCheckpointError(
                f"architecture stages={stages}, width {d} matches no named config; pass num_heads"
            )
    return ModelArgs(
        stages=stages, hidden_size=d, num_heads=num_heads, mlp_ratio=mlp_hidden / d, input_size=input_size,
        in_channels=c, num_classes=num_classes, num_condition_tokens=k, time_embed=time_embed,
        skip_connection=skip,
    )


def convert_state_dict(sd: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename official tensors to ours (positions dropped: our model rebuilds them)."""
    mapping = _V2_MAP if len(args.stages) == 3 else _V1_MAP
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _POSITION_KEYS:
            continue
        if key.startswith(_SHARED):
            out[key] = value
            continue
        for src, dst in mapping.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(f"unexpected tensors in the official state dict: {unknown[:10]}")
    return out


def load_official(
    path_or_state_dict: str | Path | Mapping[str, Any],
    num_heads: Optional[int] = None,
    use_ema: bool = True,
    input_size: Optional[int] = None,
    attention: str = "auto",
) -> MPDiT:
    """Our ``MPDiT`` with the weights of an official checkpoint (EMA weights by default; the raw
    weights, with a warning, where the checkpoint holds no EMA)."""
    return load_official_with_source(path_or_state_dict, num_heads, use_ema, input_size, attention)[0]


def load_official_with_source(
    path_or_state_dict: str | Path | Mapping[str, Any],
    num_heads: Optional[int] = None,
    use_ema: bool = True,
    input_size: Optional[int] = None,
    attention: str = "auto",
) -> tuple[MPDiT, Optional[str]]:
    """:func:`load_official`, and which weights were taken: ``"ema"``, ``"model"`` (raw), or None
    for a bare state dict (which does not say)."""
    source = "the official state dict"
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict)
        if path.is_dir():
            raise OfficialCheckpointError(f"{path} is a directory, not an official checkpoint file (.pt); a run or "
                                          "checkpoint directory of ours exports with python -m mpdit_dist.export")
        if not path.is_file():
            raise FileNotFoundError(f"official checkpoint not found: {path}")
        source = str(path)
        # weights_only: a checkpoint from elsewhere cannot run code; argparse.Namespace is allowed
        import argparse as _argparse
        import pickle

        try:
            with torch.serialization.safe_globals([_argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # an .npz, a truncated file, ...
            raise OfficialCheckpointError(f"{path} cannot be read as a PyTorch checkpoint "
                                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    else:
        obj = path_or_state_dict
    sd, key = _extract_state_dict(obj, use_ema, source)
    args = infer_args(sd, num_heads=num_heads, input_size=input_size)
    from dataclasses import replace

    args = replace(args, attention=attention)
    model = MPDiT(args)
    ours = convert_state_dict(sd, args)
    result = model.load_state_dict(ours, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise OfficialCheckpointError(
            f"state dict does not fit the inferred architecture {args}: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    _check_positions(sd, model)
    return model, key


def _check_positions(sd: Mapping[str, torch.Tensor], model: MPDiT) -> None:
    """The official fixed sin-cos tables must equal the ones our model builds."""
    names = {"pos_embed_downsampled": 0, "pos_embed_lvl1": 1, "pos_embed_lvl2": 2}
    last = len(model.stages) - 1
    for key, value in sd.items():
        if key not in _POSITION_KEYS:
            continue
        if key == "pos_embed":
            stage = 0 if len(model.stages) == 3 else last
        else:
            stage = names[key]
        ours = model.stages[stage].pos_embed
        if ours.shape != value.shape or not torch.allclose(ours, value.float(), atol=1e-5):
            raise OfficialCheckpointError(f"{key}: positions differ from the sin-cos table of stage {stage}")


# The official code trains on raw SD-VAE latents standardised per channel with fixed ImageNet
# statistics (data.latent_stats=official; the constants live with the other manifest code)
from ..data.manifest import OFFICIAL_LATENT_MEAN, OFFICIAL_LATENT_STD, OFFICIAL_STATS_SOURCE  # noqa: E402


def official_manifest(args: ModelArgs, vae: str = "stabilityai/sd-vae-ft-ema") -> dict[str, Any]:
    """The data manifest an official model was trained with, for sampling: the VAE (a local
    directory or a model in the local Hugging Face cache) and the latent statistics."""
    return {
        "encoder": {"id": vae, "type": "AutoencoderKL", "scaling_factor": 0.18215},
        "latent_shape": [args.in_channels, args.input_size, args.input_size],
        "latent_mean": list(OFFICIAL_LATENT_MEAN),
        "latent_std": list(OFFICIAL_LATENT_STD),
        "latent_stats_source": OFFICIAL_STATS_SOURCE,
        "num_classes": args.num_classes,
    }


def main(argv: Optional[list[str]] = None) -> None:
    from ..config import refuse_bad_output, refuse_below_one
    from ..export import save_exported

    ap = argparse.ArgumentParser(description="Convert an official MPDiT checkpoint into our exported format")
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True, help="output .safetensors (a directory gets model.safetensors)")
    ap.add_argument("--num-heads", type=int, default=None)
    ap.add_argument("--no-ema", action="store_true", help="take the raw weights instead of the EMA")
    ap.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                    help="the VAE to decode samples with: a local directory or a model id in the local HF cache")
    args = ap.parse_args(argv)
    refuse_below_one(ap, (("--num-heads", args.num_heads),))
    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out / "model.safetensors"
    refuse_bad_output(ap, "--out", out)
    try:
        model, weights = load_official_with_source(args.checkpoint, num_heads=args.num_heads,
                                                   use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as exc:  # OfficialCheckpointError among them: named, no traceback
        raise SystemExit(f"mpdit_dist.models.official: {exc}") from exc
    # the official latents are standardised with OFFICIAL_LATENT_MEAN/STD: data.normalize=true
    # "ema": the weights actually taken (false where a checkpoint without EMA gave its raw weights;
    # null for a bare state dict, which does not say); "checkpoint_key": the entry they came from.
    # "train": mpdit_dist.sample's defaults for this file, the official sample.py's argparse defaults:
    # CFG 1.5 and --num_sampling_steps 250, which its Euler sampler takes as 249 steps
    # (docs/evaluation.md); its paper rows use the settings of its script/sample.sh (README)
    meta = {"manifest": official_manifest(model.args, args.vae), "source": str(args.checkpoint),
            "ema": None if weights is None else weights == "ema", "checkpoint_key": weights,
            "config": {"data": {"normalize": True, "latent_stats": "official"},
                       "train": {"sample_cfg_scale": 1.5, "sample_steps": 249}}}
    path = save_exported(model, out, meta)
    n = sum(p.numel() for p in model.parameters())
    kind = {"ema": "EMA", "model": "raw"}.get(weights or "", "bare state dict")
    print(f"converted {args.checkpoint} ({kind} weights): {model.args.stages}, width {model.args.hidden_size}, "
          f"{n:,} parameters -> {path}")


if __name__ == "__main__":
    main()
