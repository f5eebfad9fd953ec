"""Shared helpers of the evaluation tests: tiny seeded ViTs, labelled photo crops.

Imported by ``tests/test_eval_*.py`` and ``tests/test_cli_eval.py`` (pytest puts ``tests/`` on
``sys.path``); ``conftest.py`` runs the whole suite on one intra-op thread.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kamim.data import write_labelled_demo

# four photographs with clearly different content: a small, quick classification problem
FOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def tiny_vit(depth: int = 2, **kw: Any) -> nn.Module:
    """A seeded 32 px timm ViT (patch 8, width 32, 2 heads) without a classifier."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=depth, num_heads=2, num_classes=0, **kw)


def photo_crops(
    root: Path, n_train_per_class: int, n_val_per_class: int, photos: Sequence[str] | None = FOUR_PHOTOS
) -> Path:
    """Labelled 32 px crops of real photographs (one class per photo; ``photos=None``: every demo photo)."""
    kw = {} if photos is None else {"photos": list(photos)}
    return write_labelled_demo(root, kind="photo-crops", size=32, n_train_per_class=n_train_per_class,
                               n_val_per_class=n_val_per_class, **kw)


def signal_at(module: nn.Module, at: int, signum: int = signal.SIGTERM) -> nn.Module:
    """``module``, which sends ``signum`` to this process during its forward call number ``at``."""
    calls = []

    def hook(_module, _args):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)

    module.register_forward_pre_hook(hook)
    return module


class PoisonGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``value`` (NaN or inf): a finite loss
    with a non-finite gradient. ``PoisonGrad.apply(x, float("nan"))``."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None
