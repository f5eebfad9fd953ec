"""MoCo v3 (Chen, Xie & He 2021) on a timm Vision Transformer.

Base encoder (timm ViT, pooled with its own ``global_pool``: CLS token for the presets) + projector
(3-layer MLP with BN, last BN without affine) + predictor (2-layer MLP, same design), and a momentum
copy of encoder + projector updated by EMA after each optimizer step with MoCo v3's cosine momentum
schedule. Loss: symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)``, each scaled by ``2 T``; keys are
gathered across ranks when a process group is initialised.

Differences from the reference (deliberate): the momentum update runs in
:meth:`MoCoV3.on_after_optimizer_step` (the engine calls it after every optimizer step) instead of at
the start of ``forward``, so gradient accumulation does not update the momentum encoder per micro-batch;
the fixed 2-D sin-cos position embedding is timm's ``build_sincos2d_pos_embed`` (same frequencies
as MoCo v3, channel blocks ordered sin_h, sin_w, cos_h, cos_w).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

__all__ = ["MoCoV3", "build_mlp", "sincos_pos_embed", "moco_momentum"]


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: bias-free Linear layers, BN + ReLU between them, optional affine-free BN at the end."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else mlp_dim
        d_out = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def sincos_pos_embed(vit: VisionTransformer, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding shaped like ``vit.pos_embed`` (zeros for prefix tokens)."""
    if vit.pos_embed is None:
        raise ValueError("the ViT has no position embedding (pos_embed=None) to replace with sin-cos")
    dim = vit.embed_dim
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    grid = list(vit.patch_embed.grid_size)
    pe = build_sincos2d_pos_embed(grid, dim=dim, temperature=temperature)  # (h*w, D), row-major like tokens
    n_prefix = vit.pos_embed.shape[1] - pe.shape[0]
    if n_prefix < 0:
        raise ValueError(f"pos_embed has {vit.pos_embed.shape[1]} positions, fewer than the {pe.shape[0]} patches")
    return torch.cat([pe.new_zeros(n_prefix, dim), pe], dim=0).unsqueeze(0)


def moco_momentum(step: int, total_steps: int, base_momentum: float) -> float:
    """MoCo v3 cosine momentum schedule: ``1 - (1 - m0) * (cos(pi * step / total) + 1) / 2``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` along dim 0 when a process group is initialised; returns (gathered, rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0), dist.get_rank()


class MoCoV3(nn.Module):
    """MoCo v3 pretraining model on a timm ViT.

    Args:
        encoder: timm ``VisionTransformer`` with ``num_classes=0`` (``encoder(x)`` gives pooled features).
        encoder_spec: ``{"model_name", "kwargs"}`` recreating ``encoder`` with ``timm.create_model``.
        dim: output dimension of projector / predictor.
        mlp_dim: hidden dimension of the MLPs.
        temperature: InfoNCE temperature T.
        momentum: base momentum m0 of the cosine schedule.
        fixed_sincos_pos_embed: replace the learned position embedding by a frozen 2-D sin-cos one.

    ``forward(batch)`` takes ``view1``, ``view2`` (B, C, H, W) and returns ``{"loss": scalar}``.
    """

    encoder_prefix = "encoder."

    def __init__(
        self,
        encoder: VisionTransformer,
        encoder_spec: dict[str, Any] | None,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        fixed_sincos_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"MoCoV3 needs a timm VisionTransformer, got {type(encoder).__name__}")
        if getattr(encoder, "num_classes", 0):
            raise ValueError(f"MoCoV3 needs an encoder with num_classes=0, got {encoder.num_classes}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.encoder = encoder
        self.encoder_spec = encoder_spec
        self.temperature = float(temperature)
        self.base_momentum = float(momentum)
        self.current_momentum = float(momentum)
        if fixed_sincos_pos_embed:
            with torch.no_grad():
                encoder.pos_embed.copy_(sincos_pos_embed(encoder))
            encoder.pos_embed.requires_grad_(False)
        self.projector = build_mlp(3, encoder.num_features, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad_(False)

    def _momentum_params(self) -> list[nn.Parameter]:
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    def _online_params(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embedding and prefix tokens of the base encoder (biases/norms are 1-D anyway)."""
        names = {n for n, _ in self.named_parameters()}
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay() if f"encoder.{n}" in names}

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries against (all-gathered) keys, scaled by 2T as in MoCo v3; float32."""
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        k_all, rank = _gather(k)
        logits = q @ k_all.T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        return F.cross_entropy(logits, labels) * (2.0 * self.temperature)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in ("view1", "view2"):
            if key not in batch:
                raise ValueError(f"MoCoV3 batch needs '{key}', got keys {sorted(batch)}")
        x1, x2 = batch["view1"], batch["view2"]
        if x1.shape != x2.shape:
            raise ValueError(f"view1 {tuple(x1.shape)} and view2 {tuple(x2.shape)} must have the same shape")
        q1 = self.predictor(self.projector(self.encoder(x1)))
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1))
            k2 = self.momentum_projector(self.momentum_encoder(x2))
        with torch.autocast(device_type=x1.device.type, enabled=False):
            loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return {"loss": loss}

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA of encoder + projector into the momentum copy with the cosine momentum at ``step``."""
        m = moco_momentum(step, total_steps, self.base_momentum)
        self.current_momentum = m
        torch._foreach_lerp_(self._momentum_params(), self._online_params(), 1.0 - m)
