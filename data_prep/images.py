"""ImageFolder listing and the ADM centre crop.

The crop follows ADM / DiT / the official MPDiT code: halve with a BOX filter while the short side
is at least twice the target, resize with BICUBIC so the short side equals the target, then cut
the centre square. Written here (a dozen lines) because torchvision's transforms do the resize in
one step, which aliases large images differently from the reference pipeline.

Pixel depth: 8-bit modes are converted with PIL. 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``,
``I;16N``) keeps its top byte (``v >> 8``: 32768 -> 128, 65535 -> 255), where PIL's own
``convert`` would clip every value above 255 to white. ``I`` (32-bit integers; how PIL opens some
16-bit greyscale files) is read as 16-bit samples, so values must lie in [0, 65535]; ``F`` (32-bit
float) must lie in [0, 1] and becomes ``round(255 v)``. An image outside its mode's range is a bad
image (:class:`BadImage` naming the mode and the values), never clipped.
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


def _shown(name: str) -> str:
    """``name`` as text that JSON and terminals take: bytes that are not UTF-8 (which Python keeps as
    surrogate escapes) are written as ``\\xNN``; valid names are returned unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dir_id(path: Path) -> tuple[int, int]:
    st = path.stat()  # follows symlinks: the directory itself
    return st.st_dev, st.st_ino


def _walk_class(root: Path, cdir: Path) -> list[tuple[Path, str]]:
    """Every entry below ``cdir`` as (path, kind), in no particular order.

    Directory symlinks are followed, as torchvision's ImageFolder does (``os.walk(followlinks=True)``);
    a symlink to a directory that is already on the way down (an ancestor, the class folder or the
    root) would recurse for ever, so it is reported as kind ``loop`` instead of entered. Hidden
    entries and entries whose name is not valid UTF-8 are reported and not entered. Kinds: ``file``
    (a file or a broken symlink), ``hidden``, ``name`` / ``folder name`` (not UTF-8), ``loop``,
    ``special`` (a FIFO, socket or device: opening one could block for ever).
    """
    found: list[tuple[Path, str]] = []
    stack = [(cdir, frozenset({_dir_id(root), _dir_id(cdir)}))]
    while stack:
        d, ancestors = stack.pop()
        try:
            with os.scandir(d) as it:
                names = [e.name for e in it]
        except OSError as exc:
            what = "class folder" if d == cdir else "folder"
            raise PermissionError(f"{what} {_shown(str(d))}: cannot list ({exc})") from None
        for name in names:
            p = d / name
            if name.startswith("."):
                found.append((p, "hidden"))
            elif not _is_utf8(name):
                found.append((p, "folder name" if p.is_dir() else "name"))
            elif p.is_dir():  # follows symlinks
                key = _dir_id(p)
                if key in ancestors:
                    found.append((p, "loop"))
                else:
                    stack.append((p, ancestors | {key}))
            elif p.is_file() or (p.is_symlink() and not p.exists()):
                found.append((p, "file"))  # a broken symlink fails in load_image, counted with the bad images
            else:
                found.append((p, "special"))
    return found


_SKIP_REASONS = {"hidden": "hidden", "name": "file name is not valid UTF-8",
                 "folder name": "folder name is not valid UTF-8 (its files are not listed)",
                 "special": "not a regular file (FIFO, socket or device)"}


