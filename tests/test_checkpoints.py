"""kamim.checkpoints.load_encoder: every supported layout, parity with the source models, errors."""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import yaml

from kamim.checkpoints import CheckpointError, load_encoder, load_manifest, resolve_source

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    SwinConfig, SwinForMaskedImageModeling, ViTConfig, ViTForMaskedImageModeling, ViTModel,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _images(photos: dict[str, np.ndarray], size: int) -> torch.Tensor:
    """Two real photographs, resized to ``size`` and ImageNet-normalised: (2, 3, size, size)."""
    x = torch.stack([
        F.interpolate(torch.from_numpy(photos[n]).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                      mode="bilinear", antialias=True)[0]
        for n in ("astronaut", "coffee")
    ])
    return (x - MEAN) / STD


def _tiny_vit(**kw) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _hf_legacy_state_dict(model, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The state dict as published files hold it (``save_pretrained`` writes the transformers<5 names)."""
    out = tmp_path / "hf_export"
    model.save_pretrained(out)
    return safetensors.torch.load_file(out / "model.safetensors")


def _timm_trace(model, x):
    """timm ViT: embeddings, every block's output, attention maps of every block, final features."""
    hidden, attn = [], []
    hooks = [model.norm_pre.register_forward_hook(lambda m, i, o: hidden.append(o))]
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: attn.append(o)))
        hooks.append(blk.register_forward_hook(lambda m, i, o: hidden.append(o)))
    with torch.no_grad():
        final = model.forward_features(x)
    for h in hooks:
        h.remove()
    return hidden, attn, final


def _assert_vit_parity(loaded, hf_vit, x, depth):
    with torch.no_grad():
        ref = hf_vit(x, output_hidden_states=True, output_attentions=True)
    hidden, attn, final = _timm_trace(loaded.model, x)
    assert len(hidden) == len(ref.hidden_states) == depth + 1
    assert len(attn) == len(ref.attentions) == depth
    for ours, theirs in zip(hidden, ref.hidden_states):  # CLS and patch tokens of every layer
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    for ours, theirs in zip(attn, ref.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(final, ref.last_hidden_state, atol=1e-4, rtol=0)


def _hf_vit_mim(image=32, patch=8, layers=3):
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                    image_size=image, patch_size=patch, encoder_stride=patch, attn_implementation="eager")
    return ViTForMaskedImageModeling(cfg).eval()


# --------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("layout", ["bare", "model_state_dict", "transformers5_names"])
def test_hf_vit_mim_parity(tmp_path, photos, layout):
    hf = _hf_vit_mim()
    legacy = _hf_legacy_state_dict(hf, tmp_path)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy  # the released key naming
    obj = {"bare": legacy, "model_state_dict": {"model_state_dict": legacy, "epoch": 99},
           "transformers5_names": hf.state_dict()}[layout]
    path = _save(obj, tmp_path / "kamim_vit.pth")
    enc = load_encoder(path, num_heads=4)
    assert enc.format == "hf-vit"
    assert (enc.image_size, enc.patch_size, enc.num_prefix_tokens) == ((32, 32), 8, 1)
    assert enc.model.norm.eps == 1e-12 and not enc.model.training
    assert sorted(enc.report["ignored"]) == ["decoder", "mask_token"]
    assert enc.report["ignored"]["mask_token"] == ["vit.embeddings.mask_token"]
    assert enc.report["loaded"] == len(enc.model.state_dict())
    assert enc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_vit_parity(enc, hf.vit, _images(photos, 32), depth=3)


def test_hf_vitmodel_with_pooler_and_directory(tmp_path, photos):
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    image_size=48, patch_size=16, attn_implementation="eager")
    hf = ViTModel(cfg, add_pooling_layer=True).eval()
    sd = _hf_legacy_state_dict(hf, tmp_path)
    assert "encoder.layer.1.output.dense.weight" in sd and "pooler.dense.weight" in sd  # no "vit." prefix
    enc = load_encoder(_save(sd, tmp_path / "vitmodel.bin"), num_heads=4)
    assert enc.report["ignored"] == {"pooler": ["pooler.dense.bias", "pooler.dense.weight"]}
    assert (enc.image_size, enc.patch_size) == ((48, 48), 16)
    _assert_vit_parity(enc, hf, _images(photos, 48), depth=2)
    # A save_pretrained directory: the heads come from config.json (width/64 would say 1 head).
    enc_dir = load_encoder(tmp_path / "hf_export")
    assert enc_dir.spec["kwargs"]["num_heads"] == 4
    _assert_vit_parity(enc_dir, hf, _images(photos, 48), depth=2)


