"""Image -> latent encoders: ``identity`` (pixels) and a diffusers ``AutoencoderKL``.

Both take a float32 batch ``(N, 3, R, R)`` in [-1, 1] and return ``(center, std)`` as float32
numpy arrays ``(N, C, h, w)``; ``std`` is None when the encoder has no posterior (identity).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch


def pick_device(device: Optional[str], environ: Mapping[str, str], cuda_available: bool, device_count: int) -> str:
    """The device one encode process uses.

    An explicit device with an index (``cuda:3``, ``cpu``) is used as given. Otherwise, with CUDA,
    each process of a node takes its own GPU, ``cuda:{local rank % device_count}``, as the trainer
    does: the local rank is torchrun's ``LOCAL_RANK``, else ``SLURM_LOCALID`` for a task of an
    ``srun`` step, else 0 (a plain ``cuda`` would put every process of ``torchrun --nproc_per_node 8``
    on GPU 0). ``--device cuda`` without an index is read the same way.
    """
    if device and device != "cuda":
        return device
    if not cuda_available:
        if device == "cuda":
            raise ValueError("--device cuda: no CUDA device is available")
        return "cpu"
    from mpdit_dist.distributed.env import slurm_step_task

    name = "LOCAL_RANK" if "LOCAL_RANK" in environ else (
        "SLURM_LOCALID" if "SLURM_LOCALID" in environ and slurm_step_task(environ) else None)
    local = 0
    if name is not None:
        try:
            local = int(environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None
        if local < 0:
            raise ValueError(f"environment variable {name}={local} is negative")
    return f"cuda:{local % max(device_count, 1)}"


class IdentityEncoder:
    """Pixel space: the latent is the image itself in [-1, 1] (3 channels)."""

    kind = "identity"
    has_posterior = False
    scaling_factor = 1.0

    def __init__(self, resolution: int):
        self.latent_shape = [3, resolution, resolution]

    def describe(self) -> dict[str, Any]:
        return {"id": "identity", "type": "identity", "scaling_factor": 1.0}

    def weights_sha256(self) -> Optional[str]:
        return None  # no weights

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return images.numpy().astype(np.float32), None


# --vae-dtype: fp32 by default, as the official code extracts its features (a one-time cost)
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the flag value of a dtype as describe() records it (encode_config.json: "float32", ...)
DTYPE_FLAGS = {str(v).replace("torch.", ""): k for k, v in VAE_DTYPES.items()}


class VAEEncoder:
    """A diffusers ``AutoencoderKL`` from a local directory or the local hub cache (no download)."""

    kind = "vae"
    has_posterior = True

    def __init__(self, spec: str, resolution: int, device: Optional[str] = None, dtype: str = "fp32"):
        """``dtype``: the VAE's weights and compute, ``fp32`` (the official feature extraction's, and the
        default), ``bf16`` or ``fp16`` (faster on a GPU; the latents move by about their rounding)."""
        from diffusers import AutoencoderKL

        self.spec = spec
        kwargs = {"local_files_only": True}
        path = Path(spec)
        if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"  # a full Stable Diffusion pipeline directory
        available = torch.cuda.is_available()
        self.device = torch.device(pick_device(device, os.environ, available,
                                               torch.cuda.device_count() if available else 0))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this process's GPU also for what torch allocates implicitly
        if dtype not in VAE_DTYPES:
            raise ValueError(f"--vae-dtype {dtype!r}: choose one of {list(VAE_DTYPES)}")
        self.dtype = VAE_DTYPES[dtype]
        try:
            vae = AutoencoderKL.from_pretrained(spec, torch_dtype=self.dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"--vae {spec!r}: no AutoencoderKL found locally (a directory saved with save_pretrained, or a "
                f"model already in the Hugging Face cache; downloads are disabled): {exc}") from None
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        cfg = vae.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        if resolution % down:
            raise ValueError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {down}")
        self.latent_shape = [int(cfg.latent_channels), resolution // down, resolution // down]
        # diffusers' default (SD 1.x VAEs) unless the model's config says otherwise
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 0.18215)
        self.config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
                       if k in ("latent_channels", "block_out_channels", "sample_size", "in_channels",
                                "shift_factor", "_name_or_path")}

    def describe(self) -> dict[str, Any]:
        return {"id": self.spec, "type": "AutoencoderKL", "scaling_factor": self.scaling_factor,
                "config": self.config, "dtype": str(self.dtype).replace("torch.", "")}

    def weights_sha256(self) -> str:
        """The same ``--vae`` path or id holding other weights (a directory overwritten, a newer cache
        snapshot) gives another digest."""
        from mpdit_dist.export import weights_sha256

        return weights_sha256(self.vae)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, Optional[np.ndarray]]:
        x = images.to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


def load_encoder(spec: str, resolution: int, device: Optional[str] = None, dtype: str = "fp32"):
    if spec == "identity":
        return IdentityEncoder(resolution)
    return VAEEncoder(spec, resolution, device, dtype)