def list_image_folder(root: str | os.PathLike,
                      skipped: list[dict[str, str]] | None = None) -> tuple[list[str], list[ImageEntry]]:
    """Class names (sorted folder names) and every file below them, sorted, numbered.

    Every non-hidden regular file or symlink below a class folder counts as an image candidate, so
    that a stray non-image file or a broken symlink is reported as a failure instead of silently
    ignored. Symlinked subfolders are followed (as torchvision's ImageFolder does); a symlink back
    to a folder above it is not entered. What belongs to no class (files at the root, hidden files
    and folders), symlink loops, names that are not valid UTF-8 (shown with ``\\xNN`` escapes) and
    FIFOs, sockets or devices are appended to ``skipped`` as ``{"path", "reason"}`` for the caller to
    count and report. The order is that of ``sorted()`` on the paths, as it always was.
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
    bad_class = [c for c in classes if not _is_utf8(c)]
    if bad_class:
        raise ValueError(f"--images {root}: class folder {_shown(bad_class[0])!r} has a name that is not valid "
                         f"UTF-8 ({len(bad_class)} such folders); rename it (class names are stored as text)")
    for p in top:
        if p.name.startswith("."):
            skipped.append({"path": _shown(p.name), "reason": "hidden"})
        elif not p.is_dir():
            skipped.append({"path": _shown(p.name), "reason": "not in a class folder"})
    if not classes:
        raise ValueError(f"--images {root}: no class folders (expected ImageFolder layout root/<class>/<image>)")
    entries: list[ImageEntry] = []
    for label, name in enumerate(classes):
        cdir = root / name
        files = []
        for p, kind in sorted(_walk_class(root, cdir)):
            if kind == "file":
                files.append(p)
            elif kind == "loop":
                target = f"symlink to {_shown(os.readlink(p))}" if p.is_symlink() else "mount"
                skipped.append({"path": p.relative_to(root).as_posix(),
                                "reason": f"folder loop ({target}, a folder above it): not followed"})
            else:
                skipped.append({"path": _shown(p.relative_to(root).as_posix()), "reason": _SKIP_REASONS[kind]})
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


class UnsupportedPixels(ValueError):
    """Pixel values outside the range documented for their mode (see the module docstring)."""


_HIGH_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB; 16-bit, ``I`` and ``F`` images are scaled, never clipped (module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_GREY or img.mode == "I":
        a = np.asarray(img)  # uint16 (either byte order) or int32, in the file's own values
        if img.mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise UnsupportedPixels(f"mode 'I' (32-bit integer) pixels range over [{int(a.min())}, {int(a.max())}]; "
                                    f"only 16-bit values [0, 65535] are understood (save it as 8 or 16 bits)")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all() or (a.size and (float(a.min()) < 0.0 or float(a.max()) > 1.0)):
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            raise UnsupportedPixels(f"mode 'F' (32-bit float) pixels range over [{lo:g}, {hi:g}]"
                                    f"{'' if np.isfinite(a).all() else ' with NaN or inf'}; only [0, 1] is understood")
        return Image.fromarray(np.rint(a * 255.0).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # as PIL advises for palette images with transparency
    return img.convert("RGB")  # L, P, CMYK, RGBA (alpha dropped, as ADM does), LA, 1, YCbCr, ...


# Beyond this aspect ratio the full-size bicubic resize is replaced by one that computes only the
# centre square (see center_crop_arr); ordinary photos never come near it.
EXTREME_ASPECT = 16


def center_crop_arr(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop to ``resolution`` x ``resolution``; returns uint8 (H, W, 3).

    Below an aspect ratio of ``EXTREME_ASPECT`` (after the BOX halving) this is ADM's code exactly:
    resize the whole image, then cut the centre. A thin strip would first be resized to
    ``resolution`` x ``resolution * aspect`` (a 1 x 4000 strip at 256 px: 786 MB), so beyond that
    ratio only the centre square is resampled (PIL's ``resize(box=...)``: the same source window,
    scale and filter). Its pixels can differ from the full resize's by a few levels on photographs,
    because PIL rounds its intermediate 8-bit pass differently; no ordinary image takes this path.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    full = tuple(round(s * scale) for s in img.size)
    if max(full) > EXTREME_ASPECT * resolution:
        (w, h), (fw, fh) = img.size, full
        left, top = (fw - resolution) // 2, (fh - resolution) // 2
        box = (left * w / fw, top * h / fh, (left + resolution) * w / fw, (top + resolution) * h / fh)
        return np.ascontiguousarray(np.asarray(img.resize((resolution, resolution), resample=Image.BICUBIC, box=box)))
    img = img.resize(full, resample=Image.BICUBIC)
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
    except UnsupportedPixels as exc:
        raise BadImage(entry.relpath, str(exc)) from None
    except UnidentifiedImageError:
        raise BadImage(entry.relpath, "not an image (unidentified format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(entry.relpath, f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(entry.relpath, f"unreadable image: {exc}") from None
