"""Token-level analyses: seeded reservoir sampling, t-SNE, pre/post-attention PCA, attention shift.

* :class:`Reservoir` keeps a bounded, seeded uniform sample of rows from a stream (bottom-k
  sampling: every row gets a key from one seeded ``numpy`` generator consumed in stream order and
  the ``capacity`` smallest keys are kept), so memory does not grow and the sample does not depend
  on the batch size.
* :func:`tsne_embedding`: ``sklearn.manifold.TSNE`` (seeded, PCA init, perplexity 20 by default,
  clamped to ``(n - 1) / 3`` for small samples).
* :func:`pre_post_pca`: PCA (sklearn) of the tokens a block's attention sees (``norm1(x)``,
  "pre-attention") and of its attention output (``attn(norm1(x))``, "post-attention"), each
  with its own 2-component PCA (different spaces; ``mode="separate"``, the default), or one PCA
  fitted on both token sets together (``mode="joint"``, the KAMIM fork's figure: the two clouds
  in the same axes, so the shift between them shows), plus per-image centroids.
* Attention shift per layer (:class:`AttentionShift`), defined on patch tokens:
  ``ratio`` = mean over tokens of ``||attn(norm1(x))|| / ||norm1(x)||`` (how large the attention
  update is relative to what it reads) and ``cosine`` = mean cosine between ``norm1(x)`` and
  ``attn(norm1(x))``. Layer scale / drop path / residual are not applied (see ``capture``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .attention import MeanOverImages

__all__ = ["Reservoir", "tsne_embedding", "pre_post_pca", "PRE_POST_PCA", "attention_shift", "AttentionShift", "TSNEAccumulator",
           "PrePostAccumulator"]


class Reservoir:
    """Seeded bounded uniform sample of rows from a stream of named, row-aligned tensors.

    ``update(x=tensor(n, ...), label=tensor(n), ...)`` adds ``n`` rows; ``sample()`` returns the
    kept rows (in stream order) as a dict of numpy arrays. Memory: ``capacity`` rows + one batch.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity, self.seed = capacity, seed
        self._keys = np.empty(0)
        self._order = np.empty(0, dtype=np.int64)
        self._data: dict[str, np.ndarray] = {}
        self.seen = 0

    def update(self, **columns: Tensor | np.ndarray) -> None:
        """Add rows that follow every row seen so far in the stream."""
        self.update_at(self.seen, **columns)

    def update_at(self, start: int, **columns: Tensor | np.ndarray) -> None:
        """Add rows at stream positions ``start, start + 1, ...`` (a later accumulator of a split stream)."""
        if not columns:
            raise ValueError("Reservoir.update needs at least one column")
        arrays = {k: (v.detach().float().cpu().numpy() if isinstance(v, Tensor) and v.is_floating_point()
                      else v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
                  for k, v in columns.items()}
        n = {len(v) for v in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"reservoir columns must have the same number of rows, got {sorted(n)}")
        n = n.pop()
        if self._data and set(arrays) != set(self._data):
            raise ValueError(f"reservoir columns changed: {sorted(self._data)} -> {sorted(arrays)}")
        # the keys of one seeded PCG64 stream, taken at the rows' stream positions: independent of the
        # batching and of how the stream is split between accumulators
        keys = np.random.Generator(np.random.PCG64(self.seed).advance(int(start))).random(n)
        order = np.arange(start, start + n)
        self.seen += n
        self._keep(keys, order, arrays)

    def merge(self, other: Reservoir) -> None:
        """Add the rows kept by ``other`` (same capacity and seed, disjoint stream positions): exact."""
        if (self.capacity, self.seed) != (other.capacity, other.seed):
            raise ValueError("cannot merge reservoirs with different capacities or seeds")
        self.seen += other.seen
        if other._data:
            self._keep(other._keys, other._order, other._data)

    def _keep(self, keys: np.ndarray, order: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        if not self._data:
            self._data = {k: v[:0] for k, v in arrays.items()}
        all_keys = np.concatenate([self._keys, keys])
        all_order = np.concatenate([self._order, order])
        keep = np.argsort(all_keys, kind="stable")[: self.capacity]
        keep = keep[np.argsort(all_order[keep], kind="stable")]  # keep stream order
        self._keys = all_keys[keep]
        self._order = all_order[keep]
        self._data = {k: np.concatenate([self._data[k], arrays[k]])[keep] for k in arrays}

    def __len__(self) -> int:
        return len(self._keys)

    def sample(self) -> dict[str, np.ndarray]:
        """The kept rows as numpy arrays, plus ``"index"``: their position in the stream."""
        if not self._data:
            raise ValueError("Reservoir: no rows accumulated")
        return {**{k: v.copy() for k, v in self._data.items()}, "index": self._order.copy()}


def tsne_embedding(features: np.ndarray | Tensor, *, perplexity: float = 20.0, seed: int = 0,
                   max_iter: int = 1000, threads: int | None = None) -> np.ndarray:
    """2-D t-SNE of ``(n, d)`` features (sklearn, PCA init, ``random_state=seed``); ``(n, 2)`` float32.

    ``threads`` caps the OpenMP threads of sklearn's Barnes-Hut gradient (None: sklearn's default,
    all cores); on an oversubscribed machine 1 thread can be several times faster.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = features.detach().float().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"t-SNE needs (n, d) features with n >= 3, got {x.shape}")
    if max_iter < 250:
        raise ValueError(f"t-SNE needs max_iter >= 250, got {max_iter}")
    perplexity = float(min(perplexity, (x.shape[0] - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter)
    with threadpool_limits(limits=threads, user_api="openmp"):
        return tsne.fit_transform(x).astype(np.float32)


#: pre/post-attention PCA modes: a PCA per token set, or one fitted on both (the KAMIM fork's)
PRE_POST_PCA = ("separate", "joint")


def pre_post_pca(pre: np.ndarray | Tensor, post: np.ndarray | Tensor, num_prefix_tokens: int = 0,
                 seed: int = 0, mode: str = "separate") -> dict[str, np.ndarray]:
    """2-component PCA of pre- and post-attention tokens ``(M, N, C)`` of ``M`` images.

    ``mode="separate"`` fits one PCA per token set; ``"joint"`` one PCA on both sets together (the
    same axes and explained-variance ratios for both). Returns ``pre_xy``, ``post_xy``
    ``(M * (N - prefix), 2)``, ``image`` (image index of each row), ``pre_centroids``,
    ``post_centroids`` ``(M, 2)``, the explained variance ratios and ``mode``.
    """
    from sklearn.decomposition import PCA

    def to_np(x):
        return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)

    pre, post = to_np(pre), to_np(post)
    if pre.ndim != 3 or pre.shape != post.shape:
        raise ValueError(f"pre and post must both be (M, N, C) with equal shapes, got {pre.shape} and {post.shape}")
    pre, post = pre[:, num_prefix_tokens:], post[:, num_prefix_tokens:]
    m, n, c = pre.shape
    if m * n < 2:
        raise ValueError(f"PCA needs at least 2 tokens, got {m * n}")
    if mode not in PRE_POST_PCA:
        raise ValueError(f"mode {mode!r} is not valid; expected one of {', '.join(PRE_POST_PCA)}")
    image = np.repeat(np.arange(m), n)
    out: dict[str, np.ndarray] = {"image": image, "mode": np.asarray(mode)}
    joint = None
    if mode == "joint":
        joint = PCA(n_components=2, random_state=seed).fit(np.concatenate([pre, post]).reshape(2 * m * n, c))
    for name, x in (("pre", pre), ("post", post)):
        pca = joint or PCA(n_components=2, random_state=seed).fit(x.reshape(m * n, c))
        xy = pca.transform(x.reshape(m * n, c)).astype(np.float32)
        out[f"{name}_xy"] = xy
        out[f"{name}_centroids"] = xy.reshape(m, n, 2).mean(1)
        out[f"{name}_explained_variance_ratio"] = pca.explained_variance_ratio_.astype(np.float32)
    return out


def attention_shift(pre: Tensor, post: Tensor, num_prefix_tokens: int = 1) -> dict[str, Tensor]:
    """Per-image attention shift on patch tokens: ``{"ratio": (B,), "cosine": (B,)}`` (float32)."""
    if pre.ndim != 3 or pre.shape != post.shape:
        raise ValueError(f"pre and post must be (B, N, C) with equal shapes, got {tuple(pre.shape)} and {tuple(post.shape)}")
    x, y = pre[:, num_prefix_tokens:].float(), post[:, num_prefix_tokens:].float()
    tiny = torch.finfo(torch.float32).tiny
    ratio = (y.norm(dim=-1) / x.norm(dim=-1).clamp_min(tiny)).mean(-1)
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1).mean(-1)
    return {"ratio": ratio, "cosine": cosine}


class AttentionShift(MeanOverImages):
    """Streaming :func:`attention_shift` for one layer; ``compute()`` -> float64 ``[ratio, cosine]``."""

    def __init__(self, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def _per_image(self, pre: Tensor, post: Tensor) -> Tensor:
        shift = attention_shift(pre, post, self.num_prefix_tokens)
        return torch.stack([shift["ratio"], shift["cosine"]], dim=1)


# --------------------------------------------------------------------------------------------
# registry accumulators (analysis.registry contract: update(batch), merge(other), finish())


class TSNEAccumulator:
    """t-SNE of a reservoir sample of the patch tokens of layer ``tsne_layer`` (default L), coloured by
    class (labels) or by image; options ``tsne_samples``, ``tsne_perplexity``, ``tsne_iterations``,
    ``tsne_threads``, ``tsne_color``. Arrays ``tsne_xy``, ``tsne_labels``, ``tsne_images``,
    ``tsne_label_kind``, ``tsne_layer``."""

    def __init__(self, context) -> None:
        g, opts = context.geometry, context.options
        self.context = context
        self.layer = g.check_layer(opts.tsne_layer if opts.tsne_layer is not None else g.depth, what="tsne_layer")
        self.reservoir = Reservoir(opts.tsne_samples, context.seed)
        self.label_kind = "class" if opts.tsne_color == "class" else "image"

    def update(self, batch) -> None:
        tokens = batch.captured.block_output[self.layer][:, self.context.geometry.num_prefix_tokens:]
        per_image = tokens.shape[1]
        image = batch.indices.repeat_interleave(per_image)
        by_class = batch.labels is not None and self.context.options.tsne_color == "class"
        self._set_kind("class" if by_class else "image", self.reservoir.seen > 0)
        color = batch.labels.cpu().repeat_interleave(per_image) if by_class else image
        self.reservoir.update_at(int(batch.indices[0]) * per_image, x=tokens.reshape(-1, tokens.shape[-1]),
                                 label=color, image=image)

    def _set_kind(self, kind: str, seen: bool) -> None:
        if seen and kind != self.label_kind:
            raise ValueError("some batches have labels and some do not: cannot colour t-SNE by class")
        self.label_kind = kind

    def merge(self, other: TSNEAccumulator) -> None:
        if other.reservoir.seen:
            self._set_kind(other.label_kind, self.reservoir.seen > 0)
        self.reservoir.merge(other.reservoir)

    def finish(self):
        opts, sample = self.context.options, self.reservoir.sample()
        xy = tsne_embedding(sample["x"], perplexity=opts.tsne_perplexity, seed=self.context.seed,
                            max_iter=opts.tsne_iterations, threads=opts.tsne_threads)
        return [], {"tsne_xy": xy, "tsne_labels": sample["label"], "tsne_images": sample["image"],
                    "tsne_label_kind": np.asarray(self.label_kind), "tsne_layer": np.asarray(self.layer)}


class PrePostAccumulator:
    """Attention shift per layer (``attention-shift-ratio``, ``attention-shift-cosine`` rows) and the PCA
    of pre- vs post-attention tokens of ``pre_post_images`` sampled images at layer ``pre_post_layer``
    (default L): array ``pre_post``."""

    def __init__(self, context) -> None:
        g, opts = context.geometry, context.options
        self.context = context
        self.layer = g.check_layer(opts.pre_post_layer if opts.pre_post_layer is not None else g.depth,
                                   what="pre_post_layer")
        self.shift = {l: AttentionShift(g.num_prefix_tokens) for l in context.layers}
        self.reservoir = Reservoir(opts.pre_post_images, context.seed + 1)

    def update(self, batch) -> None:
        out = batch.captured
        for l, acc in self.shift.items():
            acc.update(out.pre_attention[l], out.post_attention[l])
        self.reservoir.update_at(int(batch.indices[0]), pre=out.pre_attention[self.layer],
                                 post=out.post_attention[self.layer], image=batch.indices)

    def merge(self, other: PrePostAccumulator) -> None:
        for l, acc in self.shift.items():
            acc.merge(other.shift[l])
        self.reservoir.merge(other.reservoir)

    def finish(self):
        from .results import Record

        records = []
        for l, acc in self.shift.items():
            values, (low, high) = acc.compute().tolist(), acc.interval()
            records += [Record(self.context.model_name, l, -1, metric, values[i], acc.images, float(low[i]), float(high[i]))
                        for i, metric in enumerate(("attention-shift-ratio", "attention-shift-cosine"))]
        sample = self.reservoir.sample()
        pca = pre_post_pca(sample["pre"], sample["post"], self.context.geometry.num_prefix_tokens, seed=self.context.seed,
                           mode=self.context.options.pre_post_pca)
        pca["image"] = sample["image"][pca["image"]]  # stream index of each token's image
        return records, {"pre_post": {**pca, "layer": np.asarray(self.layer)}}
