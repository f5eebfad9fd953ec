"""High-norm tokens and attention sinks (Darcet et al., "Vision Transformers Need Registers", ICLR 2024).

Per block ``l`` of a ViT, over the analysed images:

* **patch-token norms**: the distribution of the L2 norms of the patch tokens of the block output,
  kept as an exact, mergeable histogram of ``log10(norm)`` (:data:`LOG_BINS` bins of width 0.01,
  i.e. 2.3% in norm); ``norm-q05``, ``norm-q50``, ``norm-q95``, ``norm-max`` rows are read from it
  (to the bin width), the figure draws it per model.
* **high-norm patches** (``high-norm-fraction``): a patch token is *high-norm* when its norm exceeds
  the median plus ``norm_outlier_mads`` (option, default 10) median absolute deviations of the patch-token
  norms **of its own image and layer**. The rule is per image so that it is exact in one streaming
  pass (a layer-wide median would need a second pass); the outliers Darcet et al. describe are
  about ten times the typical norm, far beyond 10 MADs, while Gaussian tokens essentially never are.
* **attention sinks**: the attention of block ``l``'s patch queries (mean over queries, heads and
  images) on the prefix tokens (``sink-prefix-mass``: class token and registers) and on the
  high-norm patches of block ``l``'s *input* (``sink-high-norm-mass``; the input of block 1 is the
  patch embedding), which are the keys that attention reads.

All rows are ``head = -1``; every quantity is a sum over images divided by the count, so the result
does not depend on the batch size and two accumulators over disjoint images merge exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .uncertainty import Moments

__all__ = ["LOG_BINS", "LOG_RANGE", "high_norm_mask", "NormHistogram", "HighNormAccumulator"]

LOG_RANGE = (-4.0, 6.0)  # log10 of the norms the histogram covers (others land in the end bins)
LOG_BINS = 1000  # bins of 0.01 in log10(norm)


def high_norm_mask(tokens: Tensor, mads: float) -> Tensor:
    """``(B, N)`` True where a token's L2 norm exceeds the median + ``mads`` x MAD of the norms of its
    image's tokens ``(B, N, C)``."""
    return _outliers(tokens.float().norm(dim=-1), mads)


def _outliers(norms: Tensor, mads: float) -> Tensor:
    med = norms.median(dim=-1, keepdim=True).values
    mad = (norms - med).abs().median(dim=-1, keepdim=True).values
    return norms > med + mads * mad


class NormHistogram:
    """Exact counts of ``log10(norm)`` in :data:`LOG_BINS` bins over :data:`LOG_RANGE`; quantiles to the
    bin width."""

    def __init__(self) -> None:
        self.counts = np.zeros(LOG_BINS, dtype=np.int64)
        self.max = 0.0

    def update(self, norms: Tensor) -> None:
        lo, hi = LOG_RANGE
        x = norms.detach().float().clamp_min(1e-30).log10().clamp(lo, hi - 1e-9).cpu()
        idx = ((x - lo) / (hi - lo) * LOG_BINS).long().clamp(0, LOG_BINS - 1)
        self.counts += np.bincount(idx.numpy().ravel(), minlength=LOG_BINS)
        self.max = max(self.max, float(norms.max()))

    def merge(self, other: NormHistogram) -> None:
        self.counts += other.counts
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """The centre of the bin holding the ``q`` quantile (norm units)."""
        cum = np.cumsum(self.counts)
        k = int(np.searchsorted(cum, q * cum[-1], side="left"))
        lo, hi = LOG_RANGE
        return float(10 ** (lo + (min(k, LOG_BINS - 1) + 0.5) * (hi - lo) / LOG_BINS))


class HighNormAccumulator:
    """``high-norm-tokens`` (ViT): norms, high-norm fraction and attention-sink rows per block (see the
    module docstring); arrays ``norm_histogram`` ``(L, LOG_BINS)`` and ``norm_log_edges``."""

    def __init__(self, context) -> None:
        mads = context.options.norm_outlier_mads
        if isinstance(mads, bool) or not isinstance(mads, (int, float)) or not mads > 0:
            raise ValueError(f"option norm_outlier_mads must be a positive number, got {mads!r}")
        self.context, self.mads = context, float(mads)
        layers = list(context.layers)
        self.hist = {l: NormHistogram() for l in layers}
        # per layer: moments over images of [high-norm fraction, prefix mass, high-norm mass]
        self.per_image = {l: Moments() for l in layers}

    def update(self, batch) -> None:
        g, out = self.context.geometry, batch.captured
        p = g.num_prefix_tokens
        keys = high_norm_mask(out.embedding[:, p:], self.mads).float()  # (B, K): block 1's high-norm input patches
        for l in self.hist:
            norms = out.block_output[l][:, p:].float().norm(dim=-1)  # (B, K), once per layer
            self.hist[l].update(norms)
            high = _outliers(norms, self.mads).float()
            attn = out.attention[l].float()[:, :, p:, :]  # (B, heads, Q, N): patch queries
            prefix = attn[..., :p].sum(-1).mean((1, 2)) if p else torch.zeros(len(high))
            sink = (attn[..., p:] * keys[:, None, None, :]).sum(-1).mean((1, 2))
            self.per_image[l].add(torch.stack([high.mean(-1), prefix, sink], 1))
            keys = high  # block l's output is block l + 1's input

    def merge(self, other: HighNormAccumulator) -> None:
        for l in self.hist:
            self.hist[l].merge(other.hist[l])
            self.per_image[l].merge(other.per_image[l])

    def finish(self):
        from .results import Record

        name, records = self.context.model_name, []
        for l, h in self.hist.items():
            moments = self.per_image[l]
            n, means, (low, high) = moments.images, moments.mean, moments.interval()
            records += [Record(name, l, -1, metric, value, n) for metric, value in (
                ("norm-q05", h.quantile(0.05)), ("norm-q50", h.quantile(0.5)), ("norm-q95", h.quantile(0.95)),
                ("norm-max", h.max))]  # token-level quantiles of all images: no interval over images
            records += [Record(name, l, -1, metric, float(means[i]), n, float(low[i]), float(high[i]))
                        for i, metric in enumerate(("high-norm-fraction", "sink-prefix-mass", "sink-high-norm-mass"))]
        lo, hi = LOG_RANGE
        return records, {"norm_histogram": np.stack([h.counts for h in self.hist.values()]),
                         "norm_log_edges": np.linspace(lo, hi, LOG_BINS + 1)}
