"""Small ImageFolders and a tiny VAE built from what ships with installed packages (no downloads).

* :func:`write_digits_image_folder`: sklearn's 8x8 digits as PNGs, one folder per digit (the demo).
* :func:`write_test_image_folder`: sklearn's two sample photos cut into crops saved in many
  modes (RGB JPEG, L, P, CMYK, RGBA, ...) plus a truncated JPEG, an empty file and a text file.
* :func:`save_tiny_vae`: a randomly initialised diffusers ``AutoencoderKL`` saved with ``save_pretrained``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_image_folder(out: str | os.PathLike, size: int = 16, limit: int | None = None) -> Path:
    """sklearn digits (1797 images, 10 classes) upscaled to ``size`` and saved as PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    n = len(digits.images) if limit is None else min(limit, len(digits.images))
    for i in range(n):
        label = int(digits.target[i])
        d = out / f"digit_{label}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        if size != img.width:
            img = img.resize((size, size), Image.NEAREST)
        img.save(d / f"{i:05d}.png")
    return out


def write_test_image_folder(out: str | os.PathLike, per_class: int = 6) -> tuple[Path, dict[str, str]]:
    """Two classes ('china', 'flower') of photo crops in assorted modes, and some bad files.

    Returns the root and ``{relative path: expected failure kind}`` for the bad files.
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two RGB uint8 photos, 427 x 640
    out = Path(out)
    modes = ["RGB", "L", "P", "CMYK", "RGBA", "RGB"]
    for cname, photo in zip(("china", "flower"), photos):
        d = out / cname
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            # crops of varied size and aspect, so the BOX halving and the centre crop both act
            h, w = 100 + 37 * j, 150 + 29 * j
            y0, x0 = (17 * j) % (photo.shape[0] - h), (41 * j) % (photo.shape[1] - w)
            img = Image.fromarray(photo[y0:y0 + h, x0:x0 + w])
            mode = modes[j % len(modes)]
            img = img.convert(mode)
            ext = "jpg" if mode in ("RGB", "L", "CMYK") else "png"
            img.save(d / f"img_{j:02d}_{mode.lower()}.{ext}")
    bad = {}
    # a truncated JPEG: the first half of a valid one
    full = out / "china" / "img_00_rgb.jpg"
    data = full.read_bytes()
    (out / "china" / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    bad["china/zz_truncated.jpg"] = "unreadable"
    (out / "flower" / "zz_empty.jpg").write_bytes(b"")
    bad["flower/zz_empty.jpg"] = "empty"
    (out / "flower" / "zz_notes.txt").write_text("not an image\n")
    bad["flower/zz_notes.txt"] = "not an image"
    return out, bad


def save_tiny_vae(out: str | os.PathLike, seed: int = 0) -> Path:
    """A random 2-level AutoencoderKL (downsampling 2, 4 latent channels), a few KB on disk."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16)
    vae.save_pretrained(out)
    return Path(out)
