"""Image -> latent encoders: ``identity`` (pixels) and a diffusers ``AutoencoderKL``.

Both take a float32 batch ``(N, 3, R, R)`` in [-1, 1] and return ``(center, std)`` as float32
numpy arrays ``(N, C, h, w)``; ``std`` is None when the encoder has no posterior (identity).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class IdentityEncoder:
    """Pixel space: the latent is the image itself in [-1, 1] (3 channels)."""

    kind = "identity"
    has_posterior = False
    scaling_factor = 1.0

    def __init__(self, resolution: int):
        self.latent_shape = [3, resolution, resolution]

    def describe(self) -> dict[str, Any]:
        return {"id": "identity", "type": "identity", "scaling_factor": 1.0}

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return images.numpy().astype(np.float32), None


class VAEEncoder:
    """A diffusers ``AutoencoderKL`` from a local directory or the local hub cache (no download)."""

    kind = "vae"
    has_posterior = True

    def __init__(self, spec: str, resolution: int, device: Optional[str] = None):
        from diffusers import AutoencoderKL

        self.spec = spec
        kwargs = {"local_files_only": True}
        path = Path(spec)
        if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"  # a full Stable Diffusion pipeline directory
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
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

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, Optional[np.ndarray]]:
        x = images.to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


def load_encoder(spec: str, resolution: int, device: Optional[str] = None):
    if spec == "identity":
        return IdentityEncoder(resolution)
    return VAEEncoder(spec, resolution, device)
