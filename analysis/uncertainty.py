"""Uncertainty over images: streaming moments and the 95% interval of a mean over images (torch-free).

Most scalar metrics of the analyses (attention distance, entropy and NMI per layer and head, the
attention shift, the high-frequency Fourier amplitude, the attention-sink masses, the
attention-similarity matrices) are **means over images of a per-image value**. For such a mean the
standard error of the per-image values is exact, so no bootstrap is needed: the interval is
Student's

    mean ± t_{(1 + level) / 2, n - 1} · s / sqrt(n),    s² = Σ (x_i - mean)² / (n - 1),

the usual two-sided interval for a population mean (``level`` = :data:`CI_LEVEL` = 0.95).

:class:`Moments` keeps, per element, the count, the mean and the sum of squared deviations ``M2``
in float64 and adds a batch or another :class:`Moments` with the pairwise update of Chan, Golub and
LeVeque (1979). Memory is three arrays of the metric's shape whatever the number of images; the
result does not depend on how the images were split into batches or processes (up to float64
rounding), and it equals the interval computed from all per-image values held in memory. NaN
per-image values (an image with no value for that element) are left out of that element only.
numpy and scipy have no mergeable streaming variance, hence this small class.

Statistics over the whole image set that are not a mean of per-image values (RankMe, α, CKA, the
token-norm quantiles, the cross-model alignments) carry no interval (NaN in ``ci_low``/``ci_high``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CI_LEVEL", "Moments", "t_interval", "level_text"]

#: The level of every interval the analyses report.
CI_LEVEL = 0.95


def level_text(level: float = CI_LEVEL) -> str:
    """``"95%"``: how captions and legends state the level."""
    return f"{100 * level:g}%"


def _as_float64(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def t_interval(mean: Any, m2: Any, n: Any, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` of Student's interval for the mean from ``mean``, ``M2`` and the count ``n``
    (elementwise arrays); NaN where ``n < 2``."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), got {level!r}")
    from scipy.stats import t

    mean, m2, n = _as_float64(mean), _as_float64(m2), _as_float64(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = t.ppf(0.5 + level / 2, n - 1) * np.sqrt(m2 / (n - 1) / n)
    half = np.where(n >= 2, half, np.nan)
    return mean - half, mean + half


class Moments:
    """Streaming count, mean and ``M2`` per element of a per-image statistic (float64, NaN-aware).

    ``add(values)`` takes ``(B, ...)`` per-image values; ``merge(other)`` adds another
    :class:`Moments` of disjoint images. ``mean`` (NaN where no image had a value), ``count``,
    ``std`` (sample standard deviation) and :meth:`interval` read it.
    """

    def __init__(self) -> None:
        self.count: np.ndarray | None = None
        self._mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.images = 0

    def add(self, values: Any) -> None:
        """Accumulate per-image values ``(B, ...)`` (a torch tensor or an array)."""
        values = _as_float64(values)
        if values.ndim == 0:
            raise ValueError("Moments.add expects per-image values (B, ...), got a scalar")
        present = ~np.isnan(values)
        count = present.sum(0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, np.nansum(values, 0) / count, 0.0)
        m2 = np.nansum(np.where(present, (values - mean) ** 2, np.nan), 0)
        self._combine(count, mean, m2)
        self.images += values.shape[0]

    def merge(self, other: Moments) -> None:
        """Add ``other``'s moments (disjoint images): equal, up to rounding, to adding its values here."""
        if other.count is not None:
            self._combine(other.count, other._mean, other.m2)
        self.images += other.images

    def _combine(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.count is None:
            self.count, self._mean, self.m2 = count.copy(), mean.copy(), m2.copy()
            return
        if count.shape != self.count.shape:
            raise ValueError(f"cannot combine moments of shape {tuple(self.count.shape)} and {tuple(count.shape)}")
        total = self.count + count
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, count / total, 0.0)
        delta = mean - self._mean
        self._mean = self._mean + delta * share
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * share
        self.count = total

    def _check(self) -> None:
        if self.count is None:
            raise ValueError("Moments: no images accumulated")

    @property
    def mean(self) -> np.ndarray:
        """Mean over the images with a value (NaN for an element none had)."""
        self._check()
        return np.where(self.count > 0, self._mean, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation over images (NaN with fewer than 2 images)."""
        self._check()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count >= 2, np.sqrt(self.m2 / (self.count - 1)), np.nan)

    def interval(self, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` of the ``level`` interval of the mean (NaN with fewer than 2 images)."""
        self._check()
        return t_interval(self.mean, self.m2, self.count, level)
