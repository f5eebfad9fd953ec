"""Acceptance test of the README: every command of its shell blocks runs, read from the README itself
(a changed README changes this test), with its default options except for size.

What "except for size" changes, and nothing else:

* data: ``/data/imagenet/train`` -> the offline pretraining demo (``demo``); ``/data/imagenet`` ->
  the labelled demo set ``demo-photos``; ``/data/imagenet/val``, ``/data/imagenette/val`` and
  ``VAL_DIR`` -> its ``val/`` images;
* models: the paper presets ``{kamim,simmim}_vit_b`` -> the tiny CPU presets ``tiny_{kamim,simmim}``;
  the checkpoints the README assumes exist (``runs/simmim_vit_b``, the released MoCo v3 file,
  ``SIMMIM_CKPT`` ...) -> tiny pretraining runs made here;
* length: pretraining runs 2 optimizer steps of batch 8, probes and finetunes 1 epoch of batch 30,
  analyses 8 images, the demo ``--fast``; ``torchrun --nproc_per_node 8`` -> 1 process;
* where: every relative path lands in a temporary working directory (the ``torchrun`` line, an
  alternative to the pretraining line above it with the same ``--out``, in one of its own).

The install lines (``python -m venv ... && pip install ...``) are what CI itself runs; the test runs
the command each of them ends with (the demo, the test suite is this suite). The README's Python
example (the first Python block; the second, the plugin file, runs in ``test_readme_plugin.py``)
is executed too, sized the same way.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

DATA = {"/data/imagenet/train": "demo", "/data/imagenet": "demo-photos"}
VAL = ("/data/imagenet/val", "/data/imagenette/val", "VAL_DIR")
PRESETS = {"kamim_vit_b": "tiny_kamim", "simmim_vit_b": "tiny_simmim"}
CHECKPOINTS = {"checkpoints/vit-b-300ep.pth.tar": "runs/tiny_moco", "SIMMIM_CKPT": "runs/simmim_vit_b",
               "KAMIM_CKPT": "runs/kamim_vit_b", "MOCO_CKPT": "runs/tiny_moco"}
PRETRAIN_SIZE = ["run.max_steps=2", "optim.batch_size=8", "data.num_workers=0", "run.progress=false",
                 "run.ckpt_every_steps=0"]
SIZE = {  # command -> options appended (size only)
    "pretrain": ["--set", *PRETRAIN_SIZE],
    "linprobe": ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "30", "--num-workers", "0"],
    "finetune": ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "30", "--num-workers", "0"],
    "knn": ["--num-workers", "0"],
    "reconstruct": ["--max-images", "8", "--num-workers", "0"],
    "run": ["--images", "8"],
    "paper-figures": ["--images", "8", "--mim-image-size", "96"],
    "plot": [],
    "demo": ["--fast"],
    "presets": [],
}


def readme_commands() -> list[list[str]]:
    """Every command of the README's ``bash`` blocks, in order, as argv lists (``&&`` chains split,
    comments and line continuations removed)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            chain: list[str] = []
            for word in [*words, "&&"]:
                if word == "&&":
                    if chain:
                        commands.append(chain)
                    chain = []
                else:
                    chain.append(word)
    return commands


