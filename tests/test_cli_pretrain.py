"""The ``kamim`` command: help, presets, pretrain, sweep, and one-line errors with exit status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kamim.cli import build_parser, main
from kamim.config import list_presets
from kamim.data import write_demo_folder
from kamim.metrics_log import read_metrics
from kamim.serialization import safe_load

SMALL = [
    "model.img_size=48", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "optim.batch_size=6",
    "run.progress=false", "run.ckpt_every_steps=0", "run.max_steps=2",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_folder(tmp_path_factory.mktemp("demo"), crops_per_photo=1, max_side=96)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # exactly one line, no traceback
    assert err[0].startswith("kamim: error: ")
    return err[0]


@pytest.mark.parametrize("argv, expected", [
    ([], ["pretrain", "sweep", "presets", "doctor"]),
    (["pretrain"], ["--config", "--data", "--out", "--set", "--resume"]),
    (["sweep"], ["--detectors", "--weight-patch-sizes", "--temperatures", "--set", "--out"]),
    (["presets"], ["usage: kamim presets"]),
])
def test_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


def test_parser_is_extensible():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"pretrain", "sweep", "presets", "doctor"}


def test_presets_lists_every_preset_by_command(capsys):
    from kamim.config import COMMAND_CONFIGS

    assert main(["presets"]) == 0
    listed: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.strip().splitlines():
        if not line.startswith(" "):
            command = line.rstrip(":")
            listed[command] = []
        else:
            name, description = line.split(maxsplit=1)
            listed[command].append(name)
            assert description
    assert listed == {c: list_presets(cls) for c, cls in COMMAND_CONFIGS.items() if list_presets(cls)}
    assert "tiny_kamim" in listed["pretrain"] and listed["linprobe"] == ["mae", "reference"]
    assert listed["finetune"] == ["mae"]


def test_bad_inputs_print_one_line_and_exit_2(tmp_path, demo, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["pretrain", "--config", "tiny_kamim", "--data", str(empty), "--out", str(tmp_path / "o")], str(empty)),
        (["pretrain", "--config", "tiny_kamim", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
         str(tmp_path / "missing")),
        (["pretrain", "--config", "kamim_vit_zz", "--out", str(tmp_path / "o")], "unknown preset 'kamim_vit_zz'"),
        (["pretrain", "--config", "tiny_kamim", "--data", str(demo), "--out", str(tmp_path / "o"),
          "--set", "kamim.temperature=0"], "kamim.temperature=0.0 must be > 0"),
        (["pretrain", "--config", "tiny_kamim", "--data", str(demo), "--out", str(tmp_path / "o"),
          "--set", "kamim.temprature=1"], "unknown config key 'kamim.temprature'"),
        (["pretrain", "--config", "tiny_kamim", "--data", str(demo), "--out", str(tmp_path / "o"),
          "--resume", str(tmp_path / "nowhere")], "resume checkpoint not found"),
        (["sweep", "--config", "tiny_simmim", "--data", str(demo), "--out", str(tmp_path / "s")],
         "a sweep varies KAMIM settings but the config has method='simmim'"),
        (["sweep", "--config", "tiny_kamim", "--data", str(demo), "--out", str(tmp_path / "s"),
          "--weight-patch-sizes", "8,7"], "kamim.weight_patch_size=7 must divide model.img_size=96"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert expected in _error_line(capsys), argv
    assert not (tmp_path / "o").exists()  # failed runs leave no empty run directory


def test_pretrain_and_sweep_refuse_a_folder_with_user_files(tmp_path, demo, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for cmd, config, grid in (("pretrain", "tiny_simmim", []), ("sweep", "tiny_kamim", ["--weight-patch-sizes", "8"])):
        assert main([cmd, "--config", config, "--data", str(demo), "--out", str(out), *grid, "--set", *SMALL]) == 2
        assert "holds files this command did not write (notes.txt)" in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", "tiny_kamim", "--out", "", "--data", str(demo)])
    assert exc.value.code == 2  # an argument error is one line too, like kamim-analyze's
    assert capsys.readouterr().err.strip() == "kamim: error: argument --out: expected a folder, got an empty value"


def test_error_exit_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kamim.cli", "pretrain", "--config", "tiny_kamim", "--out", str(tmp_path),
         "--set", "mask.mask_ratio=1.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kamim: error: mask.mask_ratio=1.5 must be in (0, 1)"


def test_pretrain_command_prints_outputs_and_resumes(tmp_path, demo, capsys):
    out = tmp_path / "run"
    argv = ["-q", "pretrain", "--config", "tiny_simmim", "--data", str(demo), "--out", str(out), "--set", *SMALL]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"checkpoint: {out / 'checkpoint-last.pt'}", f"encoder:    {out / 'encoder.safetensors'}"]
    assert safe_load(out / "checkpoint-last.pt")["step"] == 2
    # --resume auto continues the run when max_steps grows
    assert main([*argv, "run.max_steps=3"]) == 0
    assert safe_load(out / "checkpoint-last.pt")["step"] == 3
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]



def test_moco_heads_of_a_cli_run_are_the_sizes_its_config_states(tmp_path, demo):
    """``kamim pretrain --config tiny_moco``: the saved model's projector/predictor have the sizes the
    config file states; the architecture presets state none."""
    from kamim.config import load_config
    from kamim.models import PRESETS

    moco = load_config("tiny_moco").moco
    out = tmp_path / "moco"
    assert main(["-q", "pretrain", "--config", "tiny_moco", "--data", str(demo), "--out", str(out),
                 "--set", *SMALL, "run.max_steps=1"]) == 0
    state = safe_load(out / "checkpoint-last.pt")["model"]
    assert tuple(state["projector.0.weight"].shape)[0] == moco.mlp_dim
    assert tuple(state["predictor.0.weight"].shape) == (moco.mlp_dim, moco.dim)
    assert tuple(state["predictor.3.weight"].shape)[0] == moco.dim
    assert (moco.dim, moco.mlp_dim) == (64, 256)
    assert all(set(p) == {"model_name", "kwargs"} for p in PRESETS.values())
