"""Hugging Face ``transformers`` ViT and Swin state dicts -> timm.

The KAMIM reference release stores ``ViTForMaskedImageModeling`` / ``SwinForMaskedImageModeling``
state dicts. Both key namings are accepted: the one of transformers < 5 (and of every file written by
``save_pretrained``): ``encoder.layer.N.attention.attention.query``, ``intermediate.dense``, ... and the
in-memory naming of transformers >= 5 (``layers.N.attention.q_proj``, ``mlp.fc1``, ...).

* ViT -> timm ``VisionTransformer``: separate q/k/v projections are concatenated into timm's fused
  ``attn.qkv`` (timm splits its output as ``[q | k | v]``, each head-major, which is HF's per-projection
  layout). LayerNorm eps is HF's 1e-12 (``norm_layer=partial(nn.LayerNorm, eps=1e-12)``) unless the
  config says otherwise. ``embeddings.mask_token`` and ``decoder.*`` (MIM), ``pooler.*`` (``ViTModel``)
  and ``classifier.*`` are extras.
* Swin -> timm ``SwinTransformer``: HF applies patch merging at the *end* of stage N, timm at the *start*
  of stage N+1, so ``encoder.layers.N.downsample`` becomes ``layers.{N+1}.downsample``. Both gather the
  2x2 neighbourhood in the same channel order (rows/cols (0,0), (1,0), (0,1), (1,1)), so the
  reduction weight is copied as is (verified numerically in the tests). ``relative_position_index``
  buffers (transformers < 5 stored them) are derived data: compared with timm's, never loaded.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Callable, Mapping

import timm
import torch
from torch import nn

from kamim.backbone import to_hw
from kamim.convert import Conversion, ConversionError
from kamim.convert.layouts import STANDARD_HEAD_DIM, _scalar_or_pair, pos_embed_grid, standard_vit_name

__all__ = ["is_hf_vit", "is_hf_swin", "convert_hf_vit", "convert_hf_swin", "HF_VIT_EPS", "HF_SWIN_EPS"]

HF_VIT_EPS = 1e-12  # ViTConfig.layer_norm_eps default
HF_SWIN_EPS = 1e-5  # SwinConfig.layer_norm_eps default (== timm's nn.LayerNorm default)

_VIT_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_SWIN_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SWIN_DOWN = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$")

# HF module path inside a block -> q/k/v part of timm's fused attn.qkv (both namings, ViT and Swin).
_QKV = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
# HF module path inside a block -> timm module path (both namings).
_BLOCK_RENAMES = {
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
_SWIN_TABLES = ("attention.self.relative_position_bias_table",
                "attention.relative_position_bias.relative_position_bias_table")
_EXTRAS = {"embeddings.mask_token": "mask_token", "decoder.": "decoder", "pooler.": "pooler",
           "classifier.": "classifier"}
# HF top-level parameters -> timm, common to ViT and Swin.
_COMMON_RENAMES = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
# (embed_dim, depths) -> (timm size name, heads) of the standard Swin family.
_STANDARD_SWIN = {
    (96, (2, 2, 6, 2)): ("tiny", (3, 6, 12, 24)), (96, (2, 2, 18, 2)): ("small", (3, 6, 12, 24)),
    (128, (2, 2, 18, 2)): ("base", (4, 8, 16, 32)), (192, (2, 2, 18, 2)): ("large", (6, 12, 24, 48)),
}


def _prefix(sd: Mapping[str, Any], model: str) -> str:
    return f"{model}." if any(k.startswith(f"{model}.embeddings.") for k in sd) else ""


def is_hf_vit(sd: Mapping[str, Any], container: str | None = None) -> bool:
    """HF ``ViTModel`` / ``ViTFor*`` state dict (``[vit.]embeddings.position_embeddings`` + layers)."""
    p = _prefix(sd, "vit")
    return f"{p}embeddings.position_embeddings" in sd and f"{p}embeddings.patch_embeddings.projection.weight" in sd


def is_hf_swin(sd: Mapping[str, Any], container: str | None = None) -> bool:
    """HF ``SwinModel`` / ``SwinFor*`` state dict (``[swin.]encoder.layers.N.blocks.M.*``)."""
    p = _prefix(sd, "swin")
    return f"{p}embeddings.patch_embeddings.projection.weight" in sd and any(
        _SWIN_BLOCK.match(k[len(p):]) for k in sd if k.startswith(p))


def _config_value(config: Mapping[str, Any] | None, key: str) -> Any:
    return None if config is None else config.get(key)


class _QKVFuser:
    """Collects separate q/k/v tensors and emits timm's fused ``attn.qkv`` tensors."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}

    def add(self, timm_block: str, param: str, which: str, src_key: str, value: torch.Tensor) -> None:
        self.parts.setdefault((timm_block, param), {})[which] = (src_key, value)

    def emit(self, out: dict[str, torch.Tensor], conv: Conversion) -> None:
        for (block, param), parts in self.parts.items():
            if set(parts) == {"q", "k", "v"}:
                out[f"{block}attn.qkv.{param}"] = torch.cat([parts[c][1] for c in "qkv"], dim=0)
                conv.converted += 3
            else:  # incomplete: keep the pieces under their own names, the loader reports qkv missing
                out.update({src: v for src, v in parts.values()})


