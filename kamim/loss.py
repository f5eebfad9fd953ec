"""Masked L1 reconstruction loss of SimMIM, optionally KAMIM-weighted per patch."""
from __future__ import annotations

import torch

from kamim.config import LOSS_NORMALIZE

__all__ = ["reconstruction_loss", "NORMALIZE_MODES"]

NORMALIZE_MODES = LOSS_NORMALIZE  # the config's names (kamim.config, torch-free)
_EPS = 1e-5  # SimMIM / KAMIM reference


def _to_pixels(grid: torch.Tensor, name: str, batch: int, height: int, width: int) -> torch.Tensor:
    """Upsample a (B, h, w) per-patch tensor to (B, H, W) by nearest neighbour (integer factors)."""
    if not isinstance(grid, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, h, w), got {type(grid).__name__}")
    if grid.ndim != 3 or grid.shape[0] != batch or grid.shape[1] == 0 or grid.shape[2] == 0:
        raise ValueError(f"{name} must have shape ({batch}, h, w), got {tuple(grid.shape)}")
    h, w = grid.shape[1:]
    if height % h or width % w:
        raise ValueError(f"{name} grid {h}x{w} must divide the image size {height}x{width}")
    return grid.repeat_interleave(height // h, dim=1).repeat_interleave(width // w, dim=2)


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    normalize: str = "mask",
) -> torch.Tensor:
    """Masked (optionally patch-weighted) L1 loss between images, as in SimMIM / KAMIM.

    ``loss = sum(|w * x - w * x_hat| * m) / (sum(m) + 1e-5) / C`` with the mask ``m`` and the
    weights ``w`` upsampled to pixels (nearest) and the sums over batch and pixels (``sum(m)``
    counts pixels, not channels). Without ``weights`` this is exactly SimMIM's loss.

    Args:
        pred, target: (B, C, H, W) images (the prediction and the normalised input).
        mask: (B, h, w) 1 = masked, on any grid dividing (H, W) (e.g. the model's token grid).
        weights: optional (B, h', w') non-negative KAMIM patch weights on any grid dividing (H, W)
            (``weights_from_density``); ``|w x - w x_hat|`` is computed as ``w |x - x_hat|``.
        normalize: ``"mask"`` (reference) divides by the masked pixel count, so KAMIM raises the
            loss scale with the weights; ``"weight"`` divides by the weighted count
            ``sum(w * m) + 1e-5`` instead, a weighted mean whose scale matches SimMIM's.

    Returns:
        Scalar loss, computed in float32 (or float64 for float64 inputs), also under autocast.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("pred and target must be torch.Tensors of shape (B, C, H, W)")
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both have shape (B, C, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    b, c, h, w = pred.shape
    dtype = torch.promote_types(pred.dtype, torch.float32)
    m = _to_pixels(mask, "mask", b, h, w).to(dtype)
    err = (pred.to(dtype) - target.to(dtype)).abs().sum(dim=1)  # (B, H, W), summed over channels
    wm = m if weights is None else m * _to_pixels(weights, "weights", b, h, w).to(dtype)
    denom = m.sum() if normalize == "mask" else wm.sum()
    return (err * wm).sum() / (denom + _EPS) / c
