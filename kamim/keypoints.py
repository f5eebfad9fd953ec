"""Keypoint detection (OpenCV) and binary keypoint maps for KAMIM.

The KAMIM reference turns an augmented uint8 RGB crop into a binary "keypoint map" with::

    kps = detector.detect(crop, None)  # default-constructed OpenCV detector, RGB crop as is
    ref = cv2.drawKeypoints(np.zeros_like(crop), kps, None, color=(255, 0, 0))[..., 0] > 0

``cv2.drawKeypoints`` (default flags) draws every keypoint as an unfilled anti-aliased circle,
``cv2.circle(img, (cvRound(16 x), cvRound(16 y)), 3 * 16, color, 1, LINE_AA, shift=4)``, so the
map is really "ring coverage". Drawing is most of the reference's cost, so ``render="ring"``
reproduces it pixel for pixel without drawing per keypoint: a ring is determined by the 1/16-px
sub-pixel phase of its centre (16 x 16 phases) and, near the image border, by where the border
clips it (OpenCV clips the anti-aliased polyline against the image, which changes the rasterised
pixels). All those stencils are drawn once per process with ``cv2.circle`` itself and cached as
pixel offsets; a map is then a single vectorised scatter, or, for hundreds of interior rings
sharing a phase (FAST and GFTT centres are integers), one ``cv2.dilate`` of their centre pixels by
that phase's stencil. Anything outside the table's range (centres outside the image, images
smaller than a ring) falls back to ``cv2.circle``. See BENCHMARKS.md for timings.

Two honest alternatives are offered: ``"point"`` marks the pixel holding each keypoint centre and
``"disk"`` marks the pixel centres inside the keypoint's circle of diameter ``KeyPoint.size``.
(The disk is rasterised exactly with numpy instead of ``cv2.circle(thickness=-1, shift=4)``,
whose sub-pixel filled circles are visibly biased towards +x/+y.)
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DETECTORS",
    "RENDERS",
    "KeypointMapper",
    "detect_keypoints",
    "keypoint_map",
    "render_keypoints",
]

# detector name -> OpenCV factory (only those present in the installed OpenCV are offered;
# AGAST and BRISK left the main OpenCV package in 5.x).
_FACTORIES: dict[str, str] = {
    "fast": "FastFeatureDetector_create",
    "sift": "SIFT_create",
    "orb": "ORB_create",
    "gftt": "GFTTDetector_create",
    "agast": "AgastFeatureDetector_create",
    "brisk": "BRISK_create",
}
DETECTORS: tuple[str, ...] = tuple(name for name, f in _FACTORIES.items() if hasattr(cv2, f))
RENDERS: tuple[str, ...] = ("ring", "point", "disk")

# cv2.drawKeypoints (features2d/src/draw.cpp): centre and radius in 1/16 px, radius 3 px.
_SHIFT = 4
_SUBPIX = 1 << _SHIFT
_RING_RADIUS = 3 * _SUBPIX


# ----------------------------------------------------------------------------- validation
def _check_image(image: Any) -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 HxWx3 / HxW array or raise a one-line ValueError."""
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"image must be a numpy uint8 array of shape (H, W, 3) or (H, W), got {type(image).__name__}"
        )
    ok_shape = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    if not ok_shape or image.dtype != np.uint8 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"image must be uint8 of shape (H, W, 3) RGB or (H, W) gray with H, W > 0, "
            f"got shape {tuple(image.shape)} dtype {image.dtype}"
        )
    return np.ascontiguousarray(image)


def _check_render(render: str) -> None:
    if render not in RENDERS:
        raise ValueError(f"unknown render {render!r}; expected one of {RENDERS}")


@functools.cache
def _factory_params(detector: str) -> tuple[str, ...]:
    """Keyword names accepted by the detector's OpenCV factory (parsed from its signature doc)."""
    factory = _FACTORIES[detector]
    doc = getattr(cv2, factory).__doc__ or ""
    names: list[str] = []
    for sig in re.findall(rf"{factory}\(([^)]*)\)", doc):
        names += [n for n in re.findall(r"\w+", sig) if n not in names]
    return tuple(names)


