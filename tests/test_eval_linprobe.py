"""Linear probing: every layer in one pass, beats chance on real labelled photos, resume, bad input."""
from __future__ import annotations

import csv
import json
import signal

import pytest
import torch
from eval_helpers import PoisonGrad, signal_at
from eval_helpers import photo_crops as _photo_crops
from eval_helpers import tiny_vit

from kamim.eval.linprobe import LinprobeConfig, ProbeHeads, build_probe_optimizer, linear_probe
from kamim.interrupt import Interrupted
from kamim.runtime import NonFiniteLossError


def _vit(depth: int = 3):
    return tiny_vit(depth)


@pytest.fixture(scope="module")
def photo_crops(tmp_path_factory):
    """15 classes (one per real photograph), disjoint 32 px tiles for train and val."""
    return _photo_crops(tmp_path_factory.mktemp("lp") / "crops", n_train_per_class=12, n_val_per_class=6, photos=None)


@pytest.fixture(scope="module")
def small_crops(tmp_path_factory):
    return _photo_crops(tmp_path_factory.mktemp("lp") / "small", n_train_per_class=8, n_val_per_class=4)


def _cfg(model, data, out, **kw):
    base = dict(checkpoint=model, data=str(data), output_dir=str(out), recipe="reference", aug="none",
                batchnorm=True, lr=0.01, warmup_epochs=0, epochs=3, batch_size=30, num_workers=0,
                device="cpu", amp="none", resume="none", progress=False)
    base.update(kw)
    return LinprobeConfig(**base)


def test_all_layers_beat_chance_and_write_one_row_per_block(photo_crops, tmp_path, capsys):
    res = linear_probe(_cfg(_vit(3), photo_crops, tmp_path / "run", layers="all"))
    assert res["layers"] == [1, 2, 3] and len(res["final"]) == 3
    assert [r["layer"] for r in res["final"]] == [1, 2, 3]
    chance = 100.0 / 15
    best = max(r["top1"] for r in res["final"])
    assert best > 2.5 * chance, res["final"]
    assert all(r["top5"] >= r["top1"] for r in res["final"])
    # results on disk: JSON summary and CSV with one row per (epoch, layer)
    summary = json.loads((tmp_path / "run" / "linprobe.json").read_text())
    assert summary["final"] == json.loads(json.dumps(res["final"]))
    rows = list(csv.DictReader((tmp_path / "run" / "linprobe.csv").open()))
    assert len(rows) == 3 * 3 and {int(r["layer"]) for r in rows} == {1, 2, 3}
    assert float(rows[-1]["top1"]) == pytest.approx(res["final"][-1]["top1"])
    assert "best_top1" in capsys.readouterr().out


def test_swin_rows_name_block_and_stage(small_crops, tmp_path):
    """Swin layers are blocks counted across stages; every result row also names the stage."""
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=2, embed_dim=16,
                             depths=(1, 2), num_heads=(1, 2), num_classes=0)
    res = linear_probe(_cfg(swin, small_crops, tmp_path / "swin", layers="all", epochs=1))
    assert [(r["layer"], r["stage"]) for r in res["final"]] == [(1, 1), (2, 2), (3, 2)]
    summary = json.loads((tmp_path / "swin" / "linprobe.json").read_text())
    assert summary["encoder"]["num_layers"] == 3
    rows = list(csv.DictReader((tmp_path / "swin" / "linprobe.csv").open()))
    assert [(r["layer"], r["stage"]) for r in rows] == [("1", "1"), ("2", "2"), ("3", "2")]
    assert res["layers"] == [1, 2, 3] and linear_probe(_cfg(swin, small_crops, tmp_path / "s3", layers="stage:1",
                                                           epochs=1))["layers"] == [1]


def test_heads_are_independent_and_lars_adapts_weights():
    heads = ProbeHeads({1: 8, 2: 8}, num_classes=3, batchnorm=True)
    feats = {1: torch.randn(6, 8), 2: torch.randn(6, 8)}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = heads(feats)
    torch.nn.functional.cross_entropy(out[1], y).backward()  # loss of head 1 only
    assert heads.heads["2"][1].weight.grad is None and heads.heads["1"][1].weight.grad.abs().sum() > 0
    assert isinstance(heads.heads["1"][0], torch.nn.BatchNorm1d) and not heads.heads["1"][0].affine
    opt = build_probe_optimizer(heads, "lars", lr=0.1, weight_decay=0.0)
    assert [g["always_adapt"] for g in opt.param_groups] == [True, False]
    assert all(p.ndim > 1 for p in opt.param_groups[0]["params"])


