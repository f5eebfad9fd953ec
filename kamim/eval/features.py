"""Pooled features of any layer(s) of a timm ViT or Swin for the evaluations, checked finite.

Layers, pooling and geometry are those of :mod:`kamim.backbone` (re-exported here): layer ``k``
(1-based) is the output of transformer block ``k`` before the final norm, counting a Swin's blocks
across its stages; ``"stage:K"`` selects the output of Swin stage ``K``; negative layers count from
the end. The KAMIM reference linear probe uses ``hidden_states[8]`` of a 12-block ViT (= layer 8),
drops the CLS token and average-pools the patch tokens: ``extract_features(model, x, 8, pool="avg")``.
Pooling names are the backbone's: ``"avg"`` (patch tokens / spatial map averaged) and ``"cls"`` (class
token).

Non-finite features (NaN/inf, a diverged encoder) are refused where they are made: every batch of
:func:`extract_features` is checked (one ``isfinite().all()`` per layer) and raises
:class:`NonFiniteFeaturesError` naming the layer and the checkpoint, so no evaluation reports a number
computed from them. A float16 feature bank is checked again after the cast (overflow to inf).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from kamim.progress import progress as progress_bar
from kamim.backbone import (
    LayerSpec, Pool, check_input_size, default_layer, expected_input_size, feature_dims, is_token_model, layer_features,
    num_layers, resolve_layers, unwrap,
)
from kamim.precision import autocast


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
    map of a Swin block; ``pool="cls"`` takes the class token (ViT with a class
    token only). ``norm=True`` applies the model's final norm (:func:`kamim.backbone.layer_features`).
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
    if pool is None:
        raise ValueError("pool None is not valid for pooled features; expected one of: avg, cls")
    return layer_features(model, images, layers, pool, norm=norm)


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
    for b, batch in enumerate(progress_bar(loader, desc=desc, unit="batch", enabled=progress)):
        if isinstance(batch, dict) and "image" not in batch:
            continue  # every image of this batch was unreadable (kamim.data.collate_skip_bad)
        images, labels = unpack_labelled(batch)
        images = images.to(dev, non_blocking=True)
        with autocast(dev, amp_dtype):
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
