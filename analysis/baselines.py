"""Analytic baselines of the attention metrics, and when a model cannot be told apart from them.

Uniform attention (every patch attends to every patch equally) has, on a model's own geometry, a
mean attention distance equal to the mean of the patch-distance matrix (99.75 px on 12×12 patches of
16 px), an entropy of ``log(h w)`` nats and an NMI of 0 (:mod:`analysis.attention`). The figures
draw these values; this module decides when a model's curve says nothing more than they do.

**The rule:** a model's attention is *indistinguishable from uniform* for a metric when, **at every
layer**, the 95% interval over images of its head-mean value (:mod:`analysis.uncertainty`) reaches
into the tolerance band around the uniform value: relative 1% for attention distance and entropy,
absolute 0.01 for NMI (:data:`UNIFORM_BASELINES`). In words: the images do not rule out that the
layer is within the tolerance of uniform. A layer without an interval (one image, or a table saved
before intervals existed) falls back to its value lying in the band. The figures then
say so in the model's legend entry and the report in one sentence per model, so that a difference
between two such models is not read as an effect. (A small tiny demo model, or the paper's own
KAMIM ViT-B at 99.75 px, can sit exactly there.)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .attention import uniform_attention_distance, uniform_attention_entropy, uniform_nmi
from .uncertainty import level_text

__all__ = ["UniformBaseline", "UNIFORM_BASELINES", "near_uniform", "uniform_metrics", "uniform_sentences"]


@dataclass(frozen=True)
class UniformBaseline:
    """The uniform-attention value of one metric on a geometry, and the tolerance of the rule."""

    value: Callable[[Any], float]  # geometry -> value of uniform attention
    tolerance: float
    relative: bool  # tolerance relative to the uniform value (else absolute)
    label: str  # the metric in words

    def describe(self) -> str:
        """The tolerance in words, e.g. ``attention distance within 1%``."""
        return f"{self.label} within {self.tolerance:.0%}" if self.relative else \
            f"{self.label} within {self.tolerance:g}"

    def close(self, values: Any, geometry: Any, low: Any = None, high: Any = None) -> bool:
        """Whether every value's interval ``[low, high]`` reaches into the tolerance band around the
        uniform value on ``geometry`` (a value with no interval: whether it lies in the band)."""
        u = float(self.value(geometry))
        band = self.tolerance * (abs(u) if self.relative else 1.0)
        values = np.asarray(values, dtype=float)
        low = values if low is None else np.where(np.isnan(low), values, np.asarray(low, dtype=float))
        high = values if high is None else np.where(np.isnan(high), values, np.asarray(high, dtype=float))
        return bool(np.all((low <= u + band) & (high >= u - band)))


#: metric -> its uniform-attention value and the tolerance of the rule
UNIFORM_BASELINES: dict[str, UniformBaseline] = {
    "attention-distance": UniformBaseline(uniform_attention_distance, 0.01, True, "attention distance"),
    "attention-entropy": UniformBaseline(uniform_attention_entropy, 0.01, True, "attention entropy"),
    "nmi": UniformBaseline(uniform_nmi, 0.01, False, "NMI"),
}


def near_uniform(result: Any, metric: str) -> Optional[bool]:
    """Whether ``result``'s head-mean ``metric`` is indistinguishable from uniform attention at every
    layer (module docstring); None when the result has no such rows (or the metric has no baseline)."""
    if metric not in UNIFORM_BASELINES:
        return None
    rows = result.table[result.table["metric"] == metric]
    if rows.empty:
        return None
    means = rows[rows["head"] < 0]
    if means.empty:  # no head-mean rows (a plugin's table): the mean over heads, without an interval
        means = rows.groupby("layer", as_index=False)["value"].mean()
    means = means[means["value"].notna()]
    if means.empty:
        return None
    low, high = (means[c] if c in means else None for c in ("ci_low", "ci_high"))
    return UNIFORM_BASELINES[metric].close(means["value"], result.geometry, low, high)


def uniform_metrics(result: Any) -> list[str]:
    """The metrics of ``result`` whose curve is indistinguishable from uniform attention."""
    return [m for m in UNIFORM_BASELINES if near_uniform(result, m)]


def uniform_sentences(results: Mapping[str, Any]) -> list[str]:
    """One sentence per model whose attention is indistinguishable from uniform (empty: none is)."""
    out = []
    for name, result in results.items():
        metrics = uniform_metrics(result)
        if metrics:
            rules = ", ".join(UNIFORM_BASELINES[m].describe() for m in metrics)
            out.append(f"{name}: attention indistinguishable from uniform (the {level_text()} interval over images "
                       f"reaches {rules} of the uniform-attention value at every layer); its differences from "
                       "other such models are not effects.")
    return out
