"""run_analyses / cross_model_cka: one streaming pass, batch-size invariant, the result contract."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from analysis.attention import attention_distance, normalized_mutual_information, uniform_attention_distance
from analysis.capture import capture
from analysis.fourier import delta_log_amplitude
from analysis.results import TABLE_COLUMNS, AnalysisResult
from analysis.runner import ANALYSES, cross_model_cka, run_analyses, uniform_nmi
from analysis.similarity import CKAAccumulator, linear_cka

import analysis_models
from analysis_models import photo_tensor, resize

FAST = dict(tsne_samples=60, tsne_iterations=250, attribution_steps=4, map_images=3, pre_post_images=3)


def tiny_vit(**kw):
    # seed: the same weights in every test and in the module-scoped fixture
    return analysis_models.tiny_vit(seed=0, **{"reg_tokens": 4, "num_classes": 4, **kw}).eval()


@pytest.fixture(scope="module")
def dataset():
    """10 crops of real photographs (32 px), labelled by photograph."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images, labels = [], []
    for i in range(10):
        p = photos[i % 4]
        t = photo_tensor(p)
        s = 120 + 20 * (i // 4)
        t = t[:, 40 * (i // 4): 40 * (i // 4) + s, 30: 30 + s]
        images.append(resize(t, 32))
        labels.append(i % 4)
    x = torch.stack(images)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, torch.tensor(labels)


def batches(dataset, size, kind="tuple"):
    x, y = dataset
    for i in range(0, len(x), size):
        if kind == "dict":
            yield {"image": x[i:i + size], "label": y[i:i + size]}
        elif kind == "tensor":
            yield x[i:i + size]
        else:
            yield x[i:i + size], y[i:i + size]


@pytest.fixture(scope="module")
def full(dataset):
    return run_analyses(tiny_vit(), list(batches(dataset, 4)), ANALYSES, model_name="tiny", progress=False, **FAST)


def test_result_contract(full):
    L, H, grid = 3, 2, (4, 4)
    assert full.images == 10 and full.analyses == ANALYSES and full.geometry.num_prefix_tokens == 5
    assert tuple(full.table.columns) == TABLE_COLUMNS
    t = full.table
    assert set(t["model"]) == {"tiny"} and set(t["n_images"]) == {10}
    dist = full.metric("attention-distance")
    assert sorted(set(dist["layer"])) == [1, 2, 3] and sorted(set(dist["head"])) == [-1, 0, 1]
    assert sorted(set(full.metric("fourier-high-frequency")["layer"])) == [0, 1, 2, 3]
    for name in ("nmi", "attention-entropy", "head-similarity", "attention-shift-ratio", "attention-shift-cosine"):
        assert len(full.metric(name)) > 0, name
    a = full.arrays
    assert a["attention_similarity"].shape == (L, L) and a["head_similarity"].shape == (L, H, H)
    assert a["cka"].shape == (L, L) and np.allclose(np.diag(a["cka"]), 1)
    assert a["fourier"].shape == (L + 1, 2) and a["fourier_freqs"].shape == (2,)
    assert a["tsne_xy"].shape == (60, 2) and a["tsne_labels"].shape == (60,) and set(a["tsne_labels"]) <= {0, 1, 2, 3}
    assert a["pre_post"]["pre_xy"].shape == (3 * 16, 2) and int(a["pre_post"]["layer"]) == L
    assert a["inputs"].shape == (3, 3, 32, 32) and a["labels"].tolist() == [0, 1, 2]
    assert a["attention_maps"].shape == (3, L, H, 1, *grid) and a["attention_map_queries"].tolist() == [[2, 2]]
    assert a["rollout"].shape == (3, *grid) and np.allclose(a["rollout"].sum((1, 2)), 1, atol=1e-5)
    assert a["rollout_mean"].shape == grid
    assert a["attribution"]["integrated-gradients"].shape == (3, 32, 32) and a["attribution"]["occlusion"].shape == (3, 32, 32)


def test_values_equal_direct_computation_on_all_images(full, dataset):
    x, _ = dataset
    model = tiny_vit()
    got = capture(model, x, attention=True, block_output=True, embedding=True)
    dist = full.metric("attention-distance")
    for layer in (1, 3):
        ref = attention_distance(got.attention[layer], 4, 8, num_prefix_tokens=5)
        row = dist[(dist["layer"] == layer)].sort_values("head")
        np.testing.assert_allclose(row["value"].to_numpy(), np.r_[ref.mean(), ref].astype(float), rtol=1e-5)
        nmi = full.metric("nmi")
        np.testing.assert_allclose(nmi[(nmi["layer"] == layer) & (nmi["head"] == 0)]["value"].item(),
                                   normalized_mutual_information(got.attention[layer], 5)[0].item(), rtol=1e-5)
    fourier = delta_log_amplitude(got.block_output[2], 4, 5)
    np.testing.assert_allclose(full.arrays["fourier"][2], fourier.numpy(), atol=1e-5)
    acc = CKAAccumulator(chunk_size=256)
    acc.update([got.block_output[l][:, 5:].mean(1) for l in (1, 2, 3)])
    np.testing.assert_allclose(full.arrays["cka"], acc.compute().numpy(), rtol=1e-6)


def test_batch_size_invariance(full, dataset):
    other = run_analyses(tiny_vit(), batches(dataset, 3, kind="dict"), ANALYSES, model_name="tiny", progress=False,
                         batch_size=2, **FAST)
    np.testing.assert_allclose(other.table["value"].to_numpy(), full.table["value"].to_numpy(), rtol=1e-5, atol=1e-6)
    for key in ("attention_similarity", "head_similarity", "cka", "fourier", "tsne_labels", "rollout", "rollout_mean",
                "attention_maps", "tsne_xy"):
        np.testing.assert_allclose(other.arrays[key], full.arrays[key], rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(other.arrays["pre_post"]["post_centroids"], full.arrays["pre_post"]["post_centroids"],
                               rtol=1e-4, atol=1e-4)


def test_max_images_bare_tensors_and_model_untouched(dataset):
    model = tiny_vit()
    model.train()
    fused = [b.attn.fused_attn for b in model.blocks]
    res = run_analyses(model, batches(dataset, 4, kind="tensor"), ["attention-distance", "fourier"], model_name="m",
                       max_images=5, progress=False)
    assert res.images == 5 and set(res.table["n_images"]) == {5}
    assert model.training and [b.attn.fused_attn for b in model.blocks] == fused
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_save_and_load_round_trip(full, tmp_path):
    out = full.save(tmp_path / "res")
    assert sorted(p.name for p in out.iterdir()) == ["arrays.npz", "meta.json", "table.csv", "table.json"]
    back = AnalysisResult.load(out)
    assert back.images == 10 and back.model_name == "tiny" and back.geometry == full.geometry
    assert str(back.arrays["tsne_label_kind"]) == "class"
    np.testing.assert_allclose(back.table["value"].to_numpy(), full.table["value"].to_numpy())
    np.testing.assert_array_equal(back.arrays["pre_post"]["pre_xy"], full.arrays["pre_post"]["pre_xy"])
    np.testing.assert_array_equal(back.arrays["attribution"]["target"], full.arrays["attribution"]["target"])
    with pytest.raises(FileNotFoundError, match="missing meta.json"):
        AnalysisResult.load(tmp_path / "nothing")


def test_baselines():
    from analysis.capture import ViTGeometry

    geometry = ViTGeometry.from_model(tiny_vit(img_size=192, patch_size=16))
    assert uniform_attention_distance(geometry) == pytest.approx(99.7529, abs=1e-4) and uniform_nmi(geometry) == 0


def test_errors(dataset):
    model = tiny_vit()
    with pytest.raises(ValueError, match="loader yielded no images"):
        run_analyses(model, [], ["nmi"], model_name="m", progress=False)
    with pytest.raises(ValueError, match="unknown analysis 'fft'"):
        run_analyses(model, batches(dataset, 4), ["fft"], model_name="m", progress=False)
    with pytest.raises(ValueError, match="no analyses requested"):
        run_analyses(model, batches(dataset, 4), [], model_name="m", progress=False)
    with pytest.raises(ValueError, match="unknown option.*tsne_perplexityy"):
        run_analyses(model, batches(dataset, 4), ["tsne"], model_name="m", progress=False, tsne_perplexityy=5)
    with pytest.raises(ValueError, match="tsne_layer 7 out of range"):
        run_analyses(model, batches(dataset, 4), ["tsne"], model_name="m", progress=False, tsne_layer=7)
    with pytest.raises(ValueError, match=r"\(16, 16\) px but the model expects \(32, 32\)"):
        run_analyses(model, [torch.zeros(2, 3, 16, 16)], ["nmi"], model_name="m", progress=False)
    with pytest.raises(ValueError, match="no head"):
        run_analyses(tiny_vit(num_classes=0), batches(dataset, 4), ["attribution"], model_name="m", progress=False)
    with pytest.raises(ValueError, match="max_images must be a positive int"):
        run_analyses(model, batches(dataset, 4), ["nmi"], model_name="m", progress=False, max_images=0)
    with pytest.raises(ValueError, match=r"map query \(9, 9\) is outside"):
        run_analyses(model, batches(dataset, 4), ["attention-maps"], model_name="m", progress=False, map_queries=[(9, 9)])


def tiny_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(2, 2), num_heads=(2, 2)).eval()


def test_swin_and_cross_model_cka(dataset):
    swin = tiny_swin()
    res = run_analyses(swin, batches(dataset, 4), ["cka", "tsne"], model_name="swin", progress=False, **FAST)
    assert res.arrays["cka"].shape == (4, 4) and res.arrays["tsne_xy"].shape == (60, 2)
    with pytest.raises(ValueError, match="'nmi' is not supported for Swin"):
        run_analyses(swin, batches(dataset, 4), ["nmi"], model_name="swin", progress=False)
    vit = tiny_vit()
    same = cross_model_cka(vit, vit, batches(dataset, 4), model_names=("v", "v"), progress=False)
    within = run_analyses(vit, batches(dataset, 4), ["cka"], model_name="v", progress=False)
    np.testing.assert_allclose(same.arrays["cka"], within.arrays["cka"], rtol=1e-9)
    np.testing.assert_allclose(same.metric("cka-same-layer")["value"], 1.0, rtol=1e-9)
    mixed = cross_model_cka(vit, swin, batches(dataset, 3), model_names=("vit", "swin"), estimator="exact",
                            progress=False)
    assert mixed.arrays["cka"].shape == (3, 4) and mixed.model_name == "vit vs swin"
    x, _ = dataset
    a = capture(vit, x, block_output=[2]).block_output[2][:, 5:].mean(1)
    b = capture(swin, x, block_output=[4]).block_output[4].mean(1)
    assert mixed.arrays["cka"][1, 3] == pytest.approx(linear_cka(a, b), rel=1e-5)


def test_bf16_autocast_close_to_float32(dataset, full):
    res = run_analyses(tiny_vit(), batches(dataset, 5), ["attention-distance", "nmi"], model_name="tiny",
                       progress=False, amp_dtype=torch.bfloat16)
    metrics = ["attention-distance", "nmi"]
    ours, ref = (t[t["metric"].isin(metrics)] for t in (res.table, full.table))
    np.testing.assert_allclose(ours["value"].to_numpy(), ref["value"].to_numpy(), rtol=0.05, atol=0.01)
    excluded = res.table[res.table["metric"].str.endswith("-excluded-rows")]
    assert len(excluded) == len(ours) and (excluded["value"] == 0).all()  # softmax rows always reach patches


def test_capture_request_is_the_union_of_the_needs():
    from analysis import registry
    from analysis.runner import SWIN_ANALYSES, capture_request

    assert capture_request({"inputs", "gradients"}) is None
    assert capture_request({"attention", "tokens", "embedding"}, 4) == dict(
        attention=True, block_output=True, embedding=True, num_prefix_tokens=4)
    needs = set().union(*(registry.get(n).needs for n in ("fourier", "pre-post")))
    assert capture_request(needs) == dict(pre_attention=True, post_attention=True, block_output=True,
                                          embedding=True, num_prefix_tokens=None)
    assert SWIN_ANALYSES == registry.supported("swin") == ("cka", "tsne", "representation-rank")


def test_joint_pre_post_pca_option_reaches_the_saved_arrays_and_the_figure(dataset, tmp_path):
    from analysis.plots import plot_pre_post

    res = run_analyses(tiny_vit(), batches(dataset, 5), ["pre-post"], model_name="tiny", progress=False,
                       pre_post_images=3, pre_post_pca="joint")
    pp = res.arrays["pre_post"]
    assert str(pp["mode"]) == "joint"
    np.testing.assert_array_equal(pp["pre_explained_variance_ratio"], pp["post_explained_variance_ratio"])
    fig = plot_pre_post({"tiny": res}, out=tmp_path / "pp")
    assert "one PCA fitted on both token sets" in fig.subfigs[0]._suptitle.get_text()
    with pytest.raises(ValueError, match="option pre_post_pca='both' is invalid"):
        run_analyses(tiny_vit(), batches(dataset, 5), ["pre-post"], model_name="tiny", progress=False,
                     pre_post_pca="both")
