"""Attention rollout (Abnar & Zuidema, 2020).

Per layer: heads averaged (or max / min), the residual connection modelled by adding the identity,
and the rows renormalised: ``A' = rownorm(A + I)``; the rollout is the product through the layers,
``R = A'_L ... A'_2 A'_1``, so every row of ``R`` sums to 1 (a distribution over input tokens).

Prefix handling: the product runs over all tokens, prefix (class / distillation / register)
tokens included, because attention flows through them between layers. :func:`rollout_map` then
reads the class-token row (query token 0) restricted to the patch columns, renormalised to sum to 1
over the patches; without a class token it averages the patch rows instead.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import FirstImages, MeanOverImages

__all__ = ["attention_rollout", "rollout_map", "RolloutMap", "RolloutAccumulator", "HEAD_FUSIONS"]

HEAD_FUSIONS = ("mean", "max", "min")
_ROW_TOL = 1e-3


def _fuse(attn: Tensor, head_fusion: str) -> Tensor:
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (B, heads, N, N), got {tuple(attn.shape)}")
    a = attn.float()
    err = (a.sum(-1) - 1).abs().max().item()
    tol = _ROW_TOL if attn.dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= tol:
        raise ValueError(f"attention rows must sum to 1; max |row sum - 1| = {err:.3g} > {tol}")
    if head_fusion == "mean":
        return a.mean(1)
    if head_fusion == "max":
        return a.amax(1)
    if head_fusion == "min":
        return a.amin(1)
    raise ValueError(f"unknown head_fusion {head_fusion!r}; expected one of {HEAD_FUSIONS}")


def attention_rollout(attentions: Sequence[Tensor], head_fusion: str = "mean") -> Tensor:
    """Rollout ``(B, N, N)`` (float32) of per-layer attentions ``(B, heads, N, N)`` given in layer order."""
    if len(attentions) == 0:
        raise ValueError("attention_rollout needs at least one layer")
    rollout: Tensor | None = None
    for attn in attentions:
        a = _fuse(attn, head_fusion)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)  # rows of a non-negative matrix plus I are > 0
        if rollout is not None and rollout.shape != a.shape:
            raise ValueError(f"all layers must have the same shape, got {tuple(rollout.shape)} and {tuple(a.shape)}")
        rollout = a if rollout is None else a @ rollout
    return rollout


def rollout_map(rollout: Tensor, grid: int | Sequence[int], num_prefix_tokens: int = 1,
                has_class_token: bool = True) -> Tensor:
    """Per-image relevance of every patch ``(B, h, w)`` read from a rollout ``(B, N, N)`` (sums to 1)."""
    h, w = (grid, grid) if isinstance(grid, int) else tuple(int(v) for v in grid)
    n = rollout.shape[-1]
    if n != num_prefix_tokens + h * w:
        raise ValueError(f"rollout has {n} tokens but grid {h}x{w} + {num_prefix_tokens} prefix tokens = {num_prefix_tokens + h * w}")
    if has_class_token and num_prefix_tokens >= 1:
        rel = rollout[:, 0, num_prefix_tokens:]
    else:
        rel = rollout[:, num_prefix_tokens:, num_prefix_tokens:].mean(1)
    rel = rel / rel.sum(-1, keepdim=True)
    return rel.reshape(-1, h, w)


class RolloutMap(MeanOverImages):
    """Streaming mean over images of :func:`rollout_map`; ``update([attn_layer1, ...])`` -> ``(h, w)``."""

    def __init__(self, grid: int | Sequence[int], num_prefix_tokens: int = 1, has_class_token: bool = True,
                 head_fusion: str = "mean") -> None:
        super().__init__()
        self.grid, self.num_prefix_tokens = grid, num_prefix_tokens
        self.has_class_token, self.head_fusion = has_class_token, head_fusion

    def maps(self, attentions: Sequence[Tensor]) -> Tensor:
        """Per-image maps ``(B, h, w)`` without accumulating."""
        rollout = attention_rollout(attentions, self.head_fusion)
        return rollout_map(rollout, self.grid, self.num_prefix_tokens, self.has_class_token)

    def _per_image(self, attentions: Sequence[Tensor]) -> Tensor:  # type: ignore[override]
        return self.maps(attentions)


class RolloutAccumulator:
    """Registry accumulator of ``rollout``: per-image maps of the first ``map_images`` images
    (``rollout`` (M, h, w), with ``inputs``/``labels``) and ``rollout_mean`` (h, w) over all images;
    option ``head_fusion``."""

    def __init__(self, context) -> None:
        g, opts = context.geometry, context.options
        self.context = context
        self.rollout = RolloutMap(g.grid, g.num_prefix_tokens, bool(getattr(g, "has_class_token", False)), opts.head_fusion)
        self.first = FirstImages(opts.map_images)

    def update(self, batch) -> None:
        maps = self.rollout.maps([batch.captured.attention[l] for l in self.context.layers])
        self.rollout.add(maps)
        self.first.add(batch.indices, inputs=batch.images.float(), labels=batch.labels, rollout=maps)

    def merge(self, other: RolloutAccumulator) -> None:
        self.rollout.merge(other.rollout)
        self.first.merge(other.first)

    def finish(self):
        arrays = self.first.arrays()
        arrays["rollout_mean"] = self.rollout.compute()
        return [], arrays
