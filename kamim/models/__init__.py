"""Pretraining models: SimMIM/KAMIM over timm ViT and Swin, MoCo v3, the paper's presets and the one
factory that builds them (:func:`create_pretrain_model`, :func:`build_pretrain_model` from a config)."""
from kamim.models.factory import build_pretrain_model, create_pretrain_model
from kamim.models.moco import MoCoV3
from kamim.models.presets import METHODS, PRESETS, create_encoder
from kamim.models.simmim import SimMIM, SwinEncoderForMIM, ViTEncoderForMIM

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
