"""Reconstruction metrics: parity with scikit-image on the same arrays, masking semantics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kamim.eval.reconstruct import (
    mask_to_pixels, paste_reconstruction, psnr, reconstruction_metrics, ssim, unnormalize,
)


def _to_torch(*arrays):
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])


@pytest.fixture(scope="module")
def pairs(photos):
    """Real photo crops in [0, 1] and degraded versions (noise, blur-like shift, JPEG-ish quantisation)."""
    rng = np.random.default_rng(0)
    clean = [photos[n][64:128, 96:176].astype(np.float64) / 255 for n in ("astronaut", "coffee", "chelsea")]
    noisy = [np.clip(clean[0] + rng.normal(0, 0.08, clean[0].shape), 0, 1),
             np.roll(clean[1], 2, axis=1),
             np.round(clean[2] * 8) / 8]
    return clean, noisy


def test_psnr_and_ssim_match_scikit_image(pairs):
    clean, noisy = pairs
    ours_p = psnr(_to_torch(*noisy), _to_torch(*clean))
    ours_s = ssim(_to_torch(*noisy), _to_torch(*clean))
    ours_g = ssim(_to_torch(*noisy), _to_torch(*clean), gaussian_weights=True, use_sample_covariance=False)
    for i, (c, n) in enumerate(zip(clean, noisy)):
        assert ours_p[i].item() == pytest.approx(peak_signal_noise_ratio(c, n, data_range=1.0), abs=1e-9)
        assert ours_s[i].item() == pytest.approx(structural_similarity(c, n, channel_axis=-1, data_range=1.0), abs=1e-9)
        ref_g = structural_similarity(c, n, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        assert ours_g[i].item() == pytest.approx(ref_g, abs=1e-9)


def test_float32_inputs_agree_with_scikit_image(pairs):
    clean, noisy = pairs
    c, n = clean[0].astype(np.float32), noisy[0].astype(np.float32)
    assert ssim(_to_torch(n), _to_torch(c)).item() == pytest.approx(
        structural_similarity(c, n, channel_axis=-1, data_range=1.0), abs=1e-5)


def test_masked_metrics_semantics(pairs):
    clean, noisy = pairs
    orig, recon = _to_torch(*clean), _to_torch(*noisy)
    token_mask = torch.zeros(3, 4, 5)
    token_mask[:, :2] = 1  # top half of the 64x80 image masked (16 px patches)
    pm = mask_to_pixels(token_mask, (64, 80))
    assert pm.shape == (3, 1, 64, 80) and pm[:, :, :32].eq(1).all() and pm[:, :, 32:].eq(0).all()
    comp = paste_reconstruction(orig, recon, pm)
    torch.testing.assert_close(comp[..., 32:, :], orig[..., 32:, :])
    torch.testing.assert_close(comp[..., :32, :], recon[..., :32, :])
    m = reconstruction_metrics(orig, recon, pm)
    for i in range(3):
        c, r, cp = clean[i], noisy[i], comp[i].permute(1, 2, 0).numpy()
        masked_psnr = peak_signal_noise_ratio(c[:32], r[:32], data_range=1.0)  # masked pixels = top half
        assert m["psnr_masked"][i].item() == pytest.approx(masked_psnr, abs=1e-9)
        assert m["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(c, cp, data_range=1.0), abs=1e-9)
        ref_ssim = structural_similarity(c, cp, channel_axis=-1, data_range=1.0)
        assert m["ssim"][i].item() == pytest.approx(ref_ssim, abs=1e-9)
    # composite differs from the original only in half the pixels: full-image PSNR is 10*log10(2) dB higher
    torch.testing.assert_close(m["psnr"] - m["psnr_masked"], torch.full((3,), 10 * np.log10(2), dtype=torch.float64))


def test_unnormalize_and_errors():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.rand(2, 3, 8, 8)
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(unnormalize(normed), x)
    assert unnormalize(torch.full((1, 3, 2, 2), 10.0)).max() == 1.0
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(torch.rand(1, 3, 5, 5), torch.rand(1, 3, 5, 5))
    with pytest.raises(ValueError, match="does not tile"):
        mask_to_pixels(torch.ones(1, 3, 3), (32, 32))
    with pytest.raises(ValueError, match="at least one masked pixel"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), mask=torch.zeros(1, 1, 8, 8))
