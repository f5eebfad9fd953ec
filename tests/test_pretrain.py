"""The pretraining engine: sampler, LR schedule, accumulation, bit-exact resume, NaN guard, exports."""
from __future__ import annotations

import csv
import json
import logging
import math
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import importlib

engine = importlib.import_module("kamim.engine.pretrain")
from kamim.config import ConfigError, load_config
from kamim.data import collate_skip_bad, write_demo_folder
from kamim.engine.pretrain import (
    ENCODER_FILE, LAST_CHECKPOINT, NonFiniteLossError, build_model, build_pretrain_dataset,
    build_scheduler, load_pretrain_checkpoint, pretrain, schedule_lengths,
)
from kamim.engine.sampler import ResumableBatchSampler, SeededDataset, sample_seed
from kamim.metrics_log import MetricsLogger, read_metrics
from kamim.serialization import load_safetensors, safe_load

# A few-second variant of the tiny presets: 48 px (6x6 tokens of 8 px, 3x3 mask blocks of 16 px),
# a 2-block ViT of width 32, batch 6 -> 5 optimizer steps per epoch on 30 demo images.
SMALL = [
    "model.img_size=48", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "optim.batch_size=6",
    "run.progress=false", "run.ckpt_every_steps=0", "run.log_every=1",
]


def small_cfg(method: str, *extra: str):
    return load_config(f"tiny_{method}", SMALL + list(extra))


@pytest.fixture(scope="module")
def demo30(tmp_path_factory):
    """30 real photographs (15 demo photos + 1 crop each), at most 96 px."""
    return write_demo_folder(tmp_path_factory.mktemp("demo30"), crops_per_photo=1, max_side=96)


@pytest.fixture(scope="module")
def demo15(tmp_path_factory):
    return write_demo_folder(tmp_path_factory.mktemp("demo15"), crops_per_photo=0, max_side=96)


def _params(path):
    return safe_load(path)["model"]


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (4, 1), (2, 3), (1, 6)])
def test_sampler_global_batches_do_not_depend_on_world_size(world, accum):
    n, g = 50, 12
    ref = ResumableBatchSampler(n, g, seed=3)
    perm = ref.permutation(2)
    assert sorted(perm.tolist()) == list(range(n))
    samplers = [ResumableBatchSampler(n, g, rank=r, world_size=world, accum_steps=accum, seed=3) for r in range(world)]
    per_rank = []
    for s in samplers:
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s) == (n // g) * accum
        assert all(len(b) == g // (world * accum) and all(e == 2 for e, _ in b) for b in batches)
        per_rank.append(batches)
    for step in range(n // g):
        got = sorted(i for rank in per_rank for b in rank[step * accum:(step + 1) * accum] for _, i in b)
        assert got == sorted(perm[step * g:(step + 1) * g].tolist()) == sorted(ref.global_batch(2, step))
    # drop_last: the 50 - 4 * 12 = 2 leftover images are not used this epoch
    used = {i for rank in per_rank for b in rank for _, i in b}
    assert len(used) == (n // g) * g


def test_sampler_resume_skips_consumed_batches_and_epochs_differ():
    s = ResumableBatchSampler(40, 8, accum_steps=2, seed=0)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_step=3)
    assert list(s) == full[3 * 2:] and len(s) == 4
    s.set_epoch(0)
    assert [b for b in s] != [[(1, i) for _, i in b] for b in full]  # new permutation each epoch
    assert torch.equal(s.permutation(5), ResumableBatchSampler(40, 8, seed=0).permutation(5))


def test_sampler_errors():
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by world size 4 x accumulation steps 1"):
        ResumableBatchSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="the dataset has 5 images, fewer than one global batch of 8"):
        ResumableBatchSampler(5, 8)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        ResumableBatchSampler(100, 8, rank=2, world_size=2)


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3), np.random.rand(2), random.random()


def test_seeded_dataset_is_a_pure_function_of_its_key():
    ds = SeededDataset(_RandomDataset(), seed=7)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = ds[(0, 3)]
    _ = ds[(0, 4)], ds[(1, 3)]
    b = ds[(0, 3)]
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], ds[(1, 3)][0]) and not torch.equal(a[0], ds[(0, 4)][0])
    # the caller's RNG streams are untouched
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    assert sample_seed(7, 0, 3) != sample_seed(7, 0, 4) != sample_seed(8, 0, 3)


