"""Features from any block of a timm ViT (or any stage of a timm Swin) in one forward pass.

Layers are numbered like Hugging Face ``hidden_states``: layer ``k`` (1-based) is the output of the
``k``-th transformer block (timm ``blocks[k - 1]``), taken *before* the final norm. The KAMIM
reference linear probe uses ``hidden_states[8]`` of a 12-block ViT (= layer 8 here), drops the CLS
token and average-pools the patch tokens: ``extract_features(model, x, 8, pool="avg")``.
For Swin, layer ``k`` is the output of stage ``k`` (timm ``layers[k - 1]``).
Negative layers count from the end (``-1`` = last block). Geometry (depth, image and patch size,
prefix tokens) always comes from the model.

Non-finite features (NaN/inf, a diverged encoder) are refused where they are made: every batch of
:func:`extract_features` is checked (one ``isfinite().all()`` per layer) and raises
:class:`NonFiniteFeaturesError` naming the layer and the checkpoint, so no evaluation reports a number
computed from them. A float16 feature bank is checked again after the cast (overflow to inf).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

Pool = Literal["avg", "cls"]
LayerSpec = int | str | Sequence[int] | None

__all__ = [
    "NonFiniteFeaturesError",
    "unwrap",
    "is_token_model",
    "num_layers",
    "default_layer",
    "resolve_layers",
    "feature_dims",
    "expected_input_size",
    "check_input_size",
    "extract_features",
    "extract_dataset_features",
    "unpack_labelled",
]


class NonFiniteFeaturesError(ValueError):
    """Features with NaN/inf values (the encoder weights are probably diverged); one-line message."""


_DIVERGED = "the encoder weights are probably diverged"


def _check_finite(feats: dict[int, torch.Tensor], source: str | None, where: str = "", why: str = _DIVERGED) -> None:
    """Raise ``NonFiniteFeaturesError`` naming the first layer whose (N, C) features hold NaN/inf.

    The one finiteness rule of every evaluation: one ``isfinite().all()`` per layer; rows are counted only on failure.
    """
    for k, f in feats.items():
        if bool(torch.isfinite(f).all()):
            continue
        bad = int((~torch.isfinite(f)).flatten(1).any(dim=1).sum())
        raise NonFiniteFeaturesError(
            f"non-finite features at layer {k} of {source or 'the encoder'} "
            f"({bad} of {f.shape[0]} images{where}): {why}"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_token_model(model: nn.Module) -> bool:
    """True for ViT-like models (token sequences with prefix tokens), False for Swin-like stage models."""
    model = unwrap(model)
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def num_layers(model: nn.Module) -> int:
    """Number of probe-able layers: blocks of a ViT, stages of a Swin (from ``feature_info``)."""
    model = unwrap(model)
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} does not expose timm's forward_intermediates/feature_info; "
            "expected a timm VisionTransformer or SwinTransformer"
        )
    return len(info)


def default_layer(model: nn.Module) -> int:
    """The reference's probe layer scaled to depth: block 8 of 12 (2/3 depth) for a ViT, last stage for Swin."""
    n = num_layers(model)
    return max(1, round(2 * n / 3)) if is_token_model(model) else n


def _parse_layer_spec(spec: LayerSpec) -> list[int | str]:
    if spec is None:
        return ["default"]
    if isinstance(spec, bool):
        raise ValueError(f"layer spec {spec!r} is not valid; expected an int, 'all', 'last' or '1,4,8'")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        items: list[int | str] = []
        for part in spec.replace(" ", "").split(","):
            if part in ("all", "last", "default"):
                items.append(part)
            else:
                try:
                    items.append(int(part))
                except ValueError:
                    raise ValueError(
                        f"layer spec {spec!r} is not valid; expected 'all', 'last', 'default' or "
                        "integers like '8' or '1,4,8'"
                    ) from None
        return items
    return [int(s) for s in spec]


