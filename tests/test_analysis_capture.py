"""Capture of attention / tokens from timm ViTs (and Swin block outputs)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from analysis.capture import SwinGeometry, ViTCapture, ViTGeometry, capture, model_geometry

from analysis_models import photo_batch, tiny_vit


def images(photos, n=2, size=32):
    return photo_batch(photos.values(), n=n, size=size)


def test_geometry_read_from_model():
    g = ViTGeometry.from_model(tiny_vit(reg_tokens=4, img_size=(32, 48)))
    assert g.img_size == (32, 48) and g.patch_size == (8, 8) and g.grid == (4, 6)
    assert g.num_prefix_tokens == 5 and g.has_class_token and g.depth == 3 and g.num_heads == 2 and g.embed_dim == 32
    assert g.num_tokens == 5 + 24
    g = ViTGeometry.from_model(tiny_vit(class_token=False, global_pool="avg"))
    assert g.num_prefix_tokens == 0 and not g.has_class_token
    d = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=2)
    assert ViTGeometry.from_model(d).num_prefix_tokens == 2


def _manual_block(block, x):
    """Attention probabilities, norm1 output, attention output and block output written out by hand."""
    xn = F.layer_norm(x, block.norm1.normalized_shape, block.norm1.weight, block.norm1.bias, block.norm1.eps)
    attn = block.attn
    b, n, c = xn.shape
    qkv = (xn @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (c // attn.num_heads) ** 0.5, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c) @ attn.proj.weight.T + attn.proj.bias
    y = x + out
    y = y + block.mlp(block.norm2(y))
    return probs, xn, out, y


@pytest.mark.parametrize("kw", [dict(), dict(reg_tokens=4), dict(class_token=False, global_pool="avg")])
def test_captured_tensors_equal_hand_computation(photos, kw):
    model = tiny_vit(**kw)
    x = images(photos)
    with torch.no_grad():
        emb = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    got = capture(model, x, attention=True, pre_attention=True, post_attention=True, block_output=True, embedding=True)
    torch.testing.assert_close(got.embedding, emb)
    h = emb
    for layer in range(1, 4):
        with torch.no_grad():
            probs, xn, out, h = _manual_block(model.blocks[layer - 1], h)
        torch.testing.assert_close(got.attention[layer], probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.pre_attention[layer], xn, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.post_attention[layer], out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.block_output[layer], h, atol=1e-5, rtol=1e-4)
    assert got.attention[1].shape == (2, 2, model.num_prefix_tokens + 16, model.num_prefix_tokens + 16)


def test_model_left_exactly_as_found(photos):
    model = tiny_vit(reg_tokens=4)
    model.train()
    model.blocks[1].eval()  # mixed flags must come back as they were
    fused = [b.attn.fused_attn for b in model.blocks]
    model.blocks[0].attn.fused_attn = not fused[0]
    fused[0] = not fused[0]
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, images(photos), attention=True, pre_attention=[2], post_attention=[3], embedding=True)
    assert [b.attn.fused_attn for b in model.blocks] == fused
    assert {n: m.training for n, m in model.named_modules()} == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    # hooks also removed when the forward fails inside the context
    with pytest.raises(ValueError, match="expects"):
        with ViTCapture(model, attention=True) as cap:
            cap(torch.zeros(1, 3, 16, 16))
    assert all(not m._forward_hooks for m in model.modules())
    assert [b.attn.fused_attn for b in model.blocks] == fused


def test_stop_early_and_selected_layers(photos):
    model = tiny_vit(depth=4)
    calls = []
    handle = model.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = capture(model, images(photos), attention=[2], block_output=[1])
    finally:
        handle.remove()
    assert sorted(got.attention) == [2] and sorted(got.block_output) == [1] and got.embedding is None
    assert not calls  # blocks after the last requested one are not run


def test_bad_requests(photos):
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"attention layer 4 out of range: expected an int in \[1, 3\]"):
        capture(model, images(photos), attention=[4])
    with pytest.raises(ValueError, match=r"out of range"):
        capture(model, images(photos), block_output=[0])
    with pytest.raises(ValueError, match="nothing to capture"):
        capture(model, images(photos))
    with pytest.raises(ValueError, match=r"\(16, 16\) px but the model expects \(32, 32\)"):
        capture(model, torch.zeros(1, 3, 16, 16), attention=True)
    with pytest.raises(ValueError, match="images have 1 channels but the model expects 3"):
        capture(model, torch.zeros(1, 1, 32, 32), attention=True)
    with pytest.raises(TypeError, match="VisionTransformer"):
        capture(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="layer 4 out of range"):
        ViTGeometry.from_model(model).check_layer(4)


def test_swin_block_outputs(photos):
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(2, 2), num_heads=(2, 2))
    g = model_geometry(swin)
    assert isinstance(g, SwinGeometry) and g.depth == 4 and g.stage_grids == ((8, 8), (4, 4))
    assert g.layer_grid(2) == (8, 8) and g.layer_grid(3) == (4, 4)
    x = images(photos)
    got = capture(swin, x, block_output=True, embedding=True)
    assert got.block_output[2].shape == (2, 64, 16) and got.block_output[4].shape == (2, 16, 32)
    swin.eval()  # drop_path is active in train mode
    with torch.no_grad():
        ref = swin.forward_features(x)  # last block output, then the final norm
    torch.testing.assert_close(swin.norm(got.block_output[4].reshape(2, 4, 4, 32)), ref)
    with pytest.raises(ValueError, match="block_output and embedding only"):
        capture(swin, x, attention=True)
    assert all(not m._forward_hooks for m in swin.modules())
