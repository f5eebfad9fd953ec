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

A file that cannot be decoded (corrupt, truncated, not an image) or is not a readable regular
file (missing, a dangling symlink, a FIFO, socket or directory, permission denied) raises
`ImageLoadError` with a one-line message naming the file; a FIFO is recognised by ``stat`` and
never opened (that would block). A GIF yields its first frame.

`find_images` follows symlinks but lists each folder and each real file once, and reports what it
skips (symlink loops, unreadable folders and entries, formats kamim does not read) in one warning
per kind instead of silently. Truncation detection relies on Pillow's default
``ImageFile.LOAD_TRUNCATED_IMAGES = False``; code that flips that global flag gets gray-padded
images instead.
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMG_EXTENSIONS", "ImageLoadError", "ensure_rgb", "find_images", "load_rgb"]

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif",
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


class _MissingImageError(ImageLoadError, FileNotFoundError):
    """An image path that does not exist (or a dangling symlink): also a `FileNotFoundError`."""


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _os_reason(err: OSError) -> str:
    """``err`` as a short reason without the path (which the message names already)."""
    return err.strerror or (str(err).splitlines()[0] if str(err) else type(err).__name__)


def _check_regular(path: Path) -> None:
    """Raise `ImageLoadError` unless ``path`` is (a symlink to) a readable regular file.

    Only ``stat`` is used: a FIFO is never opened (opening one for reading blocks).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            reason = f"dangling symlink to '{os.readlink(path)}'"
        except OSError:  # not a symlink (or gone meanwhile)
            reason = "file not found"
        raise _MissingImageError(path, reason) from None
    except OSError as err:  # permission denied on a parent, symlink loop, I/O error
        raise ImageLoadError(path, _os_reason(err)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(st.st_mode)), "a special file")
        raise ImageLoadError(path, f"not a regular file ({kind})")


def load_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB `PIL.Image` (a GIF: its first frame).

    Raises `ImageLoadError` (one line, naming the file) for anything that is not a decodable
    regular file: corrupt or truncated data, permission denied, a FIFO, socket or directory
    (checked with ``stat``, never opened). A missing file or dangling symlink raises an
    `ImageLoadError` that is also a `FileNotFoundError`.
    """
    path = Path(path)
    _check_regular(path)
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode here: truncation surfaces now, not in a transform
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            rgb = ensure_rgb(im)
            if rgb is im:
                rgb = im.copy()  # detach from the file handle closed by the context manager
    except FileNotFoundError:  # removed between the stat and the open
        raise _MissingImageError(path, "file not found") from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError,
        # ValueError, struct.error, zlib.error, EOFError, DecompressionBombError...; all mean
        # "this file cannot be used", which callers handle uniformly.
        if isinstance(err, OSError) and err.filename is not None:
            reason = _os_reason(err)  # e.g. permission denied: drop the repeated path
        else:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageLoadError(path, f"{type(err).__name__}: {reason}") from err
    return rgb


# Common image formats kamim does not read: files with these extensions are counted and reported
# instead of being ignored without a word.
_OTHER_IMAGE_EXTENSIONS = frozenset({
    ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".svg", ".jfif", ".pnm", ".pbm", ".tga",
    ".ico", ".psd", ".dng", ".cr2", ".nef", ".arw", ".raw",
})

_DirKey = tuple[int, int]  # (st_dev, st_ino): a directory's identity, whatever path reached it


@dataclass
class _Scan:
    """What one `find_images` walk found, and what it skipped (reported once per kind)."""

    root: Path
    found: list[Path] = field(default_factory=list)
    repeats: list[tuple[Path, bool]] = field(default_factory=list)  # (symlink, is a loop)
    hard_links: list[tuple[Path, Path]] = field(default_factory=list)  # (second name, the name kept)
    bad_entries: list[ImageLoadError] = field(default_factory=list)
    bad_dirs: list[tuple[Path, OSError]] = field(default_factory=list)
    other_images: list[Path] = field(default_factory=list)

    def raise_strict(self) -> None:
        """Strict mode: the first (sorted) unreadable folder or entry is an error."""
        if self.bad_dirs:
            path, err = min(self.bad_dirs, key=lambda d: d[0].as_posix())
            raise _dir_error(path, err)
        if self.bad_entries:
            raise min(self.bad_entries, key=lambda e: Path(e.path).as_posix())

    def warn(self) -> None:
        """One `UserWarning` per kind of skipped entry, naming one example."""
        if self.repeats:
            link = min(self.repeats, key=lambda r: (not r[1], r[0].as_posix()))[0]  # a loop if any
            loops = sum(is_loop for _, is_loop in self.repeats)
            parts = [f"{loops} symlink loops"] if loops else []
            if len(self.repeats) > loops:
                parts.append(f"{len(self.repeats) - loops} symlinks to folders or files already listed")
            _warn(f"'{self.root}': skipped {' and '.join(parts)}, so each file is listed once "
                  f"(e.g. '{link}' -> '{os.path.realpath(link)}')")
        if self.hard_links:
            extra, kept = min(self.hard_links, key=lambda h: h[0].as_posix())
            _warn(f"'{self.root}': skipped {len(self.hard_links)} hard links to files already listed, so each "
                  f"image is used once (e.g. '{extra}' is '{kept}')")
        if self.bad_dirs:
            path, err = min(self.bad_dirs, key=lambda d: d[0].as_posix())
            _warn(f"'{self.root}': skipped {len(self.bad_dirs)} folders that cannot be read "
                  f"(e.g. '{path}': {_os_reason(err)}); their images are not used")
        if self.bad_entries:
            err = min(self.bad_entries, key=lambda e: Path(e.path).as_posix())
            _warn(f"'{self.root}': skipped {len(self.bad_entries)} entries that are not readable regular "
                  f"files (e.g. '{err.path}': {err.reason})")
        if self.other_images:
            exts = sorted({p.suffix.lower() for p in self.other_images})
            _warn(f"'{self.root}': ignored {len(self.other_images)} files with image extensions kamim does "
                  f"not read ({', '.join(exts)}; e.g. '{min(self.other_images)}'); convert them to PNG or JPEG")


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)  # -> the caller of find_images