def _sized(argv: list[str], val: str) -> list[str] | None:
    """``argv`` with the size substitutions of the module docstring; None for install steps."""
    if argv[0] in (".", "pip") or argv[:3] == ["python", "-m", "venv"] or argv[:3] == ["python", "-m", "pytest"]:
        return None
    if argv[0] == "torchrun":
        argv = ["torchrun", "--nproc_per_node", "1", *argv[argv.index("--nproc_per_node") + 2:]]
    out = []
    for word in argv:
        name, eq, value = word.partition("=")
        if eq and value in CHECKPOINTS:
            word = f"{name}={CHECKPOINTS[value]}"
        word = DATA.get(word, PRESETS.get(word, CHECKPOINTS.get(word, val if word in VAL else word)))
        out.append(word)
    command = next((w for w in out if w in SIZE), None)
    assert command is not None, f"no size rule for README command: {' '.join(argv)}"
    return out + SIZE[command]


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    tools = {"kamim": [sys.executable, "-m", "kamim.cli"], "kamim-analyze": [sys.executable, "-m", "analysis.cli"],
             "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    argv = [*tools.get(argv[0], [argv[0]]), *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_readme_command_runs_with_its_defaults(tmp_path):
    env = {**os.environ, "KAMIM_DATA_DIR": str(tmp_path / "data"), "MPLBACKEND": "Agg",
           "PYTHONPATH": str(README.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "2"}  # the two cores of the CI machine: the commands run one at a time
    work = tmp_path / "work"
    work.mkdir()
    from kamim.data import build_dataset

    os.environ["KAMIM_DATA_DIR"] = env["KAMIM_DATA_DIR"]
    try:
        val = str(build_dataset("demo-photos", split="val").root)
    finally:
        del os.environ["KAMIM_DATA_DIR"]
    # what the README assumes already exists: other runs, the released MoCo v3 checkpoint (tiny stand-ins)
    for preset, out in (("tiny_simmim", "runs/simmim_vit_b"), ("tiny_moco", "runs/tiny_moco")):
        done = _run(["kamim", "pretrain", "--config", preset, "--data", "demo", "--out", out, "--set",
                     *PRETRAIN_SIZE], work, env)
        assert done.returncode == 0, done.stderr
    plugin = re.findall(r"```python\n(.*?)```", README.read_text().split("## Your own analysis", 1)[1], re.S)[0]
    (work / "token_norm.py").write_text(plugin)

    ran = []
    for argv in readme_commands():
        sized = _sized(argv, val)
        if sized is None:
            continue
        # the torchrun line is an alternative to the pretraining line above it (same --out): its own folder
        cwd = work if sized[0] != "torchrun" else tmp_path / "work-torchrun"
        cwd.mkdir(exist_ok=True)
        done = _run(sized, cwd, env)
        assert done.returncode == 0, f"{' '.join(sized)}\n{done.stderr[-3000:]}"
        ran.append(sized)
    names = [" ".join(a[:2]) for a in ran]
    for expected in ("kamim-analyze demo", "kamim presets", "kamim pretrain", "torchrun --nproc_per_node",
                     "kamim linprobe", "kamim finetune", "kamim knn", "kamim reconstruct", "kamim-analyze run",
                     "kamim-analyze paper-figures", "kamim-analyze plot"):
        assert any(n.startswith(expected) for n in names), (expected, names)

    # each command's promised outputs
    runs = work / "runs"
    assert (work / "runs" / "analysis-demo" / "report.html").is_file()
    # the demo shows a randomly initialised vit_pico beside its models, within the rule's tolerance of uniform
    from analysis import load_run
    from analysis.baselines import UNIFORM_BASELINES, near_uniform

    demo_results = load_run(work / "runs" / "analysis-demo")[0]
    assert list(demo_results) == ["SimMIM", "KAMIM", "MoCo v3", "random-vit_pico"]
    assert all(near_uniform(demo_results["random-vit_pico"], m) for m in UNIFORM_BASELINES)
    demo_html = (work / "runs" / "analysis-demo" / "report.html").read_text()
    assert "random-vit_pico: attention indistinguishable from uniform" in demo_html
    assert re.search(r"Reconstructions at mask ratio [\d.]+ \(\d+ px, \d+ images, mean per image\): SimMIM PSNR "
                     r"[\d.]+ dB, SSIM [\d.]+; KAMIM PSNR", demo_html)  # the numbers in the report's text
    for run in ("tiny_kamim", "kamim_vit_b"):
        assert {"checkpoint-last.pt", "encoder.safetensors", "config.yaml", "metrics.jsonl"} <= \
            {p.name for p in (runs / run).iterdir()}
    for out, results in (("lp", "linprobe.csv"), ("lp_mae", "linprobe.csv"), ("ft", "finetune.csv"),
                         ("knn", "knn.csv"), ("rec", "reconstruct.csv")):
        assert (runs / out / results).is_file() and (runs / out / "config.yaml").is_file(), out
    assert len(pd.read_csv(runs / "lp" / "linprobe.csv")["layer"].unique()) == 6  # --layers all: vit_pico
    for out in ("analysis", "paper", "token-norm"):
        assert (runs / out / "report.html").is_file() and (runs / out / "config.yaml").is_file(), out
    # the evaluations named with --evaluation: in the report's text and table, and kept by plot
    for out in ("analysis-t", "analysis-all"):
        html = (runs / out / "report.html").read_text()
        assert re.search(r"kamim_t: linear probe top-1 [\d.]+% \(block \d, 1 epoch, on \d+ images\); k-NN top-1 "
                         r"[\d.]+% \(block \d, k = \d+, on \d+ images\)\.", html), out
        assert "Evaluations (kamim linprobe / knn / finetune; --evaluation)" in html, out
    # plot: the two runs' models in one comparison, redrawn from their saved results
    combined = pd.read_csv(runs / "analysis-all" / "metrics.csv")
    models = ["simmim", "kamim", "moco", "kamim_t"]  # + cross-model rows of every pair, across the two runs
    assert set(combined["model"]) == {*models, *(f"{a} vs {b}" for i, a in enumerate(models) for b in models[i + 1:])}
    assert (runs / "analysis-all" / "report.html").is_file()
    # plot of a paper-figures output keeps the figure made from the models (the reconstructions)
    done = _run(["kamim-analyze", "plot", "runs/paper", "--out", "runs/paper-redrawn"], work, env)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (runs / "paper").glob("*.png")} == {p.name for p in (runs / "paper-redrawn").glob("*.png")}
    # the README's Python example, sized the same way, in the same working directory
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert "load_encoder(" in example and "run_analyses(" in example
    example = example.replace("/data/imagenette/val", val).replace("images=1000", "images=8")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        scope: dict = {}
        exec(compile(example, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    table = scope["result"].table
    assert {"attention-distance", "nmi"} <= set(table["metric"]) and set(table["n_images"]) == {8}
    metrics = pd.read_csv(runs / "token-norm" / "metrics.csv")
    assert (metrics["metric"] == "token-norm").any() and (runs / "token-norm" / "token_norm.png").is_file()
    assert (runs / "paper" / "fig_reconstructions.png").is_file()