# --------------------------------------------------------------------------- schedule

def _reference_lr(t: int, peak: float, warmup_lr: float, min_lr: float, warmup: int, total: int) -> float:
    if t < warmup:
        return warmup_lr + (peak - warmup_lr) * t / warmup
    if t >= total:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_schedule_matches_warmup_cosine_formula():
    cfg = load_config("tiny_kamim", ["optim.epochs=5", "optim.warmup_epochs=1", "optim.lr=0.01",
                                     "optim.min_lr=1e-4", "optim.warmup_lr=1e-6"])
    lengths = schedule_lengths(cfg, steps_per_epoch=7)
    assert (lengths.total_steps, lengths.warmup_steps, lengths.stop_step) == (35, 7, 35)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.optim.peak_lr())
    sched = build_scheduler(opt, cfg, lengths)
    got = [opt.param_groups[0]["lr"]]
    for t in range(1, 40):
        sched.step_update(t)
        got.append(opt.param_groups[0]["lr"])
    want = [_reference_lr(t, 0.01, 1e-6, 1e-4, 7, 35) for t in range(40)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[7] == pytest.approx(0.01) and got[35] == pytest.approx(1e-4)


def test_max_steps_semantics():
    cfg = load_config("tiny_kamim", ["run.max_steps=12"])
    lengths = schedule_lengths(cfg, steps_per_epoch=4)  # 10 epochs x 4
    assert (lengths.total_steps, lengths.warmup_steps, lengths.stop_step) == (40, 4, 12)
    cfg = load_config("tiny_kamim", ["run.max_steps=12", "run.max_steps_schedule=true"])
    lengths = schedule_lengths(cfg, steps_per_epoch=4)
    assert (lengths.total_steps, lengths.warmup_steps, lengths.stop_step) == (12, 1, 12)


def test_accumulation_keeps_schedule_and_gradients(demo30, tmp_path):
    """accum_steps=2 (2 micro-batches of 3) == accum_steps=1 (batches of 6): same LR per optimizer step
    (no per-micro-batch sawtooth) and the same parameters up to float rounding."""
    runs = {}
    for accum in (1, 2):
        cfg = small_cfg("kamim", f"optim.accum_steps={accum}", "run.max_steps=6")
        ckpt = pretrain(cfg, demo30, tmp_path / f"acc{accum}", resume="none")
        runs[accum] = (read_metrics(ckpt.parent / "metrics.jsonl"), _params(ckpt))
    (m1, p1), (m2, p2) = runs[1], runs[2]
    assert [r["step"] for r in m2] == list(range(1, 7))
    assert [r["lr"] for r in m1] == [r["lr"] for r in m2]
    cfg = small_cfg("kamim")  # 30 images / 6 = 5 steps per epoch, 10 epochs, 1 warmup epoch
    want = [_reference_lr(t, cfg.optim.peak_lr(), cfg.optim.warmup_lr, cfg.optim.min_lr, 5, 50) for t in range(6)]
    np.testing.assert_allclose([r["lr"] for r in m2], want, rtol=1e-12)
    np.testing.assert_allclose([r["loss"] for r in m1], [r["loss"] for r in m2], rtol=1e-4)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------- resume

@pytest.mark.parametrize("method", ["kamim", "simmim"])
def test_resume_is_bit_exact(method, demo30, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 steps (mid-epoch resume, crosses an epoch)."""
    straight = pretrain(small_cfg(method, "run.max_steps=6"), demo30, tmp_path / "a", resume="none")
    half = pretrain(small_cfg(method, "run.max_steps=3"), demo30, tmp_path / "b", resume="none")
    assert safe_load(half)["step"] == 3
    resumed = pretrain(small_cfg(method, "run.max_steps=6"), demo30, tmp_path / "b", resume="auto")
    a, b = safe_load(straight), safe_load(resumed)
    assert a["step"] == b["step"] == 6 and b["epoch"] == 1
    _assert_state_equal(a["model"], b["model"])
    for (ka, sa), (kb, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert ka == kb and torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    ma, mb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in mb] == list(range(1, 7))  # no duplicated rows after the resume
    assert [(r["loss"], r["lr"]) for r in ma] == [(r["loss"], r["lr"]) for r in mb]
    with open(tmp_path / "b" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "images_per_s", "num_skipped", "time"}
    assert float(rows[-1]["loss"]) == pytest.approx(mb[-1]["loss"])


@pytest.mark.slow
def test_resume_with_workers_matches_single_process_loading(demo30, tmp_path):
    """First half with 2 loader workers, second half in-process: bit-identical to the straight run."""
    straight = pretrain(small_cfg("kamim", "run.max_steps=6"), demo30, tmp_path / "a", resume="none")
    pretrain(small_cfg("kamim", "run.max_steps=3", "data.num_workers=2"), demo30, tmp_path / "b", resume="none")
    resumed = pretrain(small_cfg("kamim", "run.max_steps=6"), demo30, tmp_path / "b")
    _assert_state_equal(_params(straight), _params(resumed))


def test_resume_of_a_checkpoint_written_before_a_config_key_existed(demo30, tmp_path):
    """A checkpoint whose config lacks keys added later (data.crop, data.vflip) resumes: the missing
    keys take their defaults, which keep the old behaviour; a real change is still refused."""
    from kamim.serialization import atomic_save

    ckpt = pretrain(small_cfg("simmim", "run.max_steps=1"), demo30, tmp_path / "r", resume="none")
    old = safe_load(ckpt)
    del old["config"]["data"]["crop"], old["config"]["data"]["vflip"]
    atomic_save(old, ckpt)
    with pytest.raises(ConfigError, match=r"the config differs in data.crop \('antialiased' -> 'reference'\)"):
        pretrain(small_cfg("simmim", "run.max_steps=2", "data.crop=reference"), demo30, tmp_path / "r")
    assert safe_load(pretrain(small_cfg("simmim", "run.max_steps=2"), demo30, tmp_path / "r"))["step"] == 2


def test_resume_rejects_a_different_config(demo30, tmp_path):
    pretrain(small_cfg("simmim", "run.max_steps=1"), demo30, tmp_path / "r", resume="none")
    with pytest.raises(ConfigError, match=r"cannot resume from .*checkpoint-last.pt: the config differs in "
                                          r"optim.lr \(0.0015 -> 0.003\)"):
        pretrain(small_cfg("simmim", "run.max_steps=2", "optim.lr=0.003"), demo30, tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="resume checkpoint not found"):
        pretrain(small_cfg("simmim"), demo30, tmp_path / "new", resume=tmp_path / "nowhere")
    # already finished: returns at once, nothing retrained
    before = (tmp_path / "r" / LAST_CHECKPOINT).stat().st_mtime_ns
    out = pretrain(small_cfg("simmim", "run.max_steps=1"), demo30, tmp_path / "r")
    assert out == tmp_path / "r" / LAST_CHECKPOINT and out.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- learning

def _fixed_batch_loss(model: nn.Module, cfg) -> float:
    """Loss on 12 fixed samples (fixed crops, masks and keypoints) in train mode, without gradients."""
    ds = SeededDataset(build_pretrain_dataset(cfg, model), seed=99)
    batch = collate_skip_bad([ds[(0, i)] for i in range(12)])
    batch.pop("num_skipped")
    torch.manual_seed(0)
    with torch.no_grad():
        return float(model.train()(batch)["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("method, steps, fixed_ratio", [("simmim", 20, 0.92), ("kamim", 20, 0.92), ("moco", 40, 0.95)])
def test_pretraining_lowers_the_loss(method, steps, fixed_ratio, demo15, tmp_path):
    """A tiny ViT trained on 15 photographs (batch 8, one step per epoch): the logged loss goes down
    and, more robustly (same crops, masks and keypoints before and after), so does the loss on a fixed batch."""
    extra = ["moco.dim=32", "moco.mlp_dim=64"] if method == "moco" else []
    cfg = small_cfg(method, "optim.batch_size=8", f"optim.epochs={steps}", "optim.warmup_epochs=2", "optim.lr=3e-3",
                    f"data.path={demo15}", *extra)
    ckpt = pretrain(cfg, None, tmp_path / method, resume="none")
    losses = [r["loss"] for r in read_metrics(tmp_path / method / "metrics.jsonl")]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-6:]) < 0.95 * np.mean(losses[:6])

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    initial = build_model(cfg)  # the engine's initialisation (same seed)
    trained = build_model(cfg)
    trained.load_state_dict(safe_load(ckpt)["model"])
    before, after = _fixed_batch_loss(initial, cfg), _fixed_batch_loss(trained, cfg)
    assert after < fixed_ratio * before, (before, after)


def test_bf16_autocast_on_cpu_tracks_fp32(demo30, tmp_path, monkeypatch, caplog):
    """bf16 autocast (CPU) trains with finite losses close to fp32 on the same batches; fp16 needs CUDA.
    On a CPU without native bf16 the run warns once."""
    import kamim.precision

    monkeypatch.setattr(kamim.precision, "_warned", False)
    monkeypatch.setattr(kamim.precision, "cpu_has_native_bf16", lambda: False)
    losses, warned = {}, {}
    for amp in ("none", "bf16"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kamim"):
            ckpt = pretrain(small_cfg("kamim", f"run.amp={amp}", "run.max_steps=2"), demo30, tmp_path / amp,
                            resume="none")
        warned[amp] = sum("without native bf16" in r.getMessage() for r in caplog.records)
        losses[amp] = [r["loss"] for r in read_metrics(ckpt.parent / "metrics.jsonl")]
    assert warned == {"none": 0, "bf16": 1}
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] != losses["none"]  # autocast really ran in bf16
    np.testing.assert_allclose(losses["bf16"], losses["none"], rtol=0.05)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.amp=fp16 needs a CUDA device"):
            pretrain(small_cfg("kamim", "run.amp=fp16", "run.device=cpu"), demo30, tmp_path / "fp16")


# --------------------------------------------------------------------------- failures

class _NaNAfter(nn.Module):
    """Wraps a pretraining model; its loss becomes NaN from the ``at``-th forward on."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0
        self.encoder_spec = inner.encoder_spec

    @property
    def encoder(self) -> nn.Module:
        return self.inner.encoder

    def forward(self, batch):
        out = self.inner(batch)
        self.calls += 1
        if self.calls >= self.at:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out


def test_nan_loss_stops_and_keeps_last_checkpoint(demo30, tmp_path, monkeypatch):
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda cfg: _NaNAfter(real_build(cfg), at=5))
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss nan at step 5; stopped, last checkpoint left intact"):
        pretrain(small_cfg("simmim", "run.ckpt_every_steps=2"), demo30, out, resume="none")
    ckpt = load_pretrain_checkpoint(out / LAST_CHECKPOINT)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []  # no temp files left
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_exploding_lr_is_caught(demo30, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|gradient norm) .* at step [0-9]+"):
        pretrain(small_cfg("simmim", "optim.lr=1e30", "optim.warmup_epochs=0", "run.max_steps=20"),
                 demo30, tmp_path / "boom", resume="none")


def test_empty_or_too_small_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match=str(empty)):
        pretrain(small_cfg("simmim"), empty, tmp_path / "o")
    few = write_demo_folder(tmp_path / "few", crops_per_photo=0, max_side=64)  # 15 images
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        pretrain(small_cfg("simmim", "optim.batch_size=16"), few, tmp_path / "o2")
    with pytest.raises(ConfigError, match="no training data: pass data"):
        cfg = small_cfg("simmim")
        cfg.data.path = None
        pretrain(cfg, None, tmp_path / "o3")


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = write_demo_folder(tmp_path / "data", crops_per_photo=0, max_side=64)  # 15 photographs
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = small_cfg("simmim", "optim.batch_size=16", "run.max_steps=2")  # 16 files: the bad one in every batch
    with pytest.warns(UserWarning, match="broken.jpg"):
        ckpt = pretrain(cfg, data, tmp_path / "run", resume="none")
    assert [r["num_skipped"] for r in read_metrics(ckpt.parent / "metrics.jsonl")] == [1, 2]
    assert safe_load(ckpt)["num_skipped"] == 2
    from kamim.data import ImageLoadError

    with pytest.raises(ImageLoadError, match="broken.jpg"):
        pretrain(small_cfg("simmim", "optim.batch_size=16", "data.strict=true"), data, tmp_path / "strict")



