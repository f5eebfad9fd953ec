"""The paper's architectures (ViT-T/S/B at 192 px, Swin-T/B with window 6) and tiny CPU presets.

A preset is a timm model name and its timm kwargs, nothing else: method settings (MoCo v3's head
sizes included) come from the config (:class:`kamim.config.MoCoConfig`, e.g. ``configs/tiny_moco.yaml``).
Every encoder is a plain timm model built with ``pretrained=False, num_classes=0``; its spec
``{"model_name", "kwargs"}`` (with ``img_size`` and ``patch_size`` always stored) recreates it exactly
with ``timm.create_model(spec["model_name"], **spec["kwargs"])``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kamim.config import METHODS

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["PRESETS", "METHODS", "create_encoder", "preset", "arch_of"]

PRESETS: dict[str, dict[str, Any]] = {
    # Paper: 192 px, patch 16 (12x12 tokens); widths 192/384/768, heads 3/6/12, 12 layers.
    "vit_t": {"model_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 192, "patch_size": 16}},
    "vit_s": {"model_name": "vit_small_patch16_224", "kwargs": {"img_size": 192, "patch_size": 16}},
    "vit_b": {"model_name": "vit_base_patch16_224", "kwargs": {"img_size": 192, "patch_size": 16}},
    # Paper: Swin-T/B, patch 4, window 6 at 192 px (grids 48/24/12/6).
    "swin_t": {
        "model_name": "swin_tiny_patch4_window7_224",
        "kwargs": {"img_size": 192, "patch_size": 4, "window_size": 6},
    },
    "swin_b": {
        "model_name": "swin_base_patch4_window7_224",
        "kwargs": {"img_size": 192, "patch_size": 4, "window_size": 6},
    },
    # CPU presets. vit_pico keeps the paper's 12x12 token grid (96 px / patch 8); MoCo on it wants
    # smaller heads than MoCo v3's 4096-wide MLPs (25x the encoder): configs/tiny_moco.yaml sets them.
    "vit_pico": {
        "model_name": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 96, "patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3},
    },
    # swin_pico: 96 px, patch 4 -> grids 24/12/6/3, window 3, stride 32 like Swin-T/B.
    "swin_pico": {
        "model_name": "swin_tiny_patch4_window7_224",
        "kwargs": {
            "img_size": 96,
            "patch_size": 4,
            "window_size": 3,
            "embed_dim": 32,
            "depths": (1, 1, 2, 1),
            "num_heads": (1, 2, 4, 8),
        },
    },
}



def preset(arch: str) -> dict[str, Any]:
    """A deep copy of ``PRESETS[arch]``; ``ValueError`` listing the valid names if unknown."""
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[arch])


def arch_of(spec: Mapping[str, Any]) -> str | None:
    """The preset an encoder spec (``{"model_name", "kwargs"}``, e.g. ``LoadedEncoder.spec``) builds at
    any image size, e.g. ``"vit_pico"``; None when it is none of them (other widths, depths, ...)."""
    def shape(kwargs: Mapping[str, Any]) -> dict[str, Any]:  # tuples as lists: specs come from JSON too
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
                if k not in ("num_classes", "img_size")}

    for arch, p in PRESETS.items():
        if p["model_name"] == spec.get("model_name") and shape(p["kwargs"]) == shape(spec.get("kwargs") or {}):
            return arch
    return None


def create_encoder(arch: str, img_size: int | None = None, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the timm encoder of preset ``arch`` (``pretrained=False, num_classes=0``) and its spec.

    ``img_size`` and any timm keyword ``overrides`` (e.g. ``patch_size``, ``drop_path_rate``,
    ``reg_tokens``) replace the preset's values and are recorded in the spec.
    """
    spec_preset = preset(arch)
    kwargs = {**spec_preset["kwargs"], "num_classes": 0, **overrides}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if kwargs.get("pretrained"):
        raise ValueError("pretrained weights are never downloaded; use kamim.checkpoints.load_encoder instead")
    kwargs.pop("pretrained", None)
    import timm  # here, so that the preset table is readable without torch (config validation, --help)

    model = timm.create_model(spec_preset["model_name"], pretrained=False, **kwargs)
    # Tuples become lists in YAML/JSON configs; store lists so the spec round-trips through them unchanged.
    spec_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    spec = {"model_name": spec_preset["model_name"], "kwargs": spec_kwargs}
    return model, spec


def __getattr__(name: str) -> Any:
    # Old location of the factory (kamim.models.presets.create_pretrain_model); lazy to avoid a cycle.
    if name == "create_pretrain_model":
        from kamim.models.factory import create_pretrain_model

        return create_pretrain_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
