"""timm-keyed ViT checkpoint layouts: plain timm, MAE, DINO and MoCo v3.

All four store a timm ``VisionTransformer`` state dict (``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``),
differing only in the container key, a key prefix and the training-only extras stored next to it:

* MoCo v3 (facebookresearch/moco-v3): ``state_dict`` -> ``module.base_encoder.*``; the base encoder's
  ``head.*`` is the projector MLP; ``module.predictor.*`` and ``module.momentum_encoder.*`` are extras.
* MAE (facebookresearch/mae): ``model`` -> timm keys; ``mask_token`` and ``decoder_*`` are extras.
  DeiT checkpoints use the same container.
* DINO (facebookresearch/dino) full checkpoints: ``teacher`` (default) or ``student`` ->
  ``[module.]backbone.*``; ``head.*`` is the DINO projection head. The released backbone-only files are
  plain timm state dicts.

The timm geometry (embed dim, depth, patch size, image size, MLP ratio, prefix tokens, ...) is
inferred from tensor shapes by :func:`infer_vit_spec`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import timm
import torch

from kamim.backbone import to_hw
from kamim.convert import Conversion, ConversionError

__all__ = [
    "STANDARD_HEAD_DIM", "infer_vit_spec", "pos_embed_grid", "standard_vit_name",
    "is_moco_v3", "is_dino", "is_mae", "is_timm_vit",
    "convert_moco_v3", "convert_dino", "convert_mae", "convert_timm_vit",
]

#: Head dimension assumed when the number of heads is neither given nor recorded: every ViT/DeiT/MAE/
#: DINO/MoCo v3/KAMIM model of sizes T/S/B/L uses 64 (3/6/12/16 heads for widths 192/384/768/1024).
STANDARD_HEAD_DIM = 64

# width -> (timm size name, depth, heads) of the standard ViT family.
_STANDARD_VIT = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16)}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _scalar_or_pair(v: tuple[int, int]) -> int | tuple[int, int]:
    return v[0] if v[0] == v[1] else v


def pos_embed_grid(
    num_pos_tokens: int,
    num_prefix_tokens: int,
    patch_size: tuple[int, int],
    native_img_size: tuple[int, int] | None = None,
    *,
    allow_no_embed_class: bool = False,
) -> tuple[tuple[int, int], bool]:
    """Token grid of a learned position embedding of ``num_pos_tokens`` rows.

    Returns ``(grid, no_embed_class)`` where ``no_embed_class`` tells that the prefix tokens have no
    position embedding (timm ``no_embed_class=True``). Without ``native_img_size`` the grid is assumed
    square (every public checkpoint); a non-square embedding needs the native image size.
    """
    candidates = [(num_prefix_tokens, False)] + ([(0, True)] if allow_no_embed_class and num_prefix_tokens else [])
    if native_img_size is not None:
        grid = (native_img_size[0] // patch_size[0], native_img_size[1] // patch_size[1])
        for prefix, no_embed_class in candidates:
            if grid[0] * grid[1] + prefix == num_pos_tokens:
                return grid, no_embed_class
        raise ConversionError(
            f"position embedding has {num_pos_tokens} tokens, which does not fit image size {native_img_size} "
            f"with patch size {patch_size} ({grid[0]}x{grid[1]} grid + {num_prefix_tokens} prefix tokens)"
        )
    for prefix, no_embed_class in candidates:
        side = math.isqrt(max(num_pos_tokens - prefix, 0))
        if side > 0 and side * side == num_pos_tokens - prefix:
            return (side, side), no_embed_class
    raise ConversionError(
        f"position embedding has {num_pos_tokens} tokens: not a square grid plus {num_prefix_tokens} prefix "
        f"token(s); the native image size cannot be inferred"
    )


def standard_vit_name(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                      patch_size: tuple[int, int], img_size: tuple[int, int]) -> str | None:
    """The timm name of a standard ViT-T/S/B/L with these dimensions, or None."""
    std = _STANDARD_VIT.get(embed_dim)
    if std is None or std[1:] != (depth, num_heads) or mlp_ratio != 4.0 or patch_size[0] != patch_size[1]:
        return None
    size, p = std[0], patch_size[0]
    names = [f"vit_{size}_patch{p}_{img_size[0]}"] if img_size[0] == img_size[1] else []
    names.append(f"vit_{size}_patch{p}_224")
    return next((name for name in names if timm.is_model(name)), None)


def infer_vit_spec(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    native_img_size: int | tuple[int, int] | None = None,
    model_name: str | None = None,
) -> tuple[str, dict[str, Any], tuple[int, int], list[str]]:
    """Infer a timm ``VisionTransformer`` that fits a timm-keyed ViT state dict.

    Returns ``(model_name, kwargs, native_img_size, notes)``. The number of heads is not visible in the
    shapes: it is ``num_heads`` when given, else ``embed_dim / STANDARD_HEAD_DIM`` (noted). A standard
    ViT-T/S/B/L gets its timm name; any other geometry is built from ``vit_base_patch16_224``'s
    constructor with every geometry kwarg explicit.
    """
    w = state_dict.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise ConversionError("not a timm ViT state dict: 'patch_embed.proj.weight' (a conv kernel) is missing")
    embed_dim, in_chans, ph, pw = (int(s) for s in w.shape)
    patch = (ph, pw)
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))}
    if not blocks:
        raise ConversionError("not a timm ViT state dict: no 'blocks.N.' keys")
    depth = max(blocks) + 1
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise ConversionError("not a timm ViT state dict: 'blocks.0.mlp.fc1.weight' is missing")
    mlp_ratio = fc1.shape[0] / embed_dim
    notes: list[str] = []
    if num_heads is None:
        if embed_dim % STANDARD_HEAD_DIM:
            raise ConversionError(
                f"cannot infer the number of heads of a width-{embed_dim} ViT (not a multiple of the standard "
                f"head dim {STANDARD_HEAD_DIM}); pass num_heads="
            )
        num_heads = embed_dim // STANDARD_HEAD_DIM
        notes.append(f"num_heads={num_heads} inferred from embed_dim {embed_dim} / head dim {STANDARD_HEAD_DIM}")
    elif embed_dim % num_heads:
        raise ConversionError(f"num_heads={num_heads} does not divide the embedding width {embed_dim}")

    class_token = "cls_token" in state_dict
    reg_tokens = int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0
    pos = state_dict.get("pos_embed")
    if pos is None:
        raise ConversionError("timm ViT state dict without 'pos_embed' (learned absolute position embedding)")
    hint = None if native_img_size is None else to_hw(native_img_size)
    grid, no_embed_class = pos_embed_grid(int(pos.shape[1]), int(class_token) + reg_tokens, patch, hint,
                                          allow_no_embed_class=True)
    img = (grid[0] * ph, grid[1] * pw)
    fc_norm = "fc_norm.weight" in state_dict
    kwargs: dict[str, Any] = {
        "img_size": _scalar_or_pair(img), "patch_size": _scalar_or_pair(patch), "in_chans": in_chans,
        "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict, "class_token": class_token,
        "reg_tokens": reg_tokens, "no_embed_class": no_embed_class,
        "global_pool": "avg" if fc_norm or not class_token else "token", "fc_norm": fc_norm,
    }
    if "norm.weight" not in state_dict and not fc_norm:
        kwargs["final_norm"] = False
    if "blocks.0.ls1.gamma" in state_dict:
        kwargs["init_values"] = 1e-5  # any value: LayerScale gammas are loaded from the checkpoint
    if "blocks.0.attn.q_norm.weight" in state_dict:
        kwargs["qk_norm"] = True
    if "norm_pre.weight" in state_dict:
        kwargs["pre_norm"] = True
    if model_name is None:
        model_name = standard_vit_name(embed_dim, depth, num_heads, mlp_ratio, patch, img)
        if model_name is None:
            model_name = "vit_base_patch16_224"
            notes.append("no timm model name for this geometry: built from vit_base_patch16_224 with explicit kwargs")
    return model_name, kwargs, img, notes


def _has_vit_keys(sd: Mapping[str, Any], prefix: str = "") -> bool:
    return f"{prefix}patch_embed.proj.weight" in sd and any(k.startswith(f"{prefix}blocks.") for k in sd)


def is_moco_v3(sd: Mapping[str, Any], container: str | None) -> bool:
    """MoCo v3: the base encoder under ``base_encoder.`` (``module.`` already stripped)."""
    return _has_vit_keys(sd, "base_encoder.")


def is_dino(sd: Mapping[str, Any], container: str | None) -> bool:
    """DINO full checkpoint: ``teacher``/``student`` holding ``backbone.*`` (+ ``head.*``)."""
    return _has_vit_keys(sd, "backbone.")


def is_mae(sd: Mapping[str, Any], container: str | None) -> bool:
    """MAE/DeiT layout: timm ViT keys under ``model``, or with MAE's decoder next to them."""
    return _has_vit_keys(sd) and (container == "model" or "decoder_embed.weight" in sd)


