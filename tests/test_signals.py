"""A stop signal sent to the whole process group (what SLURM and a terminal's Ctrl-C do), loader
workers included: every command stops with one line and the exit status of the signal; a training
run finishes its step and writes the checkpoint it names.

Each run is a ``kamim`` process in a session of its own; the signal is sent to that session's process
group from inside the model's forward call number ``AT`` (deterministic), while two loader workers
are alive.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from eval_helpers import photo_crops

from kamim.serialization import safe_load

AT = 3

# the command, with ``MODULE.resolve_encoder`` or ``MODULE.build_model`` wrapped so that the model's
# patch embedding call number AT (one per forward pass) signals the process group, loader workers included
_SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys, importlib
    module, attr, at, signum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mod = importlib.import_module(module)
    real = getattr(mod, attr)

    def hooked(*args, **kwargs):
        out = real(*args, **kwargs)
        model = getattr(out, "model", out)
        model = next((m for n, m in model.named_modules() if n.endswith("patch_embed")), model)
        calls = []

        def hook(_module, _args):
            calls.append(1)
            if len(calls) == at:  # sent by another process, as a scheduler's is (not by the workers' parent)
                subprocess.run(["/bin/sh", "-c", f"kill -{signum} -{os.getpgid(0)}"])

        model.register_forward_pre_hook(hook)
        return out

    setattr(mod, attr, hooked)
    from kamim.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def _run_signalled(module: str, attr: str, argv: list[str], signum: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", _SCRIPT, module, attr, str(AT), str(int(signum)), *argv],
                          capture_output=True, text=True, timeout=300, start_new_session=True, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return photo_crops(tmp_path_factory.mktemp("sig") / "data", n_train_per_class=6, n_val_per_class=3)


@pytest.fixture(scope="module")
def encoder(data, tmp_path_factory):
    """The encoder export of a one-step tiny SimMIM run."""
    from kamim.config import load_config
    from kamim.engine.pretrain import pretrain

    cfg = load_config("tiny_simmim", ["model.img_size=32", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
                                      "mask.mask_patch_size=16", "optim.batch_size=6", "run.progress=false",
                                      "run.max_steps=1", "data.num_workers=0"])
    run = tmp_path_factory.mktemp("sig") / "run"
    pretrain(cfg, data / "train", run, resume="none")
    return run / "encoder.safetensors"


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " kamim." not in line]  # log rows aside
    assert len(lines) == 1, proc.stderr  # no worker traceback, no "Exception ignored"
    return lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_pretraining_signalled_with_its_loader_workers_saves_the_step(data, tmp_path, signum):
    out = tmp_path / "run"
    proc = _run_signalled("kamim.engine.pretrain", "build_model", [
        "pretrain", "--config", "tiny_simmim", "--data", str(data / "train"), "--out", str(out),
        "--set", "model.img_size=32", "--set", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
        "--set", "optim.batch_size=6", "--set", "run.progress=false", "--set", "run.ckpt_every_steps=0",
        "--set", "run.max_steps=50", "--set", "data.num_workers=2", "--set", "mask.mask_patch_size=16"],
        signum)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, proc.stderr
    assert _one_line(proc) == (f"kamim: interrupted: stopped by {name} after step {AT}; checkpoint saved "
                               f"({out / 'checkpoint-last.pt'}); rerun the same command to resume")
    assert safe_load(out / "checkpoint-last.pt")["step"] == AT
    assert (out / "encoder.safetensors").is_file()


def test_linear_probe_signalled_with_its_loader_workers_saves_the_step(data, encoder, tmp_path):
    out = tmp_path / "lp"
    proc = _run_signalled("kamim.eval.linprobe", "resolve_encoder", [
        "linprobe", "--checkpoint", str(encoder), "--data", str(data),
        "--out", str(out), "--num-workers", "2", "--device", "cpu", "--amp", "none", "--no-progress",
        "--epochs", "3", "--batch-size", "6", "--aug", "none"])
    assert proc.returncode == 143, proc.stderr
    line = _one_line(proc)
    # forward call AT is the frozen encoder's during optimizer step AT: the step ends, then it saves
    assert line == (f"kamim: interrupted: stopped by SIGTERM after step {AT}; checkpoint saved "
                    f"({out / 'checkpoint-last.pt'}); rerun the same command to resume"), line
    assert safe_load(out / "checkpoint-last.pt")["step"] == AT


def test_knn_signalled_with_its_loader_workers_stops_with_one_line(data, encoder, tmp_path):
    out = tmp_path / "knn"
    proc = _run_signalled("kamim.eval.knn", "resolve_encoder", [
        "knn", "--checkpoint", str(encoder), "--data", str(data),
        "--out", str(out), "--num-workers", "2", "--device", "cpu", "--amp", "none", "--no-progress",
        "--batch-size", "4"])
    assert proc.returncode == 143, proc.stderr
    assert _one_line(proc) == "kamim: interrupted: stopped by SIGTERM"
    assert not (out / "knn.json").exists()