def _rel_index(w: int) -> torch.Tensor:
    """Swin relative position index, written out independently of both libraries."""
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)


def test_hf_swin_mim_parity(tmp_path, photos):
    cfg = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4,
                     encoder_stride=8, attn_implementation="eager")
    hf = SwinForMaskedImageModeling(cfg).eval()
    sd = _hf_legacy_state_dict(hf, tmp_path)
    # transformers<5 files also hold the (derived) relative_position_index buffers.
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            sd[f"swin.encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index"] = _rel_index(4)
    enc = load_encoder(_save({"model_state_dict": sd}, tmp_path / "kamim_swin.pt"))
    assert enc.format == "hf-swin" and enc.spec["kwargs"]["window_size"] == 4
    assert enc.spec["kwargs"]["depths"] == (2, 2, 2) and enc.spec["kwargs"]["num_heads"] == (2, 2, 4)
    assert (enc.image_size, enc.patch_size, enc.num_prefix_tokens) == ((32, 32), 2, 0)
    assert enc.report["verified_buffers"] == 6 and sorted(enc.report["ignored"]) == ["decoder", "mask_token"]

    x = _images(photos, 32)
    ours_blocks, theirs_blocks, ours_down = [], [], []
    hooks = []
    for i, stage in enumerate(enc.model.layers):
        for blk in stage.blocks:
            hooks.append(blk.register_forward_hook(lambda m, a, o: ours_blocks.append(o.flatten(1, 2))))
        hooks.append(stage.downsample.register_forward_hook(lambda m, a, o: ours_down.append(o.flatten(1, 2))))
        for blk in hf.swin.encoder.layers[i].blocks:
            hooks.append(blk.register_forward_hook(
                lambda m, a, o: theirs_blocks.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        final = enc.model.forward_features(x)
        ref = hf.swin(x, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert len(ours_blocks) == len(theirs_blocks) == 6
    for ours, theirs in zip(ours_blocks, theirs_blocks):  # every block of every stage
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # HF's stage-N output (after its patch merging) is timm's stage-N+1 downsample output:
    # checks the 2x2 channel order of the patch merging.
    for ours, theirs in zip(ours_down[1:], ref.hidden_states[1:-1]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(final.flatten(1, 2), ref.last_hidden_state, atol=1e-4, rtol=0)

    sd["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = _rel_index(4).flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index"):
        load_encoder(_save(sd, tmp_path / "bad_index.pt"))


# ------------------------------------------------------------------------- timm-keyed third-party layouts
def _features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


def test_moco_v3_layout(tmp_path, photos):
    enc = _tiny_vit()
    sd = {f"module.base_encoder.{k}": v for k, v in enc.state_dict().items()}
    projector = {"head.0.weight": torch.randn(128, 64), "head.1.weight": torch.ones(128),
                 "head.1.running_mean": torch.zeros(128), "head.3.weight": torch.randn(32, 128)}
    sd.update({f"module.base_encoder.{k}": v for k, v in projector.items()})
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in {**enc.state_dict(), **projector}.items()})
    sd.update({"module.predictor.0.weight": torch.randn(128, 32), "module.predictor.3.weight": torch.randn(32, 128)})
    ckpt = {"epoch": 300, "arch": "vit_base", "state_dict": sd, "scaler": {"scale": 65536.0},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}}
    loaded = load_encoder(_save(ckpt, tmp_path / "vit-b-300ep.pth.tar"), num_heads=4)
    assert loaded.format == "moco-v3"
    ignored = loaded.report["ignored"]
    assert sorted(ignored) == ["momentum_encoder", "predictor", "projector"]
    assert len(ignored["projector"]) == 4 and len(ignored["momentum_encoder"]) == len(enc.state_dict()) + 4
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(enc, x), atol=1e-5, rtol=0)