def is_timm_vit(sd: Mapping[str, Any], container: str | None) -> bool:
    """Plain timm ``VisionTransformer`` state dict."""
    return _has_vit_keys(sd)


def _split(
    sd: Mapping[str, torch.Tensor], fmt: str, prefix: str, extras: Mapping[str, str],
) -> tuple[dict[str, torch.Tensor], Conversion]:
    """Strip ``prefix`` from the encoder keys; keys starting with an ``extras`` prefix become extras."""
    conv = Conversion(format=fmt, state_dict={}, model_name="", model_kwargs={})
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        cat = next((c for p, c in extras.items() if k == p or k.startswith(p)), None)
        if cat is not None:
            conv.add_extra(cat, k)
        elif prefix and k.startswith(prefix):
            out[k[len(prefix):]] = v
            conv.converted += 1
        else:
            out[k] = v  # passed through: reported as unexpected by the loader unless allowed
    return out, conv


def _finish(conv: Conversion, sd: dict[str, torch.Tensor], **spec_kw: Any) -> Conversion:
    name, kwargs, img, notes = infer_vit_spec(sd, **spec_kw)
    conv.state_dict, conv.model_name, conv.model_kwargs, conv.native_img_size = sd, name, kwargs, img
    conv.notes.extend(notes)
    return conv


