"""Sample transforms: PIL RGB image -> dict of tensors (see the batch contract in ARCHITECTURE.md).

* `MIMTransform` (SimMIM / KAMIM pretraining): RandomResizedCrop + flips on the uint8 image, the
  SimMIM mask, and, for KAMIM, per-patch keypoint densities computed on the augmented uint8 crop
  inside the DataLoader worker; only the small (H/w_ps, W/w_ps) float16 density leaves the worker,
  never an image-sized map. Two crops (:data:`CROPS`): ``"reference"`` is the KAMIM reference
  pipeline exactly (torchvision v1 on the uint8 CHW tensor: ``RandomResizedCrop(antialias=False)``
  bilinear, horizontal then vertical flip), so the keypoints are detected on the same pixels; ``"antialiased"`` crops the
  PIL image with antialiasing (smoother downscaling, fewer aliasing keypoints). On identical crop
  boxes the two give different keypoint maps and KAMIM weights (``bench/bench_crop_fidelity.py``,
  BENCHMARKS.md).
* `TwoViewTransform` (MoCo v3): the asymmetric BYOL/MoCo v3 augmentation pair.
* `EvalTransform`: resize + center crop for evaluation.

Determinism contract: every random decision (crop box, flip, mask, colour jitter, blur sigma,
solarize...) is drawn from torch's global RNG. torchvision v2 transforms already do; the mask's
numpy Generator is seeded with one value drawn from torch. Hence ``torch.manual_seed(s)`` before
a call fixes the whole sample, and in a DataLoader the masks differ per worker and per epoch
because PyTorch seeds each worker's torch RNG with ``base_seed + worker_id``, ``base_seed`` being
drawn from the main process RNG at every epoch (reproducible under ``torch.manual_seed``). The
training engine additionally forks and seeds the RNG per sample for resume/DDP parity.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from kamim.backbone import to_hw
from kamim.config import CROPS  # the crops of MIMTransform (see module docstring)

__all__ = ["CROPS", "EvalTransform", "MIMTransform", "TwoViewTransform", "harden_auto_augment", "posterize", "to_pil_rgb"]


class _DensityFn(Protocol):
    def density(self, image: np.ndarray, patch_size: int) -> np.ndarray: ...


class _MaskFn(Protocol):
    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray: ...


def _range(value: Sequence[float], name: str, lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {tuple(value)}")
    return a, b


def _prob(p: float, name: str) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def to_pil_rgb(img: Any) -> Image.Image:
    """PIL image (converted to RGB if needed) or uint8 (H, W[, 3]) array -> PIL RGB image."""
    if isinstance(img, Image.Image):
        if img.mode == "RGB":
            return img
        from .images import ensure_rgb

        return ensure_rgb(img)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {img.dtype} {img.shape}")
        return Image.fromarray(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2), mode="RGB")
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(img).__name__}")


def _normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """uint8 PIL -> float32 (3, H, W) tensor, scaled to [0, 1] and normalised."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)  # drop the tv_tensors.Image subclass before collation


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the ``bits`` most significant bits of every channel (``bits`` clamped to [0, 8]).

    ``bits = 0`` gives a black image, as in TensorFlow's and Pillow <= 12's posterize; Pillow 13's
    ``ImageOps.posterize`` refuses 0 bits, which timm's RandAugment asks for when magnitude noise
    reaches the top level. Written as a lookup table so the result does not depend on what a
    future Pillow accepts.
    """
    keep = min(max(int(bits), 0), 8)
    mask = (0xFF << (8 - keep)) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


def _posterize_op(img: Image.Image, bits: int, **_: Any) -> Image.Image:
    return posterize(img, bits)


def harden_auto_augment(transform: Any) -> Any:
    """Make the posterize ops of timm RandAugment/AutoAugment policies inside ``transform`` use
    :func:`posterize` (same operation, valid for every level); returns ``transform``.

    Walks ``Compose.transforms`` and the policies' ``ops``/``sub_policy`` lists; an op named
    ``Posterize*`` that no longer has timm's ``aug_fn`` attribute raises ``RuntimeError`` at
    construction rather than failing inside a DataLoader worker hours into a run.
    """
    def ops(obj: Any) -> Iterator[Any]:
        for child in getattr(obj, "transforms", None) or ():
            yield from ops(child)
        yield from getattr(obj, "ops", None) or ()
        for policy in getattr(obj, "policy", None) or ():  # AutoAugment: list of sub-policies
            yield from policy if isinstance(policy, (list, tuple)) else ()

    for op in ops(transform):
        if str(getattr(op, "name", "")).startswith("Posterize"):
            if not hasattr(op, "aug_fn"):
                raise RuntimeError(f"cannot make {op!r} safe: this timm version has no AugmentOp.aug_fn")
            op.aug_fn = _posterize_op
    return transform


class MIMTransform:
    """SimMIM / KAMIM pretraining transform: PIL RGB -> ``dict(image, [mask], [density])``.

    * ``image``: float32 (3, H, W), normalised with ``mean``/``std``;
    * ``mask``: uint8 (H/model_patch, W/model_patch) from ``mask_generator(rng)`` (if given);
    * ``density``: float16 (H/w_ps, W/w_ps) ``keypoints.density(crop, weight_patch_size)`` of the
      augmented uint8 crop (if ``keypoints``, e.g. a `kamim.keypoints.KeypointMapper`). For
      power-of-two ``weight_patch_size`` <= 32 the float16 cast is exact (densities are k/w_ps^2).

    ``crop``: ``"reference"`` (uint8 tensor, no antialiasing, as the KAMIM reference) or
    ``"antialiased"`` (PIL, antialiased); ``hflip``/``vflip``: flip probabilities, applied in that
    order after the crop (a zero ``vflip`` draws nothing, so runs without it keep their RNG stream).
    Without mask and keypoints it is a plain RandomResizedCrop + flip classification transform.
    Images smaller than ``img_size`` are upsampled by the crop. All randomness comes from torch's
    global RNG (see module docstring).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 192,
        crop_scale: Sequence[float] = (0.67, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        crop: str = "antialiased",
        mask_generator: _MaskFn | None = None,
        keypoints: _DensityFn | None = None,
        weight_patch_size: int = 8,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bilinear",
    ) -> None:
        self.img_size = to_hw(img_size, "img_size")
        self.crop_scale = _range(crop_scale, "crop_scale", 1e-6, 1.0)
        self.crop_ratio = _range(crop_ratio, "crop_ratio", 1e-6, math.inf)
        self.hflip, self.vflip = _prob(hflip, "hflip"), _prob(vflip, "vflip")
        if crop not in CROPS:
            raise ValueError(f"crop {crop!r} is not valid; expected one of {', '.join(CROPS)}")
        self.crop_mode = crop
        h, w = self.img_size
        if keypoints is not None:
            if not callable(getattr(keypoints, "density", None)):
                raise TypeError("keypoints must have a .density(image, patch_size) method, "
                                f"got {type(keypoints).__name__}")
            if isinstance(weight_patch_size, bool) or not isinstance(weight_patch_size, (int, np.integer)) \
                    or weight_patch_size <= 0 or h % weight_patch_size or w % weight_patch_size:
                raise ValueError(f"weight_patch_size must be a positive int dividing img_size {self.img_size}, "
                                 f"got {weight_patch_size!r}")
        if mask_generator is not None:
            gen_size = getattr(mask_generator, "input_size", None)
            if gen_size is not None and to_hw(gen_size, "mask_generator.input_size") != self.img_size:
                raise ValueError(f"mask_generator.input_size {gen_size} does not match img_size {self.img_size}")
        self.mask_generator = mask_generator
        self.keypoints = keypoints
        self.weight_patch_size = int(weight_patch_size)
        self.mean, self.std = tuple(mean), tuple(std)
        if crop == "reference":
            # torchvision's v1 transforms, as the reference: on uint8 tensors v1 resizes in float and
            # rounds, v2 resizes uint8 natively, and the two differ by one grey level on many pixels
            from torchvision import transforms as v1

            self.crop = v1.Compose([
                v1.PILToTensor(),
                v1.RandomResizedCrop(self.img_size, scale=self.crop_scale, ratio=self.crop_ratio,
                                     interpolation=v1.InterpolationMode(interpolation), antialias=False),
                v1.RandomHorizontalFlip(self.hflip),
                *([v1.RandomVerticalFlip(self.vflip)] if self.vflip > 0 else []),
            ])
        else:
            self.crop = v2.Compose([
                v2.RandomResizedCrop(self.img_size, scale=self.crop_scale, ratio=self.crop_ratio,
                                     interpolation=v2.InterpolationMode(interpolation), antialias=True),
                v2.RandomHorizontalFlip(self.hflip),
                *([v2.RandomVerticalFlip(self.vflip)] if self.vflip > 0 else []),
            ])
        self.to_tensor = _normalize(self.mean, self.std)

    def __call__(self, img: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        crop = self.crop(to_pil_rgb(img))  # uint8 PIL or CHW tensor, torch RNG
        if isinstance(crop, torch.Tensor):
            crop = np.ascontiguousarray(crop.permute(1, 2, 0).numpy())  # uint8 HWC, as the PIL path gives
        out = {"image": _plain(self.to_tensor(crop))}
        if self.mask_generator is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            mask = np.asarray(self.mask_generator(rng))
            h, w = self.img_size
            if mask.ndim != 2 or h % mask.shape[0] or w % mask.shape[1]:
                raise ValueError(f"mask_generator returned shape {mask.shape}, "
                                 f"expected a 2-D grid dividing {self.img_size}")
            out["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
        if self.keypoints is not None:
            density = self.keypoints.density(np.asarray(crop), self.weight_patch_size)
            out["density"] = torch.from_numpy(np.asarray(density, dtype=np.float32)).to(torch.float16)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, crop_scale={self.crop_scale}, "
                f"crop_ratio={tuple(round(r, 4) for r in self.crop_ratio)}, hflip={self.hflip}, vflip={self.vflip}, "
                f"crop={self.crop_mode!r}, "
                f"mask_generator={self.mask_generator!r}, keypoints={self.keypoints!r}, "
                f"weight_patch_size={self.weight_patch_size})")


class TwoViewTransform:
    """MoCo v3 / BYOL asymmetric augmentation pair: PIL RGB -> ``dict(view1, view2)``.

    Each view: RandomResizedCrop(``crop_scale`` = (0.08, 1)), ColorJitter(0.4, 0.4, 0.2, 0.1)
    with p=0.8, grayscale p=0.2, Gaussian blur (sigma in [0.1, 2]) with p=1.0 / 0.1, solarize
    (threshold 128) with p=0 / 0.2, horizontal flip, normalise. MoCo v3 blurs with PIL's
    ``GaussianBlur(radius=sigma)``; here torchvision's kernel is used with BYOL's size (odd, about
    10% of the image side), wide enough (>= 5 sigma) not to truncate sigma=2 at 224 px.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: Sequence[float] = (1.0, 0.1),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_prob: Sequence[float] = (0.0, 0.2),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bilinear",
    ) -> None:
        self.img_size = to_hw(img_size, "img_size")
        crop_scale = _range(crop_scale, "crop_scale", 1e-6, 1.0)
        crop_ratio = _range(crop_ratio, "crop_ratio", 1e-6, math.inf)
        blur_sigma = _range(blur_sigma, "blur_sigma", 1e-6, math.inf)
        if len(blur_prob) != 2 or len(solarize_prob) != 2:
            raise ValueError(f"blur_prob and solarize_prob need one value per view, got {blur_prob}, {solarize_prob}")
        if len(color_jitter) != 4:
            raise ValueError(f"color_jitter must be (brightness, contrast, saturation, hue), got {color_jitter}")
        kernel = max(3, int(0.1 * min(self.img_size)) // 2 * 2 + 1)
        views = []
        for i in range(2):
            views.append(v2.Compose([
                v2.RandomResizedCrop(self.img_size, scale=crop_scale, ratio=crop_ratio,
                                     interpolation=v2.InterpolationMode(interpolation), antialias=True),
                v2.RandomApply([v2.ColorJitter(*color_jitter)], p=_prob(jitter_prob, "jitter_prob")),
                v2.RandomGrayscale(p=_prob(grayscale_prob, "grayscale_prob")),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=blur_sigma)], p=_prob(blur_prob[i], "blur_prob")),
                v2.RandomSolarize(threshold=128, p=_prob(solarize_prob[i], "solarize_prob")),
                v2.RandomHorizontalFlip(_prob(hflip, "hflip")),
                _normalize(mean, std),
            ]))
        self.view1, self.view2 = views

    def __call__(self, img: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        pil = to_pil_rgb(img)
        return {"view1": _plain(self.view1(pil)), "view2": _plain(self.view2(pil))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size},\n view1={self.view1},\n view2={self.view2})"


class EvalTransform:
    """Evaluation transform: resize the short side to ``max(img_size) / resize_ratio`` (timm's
    ``crop_pct``), center crop ``img_size``, normalise -> ``dict(image)``."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        resize_ratio: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.img_size = to_hw(img_size, "img_size")
        if not 0.0 < float(resize_ratio) <= 1.0:
            raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio!r}")
        self.resize_ratio = float(resize_ratio)
        self.resize_size = int(math.floor(max(self.img_size) / self.resize_ratio))
        self.transform = v2.Compose([
            v2.Resize(self.resize_size, interpolation=v2.InterpolationMode(interpolation), antialias=True),
            v2.CenterCrop(self.img_size),
            _normalize(mean, std),
        ])

    def __call__(self, img: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": _plain(self.transform(to_pil_rgb(img)))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, resize_size={self.resize_size})"
