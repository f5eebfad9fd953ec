"""SimMIM and KAMIM pretraining wrappers over timm Vision Transformers and Swin Transformers.

The encoder adaptors add SimMIM masking to an unmodified timm backbone: a learned mask token replaces
the patch embeddings of masked patches, then the rest of timm's own forward runs (position embedding,
prefix tokens, blocks/stages, final norm). The backbone itself is kept as a plain timm model
(``.encoder``) so that its ``state_dict()`` loads into ``timm.create_model(**spec)`` with ``strict=True``.

The decoder is SimMIM's: a 1x1 convolution to ``stride**2 * in_chans`` channels followed by
``PixelShuffle(stride)``. The loss is the (optionally keypoint-weighted) masked L1 loss of
:func:`kamim.loss.reconstruction_loss`; KAMIM weights come from
:func:`kamim.weights.weights_from_density` applied to the per-patch keypoint densities of the batch.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from kamim.loss import NORMALIZE_MODES, reconstruction_loss
from kamim.weights import weights_from_density

__all__ = ["SimMIM", "ViTEncoderForMIM", "SwinEncoderForMIM", "build_mim_encoder", "expand_mask"]


def expand_mask(mask: torch.Tensor, grid: tuple[int, int], batch_size: int) -> torch.Tensor:
    """Validate a (B, h, w) mask and upsample it (nearest) to ``grid``; returns a bool (B, *grid) tensor.

    ``h`` and ``w`` must divide the grid (e.g. a mask on the 4 px patch grid of a Swin, or a coarser
    SimMIM mask-patch grid). Any non-zero value counts as masked.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 3:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, h, w) tensor, got {shape}")
    b, mh, mw = mask.shape
    gh, gw = grid
    if b != batch_size:
        raise ValueError(f"mask batch size {b} does not match image batch size {batch_size}")
    if mh == 0 or mw == 0 or gh % mh or gw % mw:
        raise ValueError(f"mask grid {mh}x{mw} must divide the model token grid {gh}x{gw}")
    mask = mask != 0
    if (mh, mw) != (gh, gw):
        mask = mask.repeat_interleave(gh // mh, dim=1).repeat_interleave(gw // mw, dim=2)
    return mask


def _check_image(image: Any, in_chans: int, fixed_size: tuple[int, int] | None, multiple: int) -> None:
    """One-line errors for images the backbone cannot take (instead of a deep timm assertion)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != in_chans:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (B, {in_chans}, H, W) tensor, got {shape}")
    h, w = image.shape[-2:]
    if fixed_size is not None and (h, w) != tuple(fixed_size):
        raise ValueError(f"image size {h}x{w} does not match the model's img_size {fixed_size[0]}x{fixed_size[1]}")
    if h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} must be divisible by the encoder stride {multiple}")


class _MaskedEncoder(nn.Module):
    """What the ViT and Swin adaptors share: the wrapped timm ``encoder``, a learned ``mask_token``
    (truncated normal, std 0.02) and the geometry read from the encoder's patch embedding."""

    def __init__(self, encoder: nn.Module, mask_token_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(*mask_token_shape))
        trunc_normal_(self.mask_token, std=0.02)

    @property
    def patch_size(self) -> int:
        """Stride of the patch embedding in pixels (square patches)."""
        return int(self.encoder.patch_embed.feat_ratio())

    @property
    def out_channels(self) -> int:
        return int(self.encoder.num_features)

    @property
    def in_chans(self) -> int:
        return int(self.encoder.patch_embed.proj.in_channels)

    def mask_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Grid the mask is applied on: the patch-embedding grid (a ViT's token grid, H/4 for Swin-T/B)."""
        return tuple(self.encoder.patch_embed.dynamic_feat_size(tuple(image_size)))


class ViTEncoderForMIM(_MaskedEncoder):
    """Masked forward of a timm :class:`~timm.models.vision_transformer.VisionTransformer`.

    ``patch_embed`` -> mask token replaces masked embeddings -> timm's ``_pos_embed``, ``patch_drop``,
    ``norm_pre``, ``blocks``, ``norm`` -> prefix tokens (CLS, registers) dropped -> (B, C, h, w).
    Works for any embed dim / depth / image size / patch size / number of prefix tokens, and for
    ``dynamic_img_size`` models. Attributes: ``encoder`` (the timm model), ``mask_token`` (1, 1, D).
    """

    def __init__(self, encoder: VisionTransformer) -> None:
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"ViTEncoderForMIM needs a timm VisionTransformer, got {type(encoder).__name__}")
        if not isinstance(encoder.patch_drop, nn.Identity):
            raise ValueError("patch_drop_rate > 0 is incompatible with MIM: every token must stay on the grid")
        if getattr(encoder.patch_embed, "dynamic_img_pad", False):
            raise ValueError("dynamic_img_pad=True is incompatible with MIM: the reconstruction must tile the image")
        super().__init__(encoder, (1, 1, encoder.embed_dim))

    @property
    def stride(self) -> int:
        """Stride of the output feature map w.r.t. the image (= the patch size)."""
        return self.patch_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, C_in, H, W) image and (B, h, w) mask (1 = masked, any grid dividing the token grid) -> (B, C, h, w)."""
        vit = self.encoder
        pe = vit.patch_embed
        _check_image(x, self.in_chans, None if vit.dynamic_img_size else pe.img_size, self.patch_size)
        grid = self.mask_grid(x.shape[-2:])
        tokens = pe(x)  # (B, N, D), or (B, h, w, D) for dynamic_img_size models
        if mask is not None:
            m = expand_mask(mask, grid, x.shape[0])
            m = m.unsqueeze(-1) if tokens.ndim == 4 else m.flatten(1).unsqueeze(-1)
            tokens = torch.where(m, self.mask_token.to(tokens.dtype), tokens)
        # From here on this is timm's VisionTransformer.forward_features, module by module.
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        tokens = vit.norm_pre(tokens)
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            tokens = checkpoint_seq(vit.blocks, tokens)
        else:
            tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)
        tokens = tokens[:, vit.num_prefix_tokens:]
        b, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *grid)

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters()}
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay() if f"encoder.{n}" in names}


class SwinEncoderForMIM(_MaskedEncoder):
    """Masked forward of a timm :class:`~timm.models.swin_transformer.SwinTransformer`.

    ``patch_embed`` (NHWC, includes its norm) -> mask token replaces masked embeddings on the patch-embed
    grid (H/patch) -> ``layers`` -> ``norm`` -> (B, C, H/stride, W/stride), with stride = the reduction of
    the last stage (patch * 2**(num_stages - 1), 32 for Swin-T/B). Attributes: ``encoder``, ``mask_token``.
    """

    def __init__(self, encoder: SwinTransformer) -> None:
        if not isinstance(encoder, SwinTransformer):
            raise TypeError(f"SwinEncoderForMIM needs a timm SwinTransformer, got {type(encoder).__name__}")
        super().__init__(encoder, (1, 1, 1, encoder.patch_embed.proj.out_channels))

    @property
    def stride(self) -> int:
        """Stride of the output feature map w.r.t. the image (the reduction of the last stage)."""
        return int(self.encoder.feature_info[-1]["reduction"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, C_in, H, W) image and (B, h, w) mask (1 = masked, grid dividing H/patch) -> (B, C, H/s, W/s)."""
        swin = self.encoder
        pe = swin.patch_embed
        _check_image(x, self.in_chans, pe.img_size if pe.strict_img_size else None, self.stride)
        tokens = pe(x)  # (B, h, w, D)
        if mask is not None:
            m = expand_mask(mask, tokens.shape[1:3], x.shape[0]).unsqueeze(-1)
            tokens = torch.where(m, self.mask_token.to(tokens.dtype), tokens)
        # timm's SwinTransformer.forward_features after the patch embedding.
        tokens = swin.norm(swin.layers(tokens))
        return tokens.permute(0, 3, 1, 2)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def build_mim_encoder(encoder: nn.Module) -> ViTEncoderForMIM | SwinEncoderForMIM:
    """The MIM adaptor for a timm backbone (VisionTransformer or SwinTransformer)."""
    if isinstance(encoder, VisionTransformer):
        return ViTEncoderForMIM(encoder)
    if isinstance(encoder, SwinTransformer):
        return SwinEncoderForMIM(encoder)
    raise TypeError(
        f"SimMIM supports timm VisionTransformer and SwinTransformer encoders, got {type(encoder).__name__}"
    )


