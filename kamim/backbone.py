"""The backbone layer: geometry, layer numbering and features of a timm ViT or Swin, defined once.

Evaluation (:mod:`kamim.eval`), analysis (:mod:`analysis`) and checkpoint loading
(:mod:`kamim.checkpoints`) all read a model through this module. It depends on torch and timm only.

Layer numbering (one convention for ViT and Swin, like Hugging Face ``hidden_states``):

* layer ``k`` (1-based) is the output of transformer block ``k``, taken *before* the final norm.
  For a ViT, block ``k`` is ``model.blocks[k - 1]``; for a Swin, blocks are counted across all
  stages (``[blk for stage in model.layers for blk in stage.blocks]``), so a Swin-T has layers
  ``1..12`` (stages of 2, 2, 6, 2 blocks).
* layer ``0`` is the patch-embedding output where a consumer allows it (analysis: the input of
  block 1 after position embedding and ``norm_pre`` for a ViT, the patch embedding for a Swin);
  :func:`resolve_layers` (evaluation) offers ``1..L`` only.
* negative layers count from the end (``-1`` = last block).
* stages are offered explicitly: the layer-spec item ``"stage:K"`` (1-based, Swin only) selects the
  output of stage ``K`` of ``model.layers``, which is the output of its last block, i.e. layer
  ``sum(stage_depths[:K])``. Features are keyed by that layer number.

The KAMIM reference probe (``hidden_states[8]`` of a 12-block ViT, patch tokens averaged) is
``layer_features(model, x, 8, pool="avg")``; :func:`default_layer` scales it to the depth (2/3;
last block for Swin).

Pooling has one set of names in every command and function (:data:`POOLS`): ``"avg"`` averages the
patch tokens (prefix tokens dropped) of a ViT block or the spatial map of a Swin block, ``"cls"`` takes
the class token (ViT with a class token); ``None`` returns the unpooled token sequence ``(B, N, C)``
(prefix tokens first; a Swin block's ``h*w`` tokens in row-major order). The older names ``"mean"``
and ``"token"`` are refused with a one-line error naming the new ones (:func:`check_pool`).

Geometry (:data:`Geometry`: :class:`ViTGeometry` or :class:`SwinGeometry`) is read from the model,
never assumed: image size, patch size, token grid, depth (blocks), heads, widths, prefix tokens and,
for Swin, the stages (blocks, widths, heads and grids per stage).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union

import torch
from timm.layers import to_2tuple
from torch import Tensor, nn

__all__ = [
    "Geometry",
    "ViTGeometry",
    "SwinGeometry",
    "NotABackboneError",
    "LayerSpec",
    "Pool",
    "POOLS",
    "check_pool",
    "pool_tokens",
    "to_hw",
    "is_vit",
    "is_swin",
    "is_token_model",
    "unwrap",
    "unwrap_backbone",
    "model_geometry",
    "geometry_from_dict",
    "num_layers",
    "default_layer",
    "resolve_layers",
    "feature_dims",
    "expected_input_size",
    "check_input_size",
    "layer_features",
    "layer_columns",
]

Pool = Literal["avg", "cls"] | None
#: The pooling names of every command and function (:func:`layer_features` also takes None: unpooled).
POOLS: tuple[str, ...] = ("avg", "cls")
_RENAMED_POOLS = {"mean": "avg", "token": "cls"}  # names used before; refused, naming the new one
LayerSpec = Union[int, str, Sequence[Union[int, str]], None]


class NotABackboneError(TypeError, ValueError):
    """A model that is neither a timm ViT nor a timm Swin (one-line message; a user error in the CLIs)."""


def to_hw(size: Any, name: str = "size") -> tuple[int, int]:
    """``size`` (an int or an (H, W) pair of positive ints) as ``(H, W)``; one-line ValueError naming
    ``name`` otherwise. The one to-(H, W) helper of kamim and analysis."""
    try:
        pair = to_2tuple(size)
        if len(pair) != 2 or any(isinstance(v, bool) for v in pair):
            raise TypeError
        hw = (operator.index(pair[0]), operator.index(pair[1]))
    except TypeError:
        hw = None
    if hw is None or min(hw) <= 0:
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of positive ints, got {size!r}")
    return hw


# ------------------------------------------------------------------------------------------ model kinds
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


def unwrap(model: nn.Module) -> nn.Module:
    """The timm ViT/Swin under DDP, ``torch.compile`` and kamim pretraining wrappers (``.encoder``).

    Raises :class:`NotABackboneError` for anything else.
    """
    seen = model
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif is_vit(model) or is_swin(model):
            return model
        elif isinstance(getattr(model, "encoder", None), nn.Module):
            model = model.encoder
        else:
            raise NotABackboneError(
                f"expected a timm VisionTransformer or SwinTransformer (or a wrapper with .encoder), "
                f"got {type(seen).__name__}"
            )


#: The name analysis has used for :func:`unwrap`.
unwrap_backbone = unwrap


def is_token_model(model: nn.Module) -> bool:
    """True for ViT-like models (token sequences with prefix tokens), False for Swin."""
    return is_vit(unwrap(model))


# --------------------------------------------------------------------------------------------- geometry
def _check_layer(layer: Any, depth: int, allow_embedding: bool, what: str) -> int:
    low = 0 if allow_embedding else 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer <= depth:
        raise ValueError(f"{what} {layer!r} out of range: expected an int in [{low}, {depth}]")
    return int(layer)


@dataclass(frozen=True)
class ViTGeometry:
    """Token geometry of a ViT, read from the model (nothing assumed).

    ``img_size``, ``patch_size`` and ``grid`` are ``(height, width)``; ``num_prefix_tokens`` counts the
    class, distillation and register tokens that precede the ``grid[0] * grid[1]`` patch tokens.
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

    def layer_grid(self, layer: int) -> tuple[int, int]:
        """Patch-token grid of ``layer`` (the same for every layer of a ViT)."""
        self.check_layer(layer, allow_embedding=True)
        return self.grid

    def layer_dim(self, layer: int) -> int:
        """Token width of ``layer``."""
        self.check_layer(layer, allow_embedding=True)
        return self.embed_dim

    @classmethod
    def from_model(cls, model: nn.Module, num_prefix_tokens: int | None = None) -> ViTGeometry:
        """Read the geometry of a timm ``VisionTransformer`` (``num_prefix_tokens`` overrides the model's)."""
        model = unwrap(model)
        if not is_vit(model):
            raise NotABackboneError(f"ViTGeometry needs a timm VisionTransformer, got {type(model).__name__}")
        pe = model.patch_embed
        if getattr(pe, "img_size", None) is None or getattr(pe, "grid_size", None) is None:
            raise ValueError(f"{type(model).__name__} has no fixed img_size/grid_size; build it with img_size=...")
        prefix = int(model.num_prefix_tokens) if num_prefix_tokens is None else int(num_prefix_tokens)
        if prefix < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {prefix}")
        return cls(
            img_size=to_hw(pe.img_size),
            patch_size=to_hw(pe.patch_size),
            grid=to_hw(pe.grid_size),
            num_prefix_tokens=prefix,
            depth=len(model.blocks),
            num_heads=int(model.blocks[0].attn.num_heads),
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
    """Geometry of a timm ``SwinTransformer``: patch embedding, then stages of blocks.

    ``stage_grids``/``stage_dims``/``stage_depths``/``stage_heads`` hold, per stage, the token grid
    (H, W), the width, the number of blocks and the attention heads. Layers are blocks counted across
    stages (module docstring); stage ``K`` ends at layer :meth:`stage_layer` ``(K)``.
    """

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
        """Number of blocks over all stages."""
        return sum(self.stage_depths)

    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def num_stages(self) -> int:
        return len(self.stage_depths)

    @property
    def embed_dim(self) -> int:
        """Width of the patch embedding (and of stage 1)."""
        return self.stage_dims[0]

    @property
    def num_features(self) -> int:
        """Width of the last stage."""
        return self.stage_dims[-1]

    def stage_layer(self, stage: int) -> int:
        """Layer number of the last block of ``stage`` (1-based): the stage's output."""
        if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage {stage!r} is out of range: the Swin has stages 1..{self.num_stages}")
        return sum(self.stage_depths[:stage])

    def stage_of(self, layer: int) -> int:
        """Stage (1-based) holding block ``layer``; 0 for the patch embedding (layer 0)."""
        self.check_layer(layer, allow_embedding=True)
        stage, end = 0, 0
        while end < layer:
            end += self.stage_depths[stage]
            stage += 1
        return stage

    def layer_grid(self, layer: int) -> tuple[int, int]:
        """Token grid of ``layer`` (0 = patch embedding)."""
        stage = self.stage_of(layer)
        return self.stage_grids[stage - 1] if stage else self.grid

    def layer_dim(self, layer: int) -> int:
        """Token width of ``layer`` (0 = patch embedding)."""
        stage = self.stage_of(layer)
        return self.stage_dims[stage - 1] if stage else self.embed_dim

    @classmethod
    def from_model(cls, model: nn.Module, num_prefix_tokens: int | None = None) -> SwinGeometry:
        model = unwrap(model)
        if not is_swin(model):
            raise NotABackboneError(f"SwinGeometry needs a timm SwinTransformer, got {type(model).__name__}")
        if num_prefix_tokens not in (None, 0):
            raise ValueError(f"Swin has no prefix tokens, got num_prefix_tokens={num_prefix_tokens}")
        pe = model.patch_embed
        stages = list(model.layers)
        return cls(
            img_size=to_hw(pe.img_size),
            patch_size=to_hw(pe.patch_size),
            grid=to_hw(pe.grid_size),
            stage_grids=tuple(to_hw(s.output_resolution) for s in stages),
            stage_dims=tuple(int(s.blocks[0].norm1.normalized_shape[0]) for s in stages),
            stage_depths=tuple(len(s.blocks) for s in stages),
            stage_heads=tuple(int(s.blocks[0].attn.num_heads) for s in stages),
        )

    def check_layer(self, layer: int, *, allow_embedding: bool = False, what: str = "layer") -> int:
        return _check_layer(layer, self.depth, allow_embedding, what)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "swin", **asdict(self)}


