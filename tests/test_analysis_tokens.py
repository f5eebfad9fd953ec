"""Reservoir sampling, t-SNE, pre/post-attention PCA, attention shift and rollout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from analysis.rollout import RolloutMap, attention_rollout, rollout_map
from analysis.tokens import AttentionShift, Reservoir, attention_shift, pre_post_pca, tsne_embedding



# ---- reservoir ------------------------------------------------------------------------------------------

def test_reservoir_is_bounded_seeded_and_batch_size_invariant():
    x = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    labels = torch.arange(100) % 7
    samples = []
    for sizes in ([100], [1] * 100, [33, 33, 34], [99, 1]):
        res = Reservoir(10, seed=3)
        start = 0
        for s in sizes:
            res.update(x=x[start:start + s], label=labels[start:start + s])
            start += s
            assert len(res) <= 10
        samples.append(res.sample())
    for other in samples[1:]:
        for key in ("x", "label", "index"):
            np.testing.assert_array_equal(samples[0][key], other[key])
    s = samples[0]
    assert len(s["index"]) == 10 and np.all(np.diff(s["index"]) > 0)  # stream order, no duplicates
    np.testing.assert_array_equal(s["x"], x.numpy()[s["index"]])
    np.testing.assert_array_equal(s["label"], labels.numpy()[s["index"]])
    other_seed = Reservoir(10, seed=4)
    other_seed.update(x=x, label=labels)
    assert not np.array_equal(other_seed.sample()["index"], s["index"])


def test_reservoir_is_roughly_uniform():
    counts = np.zeros(50)
    for seed in range(200):
        res = Reservoir(5, seed=seed)
        for start in range(0, 50, 7):
            res.update(i=np.arange(start, min(start + 7, 50)))
        counts[res.sample()["i"]] += 1
    # each item kept with probability 5/50 -> 20 of 200 runs; loose 5-sigma band
    assert counts.sum() == 1000 and counts.min() > 20 - 5 * 4.3 and counts.max() < 20 + 5 * 4.3


def test_reservoir_errors():
    with pytest.raises(ValueError, match="positive int"):
        Reservoir(0)
    res = Reservoir(3)
    with pytest.raises(ValueError, match="no rows"):
        res.sample()
    with pytest.raises(ValueError, match="same number of rows"):
        res.update(a=np.zeros(3), b=np.zeros(4))


# ---- t-SNE / PCA ------------------------------------------------------------------------------------------

def test_tsne_seeded_clamped_and_separates_digits():
    digits = load_digits()
    keep = np.isin(digits.target, [0, 1])
    x, y = digits.data[keep][:60], digits.target[keep][:60]
    a = tsne_embedding(x, seed=0, max_iter=500)
    b = tsne_embedding(x, seed=0, max_iter=500)
    assert a.shape == (60, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # the two classes form two clusters: nearest neighbour in the embedding has the same label
    d = ((a[:, None] - a[None]) ** 2).sum(-1) + np.eye(60) * 1e9
    assert (y[d.argmin(1)] == y).mean() >= 0.95
    small = tsne_embedding(x[:5], perplexity=20, max_iter=250)  # perplexity clamped to (n - 1) / 3
    assert small.shape == (5, 2) and np.isfinite(small).all()
    with pytest.raises(ValueError, match="n >= 3"):
        tsne_embedding(x[:2])


def test_pre_post_pca_centroids_and_variance():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 1 + 16, 8, generator=g)
    post = pre * 2 + torch.arange(3).float()[:, None, None] * 10  # per-image offsets -> separated centroids
    out = pre_post_pca(pre, post, num_prefix_tokens=1)
    assert out["pre_xy"].shape == (48, 2) and out["post_centroids"].shape == (3, 2)
    np.testing.assert_array_equal(out["image"], np.repeat(np.arange(3), 16))
    np.testing.assert_allclose(out["post_centroids"], out["post_xy"].reshape(3, 16, 2).mean(1), rtol=1e-6)
    assert out["post_explained_variance_ratio"][0] > 0.9  # the offsets dominate post-attention tokens
    assert out["pre_explained_variance_ratio"][0] < 0.5
    with pytest.raises(ValueError, match="equal shapes"):
        pre_post_pca(pre, post[:, :5])


def test_joint_pre_post_pca_fits_one_pca_on_both_token_sets():
    """The KAMIM fork's figure: one PCA on pre and post tokens together, so a shift of the whole cloud
    shows; separate PCAs centre each cloud and hide it."""
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(1)
    pre = torch.randn(2, 1 + 16, 8, generator=g) * torch.tensor([4.0, 2.0, 1, 1, 1, 1, 1, 1])
    post = pre + torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 3.0])  # the same cloud, shifted along a low-variance axis
    joint = pre_post_pca(pre, post, num_prefix_tokens=1, mode="joint")
    tokens = np.concatenate([pre[:, 1:].numpy(), post[:, 1:].numpy()]).reshape(64, 8)
    want = PCA(n_components=2, random_state=0).fit(tokens)
    np.testing.assert_allclose(joint["pre_xy"], want.transform(pre[:, 1:].reshape(32, 8).numpy()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(joint["post_xy"], want.transform(post[:, 1:].reshape(32, 8).numpy()), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(joint["pre_explained_variance_ratio"], joint["post_explained_variance_ratio"])
    assert str(joint["mode"]) == "joint"
    separate = pre_post_pca(pre, post, num_prefix_tokens=1)
    np.testing.assert_allclose(separate["pre_xy"], separate["post_xy"], atol=1e-4)  # centred: the shift is gone
    with pytest.raises(ValueError, match="mode 'both' is not valid; expected one of separate, joint"):
        pre_post_pca(pre, post, mode="both")


def test_attention_shift_analytic_and_streaming():
    pre = torch.randn(4, 1 + 9, 6)
    shift = attention_shift(pre, -3 * pre, num_prefix_tokens=1)
    torch.testing.assert_close(shift["ratio"], torch.full((4,), 3.0))
    torch.testing.assert_close(shift["cosine"], torch.full((4,), -1.0))
    post = torch.randn(4, 1 + 9, 6)
    one, two = AttentionShift(1), AttentionShift(1)
    one.update(pre, post)
    two.update(pre[:1], post[:1])
    two.update(pre[1:], post[1:])
    torch.testing.assert_close(one.compute(), two.compute(), rtol=1e-6, atol=1e-9)
    ratio = (post[:, 1:].norm(dim=-1) / pre[:, 1:].norm(dim=-1)).mean().item()
    assert one.compute()[0].item() == pytest.approx(ratio, rel=1e-5)


# ---- rollout ----------------------------------------------------------------------------------------------

def ref_rollout(attns):
    """Abnar & Zuidema written out: per layer mean heads, add identity, divide rows by their sums, multiply."""
    out = None
    for a in attns:
        m = a.double().numpy().mean(1)
        m = m + np.eye(m.shape[-1])
        m = m / m.sum(-1, keepdims=True)
        out = m if out is None else np.einsum("bij,bjk->bik", m, out)
    return out


def random_attention(b, heads, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, n, n, generator=g) * 2).softmax(-1)


def test_rollout_matches_reference_and_rows_sum_to_one():
    attns = [random_attention(2, 3, 5 + 16, seed=s) for s in range(4)]
    got = attention_rollout(attns)
    np.testing.assert_allclose(got.numpy(), ref_rollout(attns), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 21))
    maps = rollout_map(got, 4, num_prefix_tokens=5)
    assert maps.shape == (2, 4, 4)
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2))
    row = got[:, 0, 5:]
    torch.testing.assert_close(maps.reshape(2, 16), row / row.sum(-1, keepdim=True))
    no_cls = rollout_map(got, 4, num_prefix_tokens=5, has_class_token=False)
    torch.testing.assert_close(no_cls.sum((-1, -2)), torch.ones(2))


def test_rollout_analytic_cases():
    n = 1 + 9
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    # one uniform layer: (U + I) / 2
    torch.testing.assert_close(attention_rollout([uniform])[0], (torch.full((n, n), 1.0 / n) + torch.eye(n)) / 2)
    # identity attention leaves the tokens where they are, through any number of layers
    eye = torch.eye(n).expand(1, 2, n, n)
    torch.testing.assert_close(attention_rollout([eye, eye, eye])[0], torch.eye(n))
    # many uniform layers converge to uniform: the class token then "sees" every patch equally
    maps = rollout_map(attention_rollout([uniform] * 30), 3)
    torch.testing.assert_close(maps, torch.full((1, 3, 3), 1 / 9), atol=1e-6, rtol=0)


def test_rollout_streaming_and_errors():
    attns = [random_attention(5, 2, 1 + 9, seed=s) for s in range(2)]
    one, two = RolloutMap(3), RolloutMap(3)
    one.update(attns)
    two.update([a[:3] for a in attns])
    two.update([a[3:] for a in attns])
    torch.testing.assert_close(one.compute(), two.compute(), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        attention_rollout([attns[0] * 2])
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(ValueError, match="unknown head_fusion"):
        attention_rollout(attns, head_fusion="median")
    with pytest.raises(ValueError, match=r"rollout has 10 tokens but grid 4x4"):
        rollout_map(attention_rollout(attns), 4)


def test_reservoir_merge_is_exact_and_keys_follow_the_seeded_stream():
    x = np.arange(100, dtype=np.float32).reshape(50, 2)
    whole = Reservoir(7, seed=5)
    for i in range(0, 50, 6):
        whole.update(x=x[i:i + 6])
    first, second = Reservoir(7, seed=5), Reservoir(7, seed=5)
    first.update(x=x[:20])
    second.update_at(20, x=x[20:35])
    second.update_at(35, x=x[35:])
    first.merge(second)
    a, b = whole.sample(), first.sample()
    assert first.seen == 50 and np.array_equal(a["index"], b["index"]) and np.array_equal(a["x"], b["x"])
    # the kept rows are the 7 smallest keys of one default_rng(seed) stream drawn in row order
    keys = np.random.default_rng(5).random(50)
    assert a["index"].tolist() == sorted(np.argsort(keys)[:7].tolist())
    with pytest.raises(ValueError, match="different capacities or seeds"):
        first.merge(Reservoir(7, seed=6))
