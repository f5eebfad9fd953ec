"""Pretraining run directories stay consistent under kills, divergence, signals and concurrent use."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn as nn
from eval_helpers import signal_at
from test_pretrain import SMALL, _assert_state_equal, demo30  # noqa: F401 (fixture)

import importlib

engine = importlib.import_module("kamim.engine.pretrain")
from kamim.checkpoints import load_encoder
from kamim.config import ConfigError, load_config
from kamim.engine.pretrain import ENCODER_FILE, LAST_CHECKPOINT, NonFiniteLossError, pretrain
from kamim.interrupt import Interrupted
from kamim.outputs import OutputDirError, lock_output, lock_path
from kamim.serialization import CheckpointError, load_safetensors, read_safetensors_metadata, safe_load


def cfg(*extra: str):
    return load_config("tiny_simmim", SMALL + list(extra))


class _Kill(BaseException):
    """Stands for SIGKILL: nothing after it runs, no except-clause catches it."""


def test_kill_between_checkpoint_and_export_is_detected_and_repaired(demo30, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(cfg("run.max_steps=2"), demo30, run, resume="none")
    real_export, calls = engine.export_encoder, []

    def export_then_die(*args, **kwargs):
        calls.append(kwargs["step"])
        if kwargs["step"] == 4:
            raise _Kill
        return real_export(*args, **kwargs)

    monkeypatch.setattr(engine, "export_encoder", export_then_die)
    with pytest.raises(_Kill):
        pretrain(cfg("run.max_steps=4"), demo30, run)
    assert safe_load(run / LAST_CHECKPOINT)["step"] == 4
    assert read_safetensors_metadata(run / ENCODER_FILE)["step"] == "2"  # the stale export
    with pytest.raises(CheckpointError, match="does not come from .*checkpoint-last.pt .*rerun the same"):
        load_encoder(run)
    # however the export is named: the path --help suggests, or a copy renamed beside the checkpoint
    import shutil

    shutil.copy(run / ENCODER_FILE, run / "mine.safetensors")
    for path in (run / ENCODER_FILE, run / "mine.safetensors"):
        with pytest.raises(CheckpointError, match="does not come from .*checkpoint-last.pt .*rerun the same"):
            load_encoder(path)
    (run / "mine.safetensors").unlink()
    monkeypatch.setattr(engine, "export_encoder", real_export)
    pretrain(cfg("run.max_steps=4"), demo30, run)  # "nothing to do", but the export is repaired
    enc = load_encoder(run)
    ckpt = safe_load(run / LAST_CHECKPOINT)
    assert read_safetensors_metadata(run / ENCODER_FILE)["checkpoint_id"] == ckpt["save_id"]
    weights, _ = load_safetensors(run / ENCODER_FILE)
    prefix = ckpt["encoder_prefix"]
    _assert_state_equal(weights, {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    assert enc.model is not None


@pytest.mark.parametrize("override", ["optim.lr=1e39", "optim.weight_decay=1e300"])
def test_non_finite_parameters_are_never_saved(demo30, tmp_path, override):
    """A huge learning rate or weight decay makes parameters inf after one step whose loss was finite."""
    run = tmp_path / "run"
    pretrain(cfg("run.max_steps=2"), demo30, run, resume="none")
    good = safe_load(run / LAST_CHECKPOINT)
    with pytest.raises(NonFiniteLossError) as exc:
        pretrain(cfg("run.max_steps=3", override, "run.ckpt_every_steps=1", "optim.warmup_epochs=0"),
                 demo30, tmp_path / "fresh", resume="none")
    assert str(exc.value).startswith("non-finite values in ") and str(exc.value).endswith("no checkpoint written")
    assert not (tmp_path / "fresh" / LAST_CHECKPOINT).exists()
    _assert_state_equal(safe_load(run / LAST_CHECKPOINT)["model"], good["model"])


def test_nonfinite_state_names_the_tensors():
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert engine.nonfinite_state(model.state_dict(), opt.state_dict()) == []
    opt.state[model.weight]["exp_avg"][0, 0] = float("inf")
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert engine.nonfinite_state(model.state_dict(), opt.state_dict()) == ["model.bias", "optimizer.state.0.exp_avg"]


def test_extending_a_max_steps_schedule_is_refused(demo30, tmp_path):
    run = tmp_path / "run"
    pretrain(cfg("run.max_steps=4", "run.max_steps_schedule=true"), demo30, run, resume="none")
    with pytest.raises(ConfigError, match=r"its LR schedule is 4 steps .* this config gives 8"):
        pretrain(cfg("run.max_steps=8", "run.max_steps_schedule=true"), demo30, run)
    assert safe_load(run / LAST_CHECKPOINT)["step"] == 4


def test_a_locked_run_directory_is_refused_with_the_holders_pid(demo30, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(cfg("run.max_steps=1"), demo30, run, resume="none")
    lookups = []
    real = engine.find_resume_checkpoint
    monkeypatch.setattr(engine, "find_resume_checkpoint", lambda *a, **k: lookups.append(1) or real(*a, **k))
    with lock_output(run) as lock:
        assert lock_path(run).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputDirError, match=rf"run directory '.*run' is in use by another process "
                                                 rf"\(pid {os.getpid()}\)"):
            pretrain(cfg("run.max_steps=2"), demo30, run)
        assert lock.path == tmp_path / ".run.lock" and lookups == []  # refused before the checkpoint lookup
    assert safe_load(run / LAST_CHECKPOINT)["step"] == 1
    pretrain(cfg("run.max_steps=2"), demo30, run)  # released: the run continues
    assert safe_load(run / LAST_CHECKPOINT)["step"] == 2


def test_temp_files_of_killed_saves_are_removed(demo30, tmp_path):
    run = tmp_path / "run"
    pretrain(cfg("run.max_steps=1"), demo30, run, resume="none")
    debris = run / ".checkpoint-last.pt.ab12_xyz.tmp"
    debris.write_bytes(b"x" * 100)
    keep = run / ".notes.tmp"  # not a name atomic_write makes
    keep.write_text("mine")
    pretrain(cfg("run.max_steps=2"), demo30, run)
    assert not debris.exists() and keep.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_finishes_the_step_saves_and_resumes_bit_exact(signum, demo30, tmp_path, monkeypatch):
    straight = pretrain(cfg("run.max_steps=5"), demo30, tmp_path / "a", resume="none")
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda c: signal_at(real_build(c), at=3, signum=signum))
    with pytest.raises(Interrupted) as exc:
        pretrain(cfg("run.max_steps=5"), demo30, tmp_path / "b", resume="none")
    assert exc.value.exit_status == 128 + signum
    assert str(exc.value).startswith(f"stopped by {signal.Signals(signum).name} after step 3; checkpoint saved")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert safe_load(tmp_path / "b" / LAST_CHECKPOINT)["step"] == 3
    monkeypatch.setattr(engine, "build_model", real_build)
    resumed = pretrain(cfg("run.max_steps=5"), demo30, tmp_path / "b")
    _assert_state_equal(safe_load(straight)["model"], safe_load(resumed)["model"])


def test_a_signal_during_the_last_step_saves_it_once_and_the_rerun_only_finishes(demo30, tmp_path, monkeypatch):
    straight = pretrain(cfg("run.max_steps=5"), demo30, tmp_path / "a", resume="none")
    real_build = engine.build_model
    monkeypatch.setattr(engine, "build_model", lambda c: signal_at(real_build(c), at=5))
    with pytest.raises(Interrupted, match="after step 5; checkpoint saved"):
        pretrain(cfg("run.max_steps=5"), demo30, tmp_path / "b", resume="none")
    assert safe_load(tmp_path / "b" / LAST_CHECKPOINT)["step"] == 5
    assert not (tmp_path / "b" / "summary.json").exists()  # the run did not claim to have finished
    monkeypatch.setattr(engine, "build_model", real_build)
    done = pretrain(cfg("run.max_steps=5"), demo30, tmp_path / "b")
    assert (tmp_path / "b" / "summary.json").is_file()
    _assert_state_equal(safe_load(straight)["model"], safe_load(done)["model"])


def _flip_tensor_bytes(path, n: int = 400) -> None:
    """Flip ``n`` bytes inside the largest tensor record of a torch zip checkpoint (torch checks no CRC)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
        f.seek(start + 64)
        data = bytearray(f.read(n))
        f.seek(start + 64)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_corrupted_checkpoint_is_refused_on_resume_and_on_load(demo30, tmp_path):
    run = tmp_path / "run"
    pretrain(cfg("run.max_steps=2"), demo30, run, resume="none")
    _flip_tensor_bytes(run / LAST_CHECKPOINT)
    message = rf"^{run / LAST_CHECKPOINT} is corrupted: its content does not match the checksum written with it"
    with pytest.raises(CheckpointError, match=message):
        pretrain(cfg("run.max_steps=3"), demo30, run)
    with pytest.raises(CheckpointError, match=message):
        load_encoder(run / LAST_CHECKPOINT)
    with pytest.raises(CheckpointError, match=message):
        safe_load(run / LAST_CHECKPOINT)
