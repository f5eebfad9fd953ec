"""Representation similarity: self-attention similarity across layers / heads and linear CKA.

Self-attention similarity
    For the same image and the same query patch, compare the attention distributions of two layers
    (heads averaged) or of two heads of one layer. ``kind="jsd"``: similarity = ``1 - JSD`` with the
    Jensen-Shannon divergence in bits (in [0, 1]; 1 = identical distributions); ``kind="cosine"``:
    cosine similarity of the two rows. Averaged over queries, then images. Prefix rows/columns are
    removed and rows renormalised (see :func:`analysis.attention.patch_attention`).

Linear CKA (Kornblith et al. 2019)
    ``linear_cka(x, y)`` for ``(n, d1)``, ``(n, d2)`` in float64; ``unbiased=True`` uses the unbiased
    HSIC estimator of Song et al. (2012) as in Nguyen et al. (2021). Two streaming estimators:

    * ``estimator="exact"``: biased linear CKA over the whole stream, exact, by accumulating the
      feature-space cross-products ``Z^T Z`` (float64) of all layers stacked. Memory
      ``O((sum_l d_l)^2)`` (about 200 MB for 13 ViT-S layers), independent of the number of images.
    * ``estimator="minibatch"`` (Nguyen et al.): the stream is re-chunked into fixed-size internal
      minibatches of ``chunk_size`` samples (so the loader's batch size does not matter); per chunk
      the unbiased HSIC of every layer pair is computed from Gram matrices and summed, weighted by
      the chunk size; CKA = HSIC_xy / sqrt(HSIC_xx HSIC_yy). Memory ``O(chunk_size * sum_l d_l)``.
      Gram matrices are float32 for float32 (or lower-precision) features, float64 for float64
      ones; the HSIC sums are float64 (see :func:`_chunk_hsic` for why that loses nothing).
      A chunk is only processed when at least 4 more samples remain buffered, so the final chunk is
      never smaller than 4 (a short tail is merged into the last chunk, giving at most
      ``chunk_size + 3`` samples); fewer than 4 samples in total is a ``ValueError``, never NaN.
"""
from __future__ import annotations

from collections.abc import Sequence

import math

import torch
from torch import Tensor

from kamim.backbone import check_pool, pool_tokens

from .attention import PatchAttention, entropy_sum, prepare_attention
from .uncertainty import CI_LEVEL, Moments

__all__ = [
    "js_divergence",
    "attention_similarity",
    "head_similarity",
    "AttentionSimilarity",
    "HeadSimilarity",
    "linear_cka",
    "pool_features",
    "CKAAccumulator",
    "ATTENTION_SIMILARITY_KINDS",
    "CKA_POOLS",
    "CKA_ESTIMATORS",
    "AttentionSimilarityAccumulator",
    "LayerCKAAccumulator",
]

ATTENTION_SIMILARITY_KINDS = ("jsd", "cosine")
CKA_POOLS = ("avg", "cls", "tokens")  # the backbone's pooling names, plus every patch token as a sample
CKA_ESTIMATORS = ("minibatch", "exact")
_LN2 = math.log(2.0)