class _TimmStateDict:
    """The timm state dict being built: converted tensors (counted), q/k/v parts to fuse, kept keys."""

    def __init__(self, conv: Conversion) -> None:
        self.conv, self.out, self.fuser = conv, {}, _QKVFuser()

    def put(self, name: str, value: torch.Tensor) -> None:
        self.out[name] = value
        self.conv.converted += 1


def _convert_keys(
    sd: Mapping[str, torch.Tensor],
    prefix: str,
    conv: Conversion,
    renames: Mapping[str, str],
    convert_key: Callable[[str, str, torch.Tensor, _TimmStateDict], bool],
) -> dict[str, torch.Tensor]:
    """The key loop of both converters: the HF model ``prefix`` stripped, extras recorded, ``renames``
    applied, every other key offered to ``convert_key(key, name, value, target)``, which returns False
    for a key it does not know (kept under its own name so the loader reports it); q/k/v fused last."""
    target = _TimmStateDict(conv)
    for key, v in sd.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        cat = next((c for e, c in _EXTRAS.items() if name == e or name.startswith(e)), None)
        if cat is not None:
            conv.add_extra(cat, key)
        elif (new := renames.get(name)) is not None:
            target.put(new, v)
        elif not convert_key(key, name, v, target):
            target.out[key] = v
    target.fuser.emit(target.out, conv)
    return target.out


def _convert_vit_key(key: str, name: str, v: torch.Tensor, target: _TimmStateDict) -> bool:
    m = _VIT_BLOCK.match(name)
    if not m or not (m.group(2) in _QKV or m.group(2) in _BLOCK_RENAMES):
        return False
    i, mod, param = m.groups()
    if mod in _QKV:
        target.fuser.add(f"blocks.{i}.", param, _QKV[mod], key, v)
    else:
        target.put(f"blocks.{i}.{_BLOCK_RENAMES[mod]}.{param}", v)
    return True


def _convert_swin_key(key: str, name: str, v: torch.Tensor, target: _TimmStateDict) -> bool:
    if name == "embeddings.position_embeddings":
        raise ConversionError(
            f"'{key}': Swin with absolute position embeddings (use_absolute_embeddings=True) has no timm "
            "SwinTransformer equivalent")
    if m := _SWIN_DOWN.match(name):  # HF: end of stage N, timm: start of stage N+1
        target.put(f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}.{m.group(3)}", v)
        return True
    m = _SWIN_BLOCK.match(name)
    if not m:
        return False
    i, j, sub = m.groups()
    block = f"layers.{i}.blocks.{j}."
    mod, _, param = sub.rpartition(".")
    if sub.endswith("relative_position_index"):
        target.conv.derived[f"{block}attn.relative_position_index"] = v
    elif sub in _SWIN_TABLES:
        target.put(f"{block}attn.relative_position_bias_table", v)
    elif mod in _QKV:
        target.fuser.add(block, param, _QKV[mod], key, v)
    elif mod in _BLOCK_RENAMES:
        target.put(f"{block}{_BLOCK_RENAMES[mod]}.{param}", v)
    else:
        target.out[key] = v
    return True


