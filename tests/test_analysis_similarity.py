"""Linear CKA (biased / unbiased, streaming) and self-attention similarity."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import ortho_group

from analysis.similarity import (
    AttentionSimilarity,
    CKAAccumulator,
    HeadSimilarity,
    attention_similarity,
    head_similarity,
    js_divergence,
    linear_cka,
    pool_features,
)



# ---- float64 numpy references ----------------------------------------------------------------------

def ref_cka_biased(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    hsic = lambda a, b: np.trace(a @ b) / (n - 1) ** 2  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_hsic_u_statistic(k, l):
    """Brute-force U-statistic over ordered 4-tuples of distinct indices (Song et al. 2012)."""
    n = len(k)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def ref_hsic_unbiased(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    n = len(x)
    one = np.ones(n)
    return (np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def data(n, d, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + offset


# ---- linear_cka ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_properties(unbiased):
    x = data(40, 12)
    q = torch.from_numpy(ortho_group.rvs(12, random_state=0))
    y = data(40, 7, seed=1) + 0.3 * x[:, :7]
    assert linear_cka(x, x, unbiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q, unbiased) == pytest.approx(1.0, abs=1e-10)  # orthogonal invariance
    base = linear_cka(x, y, unbiased)
    assert linear_cka(3.5 * x, y, unbiased) == pytest.approx(base, rel=1e-10)  # isotropic scaling
    assert linear_cka(x @ q, y, unbiased) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x + 100.0, y - 5.0, unbiased) == pytest.approx(base, rel=1e-8)  # mean shifts
    assert linear_cka(y, x, unbiased) == pytest.approx(base, rel=1e-12)


def test_cka_matches_float64_references():
    x, y = data(30, 9), data(30, 5, seed=3)
    y[:, :3] += x[:, :3]
    assert linear_cka(x.float(), y.float()) == pytest.approx(ref_cka_biased(x, y), rel=1e-6)
    hxy, hxx, hyy = ref_hsic_unbiased(x, y), ref_hsic_unbiased(x, x), ref_hsic_unbiased(y, y)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(hxy / np.sqrt(hxx * hyy), rel=1e-10)


@pytest.mark.parametrize("n", [6, 7])
def test_unbiased_hsic_formula_equals_u_statistic(n):
    x, y = data(n, 3, seed=n).numpy(), data(n, 2, seed=n + 1).numpy()
    k, l = x @ x.T, y @ y.T
    assert ref_hsic_unbiased(x, y) == pytest.approx(ref_hsic_u_statistic(k, l), rel=1e-10)
    shifted = (x + 3.0) @ (x + 3.0).T  # the U-statistic is invariant to shifting the features
    assert ref_hsic_u_statistic(shifted, l) == pytest.approx(ref_hsic_u_statistic(k, l), rel=1e-9, abs=1e-12)
    # and our vectorised estimator gives the same CKA as the brute-force U-statistic
    cka_u = ref_hsic_u_statistic(k, l) / np.sqrt(ref_hsic_u_statistic(k, k) * ref_hsic_u_statistic(l, l))
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y), unbiased=True) == pytest.approx(cka_u, rel=1e-9)


def test_cka_errors():
    with pytest.raises(ValueError, match="at least 4 samples, got 3"):
        linear_cka(data(3, 2), data(3, 2), unbiased=True)
    with pytest.raises(ValueError, match="same number of samples, got 5 and 4"):
        linear_cka(data(5, 2), data(4, 2))
    with pytest.raises(ValueError, match=r"must be \(n, d\)"):
        linear_cka(torch.zeros(5), data(5, 2))


# ---- streaming CKA --------------------------------------------------------------------------------------

def layers(n, seed=0, offset=0.0):
    a = data(n, 6, seed, offset)
    b = 0.5 * a[:, :4] + data(n, 4, seed + 1)
    c = data(n, 5, seed + 2, offset)
    return [a, b, c]


def stream(acc, feats, sizes, feats_b=None):
    start = 0
    for s in sizes:
        acc.update([f[start:start + s] for f in feats], None if feats_b is None else [f[start:start + s] for f in feats_b])
        start += s
    assert start == feats[0].shape[0]
    return acc.compute()


def ref_minibatch_cka(feats, chunks):
    """Size-weighted sum of per-chunk unbiased HSIC, then CKA."""
    m = len(feats)
    hsic = np.zeros((m, m))
    start = 0
    for c in chunks:
        part = [f[start:start + c].numpy() for f in feats]
        for i, j in itertools.product(range(m), range(m)):
            hsic[i, j] += c * ref_hsic_unbiased(part[i], part[j])
        start += c
    return hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic)))


# a chunk is processed once chunk + 4 samples are buffered: the last chunk has 4 .. chunk + 3 samples
@pytest.mark.parametrize("n,chunk,expected_chunks", [(21, 8, [8, 8, 5]), (9, 4, [4, 5]), (10, 4, [4, 6]), (5, 16, [5])])
def test_minibatch_rechunking_is_batch_size_invariant_and_never_nan(n, chunk, expected_chunks):
    feats = layers(n)
    ref = ref_minibatch_cka(feats, expected_chunks)
    for sizes in ([n], [1] * n, [3, n - 3], [n - 1, 1]):
        got = stream(CKAAccumulator(estimator="minibatch", chunk_size=chunk), feats, sizes)
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)


def test_minibatch_compute_does_not_consume_state():
    feats = layers(12)
    acc = CKAAccumulator(chunk_size=4)
    acc.update([f[:6] for f in feats])
    acc.compute()
    acc.update([f[6:] for f in feats])
    np.testing.assert_allclose(acc.compute().numpy(), ref_minibatch_cka(feats, [4, 4, 4]), rtol=1e-9)


def test_too_few_samples_is_an_error_not_nan():
    acc = CKAAccumulator(chunk_size=4)
    acc.update([f[:3] for f in layers(3)])
    with pytest.raises(ValueError, match="at least 4 samples, got 3"):
        acc.compute()
    with pytest.raises(ValueError, match="no samples"):
        CKAAccumulator().compute()
    with pytest.raises(ValueError, match="chunk_size must be an int >= 4"):
        CKAAccumulator(chunk_size=2)


def test_exact_estimator_equals_biased_cka_on_all_data():
    feats = layers(50, offset=1e3)  # large means: the running shift keeps the sums accurate
    ref = np.array([[ref_cka_biased(a, b) for b in feats] for a in feats])
    for sizes in ([50], [7] * 7 + [1], [1, 49]):
        got = stream(CKAAccumulator(estimator="exact"), [f.float() for f in feats], sizes)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["exact", "minibatch"])
def test_cross_model_block_equals_within_model_matrix(estimator):
    fa, fb = layers(24, seed=0), layers(24, seed=5)[:2]
    fb[0] = fb[0] + fa[0][:, :6]
    within = stream(CKAAccumulator(estimator=estimator, chunk_size=8), fa + fb, [10, 14])
    cross = stream(CKAAccumulator(estimator=estimator, chunk_size=8, cross=True), fa, [5, 19], feats_b=fb)
    assert cross.shape == (3, 2)
    np.testing.assert_allclose(cross.numpy(), within[:3, 3:].numpy(), rtol=1e-9)


def test_pool_features():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    torch.testing.assert_close(pool_features(tokens, 3, "avg"), tokens[:, 3:].mean(1))
    torch.testing.assert_close(pool_features(tokens, 3, "cls"), tokens[:, 0])
    assert pool_features(tokens, 3, "tokens").shape == (8, 3)
    with pytest.raises(ValueError, match="class token"):
        pool_features(tokens, 3, "cls", has_class_token=False)
    with pytest.raises(ValueError, match="'max' is not valid; expected one of: avg, cls, tokens"):
        pool_features(tokens, 3, "max")
    with pytest.raises(ValueError, match="'mean' is now called 'avg'"):
        pool_features(tokens, 3, "mean")


# ---- attention similarity --------------------------------------------------------------------------------

def random_attention(b, heads, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, n, n, generator=g) * 2).softmax(-1)


def ref_layer_similarity(attns, prefix, kind):
    maps = []
    for a in attns:
        p = a.double().numpy()[:, :, prefix:, prefix:]
        p = p / p.sum(-1, keepdims=True)
        maps.append(p.mean(1))
    L, (b, q, _) = len(maps), maps[0].shape
    out = np.zeros((L, L))
    for i, j in itertools.product(range(L), range(L)):
        vals = []
        for img in range(b):
            for row in range(q):
                u, v = maps[i][img, row], maps[j][img, row]
                if kind == "jsd":
                    vals.append(1 - jensenshannon(u, v, base=2) ** 2)
                else:
                    vals.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
        out[i, j] = np.mean(vals)
    return out


@pytest.mark.parametrize("kind", ["jsd", "cosine"])
def test_attention_similarity_matches_reference(kind):
    attns = [random_attention(2, 3, 1 + 16, seed=s) for s in range(3)]
    attns.append(attns[0].clone())  # an identical layer: similarity 1 with layer 0
    got = attention_similarity(attns, 1, kind)
    np.testing.assert_allclose(got.numpy(), ref_layer_similarity(attns, 1, kind), atol=1e-6)
    assert got[0, 3].item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(got.diagonal().numpy(), 1.0, atol=1e-6)


def test_js_divergence_reference_and_bounds():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.0, 1.0])
    assert js_divergence(p, q).item() == pytest.approx(1.0, abs=1e-6)  # disjoint supports: 1 bit
    u, v = torch.rand(2, 10).softmax(-1)
    assert js_divergence(u, v).item() == pytest.approx(jensenshannon(u.numpy(), v.numpy(), base=2) ** 2, rel=1e-4)


def test_head_similarity_and_streaming():
    attn = random_attention(5, 3, 5 + 9, seed=9)
    hs = head_similarity(attn, 5)
    assert hs.shape == (3, 3)
    per_head = [attn[:, h : h + 1] for h in range(3)]  # each head as a one-head "layer"
    np.testing.assert_allclose(hs.numpy(), ref_layer_similarity(per_head, 5, "jsd"), atol=1e-6)
    for acc, feed in ((HeadSimilarity(5), lambda acc, s: acc.update(attn[s])),
                      (AttentionSimilarity(5, "cosine"), lambda acc, s: acc.update([attn[s], attn[s].flip(1)]))):
        fresh = type(acc)(5, acc.kind)
        feed(acc, slice(0, 5))
        feed(fresh, slice(0, 2))
        feed(fresh, slice(2, 5))
        torch.testing.assert_close(acc.compute(), fresh.compute(), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="unknown attention similarity kind"):
        AttentionSimilarity(1, "kl")


def test_minibatch_float32_features_match_float64_despite_large_means():
    # float32 features get float32 Gram matrices (shifted by their mean first) and float64 HSIC sums
    feats = [f.float() for f in layers(40, seed=3, offset=1e3)]  # ViT tokens have large means
    got = stream(CKAAccumulator(chunk_size=12), feats, [17, 23])
    ref = stream(CKAAccumulator(chunk_size=12), [f.double() for f in feats], [17, 23])
    assert got.dtype == torch.float64
    assert (got - ref).abs().max() < 1e-6
    assert (ref - torch.eye(3)).abs().max() > 0.05  # not a trivial case


def test_minibatch_does_not_keep_views_of_larger_tensors_alive():
    tokens = torch.randn(8, 50, 6)
    acc = CKAAccumulator(chunk_size=16)
    acc.update([tokens[:, 0], tokens[:4].mean(1).repeat(2, 1)])  # a strided view and a fresh tensor
    held = [f for part in acc._buffer for f in part]
    assert all(f.untyped_storage().nbytes() == f.numel() * f.element_size() for f in held)


@pytest.mark.parametrize("estimator,chunk,split", [("exact", 256, 7), ("exact", 256, 1), ("minibatch", 4, 8),
                                                   ("minibatch", 256, 13)])
def test_cka_merge_equals_one_accumulator(estimator, chunk, split):
    """Merging accumulators over consecutive parts of a stream gives the one-accumulator CKA (exact: any
    split; minibatch: a split at a multiple of the chunk size, or a second part with no full chunk)."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(30, 5, generator=g) * 3 + 10, torch.randn(30, 3, generator=g)]
    feats.append(feats[0][:, :2] @ torch.randn(2, 4, generator=g) + 0.1 * torch.randn(30, 4, generator=g))
    whole, first, second = (CKAAccumulator(estimator=estimator, chunk_size=chunk) for _ in range(3))
    for i in range(0, 30, 3):
        whole.update([f[i:i + 3] for f in feats])
    first.update([f[:split] for f in feats])
    for i in range(split, 30, 5):
        second.update([f[i:i + 5] for f in feats])
    first.merge(second)
    assert first.samples == 30
    np.testing.assert_allclose(first.compute().numpy(), whole.compute().numpy(), rtol=1e-9, atol=1e-12)


def test_cka_cross_exact_merge():
    g = torch.Generator().manual_seed(1)
    a, b = [torch.randn(20, 4, generator=g) + 5], [torch.randn(20, 3, generator=g) - 2, torch.randn(20, 2, generator=g)]
    whole, first, second = (CKAAccumulator(estimator="exact", cross=True) for _ in range(3))
    whole.update(a, b)
    first.update([f[:6] for f in a], [f[:6] for f in b])
    second.update([f[6:] for f in a], [f[6:] for f in b])
    first.merge(second)
    np.testing.assert_allclose(first.compute().numpy(), whole.compute().numpy(), rtol=1e-9)
    with pytest.raises(ValueError, match="different settings"):
        first.merge(CKAAccumulator(estimator="minibatch", cross=True))