def resolve_layers(model: nn.Module, spec: LayerSpec = None) -> list[int]:
    """Turn a layer spec (``None``/'default', 'all', 'last', 8, -1, '1,4,8', [1, 4]) into sorted 1-based layers.

    Raises ValueError naming the valid range for an out-of-range layer.
    """
    n = num_layers(model)
    unit = "blocks" if is_token_model(model) else "stages"
    out: set[int] = set()
    for item in _parse_layer_spec(spec):
        if item == "all":
            out.update(range(1, n + 1))
        elif item == "last":
            out.add(n)
        elif item == "default":
            out.add(default_layer(model))
        else:
            k = int(item)
            if not (1 <= k <= n or -n <= k <= -1):
                raise ValueError(
                    f"layer {k} is out of range: {type(unwrap(model)).__name__} has {n} {unit}, "
                    f"valid layers are 1..{n} (or -{n}..-1)"
                )
            out.add(k if k > 0 else n + 1 + k)
    if not out:
        raise ValueError(f"layer spec {spec!r} selects no layer")
    return sorted(out)


def feature_dims(model: nn.Module, layers: Iterable[int]) -> dict[int, int]:
    """Channel width of each (1-based) layer's pooled feature."""
    info = unwrap(model).feature_info
    return {k: int(info[k - 1]["num_chs"]) for k in layers}


