"""Cross-model analyses from saved features: mutual k-NN, CKNNA (Huh et al. 2024) and layer x layer CKA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.crossmodel import FEATURES, FILES, check_same_images, cknna, compare_models, cross_cka, mutual_knn
from analysis.results import AnalysisResult, records_to_frame
from analysis.similarity import CKAAccumulator


# ---- a direct restatement of the published definitions (platonic-rep, metrics.py) ------------------
def ref_knn(feats: torch.Tensor, topk: int) -> torch.Tensor:
    return (feats @ feats.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :topk]


def ref_mutual_knn(a: torch.Tensor, b: torch.Tensor, topk: int) -> float:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)  # their prepare_features
    knn_a, knn_b = ref_knn(a, topk), ref_knn(b, topk)
    n = knn_a.shape[0]
    rows = torch.arange(n).unsqueeze(1)
    mask_a, mask_b = torch.zeros(n, n), torch.zeros(n, n)
    mask_a[rows, knn_a] = 1.0
    mask_b[rows, knn_b] = 1.0
    return ((mask_a * mask_b).sum(dim=1) / topk).mean().item()


def ref_hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    value = (torch.sum(kt * lt.T) + torch.sum(kt) * torch.sum(lt) / ((m - 1) * (m - 2))
             - 2 * torch.sum(torch.mm(kt, lt)) / (m - 2))
    return value / (m * (m - 3))


def ref_cknna(a: torch.Tensor, b: torch.Tensor, topk: int) -> float:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = a.shape[0]
    k_mat, l_mat = a @ a.T, b @ b.T

    def similarity(k, l):
        k_hat, l_hat = k.clone().fill_diagonal_(float("-inf")), l.clone().fill_diagonal_(float("-inf"))
        mask_k = torch.zeros(n, n, dtype=k.dtype).scatter_(1, torch.topk(k_hat, topk, dim=1).indices, 1)
        mask_l = torch.zeros(n, n, dtype=k.dtype).scatter_(1, torch.topk(l_hat, topk, dim=1).indices, 1)
        mask = mask_k * mask_l
        return ref_hsic_unbiased(mask * k, mask * l)

    # their ratio adds 1e-6 to the denominator only to guard a zero; left out here
    return (similarity(k_mat, l_mat) / torch.sqrt(similarity(k_mat, k_mat) * similarity(l_mat, l_mat))).item()


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(80, 16, generator=g, dtype=torch.float64)
    b = a @ torch.randn(16, 24, generator=g, dtype=torch.float64) + 0.8 * torch.randn(80, 24, generator=g,
                                                                                      dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("k", [2, 5, 10])
def test_mutual_knn_and_cknna_equal_the_published_definitions(feats, k):
    a, b = feats
    assert mutual_knn(a, b, k) == pytest.approx(ref_mutual_knn(a, b, k), abs=1e-7)  # theirs: float32 masks
    assert cknna(a, b, k) == pytest.approx(ref_cknna(a, b, k), rel=1e-9)
    assert 0.05 < mutual_knn(a, b, k) < 0.95  # a case where the measure is informative, not saturated


def test_alignment_with_itself_and_a_rotation_is_one_and_noise_is_near_k_over_n(feats):
    a, _ = feats
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for other in (a, a @ q, 3.0 * a @ q):
        assert mutual_knn(a, other, 10) == pytest.approx(1.0)
        assert cknna(a, other, 10) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(600, 32, generator=g), torch.randn(600, 32, generator=g)  # independent
    assert mutual_knn(x, y, 10) == pytest.approx(10 / 599, abs=0.008)
    assert abs(cknna(x, y, 10)) < 0.05


def test_bad_inputs_are_one_line_errors(feats):
    a, b = feats
    with pytest.raises(ValueError, match="same images"):
        mutual_knn(a, b[:50], 5)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 79\]"):
        mutual_knn(a, b, 80)
    with pytest.raises(ValueError, match="CKNNA needs k >= 2"):
        cknna(a, b, 1)
    with pytest.raises(ValueError, match="cross-model CKA estimator 'plain'"):
        cross_cka([a], [b], "plain")
    with pytest.raises(ValueError, match="need the same images: A saved features of 2 images"):
        check_same_images("A", ["x.png", "y.png"], "B", ["y.png", "x.png"])


def _result(name: str, layers: list[torch.Tensor], files: list[str]) -> AnalysisResult:
    return AnalysisResult(model_name=name, table=records_to_frame([]), geometry=None, images=len(files),
                          arrays={FEATURES: {str(i + 1): f.float().numpy() for i, f in enumerate(layers)},
                                  FILES: np.array(files)})


def test_compare_models_matrices_best_layer_and_cka_estimators(feats):
    a, b = feats
    layers_a = [a, torch.tanh(a), a ** 2]
    layers_b = [b, torch.relu(b)]
    files = [f"img{i:03d}.png" for i in range(80)]
    res = compare_models("A", _result("A", layers_a, files), "B", _result("B", layers_b, files), k=10)
    assert res.arrays["cka"].shape == res.arrays["mutual_knn"].shape == res.arrays["cknna"].shape == (3, 2)
    fa = [f.float().double() for f in layers_a]
    fb = [f.float().double() for f in layers_b]
    assert res.arrays["mutual_knn"][1, 0] == pytest.approx(mutual_knn(fa[1], fb[0], 10))
    assert res.arrays["cknna"][2, 1] == pytest.approx(cknna(fa[2], fb[1], 10), rel=1e-6)
    # debiased = Song et al.'s unbiased HSIC over all images; biased = Kornblith's plug-in
    from analysis.similarity import linear_cka

    assert res.arrays["cka"][0, 1] == pytest.approx(linear_cka(fa[0], fb[1], unbiased=True), rel=1e-6)
    biased = cross_cka([f.float().numpy() for f in layers_a], [f.float().numpy() for f in layers_b], "biased")
    assert biased[2, 0] == pytest.approx(linear_cka(fa[2], fb[0]), rel=1e-6)
    best = res.table[res.table["metric"] == "mutual-knn-best-layer"]["value"].to_numpy()
    np.testing.assert_array_equal(best, res.arrays["mutual_knn"].argmax(1) + 1)
    # a model with itself: 1 on the diagonal, its best-aligned layer is the same layer, and the CKA
    # is the within-model CKA (the cka analysis' accumulator) of the same features
    same = compare_models("A", _result("A", layers_a, files), "A2", _result("A2", layers_a, files), k=10)
    np.testing.assert_allclose(np.diag(same.arrays["cka"]), 1.0, rtol=1e-9)
    np.testing.assert_allclose(np.diag(same.arrays["mutual_knn"]), 1.0)
    np.testing.assert_allclose(np.diag(same.arrays["cknna"]), 1.0, rtol=1e-9)
    np.testing.assert_array_equal(same.arrays["best_layer"], [1, 2, 3])
    within = CKAAccumulator(estimator="minibatch", chunk_size=256)
    within.update([torch.as_tensor(f.float().numpy()) for f in layers_a])
    np.testing.assert_allclose(same.arrays["cka"], within.compute().numpy(), rtol=1e-9)
    with pytest.raises(ValueError, match="need the same images"):
        compare_models("A", _result("A", layers_a, files), "B", _result("B", layers_b, files[::-1]))
