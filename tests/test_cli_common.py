"""What ``kamim`` and ``kamim-analyze`` share: no torch import to parse arguments, one error rule
(:mod:`kamim.errors`), one-line argument errors, the same defaults (``--device auto``, loader
workers no more than the CPUs) and the same demo data names."""
from __future__ import annotations

import errno
import inspect
import json
import logging
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from analysis import cli as analyze_cli
from kamim import cli as kamim_cli
from analysis.settings import ANALYZE_CONFIGS
from kamim.config import COMMAND_CONFIGS, field_default
from kamim.data import loader_workers
from kamim.doctor import available_cpus
from kamim.errors import exit_code, format_error, run_command

KAMIM_COMMANDS = ["pretrain", "sweep", "presets", "linprobe", "finetune", "knn", "reconstruct", "doctor"]
ANALYZE_COMMANDS = ["run", "paper-figures", "plot", "demo"]

# Runs every argv in one fresh interpreter and reports, after each, whether torch was imported.
_PROBE = """
import json, sys
from {module} import main
seen = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit:
        pass
    seen.append('torch' in sys.modules)
print(json.dumps(seen))
"""


def _torch_imported(module: str, argvs: list[list[str]]) -> dict[str, bool]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(module=module), json.dumps(argvs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return dict(zip((" ".join(a) for a in argvs), json.loads(proc.stdout.strip().splitlines()[-1])))


def _help_and_usage_errors(commands: list[str], missing: list[str]) -> list[list[str]]:
    return [["--help"], *([c, "--help"] for c in commands), missing, ["no-such-command"]]


def test_kamim_help_and_argument_errors_do_not_import_torch():
    seen = _torch_imported("kamim.cli", _help_and_usage_errors(KAMIM_COMMANDS, ["pretrain"]) + [
        ["knn", "--checkpoint", "x", "--out", "y", "--data", "demo"], ["linprobe", "--num-workers", "x"]])
    assert not any(seen.values()), seen  # the first True is the culprit


def test_inputs_and_outputs_that_cannot_work_are_refused_before_torch_is_imported(tmp_path):
    """A missing --data folder or checkpoint path and an --out the output rule refuses: one line, no torch."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    ckpt = tmp_path / "enc.safetensors"
    ckpt.write_bytes(b"x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    out = str(tmp_path / "out")
    kamim_cases = [
        ["knn", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope"), "--out", out],
        ["linprobe", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data), "--out", out],
        ["finetune", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(foreign)],
        ["knn", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(data / "train")],
        ["reconstruct", "--checkpoints", f"a={tmp_path / 'nope'}/run", "--data", str(data), "--out", out],
    ]
    analyze_cases = [
        ["run", "--model", f"a={ckpt}", "--data", str(tmp_path / "nope"), "--out", out],
        ["run", "--model", f"a={tmp_path / 'nope.pt'}", "--data", str(data), "--out", out],
        ["run", "--model", f"a={ckpt}", "--data", str(data), "--out", str(foreign)],
    ]
    for module, cases in (("kamim.cli", kamim_cases), ("analysis.cli", analyze_cases)):
        seen = _torch_imported(module, cases)
        assert not any(seen.values()), seen
    expected = [f"labelled data folder not found: '{tmp_path / 'nope'}' (expected train/ and val/ inside)",
                f"checkpoint not found: '{tmp_path / 'nope.pt'}'", "holds files this command did not write",
                "lies inside the --data folder", f"checkpoint not found: '{tmp_path / 'nope'}/run'"]
    for argv, text in zip(kamim_cases, expected):
        proc = subprocess.run([sys.executable, "-m", "kamim.cli", *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and text in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and (foreign / "mine.txt").read_text() == "mine"


def test_analyze_help_and_argument_errors_do_not_import_torch():
    seen = _torch_imported("analysis.cli", _help_and_usage_errors(
        ANALYZE_COMMANDS, ["run", "--data", "x", "--out", "y"]))
    assert not any(seen.values()), seen


# --------------------------------------------------------------------------- one error rule

class _Interrupted(KeyboardInterrupt):  # like kamim.interrupt.Interrupted
    exit_status = 143


def _safetensors_error() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: HeaderTooLarge")


def _enospc_from_torch_save(numel: int) -> BaseException:
    import torch

    try:  # a small file fails with another message than a large one
        torch.save({"a": torch.zeros(numel)}, "/dev/full")
    except RuntimeError as err:
        return err
    pytest.skip("torch.save to /dev/full did not fail")


def _non_finite() -> Exception:
    from kamim.engine.pretrain import NonFiniteLossError

    return NonFiniteLossError("loss is nan at step 3")


def _image_load_error() -> Exception:
    from kamim.data.images import ImageLoadError

    return ImageLoadError("/d/x.jpg", "truncated file")


def _checkpoint_error() -> Exception:
    from kamim.serialization import CheckpointError

    return CheckpointError("'/x.pt' is not a checkpoint file")


ERRORS = {  # name: (make the exception, exit status, expected message after "PROG: ")
    "value": (lambda: ValueError("kamim.temperature=0.0 must be > 0"), 2,
              "error: kamim.temperature=0.0 must be > 0"),
    "value multi-line": (lambda: ValueError("first line\ncontinues\n\nlong explanation"), 2,
                         "error: first line continues"),
    "missing file": (lambda: FileNotFoundError("image folder not found: '/d'"), 2,
                     "error: image folder not found: '/d'"),
    "missing file (errno)": (lambda: FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/x"), 2,
                             "error: '/d/x': no such file or directory"),
    "file exists": (lambda: FileExistsError(errno.EEXIST, "File exists", "/d"), 2, "error: '/d': file exists"),
    "not a directory": (lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f"), 2,
                        "error: '/f': not a directory"),
    "is a directory": (lambda: IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), 2,
                       "error: '/d': is a directory"),
    "permission": (lambda: PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2,
                   "error: '/root/x': permission denied"),
    "disk full": (lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/r/ckpt.pt"), 2,
                  "error: cannot write '/runs/r/ckpt.pt': no space left on device"),
    "disk full, no name": (lambda: OSError(errno.ENOSPC, "No space left on device"), 2,
                           "error: cannot write a file: no space left on device"),
    "read-only": (lambda: OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2,
                  "error: cannot write '/ro/x': read-only file system"),
    "name too long": (lambda: OSError(errno.ENAMETOOLONG, "File name too long", "/d/" + "x" * 300), 2,
                      "error: '/d/" + "x" * 300 + "': file name too long"),
    "torch.save on a full disk": (lambda: _enospc_from_torch_save(10**6), 2, "error: cannot write a file"),
    "torch.save on a full disk, small": (lambda: _enospc_from_torch_save(10), 2, "error: cannot write a file"),
    "bare key": (lambda: KeyError("tsne_xy"), 2, "error: no such key: 'tsne_xy'"),
    "key with a message": (lambda: KeyError("model 'X' has no style in this palette"), 2,
                           "error: model 'X' has no style in this palette"),
    "image": (_image_load_error, 2, "error: cannot load image '/d/x.jpg': truncated file"),
    "checkpoint": (_checkpoint_error, 2, "error: '/x.pt' is not a checkpoint file"),
    "safetensors": (_safetensors_error, 2, "error: safetensors: Error while deserializing header: HeaderTooLarge"),
    "diverged": (_non_finite, 1, "error: loss is nan at step 3"),
    "ctrl-c": (KeyboardInterrupt, 130, "interrupted"),
    "signal": (lambda: _Interrupted("stopped by SIGTERM after step 5"), 143,
               "interrupted: stopped by SIGTERM after step 5"),
}


def _mains():
    """Both tools, with the command that runs replaced by ``func``."""
    def kamim(monkeypatch, func):
        monkeypatch.setattr(kamim_cli, "_cmd_presets", func)
        return kamim_cli.main(["presets"])

    def analyze(monkeypatch, func):
        monkeypatch.setitem(analyze_cli._COMMANDS, "run", func)
        return analyze_cli.main(["run", "--model", "A=x", "--data", "d", "--out", "o"])

    return {"kamim": kamim, "kamim-analyze": analyze}


@pytest.mark.parametrize("prog", ["kamim", "kamim-analyze"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_both_tools_end_the_same_way(case, prog, monkeypatch, capsys):
    make, status, message = ERRORS[case]
    err = make()

    def fail(args):
        raise err

    monkeypatch.delenv("KAMIM_DEBUG", raising=False)
    assert _mains()[prog](monkeypatch, fail) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: {message}"), lines[0]
    assert exit_code(err) == status and format_error(prog, err) == lines[0]


@pytest.mark.parametrize("prog", ["kamim", "kamim-analyze"])
def test_bugs_and_debug_keep_the_traceback(prog, monkeypatch):
    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.delenv("KAMIM_DEBUG", raising=False)
    with pytest.raises(RuntimeError, match="a bug"):
        _mains()[prog](monkeypatch, bug)

    def user_error(args):
        raise ValueError("bad value")

    monkeypatch.setenv("KAMIM_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        _mains()[prog](monkeypatch, user_error)
    monkeypatch.setenv("KAMIM_DEBUG", "0")
    assert run_command(prog, user_error, None) == 2


@pytest.mark.parametrize("main, argv, expected", [
    (kamim_cli.main, ["pretrain"], "kamim: error: the following arguments are required: --config, --out"),
    (kamim_cli.main, ["pretrian"], "kamim: error: argument COMMAND: invalid choice: 'pretrian'"),
    (kamim_cli.main, ["knn", "--k", "a,b"], "kamim: error: argument --k: expected a comma-separated list of int"),
    (analyze_cli.main, ["paper-figures", "--bogus"], "kamim-analyze: error: "),
])
def test_argument_errors_are_one_line(main, argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


# --------------------------------------------------------------------------- shared defaults

def _subparser(parser, name):
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def _default(parser, command, dest):
    return next(a for a in _subparser(parser, command)._actions if a.dest == dest).default


def test_device_defaults_to_auto_in_both_tools():
    for command in ("linprobe", "finetune", "knn", "reconstruct"):
        assert _default(kamim_cli.build_parser(), command, "device") is None  # not given: the config's
        assert field_default(COMMAND_CONFIGS[command], "device") == "auto"
    for command in ("run", "paper-figures"):
        assert _default(analyze_cli.build_parser(), command, "device") is None
        assert field_default(ANALYZE_CONFIGS[command], "device") == "auto"
    assert analyze_cli.resolve_device("auto") in ("cpu", "cuda")
    assert analyze_cli.resolve_device("cuda:1") == "cuda:1"


def test_num_workers_default_is_written_once_and_clamped_where_loaders_are_built(capsys, caplog):
    for command in ("linprobe", "finetune", "knn", "reconstruct"):
        assert _default(kamim_cli.build_parser(), command, "num_workers") is None
        assert field_default(COMMAND_CONFIGS[command], "num_workers") is None
    for command in ("run", "paper-figures"):  # the same default in kamim-analyze
        assert _default(analyze_cli.build_parser(), command, "num_workers") is None
        assert field_default(ANALYZE_CONFIGS[command], "num_workers") is None
    with pytest.raises(SystemExit):
        kamim_cli.main(["knn", "--help"])
    assert "--num-workers NUM_WORKERS data loader workers per process (default: min(4, CPUs available))" in \
        " ".join(capsys.readouterr().out.split())
    with caplog.at_level(logging.WARNING, logger="kamim"):
        assert loader_workers(None) == min(4, available_cpus())  # the default: no warning
        assert loader_workers(available_cpus()) == available_cpus()
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="kamim"):
        assert loader_workers(1000) == available_cpus()
        assert loader_workers(1000) == available_cpus()  # warned once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"1000 loader workers asked for, but only {available_cpus()} CPUs are available: "
                        f"using {available_cpus()}"]
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader_workers(-1)


def test_evaluations_point_demo_to_the_labelled_demo_sets(capsys):
    for argv in (["knn", "--checkpoint", "c", "--out", "o", "--data", "demo"],
                 ["sweep", "--config", "tiny_kamim", "--out", "o", "--eval-data", "demo"]):
        with pytest.raises(SystemExit) as exc:
            kamim_cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "'demo' is the unlabelled pretraining demo" in err and "demo-photos and demo-digits" in err


# --------------------------------------------------------------------------- kamim-analyze

def test_option_keys_are_the_run_options():
    from analysis import names
    from analysis.runner import ANALYSES, RunOptions, run_analyses

    assert names.ANALYSES is ANALYSES
    assert names.RUN_OPTIONS == tuple(f.name for f in fields(RunOptions))
    params = inspect.signature(run_analyses).parameters
    assert any(p.kind is p.VAR_KEYWORD for p in params.values())  # **options -> RunOptions
    assert not set(params) & set(names.RUN_OPTIONS)
    assert set(names.CLI_OPTIONS) < set(names.RUN_OPTIONS)


def test_run_help_lists_option_keys_and_run_directories(capsys):
    from analysis.names import CLI_OPTIONS

    with pytest.raises(SystemExit):
        analyze_cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse may wrap at a hyphen
    assert "`kamim pretrain` run directory" in text and "demo-photos" in text
    assert "keys: " + ", ".join(CLI_OPTIONS) in text


@pytest.mark.parametrize("name", ["demo-photos", "demo"])
def test_analyze_accepts_the_demo_data_names(name, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from analysis.pipeline import AnalyzeOutput
    from kamim.data.images import find_images

    monkeypatch.setenv("KAMIM_DATA_DIR", str(tmp_path / "cache"))
    seen = {}

    def analyze(models, data, out, **kw):
        seen["data"], seen["device"] = data, kw["device"]
        return AnalyzeOutput(Path(out), {}, {}, pd.DataFrame(), pd.DataFrame(), [], [])

    monkeypatch.setattr("analysis.pipeline.analyze", analyze)
    assert analyze_cli.main(["run", "--model", "A=x", "--data", name, "--out", str(tmp_path / "o")]) == 0
    folder = Path(seen["data"])
    assert folder.is_relative_to(tmp_path / "cache") and find_images(folder)
    if name == "demo-photos":  # the held-out split, one class folder per photograph
        assert folder.name == "val" and len([d for d in folder.iterdir() if d.is_dir()]) > 1
    assert seen["device"] in ("cpu", "cuda")
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)  # a folder of that name wins
    assert analyze_cli.resolve_data("demo") == "demo"


def test_demo_prints_its_note_once(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from analysis import demo
    from analysis.pipeline import AnalyzeOutput

    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: AnalyzeOutput(
        Path(out), {}, {}, pd.DataFrame(), pd.DataFrame(), [], []))
    assert analyze_cli.main(["demo", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    note = demo.demo_note()
    assert out.count(note) == 1 and out.rstrip().endswith(note) and "150 epochs" in note


@pytest.mark.parametrize("main, prog", [(kamim_cli.main, "kamim"), (analyze_cli.main, "kamim-analyze")])
def test_version_in_both_tools(main, prog, capsys):
    from kamim import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {__version__}"


def test_progress_and_workers_options_have_the_same_names_in_both_tools(capsys):
    """--no-progress (alias --quiet) and --num-workers (kamim-analyze also takes --workers)."""
    for main, argv in ((kamim_cli.main, ["pretrain"]), (kamim_cli.main, ["knn"]), (kamim_cli.main, ["reconstruct"]),
                       (analyze_cli.main, ["run"]), (analyze_cli.main, ["paper-figures"]), (analyze_cli.main, ["demo"])):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--no-progress, --quiet" in text, argv
        assert ("--num-workers" in text) == (argv[0] not in ("pretrain", "demo")), argv
    from kamim.cli import _pretrain_config

    args = kamim_cli.build_parser().parse_args(["pretrain", "--config", "tiny_kamim", "--out", "o", "--quiet"])
    assert _pretrain_config(args).run.progress is False
    args = kamim_cli.build_parser().parse_args(["pretrain", "--config", "tiny_kamim", "--out", "o"])
    assert _pretrain_config(args).run.progress is True
