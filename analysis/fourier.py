"""Fourier analysis of token maps: relative log amplitude from frequency 0 to pi.

Follows naver-ai/cl-vs-mim: patch tokens (prefix removed) are laid out as ``(B, C, h, h)``,
``log(|FFT2| + 1e-6)`` is taken per channel, averaged over images and channels, shifted so
frequency 0 sits at index ``h // 2`` (the notebook's roll by ``h / 2``), and the diagonal from the
centre to the last element (``h - h // 2`` values: frequencies ``(2 pi k / h, 2 pi k / h)``) is
taken relative to its first value. The last value is the "high-frequency" log amplitude.

Only those ``h - h // 2`` diagonal coefficients are used, and ``F(k, k) = sum_{y,x} t[y, x]
exp(-2 pi i k (y + x) / h)`` depends on a position only through ``(y + x) mod h``: the token map is
first summed along its ``h`` wrapped anti-diagonals (``S[d] = sum_{(y + x) mod h = d} t[y, x]``,
accumulated in float64, one read of the tokens), then a length-``h`` DFT of ``S`` gives the
coefficients (``F(k, k) = sum_d S[d] exp(-2 pi i k d / h)``). Same coefficients as ``fft2`` (to
float64 rounding) for a fraction of the work; :func:`log_amplitude` still gives the full 2-D map.
Streaming is exact: per-image channel-mean log amplitudes go into float64 moments (mean and
squared deviations, :mod:`analysis.uncertainty`), which also give the 95% interval over images.
"""
from __future__ import annotations

from collections.abc import Sequence

import functools
import math

import torch
from torch import Tensor

from .uncertainty import CI_LEVEL, Moments

__all__ = [
    "log_amplitude",
    "diagonal_log_amplitude",
    "delta_log_amplitude",
    "fourier_frequencies",
    "FourierAccumulator",
    "LayerFourierAccumulator",
]

EPS = 1e-6


def _square_side(grid: int | Sequence[int]) -> int:
    if isinstance(grid, int):
        return grid
    h, w = (int(v) for v in grid)
    if h != w:
        raise ValueError(f"Fourier analysis needs a square token grid, got {h}x{w}")
    return h


