"""``kamim-analyze``: representation analysis of any number of ViT checkpoints, paper figures, demo.

Commands (``kamim-analyze COMMAND --help`` for the options):

* ``run``: ``--model NAME=CHECKPOINT`` (repeatable; any format :func:`kamim.checkpoints.load_encoder`
  accepts: files, ``kamim pretrain`` run directories, manifest names, timm names) on the images of
  ``--data`` (a folder, or the demo data by name as for ``kamim``: ``demo``, ``demo-photos``,
  ``demo-digits``, the labelled ones' ``val/`` split); writes ``metrics.csv``,
  ``metrics.json`` (tidy), one figure per analysis (PDF + PNG), ``report.html`` and the raw arrays
  of every model (``raw/<model>/``). Each model is evaluated at its own resolution unless
  ``--image-size`` puts all of them at one; the figures and the report say which.
* ``paper-figures``: the representation figures of the KAMIM paper from a SimMIM, a KAMIM and a
  MoCo v3 checkpoint, with the paper's settings (:mod:`analysis.paper`).
* ``demo``: pretrains tiny demo models offline (cached) and analyses them (:mod:`analysis.demo`).

Errors follow :mod:`kamim.errors` (shared with ``kamim``): bad input (missing checkpoint, unknown
analysis, empty image folder, ``--images 0``, a geometry an analysis cannot handle, ...) and
argument errors end with one line ``kamim-analyze: error: ...`` and exit code 2.
Outputs are written into a temporary folder next to ``--out`` and moved into place at the end, so
a failed run leaves ``--out`` untouched, and files the command did not write are carried over;
``--out`` must be new, empty or an earlier output of the same command unless ``--overwrite``, and
never an input (:mod:`kamim.outputs`). ``KAMIM_DEBUG=1`` shows full tracebacks.
``--device auto`` (the default) is CUDA when available, else the CPU.

This module only parses arguments and prints; the work is done by :func:`analysis.pipeline.analyze`
(and :mod:`analysis.paper`, :mod:`analysis.demo`). Parsing imports no torch (``--help`` is fast).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from analysis.names import ANALYSES, CLI_OPTIONS
from analysis.names import CROSS_CKA
from analysis.settings import INTERPOLATIONS
from kamim.errors import ArgumentParser, configure_logging, run_command

if TYPE_CHECKING:
    from analysis.pipeline import AnalyzeOutput
    from kamim.config import ConfigFlags

__all__ = ["PROG", "parse_option", "build_parser", "main"]

PROG = "kamim-analyze"


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, YAML-parsed value), for :func:`analysis.runner.run_analyses` options."""
    import yaml

    from analysis.pipeline import UsageError

    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise UsageError(f"--option needs KEY=VALUE, got '{text}'")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise UsageError(f"--option {key}: cannot parse value '{value}'") from None


#: ``--data`` names of the demo data (as ``kamim`` accepts them), unless a folder of that name exists
DEMO_DATA = ("demo", "demo-photos", "demo-digits")
_DATA_HELP = ("; or demo (the pretraining demo photographs), demo-photos or demo-digits (the val/ "
              "split of the labelled demo sets), made on first use as for `kamim`")


def resolve_data(data: str) -> str:
    """``--data`` as an image folder: a demo name of :data:`DEMO_DATA` becomes its folder
    (:func:`kamim.data.build_dataset`, val split), anything else is returned unchanged."""
    if data not in DEMO_DATA or Path(data).exists():
        return data
    from kamim import build_dataset

    return str(build_dataset(data, split="val").root)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu`` (torch imported only then); others unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_out(p: argparse.ArgumentParser, metavar: str, default: Optional[str] = None) -> None:
    """``--out`` (the output folder, swapped in whole at the end, keeping files the command did not
    write) and ``--overwrite``."""
    from kamim.outputs import OUT_RULE, OVERWRITE_HELP

    p.add_argument("--out", required=default is None, default=default, metavar=metavar,
                   help="output folder" + (" (default: %(default)s)" if default else "") + "; "
                   + OUT_RULE.format(action="whose results are replaced; files you added are kept"))
    p.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP)