def test_a_micro_batch_of_only_unreadable_images_contributes_nothing(tmp_path):
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(4):
        (data / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = small_cfg("simmim", "optim.batch_size=4", "optim.accum_steps=2", "run.max_steps=1")
    with pytest.warns(UserWarning, match="broken"):
        ckpt = pretrain(cfg, data, tmp_path / "run", resume="none")
    (row,) = read_metrics(ckpt.parent / "metrics.jsonl")
    assert (row["num_skipped"], row["loss"], row["grad_norm"]) == (4, 0.0, 0.0)

# --------------------------------------------------------------------------- outputs

def test_checkpoint_contents_and_encoder_export(demo30, tmp_path):
    cfg = small_cfg("kamim", "run.max_steps=2", "run.keep_step_checkpoints=true", "run.ckpt_every_steps=1")
    ckpt_path = pretrain(cfg, demo30, tmp_path / "run", resume="none")
    run = ckpt_path.parent
    assert {"checkpoint-00000001.pt", "checkpoint-00000002.pt", LAST_CHECKPOINT, ENCODER_FILE, "config.yaml",
            "metrics.jsonl", "metrics.csv", "summary.json"} <= {p.name for p in run.iterdir()}
    ckpt = load_pretrain_checkpoint(ckpt_path)  # weights_only
    assert (ckpt["format"], ckpt["version"], ckpt["method"], ckpt["step"]) == ("kamim-pretrain", 1, "kamim", 2)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config", "encoder_spec"}
    assert ckpt["config"]["kamim"]["temperature"] == 0.25 and ckpt["config"]["data"]["path"] == str(demo30)
    saved = load_config(str(run / "config.yaml"))
    assert saved.model.img_size == 48 and saved.data.path == str(demo30) and saved.kamim == cfg.kamim

    # AdamW groups: no weight decay on biases, norms and the model's no_weight_decay() names
    model = build_model(cfg)
    skip = model.no_weight_decay()
    assert {"backbone.mask_token", "backbone.encoder.pos_embed", "backbone.encoder.cls_token"} <= skip
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = {g["weight_decay"]: len(g["params"]) for g in ckpt["optimizer"]["param_groups"]}
    n_no_decay = sum(1 for n, p in named if p.ndim <= 1 or n in skip)
    assert groups == {0.0: n_no_decay, 0.05: len(named) - n_no_decay}

    sd, meta = load_safetensors(run / ENCODER_FILE)
    assert (meta["method"], meta["step"]) == ("kamim", "2")
    encoder = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["kwargs"])).eval()
    encoder.load_state_dict(sd, strict=True)
    model.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), model.encoder.eval().forward_features(x))
    # the project's universal loader reads both outputs into the same timm encoder
    from kamim.checkpoints import load_encoder

    assert ckpt["encoder_prefix"] == "backbone.encoder."
    for source in (ckpt_path, run / ENCODER_FILE):
        loaded = load_encoder(source)
        assert loaded.method == "kamim"
        with torch.no_grad():
            assert torch.equal(loaded.model.forward_features(x), encoder.forward_features(x))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["final_loss"] == pytest.approx(read_metrics(run / "metrics.jsonl")[-1]["loss"])


