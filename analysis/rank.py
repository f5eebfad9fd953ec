"""Representation rank per layer: RankMe and the power-law decay of the feature spectrum.

* **RankMe** (Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023): with ``sigma_k`` the singular values
  of the (images × features) matrix ``X`` of pooled features, ``p_k = sigma_k / sum(sigma) + eps``
  and ``RankMe = exp(-sum_k p_k log p_k)`` (``eps = 1e-7``, the paper's). ``X`` is **not centred**,
  as in the paper.
* **alpha** (the eigenspectrum decay of alpha-ReQ, Agrawal et al., NeurIPS 2022): the least-squares
  slope ``-alpha`` of ``log lambda_k`` against ``log k`` over the top of the spectrum of the
  **centred** feature covariance, ``k = 1 .. K`` with ``K = max(2, min(n - 1, D) // 2)`` (the tail
  is noise for ``n`` images), reported as ``alpha`` (larger: faster decay, lower effective dimension).

Features: every block output pooled per image (option ``rank_pool``: ``avg``, the mean of the patch
tokens, or ``cls``; :func:`kamim.backbone.pool_tokens`, the features the evaluations use). Streaming
and exact: the accumulator keeps ``X^T X`` and ``sum x`` in float64 per layer (``D × D``), so the
result does not depend on the batch size and two accumulators over disjoint images merge exactly;
memory is ``L × D²`` doubles, independent of the number of images.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from kamim.backbone import check_pool, pool_tokens

__all__ = ["RANK_POOLS", "RANKME_EPS", "rankme", "spectrum_alpha", "SecondMoments", "RankAccumulator"]

RANK_POOLS = ("avg", "cls")
RANKME_EPS = 1e-7


def rankme(singular_values: np.ndarray, eps: float = RANKME_EPS) -> float:
    """``exp(-sum p log p)`` with ``p_k = sigma_k / sum(sigma) + eps`` (Garrido et al. 2023, eq. 1)."""
    s = np.clip(np.asarray(singular_values, dtype=np.float64), 0.0, None)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum_alpha(eigenvalues: np.ndarray, top: int) -> float:
    """``alpha`` of ``lambda_k ~ k^-alpha`` fitted by least squares on ``log``-``log`` over the ``top``
    largest positive eigenvalues (NaN with fewer than two)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1][:top]
    lam = lam[lam > 0]
    if lam.size < 2:
        return float("nan")
    k = np.arange(1, lam.size + 1, dtype=np.float64)
    slope = np.polyfit(np.log(k), np.log(lam), 1)[0]
    return float(-slope)


class SecondMoments:
    """``X^T X``, ``sum x`` and the count of a stream of ``(n, D)`` feature rows, in float64."""

    def __init__(self) -> None:
        self.xtx: Tensor | None = None
        self.sum: Tensor | None = None
        self.n = 0

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        xtx, s = (x.T @ x).cpu(), x.sum(0).cpu()
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.sum = s if self.sum is None else self.sum + s
        self.n += x.shape[0]

    def merge(self, other: SecondMoments) -> None:
        if other.xtx is None:
            return
        if self.xtx is None:
            self.xtx, self.sum = other.xtx.clone(), other.sum.clone()
        else:
            self.xtx, self.sum = self.xtx + other.xtx, self.sum + other.sum
        self.n += other.n

    def singular_values(self) -> np.ndarray:
        """Singular values of the uncentred ``X`` (``sqrt`` of the eigenvalues of ``X^T X``), descending."""
        lam = np.linalg.eigvalsh(self.xtx.numpy())[::-1]
        return np.sqrt(np.clip(lam, 0.0, None))

    def covariance_eigenvalues(self) -> np.ndarray:
        """Eigenvalues of the centred covariance ``(X^T X - n mu mu^T) / (n - 1)``, descending."""
        mu = self.sum.numpy() / self.n
        cov = (self.xtx.numpy() - self.n * np.outer(mu, mu)) / max(self.n - 1, 1)
        return np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)


class RankAccumulator:
    """``representation-rank``: ``rankme`` and ``alpha`` per block (rows), the singular values per
    block (array ``rank_spectrum``, ``(L, min(n, D))``); option ``rank_pool``."""

    def __init__(self, context) -> None:
        g = context.geometry
        self.has_cls = bool(getattr(g, "has_class_token", False))
        self.pool = context.options.rank_pool
        check_pool(self.pool, RANK_POOLS, has_class_token=self.has_cls, key="rank_pool")
        self.context = context
        self.moments = {layer: SecondMoments() for layer in context.layers}

    def update(self, batch) -> None:
        p = self.context.geometry.num_prefix_tokens
        for layer, acc in self.moments.items():
            acc.update(pool_tokens(batch.captured.block_output[layer], p, self.pool))

    def merge(self, other: RankAccumulator) -> None:
        for layer, acc in self.moments.items():
            acc.merge(other.moments[layer])

    def finish(self):
        from .results import Record

        records, spectra = [], []
        name = self.context.model_name
        for layer, acc in self.moments.items():
            sigma = acc.singular_values()[: min(acc.n, len(acc.sum))]
            top = max(2, min(acc.n - 1, len(acc.sum)) // 2)
            records += [Record(name, layer, -1, "rankme", rankme(sigma), acc.n),
                        Record(name, layer, -1, "spectrum-alpha", spectrum_alpha(acc.covariance_eigenvalues(), top),
                               acc.n)]
            spectra.append(sigma)
        width = max(len(s) for s in spectra)
        padded = np.full((len(spectra), width), np.nan)
        for i, s in enumerate(spectra):
            padded[i, : len(s)] = s
        return records, {"rank_spectrum": padded}
