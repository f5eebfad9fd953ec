"""One streaming pass of representation analyses over a data loader (the contract the CLI builds on).

``run_analyses(model, loader, analyses, model_name=...)`` makes ONE pass over ``loader``, captures
only what the requested analyses need (see :mod:`analysis.capture`), and streams every micro-batch
into bounded-memory accumulators whose results do not depend on the batch size. Batches are dicts
with ``"image"`` (and optional ``"label"``), ``(image, label, ...)`` tuples or bare image tensors.

Result (:class:`analysis.results.AnalysisResult`):

``table`` (model, layer, head, metric, value, images), ``layer`` 1..L (0 = embedding), ``head`` -1
for the mean over heads / not per head. Metrics: ``attention-distance`` (px), ``nmi``,
``attention-entropy`` (nats), per (layer, head) and mean; ``head-similarity`` (mean off-diagonal
head-head similarity per layer); ``fourier-high-frequency`` (layers 0..L); ``attention-shift-ratio``
and ``attention-shift-cosine`` (per layer, from ``pre-post``).

``arrays``:

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

Swin models support ``cka`` and ``tsne`` only (block outputs).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .attention import (
    PatchAttention,
    AttentionDistance,
    AttentionEntropy,
    AttentionNMI,
    attention_maps,
    uniform_attention_distance,
    uniform_attention_entropy,
    uniform_nmi,
)
from .attribution import ATTRIBUTION_METHODS, attribute, predicted_class
from .capture import SwinCapture, ViTCapture, is_vit, model_geometry, unwrap_backbone
from .fourier import FourierAccumulator
from .names import ANALYSES
from .results import AnalysisResult, Record, records_to_frame
from .rollout import HEAD_FUSIONS, RolloutMap
from .similarity import (
    ATTENTION_SIMILARITY_KINDS,
    CKA_ESTIMATORS,
    CKA_POOLS,
    AttentionSimilarity,
    CKAAccumulator,
    HeadSimilarity,
    pool_features,
)
from .tokens import AttentionShift, Reservoir, pre_post_pca, tsne_embedding

__all__ = [
    "ANALYSES",
    "SWIN_ANALYSES",
    "RunOptions",
    "run_analyses",
    "cross_model_cka",
    "iterate_images",
    "uniform_attention_distance",
    "uniform_nmi",
    "uniform_attention_entropy",
]

SWIN_ANALYSES = ("cka", "tsne")
_ATTENTION = {"attention-distance", "nmi", "attention-entropy", "attention-similarity", "attention-maps", "rollout"}


@dataclass(frozen=True)
class RunOptions:
    """Options of :func:`run_analyses` (pass them as keyword arguments).

    batch_size: images per forward pass (loader batches are split; results do not depend on it).
    similarity_kind: ``"jsd"`` or ``"cosine"`` for attention similarity.
    cka_pool / cka_estimator / cka_chunk: see :mod:`analysis.similarity`.
    tsne_layer (default L), tsne_samples (reservoir size, tokens), tsne_perplexity, tsne_iterations
    (>= 250), tsne_threads (OpenMP threads of sklearn's t-SNE; None = all), tsne_color (``"class"``
    or ``"image"``).
    pre_post_layer (default L), pre_post_images (images kept for the PCA).
    map_images: first M images kept for attention maps, rollout and attribution.
    map_queries: grid positions ``(row, col)``; default the centre patch.
    head_fusion: rollout head fusion. attribution_methods, attribution_model (a classifier; default
    the model itself if it has a head), attribution_target (``"prediction"``: the predicted class,
    or ``"label"``: the loader's labels), attribution_steps, attribution_internal_batch_size.
    amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None.
    """

    batch_size: int = 32
    similarity_kind: str = "jsd"
    cka_pool: str = "mean"
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
        for name in ("batch_size", "tsne_samples", "pre_post_images", "map_images", "cka_chunk",
                     "attribution_steps", "attribution_internal_batch_size", "tsne_iterations"):
            value = getattr(opts, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"option {name} must be a positive int, got {value!r}")
        if opts.tsne_threads is not None and (isinstance(opts.tsne_threads, bool) or not isinstance(opts.tsne_threads, int)
                                              or opts.tsne_threads < 1):
            raise ValueError(f"option tsne_threads must be None or a positive int, got {opts.tsne_threads!r}")
        choices = {"similarity_kind": ATTENTION_SIMILARITY_KINDS, "cka_pool": CKA_POOLS,
                   "cka_estimator": CKA_ESTIMATORS, "tsne_color": ("class", "image"), "head_fusion": HEAD_FUSIONS,
                   "attribution_target": ("prediction", "label")}
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
    from tqdm.auto import tqdm

    total = max_images
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        total = len(dataset) if total is None else min(total, len(dataset))
    return tqdm(total=total, unit="img", desc=desc, disable=not enabled)


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``model`` to ``device`` for the duration, then back to where it was."""
    param = next(model.parameters(), None)
    original = param.device if param is not None else device
    model.to(device)
    try:
        yield
    finally:
        model.to(original)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# run_analyses


def _resolve_analyses(analyses: Iterable[str] | str, swin: bool) -> tuple[str, ...]:
    names = (analyses,) if isinstance(analyses, str) else tuple(analyses)
    if not names:
        raise ValueError(f"no analyses requested; choose from {', '.join(ANALYSES)}")
    unknown = [a for a in names if a not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown[0]!r}; expected one of {', '.join(ANALYSES)}")
    if swin:
        bad = [a for a in names if a not in SWIN_ANALYSES]
        if bad:
            raise ValueError(f"analysis {bad[0]!r} is not supported for Swin models (supported: {', '.join(SWIN_ANALYSES)})")
    return tuple(dict.fromkeys(a for a in ANALYSES if a in names))


class _Pass:
    """The accumulators of one :func:`run_analyses` pass, built from the requested analyses."""

    def __init__(self, names: tuple[str, ...], geometry: Any, opts: RunOptions, seed: int) -> None:
        self.want, self.geometry, self.opts, self.seed = set(names), geometry, opts, seed
        g, want = geometry, self.want
        self.layers = list(range(1, g.depth + 1))
        self.prefix = g.num_prefix_tokens
        self.has_cls = bool(getattr(g, "has_class_token", False))
        self.tsne_layer = g.check_layer(opts.tsne_layer if opts.tsne_layer is not None else g.depth, what="tsne_layer")
        self.pp_layer = g.check_layer(opts.pre_post_layer if opts.pre_post_layer is not None else g.depth,
                                      what="pre_post_layer")
        self.queries: tuple[tuple[int, int], ...] = ()
        if "attention-maps" in want:
            h, w = g.grid
            self.queries = tuple(tuple(int(v) for v in q) for q in (opts.map_queries or ((h // 2, w // 2),)))
            for q in self.queries:
                if len(q) != 2 or not (0 <= q[0] < h and 0 <= q[1] < w):
                    raise ValueError(f"map query {q} is outside the {h}x{w} token grid")
        if "cka" in want and opts.cka_pool == "cls" and not self.has_cls:
            raise ValueError("cka_pool='cls' needs a model with a class token")

        def per_layer(name: str, make) -> dict[int, Any]:
            return {l: make() for l in self.layers} if name in want else {}

        p = self.prefix
        self.distance = per_layer("attention-distance", lambda: AttentionDistance(g.grid, g.patch_size, p))
        self.nmi = per_layer("nmi", lambda: AttentionNMI(p))
        self.entropy = per_layer("attention-entropy", lambda: AttentionEntropy(p))
        self.head_similarity = per_layer("attention-similarity", lambda: HeadSimilarity(p, opts.similarity_kind))
        self.similarity = AttentionSimilarity(p, opts.similarity_kind) if "attention-similarity" in want else None
        self.cka = CKAAccumulator(estimator=opts.cka_estimator, chunk_size=opts.cka_chunk) if "cka" in want else None
        self.fourier = FourierAccumulator(g.grid, p, g.depth + 1) if "fourier" in want else None
        self.tsne = Reservoir(opts.tsne_samples, seed) if "tsne" in want else None
        self.tsne_label_kind = "class" if opts.tsne_color == "class" else "image"
        self.shift = per_layer("pre-post", lambda: AttentionShift(p))
        self.pre_post = Reservoir(opts.pre_post_images, seed + 1) if "pre-post" in want else None
        self.rollout = RolloutMap(g.grid, p, self.has_cls, opts.head_fusion) if "rollout" in want else None
        self.keep_first = bool(want & {"attention-maps", "rollout", "attribution"})
        self.firsts: dict[str, list[Tensor]] = {"inputs": [], "labels": [], "maps": [], "rollout": []}
        self.images = 0

    def capture_request(self, swin: bool, num_prefix_tokens: int | None) -> dict[str, Any] | None:
        """Keyword arguments for ViTCapture / SwinCapture, or None when no forward pass is needed."""
        attention = self.layers if self.want & _ATTENTION else []
        pre_post = self.layers if "pre-post" in self.want else []
        blocks = set(self.layers) if self.want & {"cka", "fourier"} else set()
        if "tsne" in self.want:
            blocks.add(self.tsne_layer)
        request: dict[str, Any] = dict(block_output=sorted(blocks), embedding="fourier" in self.want)
        if not swin:
            request.update(attention=attention, pre_attention=pre_post, post_attention=pre_post,
                           num_prefix_tokens=num_prefix_tokens)
        return request if (attention or pre_post or blocks or request["embedding"]) else None

    def update(self, out: Any, x: Tensor, y: Tensor | None) -> None:
        """Stream one micro-batch (``out``: the Captured activations of images ``x``, labels ``y``)."""
        b, p, layers, opts = x.shape[0], self.prefix, self.layers, self.opts
        image_ids = torch.arange(self.images, self.images + b)
        attention = {l: PatchAttention(a, p, self.geometry.grid) for l, a in out.attention.items()} if out else {}
        for l, a in attention.items():
            for accs in (self.distance, self.nmi, self.entropy, self.head_similarity):
                if l in accs:
                    accs[l].update(a)
        if self.similarity is not None:
            self.similarity.update([attention[l] for l in layers])
        if self.cka is not None:
            self.cka.update([pool_features(out.block_output[l], p, opts.cka_pool, self.has_cls) for l in layers])
        if self.fourier is not None:
            self.fourier.update([out.embedding] + [out.block_output[l] for l in layers])
        if self.tsne is not None:
            tokens = out.block_output[self.tsne_layer][:, p:]
            image = image_ids.repeat_interleave(tokens.shape[1])
            by_class = y is not None and opts.tsne_color == "class"
            if self.tsne.seen and by_class != (self.tsne_label_kind == "class"):
                raise ValueError("some batches have labels and some do not: cannot colour t-SNE by class")
            self.tsne_label_kind = "class" if by_class else "image"
            color = y.cpu().repeat_interleave(tokens.shape[1]) if by_class else image
            self.tsne.update(x=tokens.reshape(-1, tokens.shape[-1]), label=color, image=image)
        for l, acc in self.shift.items():
            acc.update(out.pre_attention[l], out.post_attention[l])
        if self.pre_post is not None:
            self.pre_post.update(pre=out.pre_attention[self.pp_layer], post=out.post_attention[self.pp_layer],
                                 image=image_ids)
        rollout_maps = None
        if self.rollout is not None:
            rollout_maps = self.rollout.maps([out.attention[l] for l in layers])
            self.rollout.add(rollout_maps)
        room = opts.map_images - self.images
        if self.keep_first and room > 0:
            self.firsts["inputs"].append(x[:room].detach().float().cpu())
            if y is not None:
                self.firsts["labels"].append(y[:room].cpu())
            if "attention-maps" in self.want:
                maps = [attention_maps(attention[l], self.geometry.grid, self.queries, p)[:room] for l in layers]
                self.firsts["maps"].append(torch.stack(maps, dim=1).cpu())
            if rollout_maps is not None:
                self.firsts["rollout"].append(rollout_maps[:room].cpu())
        self.images += b

    def finish(self, model_name: str) -> tuple[list[Record], dict[str, Any]]:
        """Table records and arrays (see the module docstring)."""
        n, layers = self.images, self.layers
        records: list[Record] = []
        arrays: dict[str, Any] = {}

        def record(layer: int, head: int, metric: str, value: float) -> None:
            records.append(Record(model_name, layer, head, metric, float(value), n))

        for metric, accs in (("attention-distance", self.distance), ("nmi", self.nmi),
                             ("attention-entropy", self.entropy)):
            for l, acc in accs.items():
                values = acc.compute()
                for h, v in enumerate(values):
                    record(l, h, metric, v)
                record(l, -1, metric, values.mean())
        if self.similarity is not None:
            arrays["attention_similarity"] = self.similarity.compute()
            heads = torch.stack([self.head_similarity[l].compute() for l in layers])
            arrays["head_similarity"] = heads
            if heads.shape[-1] > 1:
                off_diagonal = ~torch.eye(heads.shape[-1], dtype=torch.bool)
                for l in layers:
                    record(l, -1, "head-similarity", heads[l - 1][off_diagonal].mean())
        if self.cka is not None:
            arrays["cka"] = self.cka.compute()
        if self.fourier is not None:
            curves = self.fourier.compute()
            arrays["fourier"], arrays["fourier_freqs"] = curves, self.fourier.frequencies()
            for l in range(len(layers) + 1):
                record(l, -1, "fourier-high-frequency", curves[l, -1])
        if self.tsne is not None:
            sample = self.tsne.sample()
            opts = self.opts
            arrays["tsne_xy"] = tsne_embedding(sample["x"], perplexity=opts.tsne_perplexity, seed=self.seed,
                                               max_iter=opts.tsne_iterations, threads=opts.tsne_threads)
            arrays["tsne_labels"], arrays["tsne_images"] = sample["label"], sample["image"]
            arrays["tsne_label_kind"] = np.asarray(self.tsne_label_kind)
            arrays["tsne_layer"] = np.asarray(self.tsne_layer)
        if self.pre_post is not None:
            for l, acc in self.shift.items():
                ratio, cosine = acc.compute().tolist()
                record(l, -1, "attention-shift-ratio", ratio)
                record(l, -1, "attention-shift-cosine", cosine)
            sample = self.pre_post.sample()
            pca = pre_post_pca(sample["pre"], sample["post"], self.prefix, seed=self.seed)
            pca["image"] = sample["image"][pca["image"]]  # stream index of each token's image
            arrays["pre_post"] = {**pca, "layer": np.asarray(self.pp_layer)}
        if self.keep_first:
            arrays["inputs"] = torch.cat(self.firsts["inputs"])
            labels = torch.cat(self.firsts["labels"]) if self.firsts["labels"] else None
            if labels is not None and len(labels) == len(arrays["inputs"]):
                arrays["labels"] = labels
        if "attention-maps" in self.want:
            arrays["attention_maps"] = torch.cat(self.firsts["maps"])
            arrays["attention_map_queries"] = np.asarray(self.queries, dtype=np.int64).reshape(-1, 2)
        if self.rollout is not None:
            arrays["rollout"] = torch.cat(self.firsts["rollout"])
            arrays["rollout_mean"] = self.rollout.compute()
        return records, arrays


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
    """Run the requested ``analyses`` (names from :data:`ANALYSES`) in one pass over ``loader``.

    See the module docstring for the result layout and :class:`RunOptions` for ``**options``.
    Raises ``ValueError`` for unknown analyses/options, an empty loader, or images that do not
    match the model's input size.
    """
    backbone = unwrap_backbone(model)
    swin = not is_vit(backbone)
    names = _resolve_analyses(analyses, swin)
    opts = RunOptions.from_kwargs(options)
    geometry = model_geometry(backbone, num_prefix_tokens)
    device = torch.device(device)
    classifier = None
    if "attribution" in names:
        classifier = opts.attribution_model if opts.attribution_model is not None else model
        if opts.attribution_model is None and getattr(backbone, "num_classes", 0) == 0:
            raise ValueError("attribution needs a classifier: the model has no head (num_classes=0); "
                             "pass attribution_model=ProbeClassifier(model, head)")
    state = _Pass(names, geometry, opts, seed)
    request = state.capture_request(swin, num_prefix_tokens)
    capturing = (SwinCapture if swin else ViTCapture)(backbone, **request) if request else contextlib.nullcontext()

    with _on_device(backbone, device), capturing as cap, _progress(loader, max_images, progress, model_name) as bar:
        for images, labels in iterate_images(loader, max_images):
            for start in range(0, images.shape[0], opts.batch_size):
                x = images[start : start + opts.batch_size].to(device, non_blocking=True)
                y = labels[start : start + opts.batch_size] if labels is not None else None
                out = None
                if cap is not None:
                    with _autocast(device, opts.amp_dtype):
                        out = cap(x)
                state.update(out, x, y)
                bar.update(x.shape[0])
    if state.images == 0:
        raise ValueError("the loader yielded no images")
    records, arrays = state.finish(model_name)

    if classifier is not None:
        if opts.attribution_target == "label" and "labels" not in arrays:
            raise ValueError("attribution_target='label' but the loader gave no labels")
        attributions: dict[str, Any] = {}
        with _on_device(classifier, device):
            x = arrays["inputs"].to(device)
            tgt = arrays["labels"].to(device) if opts.attribution_target == "label" else predicted_class(classifier, x)
            for method in opts.attribution_methods:
                attributions[method] = attribute(
                    classifier, x, method, patch_size=geometry.patch_size, target=tgt,
                    n_steps=opts.attribution_steps, internal_batch_size=opts.attribution_internal_batch_size,
                ).cpu()
            attributions["target"] = tgt.cpu()
        arrays["attribution"] = attributions

    return AnalysisResult(
        model_name=model_name,
        table=records_to_frame(records),
        arrays=arrays,
        geometry=geometry,
        images=state.images,
        analyses=names,
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
    pool: str = "mean",
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
    for g in (ga, gb):
        if pool == "cls" and not getattr(g, "has_class_token", False):
            raise ValueError("pool='cls' needs models with a class token")
    seen = 0
    caps = []
    for m, g, p in ((a, ga, num_prefix_tokens[0]), (b, gb, num_prefix_tokens[1])):
        kwargs = dict(block_output=True)
        if is_vit(m):
            caps.append(ViTCapture(m, num_prefix_tokens=p, **kwargs))
        else:
            caps.append(SwinCapture(m, **kwargs))
    name = f"{model_names[0]} vs {model_names[1]}"
    with _on_device(a, device), _on_device(b, device), caps[0] as cap_a, caps[1] as cap_b, \
            _progress(loader, max_images, progress, name) as bar:
        for images, _ in iterate_images(loader, max_images):
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True)
                with _autocast(device, amp_dtype):
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
