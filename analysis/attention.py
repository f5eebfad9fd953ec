"""Attention statistics per head: mean attention distance, NMI, entropy, query maps.

Conventions (shared by every function here, following naver-ai/cl-vs-mim):

* ``attn`` is ``(B, heads, N, N)`` softmax probabilities with ``N = num_prefix_tokens + h * w``
  (prefix = class / distillation / register tokens, first in the sequence).
* Prefix rows and columns are removed and the remaining rows renormalised to sum to 1, so
  every statistic describes how patches attend to patches.
* Statistics are computed per image in float32 (whatever the input dtype, e.g. bf16) and
  averaged over images in float64; accumulators give the same result whatever the batching.

Deliberate differences from the notebooks: the distance matrix is built vectorised once per
geometry (not with O(N^2) Python loops), grids need not be square, no magic ``eps`` (``entr``
gives exact ``0 log 0 = 0``), and inputs are validated.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

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
]

_ROW_TOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


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


def _validated_patch_block(attn: Tensor, num_prefix_tokens: int, grid: int | Sequence[int] | None) -> Tensor:
    """Validate ``attn`` and return its float32 patch-to-patch block (a view, rows not renormalised)."""
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
    a = attn.float()
    tol = _ROW_TOL.get(attn.dtype, 1e-3)
    err = (a.sum(-1) - 1).abs().max().item() if a.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise ValueError(f"attention rows must sum to 1 (softmax probabilities); max |row sum - 1| = {err:.3g} > {tol}")
    return a[..., num_prefix_tokens:, num_prefix_tokens:]


def patch_attention(attn: Tensor, num_prefix_tokens: int = 1, grid: int | Sequence[int] | None = None) -> Tensor:
    """Validate ``attn`` and return the float32 patch-to-patch attention with rows renormalised.

    Raises ``ValueError`` for a wrong shape, a token count that does not match ``grid`` plus the
    prefix, or rows that do not sum to 1 (tolerance 1e-3, 5e-2 for 16-bit inputs).
    """
    return PatchAttention(attn, num_prefix_tokens, grid).probs


class PatchAttention:
    """Validated patch-to-patch attention, prepared once and shared by several statistics.

    Every statistic in this package accepts either a raw ``(B, heads, N, N)`` tensor or a
    ``PatchAttention``. Quantities are derived lazily from the un-normalised patch block ``raw``
    and its row sums ``s`` (renormalising is folded into the formulas, e.g.
    ``H(a / s) = sum(entr(a)) / s + log s``), so each costs about one pass over the attention.
    A row that puts all its mass on prefix tokens (``s = 0``) counts as an all-zero row.
    """

    def __init__(self, attn: Tensor, num_prefix_tokens: int = 1, grid: int | Sequence[int] | None = None) -> None:
        self.raw = _validated_patch_block(attn, num_prefix_tokens, grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.row_sum = self.raw.sum(-1)  # (B, heads, Q)
        self._inv = torch.where(self.row_sum > 0, 1.0 / self.row_sum.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        self._cache: dict[str, Tensor] = {}

    def _cached(self, name: str, fn) -> Tensor:
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    @property
    def probs(self) -> Tensor:
        """Rows renormalised to sum to 1, ``(B, heads, Q, K)`` float32."""
        return self._cached("probs", lambda: self.raw * self._inv[..., None])

    @property
    def row_entropy(self) -> Tensor:
        """Entropy (nats) of every renormalised row, ``(B, heads, Q)``."""

        def entropy() -> Tensor:
            ent = entropy_sum(self.raw) * self._inv + torch.log(self.row_sum.clamp_min(torch.finfo(torch.float32).tiny))
            return torch.where(self.row_sum > 0, ent, 0.0)

        return self._cached("row_entropy", entropy)

    @property
    def key_marginal(self) -> Tensor:
        """``p(k) = sum_q p(q) A[q, k]`` with ``p(q)`` uniform, ``(B, heads, K)``."""
        return self._cached("key_marginal", lambda: torch.einsum("bhq,bhqk->bhk", self._inv, self.raw) / self.raw.shape[-2])

    @property
    def head_mean(self) -> Tensor:
        """Head-averaged renormalised attention ``(B, Q, K)``."""
        return self._cached("head_mean", lambda: torch.einsum("bhq,bhqk->bqk", self._inv, self.raw) / self.raw.shape[1])

    def weighted_row_sum(self, weights: Tensor) -> Tensor:
        """``sum_k A[q, k] W[q, k]`` for renormalised rows, ``(B, heads, Q)``."""
        return (self.raw * weights).sum(-1) * self._inv


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


def _distance_per_image(attn: Tensor | PatchAttention, grid: tuple[int, int], patch_size, num_prefix_tokens: int) -> Tensor:
    pa = prepare_attention(attn, num_prefix_tokens, grid)
    return pa.weighted_row_sum(distance_matrix(grid, patch_size, pa.raw.device)).mean(-1)  # (B, heads)


def _nmi_per_image(attn: Tensor | PatchAttention, num_prefix_tokens: int) -> Tensor:
    pa = prepare_attention(attn, num_prefix_tokens)
    n_q = pa.raw.shape[-2]
    h_k = entropy_sum(pa.key_marginal)
    # I = sum_qk p(q) A log(A / p(k)) = H(k) - mean_q H(A[q, :]) since sum_q A[q, k] = n_q p(k):
    # one entropy pass (shared with attention_entropy), and 0 log 0 = 0 without an eps
    mi = h_k - pa.row_entropy.mean(-1)
    # H(k) = 0 means every query attends to the same single key: no information, NMI = 0
    return mi / (math.log(n_q) * h_k).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def _entropy_per_image(attn: Tensor | PatchAttention, num_prefix_tokens: int) -> Tensor:
    return prepare_attention(attn, num_prefix_tokens).row_entropy.mean(-1)


def attention_distance(attn: Tensor | PatchAttention, grid: int | Sequence[int], patch_size: int | Sequence[int],
                       num_prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance in pixels per head ``(heads,)`` (float64), averaged over queries and images.

    ``D[q, k]`` is the pixel distance between patch centres; per head, ``mean_q sum_k A[q, k] D[q, k]``.
    """
    return _distance_per_image(attn, _grid(grid), patch_size, num_prefix_tokens).double().mean(0)


