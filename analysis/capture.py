"""Capture of intermediate activations from timm vision transformers.

Layer numbering used everywhere in :mod:`analysis`: layer ``l`` in ``1..L`` is the output
(or the internals) of block ``l - 1``; layer ``0`` is the embedding output, i.e. the input of
block 0 after position embedding (and ``norm_pre``).

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
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
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


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return value  # type: ignore[return-value]


def _check_layer(layer: Any, depth: int, allow_embedding: bool, what: str) -> int:
    low = 0 if allow_embedding else 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer <= depth:
        raise ValueError(f"{what} {layer!r} out of range: expected an int in [{low}, {depth}]")
    return int(layer)


def is_vit(model: nn.Module) -> bool:
    """True for timm ``VisionTransformer``-like models (patch_embed + blocks + forward_intermediates)."""
    return (
        hasattr(model, "patch_embed")
        and isinstance(getattr(model, "blocks", None), nn.Sequential)
        and hasattr(model, "forward_intermediates")
        and hasattr(model, "num_prefix_tokens")
    )


def is_swin(model: nn.Module) -> bool:
    """True for timm ``SwinTransformer``-like models (patch_embed + stages of ``blocks``)."""
    layers = getattr(model, "layers", None)
    return (
        hasattr(model, "patch_embed")
        and isinstance(layers, nn.Sequential)
        and len(layers) > 0
        and all(hasattr(stage, "blocks") for stage in layers)
    )


def unwrap_backbone(model: nn.Module) -> nn.Module:
    """Return the timm backbone: ``model`` itself, or ``model.encoder`` for kamim pretraining wrappers."""
    if is_vit(model) or is_swin(model):
        return model
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and (is_vit(encoder) or is_swin(encoder)):
        return encoder
    raise TypeError(
        f"expected a timm VisionTransformer or SwinTransformer (or a wrapper with .encoder), "
        f"got {type(model).__name__}"
    )


@dataclass(frozen=True)
class ViTGeometry:
    """Token geometry of a ViT, read from the model (nothing assumed).

    ``patch_size`` and ``grid`` are ``(height, width)``; ``num_prefix_tokens`` counts the class,
    distillation and register tokens that precede the ``grid[0] * grid[1]`` patch tokens.
    """

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int
    depth: int
    num_heads: int
    embed_dim: int
    has_class_token: bool = True

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def num_layers(self) -> int:
        """Number of blocks ``L`` (layers are numbered ``1..L``, ``0`` is the embedding)."""
        return self.depth

    @classmethod
    def from_model(cls, model: nn.Module, num_prefix_tokens: int | None = None) -> ViTGeometry:
        """Read the geometry of a timm ``VisionTransformer`` (``num_prefix_tokens`` overrides the model's)."""
        model = unwrap_backbone(model)
        if not is_vit(model):
            raise TypeError(f"ViTGeometry needs a timm VisionTransformer, got {type(model).__name__}")
        pe = model.patch_embed
        if getattr(pe, "img_size", None) is None or getattr(pe, "grid_size", None) is None:
            raise ValueError(f"{type(model).__name__} has no fixed img_size/grid_size; build it with img_size=...")
        prefix = int(model.num_prefix_tokens) if num_prefix_tokens is None else int(num_prefix_tokens)
        if prefix < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {prefix}")
        attn = model.blocks[0].attn
        return cls(
            img_size=_pair(pe.img_size),
            patch_size=_pair(pe.patch_size),
            grid=_pair(pe.grid_size),
            num_prefix_tokens=prefix,
            depth=len(model.blocks),
            num_heads=int(attn.num_heads),
            embed_dim=int(getattr(model, "embed_dim", model.num_features)),
            has_class_token=getattr(model, "cls_token", None) is not None,
        )

    def check_layer(self, layer: int, *, allow_embedding: bool = False, what: str = "layer") -> int:
        """Validate a layer number (``1..L``, or ``0..L`` with ``allow_embedding``)."""
        return _check_layer(layer, self.depth, allow_embedding, what)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "vit", **asdict(self)}


@dataclass(frozen=True)
class SwinGeometry:
    """Geometry of a timm ``SwinTransformer``: per-stage grids, widths and depths."""

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    stage_grids: tuple[tuple[int, int], ...]
    stage_dims: tuple[int, ...]
    stage_depths: tuple[int, ...]
    stage_heads: tuple[int, ...]
    num_prefix_tokens: int = 0
    has_class_token: bool = False

    @property
    def depth(self) -> int:
        return sum(self.stage_depths)

    @property
    def num_layers(self) -> int:
        return self.depth

    def layer_grid(self, layer: int) -> tuple[int, int]:
        """Token grid of layer ``layer`` (0 = patch embedding)."""
        self.check_layer(layer, allow_embedding=True)
        if layer == 0:
            return self.grid
        stage = 0
        remaining = layer
        while remaining > self.stage_depths[stage]:
            remaining -= self.stage_depths[stage]
            stage += 1
        return self.stage_grids[stage]

    @classmethod
    def from_model(cls, model: nn.Module, num_prefix_tokens: int | None = None) -> SwinGeometry:
        model = unwrap_backbone(model)
        if not is_swin(model):
            raise TypeError(f"SwinGeometry needs a timm SwinTransformer, got {type(model).__name__}")
        if num_prefix_tokens not in (None, 0):
            raise ValueError(f"Swin has no prefix tokens, got num_prefix_tokens={num_prefix_tokens}")
        pe = model.patch_embed
        grids, dims, depths, heads = [], [], [], []
        for stage in model.layers:
            grids.append(_pair(stage.output_resolution))
            dims.append(int(stage.blocks[0].norm1.normalized_shape[0]))
            depths.append(len(stage.blocks))
            heads.append(int(stage.blocks[0].attn.num_heads))
        return cls(
            img_size=_pair(pe.img_size),
            patch_size=_pair(pe.patch_size),
            grid=_pair(pe.grid_size),
            stage_grids=tuple(grids),
            stage_dims=tuple(dims),
            stage_depths=tuple(depths),
            stage_heads=tuple(heads),
        )

    def check_layer(self, layer: int, *, allow_embedding: bool = False, what: str = "layer") -> int:
        return _check_layer(layer, self.depth, allow_embedding, what)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "swin", **asdict(self)}


def geometry_from_dict(data: dict[str, Any]) -> ViTGeometry | SwinGeometry:
    """Inverse of ``ViTGeometry.to_dict`` / ``SwinGeometry.to_dict`` (e.g. after a JSON round trip)."""
    data = dict(data)
    kind = data.pop("kind", "vit")
    if kind not in ("vit", "swin"):
        raise ValueError(f"unknown geometry kind {kind!r}; expected 'vit' or 'swin'")

    def tuples(value: Any) -> Any:
        return tuple(tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

    data = {k: tuples(v) for k, v in data.items()}
    return ViTGeometry(**data) if kind == "vit" else SwinGeometry(**data)


def model_geometry(model: nn.Module, num_prefix_tokens: int | None = None) -> ViTGeometry | SwinGeometry:
    """Geometry of a timm ViT or Swin model."""
    model = unwrap_backbone(model)
    if is_vit(model):
        return ViTGeometry.from_model(model, num_prefix_tokens)
    return SwinGeometry.from_model(model, num_prefix_tokens)


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
