"""One configuration mechanism for every command: ``--config`` (preset, recipe or file) and ``--set``,
flags as shorthands with no second default, ``config.yaml`` in every output that reruns the run
exactly, and bad configs refused before torch is imported."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from eval_helpers import photo_crops

from analysis.settings import AnalyzeConfig
from kamim.cli import build_parser, main
from kamim.config import COMMAND_CONFIGS, LinprobeConfig, field_default, load_command_config
from kamim.data import write_demo_folder
from kamim.metrics_log import read_metrics
from kamim.serialization import safe_load

EVAL_COMMANDS = ("linprobe", "finetune", "knn", "reconstruct")
TINY_PRETRAIN = ["model.img_size=32", "model.overrides={embed_dim: 32, depth: 3, num_heads: 2}",
                 "mask.mask_patch_size=16", "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0",
                 "run.device=cpu", "run.amp=none", "run.max_steps=2", "run.progress=false",
                 "run.ckpt_every_steps=0", "data.num_workers=0"]
EXEC = ["--num-workers", "0", "--device", "cpu", "--amp", "none", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cfg")
    data = photo_crops(base / "data", n_train_per_class=6, n_val_per_class=3)
    demo = write_demo_folder(base / "demo", crops_per_photo=1, max_side=64)
    run = base / "pretrain"
    assert main(["-q", "pretrain", "--config", "tiny_simmim", "--data", str(demo), "--out", str(run),
                 "--set", *TINY_PRETRAIN]) == 0
    return {"data": data, "demo": demo, "run": run, "encoder": run / "encoder.safetensors"}


def _subparser(name: str) -> argparse.ArgumentParser:
    return next(a for a in build_parser()._actions if a.dest == "command").choices[name]


def _argv(command: str, setup, out) -> list[str]:
    """A small run of ``command`` with default options but for size."""
    enc, data = str(setup["encoder"]), str(setup["data"])
    return {
        "pretrain": ["pretrain", "--config", "tiny_simmim", "--data", str(setup["demo"]), "--out", str(out),
                     "--set", *TINY_PRETRAIN],
        "sweep": ["sweep", "--config", "tiny_kamim", "--data", str(setup["demo"]), "--out", str(out),
                  "--weight-patch-sizes", "8", "--temperatures", "0.25", "--eval-data", data, "--eval-k", "3",
                  "--set", *TINY_PRETRAIN],
        "linprobe": ["linprobe", "--checkpoint", enc, "--data", data, "--out", str(out), *EXEC,
                     "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "12", "--layers", "all"],
        "finetune": ["finetune", "--checkpoint", enc, "--data", data, "--out", str(out), *EXEC,
                     "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "12"],
        "knn": ["knn", "--checkpoint", enc, "--data", data, "--out", str(out), *EXEC, "--k", "3,5"],
        "reconstruct": ["reconstruct", "--checkpoints", f"mine={setup['run']}", "--data", data + "/val",
                        "--out", str(out), *EXEC, "--figure-images", "0"],
    }[command]


RESULTS = {"sweep": "results.csv", "linprobe": "linprobe.csv", "finetune": "finetune.csv", "knn": "knn.csv", "reconstruct": "reconstruct.csv"}


@pytest.mark.parametrize("command", ["pretrain", "sweep", *EVAL_COMMANDS])
def test_help_shows_config_and_set(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--config" in out and "--set KEY=VALUE" in out


@pytest.mark.parametrize("command", ["pretrain", "sweep", *EVAL_COMMANDS])
def test_config_yaml_reruns_the_same_results(command, setup, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["-q", *_argv(command, setup, first)]) == 0
    assert (first / "config.yaml").is_file()
    assert main(["-q", command, "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    if command == "pretrain":
        a, b = read_metrics(first / "metrics.jsonl"), read_metrics(again / "metrics.jsonl")
        assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 2
        sa, sb = safe_load(first / "checkpoint-last.pt")["model"], safe_load(again / "checkpoint-last.pt")["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    elif command == "sweep":  # the same table but for where each run lives
        a, b = (list(csv.DictReader((d / "results.csv").open())) for d in (first, again))
        assert [{k: v for k, v in r.items() if k != "run_dir"} for r in a] == \
            [{k: v for k, v in r.items() if k != "run_dir"} for r in b]
        assert len(a) == 1 and a[0]["knn_top1"] and a[0]["status"] == "trained"
    else:
        assert (first / RESULTS[command]).read_text() == (again / RESULTS[command]).read_text()
        rows = list(csv.DictReader((first / RESULTS[command]).open()))
        assert rows and all(v != "" for v in rows[0].values())
    # the rerun's config differs only in where it was written (pretrain and sweep record no output_dir)
    a, b = ((d / "config.yaml").read_text().splitlines() for d in (first, again))
    changed = [x for x in a if x not in b]
    assert changed == ([] if command in ("pretrain", "sweep") else [f"output_dir: {first}"]), changed


@pytest.mark.parametrize("command", ["sweep", *EVAL_COMMANDS])
def test_no_default_is_written_twice(command):
    """Every flag of an evaluation command is a shorthand of --set: its argparse default is None
    ('not given'), and the one default lives in the config dataclass."""
    p = _subparser(command)
    keys = p.get_default("config_flags")
    assert p.get_default("config_cls") is COMMAND_CONFIGS["pretrain" if command == "sweep" else command] and keys
    skip = {"help", "config", "overrides", "out", "overwrite", "func", "config_cls", "config_flags"}
    for action in p._actions:
        if action.dest in skip:
            continue
        assert action.default is None, (command, action.option_strings, action.default)
        assert action.dest in keys, (command, action.option_strings)  # every flag maps to a config key
    fields = {f.name for f in dataclasses.fields(p.get_default("config_cls"))}
    assert {k.split(".")[0] for k in keys.values()} <= fields


def test_precedence_defaults_config_flags_set(tmp_path):
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("base: mae\nepochs: 7\nlayers: all\n")
    args = _subparser("linprobe").parse_args(["--config", str(recipe), "--checkpoint", "c", "--data", "d",
                                              "--out", "o", "--epochs", "5", "--set", "epochs=3", "pool=cls"])
    from kamim.config import config_from_args

    cfg = config_from_args(LinprobeConfig, args, args.config_flags, {"output_dir": "o"})
    assert (cfg.epochs, cfg.layers, cfg.pool, cfg.opt, cfg.recipe) == (3, "all", "cls", "lars", "mae")
    assert cfg.warmup_epochs == field_default(LinprobeConfig, "warmup_epochs")  # untouched: the default
    with pytest.raises(ValueError, match="unknown config key 'epoch'; valid keys: checkpoint, data"):
        load_command_config(LinprobeConfig, None, ["epoch=3"], {"checkpoint": "c", "data": "d", "output_dir": "o"})


def test_recipes_are_files_and_reproduce_the_papers_settings():
    ref = load_command_config(LinprobeConfig, "reference", values={"checkpoint": "c", "data": "d",
                                                                   "output_dir": "o"}).resolved()
    assert (ref.layers, ref.pool, ref.opt, ref.base_lr, ref.batchnorm, ref.aug) == ("default", "avg", "adamw",
                                                                                   1e-3, False, "finetune")
    mae = load_command_config(LinprobeConfig, "mae", values={"checkpoint": "c", "data": "d",
                                                             "output_dir": "o"}).resolved()
    assert (mae.opt, mae.base_lr, mae.weight_decay, mae.batchnorm, mae.aug, mae.epochs) == ("lars", 0.1, 0.0, True,
                                                                                             "light", 90)
    ft = load_command_config(COMMAND_CONFIGS["finetune"], "mae", values={"checkpoint": "c", "data": "d",
                                                                         "output_dir": "o"})
    assert (ft.layer_decay, ft.drop_path, ft.mixup, ft.cutmix, ft.batch_size, ft.base_lr) == (0.65, 0.1, 0.8, 1.0,
                                                                                             1024, 5e-4)


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--config", "no_such_preset", "--out", "{tmp}/p"], "unknown preset 'no_such_preset'"),
    (["pretrain", "--config", "tiny_kamim", "--out", "{tmp}/p", "--set", "no.such.key=1"],
     "unknown config key 'no'"),
    (["linprobe", "--config", "nope", "--checkpoint", "c", "--data", "d", "--out", "{tmp}/l"],
     "unknown preset 'nope'"),
    (["knn", "--checkpoint", "c", "--data", "d", "--out", "{tmp}/k", "--set", "temperature=-1"],
     "temperature=-1"),
    (["finetune", "--data", "d", "--out", "{tmp}/f"], "missing config key 'checkpoint': give --checkpoint"),
])
def test_bad_configs_are_refused_before_torch_is_imported(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = ("import sys; from kamim.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 2 and err[0].startswith("kamim: error: ") and message in err[0], err
    assert err[1] == "False"  # torch was never imported


def test_results_record_the_resolved_recipe(setup, tmp_path):
    out = tmp_path / "lp"
    assert main(["-q", *_argv("linprobe", setup, out), "--recipe", "mae"]) == 0
    summary = json.loads((out / "linprobe.json").read_text())
    assert (summary["config"]["opt"], summary["config"]["batchnorm"]) == ("lars", True)
    reread = load_command_config(LinprobeConfig, out / "config.yaml")
    assert (reread.opt, reread.base_lr, reread.aug, reread.recipe) == ("lars", 0.1, "light", "mae")


def _analyze_subparser(name: str) -> argparse.ArgumentParser:
    from analysis.cli import build_parser as analyze_parser

    return next(a for a in analyze_parser()._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command", ["run", "paper-figures"])
def test_analyze_flags_are_shorthands_of_set(command, capsys):
    from analysis.cli import main as analyze
    from analysis.settings import ANALYZE_CONFIGS

    with pytest.raises(SystemExit):
        analyze([command, "--help"])
    out = capsys.readouterr().out
    assert "--config" in out and "--set KEY=VALUE" in out and "--option KEY=VALUE" in out
    p = _analyze_subparser(command)
    assert p.get_default("config_cls") is ANALYZE_CONFIGS[command]
    skip = {"help", "config", "overrides", "out", "overwrite", "option", "model", "config_cls", "config_flags"}
    for action in p._actions:
        if action.dest not in skip:
            assert action.default is None, (command, action.option_strings, action.default)


def test_analyze_run_config_yaml_reruns_the_same_metrics(setup, tmp_path):
    from analysis.cli import main as analyze

    first, again = tmp_path / "first", tmp_path / "again"
    assert analyze(["run", "--model", f"A={setup['encoder']}", "--data", str(setup["data"] / "val"), "--out",
                    str(first), "--images", "6", "--analyses", "attention-distance,nmi,cka", "--quiet",
                    "--option", "cka_pool=cls"]) == 0
    cfg = load_command_config(AnalyzeConfig, first / "config.yaml")
    assert cfg.models == {"A": str(setup["encoder"])} and cfg.options == {"cka_pool": "cls"} and cfg.images == 6
    assert analyze(["run", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert (first / "metrics.csv").read_text() == (again / "metrics.csv").read_text()
    assert (first / "config.yaml").read_text() == (again / "config.yaml").read_text()
