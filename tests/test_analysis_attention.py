"""Attention distance / NMI / entropy / maps against independent float64 loop references."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.attention import (
    PatchAttention,
    AttentionDistance,
    AttentionEntropy,
    AttentionNMI,
    attention_distance,
    attention_entropy,
    attention_maps,
    distance_matrix,
    normalized_mutual_information,
    uniform_attention_distance,
    uniform_attention_entropy,
)
from analysis.capture import ViTGeometry
from analysis.results import records_to_frame


# ---- independent references (notebook definitions, Python loops, float64 numpy) -------------

def ref_distance_matrix(h, w, patch):
    n = h * w
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            yi, xi = divmod(i, w)
            yj, xj = divmod(j, w)
            d[i, j] = patch * math.sqrt((yi - yj) ** 2 + (xi - xj) ** 2)
    return d


def ref_patch_attention(attn, prefix):
    a = np.asarray(attn, dtype=np.float64)[..., prefix:, prefix:]
    return a / a.sum(-1, keepdims=True)


def ref_distance(attn, h, w, patch, prefix):
    a = ref_patch_attention(attn, prefix)
    d = ref_distance_matrix(h, w, patch)
    b, heads = a.shape[:2]
    out = np.zeros((b, heads))
    for i, j in itertools.product(range(b), range(heads)):
        out[i, j] = np.mean([np.dot(a[i, j, q], d[q]) for q in range(a.shape[2])])
    return out.mean(0)


def ref_nmi(attn, prefix):
    a = ref_patch_attention(attn, prefix)
    b, heads, n, _ = a.shape
    out = np.zeros((b, heads))
    for i, j in itertools.product(range(b), range(heads)):
        A = a[i, j]
        pq = np.full(n, 1.0 / n)
        pk = (pq[:, None] * A).sum(0)
        mi = 0.0
        for q in range(n):
            for k in range(n):
                if A[q, k] > 0:
                    mi += pq[q] * A[q, k] * math.log(A[q, k] / pk[k])
        hq = -np.sum(pq * np.log(pq))
        hk = -np.sum([p * math.log(p) for p in pk if p > 0])
        out[i, j] = mi / math.sqrt(hq * hk)
    return out.mean(0)


def ref_entropy(attn, prefix):
    a = ref_patch_attention(attn, prefix)
    ent = -np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0).sum(-1)
    return ent.mean(-1).mean(0)


def random_attention(b, heads, n, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, heads, n, n, generator=g) * torch.linspace(0.1, sharp, heads)[None, :, None, None]
    return logits.softmax(-1)


# ---- analytic cases ---------------------------------------------------------------------------

def test_uniform_attention_on_12x12_grid_of_16px_patches():
    n = 1 + 144
    uniform = torch.full((2, 3, n, n), 1.0 / n)
    dist = attention_distance(uniform, 12, 16, num_prefix_tokens=1)
    expected = float(np.mean(ref_distance_matrix(12, 12, 16)))
    assert abs(expected - 99.75) < 0.01  # the paper's "99.75 px" (exactly 99.7529...)
    torch.testing.assert_close(dist, torch.full((3,), expected, dtype=torch.float64), atol=1e-4, rtol=0)
    geometry = ViTGeometry((192, 192), (16, 16), (12, 12), 1, 12, 3, 192)
    assert abs(uniform_attention_distance(geometry) - expected) < 1e-9
    # float32 entropies: absolute accuracy ~1e-6 (KAMIM's collapsed attention has NMI ~5e-3)
    torch.testing.assert_close(normalized_mutual_information(uniform), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((3,), math.log(144), dtype=torch.float64), rtol=1e-6, atol=0)
    assert uniform_attention_entropy(geometry) == pytest.approx(math.log(144))


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_identity_attention(prefix):
    n = prefix + 64
    eye = torch.eye(n).expand(2, 2, n, n).contiguous()
    torch.testing.assert_close(attention_distance(eye, 8, 16, prefix), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(normalized_mutual_information(eye, prefix), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(attention_entropy(eye, prefix), torch.zeros(2, dtype=torch.float64))


def test_neighbour_attention_distance_is_one_patch():
    # every patch attends only to its right neighbour (last column to its left one): distance = patch size
    h = w = 4
    a = torch.zeros(1, 1, 16, 16)
    for i in range(16):
        r, c = divmod(i, w)
        a[0, 0, i, r * w + (c + 1 if c + 1 < w else c - 1)] = 1
    assert attention_distance(a, (h, w), 16, num_prefix_tokens=0).item() == pytest.approx(16.0)


# ---- parity with the loop references ------------------------------------------------------------

@pytest.mark.parametrize("side,prefix", [(8, 1), (12, 5), (14, 1), (8, 0)])
def test_parity_with_notebook_definitions(side, prefix):
    attn = random_attention(2, 3, prefix + side * side, seed=side)
    np.testing.assert_allclose(attention_distance(attn, side, 16, prefix).numpy(),
                               ref_distance(attn.numpy(), side, side, 16, prefix), rtol=1e-5)
    np.testing.assert_allclose(attention_entropy(attn, prefix).numpy(), ref_entropy(attn.numpy(), prefix), rtol=1e-5)
    if side <= 8:  # the quadruple loop is slow; NMI parity on the smaller grids
        np.testing.assert_allclose(normalized_mutual_information(attn, prefix).numpy(), ref_nmi(attn.numpy(), prefix),
                                   rtol=1e-4, atol=1e-6)


def test_nmi_parity_with_exact_zeros():
    attn = random_attention(1, 2, 1 + 16, seed=3)
    attn[..., 3] = 0  # a key nobody attends to: p(k) = 0
    attn = attn / attn.sum(-1, keepdim=True)
    np.testing.assert_allclose(normalized_mutual_information(attn).numpy(), ref_nmi(attn.numpy(), 1), rtol=1e-4)


def test_non_square_grid_and_patch():
    attn = random_attention(2, 2, 1 + 3 * 5, seed=1)
    got = attention_distance(attn, (3, 5), (8, 8), 1)
    np.testing.assert_allclose(got.numpy(), ref_distance(attn.numpy(), 3, 5, 8, 1), rtol=1e-5)
    d = distance_matrix((2, 3), (4, 6))
    assert d[0, 5].item() == pytest.approx(math.hypot(4, 12))  # (0,0) -> (1,2): 1 row of 4 px, 2 cols of 6 px


def test_bf16_input_computed_in_float32():
    attn = random_attention(2, 2, 1 + 64, seed=2, sharp=6.0)
    low = attn.bfloat16()
    ref = ref_nmi(low.float().numpy(), 1)
    got = normalized_mutual_information(low)
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4)
    np.testing.assert_allclose(attention_distance(low, 8, 16).numpy(), ref_distance(low.float().numpy(), 8, 8, 16, 1), rtol=1e-5)


# ---- streaming ------------------------------------------------------------------------------------

@pytest.mark.parametrize("acc_fn", [lambda: AttentionDistance(12, 16, 5), lambda: AttentionNMI(5), lambda: AttentionEntropy(5)])
def test_two_batches_streamed_equal_one_concatenated(acc_fn):
    attn = random_attention(5, 3, 5 + 144, seed=7)
    one, two = acc_fn(), acc_fn()
    one.update(attn)
    two.update(attn[:2])
    two.update(attn[2:])
    assert one.images == two.images == 5
    torch.testing.assert_close(one.compute(), two.compute(), rtol=1e-6, atol=1e-9)


def test_accumulator_equals_function():
    attn = random_attention(4, 2, 1 + 64, seed=4)
    acc = AttentionDistance(8, 16, 1)
    acc.update(attn[:1])
    acc.update(attn[1:])
    torch.testing.assert_close(acc.compute(), attention_distance(attn, 8, 16, 1), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="no images"):
        AttentionNMI().compute()


# ---- maps -------------------------------------------------------------------------------------------

def test_attention_maps_rows_reshaped_to_grid():
    attn = random_attention(2, 2, 1 + 12, seed=5)
    maps = attention_maps(attn, (3, 4), [(0, 0), (2, 1)], num_prefix_tokens=1)
    assert maps.shape == (2, 2, 2, 3, 4)
    row = attn[:, :, 1 + 2 * 4 + 1, 1:]
    torch.testing.assert_close(maps[:, :, 1].reshape(2, 2, 12), row / row.sum(-1, keepdim=True))
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"query \(3, 0\) is outside the 3x4 token grid"):
        attention_maps(attn, (3, 4), [(3, 0)])


# ---- bad input ----------------------------------------------------------------------------------------

def test_bad_inputs_raise_one_line_errors():
    attn = random_attention(1, 2, 145)
    with pytest.raises(ValueError, match=r"rows must sum to 1.*max \|row sum - 1\|"):
        attention_distance(attn * 1.1, 12, 16)
    with pytest.raises(ValueError, match=r"attention has 145 tokens but grid 14x14 \+ 1 prefix tokens = 197"):
        attention_distance(attn, 14, 16)
    with pytest.raises(ValueError, match=r"must be \(B, heads, N, N\)"):
        normalized_mutual_information(attn[0])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        attention_entropy(torch.full_like(attn, float("nan")))
    with pytest.raises(ValueError, match="num_prefix_tokens=145 is invalid"):
        normalized_mutual_information(attn, num_prefix_tokens=145)


def test_prepared_attention_is_shared_and_checked():
    attn = random_attention(3, 2, 5 + 16, seed=8)
    prepared = PatchAttention(attn, 5, 4)
    torch.testing.assert_close(attention_distance(prepared, 4, 16, 5), attention_distance(attn, 4, 16, 5))
    torch.testing.assert_close(normalized_mutual_information(prepared, 5), normalized_mutual_information(attn, 5))
    torch.testing.assert_close(attention_entropy(prepared, 5), attention_entropy(attn, 5))
    with pytest.raises(ValueError, match="prepared with 5 prefix tokens, not 1"):
        attention_entropy(prepared, 1)
    with pytest.raises(ValueError, match="16 patch tokens but grid 3x3 has 9"):
        attention_distance(prepared, 3, 16, 5)


# ---- the chunked sweep: chunking, layouts, exact zeros, prefix validation ---------------------------

def _all_stats(attn, prefix, side):
    return (attention_distance(attn, side, 16, prefix), normalized_mutual_information(attn, prefix),
            attention_entropy(attn, prefix))


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_results_do_not_depend_on_chunking(monkeypatch, prefix):
    # the test tensors fit in one chunk by default: force several chunks with a partial last one
    import analysis.attention as attention_module

    attn = random_attention(5, 3, prefix + 36, seed=11)  # 15 maps
    whole = _all_stats(attn, prefix, 6)
    prepared = PatchAttention(attn, prefix, 6)
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", 4 * 36 * (prefix + 36))  # 4 maps per chunk
    for got, ref in zip(_all_stats(attn, prefix, 6), whole):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(normalized_mutual_information(attn, prefix).numpy(), ref_nmi(attn.numpy(), prefix),
                               rtol=1e-4, atol=1e-6)
    chunked = PatchAttention(attn, prefix, 6)
    torch.testing.assert_close(chunked.row_entropy, prepared.row_entropy)
    torch.testing.assert_close(chunked.key_marginal, prepared.key_marginal)


def test_layouts_and_dtypes_take_the_copy_path():
    attn = random_attention(3, 2, 1 + 36, seed=12)
    ref = _all_stats(attn, 1, 6)
    # same values, transposed storage (rows not contiguous): converted chunk by chunk
    strided = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not strided.is_contiguous()
    for got, want in zip(_all_stats(strided, 1, 6), ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    for got, want in zip(_all_stats(attn.double(), 1, 6), ref):  # float64 input: computed in float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def _restricted_reference(attn: torch.Tensor, h: int, w: int, patch: int):
    """cl-vs-mim's per-image distance, NMI and entropy over the rows that have patch mass only
    (uniform p(q) over them, log of their count in H(q)); an (image, head) without one is NaN and left
    out of the mean over images."""
    a = attn.double().numpy()[..., 1:, 1:]
    d = ref_distance_matrix(h, w, patch)
    b, heads = a.shape[:2]
    dist, nmi, ent = (np.full((b, heads), np.nan) for _ in range(3))
    for i, j in itertools.product(range(b), range(heads)):
        valid = a[i, j].sum(-1) > 0
        if not valid.any():
            continue
        rows = a[i, j][valid] / a[i, j][valid].sum(-1, keepdims=True)
        n = rows.shape[0]
        dist[i, j] = np.mean([np.dot(rows[q], d[np.flatnonzero(valid)[q]]) for q in range(n)])
        pk = rows.mean(0)
        mi = sum(rows[q, k] * math.log(rows[q, k] / pk[k]) / n for q in range(n) for k in range(h * w) if rows[q, k] > 0)
        hk = -sum(p * math.log(p) for p in pk if p > 0)
        nmi[i, j] = mi / math.sqrt(math.log(n) * hk) if n > 1 and hk > 0 else 0.0
        ent[i, j] = np.mean([-sum(p * math.log(p) for p in r if p > 0) for r in rows])
    return np.nanmean(dist, 0), np.nanmean(nmi, 0), np.nanmean(ent, 0), (~np.isnan(dist)).sum(0)


def test_rows_with_no_patch_mass_are_excluded_and_counted():
    """Rows whose patch attention sums to exactly zero (all mass on the CLS token) are left out of
    distance, NMI and entropy, which then equal the reference formulas over the remaining rows; an
    image whose head has no row left does not count for that head; the tidy table counts them."""
    from analysis.attention import distance_accumulator, nmi_accumulator

    attn = random_attention(3, 2, 1 + 16, seed=13)
    attn[..., 4 + 1] = 0  # key 4 gets exactly zero attention everywhere
    attn[:, :, 2 + 1, :] = 0  # query 2 of every map, queries 5 and 7 of image 1 / head 0, and every
    attn[1, 0, [5 + 1, 7 + 1], :] = 0  # query of image 2 / head 1 attend to the CLS token only
    attn[2, 1, 1:, :] = 0
    attn[:, :, 1:, 0] = torch.where(attn[:, :, 1:, 1:].sum(-1) == 0, 1.0, attn[:, :, 1:, 0])
    attn = attn / attn.sum(-1, keepdim=True)
    dist, nmi, ent, images = _restricted_reference(attn, 4, 4, 16)
    np.testing.assert_allclose(attention_distance(attn, 4, 16).numpy(), dist, rtol=1e-5)
    np.testing.assert_allclose(normalized_mutual_information(attn).numpy(), nmi, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(attention_entropy(attn).numpy(), ent, rtol=1e-5)
    prepared = PatchAttention(attn, 1, 4)
    assert torch.all(prepared.row_entropy[:, :, 2] == 0)
    torch.testing.assert_close(normalized_mutual_information(prepared), normalized_mutual_information(attn))
    # counting the empty rows as zeros (the earlier convention) gives other numbers
    zeros = np.divide(attn.double().numpy()[..., 1:, 1:], prepared.row_sum.double().numpy()[..., None],
                      out=np.zeros((3, 2, 16, 16)), where=prepared.row_sum.numpy()[..., None] > 0)
    assert not np.allclose((zeros * ref_distance_matrix(4, 4, 16)).sum(-1).mean(-1).mean(0), dist, rtol=1e-3)

    class _Batch:
        def patch_attention(self, layer):
            return PatchAttention(attn, 1, 4)

    geometry = SimpleNamespace(grid=(4, 4), patch_size=(16, 16), num_prefix_tokens=1)
    context = SimpleNamespace(model_name="m", layers=(1,), geometry=geometry)
    for make, metric, want in ((distance_accumulator, "attention-distance", dist), (nmi_accumulator, "nmi", nmi)):
        acc, half = make(context), make(context)
        acc.update(_Batch())
        half.update(_Batch())
        acc.merge(half)  # the same images twice: means unchanged, counts doubled
        table = records_to_frame(acc.finish()[0])
        heads = table[(table["metric"] == metric) & (table["head"] >= 0)].sort_values("head")
        np.testing.assert_allclose(heads["value"], want, rtol=1e-5, atol=1e-7)
        assert heads["n_images"].tolist() == (2 * images).tolist() == [6, 4]  # head 1 has no row in image 2
        rows = table[table["metric"] == f"{metric}-excluded-rows"].sort_values("head")
        # head 0: query 2 of 3 images + 2 more rows of image 1; head 1: query 2 of 2 images + all 16 of image 2
        assert rows["value"].tolist() == [2 * 23, 2 * 5, 2 * 18] and rows["head"].tolist() == [-1, 0, 1]


def test_row_check_covers_prefix_rows_and_prefix_columns():
    attn = random_attention(1, 2, 1 + 16, seed=14)
    cls_row = attn.clone()
    cls_row[0, 1, 0, :] *= 1.5  # only the CLS query row is off
    with pytest.raises(ValueError, match=r"rows must sum to 1.*max \|row sum - 1\| = 0\.5 > 0\.001"):
        attention_entropy(cls_row)
    prefix_col = attn.clone()
    prefix_col[0, 0, 3, 0] += 0.01  # a patch row whose CLS column pushes it over 1
    with pytest.raises(ValueError, match="rows must sum to 1"):
        attention_distance(prefix_col, 4, 16)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        PatchAttention(prefix_col, 1, 4)


def test_nmi_of_a_head_with_one_row_on_patches_is_zero_not_a_blow_up():
    """One remaining query has H(q) = 0: no mutual information to normalise (the restricted
    reference gives 0), where dividing by sqrt(log 1 * H(k)) would blow the float error up."""
    attn = random_attention(1, 2, 1 + 16, seed=3)
    attn[0, 0, 2:, :] = 0  # head 0: only query 0 (token 1) keeps attention on patches
    attn[0, 0, 2:, 0] = 1.0
    nmi = normalized_mutual_information(attn)
    assert nmi[0].item() == 0.0 and 0 < nmi[1].item() < 1
