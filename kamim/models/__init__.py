"""Pretraining models: SimMIM/KAMIM over timm ViT and Swin, MoCo v3, the paper's presets and the one
factory that builds them (:func:`create_pretrain_model`, :func:`build_pretrain_model` from a config).

Names are imported on first use (PEP 562), so that the preset table (:mod:`kamim.models.presets`) is
readable without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "METHODS": "kamim.models.presets", "PRESETS": "kamim.models.presets", "create_encoder": "kamim.models.presets",
    "build_pretrain_model": "kamim.models.factory", "create_pretrain_model": "kamim.models.factory",
    "MoCoV3": "kamim.models.moco", "SimMIM": "kamim.models.simmim", "SwinEncoderForMIM": "kamim.models.simmim",
    "ViTEncoderForMIM": "kamim.models.simmim",
}

__all__ = [
    "METHODS",
    "PRESETS",
    "MoCoV3",
    "SimMIM",
    "SwinEncoderForMIM",
    "ViTEncoderForMIM",
    "build_pretrain_model",
    "create_encoder",
    "create_pretrain_model",
]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'kamim.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
