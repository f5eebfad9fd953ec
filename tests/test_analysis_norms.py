"""High-norm tokens and attention sinks: planted outliers, planted attention mass, quantiles."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.capture import Captured
from analysis.norms import LOG_BINS, LOG_RANGE, HighNormAccumulator, NormHistogram, high_norm_mask
from analysis.registry import Batch
from analysis.results import records_to_frame
from analysis.runner import RunOptions


def test_planted_outliers_are_found_and_gaussian_tokens_give_none():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(50, 64, 32, generator=g)
    assert not high_norm_mask(tokens, 10.0).any()  # 3,200 Gaussian tokens: no outlier
    planted = tokens.clone()
    planted[[0, 0, 7, 31], [3, 40, 12, 63]] *= 10.0  # ten times the typical norm, as in Darcet et al.
    mask = high_norm_mask(planted, 10.0)
    assert sorted(map(tuple, mask.nonzero().tolist())) == [(0, 3), (0, 40), (7, 12), (31, 63)]


def test_attention_sink_shares_equal_the_planted_mass():
    b, k, c = 3, 16, 8
    g = torch.Generator().manual_seed(1)
    embedding = torch.randn(b, 1 + k, c, generator=g)
    high = [2, 9]  # high-norm input patches of every image
    embedding[:, [1 + i for i in high]] *= 12.0
    # every patch query: 0.3 on the class token, 0.5 split over the high-norm patches, 0.2 over the rest
    attn = torch.zeros(b, 2, 1 + k, 1 + k)
    attn[:, :, :, 0] = 0.3
    others = [i for i in range(k) if i not in high]
    attn[:, :, :, [1 + i for i in high]] = 0.5 / len(high)
    attn[:, :, :, [1 + i for i in others]] = 0.2 / len(others)
    out = torch.randn(b, 1 + k, c, generator=g)
    out[0, 1 + 5] *= 15.0  # one high-norm output patch in image 0: fraction 1/16 there, 0 elsewhere
    captured = Captured(embedding=embedding, attention={1: attn}, block_output={1: out})
    geometry = SimpleNamespace(num_prefix_tokens=1, depth=1)
    context = SimpleNamespace(model_name="m", layers=range(1, 2), geometry=geometry,
                              options=RunOptions.from_kwargs({}))
    acc = HighNormAccumulator(context)
    acc.update(Batch(torch.zeros(b, 3, 4, 4), None, torch.arange(b), captured, geometry))
    table = records_to_frame(acc.finish()[0]).set_index("metric")["value"]
    assert table["sink-prefix-mass"] == pytest.approx(0.3, abs=1e-6)
    assert table["sink-high-norm-mass"] == pytest.approx(0.5, abs=1e-6)
    assert table["high-norm-fraction"] == pytest.approx(1 / 16 / 3, abs=1e-9)


def test_norm_quantiles_are_exact_to_the_bin_width_and_merge():
    rng = np.random.default_rng(2)
    norms = torch.from_numpy(rng.lognormal(1.0, 0.8, size=20000))
    whole, first, second = NormHistogram(), NormHistogram(), NormHistogram()
    whole.update(norms)
    first.update(norms[:7000])
    second.update(norms[7000:])
    first.merge(second)
    np.testing.assert_array_equal(first.counts, whole.counts)
    width = (LOG_RANGE[1] - LOG_RANGE[0]) / LOG_BINS  # in log10
    for q in (0.05, 0.5, 0.95):
        got, want = np.log10(whole.quantile(q)), np.log10(np.quantile(norms.numpy(), q))
        assert abs(got - want) <= width, q
    assert whole.max == pytest.approx(float(norms.max()))
