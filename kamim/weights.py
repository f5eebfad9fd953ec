"""Per-patch keypoint density and KAMIM reconstruction weights.

KAMIM weights each patch's reconstruction loss by ``exp(density / T)``, where ``density`` is the
fraction of keypoint-map pixels set inside the ``w_ps x w_ps`` patch, normalised so that each
image's least dense patch has weight exactly 1 (a patch without keypoints weighs 1 whenever the
image has one). Smaller temperatures ``T`` sharpen the weighting; ``T -> inf`` gives SimMIM.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kamim.keypoints import _check_patch_grid

__all__ = ["patch_density", "weights_from_density", "patch_weights"]

# exponent clamp of the reference: keeps exp() finite in float32 for any density / T
_EXP_CLAMP = 20.0


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _check_temperature(temperature: Any) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def patch_density(keypoint_maps: torch.Tensor | np.ndarray, patch_size: int) -> torch.Tensor:
    """Mean of binary keypoint maps over non-overlapping patches.

    Args:
        keypoint_maps: (B, 1, H, W) or (B, H, W) maps (bool / int / float, tensor or numpy).
        patch_size: side ``w_ps`` of the square patches; must divide H and W.

    Returns:
        (B, H // w_ps, W // w_ps) densities in [0, 1] (float32, or the input's float dtype).
    """
    maps = _as_tensor(keypoint_maps, "keypoint_maps")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"keypoint_maps must have shape (B, 1, H, W) or (B, H, W), got {tuple(maps.shape)}")
    _check_patch_grid(patch_size, maps.shape[-2], maps.shape[-1])
    if not maps.is_floating_point():
        maps = maps.float()
    return F.avg_pool2d(maps[:, None], kernel_size=patch_size, stride=patch_size)[:, 0]


def weights_from_density(density: torch.Tensor | np.ndarray, temperature: float) -> torch.Tensor:
    """KAMIM weights ``exp(clamp(density / T, -20, 20))`` divided by each image's minimum.

    Args:
        density: (B, h, w) per-patch densities (e.g. the float16 ``density`` of a batch).
        temperature: T > 0.

    Returns:
        (B, h, w) weights >= 1 with each image's minimum exactly 1, in float32 (float64 kept):
        computed in float32 because exp(20) overflows float16.
    """
    t = _check_temperature(temperature)
    d = _as_tensor(density, "density")
    if d.ndim != 3 or d.shape[1] == 0 or d.shape[2] == 0:
        raise ValueError(f"density must have shape (B, h, w) with h, w > 0, got {tuple(d.shape)}")
    d = d.double() if d.dtype == torch.float64 else d.float()
    w = torch.exp(torch.clamp(d / t, -_EXP_CLAMP, _EXP_CLAMP))
    return w / w.amin(dim=(-2, -1), keepdim=True)


def patch_weights(
    keypoint_maps: torch.Tensor | np.ndarray, patch_size: int, temperature: float
) -> torch.Tensor:
    """``weights_from_density(patch_density(keypoint_maps, patch_size), temperature)``: (B, H/ps, W/ps)."""
    _check_temperature(temperature)  # fail before pooling
    return weights_from_density(patch_density(keypoint_maps, patch_size), temperature)
