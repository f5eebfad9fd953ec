"""Attention statistics per head: mean attention distance, NMI, entropy, query maps.

Conventions (shared by every function here, following naver-ai/cl-vs-mim):

* ``attn`` is ``(B, heads, N, N)`` softmax probabilities with ``N = num_prefix_tokens + h * w``
  (prefix = class / distillation / register tokens, first in the sequence).
* Prefix rows and columns are removed and the remaining rows renormalised to sum to 1, so
  every statistic describes how patches attend to patches.
* Row statistics are computed in float32 (whatever the input dtype, e.g. bf16); sums over
  queries and the averages over images are taken in float64; accumulators give the same result
  whatever the batching.

Performance (see BENCHMARKS.md): the prefix is never copied out and rows are never
renormalised in memory. One chunked sweep (:func:`_sweep`) reads the attention once and derives
the row sums (also used for the row-sum validation), ``sum a log a`` (one log per entry, the cost
floor of NMI / entropy) and the key marginal or the distance-weighted sums from cache; the
renormalisation is folded into the formulas (``H(a / s) = log s - sum(a log a) / s``).

Deliberate differences from the notebooks: the distance matrix is built vectorised once per
geometry (not with O(N^2) Python loops), grids need not be square, no magic ``eps`` (exact
``0 log 0 = 0``; cl-vs-mim adds ``1e-8`` to the attention before renormalising for NMI, which moves
NMI by up to 7% when rows put almost all their mass on the class token), and inputs are validated.

Rows with no attention on patches: a query row whose attention over the patch tokens sums to
exactly zero (all its mass on prefix tokens) has no patch distribution, so it is **excluded** from
attention distance, NMI and entropy (each is the reference formula over the remaining rows of the
image: uniform ``p(q)`` over them, ``log`` of their count in ``H(q)``) instead of counted as a zero
row (the notebooks' ``1e-32`` / ``1e-8`` make such rows uniform instead). An image and head with
no remaining row has no value (NaN per image) and is left out of that head's mean over images; the
tidy table says how many rows were excluded (metric ``<metric>-excluded-rows``, per layer and head,
summed over images), its ``n_images`` column how many images each value averages and its
``ci_low``/``ci_high`` columns the 95% interval over images (:mod:`analysis.uncertainty`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .uncertainty import CI_LEVEL, Moments

__all__ = [
    "distance_matrix",
    "patch_attention",
    "PatchAttention",
    "entropy_sum",
    "prepare_attention",
    "attention_distance",
    "normalized_mutual_information",
    "attention_entropy",
    "attention_maps",
    "uniform_attention_distance",
    "uniform_nmi",
    "uniform_attention_entropy",
    "AttentionDistance",
    "AttentionNMI",
    "AttentionEntropy",
    "MeanOverImages",
    "FirstImages",
    "HeadMetricAccumulator",
    "AttentionMapsAccumulator",
    "distance_accumulator",
    "nmi_accumulator",
    "entropy_accumulator",
]

_ROW_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
_TINY = torch.finfo(torch.float32).tiny
# Maps are processed in chunks of about this many float32 elements (2 MiB): every pass after the first
# reads the chunk from the CPU cache, and the few work buffers are allocated once per call (fresh
# multi-MiB allocations cost page faults that are as slow as the arithmetic on this data).
_CHUNK_ELEMENTS = 1 << 19


def _grid(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return (grid, grid)
    h, w = (int(v) for v in grid)
    return (h, w)


def _patch(patch_size: int | Sequence[int]) -> tuple[float, float]:
    if isinstance(patch_size, (int, float)):
        return (float(patch_size), float(patch_size))
    ph, pw = (float(v) for v in patch_size)
    return (ph, pw)


@functools.lru_cache(maxsize=32)
def _distance_matrix_cached(grid: tuple[int, int], patch: tuple[float, float], device: str, dtype: torch.dtype) -> Tensor:
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    coords = torch.stack([ys.flatten() * patch[0], xs.flatten() * patch[1]], dim=1)
    # explicit differences rather than torch.cdist: cdist may use the |a|^2+|b|^2-2ab expansion
    dist = (coords[:, None, :] - coords[None, :, :]).pow(2).sum(-1).sqrt()
    return dist.to(device=device, dtype=dtype)


def distance_matrix(grid: int | Sequence[int], patch_size: int | Sequence[int], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel distances ``(h*w, h*w)`` between patch centres on a row-major ``grid`` (cached per geometry).

    The returned tensor is shared by the cache: do not modify it in place.
    """
    return _distance_matrix_cached(_grid(grid), _patch(patch_size), str(torch.device(device)), dtype)