def _add_common(f: "ConfigFlags") -> None:
    """Options shared by ``run`` and ``paper-figures``: each a shorthand of ``--set KEY=VALUE`` of the
    command's config (:mod:`analysis.settings`), whose dataclass holds the one default."""
    f.add("--images", type=int, metavar="N", help="analyse at most N images per model (default: all)")
    f.add("--batch-size", type=int, metavar="B")
    f.add("--device", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    f.add("--seed", type=int, help="seed of image subset, t-SNE, ...")
    f.add("--num-workers", "--workers", type=int, metavar="W",
          help="data loader workers (default: min(4, CPUs available)); more than the CPUs are clamped")
    f.p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="analysis option, a shorthand of --set options.KEY=VALUE (repeatable; VALUE is YAML, "
                     "meanings in analysis.runner.RunOptions), e.g. tsne_samples=500, similarity_kind=cosine, "
                     f"map_queries=[[1,2]]; keys: {', '.join(CLI_OPTIONS)}")
    f.add("--interpolation", choices=INTERPOLATIONS,
          help="resize interpolation of the preprocessing (timm's eval transform: short side to size / crop_pct, "
               "centre crop)")
    f.add("--crop-pct", type=float, metavar="F", help="resize the short side to size / F before the centre crop")
    f.add("--no-progress", "--quiet", key="progress", action="store_const", const=False, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``kamim-analyze`` argument parser with its ``run``, ``paper-figures``, ``demo`` commands."""
    from analysis.settings import AnalyzeConfig, PaperFiguresConfig, PlotConfig
    from kamim.config import ConfigFlags

    parser = ArgumentParser(prog=PROG, description="Representation analysis of vision transformers "
                     "(attention distance, NMI, CKA, Fourier, t-SNE, ...) with figures and an "
                     "HTML report.")
    from kamim import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=ArgumentParser)

    run = sub.add_parser("run", help="analyse any number of models on an image folder",
                         description="Analyse any number of models on the images of a folder; "
                         "writes metrics.csv/json, one figure per analysis (PDF+PNG) and "
                         "report.html into OUT_DIR.")
    f = ConfigFlags(run, AnalyzeConfig)
    run.add_argument("--model", action="append", default=None, metavar="NAME=CHECKPOINT",
                     help="model to analyse (repeatable; a shorthand of --set models.NAME=CHECKPOINT): a "
                     "checkpoint file of any supported format, a `kamim pretrain` run directory (its "
                     "encoder.safetensors), a manifest name or a timm model name (random init); "
                     "NAME=CKPT_A,CKPT_B,CKPT_C: seeds of one method, analysed each (NAME@1, NAME@2, ... in "
                     "metrics.csv) and drawn as their mean with its 95%% interval across seeds")
    f.add("--data", metavar="IMAGE_DIR", help="folder of images (class subfolders colour the t-SNE)" + _DATA_HELP)
    _add_out(run, "OUT_DIR")
    run.add_argument("--evaluation", action="append", default=None, metavar="NAME=RUN_DIR",
                     help="output folder of a kamim linprobe, knn or finetune run of model NAME (repeatable): its "
                     "top-1/top-5 go into the report's text and tables")
    run.add_argument("--plugin", action="append", default=None, metavar="FILE.py",
                     help="a Python file that registers analyses (analysis.registry.register; repeatable), whose "
                     "names --analyses then accepts; installed packages can register them through the entry-point "
                     "group kamim.analyses instead")
    f.add("--analyses", metavar="a,b,...|all",
          help=f"comma-separated analyses or 'all'; valid: {', '.join(ANALYSES)}")
    f.add("--reuse", action="append", metavar="RESULTS_DIR",
          help="an earlier output of kamim-analyze run (repeatable): a model whose saved results match its "
               "checkpoint (sha256), data, images, seed, resolution, preprocessing, options and analyses is not analysed again")
    f.add("--baseline", choices=["random"],
          help="also analyse a randomly initialised model of each architecture (seeded, named random-<arch>), "
               "drawn and tabled like the others: the floor trained models are read against")
    f.add("--image-size", type=int, metavar="S",
          help="evaluate every model at S px (position embeddings resampled); default: each model at its own "
          "resolution")
    f.add("--cross-images", type=int, metavar="N",
          help="with cka among the analyses, each model saves the pooled block outputs of a seeded subset of N "
               "images (the same files for "
               "every model), from which every pair of models gets cross-model CKA, mutual k-NN and CKNNA, here "
               "and in kamim-analyze plot; 0: none")
    f.add("--cross-k", type=int, metavar="K", help="neighbours of mutual k-NN alignment and CKNNA")
    f.add("--cross-cka", choices=CROSS_CKA, help="the HSIC estimator of cross-model CKA")
    _add_common(f)

    paper = sub.add_parser("paper-figures", help="reproduce the KAMIM paper's representation figures",
                           description="Reproduce each representation figure of the KAMIM paper "
                           "(attention maps, attention distance, NMI, Fourier, t-SNE, pre/post-"
                           "attention, reconstructions) with the paper's settings; one file per "
                           "figure plus the numbers behind it as CSV. Images are preprocessed as in the "
                           "reference notebooks: timm's eval transform with bilinear interpolation (short "
                           "side to size / 0.875, centre crop); kamim-analyze run defaults to bicubic.")
    f = ConfigFlags(paper, PaperFiguresConfig)
    ckpt = ("checkpoint: a file of any supported format or a `kamim pretrain` run directory (its "
            "checkpoint-last.pt, with the decoder, also gives the reconstructions figure)")
    f.add("--simmim", metavar="CKPT", help="SimMIM " + ckpt)
    f.add("--kamim", metavar="CKPT", help="KAMIM " + ckpt)
    f.add("--moco", metavar="CKPT", help="MoCo v3 checkpoint")
    f.add("--data", metavar="VAL_DIR", help="validation images (the paper: Imagenette val, class subfolders)"
          + _DATA_HELP)
    _add_out(paper, "OUT")
    f.add("--mim-image-size", type=int, metavar="S", help="resolution of the MIM models (default: the paper's 192 px)")
    f.add("--moco-image-size", type=int, metavar="S",
          help="resolution of MoCo v3 (default: its own, 224 px for the released ViT-B/16, so that no image is "
          "resized twice)")
    _add_common(f)

    plot = sub.add_parser(
        "plot", help="redraw figures and report from saved results; combine runs",
        description="Redraw every figure, metrics table and report.html from the results saved by earlier runs "
                    "(OUT/raw/), without models or data; several results folders are combined into one comparison. "
                    "Runs on other data, images, seed, resolution, preprocessing or options are refused unless --allow-mixed.",
        epilog="example: kamim-analyze plot runs/analysis-a runs/analysis-b --out runs/analysis-ab")
    f = ConfigFlags(plot, PlotConfig)
    plot.add_argument("results", nargs="*", metavar="RESULTS_DIR",
                      help="output folders of kamim-analyze run (a shorthand of --set results=[...])")
    _add_out(plot, "OUT_DIR")
    f.add("--allow-mixed", action="store_const", const=True,
          help="combine runs that differ in data, images, seed, resolution, preprocessing or options (said in the report)")
    f.add("--title", help="report title (default: the first run's)")

    demo = sub.add_parser("demo", help="offline demo: pretrain tiny models, analyse them",
                          description="Offline demo on a fresh machine: pretrains tiny SimMIM, "
                          "KAMIM and MoCo v3 ViTs on photographs shipped with scikit-image/"
                          "scikit-learn (cached, a second run skips training), then runs every "
                          "analysis and writes the report. These are small demonstration models.")
    _add_out(demo, "OUT", default="runs/analysis-demo")
    demo.add_argument("--cache", default=None, metavar="DIR",
                      help="checkpoint cache (default: checkpoints/demo/ of the repository)")
    demo.add_argument("--fast", action="store_true",
                      help="shorter training and fewer images (a quick smoke run)")
    demo.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bars")
    return parser


def _config(args: argparse.Namespace, **values: Any) -> Any:
    """The command's validated config (:mod:`analysis.settings`): defaults < ``--config`` < the flags
    (``--option KEY=VALUE`` = ``--set options.KEY=VALUE``) < ``--set``; checked before torch is imported."""
    from kamim.config import parsed_config

    for text in getattr(args, "option", ()):  # plot has no analysis options
        key, value = parse_option(text)
        values[f"options.{key}"] = value
    cfg = parsed_config(args, **values)
    unknown = sorted(set(getattr(cfg, "options", {})) - set(CLI_OPTIONS))
    if unknown:
        from analysis.pipeline import UsageError

        raise UsageError(f"unknown analysis option {', '.join(unknown)}; valid: {', '.join(CLI_OPTIONS)}")
    return cfg


def _common_kwargs(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every analysing command shares, from its config."""
    from analysis.pipeline import Preprocessing

    return {"images": cfg.images, "batch_size": cfg.batch_size, "device": resolve_device(cfg.device),
            "seed": cfg.seed, "workers": cfg.num_workers, "progress": cfg.progress,
            "overwrite": args.overwrite, "options": dict(cfg.options), "config": cfg,
            "preprocessing": Preprocessing(cfg.interpolation, cfg.crop_pct)}


def _print_summary(out: AnalyzeOutput) -> None:
    """Print the per-model summary table and where the outputs went."""
    import pandas as pd

    summary, out_dir, figures = out.summary, out.out_dir, out.figures
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(summary.to_string(index=False) if not summary.empty else "(no per-layer metrics)")
    print(f"\nwrote {len(figures)} figure{'' if len(figures) == 1 else 's'}, metrics.csv, metrics.json and report.html "
          f"to {out_dir}")


def parse_evaluations(values: list[str]) -> dict[str, list[str]]:
    """``["NAME=DIR", ...]`` -> ``{NAME: [DIR, ...]}``; a value without ``NAME=`` is a one-line error."""
    from analysis.pipeline import UsageError

    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UsageError(f"--evaluation needs NAME=RUN_DIR (a model name and a kamim linprobe/knn/finetune "
                             f"output folder), got {value!r}")
        out.setdefault(name.strip(), []).append(folder.strip())
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from analysis.pipeline import models_from_specs, parse_model_spec

    models = models_from_specs([parse_model_spec(m) for m in args.model]) if args.model else None
    extra: dict = {"models": models} if models else {}
    if args.evaluation:
        extra["evaluations"] = parse_evaluations(args.evaluation)
    if args.plugin:
        extra["plugins"] = [str(Path(p).expanduser().absolute()) for p in args.plugin]
    cfg = _config(args, **extra)
    from analysis.pipeline import analyze, preflight

    plugins = {f"plugin {p}": p for p in cfg.plugins}
    preflight(cfg.models, cfg.data, args.out, overwrite=args.overwrite, inputs=plugins)  # before torch is imported
    data = resolve_data(cfg.data)
    from analysis.registry import load_plugin

    for plugin in cfg.plugins:
        load_plugin(plugin)
    reuse = {f"--reuse {i + 1}": p for i, p in enumerate(cfg.reuse)}
    res = analyze(cfg.models, data, args.out, analyses=cfg.analyses, image_size=cfg.image_size,
                  inputs={**plugins, **reuse}, reuse=cfg.reuse, baseline=cfg.baseline, cross_images=cfg.cross_images,
                  cross_k=cfg.cross_k, cross_cka=cfg.cross_cka, evaluations=cfg.evaluations,
                  **_common_kwargs(cfg, args))
    _print_summary(res)
    return 0


def _cmd_paper(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from analysis.paper import reproduce_paper_figures

    out = reproduce_paper_figures(
        {"SimMIM": cfg.simmim, "KAMIM": cfg.kamim, "MoCo v3": cfg.moco}, resolve_data(cfg.data), args.out,
        mim_image_size=cfg.mim_image_size, moco_image_size=cfg.moco_image_size, **_common_kwargs(cfg, args))
    _print_summary(out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from analysis.demo import demo_note, run_demo

    out = run_demo(args.out, cache=args.cache, fast=args.fast, progress=not args.quiet,
                   overwrite=args.overwrite)
    _print_summary(out)
    print(f"\n{demo_note(args.fast)}")  # once, under the numbers it qualifies (the report carries it too)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    cfg = _config(args, **({"results": [str(Path(r).expanduser().absolute()) for r in args.results]}
                           if args.results else {}))
    from analysis.pipeline import plot_results

    _print_summary(plot_results(cfg.results, args.out, allow_mixed=cfg.allow_mixed, overwrite=args.overwrite,
                                title=cfg.title, config=cfg))
    return 0


_COMMANDS = {"run": _cmd_run, "paper-figures": _cmd_paper, "plot": _cmd_plot, "demo": _cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``kamim-analyze``; returns the exit code (:mod:`kamim.errors`)."""
    args = build_parser().parse_args(argv)
    configure_logging()
    return run_command(PROG, _COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
