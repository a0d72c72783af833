"""ImageFolder listing and the ADM centre crop.

The crop follows ADM / DiT / the official MPDiT code: halve with a BOX filter while the short side
is at least twice the target, resize with BICUBIC so the short side equals the target, then cut
the centre square. Written here (a dozen lines) because torchvision's transforms do the resize in
one step, which aliases large images differently from the reference pipeline.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# a truncated file must fail loudly, never be padded with grey
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An input image that cannot be used; ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageEntry:
    index: int  # position in the sorted listing (the sample key)
    relpath: str  # relative to the ImageFolder root, '/'-separated
    label: int
    size: int  # bytes


def list_image_folder(root: str | os.PathLike,
                      skipped: list[dict[str, str]] | None = None) -> tuple[list[str], list[ImageEntry]]:
    """Class names (sorted folder names) and every file below them, sorted, numbered.

    Every non-hidden regular file or symlink below a class folder counts as an image candidate, so
    that a stray non-image file or a broken symlink is reported as a failure instead of silently
    ignored. What belongs to no class (files at the root, hidden files and folders) is appended to
    ``skipped`` as ``{"path", "reason"}`` for the caller to count and report.
    """
    root = Path(root)
    skipped = [] if skipped is None else skipped
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise PermissionError(f"--images {root}: not readable")
    try:
        top = sorted(root.iterdir())
    except OSError as exc:
        raise PermissionError(f"--images {root}: cannot list ({exc})") from None
    classes = [d.name for d in top if d.is_dir() and not d.name.startswith(".")]
    for p in top:
        if p.name.startswith("."):
            skipped.append({"path": p.name, "reason": "hidden"})
        elif not p.is_dir():
            skipped.append({"path": p.name, "reason": "not in a class folder"})
    if not classes:
        raise ValueError(f"--images {root}: no class folders (expected ImageFolder layout root/<class>/<image>)")
    entries: list[ImageEntry] = []
    for label, name in enumerate(classes):
        cdir = root / name
        files = []
        try:
            for p in sorted(cdir.rglob("*")):
                rel = p.relative_to(cdir).parts
                hidden = [i for i, part in enumerate(rel) if part.startswith(".")]
                if hidden:
                    if hidden[0] == len(rel) - 1:  # report the hidden entry itself, not all below it
                        skipped.append({"path": p.relative_to(root).as_posix(), "reason": "hidden"})
                elif p.is_symlink() and not p.exists():
                    files.append(p)  # a broken symlink: fails in load_image, counted with the bad images
                elif p.is_file():
                    files.append(p)
        except OSError as exc:
            raise PermissionError(f"class folder {cdir}: cannot list ({exc})") from None
        if not files:
            raise ValueError(f"class folder {cdir}: holds no images")
        for p in files:
            size = p.stat().st_size if p.exists() else -1
            entries.append(ImageEntry(len(entries), p.relative_to(root).as_posix(), label, size))
    return classes, entries


def listing_sha256(classes: list[str], entries: list[ImageEntry]) -> str:
    """Fingerprint of the input (class names, relative paths, sizes) for the config check."""
    h = hashlib.sha256()
    h.update("\n".join(classes).encode())
    for e in entries:
        h.update(f"\n{e.relpath}\t{e.size}".encode())
    return h.hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # as PIL advises for palette images with transparency
    return img.convert("RGB")  # L, P, CMYK, RGBA (alpha dropped, as ADM does), I;16, ...


def center_crop_arr(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop to ``resolution`` x ``resolution``; returns uint8 (H, W, 3)."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top:top + resolution, left:left + resolution])


def load_image(root: str | os.PathLike, entry: ImageEntry, resolution: int) -> np.ndarray:
    """Decode, convert to RGB and crop one image; raises :class:`BadImage` with the reason."""
    path = Path(root) / entry.relpath
    try:
        if path.is_symlink() and not path.exists():
            raise BadImage(entry.relpath, f"broken symlink (to {os.readlink(path)})")
        if path.stat().st_size == 0:
            raise BadImage(entry.relpath, "empty file")
        with Image.open(path) as img:
            img.load()  # decode now: truncation shows up here
            rgb = to_rgb(img)
            return center_crop_arr(rgb, resolution)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(entry.relpath, "not an image (unidentified format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(entry.relpath, f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(entry.relpath, f"unreadable image: {exc}") from None