def test_mae_layout_with_pickled_args(tmp_path, photos):
    enc = _tiny_vit()
    model = dict(enc.state_dict())
    model.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
                  "decoder_pos_embed": torch.zeros(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
                  "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(192, 32)})
    ckpt = {"model": model, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)}
    loaded = load_encoder(_save(ckpt, tmp_path / "mae_pretrain.pth"), num_heads=4)
    assert loaded.format == "mae"
    assert loaded.report["ignored"] == {"decoder": sorted(k for k in model if k.startswith("decoder_")),
                                        "mask_token": ["mask_token"]}
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(enc, x), atol=1e-5, rtol=0)


def test_dino_teacher_and_student(tmp_path, photos):
    teacher, student = _tiny_vit(), _tiny_vit()
    head = {"head.mlp.0.weight": torch.randn(128, 64), "head.last_layer.weight_g": torch.ones(256, 1)}
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "epoch": 100, "args": argparse.Namespace(arch="vit_small"), "dino_loss": {"center": torch.zeros(1, 256)},
    }
    path = _save(ckpt, tmp_path / "dino_full.pth")
    x = _images(photos, 32)
    t = load_encoder(path, num_heads=4)
    assert t.format == "dino" and t.report["ignored"] == {"dino_head": sorted(head)}
    torch.testing.assert_close(_features(t.model, x), _features(teacher, x), atol=1e-5, rtol=0)
    s = load_encoder(path, num_heads=4, checkpoint_key="student")
    torch.testing.assert_close(_features(s.model, x), _features(student, x), atol=1e-5, rtol=0)
    assert not torch.allclose(_features(t.model, x), _features(s.model, x))


def test_plain_timm_standard_name_inferred(tmp_path, photos):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            weight_init="skip").eval()
    with torch.no_grad():  # random weights without timm's (slow) truncated-normal init
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.05 * torch.randn_like(p))
    loaded = load_encoder(_save(ref.state_dict(), tmp_path / "dino_deitsmall.pth"))
    assert loaded.format == "timm-vit" and loaded.spec["model_name"] == "vit_tiny_patch16_224"
    assert loaded.spec["kwargs"]["num_heads"] == 3  # 192 / standard head dim 64
    assert any("num_heads=3" in n for n in loaded.report["notes"])
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(ref, x), atol=1e-5, rtol=0)


def test_plain_timm_gap_fc_norm_classifier_dropped(tmp_path, photos):
    ref = _tiny_vit(global_pool="avg", num_classes=10)
    assert "fc_norm.weight" in ref.state_dict() and "norm.weight" not in ref.state_dict()
    loaded = load_encoder(_save({"model": ref.state_dict()}, tmp_path / "finetuned.pth"), num_heads=4)
    assert loaded.report["ignored"] == {"classifier": ["head.bias", "head.weight"]}
    x = _images(photos, 32)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        got = loaded.model(x)
    assert got.shape == (2, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_plain_timm_state_dict_of_named_model(tmp_path, photos):
    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), window_size=4)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, num_heads=(2, 4), **kw)
    path = _save({"state_dict": ref.eval().state_dict()}, tmp_path / "swin.pth")
    with pytest.raises(CheckpointError, match="pass model_name="):
        load_encoder(path)
    loaded = load_encoder(path, model_name="swin_tiny_patch4_window7_224", num_heads=(2, 4), **kw)
    assert loaded.format == "timm" and loaded.spec["kwargs"]["num_heads"] == (2, 4)
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(ref, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- own formats
@pytest.mark.parametrize("prefix", ["encoder.", "backbone.encoder."])
def test_own_training_checkpoint(tmp_path, photos, prefix):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    enc = _tiny_vit()
    parent = prefix[: -len("encoder.")]
    model = {f"{prefix}{k}": v for k, v in enc.state_dict().items()}
    model.update({f"{parent}mask_token": torch.zeros(1, 1, 64), "decoder.0.weight": torch.randn(192, 64, 1, 1),
                  "decoder.0.bias": torch.zeros(192)})
    ckpt = {"format": "kamim-pretrain", "version": 1, "model": model, "method": "kamim",
            "encoder_spec": {"model_name": "vit_tiny_patch16_224", "kwargs": kwargs},
            "config": {"method": "kamim", "temperature": 0.25, "w_ps": 8}, "epoch": 3,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}}
    loaded = load_encoder(_save(ckpt, tmp_path / "checkpoint-last.pt"))
    assert loaded.format == "kamim-pretrain" and loaded.method == "kamim"
    # a run directory resolves to its training checkpoint when it has no encoder export
    assert load_encoder(tmp_path).format == "kamim-pretrain"
    assert loaded.report["ignored"] == {"decoder": ["decoder.0.bias", "decoder.0.weight"],
                                        "mask_token": [f"{parent}mask_token"]}
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(enc, x), atol=1e-6, rtol=0)


