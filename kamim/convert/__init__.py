"""Conversions of third-party checkpoint layouts to timm state dicts.

Each converter takes a flat ``{key: tensor}`` state dict in its source layout and returns a
:class:`Conversion`: the state dict renamed (and, where needed, fused) to timm's key names, the timm
model name and constructor kwargs that fit it (geometry inferred from tensor shapes), and the keys it
set aside as known extras (MIM decoders, mask tokens, projectors, momentum encoders, ...), grouped by
category. Keys a converter does not recognise are passed through under their original name, so that
:func:`kamim.checkpoints.load_encoder` reports them as unexpected instead of dropping them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Conversion", "ConversionError"]


class ConversionError(ValueError):
    """A state dict whose layout was recognised but cannot be converted (one-line message)."""


@dataclass
class Conversion:
    """A checkpoint converted to timm key names.

    Attributes:
        format: detected format name (see ``kamim.checkpoints.FORMATS``).
        state_dict: tensors under timm key names (plus unrecognised keys under their own names).
        model_name: timm model name to build (``pretrained=False``).
        model_kwargs: timm constructor kwargs inferred from the checkpoint (geometry, norm eps, ...).
        native_img_size: the image size the checkpoint's position embeddings (or spec) were made for.
        extras: known extras set aside, ``{category: [source keys]}``; allowed by default.
        derived: checkpoint copies of buffers timm derives itself (``{timm buffer name: tensor}``);
            checked for equality with the model's buffers, never loaded.
        converted: number of source tensors that were renamed or fused.
        notes: human-readable notes (inferred quantities, assumptions) for the load report.
        method: pretraining method recorded in the checkpoint, if any.
    """

    format: str
    state_dict: dict[str, torch.Tensor]
    model_name: str
    model_kwargs: dict[str, Any]
    native_img_size: tuple[int, int] | None = None
    extras: dict[str, list[str]] = field(default_factory=dict)
    derived: dict[str, torch.Tensor] = field(default_factory=dict)
    converted: int = 0
    notes: list[str] = field(default_factory=list)
    method: str | None = None

    def add_extra(self, category: str, key: str) -> None:
        """Record ``key`` as a known extra of ``category``."""
        self.extras.setdefault(category, []).append(key)
