"""One streaming pass of registered analyses over a data loader (the contract the CLI builds on).

``run_analyses(model, loader, analyses, model_name=...)`` makes ONE pass over ``loader``: it looks the
requested analyses up in :mod:`analysis.registry` (refusing those the model's geometry does not
support, with the registry's one message), builds each analysis' accumulator from a
:class:`~analysis.registry.Context` (model, geometry, :class:`RunOptions`, seed), captures the union of
what they need (:mod:`analysis.capture`), streams every micro-batch into every accumulator as a
:class:`~analysis.registry.Batch`, and collects the rows and arrays their ``finish`` returns.
Results do not depend on the batch size. Batches are dicts with ``"image"`` (and optional
``"label"``), ``(image, label, ...)`` tuples or bare image tensors.

Result (:class:`analysis.results.AnalysisResult`):

``table`` (:data:`analysis.results.TABLE_COLUMNS`: model, layer, head, column, metric, value, ci_low,
ci_high, n_images), ``layer`` 1..L (0 = embedding), ``head`` -1 for the mean over heads / not per
head, ``ci_low``/``ci_high`` the 95% interval over images of a mean over images
(:mod:`analysis.uncertainty`). Metrics: ``attention-distance`` (px), ``nmi``,
``attention-entropy`` (nats), per (layer, head) and mean; ``head-similarity`` (mean off-diagonal
head-head similarity per layer); ``fourier-high-frequency`` (layers 0..L); ``attention-shift-ratio``
and ``attention-shift-cosine`` (per layer, from ``pre-post``); the matrices ``cka``,
``attention-similarity`` (``layer`` x ``column``) and ``head-pair-similarity`` (``head`` x ``column``
per layer).

``arrays`` (each analysis lists its keys in :attr:`analysis.registry.Analysis.arrays`):

* ``attention_similarity`` (L, L), ``head_similarity`` (L, H, H): 1 - JSD (bits) or cosine.
* ``cka`` (L, L): linear CKA between block outputs.
* ``fourier`` (L+1, F), ``fourier_freqs`` (F,) in units of pi.
* ``tsne_xy`` (n, 2), ``tsne_labels`` (n,) (class, or image index without labels / with
  ``tsne_color="image"``), ``tsne_label_kind`` () ``"class"`` or ``"image"``, ``tsne_images`` (n,)
  image index (position in the stream), ``tsne_layer`` ().
* ``pre_post``: dict from :func:`analysis.tokens.pre_post_pca` plus ``layer`` and ``images``.
* ``inputs`` (M, C, H, W): the first M (= ``map_images``) input images, for overlays;
  ``labels`` (M,) when the loader gives labels.
* ``attention_maps`` (M, L, heads, Q, h, w) with ``attention_map_queries`` (Q, 2) grid positions.
* ``rollout`` (M, h, w) for the first M images and ``rollout_mean`` (h, w) over all images.
* ``attribution``: {method: (M, H, W), ``"target"``: (M,)}.

Which analyses support Swin models is a property of each registered analysis
(:func:`analysis.registry.supported`); today ``cka`` and ``tsne`` (block outputs).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from kamim.backbone import check_pool, model_geometry, unwrap_backbone
from kamim.precision import autocast

from . import registry
from .attention import uniform_attention_distance, uniform_attention_entropy, uniform_nmi
from .attribution import ATTRIBUTION_METHODS
from .capture import SwinCapture, ViTCapture
from .names import ANALYSES
from .registry import Batch, Context, on_device
from .results import AnalysisResult, Record, records_to_frame
from .rollout import HEAD_FUSIONS
from .similarity import ATTENTION_SIMILARITY_KINDS, CKA_ESTIMATORS, CKA_POOLS, CKAAccumulator, pool_features
from .tokens import PRE_POST_PCA

__all__ = [
    "ANALYSES",
    "CAPTURES",
    "RunOptions",
    "run_analyses",
    "capture_request",
    "pass_bytes",
    "cross_model_cka",
    "iterate_images",
    "uniform_attention_distance",
    "uniform_nmi",
    "uniform_attention_entropy",
]

#: The geometry kind -> capture class of that model family (a new family adds its capture here).
CAPTURES = {"vit": ViTCapture, "swin": SwinCapture}
#: What each registry need asks the capture for (``inputs`` / ``gradients`` need no capture).
_CAPTURE_OF_NEED = {"attention": "attention", "pre_attention": "pre_attention", "post_attention": "post_attention",
                    "tokens": "block_output"}


def __getattr__(name: str) -> Any:
    if name == "SWIN_ANALYSES":  # kept for old imports: the registry knows which analyses support Swin
        return registry.supported("swin")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class RunOptions:
    """Options of :func:`run_analyses` (pass them as keyword arguments).

    batch_size: images per forward pass (loader batches are split; results do not depend on it).
    similarity_kind: ``"jsd"`` or ``"cosine"`` for attention similarity.
    cka_pool / cka_estimator / cka_chunk: see :mod:`analysis.similarity`.
    tsne_layer (default L), tsne_samples (reservoir size, tokens), tsne_perplexity, tsne_iterations
    (>= 250), tsne_threads (OpenMP threads of sklearn's t-SNE; None = all), tsne_color (``"class"``
    or ``"image"``).
    pre_post_layer (default L), pre_post_images (images kept for the PCA), pre_post_pca (``"separate"``:
    a PCA per token set; ``"joint"``: one PCA fitted on both sets, as the KAMIM fork).
    matrix_scale: colour range of the similarity matrices (CKA, attention similarity): ``"shared"``
    ([0, 1] in every figure) or ``"figure"`` (each figure's data range).
    rank_pool: pooling of the features of representation-rank (``"avg"`` or ``"cls"``).
    pca_images: images of the PCA images (fitted jointly); pca_foreground: fit the RGB components on
    the foreground patches only (first component thresholded, DINOv2).
    norm_outlier_mads: a patch token is high-norm above its image's median norm + this many MADs.
    map_images: first M images kept for attention maps, rollout and attribution.
    map_queries: grid positions ``(row, col)``; default the centre patch.
    head_fusion: rollout head fusion. attribution_methods, attribution_model (a classifier; default
    the model itself if it has a head), attribution_target (``"prediction"``: the predicted class,
    or ``"label"``: the loader's labels), attribution_steps, attribution_internal_batch_size.
    amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None.
    """

    batch_size: int = 32
    similarity_kind: str = "jsd"
    cka_pool: str = "avg"
    cka_estimator: str = "minibatch"
    cka_chunk: int = 256
    tsne_layer: int | None = None
    tsne_samples: int = 1000
    tsne_perplexity: float = 20.0
    tsne_iterations: int = 1000
    tsne_threads: int | None = None
    tsne_color: str = "class"
    pre_post_layer: int | None = None
    pre_post_images: int = 8
    pre_post_pca: str = "separate"
    matrix_scale: str = "shared"
    rank_pool: str = "avg"
    pca_images: int = 4
    pca_foreground: bool = False
    norm_outlier_mads: float = 10.0
    map_images: int = 4
    map_queries: tuple[tuple[int, int], ...] | None = None
    head_fusion: str = "mean"
    attribution_methods: tuple[str, ...] = ATTRIBUTION_METHODS
    attribution_model: nn.Module | None = None
    attribution_target: str = "prediction"
    attribution_steps: int = 32
    attribution_internal_batch_size: int = 16
    amp_dtype: torch.dtype | None = None

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> RunOptions:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}")
        opts = cls(**options)
        for name in ("batch_size", "tsne_samples", "pre_post_images", "map_images", "cka_chunk", "pca_images",
                     "attribution_steps", "attribution_internal_batch_size", "tsne_iterations"):
            value = getattr(opts, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"option {name} must be a positive int, got {value!r}")
        if opts.tsne_threads is not None and (isinstance(opts.tsne_threads, bool) or not isinstance(opts.tsne_threads, int)
                                              or opts.tsne_threads < 1):
            raise ValueError(f"option tsne_threads must be None or a positive int, got {opts.tsne_threads!r}")
        check_pool(opts.cka_pool, CKA_POOLS, key="option cka_pool")
        if not isinstance(opts.pca_foreground, bool):
            raise ValueError(f"option pca_foreground must be true or false, got {opts.pca_foreground!r}")
        choices = {"similarity_kind": ATTENTION_SIMILARITY_KINDS,
                   "cka_estimator": CKA_ESTIMATORS, "tsne_color": ("class", "image"), "head_fusion": HEAD_FUSIONS,
                   "attribution_target": ("prediction", "label"), "pre_post_pca": PRE_POST_PCA,
                   "matrix_scale": ("shared", "figure")}
        for name, allowed in choices.items():
            if getattr(opts, name) not in allowed:
                raise ValueError(f"option {name}={getattr(opts, name)!r} is invalid; expected one of {allowed}")
        methods = (opts.attribution_methods,) if isinstance(opts.attribution_methods, str) else tuple(opts.attribution_methods)
        bad = [m for m in methods if m not in ATTRIBUTION_METHODS]
        if bad or not methods:
            raise ValueError(f"attribution_methods {methods!r} invalid; expected a subset of {ATTRIBUTION_METHODS}")
        return replace(opts, attribution_methods=methods)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["attribution_model"] = None if self.attribution_model is None else type(self.attribution_model).__name__
        out["amp_dtype"] = None if self.amp_dtype is None else str(self.amp_dtype)
        return out


# --------------------------------------------------------------------------------------------
# data


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"batch dicts need an 'image' entry, got keys {sorted(batch)}")
        images, labels = batch["image"], batch.get("label")
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty batch tuple")
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        images, labels = batch, None
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"batch images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (B,) = ({images.shape[0]},), got {tuple(labels.shape)}")
    return images, labels


def iterate_images(loader: Iterable, max_images: int | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(images, labels)`` from any supported loader, stopping after exactly ``max_images``."""
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
    seen = 0
    for batch in loader:
        images, labels = _split_batch(batch)
        if max_images is not None and seen + images.shape[0] > max_images:
            keep = max_images - seen
            images, labels = images[:keep], (labels[:keep] if labels is not None else None)
        if images.shape[0] == 0:
            continue
        seen += images.shape[0]
        yield images, labels
        if max_images is not None and seen >= max_images:
            return


def _progress(loader: Iterable, max_images: int | None, enabled: bool, desc: str):
    from kamim.progress import progress

    total = max_images
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        total = len(dataset) if total is None else min(total, len(dataset))
    return progress(total=total, unit="img", desc=desc, enabled=enabled)


# --------------------------------------------------------------------------------------------
# run_analyses


def pass_bytes(geometry: Any, batch_size: int, needs: Iterable[str], bytes_per_value: int = 4) -> int:
    """A lower bound of the memory one batch of the analysis pass holds at its peak, to refuse a run that
    cannot fit before it starts: what the union of registry ``needs`` captures over every block (a ViT's
    attention maps ``B x heads x N x N``, token tensors ``B x N x D``), plus the largest transients of
    one block (its MLP's hidden tokens; with attention captured, the unfused path's scores before the
    softmax, whose output is the captured map). Weights and the analyses' own temporaries are not
    counted: ``bench/bench_analysis_memory.py`` measures the pass at 1.0x (rollout) to 2.9x (the four
    attention statistics) this at 288 and 384 px."""
    needs, b, v = set(needs), int(batch_size), int(bytes_per_value)
    if geometry.to_dict()["kind"] != "vit":  # Swin: windowed attention, memory linear in the tokens
        stage = [b * gh * gw * dim * v for (gh, gw), dim in zip(geometry.stage_grids, geometry.stage_dims)]
        held = sum(depth * t for depth, t in zip(geometry.stage_depths, stage)) if "tokens" in needs else 0
        return held + 4 * max(stage)
    n, heads, dim, depth = geometry.num_tokens, geometry.num_heads, geometry.embed_dim, geometry.depth
    scores, tokens = b * heads * n * n * v, b * n * dim * v
    held = (depth + 1) * scores if "attention" in needs else 0  # fused attention (SDPA) holds no scores
    held += depth * tokens * sum(k in needs for k in ("pre_attention", "post_attention", "tokens"))
    held += tokens if "embedding" in needs else 0
    return held + 4 * tokens


def capture_request(needs: Iterable[str], num_prefix_tokens: int | None = None) -> dict[str, Any] | None:
    """Keyword arguments of the capture class for the union of registry ``needs``; None when the
    analyses need no forward pass (only ``inputs`` / ``gradients``)."""
    needs = set(needs)
    request: dict[str, Any] = {key: True for need, key in _CAPTURE_OF_NEED.items() if need in needs}
    if "embedding" in needs:
        request["embedding"] = True
    if not request:
        return None
    return {**request, "num_prefix_tokens": num_prefix_tokens}


def run_analyses(
    model: nn.Module,
    loader: Iterable,
    analyses: Iterable[str] | str,
    *,
    model_name: str,
    max_images: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_prefix_tokens: int | None = None,
    progress: bool = True,
    **options: Any,
) -> AnalysisResult:
    """Run the requested registered ``analyses`` (:func:`analysis.registry.names`) in one pass over ``loader``.

    See the module docstring for the result layout and :class:`RunOptions` for ``**options``.
    Raises ``ValueError`` for unknown or unsupported analyses, bad options, an empty loader, or
    images that do not match the model's input size.
    """
    backbone = unwrap_backbone(model)
    geometry = model_geometry(backbone, num_prefix_tokens)
    chosen = registry.check_supported(analyses, geometry)
    opts = RunOptions.from_kwargs(options)
    device = torch.device(device)
    context = Context(model_name, geometry, opts, seed, model, device)
    accumulators = [analysis.accumulator(context) for analysis in chosen]  # options are validated here
    request = capture_request(set().union(*(a.needs for a in chosen)), num_prefix_tokens)
    kind = registry.geometry_kind(geometry)
    capturing = CAPTURES[kind](backbone, **request) if request else nullcontext()

    images = 0
    with on_device(backbone, device), capturing as cap, _progress(loader, max_images, progress, model_name) as bar:
        for x_all, y_all in iterate_images(loader, max_images):
            for start in range(0, x_all.shape[0], opts.batch_size):
                x = x_all[start : start + opts.batch_size].to(device, non_blocking=True)
                y = y_all[start : start + opts.batch_size] if y_all is not None else None
                out = None
                if cap is not None:
                    with autocast(device, opts.amp_dtype):
                        out = cap(x)
                batch = Batch(x, y, torch.arange(images, images + x.shape[0]), out, geometry)
                for acc in accumulators:
                    acc.update(batch)
                images += x.shape[0]
                bar.update(x.shape[0])
    if images == 0:
        raise ValueError("the loader yielded no images")
    records: list[Record] = []
    arrays: dict[str, Any] = {}
    for acc in accumulators:
        rows, values = acc.finish()
        records += rows
        arrays.update(values)  # shared keys (inputs, labels) hold the same images
    return AnalysisResult(
        model_name=model_name,
        table=records_to_frame(records),
        arrays=arrays,
        geometry=geometry,
        images=images,
        analyses=tuple(a.name for a in chosen),
        options={**opts.to_dict(), "seed": seed, "max_images": max_images, "device": str(device)},
    )


# --------------------------------------------------------------------------------------------
# cross-model CKA


def cross_model_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    *,
    model_names: tuple[str, str] = ("a", "b"),
    max_images: int | None = None,
    device: str | torch.device = "cpu",
    pool: str = "avg",
    estimator: str = "minibatch",
    chunk_size: int = 256,
    batch_size: int = 32,
    num_prefix_tokens: tuple[int | None, int | None] = (None, None),
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Linear CKA between the block outputs of two models on the same images: ``arrays["cka"]`` (La, Lb).

    The table holds ``cka-same-layer`` (CKA of layer l of a with layer l of b) for the common depths.
    Both models must accept the loader's image size (no silent resizing).
    """
    a, b = unwrap_backbone(model_a), unwrap_backbone(model_b)
    ga, gb = model_geometry(a, num_prefix_tokens[0]), model_geometry(b, num_prefix_tokens[1])
    device = torch.device(device)
    acc = CKAAccumulator(estimator=estimator, chunk_size=chunk_size, cross=True)
    for g, model in ((ga, a), (gb, b)):
        check_pool(pool, CKA_POOLS, has_class_token=bool(getattr(g, "has_class_token", False)),
                   name=type(model).__name__)
    seen = 0
    caps = []
    for m, g, p in ((a, ga, num_prefix_tokens[0]), (b, gb, num_prefix_tokens[1])):
        caps.append(CAPTURES[registry.geometry_kind(g)](m, **capture_request({"tokens"}, p)))
    name = f"{model_names[0]} vs {model_names[1]}"
    with on_device(a, device), on_device(b, device), caps[0] as cap_a, caps[1] as cap_b, \
            _progress(loader, max_images, progress, name) as bar:
        for images, _ in iterate_images(loader, max_images):
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True)
                with autocast(device, amp_dtype):
                    out_a, out_b = cap_a(x), cap_b(x)
                feats_a = [pool_features(out_a.block_output[l], ga.num_prefix_tokens, pool, getattr(ga, "has_class_token", False))
                           for l in range(1, ga.depth + 1)]
                feats_b = [pool_features(out_b.block_output[l], gb.num_prefix_tokens, pool, getattr(gb, "has_class_token", False))
                           for l in range(1, gb.depth + 1)]
                acc.update(feats_a, feats_b)
                seen += x.shape[0]
                bar.update(x.shape[0])
    if seen == 0:
        raise ValueError("the loader yielded no images")
    matrix = acc.compute()
    common = min(ga.depth, gb.depth)
    records = [Record(name, l, -1, "cka-same-layer", float(matrix[l - 1, l - 1]), seen) for l in range(1, common + 1)]
    return AnalysisResult(
        model_name=name, table=records_to_frame(records), arrays={"cka": matrix}, geometry=ga, images=seen,
        analyses=("cka",),
        options={"pool": pool, "estimator": estimator, "chunk_size": chunk_size, "geometry_b": gb.to_dict(),
                 "max_images": max_images, "device": str(device)},
    )