class SimMIM(nn.Module):
    """SimMIM (Xie et al. 2022) and KAMIM pretraining model.

    Args:
        encoder: a timm ``VisionTransformer`` or ``SwinTransformer`` (``num_classes=0``).
        encoder_stride: output stride of the encoder; derived from the model when None, and checked
            against it otherwise (16 for ViT/16, 32 for Swin-T/B).
        in_chans: channels to reconstruct.
        loss_normalize: normalisation of :func:`kamim.loss.reconstruction_loss` ("mask" = reference).
        temperature: KAMIM temperature T. When set, the batch must have ``density`` and the per-patch
            L1 loss is weighted by ``weights_from_density(density, T)``; when None the model is plain
            SimMIM (a ``density`` entry is ignored).
        encoder_spec: ``{"model_name", "kwargs"}`` that recreates ``encoder`` with ``timm.create_model``
            (:func:`kamim.models.create_encoder` returns it); stored as ``.encoder_spec``, None if not given.

    ``forward(batch)`` takes ``image`` (B, C, H, W), ``mask`` (B, h, w) with 1 = masked and optional
    ``density`` (B, H/w_ps, W/w_ps); returns ``{"loss": scalar float32, "pred": (B, C, H, W) float32}``.
    The timm backbone's parameters live under ``backbone.encoder.`` in ``state_dict()``
    (see :attr:`encoder_prefix`); ``.encoder`` is the plain timm model.
    """

    encoder_prefix = "backbone.encoder."

    def __init__(
        self,
        encoder: nn.Module,
        encoder_stride: int | None = None,
        in_chans: int = 3,
        loss_normalize: str = "mask",
        temperature: float | None = None,
        encoder_spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_mim_encoder(encoder)
        stride = self.backbone.stride
        if encoder_stride is not None and int(encoder_stride) != stride:
            raise ValueError(f"encoder_stride={encoder_stride} does not match the encoder's output stride {stride}")
        if in_chans != self.backbone.in_chans:
            raise ValueError(f"in_chans={in_chans} does not match the encoder's in_chans {self.backbone.in_chans}")
        if loss_normalize not in NORMALIZE_MODES:
            raise ValueError(f"loss_normalize must be one of {NORMALIZE_MODES}, got {loss_normalize!r}")
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0 (or None for SimMIM), got {temperature}")
        self.encoder_stride = stride
        self.in_chans = in_chans
        self.loss_normalize = loss_normalize
        self.temperature = None if temperature is None else float(temperature)
        self.encoder_spec = encoder_spec  # None when the encoder was not built from a spec (no guessing)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    @property
    def encoder(self) -> nn.Module:
        """The plain timm backbone."""
        return self.backbone.encoder

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay (mask token, position embedding, prefix tokens, ...)."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"image", "mask"[, "density"]}`` -> ``{"loss": float32 scalar, "pred": float32 (B, C, H, W)}``."""
        for key in ("image", "mask"):
            if key not in batch:
                raise ValueError(f"SimMIM batch needs '{key}', got keys {sorted(batch)}")
        kamim = self.temperature is not None
        if kamim and batch.get("density") is None:
            raise ValueError(f"KAMIM (temperature={self.temperature}) needs batch['density']")
        image, mask = batch["image"], batch["mask"]
        pred = self.decoder(self.backbone(image, mask))
        with torch.autocast(device_type=image.device.type, enabled=False):
            # The loss is computed in float32 even under bf16/fp16 autocast.
            pred = pred.float()
            weights = weights_from_density(batch["density"].float(), self.temperature) if kamim else None
            loss = reconstruction_loss(
                pred, image.float(), mask.float(), weights=weights, normalize=self.loss_normalize
            )
        return {"loss": loss, "pred": pred}
