"""Tests of kamim.models: SimMIM/KAMIM adaptors over timm ViT and Swin, MoCo v3, presets."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms import v2

from kamim.loss import reconstruction_loss
from kamim.models import PRESETS, MoCoV3, SimMIM, create_encoder, create_pretrain_model
from kamim.models import moco as moco_module

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def tiny_vit(img_size=32, patch_size=8, **kw) -> VisionTransformer:
    args = dict(embed_dim=32, depth=2, num_heads=2, num_classes=0)
    args.update(kw)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, **args).eval()


def tiny_swin(img_size=64) -> SwinTransformer:
    return SwinTransformer(
        img_size=img_size, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2), num_classes=0,
    ).eval()


def photo_batch(photos, size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    """``n`` normalised random crops of real photographs."""
    torch.manual_seed(seed)
    tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    imgs = list(photos.values())
    out = torch.stack([tf(imgs[i % len(imgs)]) for i in range(n)])
    return (out - MEAN) / STD


def ref_loss(pred, target, mask, weights=None):
    """Reference KAMIM/SimMIM loss written from ANCHORS: sum(|w x - w x^|*mask) / (sum(mask)+1e-5) / C."""
    b, c, h, w = target.shape
    up = lambda t: torch.nn.functional.interpolate(t[:, None].float(), size=(h, w), mode="nearest")
    m = up(mask)
    wt = up(weights) if weights is not None else torch.ones_like(m)
    return ((wt * target - wt * pred).abs() * m).sum() / (m.sum() + 1e-5) / c


# ----------------------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize(
    "img_size,patch,kw",
    [
        (32, 8, {}),  # CLS
        (32, 8, {"class_token": False, "global_pool": "avg"}),  # no prefix token
        (48, 16, {"reg_tokens": 4}),  # CLS + 4 registers, patch 16
        ((32, 48), 8, {"reg_tokens": 1, "no_embed_class": True}),  # non-square, deit3-style pos embed
        (40, 8, {"dynamic_img_size": True}),  # NHWC patch embed path
    ],
)
def test_vit_shapes_and_timm_parity(img_size, patch, kw):
    vit = tiny_vit(img_size, patch, **kw)
    model = SimMIM(vit, encoder_stride=patch).eval()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, h, w)
    zero = torch.zeros(2, h // patch, w // patch, dtype=torch.bool)
    with torch.no_grad():
        feats = model.backbone(x, zero)
        ref = vit.forward_features(x)[:, vit.num_prefix_tokens:]
        out = model({"image": x, "mask": zero | torch.rand(zero.shape).gt(0.5)})
    assert feats.shape == (2, 32, h // patch, w // patch)
    # all-zero mask: exactly timm's own forward_features without the prefix tokens
    assert torch.equal(feats.flatten(2).transpose(1, 2), ref)
    assert out["pred"].shape == (2, 3, h, w) and out["pred"].dtype == torch.float32
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_vit_masked_pixels_do_not_matter_and_token_is_used():
    vit = tiny_vit(32, 8, reg_tokens=2)
    model = SimMIM(vit).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 3, 0] = mask[1, 0, 0] = True
    x2 = x.clone()
    x2[0, :, 8:16, 16:24] = torch.randn(3, 8, 8) * 5  # inside masked patch (1, 2) of image 0
    x2[1, :, 0:8, 0:8] = 0.0  # inside masked patch (0, 0) of image 1
    x3 = x.clone()
    x3[0, :, 0:8, 0:8] += 1.0  # inside an unmasked patch
    # tokens entering the position embedding: captured at patch_drop's input (after _pos_embed)
    seen = {}
    vit.patch_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach()))
    with torch.no_grad():
        f = model.backbone(x, mask)
        tok = seen["x"][:, vit.num_prefix_tokens:] - vit.pos_embed[:, vit.num_prefix_tokens:]
        f2 = model.backbone(x2, mask)
        f3 = model.backbone(x3, mask)
    assert torch.equal(f, f2)  # masked pixels have no influence anywhere
    assert not torch.allclose(f, f3)  # unmasked pixels do
    flat = mask.flatten(1)
    torch.testing.assert_close(tok[flat], model.backbone.mask_token[0].expand(int(flat.sum()), -1))
    unmasked = vit.patch_embed(x)[~flat]
    torch.testing.assert_close(tok[~flat], unmasked)


def test_mask_on_coarser_grid_equals_upsampled_mask():
    model = SimMIM(tiny_vit(64, 8)).eval()
    x = torch.randn(2, 3, 64, 64)
    coarse = torch.rand(2, 2, 2) > 0.5  # 32 px mask patches on an 8 px token grid
    fine = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    with torch.no_grad():
        a = model({"image": x, "mask": coarse.to(torch.uint8)})
        b = model({"image": x, "mask": fine})
    assert torch.equal(a["pred"], b["pred"])
    torch.testing.assert_close(a["loss"], b["loss"])


# ---------------------------------------------------------------------------------------------- Swin


def test_swin_shapes_stride_and_masking():
    swin = tiny_swin(64)
    model = SimMIM(swin).eval()
    assert model.encoder_stride == 32 == 4 * 2 ** (len(swin.layers) - 1)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, 16) > 0.5  # patch-embed grid H/4
    x2 = x.clone()
    ij = mask[0].nonzero()[0]
    x2[0, :, 4 * ij[0]:4 * ij[0] + 4, 4 * ij[1]:4 * ij[1] + 4] += 3.0
    with torch.no_grad():
        feats = model.backbone(x, mask)
        feats2 = model.backbone(x2, mask)
        ref = swin.forward_features(x).permute(0, 3, 1, 2)
        nomask = model.backbone(x, torch.zeros_like(mask))
        out = model({"image": x, "mask": (torch.rand(2, 2, 2) > 0.5)})  # 32 px mask grid also accepted
    assert feats.shape == (2, swin.num_features, 2, 2)
    assert torch.equal(feats, feats2)
    assert torch.equal(nomask, ref)
    assert out["pred"].shape == (2, 3, 64, 64)


# ------------------------------------------------------------------------------------------- losses


def test_simmim_and_kamim_losses_match_reference():
    model = SimMIM(tiny_vit(32, 8), temperature=None).eval()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.rand(3, 4, 4) > 0.4
    density = torch.rand(3, 4, 4).half()  # w_ps = 8
    with torch.no_grad():
        out = model({"image": x, "mask": mask, "density": density})  # SimMIM ignores density
        assert torch.allclose(out["loss"], reconstruction_loss(out["pred"], x, mask.float()), atol=0, rtol=1e-6)
        assert torch.allclose(out["loss"], ref_loss(out["pred"], x, mask), rtol=1e-5)
        model.temperature = 0.25
        kam = model({"image": x, "mask": mask, "density": density})
        w = torch.exp(density.float() / 0.25)
        w = w / w.flatten(1).min(1).values.view(-1, 1, 1)
        assert torch.allclose(kam["loss"], ref_loss(kam["pred"], x, mask, w), rtol=1e-5)
        assert kam["loss"] > out["loss"]  # weights >= 1 raise the loss scale (reference, not renormalised)
        model.temperature = 1e9
        huge = model({"image": x, "mask": mask, "density": density})
    torch.testing.assert_close(huge["loss"], out["loss"])


def test_kamim_needs_density_and_bf16_loss_is_float32():
    model = SimMIM(tiny_vit(32, 8), temperature=0.5)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 4, 4) > 0.5
    with pytest.raises(ValueError, match="density"):
        model({"image": x, "mask": mask})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"image": x, "mask": mask, "density": torch.rand(2, 2, 2)})  # w_ps 16
    assert out["loss"].dtype == torch.float32 and out["pred"].dtype == torch.float32
    out["loss"].backward()
    assert model.backbone.mask_token.grad is not None and model.backbone.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "batch,match",
    [
        ({"image": torch.randn(2, 3, 40, 40), "mask": torch.zeros(2, 4, 4)}, "img_size"),
        ({"image": torch.randn(2, 1, 32, 32), "mask": torch.zeros(2, 4, 4)}, r"\(B, 3, H, W\)"),
        ({"image": torch.randn(2, 3, 32, 32), "mask": torch.zeros(2, 3, 3)}, "divide"),
        ({"image": torch.randn(2, 3, 32, 32), "mask": torch.zeros(3, 4, 4)}, "batch size"),
        ({"image": torch.randn(2, 3, 32, 32), "mask": torch.zeros(2, 16)}, r"\(B, h, w\)"),
        ({"image": torch.randn(2, 3, 32, 32)}, "mask"),
    ],
)
def test_bad_batches_raise_one_line_errors(batch, match):
    with pytest.raises(ValueError, match=match):
        SimMIM(tiny_vit(32, 8))(batch)


def test_bad_construction():
    with pytest.raises(ValueError, match="encoder_stride=16"):
        SimMIM(tiny_vit(32, 8), encoder_stride=16)
    with pytest.raises(TypeError, match="VisionTransformer and SwinTransformer"):
        SimMIM(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="patch_drop"):
        SimMIM(tiny_vit(32, 8, patch_drop_rate=0.5))
    with pytest.raises(ValueError, match="temperature"):
        SimMIM(tiny_vit(32, 8), temperature=0.0)
    with pytest.raises(ValueError, match="loss_normalize"):
        SimMIM(tiny_vit(32, 8), loss_normalize="sum")


# ------------------------------------------------------------------------------------ presets/export


@pytest.mark.parametrize("method,arch", [("kamim", "vit_pico"), ("simmim", "swin_pico"), ("moco", "vit_pico")])
def test_encoder_export_round_trip(method, arch):
    model = create_pretrain_model(method, arch, kamim={"temperature": 0.25}).eval()
    spec = json.loads(json.dumps(model.encoder_spec))  # survives JSON/YAML
    assert spec["kwargs"]["img_size"] == 96 and spec["kwargs"]["num_classes"] == 0
    assert "patch_size" in spec["kwargs"]
    fresh = timm.create_model(spec["model_name"], **spec["kwargs"]).eval()
    fresh.load_state_dict(model.encoder.state_dict(), strict=True)
    prefix = model.encoder_prefix
    full = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    assert full.keys() == fresh.state_dict().keys()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x), model.encoder.forward_features(x))
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and all(n in names for n in model.no_weight_decay())


def test_presets_match_paper_geometry():
    for arch, (dim, depth) in {"vit_t": (192, 12), "vit_s": (384, 12), "vit_b": (768, 12)}.items():
        with torch.device("meta"):
            enc, spec = create_encoder(arch)
        assert (enc.embed_dim, len(enc.blocks), enc.patch_embed.grid_size) == (dim, depth, (12, 12))
        assert spec["kwargs"]["img_size"] == 192 and spec["kwargs"]["patch_size"] == 16
    with torch.device("meta"):
        swin, spec = create_encoder("swin_t")
    assert spec["kwargs"]["window_size"] == 6 and swin.feature_info[-1]["reduction"] == 32
    pico, _ = create_encoder("vit_pico")
    assert pico.patch_embed.grid_size == (12, 12)
    enc, spec = create_encoder("vit_pico", img_size=64, reg_tokens=4)
    assert enc.patch_embed.grid_size == (8, 8) and spec["kwargs"]["reg_tokens"] == 4


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown arch 'vit_xl'.*vit_t.*swin_pico"):
        create_encoder("vit_xl")
    with pytest.raises(ValueError, match="unknown method 'mae'.*simmim, kamim, moco"):
        create_pretrain_model("mae", "vit_pico")
    with pytest.raises(ValueError, match="unknown arch"):
        create_pretrain_model("simmim", "resnet50")
    with pytest.raises(ValueError, match="temperature"):
        create_pretrain_model("kamim", "vit_pico")
    with pytest.raises(ValueError, match="ViT arch"):
        create_pretrain_model("moco", "swin_pico")
    assert set(PRESETS) >= {"vit_t", "vit_s", "vit_b", "swin_t", "swin_b", "vit_pico", "swin_pico"}
    assert create_pretrain_model("simmim", "vit_pico", kamim={"temperature": 0.25}).temperature is None
    with pytest.raises(ValueError, match="unknown kamim setting"):
        create_pretrain_model("kamim", "vit_pico", kamim={"temperature": 0.25, "T": 1})
    with pytest.raises(ValueError, match="needs kamim="):  # method settings are not timm kwargs
        create_pretrain_model("kamim", "vit_pico", temperature=0.25)
    with pytest.raises(TypeError, match="temperature"):
        create_pretrain_model("simmim", "vit_pico", temperature=0.25)


def test_moco_heads_come_from_the_settings_alone():
    model = create_pretrain_model("moco", "vit_pico", moco={"temperature": 0.1, "dim": 32})
    assert model.temperature == 0.1
    assert model.projector[-2].out_features == 32 and model.projector[0].in_features == 96
    assert model.predictor[0].out_features == 4096  # MoCo v3's mlp_dim: presets hold no method settings
    assert all("moco" not in p for p in PRESETS.values())
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine


def test_kamim_trains_on_photographs(photos):
    model = SimMIM(tiny_vit(32, 4), temperature=0.25)
    x = photo_batch(photos, 32, n=4)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 2, 2, generator=g) > 0.4  # 16 px mask patches on the 4 px token grid
    mask[:, 0, 0] = True
    batch = {"image": x, "mask": mask, "density": torch.rand(4, 4, 4, generator=g)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(12):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------------------------- MoCo


def tiny_moco(**kw) -> MoCoV3:
    vit = tiny_vit(32, 8)
    return MoCoV3(vit, {"model_name": "vit_tiny_patch16_224", "kwargs": {}}, dim=16, mlp_dim=64, **kw)


def test_moco_sincos_frozen_and_correct():
    model = tiny_moco()
    pe = model.encoder.pos_embed
    assert not pe.requires_grad and not model.momentum_encoder.pos_embed.requires_grad
    assert torch.equal(pe[0, 0], torch.zeros(32))  # CLS slot
    # independent formula: token (i, j) -> [sin(i w), sin(j w), cos(i w), cos(j w)], w_k = 1e4^(-k/(D/4))
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    rows = []
    for i in range(4):
        for j in range(4):
            a, b = i * omega, j * omega
            rows.append(torch.cat([torch.sin(a), torch.sin(b), torch.cos(a), torch.cos(b)]))
    torch.testing.assert_close(pe[0, 1:].double(), torch.stack(rows), atol=1e-6, rtol=0)
    model({"view1": torch.randn(4, 3, 32, 32), "view2": torch.randn(4, 3, 32, 32)})["loss"].backward()
    assert pe.grad is None
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert model.predictor[0].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.parameters())


def test_moco_loss_matches_reference_formula():
    model = tiny_moco(temperature=0.3).eval()  # eval: BN uses running stats, so reruns are deterministic
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        loss = model({"view1": v1, "view2": v2})["loss"]
        q1, q2 = (model.predictor(model.projector(model.encoder(v))) for v in (v1, v2))
        k1, k2 = (model.momentum_projector(model.momentum_encoder(v)) for v in (v1, v2))

    def ctr(q, k):
        q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
        logits = q @ k.T / 0.3
        return -(logits.diagonal() - logits.logsumexp(dim=1)).mean() * 0.6

    torch.testing.assert_close(loss, ctr(q1, k2) + ctr(q2, k1))


def test_moco_gathers_keys_across_ranks(monkeypatch):
    """With a (faked) 2-rank group, logits span all keys and labels are offset by rank * batch."""
    model = tiny_moco()
    q, k, k_other = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)

    class FakeDist:
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        get_world_size = staticmethod(lambda: 2)
        get_rank = staticmethod(lambda: 1)

        @staticmethod
        def all_gather(out, x):
            out[0].copy_(torch.nn.functional.normalize(k_other, dim=1))  # rank 0 normalises its own keys
            out[1].copy_(x)

    monkeypatch.setattr(moco_module, "dist", FakeDist)
    loss = model.contrastive_loss(q, k)
    qn = torch.nn.functional.normalize(q, dim=1)
    kn = torch.nn.functional.normalize(torch.cat([k_other, k]), dim=1)
    ref = torch.nn.functional.cross_entropy(qn @ kn.T / 0.2, torch.arange(3) + 3) * 0.4
    torch.testing.assert_close(loss, ref)


def test_moco_momentum_schedule_and_update():
    model = tiny_moco(momentum=0.9)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(0.1)
    online = [p.detach().clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    momentum = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    before = [p.detach().clone() for p in momentum]
    model.on_after_optimizer_step(25, 100)
    m = 1 - 0.1 * (math.cos(math.pi * 0.25) + 1) / 2
    assert model.current_momentum == pytest.approx(m)
    after = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    for a, b, o in zip(after, before, online):
        torch.testing.assert_close(a, m * b + (1 - m) * o)
    assert moco_module.moco_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert moco_module.moco_momentum(100, 100, 0.99) == 1.0
    snap = [p.detach().clone() for p in after]
    model.on_after_optimizer_step(100, 100)  # m = 1: no change
    assert all(torch.equal(a, s) for a, s in zip(after, snap))


def test_moco_trains_on_two_views_of_photographs(photos):
    model = tiny_moco()
    batch = {"view1": photo_batch(photos, 32, n=8, seed=1), "view2": photo_batch(photos, 32, n=8, seed=2)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(8):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_after_optimizer_step(step + 1, 8)
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05


def test_moco_rejects_bad_input():
    model = tiny_moco()
    with pytest.raises(ValueError, match="view2"):
        model({"view1": torch.randn(2, 3, 32, 32)})
    with pytest.raises(TypeError, match="VisionTransformer"):
        MoCoV3(tiny_swin(64), None)
    with pytest.raises(ValueError, match="divisible by 4"):
        MoCoV3(tiny_vit(32, 8, embed_dim=30, num_heads=2), None)


# ------------------------------------------------------------------------------------------- benches


def test_gpu_step_dry_run_counts_the_same_model_flops(capsys):
    """bench/gpu_step.py imports and runs its code path on the CPU; both models count the same FLOPs."""
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    gpu_step.main(["--dry-run"])
    out = capsys.readouterr().out
    ours, ref = map(float, re.search(r"ours ([\d.]+), reference ([\d.]+)", out).groups())
    # analytic count for vit_pico (96 px, patch 8, D 96, depth 6, MLP 4D), batch 2: forward matmul FLOPs
    # (2 per multiply-add), backward twice that except for the patch embedding (no input gradient)
    n, d, p = 12 * 12, 96, 8
    t = n + 1
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    embed, decoder = 2 * n * 3 * p * p * d, 2 * n * d * 3 * p * p
    expected = 2 * (3 * (6 * block + decoder) + 2 * embed) / 1e9
    assert ours == pytest.approx(expected, rel=0.02) and ref == pytest.approx(expected, rel=0.02)
    for name in ("reference_bf16", "ours_bf16", "kamim_bf16"):
        assert re.search(rf"^{name}\s+[\d.]+ img/s .* MFU", out, re.M)


def test_arch_of_names_the_preset_a_spec_builds_at_any_size():
    import json

    from kamim import arch_of

    for arch, spec in PRESETS.items():
        assert arch_of(spec) == arch
        stored = json.loads(json.dumps({**spec, "kwargs": {**spec["kwargs"], "img_size": 64, "num_classes": 0}}))
        assert arch_of(stored) == arch  # tuples read back from JSON as lists, another resolution
    assert arch_of({"model_name": "vit_tiny_patch16_224", "kwargs": {**PRESETS["vit_pico"]["kwargs"], "depth": 3}}) is None
    assert arch_of({"model_name": "resnet50", "kwargs": {}}) is None


def test_pretraining_initialisation_starts_from_timm_modes_and_sincos():
    from kamim.config import ConfigError, load_config
    from kamim.models import build_pretrain_model
    from kamim.models.factory import initialise_encoder
    from kamim.models.moco import sincos_pos_embed

    torch.manual_seed(0)
    model = create_pretrain_model("simmim", "vit_pico", init="jax", pos_embed_init="sincos")
    enc = model.encoder
    # the learned position embedding starts at the sin-cos table and stays trainable
    assert torch.equal(enc.pos_embed.detach(), sincos_pos_embed(enc)) and enc.pos_embed.requires_grad
    # timm's "jax" mode: xavier-uniform qkv (bound sqrt(6 / (96 + 288))) and zero biases
    w = enc.blocks[0].attn.qkv.weight.detach()
    bound = math.sqrt(6 / (96 + 288))
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(enc.blocks[0].attn.qkv.bias) == 0
    # timm's default start is untouched, and the spec records the architecture only
    torch.manual_seed(0)
    plain = create_pretrain_model("simmim", "vit_pico")
    assert plain.encoder.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.encoder_spec == plain.encoder_spec and "weight_init" not in model.encoder_spec["kwargs"]
    # the config reaches the factory; bad values are refused at load, one line, naming the key
    cfg = load_config("tiny_simmim", ["model.init=jax", "model.pos_embed_init=sincos"])
    assert torch.equal(build_pretrain_model(cfg).encoder.pos_embed.detach(), sincos_pos_embed(enc))
    for bad, key in ((["model.init=xavier"], "model.init='xavier'"),
                     (["model.pos_embed_init=rope"], "model.pos_embed_init='rope'"),
                     (["model.overrides={weight_init: jax}"], "model.overrides may not set weight_init")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config("tiny_simmim", bad)
    swin, _ = create_encoder("swin_pico")
    with pytest.raises(ValueError, match="needs a ViT with a learned position embedding"):
        initialise_encoder(swin, pos_embed_init="sincos")
    initialise_encoder(swin, init="jax")  # timm's Swin has the same init modes
