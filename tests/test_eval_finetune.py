"""Finetuning: layer-decay groups, drop path, one epoch end to end with checkpoints, exact resume, bad input."""
from __future__ import annotations

import csv
import json
import signal

import pytest
import torch
from eval_helpers import PoisonGrad, photo_crops, signal_at
from eval_helpers import tiny_vit as _vit
from timm.layers import DropPath

from kamim.eval.finetune import FinetuneConfig, add_classifier, build_finetune_optimizer, finetune, set_drop_path
from kamim.interrupt import Interrupted
from kamim.runtime import NonFiniteLossError


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return photo_crops(tmp_path_factory.mktemp("ft") / "crops", n_train_per_class=8, n_val_per_class=4)


def _cfg(model, data, out, **kw):
    base = dict(checkpoint=model, data=str(data), output_dir=str(out), epochs=1, warmup_epochs=0, batch_size=16,
                lr=1e-3, num_workers=0, device="cpu", amp="bf16", resume="none", progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_layer_decay_scales_per_block():
    L, decay = 4, 0.65
    model = add_classifier(_vit(L), num_classes=5)
    opt = build_finetune_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    wd = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(scale) == len(names)  # every parameter is optimised
    for i in range(1, L + 1):  # block i (1-based) -> decay ** (L + 1 - i)
        assert scale[f"blocks.{i - 1}.attn.qkv.weight"] == pytest.approx(decay ** (L + 1 - i))
        assert scale[f"blocks.{i - 1}.mlp.fc2.bias"] == pytest.approx(decay ** (L + 1 - i))
    for emb in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert scale[emb] == pytest.approx(decay ** (L + 1))
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == pytest.approx(decay)  # final norm with last block
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["pos_embed"] == 0.0 and wd["cls_token"] == 0.0
    assert wd["blocks.0.norm1.weight"] == 0.0 and wd["head.bias"] == 0.0
    # the scheduler applies the scale: after warmup, each group's lr = peak * lr_scale
    from kamim.runtime import cosine_scheduler

    sched = cosine_scheduler(opt, total_steps=10, warmup_steps=2, warmup_lr=0.0, min_lr=0.0)
    sched.step_update(2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["lr_scale"] * 1.0)


def test_drop_path_is_linear_in_depth_and_head_init():
    model = _vit(4)
    assert set_drop_path(model, 0.3) == 4
    rates = [blk.drop_path1.drop_prob if isinstance(blk.drop_path1, DropPath) else 0.0 for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    add_classifier(model, 7, pool="avg")
    assert model.head.out_features == 7 and model.global_pool == "avg" and model.head.weight.std() < 1e-4
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # reference head: final norm, prefix dropped, patch tokens averaged, Linear
        tokens = model.norm(model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x)))))
        torch.testing.assert_close(model(x), model.head(tokens[:, model.num_prefix_tokens:].mean(1)))


def test_finetune_one_epoch_writes_checkpoints_and_resumes_exactly(crops, tmp_path, capsys):
    res = finetune(_cfg(_vit(), crops, tmp_path / "one", ema=True, ema_decay=0.9))
    run = tmp_path / "one"
    for f in ("checkpoint-best.pt", "checkpoint-last.pt", "finetune.json", "finetune.csv"):
        assert (run / f).is_file(), f
    best = torch.load(run / "checkpoint-best.pt", weights_only=True)
    last = torch.load(run / "checkpoint-last.pt", weights_only=True)
    assert best["kind"] == "best" and last["kind"] == "last" and last["epoch"] == 1 and last["step"] == 2
    assert best["classes"] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert best["model"]["head.weight"].shape == (4, 32)
    assert set(last) >= {"model", "optimizer", "scheduler", "ema", "rng", "history", "config"}
    row = res["history"][0]
    assert 0 <= row["top1"] <= row["top5"] <= 100 and "ema_top1" in row
    assert [float(r["top1"]) for r in csv.DictReader((run / "finetune.csv").open())] == pytest.approx([row["top1"]])
    assert json.loads((run / "finetune.json").read_text())["best"]["epoch"] == 1
    assert "best top-1" in capsys.readouterr().out

    # 2 epochs straight == 1 epoch, stop, resume 1 epoch (drop path and mixup RNG restored)
    kw = dict(epochs=2, warmup_epochs=1, drop_path=0.1)
    full = finetune(_cfg(_vit(), crops, tmp_path / "full", **kw))
    finetune(_cfg(_vit(), crops, tmp_path / "cut", stop_epoch=1, **kw))
    resumed = finetune(_cfg(_vit(), crops, tmp_path / "cut", resume="auto", **kw))
    assert resumed["epochs_done"] == 2
    assert resumed["history"] == full["history"]  # exact: same losses and accuracies, bit for bit
    sa = torch.load(tmp_path / "full" / "checkpoint-last.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "cut" / "checkpoint-last.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="cannot resume .*layer_decay"):
        finetune(_cfg(_vit(), crops, tmp_path / "cut", resume="auto", layer_decay=0.75, **kw))