def _create_detector(detector: str, params: dict[str, Any]) -> cv2.Feature2D:
    """Construct the OpenCV detector ``detector`` with ``params`` (one-line errors)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    valid = _factory_params(detector)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for detector {detector!r}; valid parameters: {list(valid)}"
        )
    factory = getattr(cv2, _FACTORIES[detector])
    try:
        return factory(**params)
    except (TypeError, cv2.error) as err:
        msg = " ".join(str(err).split())
        raise ValueError(f"invalid parameters {params} for detector {detector!r}: {msg}") from None


# ----------------------------------------------------------------------------- ring stencils
@dataclass(frozen=True)
class _RingTable:
    """Every ring ``cv2.drawKeypoints`` can draw, as pixel offsets from the centre's integer pixel.

    A ring's pixels depend on the sub-pixel phase ``(cy & 15, cx & 15)`` of its 1/16-px centre and,
    per axis, on whether its bounding box ``[lo, hi]`` crosses an image border: class 0 = interior,
    classes ``1 .. -lo`` = ``b`` pixels from the first border, the next ``hi`` classes = ``b``
    pixels from the last border. Row ``((cls_y * 16 + fy) * n_cls + cls_x) * 16 + fx`` of
    ``dy``/``dx`` lists the ring's pixels, padded to a common length by repeating the first one.
    """

    lo: int
    hi: int
    n_cls: int
    dy: np.ndarray
    dx: np.ndarray

    @property
    def min_size(self) -> int:
        # below this, a ring may touch both borders of an axis and classes would overlap
        return self.hi - self.lo + 1


def _draw_ring(shape: tuple[int, int], cx16: int, cy16: int) -> np.ndarray:
    """Pixels (> 0) of the anti-aliased ring ``cv2.drawKeypoints`` draws at (cx16, cy16) / 16."""
    canvas = np.zeros(shape, np.uint8)
    cv2.circle(canvas, (cx16, cy16), _RING_RADIUS, 255, 1, cv2.LINE_AA, _SHIFT)
    return canvas > 0


@functools.cache
def _ring_table() -> _RingTable:
    """Draw all ring stencils once per process (~25k tiny ``cv2.circle`` calls, ~0.3 s)."""
    # extent of an unclipped ring around its integer pixel, measured on a roomy canvas
    pad = _RING_RADIUS // _SUBPIX + 4
    size = 2 * pad + 1
    ys, xs = [], []
    for fy in range(_SUBPIX):
        for fx in range(_SUBPIX):
            y, x = np.nonzero(_draw_ring((size, size), pad * _SUBPIX + fx, pad * _SUBPIX + fy))
            ys.append(y - pad)
            xs.append(x - pad)
    lo = int(min(min(v.min() for v in ys), min(v.min() for v in xs)))
    hi = int(max(max(v.max() for v in ys), max(v.max() for v in xs)))
    n_low, n_high = -lo, hi
    n_cls = 1 + n_low + n_high
    margin = 2  # keeps the far border of a stencil canvas clear of the ring

    def axis_geometry(cls: int) -> tuple[int, int]:
        """(integer centre, canvas length) reproducing axis class ``cls``."""
        if cls == 0:
            return -lo + margin, -lo + hi + 1 + 2 * margin
        if cls <= n_low:
            b = cls - 1
            return b, b + hi + 1 + margin
        d = cls - 1 - n_low  # distance to the last pixel
        return -lo + margin, -lo + margin + d + 1

    offsets: list[tuple[np.ndarray, np.ndarray]] = []
    for cls_y in range(n_cls):
        by, ny = axis_geometry(cls_y)
        for fy in range(_SUBPIX):
            for cls_x in range(n_cls):
                bx, nx = axis_geometry(cls_x)
                for fx in range(_SUBPIX):
                    y, x = np.nonzero(_draw_ring((ny, nx), bx * _SUBPIX + fx, by * _SUBPIX + fy))
                    if y.size == 0:  # a centre inside the image always leaves ring pixels in it
                        raise RuntimeError("internal error: empty ring stencil")
                    offsets.append((y - by, x - bx))
    width = max(len(y) for y, _ in offsets)
    dy = np.empty((len(offsets), width), np.int8)
    dx = np.empty((len(offsets), width), np.int8)
    for i, (y, x) in enumerate(offsets):
        dy[i, : len(y)], dy[i, len(y) :] = y, y[0]
        dx[i, : len(x)], dx[i, len(x) :] = x, x[0]
    return _RingTable(lo=lo, hi=hi, n_cls=n_cls, dy=dy, dx=dx)


@functools.lru_cache(maxsize=4)
def _ring_flat_offsets(width: int) -> np.ndarray:
    """Stencil offsets flattened for a row-major map of ``width`` columns (int32)."""
    t = _ring_table()
    return t.dy.astype(np.int32) * np.int32(width) + t.dx.astype(np.int32)


@functools.lru_cache(maxsize=16)
def _axis_rows(length: int, stride: int) -> np.ndarray:
    """Table-row contribution of every 1/16-px centre coordinate ``0 .. 16 * length - 1``.

    ``(border class of the integer pixel * 16 + sub-pixel phase) * stride`` (see ``_RingTable``),
    so a ring's row is ``_axis_rows(h, 16 * n_cls)[cy16] + _axis_rows(w, 1)[cx16]``.
    """
    t = _ring_table()
    c16 = np.arange(length * _SUBPIX)
    b = c16 >> _SHIFT
    cls = np.zeros_like(b)
    low = b < -t.lo
    high = (length - 1 - b) < t.hi
    cls[low] = 1 + b[low]
    cls[high] = 1 - t.lo + (length - 1 - b[high])
    return ((cls << _SHIFT) | (c16 & (_SUBPIX - 1))) * stride


def _centres16(points: np.ndarray) -> np.ndarray:
    """``cvRound(pt * 16)`` as in drawKeypoints (float32 product is exact; rint = half to even)."""
    return np.rint(points.astype(np.float32) * np.float32(_SUBPIX)).astype(np.intp)


def _render_ring(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 {0,1} map equal to channel 0 of drawKeypoints on black, thresholded at > 0."""
    h, w = shape
    out = np.zeros(h * w, np.uint8)
    if len(points) == 0:
        return out.reshape(h, w)
    c16 = _centres16(points)
    table = _ring_table()
    if min(h, w) < table.min_size:
        in_table = np.zeros(len(c16), bool)
    elif c16.min() < 0 or (c16 >= (w * _SUBPIX, h * _SUBPIX)).any():
        in_table = (c16 >= 0).all(1) & (c16 < (w * _SUBPIX, h * _SUBPIX)).all(1)
    else:
        in_table = None  # the common case: every centre inside an image larger than a ring
    if in_table is not None:  # rare: centres off the image or a tiny image, draw with OpenCV
        canvas = np.zeros((h, w), np.uint8)
        for x, y in c16[~in_table].tolist():
            cv2.circle(canvas, (x, y), _RING_RADIUS, 255, 1, cv2.LINE_AA, _SHIFT)
        out |= canvas.reshape(-1) > 0
        c16 = c16[in_table]
        if len(c16) == 0:
            return out.reshape(h, w)
    cx16, cy16 = c16[:, 0], c16[:, 1]
    base = (cy16 >> _SHIFT) * w + (cx16 >> _SHIFT)  # flat index of the centre's pixel
    if len(c16) >= _DILATE_MIN_KEYPOINTS:
        # Many interior rings sharing a sub-pixel phase (FAST/GFTT centres are integers, so all
        # of them): one cv2.dilate of their centre pixels by the phase's stencil beats scattering
        # ~55 pixels per keypoint (cost independent of the count, no (N, 55) index arrays).
        phase = np.minimum(_axis_phase(h, _SUBPIX).take(cy16) + _axis_phase(w, 1).take(cx16), 256)
        counts = np.bincount(phase, minlength=257)
        counts[256] = 0  # border rings
        dense = counts >= _DILATE_MIN_KEYPOINTS
        if dense.any():
            out2d = out.reshape(h, w)
            for p in np.flatnonzero(dense).tolist():
                centres = np.zeros(h * w, np.uint8)
                centres[base[phase == p]] = 1
                kernel, anchor = _ring_kernel(p)
                np.bitwise_or(out2d, cv2.dilate(centres.reshape(h, w), kernel, anchor=anchor), out=out2d)
            rest = ~dense[phase]
            cx16, cy16, base = cx16[rest], cy16[rest], base[rest]
    if len(base):
        rows = _axis_rows(h, _SUBPIX * table.n_cls).take(cy16) + _axis_rows(w, 1).take(cx16)
        out[_ring_flat_offsets(w).take(rows, axis=0) + base[:, None]] = 1  # (N, stencil) scatter
    return out.reshape(h, w)