def convert_hf_vit(
    sd: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    native_img_size: int | tuple[int, int] | None = None,
    model_name: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Conversion:
    """HF ViT (``ViTForMaskedImageModeling``, ``ViTModel``, ...) -> timm ``VisionTransformer``.

    Geometry comes from the shapes; the image size from the position embedding (square grid), the
    heads from ``num_heads``, else ``config['num_attention_heads']``, else width / 64 (noted).
    """
    conv = Conversion(format="hf-vit", state_dict={}, model_name="", model_kwargs={})
    renames = {**_COMMON_RENAMES, "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed"}
    out = _convert_keys(sd, _prefix(sd, "vit"), conv, renames, _convert_vit_key)

    w, pos = out.get("patch_embed.proj.weight"), out.get("pos_embed")
    if w is None or w.ndim != 4 or pos is None or "blocks.0.mlp.fc1.weight" not in out:
        raise ConversionError("HF ViT state dict lacks the patch embedding, position embedding or layer 0 MLP")
    embed_dim, in_chans, ph, pw = (int(s) for s in w.shape)
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    mlp_ratio = out["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    hint = native_img_size if native_img_size is not None else _config_value(config, "image_size")
    grid, _ = pos_embed_grid(int(pos.shape[1]), 1, (ph, pw), None if hint is None else to_hw(hint))
    img = (grid[0] * ph, grid[1] * pw)
    if num_heads is None:
        num_heads = _config_value(config, "num_attention_heads")
    if num_heads is None:
        if embed_dim % STANDARD_HEAD_DIM:
            raise ConversionError(f"cannot infer the number of heads of a width-{embed_dim} ViT; pass num_heads=")
        num_heads = embed_dim // STANDARD_HEAD_DIM
        conv.notes.append(f"num_heads={num_heads} inferred from embed_dim {embed_dim} / head dim {STANDARD_HEAD_DIM}")
    eps = float(_config_value(config, "layer_norm_eps") or HF_VIT_EPS)
    conv.model_kwargs = {
        "img_size": _scalar_or_pair(img), "patch_size": _scalar_or_pair((ph, pw)), "in_chans": in_chans,
        "embed_dim": embed_dim, "depth": depth, "num_heads": int(num_heads), "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in out, "class_token": True, "global_pool": "token",
        "norm_layer": partial(nn.LayerNorm, eps=eps),
    }
    conv.notes.append(f"LayerNorm eps {eps:g} (Hugging Face)")
    if model_name is None:
        model_name = standard_vit_name(embed_dim, depth, int(num_heads), mlp_ratio, (ph, pw), img)
        if model_name is None:
            model_name = "vit_base_patch16_224"
            conv.notes.append(
                "no timm model name for this geometry: built from vit_base_patch16_224 with explicit kwargs")
    conv.state_dict, conv.model_name, conv.native_img_size = out, model_name, img
    return conv


def convert_hf_swin(
    sd: Mapping[str, torch.Tensor],
    *,
    num_heads: Any = None,
    native_img_size: int | tuple[int, int] | None = None,
    model_name: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Conversion:
    """HF Swin (``SwinForMaskedImageModeling``, ``SwinModel``, ...) -> timm ``SwinTransformer``.

    Depths, heads (bias-table columns), window (bias-table rows = (2w-1)^2), MLP ratio and patch size come
    from the shapes. The image size is not stored in a Swin state dict: it is ``native_img_size``, else
    ``config['image_size']``, else the size at which the last stage is exactly one window
    (patch * window * 2^(stages-1): 224 for window 7, 192 for KAMIM's window 6), which is noted.
    ``num_heads`` is accepted for signature symmetry and checked against the tables when given.
    """
    conv = Conversion(format="hf-swin", state_dict={}, model_name="", model_kwargs={})
    renames = {**_COMMON_RENAMES, "embeddings.norm.weight": "patch_embed.norm.weight",
               "embeddings.norm.bias": "patch_embed.norm.bias"}
    out = _convert_keys(sd, _prefix(sd, "swin"), conv, renames, _convert_swin_key)

    w = out.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4 or "layers.0.blocks.0.mlp.fc1.weight" not in out:
        raise ConversionError("HF Swin state dict lacks the patch embedding or the first block's MLP")
    embed_dim, in_chans, ph, pw = (int(s) for s in w.shape)
    blocks: dict[int, set[int]] = {}
    for k in out:
        if m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.", k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = max(blocks) + 1
    depths = tuple(max(blocks.get(i, {-1})) + 1 for i in range(stages))
    heads, windows = [], set()
    for i in range(stages):
        table = out.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
        if table is None:
            raise ConversionError(f"HF Swin stage {i} has no relative_position_bias_table")
        side = math.isqrt(int(table.shape[0]))
        if side * side != table.shape[0] or side % 2 == 0:
            raise ConversionError(f"stage {i} relative_position_bias_table has {table.shape[0]} rows, not (2w-1)^2")
        heads.append(int(table.shape[1]))
        windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise ConversionError(f"HF Swin stages use different window sizes {sorted(windows)}; expected one")
    window = windows.pop()
    if num_heads is not None:
        want = (num_heads,) * stages if isinstance(num_heads, int) else tuple(num_heads)
        if want != tuple(heads):
            raise ConversionError(
                f"num_heads={num_heads} does not match the checkpoint's per-stage heads {tuple(heads)}")
    mlp_ratio = out["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    hint = native_img_size if native_img_size is not None else _config_value(config, "image_size")
    if hint is None:
        side = ph * window * 2 ** (stages - 1)
        img = (side, side)
        conv.notes.append(f"image size {side} assumed (last stage = one {window}x{window} window); "
                          "a Swin state dict does not store it")
    else:
        img = to_hw(hint)
    eps = float(_config_value(config, "layer_norm_eps") or HF_SWIN_EPS)
    kwargs: dict[str, Any] = {
        "img_size": _scalar_or_pair(img), "patch_size": _scalar_or_pair((ph, pw)), "in_chans": in_chans,
        "embed_dim": embed_dim, "depths": depths, "num_heads": tuple(heads), "window_size": window,
        "mlp_ratio": mlp_ratio, "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in out,
    }
    if eps != 1e-5:  # timm's Swin uses nn.LayerNorm's default eps 1e-5
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    if model_name is None:
        std = _STANDARD_SWIN.get((embed_dim, depths))
        names = []
        if std is not None and std[1] == tuple(heads) and mlp_ratio == 4.0:
            names = [f"swin_{std[0]}_patch{ph}_window{window}_{img[0]}", f"swin_{std[0]}_patch4_window7_224"]
        model_name = next((n for n in names if timm.is_model(n)), None)
        if model_name is None:
            model_name = "swin_tiny_patch4_window7_224"
            conv.notes.append("no timm model name for this geometry: built from swin_tiny_patch4_window7_224 "
                              "with explicit kwargs")
    conv.state_dict, conv.model_name, conv.model_kwargs, conv.native_img_size = out, model_name, kwargs, img
    return conv