def normalized_mutual_information(attn: Tensor | PatchAttention, num_prefix_tokens: int = 1) -> Tensor:
    """NMI between query and key positions per head ``(heads,)`` (float64), mean over images.

    ``p(q)`` uniform, ``p(k) = sum_q p(q) A[q,k]``, ``I = sum p(q) A log(A / p(k))``,
    ``NMI = I / sqrt(H(q) H(k))``: 0 for uniform attention, 1 for the identity. Computed as
    ``I = H(k) - mean_q H(A[q, :])`` from float32 entropies: absolute accuracy about 1e-6.
    """
    return _nmi_per_image(attn, num_prefix_tokens).double().mean(0)


def attention_entropy(attn: Tensor | PatchAttention, num_prefix_tokens: int = 1) -> Tensor:
    """Mean entropy (nats) of the patch-to-patch attention rows per head ``(heads,)``, mean over images."""
    return _entropy_per_image(attn, num_prefix_tokens).double().mean(0)


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

    Subclasses implement ``_per_image(batch) -> (B, ...)``. The float64 sum makes the result
    independent of how the images are split into batches.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self.images = 0

    def _per_image(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, *args: Tensor) -> None:
        self.add(self._per_image(*args))

    def add(self, values: Tensor) -> None:
        """Accumulate precomputed per-image values ``(B, ...)``."""
        values = values.double()
        total = values.sum(0).cpu()
        self._sum = total if self._sum is None else self._sum + total
        self.images += values.shape[0]

    def compute(self) -> Tensor:
        if self._sum is None or self.images == 0:
            raise ValueError(f"{type(self).__name__}: no images accumulated")
        return self._sum / self.images


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
