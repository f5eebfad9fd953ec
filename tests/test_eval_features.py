"""Features from any layer: parity with a manual block-by-block forward (ViT and Swin), layer specs, bad input."""
from __future__ import annotations

import pytest
import timm
import torch

from kamim.eval.features import (
    check_input_size, default_layer, extract_features, feature_dims, num_layers, resolve_layers,
)


@pytest.fixture(scope="module")
def vit():
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4,
        num_heads=2, num_classes=0, reg_tokens=1,
    ).eval()


@pytest.fixture(scope="module")
def swin():
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2, embed_dim=16,
        depths=(2, 1, 2), num_heads=(1, 2, 2), num_classes=0,
    ).eval()


def _manual_tokens(model, x, upto):
    """Block outputs computed by hand: embed, then blocks[0..upto-1], no final norm."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:upto]:
        t = blk(t)
    return t


@torch.no_grad()
def test_vit_avg_and_cls_match_manual_forward(vit):
    x = torch.randn(3, 3, 32, 32)
    feats = extract_features(vit, x, "all")
    assert sorted(feats) == [1, 2, 3, 4]
    npre = vit.num_prefix_tokens
    assert npre == 2  # class + register token: both dropped from the average
    for k in (1, 3, 4):
        tokens = _manual_tokens(vit, x, k)
        torch.testing.assert_close(feats[k], tokens[:, npre:].mean(1))
        torch.testing.assert_close(extract_features(vit, x, k, pool="cls")[k], tokens[:, 0])
    # norm=True applies the final norm to the block output before pooling
    torch.testing.assert_close(
        extract_features(vit, x, 4, norm=True)[4], vit.norm(_manual_tokens(vit, x, 4))[:, npre:].mean(1)
    )


@torch.no_grad()
def test_swin_block_features(swin):
    """Swin layers are blocks counted across stages (2 + 1 + 2 = 5); 'stage:K' is the stage's last block."""
    x = torch.randn(2, 3, 32, 32)
    feats = extract_features(swin, x, "all")
    dims = {1: 16, 2: 16, 3: 32, 4: 64, 5: 64}
    assert {k: v.shape[1] for k, v in feats.items()} == feature_dims(swin, range(1, 6)) == dims
    t = swin.patch_embed(x)  # NHWC
    blocks = [blk for stage in swin.layers for blk in stage.blocks]
    for k, stage in ((1, 0), (2, 0), (3, 1), (4, 2), (5, 2)):
        t = blocks[k - 1](swin.layers[stage].downsample(t) if k in (3, 4) else t)
        torch.testing.assert_close(feats[k], t.mean(dim=(1, 2)))
    stages = extract_features(swin, x, "stage:1,stage:2,stage:3")
    assert sorted(stages) == [2, 3, 5]
    for k in stages:
        torch.testing.assert_close(stages[k], feats[k])
    with pytest.raises(ValueError, match="class token"):
        extract_features(swin, x, 1, pool="cls")


def test_layer_specs(vit, swin):
    assert num_layers(vit) == 4 and num_layers(swin) == 5
    assert default_layer(vit) == 3  # 2/3 depth, i.e. block 8 of 12 for ViT-B
    assert default_layer(swin) == 5  # the last block (= the last stage)
    assert resolve_layers(swin, "stage:2, 1") == [1, 3] and resolve_layers(swin, ["stage:3"]) == [5]
    assert resolve_layers(vit, "all") == [1, 2, 3, 4]
    assert resolve_layers(vit, "last") == resolve_layers(vit, -1) == [4]
    assert resolve_layers(vit, "1, 3,-1") == [1, 3, 4]
    assert resolve_layers(vit, [2, 2]) == [2]
    assert resolve_layers(vit, None) == [3]


@pytest.mark.parametrize("bad", [0, 5, -5, "1,9"])
def test_layer_out_of_range_names_valid_range(vit, bad):
    with pytest.raises(ValueError, match=r"valid layers are 1\.\.4 \(or -4\.\.-1\)"):
        resolve_layers(vit, bad)


def test_bad_specs_and_geometry(vit):
    with pytest.raises(ValueError, match="layer spec 'eight'"):
        resolve_layers(vit, "eight")
    with pytest.raises(ValueError, match="pool 'max'"):
        extract_features(vit, torch.randn(1, 3, 32, 32), 1, pool="max")
    with pytest.raises(ValueError, match=r"3x48x48 but the model expects 3x32x32"):
        extract_features(vit, torch.randn(1, 3, 48, 48), 1)
    with pytest.raises(ValueError, match=r"1x32x32 but the model expects 3x32x32"):
        check_input_size(vit, (1, 1, 32, 32))
    no_cls = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                               depth=2, num_heads=2, num_classes=0, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        extract_features(no_cls, torch.randn(1, 3, 32, 32), 1, pool="cls")
    with pytest.raises(ValueError, match="expected a timm VisionTransformer or SwinTransformer"):
        num_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has no stages"):
        resolve_layers(vit, "stage:1")


def test_stage_out_of_range(swin):
    with pytest.raises(ValueError, match=r"has 3 stages \(stage:1\.\.stage:3\)"):
        resolve_layers(swin, "stage:4")
    with pytest.raises(ValueError, match=r"valid layers are 1\.\.5 \(or -5\.\.-1\) or stage:1\.\.stage:3"):
        resolve_layers(swin, 6)