def js_divergence(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Jensen-Shannon divergence in bits between distributions along ``dim`` (0 log 0 = 0)."""
    m = 0.5 * (p + q)
    ent = lambda t: entropy_sum(t, dim)  # noqa: E731
    return (ent(m) - 0.5 * (ent(p) + ent(q))) / _LN2


def _pairwise_per_image(maps: Tensor, kind: str, ent: Tensor | None = None) -> Tensor:
    """``maps`` (K, B, Q, N) distributions -> (B, K, K) similarity averaged over the Q queries.

    ``ent`` (K, B, Q): the row entropies of ``maps`` if already known (JSD only).
    """
    k = maps.shape[0]
    b, q = maps.shape[1], maps.shape[2]
    if kind == "cosine":
        unit = torch.nn.functional.normalize(maps, dim=-1)
        flat = unit.permute(1, 0, 2, 3).reshape(b, k, q * unit.shape[-1])
        return flat @ flat.transpose(1, 2) / q
    if kind != "jsd":
        raise ValueError(f"unknown attention similarity kind {kind!r}; expected one of {ATTENTION_SIMILARITY_KINDS}")
    # JSD(P, R) = H(M) - (H(P) + H(R)) / 2; the entropy of each map is computed once
    if ent is None:
        ent = entropy_sum(maps)  # (K, B, Q)
    out = torch.zeros(b, k, k, dtype=torch.float64, device=maps.device)
    for i in range(k - 1):
        m = 0.5 * (maps[i : i + 1] + maps[i + 1 :])
        ent_m = entropy_sum(m)  # (K-i-1, B, Q)
        jsd = (ent_m - 0.5 * (ent[i : i + 1] + ent[i + 1 :])) / _LN2
        sim = (1.0 - jsd.clamp(0.0, 1.0)).mean(-1).double().transpose(0, 1)  # (B, K-i-1)
        out[:, i, i + 1 :] = sim
        out[:, i + 1 :, i] = sim
    out[:, torch.arange(k), torch.arange(k)] = 1.0
    return out


def _layer_maps(attns: Sequence[Tensor | PatchAttention], num_prefix_tokens: int) -> Tensor:
    return torch.stack([prepare_attention(a, num_prefix_tokens).head_mean for a in attns])  # (L, B, Q, N)


def _head_pairs(attn: Tensor | PatchAttention, num_prefix_tokens: int, kind: str) -> Tensor:
    pa = prepare_attention(attn, num_prefix_tokens)
    ent = pa.row_entropy.transpose(0, 1) if kind == "jsd" else None
    return _pairwise_per_image(pa.probs.transpose(0, 1), kind, ent)  # heads as the K axis


def attention_similarity(attns: Sequence[Tensor | PatchAttention], num_prefix_tokens: int = 1, kind: str = "jsd") -> Tensor:
    """``(L, L)`` similarity between the head-averaged attention of ``L`` layers, mean over images."""
    return _pairwise_per_image(_layer_maps(attns, num_prefix_tokens), kind).double().mean(0)


def head_similarity(attn: Tensor | PatchAttention, num_prefix_tokens: int = 1, kind: str = "jsd") -> Tensor:
    """``(H, H)`` similarity between the heads of one layer, mean over images."""
    return _head_pairs(attn, num_prefix_tokens, kind).double().mean(0)


class _PairwiseMean:
    """Mean over images of per-image ``(K, K)`` similarity matrices, with the 95% interval over images
    of every entry and of the mean off-diagonal entry (:class:`analysis.uncertainty.Moments`)."""

    def __init__(self, num_prefix_tokens: int, kind: str) -> None:
        if kind not in ATTENTION_SIMILARITY_KINDS:
            raise ValueError(f"unknown attention similarity kind {kind!r}; expected one of {ATTENTION_SIMILARITY_KINDS}")
        self.num_prefix_tokens, self.kind = num_prefix_tokens, kind
        self.moments, self.off_diagonal = Moments(), Moments()

    @property
    def images(self) -> int:
        return self.moments.images

    def _add(self, per_image: Tensor) -> None:
        per_image = per_image.double()
        self.moments.add(per_image)
        k = per_image.shape[-1]
        if k > 1:
            off = ~torch.eye(k, dtype=torch.bool, device=per_image.device)
            self.off_diagonal.add(per_image[:, off].mean(-1))

    def merge(self, other: _PairwiseMean) -> None:
        """Add the moments of ``other`` (disjoint images): exact up to float64 rounding."""
        self.moments.merge(other.moments)
        self.off_diagonal.merge(other.off_diagonal)

    def compute(self) -> Tensor:
        if self.images == 0:
            raise ValueError(f"{type(self).__name__}: no images accumulated")
        return torch.from_numpy(self.moments.mean)

    def interval(self, level: float = CI_LEVEL) -> tuple[Tensor, Tensor]:
        """``(low, high)`` of every entry's ``level`` interval over images."""
        self.compute()
        low, high = self.moments.interval(level)
        return torch.from_numpy(low), torch.from_numpy(high)


class AttentionSimilarity(_PairwiseMean):
    """Streaming :func:`attention_similarity`: ``update([attn_layer1, ..., attn_layerL])``."""

    def __init__(self, num_prefix_tokens: int = 1, kind: str = "jsd") -> None:
        super().__init__(num_prefix_tokens, kind)

    def update(self, attns: Sequence[Tensor | PatchAttention]) -> None:
        self._add(_pairwise_per_image(_layer_maps(attns, self.num_prefix_tokens), self.kind))


class HeadSimilarity(_PairwiseMean):
    """Streaming :func:`head_similarity` for one layer: ``update(attn)``."""

    def __init__(self, num_prefix_tokens: int = 1, kind: str = "jsd") -> None:
        super().__init__(num_prefix_tokens, kind)

    def update(self, attn: Tensor | PatchAttention) -> None:
        self._add(_head_pairs(attn, self.num_prefix_tokens, self.kind))


# --------------------------------------------------------------------------------------------
# CKA


def _as_2d(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, d), got {tuple(x.shape)}")
    return x.double()


def _hsic_unbiased_from_grams(grams: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) for every pair of ``(K, n, n)`` Gram matrices -> ``(K, K)``.

    HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
    with K~ the Gram matrix with zeroed diagonal; vectorised over all pairs with two matmuls.
    ``grams`` is overwritten (its diagonal is zeroed): callers pass a fresh tensor.
    """
    k, n, _ = grams.shape
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    g = grams
    g.diagonal(dim1=-2, dim2=-1).zero_()
    flat = g.reshape(k, n * n)
    trace = flat @ flat.T  # tr(K~ L~) (symmetric Grams)
    row = g.sum(-1)  # K~ 1, (K, n)
    total = row.sum(-1)  # 1' K~ 1
    cross = row @ row.T  # 1' K~ L~ 1
    return (trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _own(f: Tensor) -> Tensor:
    """A detached CPU copy of features to buffer: float32 (float64 kept), holding no larger storage.

    A view (e.g. the class token of a ``(B, N, C)`` batch) would keep its whole base tensor alive.
    """
    f = f.detach().cpu()
    f = f.to(torch.float64 if f.dtype == torch.float64 else torch.float32)
    if not f.is_contiguous() or f.untyped_storage().nbytes() > f.numel() * f.element_size():
        f = f.clone(memory_format=torch.contiguous_format)
    return f


def _chunk_hsic(chunk: list[Tensor]) -> Tensor:
    """Unbiased HSIC ``(L, L)`` (float64) of every pair of the ``(n, d_l)`` features of one chunk.

    The Gram matrices are computed in the features' precision (float32 unless they are float64):
    they are the only O(n^2 d) work, and float32 halves it. Each layer is first shifted by its
    float32 mean: HSIC does not depend on the shift, and the difference of two float32 numbers is
    rounded to within 6e-8 of the *difference*, so the Gram entries keep float32 precision relative
    to the spread of the features rather than to their (large, for ViT tokens) mean. The HSIC sums
    are float64. CKA then differs from an all-float64 computation by less than 1e-6 (tested with
    means 1000x the spread; about 1e-8 on the benchmark's features).
    """
    dims = {f.shape[1] for f in chunk}
    if len(dims) == 1 and len(chunk) > 1:  # one batched matmul for equal widths
        z = torch.stack(chunk)
        z.sub_(z.mean(1, keepdim=True))  # z is a fresh stack: in place
        grams = torch.bmm(z, z.transpose(1, 2))
    else:
        centred = [f - f.mean(0) for f in chunk]
        grams = torch.stack([f @ f.T for f in centred])
    return _hsic_unbiased_from_grams(grams.double())


def _cka_from_hsic(hsic_xy: Tensor, hsic_xx: Tensor, hsic_yy: Tensor) -> Tensor:
    denom = (hsic_xx[:, None] * hsic_yy[None, :]).clamp_min(0).sqrt()
    # a constant representation has zero self-HSIC: CKA is undefined, reported as NaN explicitly
    return torch.where(denom > 0, hsic_xy / denom.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.full_like(hsic_xy, float("nan")))


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = False) -> float:
    """Linear CKA between ``(n, d1)`` and ``(n, d2)`` representations of the same ``n`` samples (float64).

    Biased: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred features.
    Unbiased: the same ratio with Song et al.'s unbiased HSIC (needs n >= 4).
    """
    x, y = _as_2d("x", x), _as_2d("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if unbiased:
        if n < 4:
            raise ValueError(f"unbiased CKA needs at least 4 samples, got {n}")
        x, y = x - x.mean(0), y - y.mean(0)  # the U-statistic is shift invariant; centring helps numerics
        hsic = _hsic_unbiased_from_grams(torch.stack([x @ x.T, y @ y.T]))
        return float(_cka_from_hsic(hsic[0:1, 1:2], hsic[0, 0:1], hsic[1, 1:2])[0, 0])
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got {n}")
    xc, yc = x - x.mean(0), y - y.mean(0)
    xy = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    xx = torch.linalg.matrix_norm(xc.T @ xc)
    yy = torch.linalg.matrix_norm(yc.T @ yc)
    return float(_cka_from_hsic(xy.reshape(1, 1), (xx**2).reshape(1), (yy**2).reshape(1))[0, 0])


def pool_features(tokens: Tensor, num_prefix_tokens: int, pool: str = "avg", has_class_token: bool = True) -> Tensor:
    """Samples for CKA from ``(B, N, C)`` tokens.

    ``"avg"`` / ``"cls"``: :func:`kamim.backbone.pool_tokens` (one sample per image: the mean of the patch
    tokens, or the class token), the very features the evaluations use at that layer; ``"tokens"``:
    every patch token is a sample (``B * (N - prefix)`` samples).
    """
    check_pool(pool, CKA_POOLS, has_class_token=has_class_token and num_prefix_tokens >= 1)
    if pool == "tokens":
        patches = tokens[:, num_prefix_tokens:]
        return patches.reshape(-1, patches.shape[-1])
    return pool_tokens(tokens, num_prefix_tokens, pool)


class CKAAccumulator:
    """Streaming linear CKA between the layers of one model (``L x L``) or two models (``La x Lb``).

    ``update(features_a, features_b=None)``: lists of ``(n, d_l)`` features, one per layer, for the
    same ``n`` samples (see :func:`pool_features`). ``compute()`` returns float64 ``(La, La)`` or,
    for ``cross=True``, ``(La, Lb)``. See the module docstring for the two estimators.
    """

    def __init__(self, *, estimator: str = "minibatch", chunk_size: int = 256, cross: bool = False) -> None:
        if estimator not in CKA_ESTIMATORS:
            raise ValueError(f"unknown CKA estimator {estimator!r}; expected one of {CKA_ESTIMATORS}")
        if not isinstance(chunk_size, int) or chunk_size < 4:
            raise ValueError(f"chunk_size must be an int >= 4, got {chunk_size!r}")
        self.estimator, self.chunk_size, self.cross = estimator, chunk_size, cross
        self.samples = 0
        self._dims: list[int] | None = None
        self._num_a = 0
        # minibatch state
        self._buffer: list[list[Tensor]] = []
        self._buffered = 0
        self._hsic: Tensor | None = None
        # exact state
        self._shift: Tensor | None = None
        self._zsum: Tensor | None = None
        self._gram: Tensor | None = None  # within: (D, D); cross: (Da, Db)
        self._self_grams: list[Tensor] | None = None  # cross only: per-layer (d, d)

    # ---------------------------------------------------------------------------------------
    def update(self, features_a: Sequence[Tensor], features_b: Sequence[Tensor] | None = None) -> None:
        """Add ``n`` samples. The minibatch estimator buffers up to ``chunk_size + 3`` samples; contiguous
        float32/float64 CPU features are buffered without a copy, so do not modify them in place later."""
        if self.cross != (features_b is not None):
            raise ValueError("cross=True needs features_b, cross=False forbids it")
        layers = [f for f in features_a] + ([f for f in features_b] if features_b is not None else [])
        if not layers:
            raise ValueError("no features given")
        n = {f.shape[0] for f in layers}
        if len(n) != 1 or any(f.ndim != 2 for f in layers):
            raise ValueError(f"features must be (n, d) with the same n for all layers, got {[tuple(f.shape) for f in layers]}")
        dims = [int(f.shape[1]) for f in layers]
        if self._dims is None:
            self._dims, self._num_a = dims, len(features_a)
        elif dims != self._dims or len(features_a) != self._num_a:
            raise ValueError(f"feature dimensions changed between updates: {self._dims} -> {dims}")
        count = n.pop()
        if count == 0:
            return
        self.samples += count
        if self.estimator == "exact":
            self._update_exact([f.detach().double() for f in layers])
        else:
            self._buffer.append([_own(f) for f in layers])
            self._buffered += count
            while self._buffered >= self.chunk_size + 4:
                self._process(self._take(self.chunk_size))

    # minibatch --------------------------------------------------------------------------------
    def _take(self, size: int) -> list[Tensor]:
        """Pop exactly ``size`` samples (in stream order) from the buffer."""
        taken: list[list[Tensor]] = []
        need = size
        while need > 0:
            part = self._buffer[0]
            m = part[0].shape[0]
            if m <= need:
                taken.append(part)
                self._buffer.pop(0)
                need -= m
            else:
                taken.append([f[:need] for f in part])
                self._buffer[0] = [f[need:] for f in part]
                need = 0
        self._buffered -= size
        if len(taken) == 1:  # the common case (loader batch >= chunk): views, no copy
            return taken[0]
        return [torch.cat([part[i] for part in taken]) for i in range(len(taken[0]))]

    def _chunk_hsic(self, chunk: list[Tensor]) -> Tensor:
        return _chunk_hsic(chunk) * chunk[0].shape[0]

    def _process(self, chunk: list[Tensor]) -> None:
        hsic = self._chunk_hsic(chunk)
        self._hsic = hsic if self._hsic is None else self._hsic + hsic

    # exact ------------------------------------------------------------------------------------
    def _update_exact(self, layers: list[Tensor]) -> None:
        z = torch.cat(layers, dim=1)
        if self._shift is None:
            # covariances are shift invariant; subtracting the first sample keeps the running
            # sums small (ViT tokens have large means) and does not depend on the batching
            self._shift = z[0].clone()
            self._zsum = torch.zeros_like(z[0])
        z = z - self._shift
        self._zsum += z.sum(0)
        if not self.cross:
            g = z.T @ z
            self._gram = g if self._gram is None else self._gram + g
            return
        da = sum(self._dims[: self._num_a])
        za, zb = z[:, :da], z[:, da:]
        g = za.T @ zb
        self._gram = g if self._gram is None else self._gram + g
        offsets = torch.tensor([0] + self._dims).cumsum(0).tolist()
        selfs = [z[:, offsets[i] : offsets[i + 1]] for i in range(len(self._dims))]
        selfs = [s.T @ s for s in selfs]
        self._self_grams = selfs if self._self_grams is None else [a + b for a, b in zip(self._self_grams, selfs)]

    def _compute_exact(self) -> Tensor:
        n = self.samples
        mean = self._zsum / n
        offsets = torch.tensor([0] + self._dims).cumsum(0).tolist()
        blocks = range(len(self._dims))

        def centred(gram: Tensor, rows: slice, cols: slice) -> Tensor:
            return gram - n * torch.outer(mean[rows], mean[cols])

        sl = [slice(offsets[i], offsets[i + 1]) for i in blocks]
        if not self.cross:
            cov = centred(self._gram, slice(None), slice(None))
            hsic = torch.stack([torch.stack([torch.linalg.matrix_norm(cov[sl[i], sl[j]]) ** 2 for j in blocks]) for i in blocks])
            diag = hsic.diagonal()
            return _cka_from_hsic(hsic, diag, diag)
        la = self._num_a
        da = offsets[la]
        cov = centred(self._gram, slice(0, da), slice(da, None))
        self_hsic = torch.stack([torch.linalg.matrix_norm(centred(g, sl[i], sl[i])) ** 2 for i, g in enumerate(self._self_grams)])
        hsic = torch.stack([
            torch.stack([torch.linalg.matrix_norm(cov[sl[i], slice(sl[j].start - da, sl[j].stop - da)]) ** 2
                         for j in range(la, len(self._dims))])
            for i in range(la)
        ])
        return _cka_from_hsic(hsic, self_hsic[:la], self_hsic[la:])

    # ---------------------------------------------------------------------------------------
    def merge(self, other: CKAAccumulator) -> None:
        """Add ``other``'s samples, which come after this accumulator's in stream order.

        ``exact``: exact (up to float64 rounding) for any split. ``minibatch``: the buffered samples
        are joined and the processed chunk sums added, which equals one accumulator over the whole
        stream when this one saw a multiple of ``chunk_size`` samples or ``other`` processed no
        chunk yet (fewer than ``chunk_size + 4`` samples); otherwise the chunks are a different,
        equally valid, partition of the samples.
        """
        same = (self.estimator, self.chunk_size, self.cross) == (other.estimator, other.chunk_size, other.cross)
        if not same or (self._dims is not None and other._dims is not None
                        and (self._dims, self._num_a) != (other._dims, other._num_a)):
            raise ValueError("cannot merge CKA accumulators with different settings or feature dimensions")
        if other.samples == 0:
            return
        if self.samples == 0:
            self.__dict__.update({k: (list(v) if isinstance(v, list) else v) for k, v in other.__dict__.items()})
            return
        self.samples += other.samples
        if self.estimator == "minibatch":
            self._buffer = self._buffer + other._buffer
            self._buffered += other._buffered
            if other._hsic is not None:
                self._hsic = other._hsic.clone() if self._hsic is None else self._hsic + other._hsic
            while self._buffered >= self.chunk_size + 4:
                self._process(self._take(self.chunk_size))
            return
        # exact: move other's sums from its shift to ours (covariances are shift invariant)
        n, d, zsum = other.samples, other._shift - self._shift, other._zsum
        self._zsum = self._zsum + zsum + n * d
        if not self.cross:
            self._gram = self._gram + other._gram + torch.outer(zsum, d) + torch.outer(d, zsum) + n * torch.outer(d, d)
            return
        da = sum(self._dims[: self._num_a])
        self._gram = (self._gram + other._gram + torch.outer(zsum[:da], d[da:]) + torch.outer(d[:da], zsum[da:])
                      + n * torch.outer(d[:da], d[da:]))
        offsets = torch.tensor([0] + self._dims).cumsum(0).tolist()
        merged = []
        for i, (mine, theirs) in enumerate(zip(self._self_grams, other._self_grams)):
            s = slice(offsets[i], offsets[i + 1])
            merged.append(mine + theirs + torch.outer(zsum[s], d[s]) + torch.outer(d[s], zsum[s]) + n * torch.outer(d[s], d[s]))
        self._self_grams = merged

    def compute(self) -> Tensor:
        if self.samples == 0:
            raise ValueError("CKAAccumulator: no samples accumulated")
        if self.estimator == "exact":
            if self.samples < 2:
                raise ValueError(f"CKA needs at least 2 samples, got {self.samples}")
            return self._compute_exact()
        if self.samples < 4:
            raise ValueError(f"minibatch CKA needs at least 4 samples, got {self.samples}")
        hsic = self._hsic
        if self._buffered:
            # the tail (4 <= r <= chunk_size + 3 samples) is processed on a copy: compute() does not
            # change the state, so more updates may follow
            tail = [torch.cat([part[i] for part in self._buffer]) for i in range(len(self._buffer[0]))]
            extra = self._chunk_hsic(tail)
            hsic = extra if hsic is None else hsic + extra
        if not self.cross:
            diag = hsic.diagonal()
            return _cka_from_hsic(hsic, diag, diag)
        la = self._num_a
        diag = hsic.diagonal()
        return _cka_from_hsic(hsic[:la, la:], diag[:la], diag[la:])


# --------------------------------------------------------------------------------------------
# registry accumulators (analysis.registry contract: update(batch), merge(other), finish())


class AttentionSimilarityAccumulator:
    """``attention_similarity`` (L, L), ``head_similarity`` (L, H, H) and the ``head-similarity`` rows
    (mean off-diagonal head-head similarity per layer); option ``similarity_kind``."""

    def __init__(self, context) -> None:
        p, kind = context.geometry.num_prefix_tokens, context.options.similarity_kind
        self.context = context
        self.layers = AttentionSimilarity(p, kind)
        self.heads = {l: HeadSimilarity(p, kind) for l in context.layers}

    def update(self, batch) -> None:
        attention = [batch.patch_attention(l) for l in self.context.layers]
        for a, acc in zip(attention, self.heads.values()):
            acc.update(a)
        self.layers.update(attention)

    def merge(self, other: AttentionSimilarityAccumulator) -> None:
        self.layers.merge(other.layers)
        for l, acc in self.heads.items():
            acc.merge(other.heads[l])

    def finish(self):
        from .results import Record, matrix_records

        name, n = self.context.model_name, self.layers.images
        heads = torch.stack([acc.compute() for acc in self.heads.values()])
        layers, (low, high) = self.layers.compute(), self.layers.interval()
        records = matrix_records(name, "attention-similarity", layers, n, (low, high))
        for l, acc in self.heads.items():
            records += matrix_records(name, "head-pair-similarity", heads[l - 1], n, acc.interval(), layer=l)
        if heads.shape[-1] > 1:
            for l, acc in self.heads.items():
                off_low, off_high = acc.off_diagonal.interval()
                records.append(Record(name, l, -1, "head-similarity", float(acc.off_diagonal.mean), n,
                                      float(off_low), float(off_high)))
        return records, {"attention_similarity": layers, "head_similarity": heads}


class LayerCKAAccumulator:
    """Linear CKA between the block outputs of one model: ``cka`` (L, L); options ``cka_pool``,
    ``cka_estimator``, ``cka_chunk``."""

    def __init__(self, context) -> None:
        opts, g = context.options, context.geometry
        self.has_cls = bool(getattr(g, "has_class_token", False))
        check_pool(opts.cka_pool, CKA_POOLS, has_class_token=self.has_cls, key="cka_pool")
        self.context = context
        self.cka = CKAAccumulator(estimator=opts.cka_estimator, chunk_size=opts.cka_chunk)
        self.images = 0

    def update(self, batch) -> None:
        p, pool = self.context.geometry.num_prefix_tokens, self.context.options.cka_pool
        self.cka.update([pool_features(batch.captured.block_output[l], p, pool, self.has_cls) for l in self.context.layers])
        self.images += len(batch)

    def merge(self, other: LayerCKAAccumulator) -> None:
        self.cka.merge(other.cka)
        self.images += other.images

    def finish(self):
        from .results import matrix_records

        matrix = self.cka.compute()
        return matrix_records(self.context.model_name, "cka", matrix, self.images), {"cka": matrix}
