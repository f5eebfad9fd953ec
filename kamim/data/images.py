"""Robust image file loading.

`load_rgb` turns any image file Pillow can decode into an 8-bit RGB `PIL.Image`:

* grayscale (``1``, ``L``) is replicated to three channels;
* alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, palette or grayscale/RGB with a ``transparency``
  entry) is **composited on black**: ``rgb * alpha / 255`` (opaque pixels are unchanged,
  fully transparent pixels become black);
* 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer (``I``, assumed to
  hold 16-bit data) are scaled with ``round(v * 255 / 65535)``, not clipped at 255; 32-bit float
  (``F``) must lie in [0, 1] and is scaled by 255. Values outside those ranges are an error
  rather than a silent guess;
* CMYK, YCbCr, LAB and HSV go through Pillow's converters;
* the EXIF orientation tag is applied (phone photographs come out upright).

A file that cannot be decoded (corrupt, truncated, not an image) raises `ImageLoadError` with a
one-line message naming the file. Truncation detection relies on Pillow's default
``ImageFile.LOAD_TRUNCATED_IMAGES = False``; code that flips that global flag gets gray-padded
images instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMG_EXTENSIONS", "ImageLoadError", "ensure_rgb", "find_images", "load_rgb"]

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(OSError):
    """An image file that exists but cannot be decoded.

    ``str(err)`` is one line naming the file; ``err.path`` and ``err.reason`` hold the parts.
    Constructible from a single message too, so that it survives pickling and being re-raised by
    ``torch.utils.data`` worker processes with its type intact.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str | None = None) -> None:
        self.path = path
        self.reason = reason
        message = str(path) if reason is None else f"cannot load image '{path}': {reason}"
        super().__init__(message)

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers)
        return type(self), (self.path, self.reason)


def _scale_to_uint8(arr: np.ndarray, max_value: float, mode: str) -> np.ndarray:
    """Linearly map [0, max_value] to [0, 255] with rounding; out-of-range values are an error."""
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > max_value:
        raise ValueError(f"mode {mode} pixel values span [{lo:g}, {hi:g}], expected [0, {max_value:g}]")
    if np.issubdtype(arr.dtype, np.integer):
        # exact integer rounding of v * 255 / max_value
        m = int(max_value)
        return ((arr.astype(np.int64) * 255 + m // 2) // m).astype(np.uint8)
    return np.rint(arr.astype(np.float64) * (255.0 / max_value)).astype(np.uint8)


def ensure_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit ``RGB`` (see module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _UINT16_MODES or mode == "I":
        # Pillow's convert("L") clips 16-bit values at 255; scale the full range instead.
        arr = np.asarray(img)
        gray = _scale_to_uint8(arr, 65535, mode)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")
    if mode == "F":
        gray = _scale_to_uint8(np.asarray(img), 1.0, mode)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")
    if mode in ("P", "L", "1", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB `PIL.Image`.

    Raises `FileNotFoundError` if the file does not exist and `ImageLoadError` (one line, naming
    the file) if it cannot be decoded or converted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: '{path}'")
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode here: truncation surfaces now, not in a transform
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            rgb = ensure_rgb(im)
            if rgb is im:
                rgb = im.copy()  # detach from the file handle closed by the context manager
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError,
        # ValueError, struct.error, zlib.error, EOFError, DecompressionBombError...; all mean
        # "this file cannot be used", which callers handle uniformly.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageLoadError(path, f"{type(err).__name__}: {reason}") from err
    return rgb


def find_images(root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursive, extension match case-insensitive), sorted.

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks or
    ``.ipynb_checkpoints``) are skipped. A missing folder or one without images raises
    `FileNotFoundError` naming the folder.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: '{root}'")
    if not root.is_dir():
        raise NotADirectoryError(f"expected an image folder, got a file: '{root}'")
    exts = tuple(e.lower() for e in extensions)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath) / f for f in filenames
            if not f.startswith(".") and f.lower().endswith(exts)
        )
    if not found:
        raise FileNotFoundError(
            f"no image files ({', '.join(e.lstrip('.') for e in exts)}) found under '{root}'"
        )
    return sorted(found, key=lambda p: p.as_posix())