def test_bad_inputs(crops, tmp_path):
    with pytest.raises(ValueError, match=r"3x48x48 but the model expects 3x32x32"):
        finetune(_cfg(_vit(), crops, tmp_path / "x", img_size=48))
    with pytest.raises(ValueError, match="even per-rank micro-batch"):
        finetune(_cfg(_vit(), crops, tmp_path / "x", batch_size=15))
    with pytest.raises(ValueError, match="class token"):
        finetune(_cfg(_vit(class_token=False, global_pool="avg"), crops, tmp_path / "x", pool="cls"))
    with pytest.raises(ValueError, match="layer_decay"):
        finetune(_cfg(_vit(), crops, tmp_path / "x", layer_decay=0))
    with pytest.raises(FileNotFoundError, match="labelled data folder not found"):
        finetune(_cfg(_vit(), tmp_path / "nope", tmp_path / "x"))


def test_interrupt_mid_epoch_saves_and_resumes_bit_exact(crops, tmp_path):
    # 32 train images, batch 8: 4 steps per epoch; drop path, mixup/cutmix and EMA all draw or carry state
    kw = dict(epochs=2, warmup_epochs=1, batch_size=8, drop_path=0.1, ema=True, ema_decay=0.9)
    full = finetune(_cfg(_vit(), crops, tmp_path / "full", **kw))
    model = _vit()
    signal_at(model, at=2, signum=signal.SIGINT)
    with pytest.raises(Interrupted) as exc:
        finetune(_cfg(model, crops, tmp_path / "cut", **kw))
    assert str(exc.value).startswith("stopped by SIGINT after step 2; checkpoint saved")
    cut = torch.load(tmp_path / "cut" / "checkpoint-last.pt", weights_only=True)
    assert (cut["epoch"], cut["step"], cut["history"]) == (0, 2, []) and cut["partial"]["sums"][1] == 2
    resumed = finetune(_cfg(_vit(), crops, tmp_path / "cut", resume="auto", **kw))
    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / name, weights_only=True)
        assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
        for key in ("model", "ema") if name == "checkpoint-last.pt" else ("model",):
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), (name, key, k)
    assert (tmp_path / "full" / "finetune.csv").read_text() == (tmp_path / "cut" / "finetune.csv").read_text()


def test_non_finite_gradient_norm_stops_before_the_update(crops, tmp_path):
    model = _vit()
    model.blocks[0].register_forward_hook(lambda _m, _a, out: PoisonGrad.apply(out, float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient norm nan at step 1; stopped, no checkpoint "
                                                 r"written$"):
        finetune(_cfg(model, crops, tmp_path / "nan", amp="none"))
    assert not (tmp_path / "nan" / "checkpoint-last.pt").exists()


def test_drop_path_of_a_checkpoint_is_a_timm_constructor_argument(crops, tmp_path, monkeypatch):
    import kamim.checkpoints as checkpoints
    from kamim.runtime import export_encoder

    class Run(torch.nn.Module):  # what a pretraining run exports
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _vit(4)
            self.encoder_spec = {"model_name": "vit_tiny_patch16_224", "kwargs": dict(
                img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0)}

    path = export_encoder(Run(), tmp_path / "encoder.safetensors", method="simmim", step=0)
    real, loaded = checkpoints.load_encoder, []
    monkeypatch.setattr(checkpoints, "load_encoder", lambda *a, **kw: loaded.append((kw, real(*a, **kw))) or loaded[-1][1])
    finetune(_cfg(str(path), crops, tmp_path / "ft", drop_path=0.3, stop_epoch=1, epochs=2))
    kwargs, enc = loaded[0]
    assert kwargs["drop_path_rate"] == 0.3
    rates = [blk.drop_path1.drop_prob if isinstance(blk.drop_path1, DropPath) else 0.0 for blk in enc.model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert (tmp_path / "ft" / "config.yaml").is_file()