def test_own_safetensors_export_and_resampling(tmp_path, photos):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    enc = _tiny_vit()
    with torch.no_grad():  # constant patch position embedding: bicubic resampling must keep it constant
        enc.pos_embed[:, 1:] = torch.linspace(-1, 1, 64)
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(enc.state_dict(), path, metadata={
        "format": "kamim-encoder", "model_name": "vit_tiny_patch16_224", "kwargs": json.dumps(kwargs),
        "method": "simmim"})
    loaded = load_encoder(path)
    assert (loaded.format, loaded.method, loaded.report["resampled"]) == ("kamim-encoder", "simmim", {})
    torch.save({"format": "kamim-pretrain"}, tmp_path / "checkpoint-last.pt")
    assert load_encoder(tmp_path).format == "kamim-encoder"  # a run directory: the export wins
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(enc, x), atol=1e-6, rtol=0)

    big = load_encoder(path, img_size=48)
    assert big.image_size == (48, 48) and big.report["resampled"] == {"pos_embed": {"from": [4, 4], "to": [6, 6]}}
    pos = big.model.pos_embed.detach()
    assert pos.shape == (1, 37, 64)
    torch.testing.assert_close(pos[:, :1], enc.pos_embed[:, :1].detach())  # CLS position untouched
    torch.testing.assert_close(pos[0, 1:], torch.linspace(-1, 1, 64).expand(36, 64), atol=1e-5, rtol=0)
    assert _features(big.model, _images(photos, 48)).shape == (2, 37, 64)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_format_lists_keys(tmp_path):
    path = _save({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, tmp_path / "mystery.pt")
    with pytest.raises(CheckpointError) as e:
        load_encoder(path)
    msg = str(e.value)
    assert "\n" not in msg and "mystery.pt" in msg and "foo.weight" in msg and "hf-vit" in msg and "moco-v3" in msg


def test_missing_and_unexpected_keys(tmp_path):
    sd = dict(_tiny_vit().state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    path = _save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): blocks\.1\.mlp\.fc2\.bias"):
        load_encoder(path, num_heads=4)
    with pytest.warns(UserWarning, match="blocks.1.mlp.fc2.bias"):
        loose = load_encoder(path, num_heads=4, strict=False)
    assert loose.report["missing"] == ["blocks.1.mlp.fc2.bias"]

    sd = dict(_tiny_vit().state_dict(), **{"adapter.weight": torch.zeros(3), "adapter.bias": torch.zeros(3)})
    path = _save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\): adapter\.weight, adapter\.bias"):
        load_encoder(path, num_heads=4)
    ok = load_encoder(path, num_heads=4, allow_extra=["adapter"])
    assert ok.report["ignored"] == {"adapter": ["adapter.bias", "adapter.weight"]}


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    enc = _tiny_vit()
    path = tmp_path / "encoder.safetensors"
    bad = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    safetensors.torch.save_file(enc.state_dict(), path, metadata={
        "format": "kamim-encoder", "model_name": "vit_tiny_patch16_224", "kwargs": json.dumps(bad)})
    want = r"'blocks\.0\.mlp\.fc1\.weight': checkpoint \(256, 64\) vs model \(128, 64\)"
    with pytest.raises(CheckpointError, match=want):
        load_encoder(path)
    safetensors.torch.save_file(enc.state_dict(), path, metadata={
        "format": "kamim-encoder", "model_name": "vit_tiny_patch16_224",
        "kwargs": json.dumps(dict(bad, mlp_ratio=4.0, img_size=48))})
    with pytest.raises(CheckpointError, match=r"'pos_embed'.*\(1, 17, 64\) vs model \(1, 37, 64\).*img_size="):
        load_encoder(path)