def test_resume_matches_uninterrupted_run(small_crops, tmp_path):
    full = linear_probe(_cfg(_vit(2), small_crops, tmp_path / "a", layers="all", epochs=2, batch_size=16))
    linear_probe(_cfg(_vit(2), small_crops, tmp_path / "b", layers="all", epochs=2, batch_size=16, stop_epoch=1))
    first = json.loads((tmp_path / "b" / "linprobe.json").read_text())
    assert first["epochs_done"] == 1
    resumed = linear_probe(_cfg(_vit(2), small_crops, tmp_path / "b", layers="all", epochs=2, batch_size=16,
                                resume="auto"))
    assert resumed["epochs_done"] == 2 and len(resumed["history"]) == 4
    assert resumed["history"] == full["history"]  # exact: same losses and accuracies, bit for bit
    ca = torch.load(tmp_path / "a" / "checkpoint-last.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint-last.pt", weights_only=True)
    assert ca["heads"].keys() == cb["heads"].keys()
    assert all(torch.equal(ca["heads"][k], cb["heads"][k]) for k in ca["heads"])
    assert (tmp_path / "a" / "linprobe.csv").read_text() == (tmp_path / "b" / "linprobe.csv").read_text()
    with pytest.raises(ValueError, match="cannot resume .* layers"):
        linear_probe(_cfg(_vit(2), small_crops, tmp_path / "b", layers="1", epochs=2, batch_size=16, resume="auto"))