# Below this many rings of one sub-pixel phase, scattering stencils beats cv2.dilate. Measured at
# 192 px on one core (BENCHMARKS.md): the dilate path costs ~45 us + 0.06 us per ring,
# scattering ~20 us + 0.13 us per ring; break-even ~600 rings.
_DILATE_MIN_KEYPOINTS = 600


@functools.lru_cache(maxsize=32)
def _axis_phase(length: int, stride: int) -> np.ndarray:
    """Per 1/16-px coordinate: ``sub-pixel phase * stride`` for interior pixels, 256 at borders."""
    t = _ring_table()
    c16 = np.arange(length * _SUBPIX)
    b = c16 >> _SHIFT
    interior = (b >= -t.lo) & (b <= length - 1 - t.hi)
    return np.where(interior, (c16 & (_SUBPIX - 1)) * stride, 256)


@functools.lru_cache(maxsize=256)
def _ring_kernel(phase: int) -> tuple[np.ndarray, tuple[int, int]]:
    """cv2.dilate kernel and anchor stamping the interior ring of ``phase = fy * 16 + fx``.

    dilate computes dst(y, x) = max over kernel[i, j] of src(y + i - ay, x + j - ax), so the
    kernel is the stencil reflected through its centre pixel.
    """
    t = _ring_table()
    fy, fx = divmod(phase, _SUBPIX)
    row = (fy * t.n_cls) * _SUBPIX + fx  # cls_y = cls_x = 0
    n = t.hi - t.lo + 1
    stencil = np.zeros((n, n), np.uint8)
    stencil[t.dy[row] - t.lo, t.dx[row] - t.lo] = 1
    return np.ascontiguousarray(stencil[::-1, ::-1]), (t.hi, t.hi)