def convert_moco_v3(sd: Mapping[str, torch.Tensor], **spec_kw: Any) -> Conversion:
    """MoCo v3 -> timm ViT (base encoder; projector, predictor and momentum encoder set aside)."""
    extras = {"base_encoder.head.": "projector", "momentum_encoder.": "momentum_encoder", "predictor.": "predictor"}
    out, conv = _split(sd, "moco-v3", "base_encoder.", extras)
    return _finish(conv, out, **spec_kw)


def convert_dino(sd: Mapping[str, torch.Tensor], **spec_kw: Any) -> Conversion:
    """DINO teacher/student -> timm ViT (``backbone.*``; the DINO head set aside)."""
    out, conv = _split(sd, "dino", "backbone.", {"head.": "dino_head"})
    return _finish(conv, out, **spec_kw)


def convert_mae(sd: Mapping[str, torch.Tensor], **spec_kw: Any) -> Conversion:
    """MAE -> timm ViT (``mask_token`` and the ``decoder_*`` modules set aside)."""
    out, conv = _split(sd, "mae", "", {"mask_token": "mask_token", "decoder_": "decoder"})
    return _finish(conv, out, **spec_kw)


def convert_timm_vit(sd: Mapping[str, torch.Tensor], **spec_kw: Any) -> Conversion:
    """Plain timm ViT state dict (keys unchanged; geometry inferred)."""
    out, conv = _split(sd, "timm-vit", "", {})
    return _finish(conv, out, **spec_kw)
