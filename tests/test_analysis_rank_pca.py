"""Representation rank (RankMe, eigenspectrum decay) and patch-feature PCA images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import analysis_models
from analysis.pca_images import oriented_components, pca_rgb
from analysis.rank import RANKME_EPS, SecondMoments, rankme, spectrum_alpha
from analysis.runner import run_analyses


def _features_with_spectrum(sigma: np.ndarray, n: int = 40, d: int = 12, seed: int = 0) -> np.ndarray:
    """``(n, d)`` features whose singular values are exactly ``sigma``."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(n, len(sigma))))[0]
    v = np.linalg.qr(rng.normal(size=(d, len(sigma))))[0]
    return (u * sigma) @ v.T


def test_rankme_of_a_known_spectrum_equals_the_formula_and_merges_exactly():
    sigma = np.array([9.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    x = torch.from_numpy(_features_with_spectrum(sigma))
    full = np.concatenate([sigma, np.zeros(12 - len(sigma))])  # min(n, D) = 12 singular values
    p = full / full.sum() + RANKME_EPS
    want = np.exp(-(p * np.log(p)).sum())
    one = SecondMoments()
    one.update(x)
    got = one.singular_values()[: len(sigma)]
    np.testing.assert_allclose(got, sigma, rtol=1e-9)
    assert rankme(one.singular_values()) == pytest.approx(want, rel=1e-7)
    assert rankme(np.ones(7)) == pytest.approx(7.0, rel=1e-5) and rankme(np.array([3.0, 0, 0])) == pytest.approx(1.0, rel=1e-5)
    batches = SecondMoments()
    a, b = SecondMoments(), SecondMoments()
    a.update(x[:17])
    b.update(x[17:])
    a.merge(b)
    for i in range(0, 40, 3):
        batches.update(x[i:i + 3])
    for other in (a, batches):
        np.testing.assert_allclose(other.xtx.numpy(), one.xtx.numpy(), rtol=1e-12, atol=1e-12)
        assert other.n == 40 and rankme(other.singular_values()) == pytest.approx(rankme(one.singular_values()), rel=1e-6)


def test_spectrum_alpha_recovers_a_power_law():
    lam = np.arange(1, 65, dtype=float) ** -1.5
    assert spectrum_alpha(lam, 32) == pytest.approx(1.5, rel=1e-9)
    assert np.isnan(spectrum_alpha(np.array([1.0, 0.0]), 2))


@pytest.fixture(scope="module")
def photos():
    from analysis_models import photo_tensor, resize
    from skimage import data

    shots = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.stack([resize(photo_tensor(shots[i % 4])[:, 8 * i:, 8 * i:], 32)[:, :32, :32] for i in range(8)])
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def test_rank_rows_are_batch_size_invariant_and_match_the_pooled_features(photos):
    from analysis.capture import capture
    from kamim.backbone import pool_tokens

    model = analysis_models.tiny_vit(seed=0, depth=2).eval()
    one = run_analyses(model, [photos], ["representation-rank"], model_name="m", progress=False)
    split = run_analyses(model, [photos[:3], photos[3:]], ["representation-rank"], model_name="m", progress=False,
                         batch_size=2)
    np.testing.assert_allclose(split.table["value"], one.table["value"], rtol=1e-9)
    feats = pool_tokens(capture(model, photos, block_output=[2]).block_output[2], 1, "avg").double().numpy()
    sigma = np.linalg.svd(feats, compute_uv=False)
    rows = one.table[(one.table["layer"] == 2)].set_index("metric")["value"]
    assert rows["rankme"] == pytest.approx(rankme(sigma), rel=1e-6)
    lam = np.linalg.eigvalsh(np.cov(feats, rowvar=False))
    assert rows["spectrum-alpha"] == pytest.approx(spectrum_alpha(lam, 3), rel=1e-6)  # 8 images: top 7 // 2


def test_pca_components_follow_the_sign_convention_and_find_a_planted_foreground():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    proj, comps, _ = oriented_components(x)
    assert all(c[np.abs(c).argmax()] > 0 for c in comps)
    proj_neg, comps_neg, _ = oriented_components(-x)  # the same axes whatever the data's sign
    np.testing.assert_allclose(comps_neg, comps, atol=1e-12)
    np.testing.assert_allclose(proj_neg, -proj, atol=1e-9)
    # 2 images on a 4x4 grid; the first 5 patches of each are "objects" far from the background
    tokens = rng.normal(size=(2, 16, 8))
    tokens[:, :5] += 20.0
    out = pca_rgb(tokens, (4, 4), foreground=True)
    want = np.zeros((2, 16), bool)
    want[:, :5] = True
    np.testing.assert_array_equal(out["mask"].reshape(2, 16), want)
    assert (out["rgb"][~out["mask"]] == 0).all() and out["rgb"].min() >= 0 and out["rgb"].max() <= 1
    plain = pca_rgb(tokens, (4, 4))
    assert plain["mask"].all() and plain["rgb"].shape == (2, 4, 4, 3)


def test_pca_images_figure_is_deterministic(photos, tmp_path):
    from analysis.plots import plot_pca_images

    model = analysis_models.tiny_vit(seed=0, depth=2).eval()
    files = []
    for run in ("a", "b"):
        res = run_analyses(model, [photos], ["pca-images"], model_name="m", progress=False, pca_images=3)
        assert res.arrays["pca_rgb"].shape == (3, 4, 4, 3)
        plot_pca_images({"m": res}, out=tmp_path / run)
        files.append((tmp_path / f"{run}.png").read_bytes())
    assert files[0] == files[1]
