"""Pretraining models: SimMIM/KAMIM over timm ViT and Swin, MoCo v3, and the paper's presets."""
from kamim.models.moco import MoCoV3
from kamim.models.presets import METHODS, PRESETS, create_encoder, create_pretrain_model
from kamim.models.simmim import SimMIM, SwinEncoderForMIM, ViTEncoderForMIM

__all__ = [
    "METHODS",
    "PRESETS",
    "MoCoV3",
    "SimMIM",
    "SwinEncoderForMIM",
    "ViTEncoderForMIM",
    "create_encoder",
    "create_pretrain_model",
]