def entropy_sum(p: Tensor, dim: int = -1) -> Tensor:
    """``-sum p log p`` along ``dim`` with ``0 log 0 = 0`` (float32 or wider ``p >= 0``).

    Zeros are clamped to the smallest normal float before the log, so they contribute
    ``0 * log(tiny) = 0``; done in place on one temporary, this is about twice as fast as
    ``torch.special.entr`` on CPU.
    """
    return -p.clamp_min(torch.finfo(p.dtype).tiny).log_().mul_(p).sum(dim)


def _patch_block(attn: Tensor, num_prefix_tokens: int, grid: int | Sequence[int] | None) -> Tensor:
    """Check the shape of ``attn`` and return its patch-to-patch block: a view in the input dtype."""
    if not isinstance(attn, Tensor) or attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, Tensor) else type(attn).__name__
        raise ValueError(f"attention must be (B, heads, N, N), got {shape}")
    n = attn.shape[-1]
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} is invalid for {n} tokens")
    if grid is not None:
        h, w = _grid(grid)
        if n != num_prefix_tokens + h * w:
            raise ValueError(
                f"attention has {n} tokens but grid {h}x{w} + {num_prefix_tokens} prefix tokens = "
                f"{num_prefix_tokens + h * w}"
            )
    return attn[..., num_prefix_tokens:, num_prefix_tokens:]


def _check_rows(attn: Tensor, num_prefix_tokens: int, patch_row_sum: Tensor, prefix_mass: Tensor | None = None) -> None:
    """Raise unless every row of ``attn`` sums to 1, given the row sums of its patch block.

    The patch rows are checked as patch-block sum + prefix-column sum (``prefix_mass``, taken by
    :func:`_sweep` while the rows are in cache), so the only extra work is over the prefix rows, not
    another pass over the attention.
    """
    p = num_prefix_tokens
    if patch_row_sum.numel() == 0:
        return
    if p and prefix_mass is None:
        prefix_mass = attn[..., p:, :p].float().sum(-1)
    full = patch_row_sum + prefix_mass if p else patch_row_sum
    err = (full - 1).abs().max()
    if p:
        err = torch.maximum(err, (attn[..., :p, :].float().sum(-1) - 1).abs().max())
    err = err.item()
    tol = _ROW_TOL.get(attn.dtype, 1e-3)
    if not err <= tol:  # also catches NaN
        raise ValueError(f"attention rows must sum to 1 (softmax probabilities); max |row sum - 1| = {err:.3g} > {tol}")


class _Sweep(NamedTuple):
    row_sum: Tensor  # (B, heads, Q)   sum_k A[q, k] over the patch block, before renormalising
    xlogx: Tensor | None  # (B, heads, Q)   sum_k A log A, 0 log 0 = 0
    marginal: Tensor | None  # (B, heads, K)   sum_q A[q, k] / row_sum[q]
    weighted: Tensor | None  # (B, heads, Q)   sum_k A[q, k] W[q, k]
    prefix_mass: Tensor | None = None  # (B, heads, Q)   sum of the prefix columns (with the row sums)