def test_non_finite_weights_refused(tmp_path):
    sd = dict(_tiny_vit().state_dict())
    sd["blocks.1.attn.proj.weight"] = sd["blocks.1.attn.proj.weight"].clone()
    sd["blocks.1.attn.proj.weight"][3] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN/inf\) in 1 tensor\(s\): blocks\.1\.attn\.proj\.weight"):
        load_encoder(_save(sd, tmp_path / "diverged.pt"), num_heads=4)


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    for name, write in [("evil.pt", lambda p: torch.save({"state_dict": Evil()}, p)),
                        ("evil_raw.pth", lambda p: p.write_bytes(pickle.dumps(Evil(), protocol=2)))]:
        path = tmp_path / name
        write(path)
        with pytest.raises(CheckpointError) as e:
            load_encoder(path)
        assert name in str(e.value) and "\n" not in str(e.value)
        assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path):
    path = _save(_tiny_vit().state_dict(), tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_encoder(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_encoder(tmp_path / "nowhere.pth")


# ---------------------------------------------------------------------------------- sources and manifest
def test_timm_name_source_is_random_init_without_download():
    enc = load_encoder("vit_tiny_patch16_224", img_size=32, depth=2)  # model_kwargs reach timm
    assert (enc.format, enc.sha256, enc.image_size, enc.patch_size, enc.num_prefix_tokens) == (
        "timm-name", None, (32, 32), 16, 1)
    assert enc.model.num_classes == 0 and len(enc.model.blocks) == 2


def test_manifest_missing_file_says_where_to_get_it(tmp_path):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"checkpoints": {"tiny_mim": {
        "source": "https://example.org/tiny_mim.pth", "format": "hf-vit", "image_size": 32,
        "file": "tiny_mim.pth", "num_heads": 4}}}))
    with pytest.raises(FileNotFoundError) as e:
        load_encoder("tiny_mim", manifest=manifest)
    assert "https://example.org/tiny_mim.pth" in str(e.value) and str(tmp_path / "tiny_mim.pth") in str(e.value)


def test_manifest_entry_loads_and_checks_format(tmp_path, photos):
    hf = _hf_vit_mim(layers=2)
    torch.save(_hf_legacy_state_dict(hf, tmp_path), tmp_path / "tiny_mim.pth")
    entry = {"source": "local", "format": "hf-vit", "image_size": 32, "file": "tiny_mim.pth", "num_heads": 4}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"checkpoints": {"tiny_mim": entry, "wrong": dict(entry, format="mae")}}))
    enc = load_encoder("tiny_mim", manifest=manifest)  # num_heads from the entry
    _assert_vit_parity(enc, hf.vit, _images(photos, 32), depth=2)
    with pytest.raises(CheckpointError, match="expects format 'mae' but the file is 'hf-vit'"):
        load_encoder("wrong", manifest=manifest)
    # an entry's sha256 is verified: the published digest loads, any other file is refused
    digest = hashlib.sha256((tmp_path / "tiny_mim.pth").read_bytes()).hexdigest()
    manifest.write_text(yaml.safe_dump({"checkpoints": {"ok": dict(entry, sha256=digest.upper()),
                                                        "tampered": dict(entry, sha256="0" * 64)}}))
    assert load_encoder("ok", manifest=manifest).sha256 == digest
    with pytest.raises(CheckpointError, match=rf"tiny_mim.pth: its sha256 {digest} is not the 0{{64}} of manifest "
                                              r"entry 'tampered': not the published file \(download it again from "
                                              r"local\)$"):
        load_encoder("tampered", manifest=manifest)


