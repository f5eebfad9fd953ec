"""Capture of intermediate activations from timm vision transformers.

Layer numbering and geometry are those of :mod:`kamim.backbone` (re-exported here): layer ``l``
in ``1..L`` is the output (or the internals) of block ``l`` (timm ``blocks[l - 1]``; a Swin's blocks
counted across its stages); layer ``0`` is the embedding output, i.e. the input of block 1 after
position embedding (and ``norm_pre``), or a Swin's patch embedding.

For a timm ``VisionTransformer`` (any depth / width / patch size / image size, class token,
register tokens, distillation token) :class:`ViTCapture` records, on request only and per block:

* ``attention``: softmax probabilities ``(B, heads, N, N)``. Like
  ``timm.utils.AttentionExtract(method="hook")`` we read the output of ``attn.attn_drop``
  (identity in eval mode), which only exists on the unfused path: ``attn.fused_attn`` is
  switched off for the captured blocks while capturing and restored afterwards. We register our
  own hooks instead of using ``AttentionExtract`` because its ``FeatureHooks`` cannot be removed
  and it switches the model to eval mode for good.
* ``pre_attention``: the block input after ``norm1`` (the tokens the attention sees).
* ``post_attention``: the attention-branch output ``attn(norm1(x))`` before layer scale,
  drop path and the residual connection.
* ``block_output``: the block output, from ``model.forward_intermediates`` (unnormalised).
* ``embedding``: the input of block 0.

For a timm ``SwinTransformer`` only block outputs (``(B, h*w, C)`` per block, stage grids
differ) and the embedding (patch embedding output) are supported: windowed attention has no
``(N, N)`` map over the image, so attention, pre/post-attention capture raise ``ValueError``.

The model is left exactly as found: hooks removed and ``fused_attn`` / ``training`` flags
restored in ``finally`` blocks; everything runs under ``torch.no_grad``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from kamim.backbone import (  # the geometry and model kinds are defined once, in the backbone layer
    Geometry, SwinGeometry, ViTGeometry, geometry_from_dict, is_swin, is_vit, model_geometry, unwrap_backbone,
)

__all__ = [
    "Geometry",
    "ViTGeometry",
    "SwinGeometry",
    "Captured",
    "ViTCapture",
    "SwinCapture",
    "capture",
    "model_geometry",
    "geometry_from_dict",
    "unwrap_backbone",
    "is_swin",
    "is_vit",
]


@dataclass
class Captured:
    """Activations of one forward pass, keyed by layer number (see module docstring)."""

    embedding: Tensor | None = None
    attention: dict[int, Tensor] = field(default_factory=dict)
    pre_attention: dict[int, Tensor] = field(default_factory=dict)
    post_attention: dict[int, Tensor] = field(default_factory=dict)
    block_output: dict[int, Tensor] = field(default_factory=dict)

    def tokens(self, layer: int) -> Tensor:
        """Token sequence at ``layer`` (0 = embedding, else the block output)."""
        if layer == 0:
            if self.embedding is None:
                raise KeyError("the embedding was not captured")
            return self.embedding
        return self.block_output[layer]


@contextmanager
def _frozen_state(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every module's ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _layers(name: str, layers: Iterable[int] | bool | None, geometry: Any, allow_embedding: bool = False) -> list[int]:
    if layers is None or layers is False:
        return []
    if layers is True:
        return list(range(1, geometry.depth + 1))
    if isinstance(layers, int):
        layers = [layers]
    return sorted({geometry.check_layer(layer, allow_embedding=allow_embedding, what=f"{name} layer") for layer in layers})


def _check_images(images: Tensor, model: nn.Module, img_size: tuple[int, int]) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    in_chans = getattr(getattr(model.patch_embed, "proj", None), "in_channels", None)
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(f"images have {images.shape[1]} channels but the model expects {in_chans}")
    if tuple(images.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} px but the model expects {tuple(img_size)} px "
            "(resize/crop the input or build the model with that img_size)"
        )


_C = TypeVar("_C", bound="_HookCapture")


class _HookCapture:
    """Shared life cycle of :class:`ViTCapture` and :class:`SwinCapture`.

    ``__enter__`` freezes the model's training flags and lets the subclass register its hooks
    (:meth:`_install`); ``__exit__`` removes them and undoes any model change (:meth:`_restore`),
    also when installing failed halfway; ``__call__`` runs one batch (:meth:`_forward`) into a
    fresh :class:`Captured` under ``torch.no_grad``.
    """

    model: nn.Module
    geometry: Any

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._store: Captured | None = None
        self._state: Any = None

    def _install(self) -> None:
        """Register the forward hooks (appending their handles to ``self._handles``)."""
        raise NotImplementedError

    def _forward(self, images: Tensor) -> None:
        """Run the model on ``images`` so that the hooks fill ``self._store``."""
        raise NotImplementedError

    def _restore(self) -> None:
        """Undo model changes made by :meth:`_install` other than the hooks (none by default)."""

    def __enter__(self: _C) -> _C:
        self._state = _frozen_state(self.model)
        self._state.__enter__()
        try:
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles.clear()
            try:
                self._restore()
            finally:
                if self._state is not None:
                    self._state.__exit__(None, None, None)
                    self._state = None

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Captured:
        """Run the model on ``images`` (B, C, H, W) and return the requested activations."""
        if self._state is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} must be used as a context manager (with {name}(...) as cap)")
        _check_images(images, self.model, self.geometry.img_size)
        self._store = Captured()
        try:
            self._forward(images)
            return self._store
        finally:
            self._store = None


class ViTCapture(_HookCapture):
    """Context manager capturing activations of a timm ViT; reusable across batches.

    Example::

        with ViTCapture(model, attention=True, block_output=[4, 8]) as cap:
            for images in batches:
                out = cap(images)          # Captured; out.attention[1] is (B, heads, N, N)

    ``attention``, ``pre_attention``, ``post_attention``, ``block_output`` take layer numbers
    in ``1..L`` (or ``True`` for all); ``embedding=True`` records the input of block 0.
    The forward pass stops after the last block needed.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        attention: Iterable[int] | bool | None = None,
        pre_attention: Iterable[int] | bool | None = None,
        post_attention: Iterable[int] | bool | None = None,
        block_output: Iterable[int] | bool | None = None,
        embedding: bool = False,
        num_prefix_tokens: int | None = None,
    ) -> None:
        self.model = unwrap_backbone(model)
        if not is_vit(self.model):
            raise TypeError(f"ViTCapture needs a timm VisionTransformer, got {type(self.model).__name__}")
        self.geometry = ViTGeometry.from_model(self.model, num_prefix_tokens)
        g = self.geometry
        self.attention = _layers("attention", attention, g)
        self.pre_attention = _layers("pre_attention", pre_attention, g)
        self.post_attention = _layers("post_attention", post_attention, g)
        self.block_output = _layers("block_output", block_output, g)
        self.embedding = bool(embedding)
        for layer in self.attention:
            attn = self.model.blocks[layer - 1].attn
            if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
                raise ValueError(
                    f"block {layer - 1} attention ({type(attn).__name__}) exposes no attn_drop/fused_attn; "
                    "attention capture supports timm's Attention module"
                )
        needed = self.attention + self.pre_attention + self.post_attention + self.block_output
        self._last = max(needed, default=1 if self.embedding else 0)
        if self._last == 0:
            raise ValueError("nothing to capture: request attention, pre/post_attention, block_output or embedding")
        super().__init__()
        self._fused: list[tuple[nn.Module, bool]] = []

    # hooks -------------------------------------------------------------------------------
    def _hook(self, kind: str, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            assert self._store is not None
            getattr(self._store, kind)[layer] = output.detach()

        return hook

    def _embedding_hook(self, module: nn.Module, args: tuple) -> None:
        assert self._store is not None
        self._store.embedding = args[0].detach()

    def _install(self) -> None:
        blocks = self.model.blocks
        for layer in self.attention:
            attn = blocks[layer - 1].attn
            self._fused.append((attn, attn.fused_attn))
            attn.fused_attn = False
            self._handles.append(attn.attn_drop.register_forward_hook(self._hook("attention", layer)))
        for layer in self.pre_attention:
            self._handles.append(blocks[layer - 1].norm1.register_forward_hook(self._hook("pre_attention", layer)))
        for layer in self.post_attention:
            self._handles.append(blocks[layer - 1].attn.register_forward_hook(self._hook("post_attention", layer)))
        if self.embedding:
            self._handles.append(blocks[0].register_forward_pre_hook(self._embedding_hook))

    def _restore(self) -> None:
        try:
            for attn, fused in self._fused:
                attn.fused_attn = fused
        finally:
            self._fused.clear()

    def _forward(self, images: Tensor) -> None:
        assert self._store is not None
        indices = sorted(set(l - 1 for l in self.block_output) | {self._last - 1})
        inter = self.model.forward_intermediates(
            images,
            indices=indices,
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        for idx, item in zip(indices, inter):
            if idx + 1 not in self.block_output:
                continue
            if isinstance(item, tuple):  # (patch tokens, prefix tokens)
                item = torch.cat([item[1], item[0]], dim=1)
            self._store.block_output[idx + 1] = item.detach()


class SwinCapture(_HookCapture):
    """Capture block outputs (``(B, h*w, C)``) and the patch embedding of a timm SwinTransformer."""

    def __init__(self, model: nn.Module, *, block_output: Iterable[int] | bool | None = None, embedding: bool = False,
                 **unsupported: Any) -> None:
        self.model = unwrap_backbone(model)
        if not is_swin(self.model):
            raise TypeError(f"SwinCapture needs a timm SwinTransformer, got {type(self.model).__name__}")
        bad = [k for k, v in unsupported.items() if v not in (None, False, (), [])]
        if bad:
            raise ValueError(f"Swin capture supports block_output and embedding only, not {', '.join(sorted(bad))}")
        self.geometry = SwinGeometry.from_model(self.model)
        self.block_output = _layers("block_output", block_output, self.geometry)
        self.embedding = bool(embedding)
        self._blocks = [blk for stage in self.model.layers for blk in stage.blocks]
        super().__init__()

    def _install(self) -> None:
        def to_tokens(x: Tensor) -> Tensor:  # timm Swin blocks are NHWC
            return x.detach().reshape(x.shape[0], -1, x.shape[-1])

        def block_hook(layer: int):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                assert self._store is not None
                self._store.block_output[layer] = to_tokens(output)

            return hook

        def embed_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            assert self._store is not None
            self._store.embedding = to_tokens(output)

        for layer in self.block_output:
            self._handles.append(self._blocks[layer - 1].register_forward_hook(block_hook(layer)))
        if self.embedding:
            self._handles.append(self.model.patch_embed.register_forward_hook(embed_hook))

    def _forward(self, images: Tensor) -> None:
        self.model.forward_features(images)


def capture(model: nn.Module, images: Tensor, **request: Any) -> Captured:
    """One-shot capture: ``capture(model, x, attention=True, block_output=[3])``.

    Dispatches to :class:`ViTCapture` or :class:`SwinCapture`; hooks never outlive the call.
    """
    backbone = unwrap_backbone(model)
    cls = ViTCapture if is_vit(backbone) else SwinCapture
    with cls(backbone, **request) as cap:
        return cap(images)