def _sweep(attn: Tensor, num_prefix_tokens: int, row_sum: Tensor | None = None, *, entropy: bool = False,
           marginal: bool = False, weights: Tensor | None = None) -> _Sweep:
    """Row statistics of the patch block of ``attn`` ``(B, heads, N, N)`` in one pass over memory (float32).

    Hand-written chunking (eager PyTorch has no fused kernel for this): the maps are taken a few at
    a time (``_CHUNK_ELEMENTS``), so the row sums, the ``A log A`` pass and the marginal / weighted
    sums read each chunk from the CPU cache instead of streaming the whole tensor from memory once
    per statistic, and no full-size temporary is allocated. ``row_sum`` skips the row sums when
    already known; results do not depend on it (same chunks, same arithmetic).
    """
    p = num_prefix_tokens
    b, h, n_tok, _ = attn.shape
    q = k = n_tok - p
    rows = attn.flatten(0, 1)[:, p:, :]  # (M, Q, N): patch rows with their prefix columns
    m = rows.shape[0]
    opts = dict(dtype=torch.float32, device=attn.device)
    sums = torch.empty(m, q, **opts) if row_sum is None else row_sum.reshape(m, q)
    prefix = torch.empty(m, q, **opts) if (row_sum is None and p) else None
    xlogx = torch.empty(m, q, **opts) if entropy else None
    marg = torch.empty(m, k, **opts) if marginal else None
    weighted = torch.empty(m, q, **opts) if weights is not None else None
    # chunking is for CPU caches; an accelerator takes everything at once
    step = m if attn.device.type != "cpu" else max(1, min(m, _CHUNK_ELEMENTS // max(1, q * n_tok)))
    # The log runs on whole contiguous rows, prefix columns included (p / N more logs, ignored after):
    # on the strided rows of the patch block alone it is up to 2x slower, and a contiguous copy of the
    # block would be one more pass. Other dtypes / layouts are copied chunk by chunk into float32.
    copy = rows.dtype != torch.float32 or rows.stride(-1) != 1 or rows.stride(-2) != n_tok
    work = torch.empty(step, q, n_tok, **opts) if (entropy or weights is not None) else None
    cbuf = torch.empty(step, q, n_tok, **opts) if copy else None
    inv = torch.empty(m, 1, q, **opts) if marginal else None
    # every per-chunk view is made by one split() per tensor up front: on a busy CPU the dispatch of
    # small view ops costs as much as a pass over a chunk
    n_chunks = -(-m // step)
    split = lambda t: t.split(step) if t is not None else [None] * n_chunks  # noqa: E731
    chunks = zip(split(rows), split(rows[:, :, p:]), split(rows[:, :, :p] if p else None), split(sums),
                 split(prefix), split(xlogx), split(inv), split(None if marg is None else marg.view(m, 1, k)),
                 split(weighted))
    head = lambda t, n: t if t is None or t.shape[0] == n else t[:n]  # noqa: E731
    for r, c, pre, s, pm, x, iv, mg, wd in chunks:
        n = r.shape[0]
        if copy:  # convert / make contiguous, then take the views of the buffer
            r = head(cbuf, n).copy_(r)
            c, pre = r[:, :, p:], r[:, :, :p]
        w = head(work, n)
        if entropy:  # first: the compute-bound log hides the memory reads of the chunk
            torch.log(r, out=w)  # one log per entry
        if row_sum is None:
            torch.sum(c, -1, out=s)
            if p:
                torch.sum(pre, -1, out=pm)
        if marginal:  # a row with no patch mass (s = 0) gives NaN here: repaired below
            torch.bmm(torch.reciprocal(s.unsqueeze(1), out=iv), c, out=mg)
        if weights is not None:
            torch.sum(torch.mul(c, weights, out=w[:, :, p:]), -1, out=wd)
        if entropy:  # an exact zero gives 0 * log 0 = NaN: repaired below
            torch.sum(w[:, :, p:].mul_(c), -1, out=x)
    if entropy or marginal:
        _repair_zeros(rows[:, :, p:], sums, xlogx, marg)
    shape = lambda t: None if t is None else t.view(b, h, -1)  # noqa: E731
    return _Sweep(sums.view(b, h, q), shape(xlogx), shape(marg), shape(weighted), shape(prefix))


def _repair_zeros(maps: Tensor, sums: Tensor, xlogx: Tensor | None, marg: Tensor | None) -> None:
    """Recompute, in place, the rare rows / maps whose fast path met an exact zero.

    ``0 log 0`` (a key with exactly zero attention) must count as 0, and a row with no patch mass
    contributes nothing to the marginal; the fast path produces NaN there rather than paying for
    ``nansum`` / ``where`` on every entry. NaN in the input stays NaN in the row sums and is rejected
    by the row check. ``maps`` is the ``(M, Q, K)`` patch block, ``sums`` / ``xlogx`` ``(M, Q)`` and
    ``marg`` ``(M, K)`` the sweep outputs.
    """
    # one reduction to find out whether anything needs repair (almost never)
    probe = sum(t.sum() for t in (xlogx, marg) if t is not None)
    if not torch.isnan(probe):
        return
    if xlogx is not None:
        bad = xlogx.isnan()
        if bad.any():
            rows = maps[bad].float()  # (n_bad, K)
            xlogx[bad] = torch.log(rows).mul_(rows).nansum(-1)
    if marg is not None:
        bad = ~marg.isfinite().all(-1)  # maps with a row of zero (or subnormal) patch mass
        if bad.any():
            s = sums[bad]
            inv = torch.where(s > 0, 1.0 / s.clamp_min(_TINY), 0.0)
            marg[bad] = torch.bmm(inv.unsqueeze(1), maps[bad].float()).squeeze(1)


def _inverse(row_sum: Tensor) -> Tensor:
    """``1 / row_sum``, 0 where a row has no patch mass (all attention on prefix tokens)."""
    return torch.where(row_sum > 0, 1.0 / row_sum.clamp_min(_TINY), 0.0)


def _row_entropy(row_sum: Tensor, xlogx: Tensor) -> Tensor:
    """Entropy (nats, float32) of the renormalised rows: ``H(a / s) = log s - sum(a log a) / s``."""
    return torch.where(row_sum > 0, torch.log(row_sum) - xlogx / row_sum, 0.0)


def _valid_rows(row_sum: Tensor) -> Tensor:
    """Rows with attention on patches, ``(B, heads)`` float64 counts (the others are excluded)."""
    return (row_sum > 0).sum(-1, dtype=torch.float64)


def _mean_row_entropy(row_sum: Tensor, xlogx: Tensor) -> Tensor:
    """Mean over the valid queries of :func:`_row_entropy`, ``(B, heads)``, summed in float64 (NaN
    where no row is valid)."""
    return _row_entropy(row_sum, xlogx).sum(-1, dtype=torch.float64) / _valid_rows(row_sum)


def _nmi_from(row_sum: Tensor, xlogx: Tensor, marginal: Tensor) -> Tensor:
    """Per-image NMI (float64) from the row statistics of one sweep, over the valid rows."""
    n_q = _valid_rows(row_sum)  # (B, heads); excluded rows add nothing to the marginal
    p_k = marginal / n_q[..., None]
    h_k = -p_k.clamp_min(_TINY).log_().mul_(p_k).sum(-1, dtype=torch.float64)  # H(k), 0 log 0 = 0
    # I = sum_qk p(q) A log(A / p(k)) = H(k) - mean_q H(A[q, :]) since sum_q A[q, k] = n_q p(k):
    # one entropy pass, and 0 log 0 = 0 without an eps
    mi = h_k - _mean_row_entropy(row_sum, xlogx)
    # H(k) = 0 (every query on one key) or H(q) = 0 (one valid query): no information, NMI = 0
    nmi = mi / (n_q.clamp_min(1).log() * h_k).sqrt().clamp_min(_TINY)
    return torch.where(n_q > 1, nmi, torch.where(n_q > 0, 0.0, torch.nan))


def patch_attention(attn: Tensor, num_prefix_tokens: int = 1, grid: int | Sequence[int] | None = None) -> Tensor:
    """Validate ``attn`` and return the float32 patch-to-patch attention with rows renormalised.

    Raises ``ValueError`` for a wrong shape, a token count that does not match ``grid`` plus the
    prefix, or rows that do not sum to 1 (tolerance 1e-3, 5e-2 for 16-bit inputs).
    """
    return PatchAttention(attn, num_prefix_tokens, grid).probs


class PatchAttention:
    """Validated patch-to-patch attention, prepared once and shared by several statistics.

    Every statistic in this package accepts either a raw ``(B, heads, N, N)`` tensor or a
    ``PatchAttention``. Construction validates and computes the row sums ``s`` of the un-normalised
    patch block ``raw`` (one pass); quantities are derived lazily (renormalising is folded into the
    formulas, e.g. ``H(a / s) = log s - sum(a log a) / s``), each in about one cached pass over the
    attention, with the same arithmetic as the raw-tensor path. A row that puts all its mass on
    prefix tokens (``s = 0``) counts as an all-zero row.
    """

    def __init__(self, attn: Tensor, num_prefix_tokens: int = 1, grid: int | Sequence[int] | None = None) -> None:
        block = _patch_block(attn, num_prefix_tokens, grid)
        sweep = _sweep(attn, num_prefix_tokens)
        self.row_sum = sweep.row_sum  # (B, heads, Q)
        _check_rows(attn, num_prefix_tokens, self.row_sum, sweep.prefix_mass)
        self.raw = block.float()  # (B, heads, Q, K) float32; a view unless the input is not float32
        self.num_prefix_tokens = num_prefix_tokens
        self._attn = attn
        self._inv = _inverse(self.row_sum)
        self._cache: dict[str, Tensor] = {}

    def _cached(self, name: str, fn) -> Tensor:
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    def _entropy_sweep(self) -> _Sweep:
        # entropy and key marginal in one sweep: NMI needs both, and the marginal is a cheap extra pass
        if "xlogx" not in self._cache:
            sweep = _sweep(self._attn, self.num_prefix_tokens, self.row_sum, entropy=True, marginal=True)
            self._cache["xlogx"], self._cache["marginal"] = sweep.xlogx, sweep.marginal
        return _Sweep(self.row_sum, self._cache["xlogx"], self._cache["marginal"], None)

    @property
    def probs(self) -> Tensor:
        """Rows renormalised to sum to 1, ``(B, heads, Q, K)`` float32."""
        return self._cached("probs", lambda: self.raw * self._inv[..., None])

    @property
    def row_entropy(self) -> Tensor:
        """Entropy (nats) of every renormalised row, ``(B, heads, Q)`` float32."""
        return self._cached("row_entropy", lambda: _row_entropy(self.row_sum, self._entropy_sweep().xlogx))

    @property
    def key_marginal(self) -> Tensor:
        """``p(k) = sum_q p(q) A[q, k]`` with ``p(q)`` uniform over the rows with patch mass, ``(B, heads, K)``."""
        return self._cached("key_marginal", lambda: self._entropy_sweep().marginal
                            / _valid_rows(self.row_sum).float()[..., None])

    @property
    def head_mean(self) -> Tensor:
        """Head-averaged renormalised attention ``(B, Q, K)``."""
        return self._cached("head_mean", lambda: torch.einsum("bhq,bhqk->bqk", self._inv, self.raw) / self.raw.shape[1])

    def weighted_row_sum(self, weights: Tensor) -> Tensor:
        """``sum_k A[q, k] W[q, k]`` for renormalised rows, ``(B, heads, Q)``."""
        return _sweep(self._attn, self.num_prefix_tokens, self.row_sum, weights=weights).weighted * self._inv


def prepare_attention(attn: Tensor | PatchAttention, num_prefix_tokens: int = 1,
                      grid: int | Sequence[int] | None = None) -> PatchAttention:
    """Return ``attn`` as a :class:`PatchAttention`, validating a prepared one against the arguments."""
    if not isinstance(attn, PatchAttention):
        return PatchAttention(attn, num_prefix_tokens, grid)
    if attn.num_prefix_tokens != num_prefix_tokens:
        raise ValueError(f"attention was prepared with {attn.num_prefix_tokens} prefix tokens, not {num_prefix_tokens}")
    if grid is not None:
        h, w = _grid(grid)
        if attn.raw.shape[-1] != h * w:
            raise ValueError(f"attention has {attn.raw.shape[-1]} patch tokens but grid {h}x{w} has {h * w}")
    return attn


def _validated_sweep(attn: Tensor | PatchAttention, num_prefix_tokens: int, grid: int | Sequence[int] | None, *,
                     entropy: bool = False, marginal: bool = False,
                     weights_fn: Callable[[torch.device], Tensor] | None = None) -> _Sweep:
    """The sweep for a prepared attention (cached) or a raw tensor (one pass, then the row check).

    ``weights_fn(device)`` gives the ``(Q, K)`` weights of a weighted row sum (e.g. the distances).
    """
    if isinstance(attn, PatchAttention):
        pa = prepare_attention(attn, num_prefix_tokens, grid)
        sweep = pa._entropy_sweep() if (entropy or marginal) else _Sweep(pa.row_sum, None, None, None)
        if weights_fn is not None:
            weights = weights_fn(pa.raw.device)
            sweep = sweep._replace(weighted=_sweep(pa._attn, num_prefix_tokens, pa.row_sum, weights=weights).weighted)
        return sweep
    _patch_block(attn, num_prefix_tokens, grid)  # shape checks
    weights = weights_fn(attn.device) if weights_fn is not None else None
    sweep = _sweep(attn, num_prefix_tokens, entropy=entropy, marginal=marginal, weights=weights)
    _check_rows(attn, num_prefix_tokens, sweep.row_sum, sweep.prefix_mass)
    return sweep


def _distance_per_image(attn: Tensor | PatchAttention, grid: tuple[int, int], patch_size, num_prefix_tokens: int) -> Tensor:
    sweep = _validated_sweep(attn, num_prefix_tokens, grid,
                             weights_fn=lambda device: distance_matrix(grid, patch_size, device))
    per_query = sweep.weighted * _inverse(sweep.row_sum)  # float32, (B, heads, Q); 0 on excluded rows
    return per_query.sum(-1, dtype=torch.float64) / _valid_rows(sweep.row_sum)  # (B, heads), NaN: no row


def _nmi_per_image(attn: Tensor | PatchAttention, num_prefix_tokens: int) -> Tensor:
    sweep = _validated_sweep(attn, num_prefix_tokens, None, entropy=True, marginal=True)
    return _nmi_from(sweep.row_sum, sweep.xlogx, sweep.marginal)


def _entropy_per_image(attn: Tensor | PatchAttention, num_prefix_tokens: int) -> Tensor:
    sweep = _validated_sweep(attn, num_prefix_tokens, None, entropy=True)
    return _mean_row_entropy(sweep.row_sum, sweep.xlogx)


def attention_distance(attn: Tensor | PatchAttention, grid: int | Sequence[int], patch_size: int | Sequence[int],
                       num_prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance in pixels per head ``(heads,)`` (float64), averaged over queries and images.

    ``D[q, k]`` is the pixel distance between patch centres; per head, ``mean_q sum_k A[q, k] D[q, k]``
    over the rows with attention on patches (module docstring).
    """
    return _distance_per_image(attn, _grid(grid), patch_size, num_prefix_tokens).double().nanmean(0)


def normalized_mutual_information(attn: Tensor | PatchAttention, num_prefix_tokens: int = 1) -> Tensor:
    """NMI between query and key positions per head ``(heads,)`` (float64), mean over images.

    ``p(q)`` uniform, ``p(k) = sum_q p(q) A[q,k]``, ``I = sum p(q) A log(A / p(k))``,
    ``NMI = I / sqrt(H(q) H(k))``: 0 for uniform attention, 1 for the identity. Computed as
    ``I = H(k) - mean_q H(A[q, :])`` from float32 entropies: absolute accuracy about 1e-6.
    """
    return _nmi_per_image(attn, num_prefix_tokens).double().nanmean(0)


def attention_entropy(attn: Tensor | PatchAttention, num_prefix_tokens: int = 1) -> Tensor:
    """Mean entropy (nats) of the patch-to-patch attention rows per head ``(heads,)``, mean over images."""
    return _entropy_per_image(attn, num_prefix_tokens).double().nanmean(0)


def attention_maps(attn: Tensor | PatchAttention, grid: int | Sequence[int], queries: Sequence[tuple[int, int]],
                   num_prefix_tokens: int = 1) -> Tensor:
    """Attention of the patch at each grid position ``(row, col)`` in ``queries`` over the patches.

    Returns ``(B, heads, len(queries), h, w)`` float32 rows (prefix removed, renormalised).
    """
    h, w = _grid(grid)
    a = prepare_attention(attn, num_prefix_tokens, (h, w)).probs
    index = []
    for q in queries:
        r, c = (int(v) for v in q)
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"query {tuple(q)} is outside the {h}x{w} token grid")
        index.append(r * w + c)
    rows = a[:, :, torch.tensor(index, device=a.device, dtype=torch.long)]
    return rows.reshape(*rows.shape[:3], h, w)


def uniform_attention_distance(geometry) -> float:
    """Attention distance of uniform attention (every patch attends to every patch equally): mean of D."""
    return float(distance_matrix(geometry.grid, geometry.patch_size, dtype=torch.float64).mean())


def uniform_nmi(geometry=None) -> float:
    """NMI of uniform attention: exactly 0."""
    return 0.0


def uniform_attention_entropy(geometry) -> float:
    """Entropy of uniform attention over the patches: ``log(h * w)`` nats."""
    return math.log(geometry.grid[0] * geometry.grid[1])


class MeanOverImages:
    """Streaming mean over images of a per-image statistic; ``compute()`` -> float64 tensor.

    Subclasses implement ``_per_image(batch) -> (B, ...)``. A NaN per-image value (no value for that
    image, e.g. a head whose every row was excluded) is left out of that element's mean; ``counts``
    says how many images each element averages (``images``: all images seen). The per-image values
    go into :class:`analysis.uncertainty.Moments` (float64 count, mean and squared deviations), so the
    result and its :meth:`interval` over images do not depend on how the images are split into
    batches, and merging is exact up to float64 rounding.
    """

    def __init__(self) -> None:
        self.moments = Moments()

    @property
    def images(self) -> int:
        return self.moments.images

    @property
    def counts(self) -> Tensor | None:
        count = self.moments.count
        return None if count is None else torch.from_numpy(count.astype(np.int64))

    def _per_image(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def per_image(self, *args: Tensor) -> Tensor:
        """The per-image values ``(B, ...)`` of a batch, without accumulating them."""
        return self._per_image(*args)

    def update(self, *args: Tensor) -> None:
        self.add(self._per_image(*args))

    def add(self, values: Tensor) -> None:
        """Accumulate precomputed per-image values ``(B, ...)``."""
        self.moments.add(values)

    def merge(self, other: MeanOverImages) -> None:
        """Add the moments of ``other`` (disjoint images): exact up to float64 rounding."""
        self.moments.merge(other.moments)

    def compute(self) -> Tensor:
        """The means (NaN for an element no image had a value for)."""
        if self.moments.count is None or self.images == 0:
            raise ValueError(f"{type(self).__name__}: no images accumulated")
        return torch.from_numpy(self.moments.mean)

    def interval(self, level: float = CI_LEVEL) -> tuple[Tensor, Tensor]:
        """``(low, high)`` of the ``level`` interval over images of :meth:`compute` (NaN below 2 images)."""
        self.compute()
        low, high = self.moments.interval(level)
        return torch.from_numpy(low), torch.from_numpy(high)


class AttentionDistance(MeanOverImages):
    """Streaming :func:`attention_distance` for one layer: ``update(attn)``, ``compute() -> (heads,)``."""

    def __init__(self, grid: int | Sequence[int], patch_size: int | Sequence[int], num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.grid, self.patch_size, self.num_prefix_tokens = _grid(grid), patch_size, num_prefix_tokens

    def _per_image(self, attn: Tensor) -> Tensor:
        return _distance_per_image(attn, self.grid, self.patch_size, self.num_prefix_tokens)


class AttentionNMI(MeanOverImages):
    """Streaming :func:`normalized_mutual_information` for one layer."""

    def __init__(self, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def _per_image(self, attn: Tensor) -> Tensor:
        return _nmi_per_image(attn, self.num_prefix_tokens)


class AttentionEntropy(MeanOverImages):
    """Streaming :func:`attention_entropy` for one layer."""

    def __init__(self, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def _per_image(self, attn: Tensor) -> Tensor:
        return _entropy_per_image(attn, self.num_prefix_tokens)


# --------------------------------------------------------------------------------------------
# registry accumulators (analysis.registry contract: update(batch), merge(other), finish())


class FirstImages:
    """Rows of the first ``count`` images of the stream (by stream index), for overlays.

    ``add(indices, name=tensor(B, ...), ...)`` keeps the rows whose index is ``< count`` (on the
    CPU); ``arrays()`` returns them concatenated in stream order. Merging is exact.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._parts: list[tuple[int, dict[str, Tensor]]] = []

    def add(self, indices: Tensor, **columns: Tensor | None) -> None:
        keep = int((indices < self.count).sum())
        if keep:
            kept = {k: v[:keep].detach().cpu() for k, v in columns.items() if v is not None}
            self._parts.append((int(indices[0]), kept))

    def merge(self, other: FirstImages) -> None:
        self._parts.extend(other._parts)

    def arrays(self) -> dict[str, Tensor]:
        parts = [p for _, p in sorted(self._parts, key=lambda item: item[0])]
        if not parts:
            return {}
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}
        return {k: v for k, v in out.items() if len(v) == len(next(iter(out.values())))}


def _record(context, layer: int, head: int, metric: str, value: float, images: int,
            interval: tuple[Any, Any] = (math.nan, math.nan)):
    from .results import Record

    return Record(context.model_name, layer, head, metric, float(value), images, float(interval[0]), float(interval[1]))


class HeadMetricAccumulator:
    """One per-head attention statistic (a :class:`MeanOverImages` per layer) as tidy rows:
    ``metric`` per (layer, head) and the mean over heads (``head = -1``), each with the images it
    averages and its 95% interval over images (the head mean's from the per-image means over heads),
    and ``<metric>-excluded-rows``: the query rows left out because they had no attention on
    patches (summed over images; head -1: over heads too)."""

    def __init__(self, context, metric: str, make: Callable[[], MeanOverImages]) -> None:
        self.context, self.metric = context, metric
        self.layers = {layer: make() for layer in context.layers}
        self.head_means = {layer: Moments() for layer in context.layers}
        self.excluded: dict[int, Tensor] = {}

    def update(self, batch) -> None:
        for layer, acc in self.layers.items():
            attn = batch.patch_attention(layer)
            values = acc.per_image(attn)  # (B, heads)
            acc.add(values)
            self.head_means[layer].add(values.double().nanmean(-1))
            rows = (attn.row_sum == 0).sum((0, 2)).cpu()  # (heads,)
            self.excluded[layer] = rows + self.excluded[layer] if layer in self.excluded else rows

    def merge(self, other: HeadMetricAccumulator) -> None:
        for layer, acc in self.layers.items():
            acc.merge(other.layers[layer])
            self.head_means[layer].merge(other.head_means[layer])
            if layer in other.excluded:
                mine = self.excluded.get(layer)
                self.excluded[layer] = other.excluded[layer] + (0 if mine is None else mine)

    def finish(self):
        records, excluded = [], f"{self.metric}-excluded-rows"
        for layer, acc in self.layers.items():
            values, counts, rows = acc.compute(), acc.counts, self.excluded[layer]
            low, high = acc.interval()
            records += [_record(self.context, layer, h, self.metric, v, int(counts[h]), (low[h], high[h]))
                        for h, v in enumerate(values)]
            records.append(_record(self.context, layer, -1, self.metric, values.nanmean(), acc.images,
                                   self.head_means[layer].interval()))
            records += [_record(self.context, layer, h, excluded, int(n), acc.images) for h, n in enumerate(rows)]
            records.append(_record(self.context, layer, -1, excluded, int(rows.sum()), acc.images))
        return records, {}


def distance_accumulator(context) -> HeadMetricAccumulator:
    """``attention-distance`` (px) per layer and head."""
    g = context.geometry
    return HeadMetricAccumulator(context, "attention-distance",
                                 lambda: AttentionDistance(g.grid, g.patch_size, g.num_prefix_tokens))


def nmi_accumulator(context) -> HeadMetricAccumulator:
    """``nmi`` per layer and head."""
    return HeadMetricAccumulator(context, "nmi", lambda: AttentionNMI(context.geometry.num_prefix_tokens))


def entropy_accumulator(context) -> HeadMetricAccumulator:
    """``attention-entropy`` (nats) per layer and head."""
    return HeadMetricAccumulator(context, "attention-entropy", lambda: AttentionEntropy(context.geometry.num_prefix_tokens))


class AttentionMapsAccumulator:
    """Attention maps of the query patches (option ``map_queries``, default the centre patch) for the
    first ``map_images`` images: ``attention_maps`` (M, L, heads, Q, h, w), ``attention_map_queries``."""

    def __init__(self, context) -> None:
        g, opts = context.geometry, context.options
        self.context = context
        h, w = g.grid
        self.queries = tuple(tuple(int(v) for v in q) for q in (opts.map_queries or ((h // 2, w // 2),)))
        for q in self.queries:
            if len(q) != 2 or not (0 <= q[0] < h and 0 <= q[1] < w):
                raise ValueError(f"map query {q} is outside the {h}x{w} token grid")
        self.first = FirstImages(opts.map_images)

    def update(self, batch) -> None:
        if int(batch.indices[0]) >= self.first.count:
            return
        g = self.context.geometry
        maps = [attention_maps(batch.patch_attention(l), g.grid, self.queries, g.num_prefix_tokens)
                for l in self.context.layers]
        self.first.add(batch.indices, inputs=batch.images.float(), labels=batch.labels,
                       maps=torch.stack(maps, dim=1))

    def merge(self, other: AttentionMapsAccumulator) -> None:
        self.first.merge(other.first)

    def finish(self):
        kept = self.first.arrays()
        arrays = {"attention_maps": kept.pop("maps"), "inputs": kept["inputs"],
                  "attention_map_queries": np.asarray(self.queries, dtype=np.int64).reshape(-1, 2)}
        if "labels" in kept:
            arrays["labels"] = kept["labels"]
        return [], arrays
