"""Fourier delta-log-amplitude against the cl-vs-mim notebook definition (numpy, float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.fourier import (
    FourierAccumulator,
    delta_log_amplitude,
    diagonal_log_amplitude,
    fourier_frequencies,
    log_amplitude,
)


def ref_fourier(tokens: np.ndarray, prefix: int) -> np.ndarray:
    """The notebook: drop prefix, b c h w, log(|fft2| + 1e-6), roll by h/2, mean(b, c), diag[h/2:], minus first."""
    lat = np.asarray(tokens, dtype=np.float64)[:, prefix:]
    b, n, c = lat.shape
    h = int(math.sqrt(n))
    lat = lat.reshape(b, h, h, c).transpose(0, 3, 1, 2)
    f = np.log(np.abs(np.fft.fft2(lat)) + 1e-6)
    f = np.roll(f, shift=(int(h / 2), int(h / 2)), axis=(2, 3)).mean(axis=(0, 1))
    d = np.diag(f)[int(h / 2):]
    return d - d[0]


@pytest.mark.parametrize("side,prefix", [(8, 1), (12, 5), (14, 1), (7, 0)])
def test_parity_and_length(side, prefix):
    g = torch.Generator().manual_seed(side)
    tokens = torch.randn(3, prefix + side * side, 16, generator=g) + 2.0
    got = delta_log_amplitude(tokens, side, prefix)
    assert got.shape == (side - side // 2,) and got.dtype == torch.float64
    assert got[0] == 0
    np.testing.assert_allclose(got.numpy(), ref_fourier(tokens.numpy(), prefix), atol=1e-4)
    freqs = fourier_frequencies(side)
    assert freqs[0] == 0 and len(freqs) == len(got)
    assert freqs[-1].item() == pytest.approx(2 * (side - side // 2 - 1) / side)


def test_12x12_frequencies_are_0_to_5_sixths_pi():
    np.testing.assert_allclose(fourier_frequencies(12).numpy(), np.arange(6) / 6)


def test_constant_token_map_analytic():
    # constant over positions: all energy at frequency 0, |F(0)| = h*h*|c|, elsewhere exactly 0
    c = torch.tensor([0.5, -2.0, 3.0])
    tokens = torch.cat([torch.zeros(2, 1, 3), c.expand(2, 64, 3)], dim=1)
    got = delta_log_amplitude(tokens, 8, 1)
    expected = math.log(1e-6) - torch.log(64 * c.abs() + 1e-6).mean().item()
    np.testing.assert_allclose(got[1:].numpy(), np.full(3, expected), rtol=1e-5)


def test_bf16_tokens():
    tokens = torch.randn(2, 1 + 64, 8)
    got = delta_log_amplitude(tokens.bfloat16(), 8)
    np.testing.assert_allclose(got.numpy(), ref_fourier(tokens.bfloat16().float().numpy(), 1), atol=1e-4)


def test_streaming_equals_concatenated_over_layers():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(5, 1 + 36, 8, generator=g) * (i + 1) for i in range(3)]
    one, two = FourierAccumulator(6, 1), FourierAccumulator(6, 1, num_layers=3)
    one.update(layers)
    two.update([t[:1] for t in layers])
    two.update([t[1:] for t in layers])
    assert one.images == two.images == 5
    torch.testing.assert_close(one.compute(), two.compute(), rtol=0, atol=1e-9)
    assert one.compute().shape == (3, 3)
    for i, t in enumerate(layers):
        np.testing.assert_allclose(one.compute()[i].numpy(), ref_fourier(t.numpy(), 1), atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="square token grid, got 4x6"):
        delta_log_amplitude(torch.randn(1, 25, 4), (4, 6))
    with pytest.raises(ValueError, match="square token grid, got 4x6"):
        FourierAccumulator((4, 6))
    with pytest.raises(ValueError, match=r"tokens have 26 entries but grid 5x5 \+ 0 prefix tokens = 25"):
        delta_log_amplitude(torch.randn(1, 26, 4), 5, 0)
    with pytest.raises(ValueError, match=r"must be \(B, N, C\)"):
        delta_log_amplitude(torch.randn(26, 4), 5)
    acc = FourierAccumulator(5, 0, num_layers=2)
    with pytest.raises(ValueError, match="expected tokens for 2 layers, got 1"):
        acc.update([torch.randn(1, 25, 4)])
    with pytest.raises(ValueError, match="no images"):
        acc.compute()


@pytest.mark.parametrize("side", [6, 7])
def test_diagonal_projection_equals_fft_diagonal(side):
    tokens = torch.randn(2, 1 + side * side, 5)
    full = log_amplitude(tokens, side)  # (B, h, h) from torch.fft.fft2, unshifted
    k = torch.arange(side - side // 2)
    torch.testing.assert_close(diagonal_log_amplitude(tokens, side).float(), full[:, k, k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side,prefix", [(5, 0), (12, 1), (7, 5)])
def test_anti_diagonal_sums_against_loops(side, prefix):
    from analysis.fourier import _anti_diagonal_sums

    g = torch.Generator().manual_seed(side + prefix)
    tokens = torch.randn(2, prefix + side * side, 3, generator=g)
    t = tokens.double().numpy()[:, prefix:].reshape(2, side, side, 3)
    ref = np.zeros((2, side, 3))
    for y in range(side):
        for x in range(side):
            ref[:, (y + x) % side] += t[:, y, x]
    got = _anti_diagonal_sums(tokens, side, prefix)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_non_contiguous_tokens():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 1 + 64, 8, generator=g) + 1.0
    strided = tokens.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channels-first storage
    assert not strided.is_contiguous()
    torch.testing.assert_close(delta_log_amplitude(strided, 8), delta_log_amplitude(tokens, 8), rtol=0, atol=1e-12)
    np.testing.assert_allclose(delta_log_amplitude(strided, 8).numpy(), ref_fourier(tokens.numpy(), 1), atol=1e-4)
