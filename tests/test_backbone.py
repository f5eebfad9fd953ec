"""The backbone layer: one layer numbering for ViT and Swin, shared by evaluation and analysis."""
from __future__ import annotations

import pytest
import timm
import torch

from analysis.capture import capture
from analysis.similarity import pool_features
from kamim.backbone import (
    SwinGeometry, ViTGeometry, default_layer, layer_columns, layer_features, model_geometry, num_layers,
    resolve_layers, to_hw, unwrap,
)
from kamim.checkpoints import encoder_from_module, load_encoder, resolve_encoder
from kamim.eval.features import extract_features
from kamim.models import create_encoder

from analysis_models import photo_batch


@pytest.fixture(scope="module")
def vit():
    return create_encoder("vit_pico", img_size=32, reg_tokens=2)[0].eval()


@pytest.fixture(scope="module")
def swin():
    return create_encoder("swin_pico")[0].eval()  # stages of 1, 1, 2, 1 blocks: 5 layers


@pytest.fixture(params=["vit", "swin"])
def model(request, vit, swin):
    return vit if request.param == "vit" else swin


def _images(photos, model):
    return photo_batch(photos.values(), n=2, size=model_geometry(model).img_size[0])


@torch.no_grad()
def test_same_layer_same_tensor_in_eval_and_analysis(model, photos):
    """For every layer k, the feature ``kamim linprobe`` trains on (``extract_features``) is exactly the
    pooled tensor ``kamim-analyze`` captures at layer k (its CKA samples), for every pooling the model has."""
    x = _images(photos, model)
    g = model_geometry(model)
    got = capture(model, x, block_output=True)
    assert num_layers(model) == g.depth == len(got.block_output) == (6 if isinstance(g, ViTGeometry) else 5)
    for pool in ("avg", "cls") if g.has_class_token else ("avg",):
        feats = extract_features(model, x, "all", pool=pool)
        assert sorted(feats) == sorted(got.block_output) == list(range(1, g.depth + 1))
        for k, f in feats.items():
            analysed = pool_features(got.tokens(k), g.num_prefix_tokens, pool, g.has_class_token)
            assert torch.equal(f, analysed), (pool, k)
    for k in range(1, g.depth + 1):
        assert torch.equal(layer_features(model, x, k, pool=None)[k], got.tokens(k))


def test_layer_columns_name_the_block_and_the_swin_stage(vit, swin):
    assert [layer_columns(vit, k) for k in (1, 6)] == [{"layer": 1}, {"layer": 6}]
    assert [layer_columns(swin, k)["stage"] for k in range(1, 6)] == [1, 2, 3, 3, 4]
    assert layer_columns(model_geometry(swin), 4) == {"layer": 4, "stage": 3}
    with pytest.raises(ValueError, match="out of range"):
        layer_columns(swin, 6)


@torch.no_grad()
def test_swin_stage_is_forward_intermediates_stage(swin, photos):
    x = _images(photos, swin)
    g = model_geometry(swin)
    assert isinstance(g, SwinGeometry) and g.stage_depths == (1, 1, 2, 1)
    stages = swin.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)  # NCHW
    spec = ",".join(f"stage:{s}" for s in range(1, 5))
    feats = layer_features(swin, x, spec, pool=None)
    assert sorted(feats) == [1, 2, 4, 5] == [g.stage_layer(s) for s in range(1, 5)]
    for layer, ref in zip(sorted(feats), stages):
        torch.testing.assert_close(feats[layer], ref.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert [g.stage_of(k) for k in range(6)] == [0, 1, 2, 3, 3, 4]
    assert [g.layer_dim(k) for k in range(6)] == [32, 32, 64, 128, 128, 256]
    assert g.layer_grid(4) == (6, 6) and g.layer_grid(0) == (24, 24)
    assert default_layer(swin) == 5 and resolve_layers(swin, "last") == [5]


def test_layer_spec_errors(vit, swin):
    with pytest.raises(ValueError, match="has no stages"):
        resolve_layers(vit, "stage:1")
    with pytest.raises(ValueError, match=r"has 4 stages \(stage:1\.\.stage:4\)"):
        resolve_layers(swin, "stage:0")
    with pytest.raises(ValueError, match="stage:K"):
        resolve_layers(swin, "stage:x")
    assert default_layer(vit) == 4  # round(2 * 6 / 3)


def test_pool_names(vit, swin, photos):
    x = _images(photos, vit)
    with torch.no_grad():
        cls = layer_features(vit, x, 2, pool="cls")[2]
        torch.testing.assert_close(cls, capture(vit, x, block_output=[2]).block_output[2][:, 0], rtol=0, atol=0)
    for old, new in (("mean", "avg"), ("token", "cls")):
        with pytest.raises(ValueError, match=f"pool '{old}' is now called '{new}' \\(pooling names: avg, cls\\)"):
            layer_features(vit, x, 1, pool=old)
    with pytest.raises(ValueError, match="needs a class token but SwinTransformer has none"):
        layer_features(swin, _images(photos, swin), 1, pool="cls")


@pytest.mark.parametrize("size, hw", [(8, (8, 8)), ((3, 5), (3, 5)), ([4, 2], (4, 2)), (torch.Size([2, 6]), (2, 6))])
def test_to_hw(size, hw):
    assert to_hw(size) == hw


@pytest.mark.parametrize("bad", [0, -3, (4, 0), (1, 2, 3), 2.5, "8", None, True, (True, 2)])
def test_to_hw_refuses(bad):
    with pytest.raises(ValueError, match="size must be a positive int or an \\(H, W\\) pair"):
        to_hw(bad)


def test_geometry_of_non_square_and_register_vit():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=(8, 4),
                              embed_dim=24, depth=3, num_heads=3, reg_tokens=3, num_classes=0)
    g = model_geometry(model)
    assert g == ViTGeometry(img_size=(32, 48), patch_size=(8, 4), grid=(4, 12), num_prefix_tokens=4, depth=3,
                            num_heads=3, embed_dim=24, has_class_token=True)
    assert g.num_tokens == 52 and g.layer_dim(3) == 24
    no_cls = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24,
                               depth=2, num_heads=3, class_token=False, global_pool="avg", num_classes=0)
    assert model_geometry(no_cls).num_prefix_tokens == 0 and not model_geometry(no_cls).has_class_token


def test_unwrap_wrappers(vit):
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = vit

    assert unwrap(Wrapper()) is vit and unwrap(torch.compile(vit)) is vit
    with pytest.raises(TypeError, match="got Linear"):
        unwrap(torch.nn.Linear(2, 2))


def test_loaded_encoder_carries_geometry(swin, vit):
    enc = encoder_from_module(swin)
    assert enc.geometry == model_geometry(swin) and enc.format == "module" and enc.source == "SwinTransformer"
    assert (enc.image_size, enc.patch_size, enc.num_prefix_tokens, enc.sha256, enc.report) == ((96, 96), 4, 0,
                                                                                              None, {})
    loaded = load_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, drop_path_rate=0.3)
    assert loaded.geometry.depth == 2 and loaded.geometry.grid == (4, 4)
    assert loaded.model.blocks[1].drop_path2.drop_prob == pytest.approx(0.3)
    frozen = resolve_encoder(vit, "cpu")
    assert frozen.model is vit and not any(p.requires_grad for p in vit.parameters())
    copied = resolve_encoder(swin, "cpu", frozen=False)
    assert copied.model is not swin and copied.geometry == model_geometry(swin)