def _dir_error(path: Path, err: OSError) -> OSError:
    """A one-line error for an unreadable folder, of a type the CLI reports without a traceback."""
    cls = type(err) if isinstance(err, (PermissionError, FileNotFoundError, NotADirectoryError)) else OSError
    return cls(f"cannot read image folder '{path}': {_os_reason(err)}")


def _scan(root: Path, exts: tuple[str, ...]) -> _Scan:
    """Walk ``root`` following symlinks, each directory and each real file once.

    Real folders and files are listed first and symlinks afterwards, so that when a file is reachable
    both directly and through a link, the direct path is the one kept.
    """
    scan = _Scan(root)
    st = os.stat(root)
    # (path, resolved path, identity, identities of its ancestors)
    pending: list[tuple[Path, str, _DirKey, tuple[_DirKey, ...]]] = [
        (root, os.path.realpath(root), (st.st_dev, st.st_ino), ())]
    linked_dirs: list[tuple[Path, str, _DirKey, tuple[_DirKey, ...]]] = []
    linked_files: list[Path] = []
    seen_dirs: set[_DirKey] = set()
    dir_reals: dict[Path, str] = {}
    while pending or linked_dirs:
        if not pending:  # the real tree is done: follow the folder symlinks, in order
            pending.append(linked_dirs.pop(0))
        path, real, key, ancestors = pending.pop()
        if key in seen_dirs:
            scan.repeats.append((path, key in ancestors))
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if path == root:
                raise _dir_error(root, err) from None
            scan.bad_dirs.append((path, err))
            continue
        dir_reals[path] = real
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = path / entry.name
            try:
                is_link, is_dir = entry.is_symlink(), entry.is_dir()
                if is_dir:
                    sub = os.stat(child)
            except OSError as err:  # cannot stat: a folder we may not enter, or a looping link
                if entry.is_dir(follow_symlinks=False):
                    scan.bad_dirs.append((child, err))
                elif entry.name.lower().endswith(exts):
                    scan.bad_entries.append(ImageLoadError(child, _os_reason(err)))
                continue
            if is_dir:
                sub_real = os.path.realpath(child) if is_link else os.path.join(real, entry.name)
                item = (child, sub_real, (sub.st_dev, sub.st_ino), ancestors + (key,))
                (linked_dirs if is_link else subdirs).append(item)
            elif not entry.name.lower().endswith(exts):
                if os.path.splitext(entry.name)[1].lower() in _OTHER_IMAGE_EXTENSIONS:
                    scan.other_images.append(child)
            elif is_link:
                linked_files.append(child)  # deduplicated once every real file is known
            elif entry.is_file(follow_symlinks=False):
                scan.found.append(child)  # a plain file in a folder visited once: listed once
            else:
                try:
                    _check_regular(child)
                    scan.found.append(child)
                except ImageLoadError as err:
                    scan.bad_entries.append(err)
        pending.extend(reversed(subdirs))  # depth-first in name order
    real_files = {os.path.join(dir_reals[p.parent], p.name) for p in scan.found} if linked_files else set()
    for link in linked_files:
        try:
            _check_regular(link)
        except ImageLoadError as err:
            scan.bad_entries.append(err)
            continue
        target = os.path.realpath(link)
        if target in real_files:
            scan.repeats.append((link, False))
        else:
            real_files.add(target)
            scan.found.append(link)
    # hard links: two names of one file (same device and inode) are one image, the first name kept
    files: dict[_DirKey, Path] = {}
    unique = []
    for path in scan.found:
        try:
            st = os.stat(path)
        except OSError:
            unique.append(path)
            continue
        if (st.st_dev, st.st_ino) in files:
            scan.hard_links.append((path, files[(st.st_dev, st.st_ino)]))
            continue
        files[(st.st_dev, st.st_ino)] = path
        unique.append(path)
    scan.found = unique
    return scan


def find_images(root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                strict: bool = False) -> list[Path]:
    """All image files under ``root`` (recursive, extension match case-insensitive), sorted.

    Symlinks are followed, but each folder and each real file is listed once (a symlink loop, a
    second symlink to the same file or a hard link to it is skipped). Hidden files and folders (names starting with
    ``.``, e.g. macOS ``._x.jpg`` resource forks or ``.ipynb_checkpoints``) are skipped. Entries
    with an image extension that are not readable regular files (dangling symlinks, FIFOs,
    sockets), sub-folders that cannot be read, and files in common formats kamim does not read
    (``.heic``, ``.svg``, ...) are skipped with one `UserWarning` per kind naming an example; with
    ``strict`` an unreadable entry raises `ImageLoadError` and an unreadable folder an `OSError`
    naming it. A missing folder or one without images raises `FileNotFoundError` naming the folder.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: '{root}'")
    if not root.is_dir():
        raise NotADirectoryError(f"expected an image folder, got a file: '{root}'")
    exts = tuple(e.lower() for e in extensions)
    scan = _scan(root, exts)
    if strict:
        scan.raise_strict()
    scan.warn()
    if not scan.found:
        raise FileNotFoundError(
            f"no image files ({', '.join(e.lstrip('.') for e in exts)}) found under '{root}'"
        )
    return sorted(scan.found, key=lambda p: p.as_posix())
