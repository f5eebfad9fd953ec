"""Offline demo data made from real photographs shipped inside installed packages.

Nothing here touches the network: scikit-image photographs are read only when their file is
bundled in the installed distribution (the ones that need `pooch` to download are skipped), and
scikit-learn's `load_sample_images` / `load_digits` are bundled with scikit-learn.

Folders are materialised atomically (written into a temporary sibling, then renamed) with a
``kamim_demo.json`` manifest holding the generation parameters, so a second call, or a call from
another process (e.g. another DDP rank), reuses the folder instead of rewriting it.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from kamim.serialization import make_temp_dir

from .images import load_rgb

__all__ = [
    "MANIFEST_NAME",
    "demo_photographs",
    "kamim_data_dir",
    "write_demo_folder",
    "write_labelled_demo",
]

MANIFEST_NAME = "kamim_demo.json"
_FORMAT_VERSION = 1

# name -> file inside the scikit-image distribution. Real photographs only: synthetic images
# (colorwheel, checkerboard, logo, phantom), binary masks (horse), the duplicate `cat` (= chelsea)
# and `retina` (mostly black border, so its crops are blank) are left out.
_SKIMAGE_COLOR = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle": "motorcycle_left.png",
}
_SKIMAGE_GRAY = {
    "camera": "camera.png",
    "coins": "coins.png",
    "moon": "moon.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "brick": "brick.png",
}
_SKLEARN = ("china", "flower")


def kamim_data_dir() -> Path:
    """Root of kamim's data cache: ``$KAMIM_DATA_DIR`` if set, else ``~/.cache/kamim``."""
    env = os.environ.get("KAMIM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kamim"


@functools.lru_cache(maxsize=2)
def _load_photographs(include_gray: bool) -> tuple[tuple[str, np.ndarray], ...]:
    import skimage
    from sklearn.datasets import load_sample_images

    # skimage.data.<name>() would try a pooch download for files that are not bundled; reading
    # the bundled file directly guarantees no network access (the arrays are identical).
    skimage_dir = Path(skimage.__file__).parent / "data"
    table = dict(_SKIMAGE_COLOR)
    if include_gray:
        table.update(_SKIMAGE_GRAY)
    photos: list[tuple[str, np.ndarray]] = []
    for name, filename in table.items():
        path = skimage_dir / filename
        if path.is_file():
            photos.append((name, np.asarray(load_rgb(path))))
    sample = load_sample_images()
    for filename, img in zip(sample.filenames, sample.images):
        name = Path(filename).stem
        if name in _SKLEARN:
            photos.append((name, np.ascontiguousarray(img, dtype=np.uint8)))
    for _, arr in photos:
        arr.setflags(write=False)
    return tuple(sorted(photos))


def demo_photographs(include_gray: bool = True) -> dict[str, np.ndarray]:
    """Real photographs available offline, as uint8 RGB (H, W, 3) arrays keyed by name (sorted).

    Color: scikit-image astronaut, chelsea, coffee, rocket, hubble_deep_field,
    immunohistochemistry, motorcycle and scikit-learn china, flower; with ``include_gray`` also
    the grayscale photographs camera, coins, moon, grass, gravel, brick (replicated to RGB).
    Arrays are fresh writable copies.
    """
    photos = _load_photographs(bool(include_gray))
    if not photos:
        raise RuntimeError("no bundled photographs found in scikit-image / scikit-learn")
    return {name: arr.copy() for name, arr in photos}


def _select_photos(photos: Sequence[str] | None, include_gray: bool = True) -> dict[str, np.ndarray]:
    available = demo_photographs(include_gray=include_gray)
    if photos is None:
        return available
    unknown = [p for p in photos if p not in available]
    if unknown:
        raise ValueError(f"unknown demo photograph(s) {unknown}; available: {sorted(available)}")
    return {p: available[p] for p in photos}


def _fit_max_side(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _resize_square(img: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def _save(img: np.ndarray, path: Path) -> None:
    pil = Image.fromarray(img, mode="RGB")
    if path.suffix == ".jpg":
        pil.save(path, quality=90)
    else:
        pil.save(path, compress_level=1)  # fast; demo files are small anyway


def _materialise(root: str | os.PathLike, params: dict, write: Callable[[Path], list[str]]) -> Path:
    """Create ``root`` with ``write(tmp_dir) -> relative files`` once; reuse it when the manifest matches."""
    root = Path(root).expanduser()
    params = json.loads(json.dumps({"format": _FORMAT_VERSION, **params}))  # JSON-normalised
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if existing.get("params") != params:
            raise FileExistsError(
                f"'{root}' holds demo data made with {existing.get('params')}, not {params}; "
                "pass another folder or delete this one"
            )
        missing = [f for f in existing.get("files", []) if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"demo folder '{root}' is incomplete ({len(missing)} files missing, e.g. "
                f"'{missing[0]}'); delete it to regenerate"
            )
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"'{root}' exists and is not a kamim demo folder; pass an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, prefix=f".{root.name}.tmp-")
    try:
        files = write(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps({"params": params, "files": files}, indent=1))
        try:
            os.replace(tmp, root)  # atomic: other readers see a complete folder or none
        except OSError:
            if not manifest.is_file():  # not a lost race with another process: a real error
                raise
            return _materialise(root, {k: v for k, v in params.items() if k != "format"}, write)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_demo_folder(
    root: str | os.PathLike,
    crops_per_photo: int = 4,
    max_side: int = 512,
    seed: int = 0,
    include_gray: bool = True,
) -> Path:
    """Write a flat pretraining folder: every demo photograph plus ``crops_per_photo`` random crops.

    Each photograph contributes its full frame and random crops (35-80% of each side, anywhere),
    all resized so the longest side is at most ``max_side``; files alternate between JPEG
    (quality 90) and PNG. 15 photographs x (1 + 4) = 75 images by default. Deterministic given
    ``seed``; a second call with the same arguments reuses the folder.
    """
    if crops_per_photo < 0 or max_side < 16:
        raise ValueError(f"need crops_per_photo >= 0 and max_side >= 16, got {crops_per_photo}, {max_side}")
    photos = _select_photos(None, include_gray)

    def write(tmp: Path) -> list[str]:
        rng = np.random.default_rng(seed)
        files: list[str] = []
        for name, img in photos.items():
            h, w = img.shape[:2]
            views = [img]
            for _ in range(crops_per_photo):
                ch, cw = (int(s * rng.uniform(0.35, 0.8)) for s in (h, w))
                y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                views.append(img[y:y + ch, x:x + cw])
            for k, view in enumerate(views):
                fname = f"{name}_{k:02d}.{'jpg' if (len(files) % 2 == 0) else 'png'}"
                _save(np.ascontiguousarray(_fit_max_side(view, max_side)), tmp / fname)
                files.append(fname)
        return files

    params = dict(kind="flat", crops_per_photo=crops_per_photo, max_side=max_side, seed=seed,
                  photos=list(photos))
    return _materialise(root, params, write)


def _tile_crops(img: np.ndarray, n: int, rng: np.random.Generator, name: str) -> list[np.ndarray]:
    """``n`` non-overlapping square tiles of ``img`` from a randomly offset grid, in random order."""
    h, w = img.shape[:2]
    side = min(h, w, int(np.sqrt(h * w / n)))
    while side >= 8 and (h // side) * (w // side) < n:
        side -= 1
    if side < 8:
        raise ValueError(f"photograph '{name}' ({h}x{w}) is too small for {n} non-overlapping crops")
    rows, cols = h // side, w // side
    oy, ox = int(rng.integers(0, h - rows * side + 1)), int(rng.integers(0, w - cols * side + 1))
    cells = rng.permutation(rows * cols)[:n]
    return [img[oy + (c // cols) * side: oy + (c // cols + 1) * side,
                ox + (c % cols) * side: ox + (c % cols + 1) * side] for c in cells]


def write_labelled_demo(
    root: str | os.PathLike,
    kind: str = "photo-crops",
    n_train_per_class: int = 20,
    n_val_per_class: int = 10,
    size: int = 64,
    seed: int = 0,
    photos: Sequence[str] | None = None,
) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` for probing/finetuning demos.

    ``kind="photo-crops"``: one class per demo photograph (or the given ``photos``); samples are
    non-overlapping square tiles of the photograph (a randomly offset grid, tiles assigned at
    random to train or val, so no val pixel is seen in train), resized to ``size``.
    ``kind="digits"``: scikit-learn's 8x8 digits (classes "0".."9"), upsampled (bicubic) to
    ``size`` and replicated to RGB; train and val are disjoint samples.
    Deterministic given ``seed``; a second call with the same arguments reuses the folder.
    """
    if kind not in ("photo-crops", "digits"):
        raise ValueError(f"kind must be 'photo-crops' or 'digits', got {kind!r}")
    if n_train_per_class < 1 or n_val_per_class < 1 or size < 8:
        raise ValueError(
            f"need n_train_per_class >= 1, n_val_per_class >= 1, size >= 8; "
            f"got {n_train_per_class}, {n_val_per_class}, {size}"
        )
    n = n_train_per_class + n_val_per_class

    if kind == "photo-crops":
        sources = _select_photos(photos)
        classes = list(sources)

        def samples(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
            return {c: [_resize_square(t, size) for t in _tile_crops(sources[c], n, rng, c)] for c in classes}
    else:
        if photos is not None:
            raise ValueError("`photos` only applies to kind='photo-crops'")
        from sklearn.datasets import load_digits

        digits = load_digits()
        classes = [str(c) for c in range(10)]

        def samples(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
            out: dict[str, list[np.ndarray]] = {}
            for c in range(10):
                idx = np.flatnonzero(digits.target == c)
                if len(idx) < n:
                    raise ValueError(f"digit class {c} has {len(idx)} samples, fewer than the {n} requested")
                out[str(c)] = []
                for i in rng.permutation(idx)[:n]:
                    img = cv2.resize(digits.images[i].astype(np.float32) * (255.0 / 16.0), (size, size),
                                     interpolation=cv2.INTER_CUBIC)
                    gray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
                    out[str(c)].append(np.repeat(gray[..., None], 3, axis=2))
            return out

    def write(tmp: Path) -> list[str]:
        per_class = samples(np.random.default_rng(seed))
        files: list[str] = []
        for c in classes:
            for split, chunk in (("train", per_class[c][:n_train_per_class]),
                                 ("val", per_class[c][n_train_per_class:])):
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(chunk):
                    rel = f"{split}/{c}/{i:04d}.png"
                    _save(np.ascontiguousarray(img), tmp / rel)
                    files.append(rel)
        return files

    params = dict(kind=kind, n_train_per_class=n_train_per_class, n_val_per_class=n_val_per_class,
                  size=size, seed=seed, classes=classes)
    return _materialise(root, params, write)
