"""Pretraining models: SimMIM/KAMIM over timm ViT and Swin, MoCo v3, the paper's presets and the one
factory that builds them (:func:`create_pretrain_model`, :func:`build_pretrain_model` from a config).

Names are imported on first use (PEP 562), so that the preset table (:mod:`kamim.models.presets`) is
readable without importing torch.
"""
from __future__ import annotations

from kamim.lazy import lazy_exports

_WHERE = {
    "METHODS": "kamim.models.presets", "PRESETS": "kamim.models.presets", "create_encoder": "kamim.models.presets",
    "arch_of": "kamim.models.presets",
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
    "arch_of",
    "build_pretrain_model",
    "create_encoder",
    "create_pretrain_model",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