def expected_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) the model requires, or None when it accepts any size divisible by its patch size."""
    pe = getattr(unwrap(model), "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or not getattr(pe, "strict_img_size", True):
        return None
    return int(size[0]), int(size[1])


def check_input_size(model: nn.Module, shape: Sequence[int]) -> None:
    """Raise ValueError naming both shapes when images of ``shape`` (..., C, H, W) do not fit the model."""
    model = unwrap(model)
    h, w = int(shape[-2]), int(shape[-1])
    chans = int(shape[-3]) if len(shape) >= 3 else None
    pe = getattr(model, "patch_embed", None)
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    want = expected_input_size(model)
    if want is not None and (h, w) != want or (in_chans is not None and chans is not None and chans != in_chans):
        exp = f"{in_chans or 3}x{want[0]}x{want[1]}" if want else f"{in_chans or 3}xHxW"
        raise ValueError(
            f"input images are {chans}x{h}x{w} but the model expects {exp} "
            "(use an eval transform with the model's image size, or a checkpoint trained at this size)"
        )
    if want is None and pe is not None:
        ps = tuple(int(p) for p in getattr(pe, "patch_size", (1, 1)))
        if not getattr(pe, "dynamic_img_pad", False) and (h % ps[0] or w % ps[1]):
            raise ValueError(f"input images are {h}x{w}, not divisible by the model's patch size {ps[0]}x{ps[1]}")


def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    layers: LayerSpec = None,
    pool: Pool = "avg",
    norm: bool = False,
    source: str | None = None,
) -> dict[int, torch.Tensor]:
    """Pooled (B, C_k) features of every requested layer from a single forward pass.

    ``pool="avg"`` averages the patch tokens (prefix tokens dropped) of a ViT block, or the spatial
    map of a Swin stage; ``pool="cls"`` takes the class token (ViT with a class token only).
    ``norm=True`` applies the model's final norm to the intermediates (the reference does not).
    Call under ``torch.no_grad()``/``inference_mode`` for frozen use; gradients flow otherwise.
    NaN/inf features raise ``NonFiniteFeaturesError`` naming the layer and ``source`` (the checkpoint).
    """
    out = _pooled_features(model, images, layers, pool, norm)
    _check_finite(out, source)
    return out


def _pooled_features(
    model: nn.Module, images: torch.Tensor, layers: LayerSpec, pool: Pool, norm: bool
) -> dict[int, torch.Tensor]:
    """``extract_features`` without the finiteness check (its callers check, with their own context)."""
    model = unwrap(model)
    if pool not in ("avg", "cls"):
        raise ValueError(f"pool {pool!r} is not valid; expected 'avg' or 'cls'")
    ks = resolve_layers(model, layers)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
    check_input_size(model, images.shape)
    indices = [k - 1 for k in ks]
    if is_token_model(model):
        if pool == "cls" and getattr(model, "cls_token", None) is None:
            raise ValueError(f"pool='cls' needs a class token but {type(model).__name__} has none; use pool='avg'")
        outs = model.forward_intermediates(
            images, indices=indices, norm=norm, stop_early=True, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=pool == "cls",
        )
        if pool == "cls":
            feats = [prefix[:, 0] for _, prefix in outs]
        else:
            feats = [tokens.mean(dim=1) for tokens in outs]
    else:
        if pool == "cls":
            raise ValueError(f"pool='cls' needs a class token but {type(model).__name__} has none; use pool='avg'")
        outs = model.forward_intermediates(
            images, indices=indices, norm=norm, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        feats = [fmap.mean(dim=(2, 3)) for fmap in outs]
    return dict(zip(ks, feats))


@torch.inference_mode()
def extract_dataset_features(
    model: nn.Module,
    loader: Iterable,
    layers: LayerSpec = None,
    pool: Pool = "avg",
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    store_dtype: torch.dtype = torch.float32,
    num_samples: int | None = None,
    indices_fn=None,
    progress: bool = True,
    desc: str = "features",
    source: str | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Features (N, C_k) per layer and labels (N,) of a whole labelled loader, kept on CPU as ``store_dtype``.

    Batches are dicts with ``image`` and ``label`` (or ``(image, label)`` tuples). Under DDP each rank
    passes a loader over its own disjoint shard and ``indices_fn(batch_idx, batch_size)`` giving the
    dataset indices of that batch; rows are then scattered into an (N, C) bank and summed across ranks,
    so every rank ends with the full, exactly ordered bank (needs ``num_samples``).
    ``source`` (the checkpoint) names the model in the ``NonFiniteFeaturesError`` of NaN/inf features.
    """
    model = unwrap(model).eval()
    ks = resolve_layers(model, layers)
    dims = feature_dims(model, ks)
    distributed = indices_fn is not None
    if distributed and num_samples is None:
        raise ValueError("num_samples is required when indices_fn scatters a sharded loader")
    banks: dict[int, list[torch.Tensor]] | dict[int, torch.Tensor]
    if distributed:
        banks = {k: torch.zeros(num_samples, dims[k], dtype=torch.float32, device=device) for k in ks}
        # labels stored as label + 1 so that 0 = not filled and a sum over disjoint shards is exact
        labels_bank = torch.zeros(num_samples, dtype=torch.long, device=device)
    else:
        chunks: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
        label_chunks: list[torch.Tensor] = []
    dev = torch.device(device)
    why = _DIVERGED + (", or float16 autocast overflowed (use bf16 or no amp)" if amp_dtype == torch.float16 else "")
    for b, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        if isinstance(batch, dict) and "image" not in batch:
            continue  # every image of this batch was unreadable (kamim.data.collate_skip_bad)
        images, labels = unpack_labelled(batch)
        images = images.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats = _pooled_features(model, images, ks, pool, norm=False)
        _check_finite(feats, source, where=f" in batch {b} of {desc}", why=why)
        if distributed:
            idx = torch.as_tensor(indices_fn(b, images.shape[0]), device=dev)
            for k in ks:
                banks[k][idx] = feats[k].float()
            labels_bank[idx] = labels.to(dev).long() + 1
        else:
            for k in ks:
                chunks[k].append(feats[k].to("cpu", store_dtype))
            label_chunks.append(labels.cpu().long())
    if distributed:
        if dist.is_available() and dist.is_initialized():
            for k in ks:
                dist.all_reduce(banks[k])
            dist.all_reduce(labels_bank)
        if (labels_bank == 0).any():
            raise RuntimeError("some samples were not covered by any rank's shard")
        out = {k: v.to("cpu", store_dtype) for k, v in banks.items()}
        labels_out = (labels_bank - 1).cpu()
    else:
        if not label_chunks:
            raise ValueError("the loader yielded no batches (empty dataset?)")
        out = {k: torch.cat(v) for k, v in chunks.items()}
        labels_out = torch.cat(label_chunks)
    if torch.finfo(store_dtype).max < torch.finfo(torch.float32).max:  # finite features may overflow float16
        _check_finite(out, source, where=f" in {desc}", why=f"they overflow the {store_dtype} bank (use float32)")
    return out, labels_out


def unpack_labelled(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a labelled batch: a dict with ``image``/``label`` or an (image, label) pair."""
    if isinstance(batch, dict):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"labelled batch dict needs keys 'image' and 'label', got {sorted(batch)}")
        images, labels = batch["image"], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise ValueError(f"expected a labelled batch (dict or (image, label) pair), got {type(batch).__name__}")
    return images, torch.as_tensor(labels)