def test_resume_is_refused_when_the_data_changed_the_schedule(small_crops, tmp_path):
    """A probe resumed after its train folder gained images would follow the old LR schedule: refused."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_crops, data)
    kw = dict(layers="1", epochs=2, batch_size=8)  # 32 train images: 4 steps per epoch, 8 in all
    linear_probe(_cfg(_vit(2), data, tmp_path / "b", stop_epoch=1, **kw))
    cls = sorted((data / "train").iterdir())[0]
    for i, img in enumerate(sorted(cls.iterdir())):  # 8 more images: 5 steps per epoch, 10 in all
        shutil.copy(img, cls / f"copy{i}{img.suffix}")
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-last.pt: its LR schedule is 8 steps "
                                         r"\(warmup 0\), this config gives 10 \(warmup 0\)"):
        linear_probe(_cfg(_vit(2), data, tmp_path / "b", resume="auto", **kw))


def test_bad_inputs(small_crops, tmp_path):
    with pytest.raises(ValueError, match=r"valid layers are 1\.\.2"):
        linear_probe(_cfg(_vit(2), small_crops, tmp_path / "x", layers="5"))
    with pytest.raises(ValueError, match=r"3x48x48 but the model expects 3x32x32"):
        linear_probe(_cfg(_vit(2), small_crops, tmp_path / "x", img_size=48))
    with pytest.raises(ValueError, match="recipe 'simclr'"):
        linear_probe(_cfg(_vit(2), small_crops, tmp_path / "x", recipe="simclr"))
    (tmp_path / "unsplit").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/"):
        linear_probe(_cfg(_vit(2), tmp_path / "unsplit", tmp_path / "x"))
    # a val class with no train folder is named
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_crops, bad)
    shutil.copytree(bad / "val" / "coffee", bad / "val" / "zebra")
    with pytest.raises(ValueError, match="zebra"):
        linear_probe(_cfg(_vit(2), bad, tmp_path / "x"))


def test_interrupt_mid_epoch_saves_and_resumes_bit_exact(small_crops, tmp_path):
    kw = dict(layers="all", epochs=2, batch_size=8)  # 32 train images: 4 optimizer steps per epoch
    full = linear_probe(_cfg(_vit(2), small_crops, tmp_path / "a", **kw))
    model = _vit(2)
    signal_at(model.patch_embed, at=3)  # during the 3rd training batch of epoch 1
    with pytest.raises(Interrupted) as exc:
        linear_probe(_cfg(model, small_crops, tmp_path / "b", **kw))
    assert exc.value.exit_status == 128 + signal.SIGTERM
    assert str(exc.value).startswith("stopped by SIGTERM after step 3; checkpoint saved")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    cut = torch.load(tmp_path / "b" / "checkpoint-last.pt", weights_only=True)
    assert (cut["epoch"], cut["step"], cut["history"]) == (0, 3, []) and cut["partial"]["sums"][-1] == 3
    resumed = linear_probe(_cfg(_vit(2), small_crops, tmp_path / "b", resume="auto", **kw))
    assert resumed["history"] == full["history"]  # exactly the same floats
    ca = torch.load(tmp_path / "a" / "checkpoint-last.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint-last.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 8
    for k in ca["heads"]:
        assert torch.equal(ca["heads"][k], cb["heads"][k]), k
    assert (tmp_path / "a" / "linprobe.csv").read_text() == (tmp_path / "b" / "linprobe.csv").read_text()


def test_config_yaml_reruns_the_same_probe(small_crops, tmp_path):
    from kamim.config import load_command_config
    from kamim.runtime import export_encoder

    class Run(torch.nn.Module):  # what a pretraining run exports
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _vit(2)
            self.encoder_spec = {"model_name": "vit_tiny_patch16_224", "kwargs": dict(
                img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)}

    enc = export_encoder(Run(), tmp_path / "encoder.safetensors", method="simmim", step=0)
    first = linear_probe(_cfg(str(enc), small_crops, tmp_path / "a", layers="all", epochs=1, batch_size=16))
    written = tmp_path / "a" / "config.yaml"
    again = load_command_config(LinprobeConfig, written, [f"output_dir={tmp_path / 'b'}"])
    assert again.opt == "adamw" and again.batchnorm is True  # the resolved recipe values are in the file
    second = linear_probe(again)
    assert second["history"] == first["history"]
    assert (tmp_path / "a" / "linprobe.csv").read_text() == (tmp_path / "b" / "linprobe.csv").read_text()


def test_non_finite_gradient_is_refused_before_the_update(small_crops, tmp_path, monkeypatch):
    """As in pretraining and finetuning: an inf gradient stops the probe before any weight moves, and
    the message says what is on disk (first step: nothing; later: the checkpoint of epoch 1, untouched)."""
    steps, snapshots = [], []
    real = ProbeHeads.forward

    def forward(self, feats):
        if self.training:
            steps.append(self)
            snapshots.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        logits = real(self, feats)
        if self.training:
            if len(steps) >= poison_from:
                logits = {k: PoisonGrad.apply(v, float("inf")) for k, v in logits.items()}
        return logits

    monkeypatch.setattr(ProbeHeads, "forward", forward)
    poison_from = 1
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient norm (inf|nan) at step 1; stopped, "
                                                 r"no checkpoint written$"):
        linear_probe(_cfg(_vit(2), small_crops, tmp_path / "first", layers="all", epochs=2, batch_size=16))
    assert not (tmp_path / "first" / "checkpoint-last.pt").exists()

    steps.clear()
    snapshots.clear()
    poison_from = 10**9
    linear_probe(_cfg(_vit(2), small_crops, tmp_path / "later", layers="all", epochs=2, batch_size=16, stop_epoch=1))
    per_epoch = len(steps)
    kept = (tmp_path / "later" / "checkpoint-last.pt").read_bytes()
    steps.clear()
    snapshots.clear()
    poison_from = 1  # the first step after resuming
    with pytest.raises(NonFiniteLossError, match=rf"at step {per_epoch + 1}; stopped, last checkpoint left intact"):
        linear_probe(_cfg(_vit(2), small_crops, tmp_path / "later", layers="all", epochs=2, batch_size=16,
                          resume="auto"))
    assert (tmp_path / "later" / "checkpoint-last.pt").read_bytes() == kept
    saved = torch.load(tmp_path / "later" / "checkpoint-last.pt", weights_only=True)["heads"]
    assert all(torch.equal(saved[k], snapshots[0][k]) for k in saved)  # the run resumed from it
    params = dict(steps[0].named_parameters())
    assert params and all(torch.equal(p, snapshots[0][k]) for k, p in params.items())  # no weight moved
