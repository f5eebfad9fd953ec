"""Shared test helpers of the analysis tests: tiny timm ViTs, photographs as tensors.

Imported by the ``tests/test_analysis_*.py`` modules (pytest puts ``tests/`` on ``sys.path``);
``conftest.py`` runs the whole suite on one intra-op thread.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

TINY_VIT = dict(pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def tiny_vit(*, seed: Optional[int] = None, **kw: Any) -> nn.Module:
    """A random timm ViT (32 px, 8 px patches, 3 blocks of width 32, 2 heads); ``kw`` overrides.

    ``seed`` seeds torch first, so that every call builds the same weights.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **kw})


def photo_tensor(photo: np.ndarray) -> torch.Tensor:
    """An RGB uint8 ``(H, W, 3)`` photograph -> float ``(3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float() / 255


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of one ``(C, H, W)`` image to ``size`` x ``size``."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]


def photo_batch(photos: Iterable[np.ndarray], n: int = 2, size: int = 32) -> torch.Tensor:
    """The first ``n`` photographs resized to ``size`` px as one ``(n, 3, size, size)`` batch."""
    return torch.stack([resize(photo_tensor(p), size) for p in list(photos)[:n]])