def _check_tokens(tokens: Tensor, side: int, num_prefix_tokens: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be (B, N, C), got {shape}")
    n = tokens.shape[1]
    if n != num_prefix_tokens + side * side:
        raise ValueError(
            f"tokens have {n} entries but grid {side}x{side} + {num_prefix_tokens} prefix tokens = "
            f"{num_prefix_tokens + side * side}"
        )


def log_amplitude(tokens: Tensor, grid: int | Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """Per-image channel-mean ``log(|FFT2| + 1e-6)`` map ``(B, h, h)`` (float32, unshifted)."""
    side = _square_side(grid)
    _check_tokens(tokens, side, num_prefix_tokens)
    b, _, c = tokens.shape
    x = tokens[:, num_prefix_tokens:].float().transpose(1, 2).reshape(b, c, side, side)
    return torch.log(torch.fft.fft2(x).abs() + EPS).mean(1)


@functools.lru_cache(maxsize=16)
def _dft_basis(side: int, device: str) -> Tensor:
    """``(2F, side)`` float64: real then imaginary parts of ``exp(-2 pi i k d / side)``, ``k < F = side - side // 2``."""
    k = torch.arange(side - side // 2, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * torch.arange(side, dtype=torch.float64)[None, :] / side  # (F, side)
    return torch.cat([torch.cos(angle), -torch.sin(angle)]).to(device)


def _anti_diagonal_sums(tokens: Tensor, side: int, num_prefix_tokens: int) -> Tensor:
    """``S[b, d, c] = sum_y t[b, y, (d - y) mod side, c]`` in float64: ``(B, side, C)``.

    Hand-written as in-place slice additions of each grid row ``y`` shifted by ``y``: every token is
    read once and accumulated in float64, one grid row at a time through a reused float64 row
    buffer (a float64 copy of all tokens, or a temporary per addition, costs more in allocation
    than the arithmetic).
    """
    b, _, c = tokens.shape
    grid = tokens[:, num_prefix_tokens:].reshape(b, side, side, c)  # a view for contiguous tokens
    sums = grid[:, 0].to(torch.float64, copy=True)  # row y = 0: anti-diagonal d = x
    row = torch.empty_like(sums)
    for y in range(1, side):
        row.copy_(grid[:, y])
        sums[:, y:] += row[:, : side - y]  # x < side - y: anti-diagonal d = x + y
        sums[:, :y] += row[:, side - y:]  # x >= side - y: d = x + y - side (wrapped)
    return sums


def diagonal_log_amplitude(tokens: Tensor, grid: int | Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """Per-image channel-mean ``log(|F(k, k)| + 1e-6)`` for ``k = 0..h - h//2 - 1``: ``(B, h - h//2)`` float64."""
    side = _square_side(grid)
    _check_tokens(tokens, side, num_prefix_tokens)
    basis = _dft_basis(side, str(tokens.device))
    coeffs = torch.matmul(basis, _anti_diagonal_sums(tokens, side, num_prefix_tokens))  # (B, 2F, C): re, then im
    f = basis.shape[0] // 2
    re, im = coeffs[:, :f], coeffs[:, f:]
    # |F| = sqrt(re^2 + im^2): torch.hypot is a scalar loop on CPU, tens of times slower, and token
    # coefficients are nowhere near the float64 overflow that hypot guards against
    amplitude = torch.addcmul(re.square(), im, im).sqrt_()
    return amplitude.add_(EPS).log_().mean(-1)


def delta_log_amplitude(tokens: Tensor, grid: int | Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """Relative log amplitude ``(h - h // 2,)`` (float64) from frequency 0 to ``2 pi (h - h//2 - 1) / h``."""
    curve = diagonal_log_amplitude(tokens, grid, num_prefix_tokens).mean(0)
    return curve - curve[0]


def fourier_frequencies(grid: int | Sequence[int]) -> Tensor:
    """Frequencies of :func:`delta_log_amplitude` in units of pi: ``2 k / h`` for ``k = 0..h - h//2 - 1``."""
    side = _square_side(grid)
    return torch.arange(side - side // 2, dtype=torch.float64) * 2.0 / side


class FourierAccumulator:
    """Streaming :func:`delta_log_amplitude` for several layers (e.g. embedding + every block).

    ``update(tokens_per_layer)`` takes one ``(B, N, C)`` tensor per layer (same images);
    ``compute()`` returns ``(num_layers, h - h // 2)`` float64 and :meth:`interval` its 95% interval
    over images. Each image's curve relative to its own frequency 0 goes into a
    :class:`analysis.uncertainty.Moments`: the mean of those is the difference of the means, so
    ``compute()`` is :func:`delta_log_amplitude` over all images, with an exact standard error.
    """

    def __init__(self, grid: int | Sequence[int], num_prefix_tokens: int = 1, num_layers: int | None = None) -> None:
        self.side = _square_side(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.num_layers = num_layers
        self.moments = Moments()

    @property
    def images(self) -> int:
        return self.moments.images

    def update(self, tokens_per_layer: Sequence[Tensor] | Tensor) -> None:
        if isinstance(tokens_per_layer, Tensor):
            tokens_per_layer = [tokens_per_layer]
        tokens_per_layer = list(tokens_per_layer)
        if self.num_layers is None:
            self.num_layers = len(tokens_per_layer)
        if len(tokens_per_layer) != self.num_layers:
            raise ValueError(f"expected tokens for {self.num_layers} layers, got {len(tokens_per_layer)}")
        batch = {t.shape[0] for t in tokens_per_layer}
        if len(batch) != 1:
            raise ValueError(f"all layers must hold the same images, got batch sizes {sorted(batch)}")
        curves = torch.stack(
            [diagonal_log_amplitude(t, self.side, self.num_prefix_tokens).cpu() for t in tokens_per_layer], 1
        )  # (B, layers, F)
        self.moments.add(curves - curves[..., :1])

    def merge(self, other: FourierAccumulator) -> None:
        """Add the moments of ``other`` (disjoint images): exact up to float64 rounding."""
        if (self.side, self.num_prefix_tokens) != (other.side, other.num_prefix_tokens):
            raise ValueError("cannot merge Fourier accumulators of different geometries")
        self.moments.merge(other.moments)

    def compute(self) -> Tensor:
        if self.images == 0:
            raise ValueError("FourierAccumulator: no images accumulated")
        return torch.from_numpy(self.moments.mean)

    def interval(self, level: float = CI_LEVEL) -> tuple[Tensor, Tensor]:
        """``(low, high)`` of the ``level`` interval over images of :meth:`compute` (0 at frequency 0)."""
        self.compute()
        low, high = self.moments.interval(level)
        return torch.from_numpy(low), torch.from_numpy(high)

    def frequencies(self) -> Tensor:
        return fourier_frequencies(self.side)


class LayerFourierAccumulator:
    """Registry accumulator of ``fourier``: the embedding and every block output of a ViT with a
    square grid; ``fourier`` (L+1, F), ``fourier_freqs`` (F,) and ``fourier-high-frequency`` rows."""

    def __init__(self, context) -> None:
        g = context.geometry
        self.context = context
        self.fourier = FourierAccumulator(g.grid, g.num_prefix_tokens, g.depth + 1)

    def update(self, batch) -> None:
        out = batch.captured
        self.fourier.update([out.embedding] + [out.block_output[l] for l in self.context.layers])

    def merge(self, other: LayerFourierAccumulator) -> None:
        self.fourier.merge(other.fourier)

    def finish(self):
        from .results import Record

        curves, (low, high) = self.fourier.compute(), self.fourier.interval()
        records = [Record(self.context.model_name, l, -1, "fourier-high-frequency", float(curves[l, -1]),
                          self.fourier.images, float(low[l, -1]), float(high[l, -1])) for l in range(curves.shape[0])]
        return records, {"fourier": curves, "fourier_freqs": self.fourier.frequencies()}