def _render_point(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mark the pixel holding each keypoint centre (pixel centres at integer coordinates)."""
    h, w = shape
    out = np.zeros((h, w), np.uint8)
    if len(points):
        xy = np.rint(points).astype(np.int64)
        keep = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        out[xy[keep, 1], xy[keep, 0]] = 1
    return out


def _render_disk(points: np.ndarray, sizes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mark pixel centres within ``size / 2`` of each keypoint centre (the keypoint's disk).

    Vectorised per integer half-width of the bounding box, so FAST (one size) or ORB (one size per
    pyramid level) take a handful of numpy passes; SIFT's continuous sizes take a few dozen.
    """
    h, w = shape
    out = np.zeros((h, w), np.uint8)
    if len(points) == 0:
        return out
    pts = points.astype(np.float64)
    radius = np.maximum(sizes.astype(np.float64), 0.0) / 2.0
    half = np.ceil(radius).astype(np.int64) + 1
    base = np.rint(pts).astype(np.int64)
    for k in np.unique(half):
        sel = half == k
        off = np.arange(-k, k + 1)
        ys = base[sel, 1, None, None] + off[None, :, None]  # (n, 2k+1, 1)
        xs = base[sel, 0, None, None] + off[None, None, :]  # (n, 1, 2k+1)
        d2 = (xs - pts[sel, 0, None, None]) ** 2 + (ys - pts[sel, 1, None, None]) ** 2
        hit = (d2 <= radius[sel, None, None] ** 2) & (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        yy, xx = np.broadcast_arrays(ys, xs)
        out[yy[hit], xx[hit]] = 1
    return out


def render_keypoints(
    keypoints: list[cv2.KeyPoint] | tuple[cv2.KeyPoint, ...], shape: tuple[int, int], render: str = "ring"
) -> np.ndarray:
    """Render ``keypoints`` into a float32 {0,1} map of ``shape`` = (H, W) (see module doc)."""
    _check_render(render)
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"shape must be (H, W) with H, W > 0, got {shape}")
    return _render_u8(keypoints, (int(shape[0]), int(shape[1])), render).astype(np.float32)


def _render_u8(keypoints: Any, shape: tuple[int, int], render: str) -> np.ndarray:
    points = cv2.KeyPoint_convert(keypoints) if len(keypoints) else np.zeros((0, 2), np.float32)
    if render == "ring":
        return _render_ring(points, shape)
    if render == "point":
        return _render_point(points, shape)
    sizes = np.fromiter((k.size for k in keypoints), np.float32, count=len(keypoints))
    return _render_disk(points, sizes, shape)


# ----------------------------------------------------------------------------- public API
class KeypointMapper:
    """Picklable keypoint-map maker: ``mapper(image) -> (H, W) float32 {0,1}``.

    Holds the detector configuration only; the OpenCV detector (not picklable) is created lazily
    once per process, so a mapper can be shipped to DataLoader workers. ``density`` returns the
    per-patch keypoint density directly, so workers send (H/ps, W/ps) values instead of maps.
    """

    def __init__(self, detector: str = "fast", render: str = "ring", **detector_params: Any) -> None:
        _check_render(render)
        self.detector = detector
        self.render = render
        self.detector_params = dict(detector_params)
        # created now to validate the configuration in the caller's process
        self._cv_detector: cv2.Feature2D | None = _create_detector(detector, self.detector_params)
        self._pid: int | None = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cv_detector"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.detector_params.items())
        return f"{type(self).__name__}(detector={self.detector!r}, render={self.render!r}{params})"

    def _get_detector(self) -> cv2.Feature2D:
        if self._cv_detector is None or self._pid != os.getpid():
            self._cv_detector = _create_detector(self.detector, self.detector_params)
            self._pid = os.getpid()
        return self._cv_detector

    def detect(self, image: np.ndarray) -> list[cv2.KeyPoint]:
        """Keypoints of ``image`` (uint8 RGB HxWx3 or gray HxW, passed to OpenCV as is)."""
        return self._detect(_check_image(image))

    def _detect(self, image: np.ndarray) -> list[cv2.KeyPoint]:
        try:
            return list(self._get_detector().detect(image, None))
        except cv2.error as err:
            msg = " ".join(str(err).split())
            raise RuntimeError(f"{self!r} failed on image of shape {image.shape}: {msg}") from None

    def map_u8(self, image: np.ndarray) -> np.ndarray:
        """Keypoint map as uint8 {0,1} (H, W) (no float conversion)."""
        image = _check_image(image)
        return _render_u8(self._detect(image), image.shape[:2], self.render)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Keypoint map of ``image``: float32 (H, W) with values in {0, 1}."""
        return self.map_u8(image).astype(np.float32)

    def density(self, image: np.ndarray, patch_size: int) -> np.ndarray:
        """Mean of the keypoint map over non-overlapping ``patch_size`` patches: float32 (H/ps, W/ps)."""
        image = _check_image(image)
        h, w = image.shape[:2]
        _check_patch_grid(patch_size, h, w)
        m = self.map_u8(image).reshape(h // patch_size, patch_size, w // patch_size, patch_size)
        counts = m.sum(axis=(1, 3), dtype=np.int32)
        return (counts.astype(np.float32) / np.float32(patch_size * patch_size)).astype(np.float32)


def _check_patch_grid(patch_size: Any, h: int, w: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size (H, W) = ({h}, {w})")


@functools.lru_cache(maxsize=32)
def _cached_mapper(detector: str, render: str, params: tuple[tuple[str, Any], ...]) -> KeypointMapper:
    return KeypointMapper(detector, render, **dict(params))


def _mapper(detector: str, render: str, params: dict[str, Any]) -> KeypointMapper:
    key = tuple(sorted(params.items()))
    try:
        hash(key)
    except TypeError:  # unhashable parameter value: build uncached
        return KeypointMapper(detector, render, **params)
    return _cached_mapper(detector, render, key)


def detect_keypoints(image: np.ndarray, detector: str = "fast", **params: Any) -> list[cv2.KeyPoint]:
    """Run the (default-constructed unless ``params``) OpenCV ``detector`` on ``image`` as is."""
    return _mapper(detector, "ring", params).detect(image)


def keypoint_map(
    image: np.ndarray, detector: str = "fast", render: str = "ring", **detector_params: Any
) -> np.ndarray:
    """Binary keypoint map of ``image`` (uint8 RGB HxWx3 or gray HxW): float32 (H, W) in {0, 1}.

    ``render="ring"`` equals the KAMIM reference pixel for pixel
    (``cv2.drawKeypoints(np.zeros_like(image), kps, None, color=(255, 0, 0))[..., 0] > 0``).
    Detectors are cached per process and configuration.
    """
    _check_render(render)
    return _mapper(detector, render, detector_params)(image)
