"""The analysis registry: every registered analysis on every geometry it claims (runs, batch-size
invariant, exact merge of accumulators over disjoint images), refusals with one message, plugins."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import timm
import torch

from analysis import registry
from analysis.registry import Analysis, Batch, Context
from analysis.runner import CAPTURES, RunOptions, capture_request, run_analyses

import analysis_models
from analysis_models import photo_tensor, resize

FAST = dict(tsne_samples=40, tsne_iterations=250, attribution_steps=4, map_images=3, pre_post_images=3)


def _vit(**kw):
    return analysis_models.tiny_vit(seed=0, **{"num_classes": 3, "depth": 2, **kw}).eval()


def _swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=3).eval()


GEOMETRIES = {
    "vit-cls": (lambda: _vit(), (32, 32)),
    "vit-registers": (lambda: _vit(reg_tokens=2), (32, 32)),
    "vit-no-cls": (lambda: _vit(class_token=False, global_pool="avg"), (32, 32)),
    "vit-non-square": (lambda: _vit(img_size=(32, 48)), (32, 48)),
    "swin": (_swin, (32, 32)),
}


def _images(size: tuple[int, int], n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.stack([resize(photo_tensor(photos[i % 4])[:, 10 * i:, 10 * i:], max(size))[:, :size[0], :size[1]]
                     for i in range(n)])
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, torch.arange(n) % 4


def _cases():
    for name in registry.names():
        for geometry, (make, _) in GEOMETRIES.items():
            if geometry.split("-")[0] in registry.get(name).geometries:
                yield pytest.param(name, geometry, id=f"{name}-{geometry}")


def _close(a, b, where: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    if isinstance(a, Mapping):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}/{k}", rtol, atol)
        return
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc":
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=where)
    else:
        np.testing.assert_array_equal(a, b, err_msg=where)


@pytest.mark.parametrize("name,geometry", list(_cases()))
def test_every_analysis_on_every_claimed_geometry(name, geometry):
    make, size = GEOMETRIES[geometry]
    model = make()
    x, y = _images(size)
    analysis = registry.get(name)
    if name == "fourier" and size[0] != size[1]:  # needs one square grid: refused before any work
        with pytest.raises(ValueError, match="square token grid, got 4x6"):
            run_analyses(model, [(x, y)], [name], model_name="m", progress=False)
        return
    one = run_analyses(model, [(x, y)], [name], model_name="m", progress=False, **FAST)
    split = run_analyses(model, [(x[:5], y[:5]), (x[5:], y[5:])], [name], model_name="m", progress=False,
                         batch_size=2, **FAST)
    assert one.analyses == (name,) and one.images == 8
    assert set(analysis.arrays) == set(one.arrays)  # the documented keys, exactly
    assert not one.table["value"].isna().any()
    _close(split.table["value"].to_numpy(), one.table["value"].to_numpy(), "table")
    _close(split.arrays, one.arrays, name, rtol=1e-4, atol=1e-5)


def _accumulate(analysis: Analysis, model, batches, geometry, **options):
    """One accumulator of ``analysis`` over ``batches`` of (images, labels, first stream index)."""
    opts = RunOptions.from_kwargs({**FAST, **options})
    context = Context("m", geometry, opts, 0, model, "cpu")
    acc = analysis.accumulator(context)
    request = capture_request(analysis.needs)
    kind = registry.geometry_kind(geometry)
    with CAPTURES[kind](model, **request) if request else _null() as cap:
        for images, labels, start in batches:
            out = cap(images) if cap is not None else None
            acc.update(Batch(images, labels, torch.arange(start, start + len(images)), out, geometry))
    return acc


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("name", registry.names())
def test_merge_of_two_halves_equals_one_accumulator(name):
    from kamim.backbone import model_geometry

    model = _vit(reg_tokens=2)
    geometry = model_geometry(model)
    x, y = _images((32, 32), n=10)
    batches = [(x[i:i + 3], y[i:i + 3], i) for i in range(0, 10, 3)]  # stream positions 0, 3, 6, 9
    analysis = registry.get(name)
    whole = _accumulate(analysis, model, batches, geometry)
    first, second = _accumulate(analysis, model, batches[:2], geometry), _accumulate(analysis, model, batches[2:], geometry)
    first.merge(second)
    (rows_a, arrays_a), (rows_b, arrays_b) = whole.finish(), first.finish()
    keys = [[(r.layer, r.head, r.column, r.metric, r.n_images) for r in rows] for rows in (rows_a, rows_b)]
    assert keys[0] == keys[1]
    for field in ("value", "ci_low", "ci_high"):  # the intervals over images merge too (NaN where none)
        np.testing.assert_allclose([getattr(r, field) for r in rows_b], [getattr(r, field) for r in rows_a],
                                   rtol=1e-6, atol=1e-9, err_msg=f"{name}: {field}")
    _close(arrays_b, arrays_a, name, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in registry.names() if "swin" not in registry.get(n).geometries])
def test_unsupported_geometry_is_refused_with_one_message(name):
    swin = _swin()
    message = registry.unsupported_message(name, "swin")
    assert "\n" not in message and f"analysis {name!r} is not supported for Swin models" in message
    assert message.endswith(f"(supported: {', '.join(registry.supported('swin'))})")
    with pytest.raises(ValueError) as err:
        run_analyses(swin, [torch.zeros(2, 3, 32, 32)], ["cka", name], model_name="s", progress=False)
    assert str(err.value) == message
    with pytest.raises(ValueError) as again:
        registry.check_supported([name], _swin_geometry())
    assert str(again.value) == message


def _swin_geometry():
    from kamim.backbone import model_geometry

    return model_geometry(_swin())


def test_swin_support_is_what_the_analyses_claim():
    assert registry.supported("swin") == ("cka", "tsne", "representation-rank")
    assert set(registry.supported("vit")) == set(registry.names()) - {n for n in registry.names()
                                                                       if "vit" not in registry.get(n).geometries}


def test_registry_api_errors_and_views(tmp_path):
    from analysis import names, plots
    from analysis.builtin import BUILTIN

    assert names.ANALYSES == tuple(a.name for a in BUILTIN) == registry.names()[:len(BUILTIN)]
    assert dict(plots.FIGURE_TITLES)["cka"] == registry.get("cka").title == "CKA across layers"
    assert plots.FIGURE_TITLES["cross-cka"] == "Cross-model CKA"
    assert registry.get("pre-post").figure_stem == "pre_post"
    with pytest.raises(ValueError, match="unknown analysis 'fft'; expected one of attention-distance, nmi"):
        registry.get("fft")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Analysis("cka", "x", frozenset({"tokens"}), frozenset({"vit"}), lambda c: None))
    with pytest.raises(ValueError, match="unknown needs"):
        Analysis("x", "x", frozenset({"logits"}), frozenset({"vit"}), lambda c: None)
    with pytest.raises(ValueError, match="geometries must be a non-empty subset"):
        Analysis("x", "x", frozenset({"tokens"}), frozenset({"cnn"}), lambda c: None)
    with pytest.raises(ValueError, match="no such file"):
        registry.load_plugin(tmp_path / "missing.py")
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ValueError) as err:
        registry.load_plugin(tmp_path / "bad.py")
    assert str(err.value).endswith("failed: RuntimeError: boom") and "\n" not in str(err.value)
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="registers no analysis"):
        registry.load_plugin(tmp_path / "empty.py")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="expected a .py file"):
        registry.load_plugin(tmp_path / "notes.txt")


def _uniform_attention_vit(class_token: bool):
    """A ViT whose attention is exactly uniform: queries and keys are zero, so every score is 0.
    192 px, patch 16: the paper's 12x12 grid of 16 px patches."""
    import timm

    kw = {} if class_token else {"class_token": False, "global_pool": "avg"}
    model = timm.create_model("vit_tiny_patch16_224", img_size=192, patch_size=16, embed_dim=48, depth=2,
                              num_heads=3, num_classes=0, **kw).eval()
    with torch.no_grad():
        for blk in model.blocks:
            d = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.weight[: 2 * d] = 0
            blk.attn.qkv.bias[: 2 * d] = 0
    return model


