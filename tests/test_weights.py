"""KAMIM patch densities and weights against an independent reference."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from kamim.keypoints import KeypointMapper, keypoint_map
from kamim.weights import patch_density, patch_weights, weights_from_density


def reference_weights(maps: np.ndarray, ps: int, temperature: float) -> np.ndarray:
    """Loops over images and patches, float64: w = exp(clip(d / T, -20, 20)) / min."""
    b, h, w = maps.shape
    out = np.zeros((b, h // ps, w // ps))
    for n in range(b):
        for i in range(h // ps):
            for j in range(w // ps):
                d = maps[n, i * ps : (i + 1) * ps, j * ps : (j + 1) * ps].astype(np.float64).mean()
                out[n, i, j] = math.exp(min(max(d / temperature, -20.0), 20.0))
        out[n] /= out[n].min()
    return out


def photo_maps(photos: dict[str, np.ndarray], size: int = 64) -> np.ndarray:
    imgs = [cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in photos.values()]
    return np.stack([keypoint_map(img, "fast") for img in imgs])


@pytest.mark.parametrize("ps", [4, 8, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.25, 1.0, 2.5])
def test_patch_weights_match_reference_random(ps, temperature):
    maps = np.random.default_rng(ps).random((3, 32, 48)) < 0.3
    got = patch_weights(torch.from_numpy(maps), ps, temperature)
    assert got.shape == (3, 32 // ps, 48 // ps) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_weights(maps, ps, temperature), rtol=2e-6)


def test_patch_weights_match_reference_photographs(photos):
    maps = photo_maps(photos)
    assert 0.05 < maps.mean() < 0.95  # real, non-trivial keypoint maps
    for ps, t in [(8, 0.25), (16, 0.1), (32, 0.5)]:
        np.testing.assert_allclose(patch_weights(maps, ps, t).numpy(), reference_weights(maps, ps, t), rtol=2e-6)


def test_patch_density_layouts_and_dtypes():
    maps = np.random.default_rng(0).random((2, 16, 24)) < 0.5
    want = maps.reshape(2, 2, 8, 3, 8).mean(axis=(2, 4))
    for x in [maps, maps.astype(np.uint8), torch.from_numpy(maps)[:, None], torch.from_numpy(maps).double()]:
        d = patch_density(x, 8)
        assert d.shape == (2, 2, 3)
        np.testing.assert_allclose(d.numpy(), want, rtol=0, atol=1e-7)


def test_mapper_density_equals_patch_density(photos):
    img = cv2.resize(photos["coffee"], (96, 64))
    mapper = KeypointMapper("fast")
    for ps in (8, 16, 32):
        np.testing.assert_allclose(
            mapper.density(img, ps), patch_density(mapper(img)[None], ps)[0].numpy(), rtol=0, atol=1e-7
        )


def test_min_weight_is_exactly_one_and_monotone():
    d = torch.rand(4, 6, 6)
    w = weights_from_density(d, 0.25)
    assert torch.equal(w.amin(dim=(1, 2)), torch.ones(4))
    # same order as the densities, strictly increasing for distinct densities below the clamp
    flat_d, flat_w = d[0].flatten(), w[0].flatten()
    order = torch.argsort(flat_d)
    assert torch.all(torch.diff(flat_w[order]) > 0)
    # a patch without keypoints weighs 1, a full patch exp(1 / T)
    w2 = weights_from_density(torch.tensor([[[0.0, 1.0], [0.5, 0.25]]]), 0.5)
    np.testing.assert_allclose(w2.numpy(), [[[1.0, math.e**2], [math.e, math.e**0.5]]], rtol=1e-6)


def test_clamp_and_float16_density():
    d = torch.tensor([[[0.0, 1.0]]], dtype=torch.float16)
    w = weights_from_density(d, 0.01)  # 1 / 0.01 = 100 -> clamped to 20
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    np.testing.assert_allclose(w.numpy(), [[[1.0, math.exp(20.0)]]], rtol=1e-6)


def test_large_temperature_gives_ones(photos):
    maps = photo_maps(photos)
    w = patch_weights(maps, 8, 1e12)
    assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("t", [0, -0.5, float("nan"), float("inf"), "hot", None])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature must be a positive"):
        weights_from_density(torch.rand(1, 2, 2), t)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        patch_weights(torch.rand(1, 8, 8), 4, t)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"patch_size 5 must divide the image size \(H, W\) = \(16, 16\)"):
        patch_density(torch.zeros(2, 16, 16), 5)
    with pytest.raises(ValueError, match="patch_size 8 must divide .* = \\(16, 12\\)"):
        patch_weights(torch.zeros(2, 16, 12), 8, 0.25)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        patch_density(torch.zeros(2, 16, 16), 0)
    with pytest.raises(ValueError, match=r"keypoint_maps must have shape .* got \(16, 16\)"):
        patch_density(torch.zeros(16, 16), 4)
    with pytest.raises(ValueError, match=r"keypoint_maps must have shape .* got \(2, 3, 16, 16\)"):
        patch_density(torch.zeros(2, 3, 16, 16), 4)
    with pytest.raises(ValueError, match=r"density must have shape \(B, h, w\)"):
        weights_from_density(torch.zeros(4, 4), 0.25)
    with pytest.raises(ValueError, match="must be a torch.Tensor or numpy array"):
        patch_density([[0, 1]], 1)