def test_repository_manifest(tmp_path):
    entries = load_manifest()
    for name in ("kamim_vit_base", "simmim_vit_base", "kamim_swin_tiny", "moco_v3_vit_base", "mae_vit_base",
                 "dino_vit_base", "dino_vit_small"):
        assert name in entries, name
    assert entries["mae_vit_base"]["source"].startswith("https://dl.fbaipublicfiles.com/mae/")
    for name, entry in entries.items():  # every entry: the file's own address and a checksum field
        assert entry["source"].startswith("https://") and "sha256" in entry, name
        if name.startswith(("kamim_", "simmim_")):  # the authors' per-file links, not their repository
            assert entry["source"].startswith("https://drive.google.com/file/d/"), name
    with pytest.raises(FileNotFoundError) as e:
        resolve_source("moco_v3_vit_base", checkpoint_dir=tmp_path)
    assert "dl.fbaipublicfiles.com/moco-v3" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="not a checkpoint file, a manifest entry"):
        resolve_source("definitely_not_a_model")


def _hf_cache(root: Path, repo: str, config: dict) -> Path:
    """A Hugging Face cache holding ``repo``'s ``config.json`` in the layout huggingface_hub writes."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    return root


def test_hub_model_names_are_read_from_the_local_cache_only(tmp_path, photos, monkeypatch):
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reached = []
    guard = socket.getaddrinfo  # the suite's no-network guard (conftest), recording each attempt

    def record(host, *args, **kwargs):
        reached.append(host)
        return guard(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", record)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    path = _save({"state_dict": ref.eval().state_dict()}, tmp_path / "vit.pth")
    with pytest.raises(FileNotFoundError, match=r"^model 'hf-hub:org/tiny' is not in the local Hugging Face cache "
                                                r"\(.*hub\): download its config first \(hf download org/tiny "
                                                r"config.json\) or pass --allow-download$"):
        load_encoder(path, model_name="hf-hub:org/tiny")
    assert reached == []
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "pretrained_cfg": {},
              "model_args": {"img_size": 32, "depth": 2}}
    _hf_cache(tmp_path / "hub", "org/tiny", config)
    loaded = load_encoder(path, model_name="hf-hub:org/tiny")
    assert reached == [] and loaded.image_size == (32, 32) and len(loaded.model.blocks) == 2
    x = _images(photos, 32)
    torch.testing.assert_close(_features(loaded.model, x), _features(ref, x), atol=1e-5, rtol=0)
    # a cached config whose model arguments would make timm open a file is refused
    _hf_cache(tmp_path / "hub", "org/bad", {**config, "model_args": {"checkpoint_path": "/etc/passwd"}})
    with pytest.raises(CheckpointError, match="refusing model_args checkpoint_path"):
        load_encoder(path, model_name="hf-hub:org/bad")
    # only allow_download hands the name to timm, which then goes to the hub (stopped at its first lookup)
    class Reached(BaseException):
        pass

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (_ for _ in ()).throw(Reached(host)))
    with pytest.raises(Reached, match="huggingface.co"):
        load_encoder(path, model_name="hf-hub:org/elsewhere", allow_download=True)


def test_a_model_too_large_for_memory_is_one_line(tmp_path, monkeypatch):
    """timm's allocation failure (here injected with torch's CPU allocator message) names the model,
    its arguments and the size, instead of a traceback."""
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(_tiny_vit().state_dict(), path, metadata={
        "format": "kamim-encoder", "model_name": "vit_tiny_patch16_224", "method": "simmim",
        "kwargs": json.dumps(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4))})

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 60000000384 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(timm, "create_model", no_memory)
    with pytest.raises(CheckpointError, match=r"^cannot build timm model 'vit_\w+' with \{.*'img_size': 100000.*\}: "
                                              r"not enough memory \(55.9 GiB in one tensor\); a smaller img_size "
                                              r"needs less$"):
        load_encoder(path, img_size=100000)