@pytest.mark.parametrize("class_token", [False, True])
def test_registered_attention_analyses_give_their_uniform_baselines(class_token):
    """Through the registry and the runner: uniform attention over 12x12 patches of 16 px has mean
    distance 99.75 px, entropy ln 144 and NMI 0, at every layer and head."""
    import math

    from analysis.attention import uniform_attention_distance, uniform_attention_entropy, uniform_nmi
    from kamim.backbone import model_geometry

    model = _uniform_attention_vit(class_token)
    geometry = model_geometry(model)
    assert geometry.grid == (12, 12) and geometry.patch_size == (16, 16)
    x = torch.randn(2, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    res = run_analyses(model, [x], ["attention-distance", "nmi", "attention-entropy"], model_name="u",
                       progress=False)
    expected = {"attention-distance": uniform_attention_distance(geometry), "nmi": uniform_nmi(geometry),
                "attention-entropy": uniform_attention_entropy(geometry)}
    assert expected["attention-distance"] == pytest.approx(99.75, abs=0.005)
    assert expected["attention-entropy"] == pytest.approx(math.log(144)) and expected["nmi"] == 0.0
    for metric, value in expected.items():
        values = res.table.loc[res.table["metric"] == metric, "value"].to_numpy()
        assert len(values) >= 2 and np.allclose(values, value, rtol=1e-5, atol=1e-5), (metric, values, value)