def test_metrics_logger_truncates_on_resume(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(1, 6):
        log.log({"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 0.1, "extra": "x"})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a crash
    MetricsLogger(tmp_path, resume_step=3).log({"step": 4, "loss": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == "nan" and rows[0]["extra"] == "x"
    with open(tmp_path / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    MetricsLogger(tmp_path)  # a fresh (non-resumed) run starts empty files
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    MetricsLogger(tmp_path / "rank1", enabled=False).log({"step": 1})
    assert not (tmp_path / "rank1").exists()


def test_swin_pretraining_and_export(demo30, tmp_path):
    """The engine takes the mask grid from the model (Swin: 4 px patch-embedding grid, stride 32)."""
    cfg = load_config("tiny_kamim", ["model.arch=swin_pico", "optim.batch_size=6", "run.max_steps=2",
                                     "run.progress=false", "run.ckpt_every_steps=0"])
    ckpt = pretrain(cfg, demo30, tmp_path / "swin", resume="none")
    assert all(math.isfinite(r["loss"]) for r in read_metrics(ckpt.parent / "metrics.jsonl"))
    sd, meta = load_safetensors(ckpt.parent / ENCODER_FILE)
    encoder = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["kwargs"]))
    encoder.load_state_dict(sd, strict=True)
    assert type(encoder).__name__ == "SwinTransformer"


@pytest.mark.parametrize("flag", ["tensorboard", "wandb"])
def test_optional_loggers_are_lazy(flag, tmp_path):
    """Never required: asking for a missing one is a one-line error naming the package."""
    try:
        __import__(flag)
    except ImportError:
        with pytest.raises(ValueError, match=f"run.{flag}=true needs the '{flag}' package"):
            MetricsLogger(tmp_path / flag, **{flag: True})
    else:
        pytest.skip(f"{flag} is installed")


def test_gradients_are_clipped_to_clip_grad(demo30, tmp_path, monkeypatch):
    real_clip = torch.nn.utils.clip_grad_norm_
    norms: list[tuple[float, float, float]] = []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        before = float(real_clip(params, float("inf")))
        out = real_clip(params, max_norm, *args, **kwargs)
        after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        norms.append((before, after, max_norm))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    pretrain(small_cfg("kamim", "optim.clip_grad=0.001", "run.max_steps=3"), demo30, tmp_path / "clip", resume="none")
    assert len(norms) == 3
    for before, after, max_norm in norms:
        assert max_norm == 0.001
        assert before > max_norm  # clipping really had something to do
        assert after == pytest.approx(max_norm, rel=1e-4)


def test_model_overrides_and_mask_geometry_errors_name_the_value(demo30, tmp_path):
    with pytest.raises(ConfigError, match=r"model.overrides=.*'colour'.*rejected by model.arch='vit_pico'"):
        pretrain(small_cfg("kamim", "model.overrides={colour: 1}"), demo30, tmp_path / "a", resume="none")
    # 12 px mask blocks divide the 48 px image but not the 8 px model patches
    with pytest.raises(ValueError, match=r"mask_patch_size.*12.*8"):
        pretrain(small_cfg("kamim", "mask.mask_patch_size=12"), demo30, tmp_path / "b", resume="none")