#: The geometry of a supported backbone.
Geometry = ViTGeometry | SwinGeometry


def geometry_from_dict(data: dict[str, Any]) -> Geometry:
    """Inverse of ``ViTGeometry.to_dict`` / ``SwinGeometry.to_dict`` (e.g. after a JSON round trip)."""
    data = dict(data)
    kind = data.pop("kind", "vit")
    if kind not in ("vit", "swin"):
        raise ValueError(f"unknown geometry kind {kind!r}; expected 'vit' or 'swin'")

    def tuples(value: Any) -> Any:
        return tuple(tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

    data = {k: tuples(v) for k, v in data.items()}
    return ViTGeometry(**data) if kind == "vit" else SwinGeometry(**data)


def model_geometry(model: nn.Module, num_prefix_tokens: int | None = None) -> Geometry:
    """Geometry of a timm ViT or Swin model (or a DDP/compile/``.encoder`` wrapper of one)."""
    model = unwrap(model)
    if is_vit(model):
        return ViTGeometry.from_model(model, num_prefix_tokens)
    return SwinGeometry.from_model(model, num_prefix_tokens)


# ------------------------------------------------------------------------------------------------ layers
def num_layers(model: nn.Module) -> int:
    """Number of layers (blocks; for a Swin counted across stages)."""
    return model_geometry(model).depth


def default_layer(model: nn.Module) -> int:
    """The reference's probe layer scaled to depth: block 8 of 12 (2/3 depth) for a ViT, the last block for Swin."""
    g = model_geometry(model)
    return max(1, round(2 * g.depth / 3)) if isinstance(g, ViTGeometry) else g.depth


_SPEC_HELP = "expected 'all', 'last', 'default', 'stage:K' or integers like '8' or '1,4,8'"


def _parse_layer_spec(spec: LayerSpec) -> list[int | str]:
    if spec is None:
        return ["default"]
    if isinstance(spec, bool):
        raise ValueError(f"layer spec {spec!r} is not valid; {_SPEC_HELP}")
    if isinstance(spec, int):
        return [spec]
    parts = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    items: list[int | str] = []
    for part in parts:
        if isinstance(part, str) and (part in ("all", "last", "default") or part.startswith("stage:")):
            items.append(part)
            continue
        try:
            if isinstance(part, bool):
                raise ValueError
            items.append(int(part))
        except (TypeError, ValueError):
            raise ValueError(f"layer spec {spec!r} is not valid; {_SPEC_HELP}") from None
    return items


def _stage_layer(g: Geometry, item: str, name: str) -> int:
    if not isinstance(g, SwinGeometry):
        raise ValueError(f"layer spec '{item}' selects a stage but {name} has no stages; use block layers 1..{g.depth}")
    try:
        stage = int(item[len("stage:"):])
    except ValueError:
        raise ValueError(f"layer spec '{item}' is not valid; expected stage:K with K in 1..{g.num_stages}") from None
    if not 1 <= stage <= g.num_stages:
        raise ValueError(f"'{item}' is out of range: {name} has {g.num_stages} stages (stage:1..stage:{g.num_stages})")
    return g.stage_layer(stage)


def resolve_layers(model: nn.Module, spec: LayerSpec = None) -> list[int]:
    """Turn a layer spec into sorted 1-based block layers (see the module docstring).

    Specs: ``None``/'default', 'all', 'last', 8, -1, '1,4,8', [1, 4], 'stage:2' (Swin), '4,stage:3'.
    Raises ValueError naming the valid range for an out-of-range layer or stage.
    """
    g = model_geometry(model)
    n = g.depth
    name = type(unwrap(model)).__name__
    out: set[int] = set()
    for item in _parse_layer_spec(spec):
        if item == "all":
            out.update(range(1, n + 1))
        elif item == "last":
            out.add(n)
        elif item == "default":
            out.add(default_layer(model))
        elif isinstance(item, str):
            out.add(_stage_layer(g, item, name))
        else:
            if not (1 <= item <= n or -n <= item <= -1):
                stages = f" in {g.num_stages} stages" if isinstance(g, SwinGeometry) else ""
                also = f" or stage:1..stage:{g.num_stages}" if isinstance(g, SwinGeometry) else ""
                raise ValueError(
                    f"layer {item} is out of range: {name} has {n} blocks{stages}, "
                    f"valid layers are 1..{n} (or -{n}..-1){also}"
                )
            out.add(item if item > 0 else n + 1 + item)
    if not out:
        raise ValueError(f"layer spec {spec!r} selects no layer")
    return sorted(out)


def feature_dims(model: nn.Module, layers: Iterable[int]) -> dict[int, int]:
    """Channel width of each (1-based) layer's features."""
    g = model_geometry(model)
    return {k: g.layer_dim(k) for k in layers}


# ------------------------------------------------------------------------------------------ input checks
def expected_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) the model requires, or None when it accepts any size divisible by its patch size."""
    pe = unwrap(model).patch_embed
    size = getattr(pe, "img_size", None)
    if size is None or not getattr(pe, "strict_img_size", True):
        return None
    return to_hw(size)


def check_input_size(model: nn.Module, shape: Sequence[int]) -> None:
    """Raise ValueError naming both shapes when images of ``shape`` (..., C, H, W) do not fit the model."""
    model = unwrap(model)
    h, w = int(shape[-2]), int(shape[-1])
    chans = int(shape[-3]) if len(shape) >= 3 else None
    pe = model.patch_embed
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    want = expected_input_size(model)
    if want is not None and (h, w) != want or (in_chans is not None and chans is not None and chans != in_chans):
        exp = f"{in_chans or 3}x{want[0]}x{want[1]}" if want else f"{in_chans or 3}xHxW"
        raise ValueError(
            f"input images are {chans}x{h}x{w} but the model expects {exp} "
            "(use an eval transform with the model's image size, or a checkpoint trained at this size)"
        )
    if want is None:
        ph, pw = to_hw(getattr(pe, "patch_size", 1))
        if not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(f"input images are {h}x{w}, not divisible by the model's patch size {ph}x{pw}")


# ---------------------------------------------------------------------------------------------- features
def check_pool(pool: Any, choices: Sequence[str] = POOLS, *, has_class_token: bool | None = None,
               name: str = "the model", key: str = "pool") -> str:
    """``pool`` if it is one of ``choices`` (and, for ``"cls"``, the model has a class token); else a
    one-line ValueError naming ``key``, the valid names and, for an old name, the one that replaced it."""
    if pool in _RENAMED_POOLS and _RENAMED_POOLS[pool] in choices:
        raise ValueError(f"{key} {pool!r} is now called {_RENAMED_POOLS[pool]!r} (pooling names: "
                         f"{', '.join(choices)})")
    if pool not in choices:
        raise ValueError(f"{key} {pool!r} is not valid; expected one of: {', '.join(map(str, choices))}")
    if pool == "cls" and has_class_token is False:
        raise ValueError(f"{key}='cls' needs a class token but {name} has none; use {key}='avg'")
    return pool


def pool_tokens(tokens: Tensor, num_prefix_tokens: int, pool: str) -> Tensor:
    """``(B, N, C)`` tokens (prefix tokens first) pooled to ``(B, C)``: ``"avg"`` over the patch tokens,
    ``"cls"`` the class token (token 0)."""
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    if pool == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("pool='cls' needs a class token but these tokens have no prefix token")
        return tokens[:, 0]
    raise ValueError(f"pool {pool!r} is not valid; expected one of: {', '.join(POOLS)}")


def _vit_features(model: nn.Module, images: Tensor, ks: list[int], pool: Pool, norm: bool) -> list[Tensor]:
    outs = model.forward_intermediates(
        images, indices=[k - 1 for k in ks], norm=norm, stop_early=True, output_fmt="NLC",
        intermediates_only=True, return_prefix_tokens=pool != "avg",
    )
    if pool == "avg":
        return [tokens.mean(dim=1) for tokens in outs]
    if pool == "cls":
        return [prefix[:, 0] for _, prefix in outs]
    return [torch.cat([prefix, tokens], dim=1) for tokens, prefix in outs]


def _swin_features(model: nn.Module, g: SwinGeometry, images: Tensor, ks: list[int], pool: Pool,
                   norm: bool) -> list[Tensor]:
    # timm's Swin forward_intermediates returns stage outputs only: block outputs (NHWC) come from
    # forward hooks, and forward_intermediates runs the stages up to the last one needed.
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    got: dict[int, Tensor] = {}

    def hook(k: int):
        def fn(module: nn.Module, args: tuple, output: Tensor) -> None:
            got[k] = output
        return fn

    handles = [blocks[k - 1].register_forward_hook(hook(k)) for k in ks]
    try:
        model.forward_intermediates(images, indices=[g.stage_of(max(ks)) - 1], norm=False, stop_early=True,
                                    intermediates_only=True)
    finally:
        for h in handles:
            h.remove()
    feats = []
    for k in ks:
        x = model.norm(got[k]) if norm and k == g.depth else got[k]  # timm: the final norm fits the last stage only
        feats.append(x.mean(dim=(1, 2)) if pool == "avg" else x.reshape(x.shape[0], -1, x.shape[-1]))
    return feats


def layer_features(
    model: nn.Module, images: Tensor, layers: LayerSpec = None, pool: Pool = "avg", *, norm: bool = False,
) -> dict[int, Tensor]:
    """Features of every requested layer (module docstring) from one forward pass, keyed by layer.

    ``pool``: ``"avg"`` (B, C), ``"cls"`` (B, C) or ``None`` (B, N, C). ``norm=True`` applies the
    model's final norm (ViT: to every layer, as timm's ``forward_intermediates``; Swin: to the last
    block, the only one of the norm's width). Gradients flow unless called under ``torch.no_grad``.
    """
    backbone = unwrap(model)
    g = model_geometry(backbone)
    if pool is not None:
        check_pool(pool, has_class_token=g.has_class_token, name=type(backbone).__name__)
    ks = resolve_layers(backbone, layers)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
    check_input_size(backbone, images.shape)
    if isinstance(g, ViTGeometry):
        feats = _vit_features(backbone, images, ks, pool, norm)
    else:
        feats = _swin_features(backbone, g, images, ks, pool, norm)
    return dict(zip(ks, feats))


def layer_columns(model_or_geometry: nn.Module | Geometry, layer: int) -> dict[str, int]:
    """The columns naming ``layer`` in a results row: ``{"layer": k}`` (block ``k``), and for a Swin
    also ``"stage"``, the stage holding that block (layer numbers mean blocks for ViT and Swin alike)."""
    g = model_or_geometry if isinstance(model_or_geometry, (ViTGeometry, SwinGeometry)) else model_geometry(
        unwrap(model_or_geometry))
    g.check_layer(layer, allow_embedding=True)
    return {"layer": int(layer), "stage": g.stage_of(layer)} if isinstance(g, SwinGeometry) else {"layer": int(layer)}
