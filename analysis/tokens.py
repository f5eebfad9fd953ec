"""Token-level analyses: seeded reservoir sampling, t-SNE, pre/post-attention PCA, attention shift.

* :class:`Reservoir` keeps a bounded, seeded uniform sample of rows from a stream (bottom-k
  sampling: every row gets a key from one seeded ``numpy`` generator consumed in stream order and
  the ``capacity`` smallest keys are kept), so memory does not grow and the sample does not depend
  on the batch size.
* :func:`tsne_embedding`: ``sklearn.manifold.TSNE`` (seeded, PCA init, perplexity 20 by default,
  clamped to ``(n - 1) / 3`` for small samples).
* :func:`pre_post_pca`: PCA (sklearn) of the tokens a block's attention sees (``norm1(x)``,
  "pre-attention") and of its attention output (``attn(norm1(x))``, "post-attention"), each
  with its own 2-component PCA (different spaces), plus per-image centroids.
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

__all__ = ["Reservoir", "tsne_embedding", "pre_post_pca", "attention_shift", "AttentionShift"]


class Reservoir:
    """Seeded bounded uniform sample of rows from a stream of named, row-aligned tensors.

    ``update(x=tensor(n, ...), label=tensor(n), ...)`` adds ``n`` rows; ``sample()`` returns the
    kept rows (in stream order) as a dict of numpy arrays. Memory: ``capacity`` rows + one batch.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0)
        self._order = np.empty(0, dtype=np.int64)
        self._data: dict[str, np.ndarray] = {}
        self.seen = 0

    def update(self, **columns: Tensor | np.ndarray) -> None:
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
        keys = self._rng.random(n)  # consumed in stream order: independent of the batching
        order = np.arange(self.seen, self.seen + n)
        self.seen += n
        if not self._data:
            self._data = {k: v[:0] for k, v in arrays.items()}
        all_keys = np.concatenate([self._keys, keys])
        keep = np.argsort(all_keys, kind="stable")[: self.capacity]
        keep.sort()  # keep stream order
        self._keys = all_keys[keep]
        self._order = np.concatenate([self._order, order])[keep]
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


def pre_post_pca(pre: np.ndarray | Tensor, post: np.ndarray | Tensor, num_prefix_tokens: int = 0,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """2-component PCA of pre- and post-attention tokens ``(M, N, C)`` of ``M`` images.

    Returns ``pre_xy``, ``post_xy`` ``(M * (N - prefix), 2)``, ``image`` (image index of each row),
    ``pre_centroids``, ``post_centroids`` ``(M, 2)`` and the explained variance ratios.
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
    image = np.repeat(np.arange(m), n)
    out: dict[str, np.ndarray] = {"image": image}
    for name, x in (("pre", pre), ("post", post)):
        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(x.reshape(m * n, c)).astype(np.float32)
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
