"""The ``kamim`` command: ``pretrain``, ``sweep``, ``presets``, the evaluations ``linprobe``,
``finetune``, ``knn``, ``reconstruct``, and ``doctor`` (versions, device and CPU of this machine).

Each subcommand is a pair ``_add_NAME(subparsers)`` (declares its arguments and sets
``func=_cmd_NAME``) + ``_cmd_NAME(args) -> int``, registered in ``SUBCOMMANDS``; adding one
(linprobe, finetune, knn, reconstruct, ...) is a new pair plus one line in that list.

Errors follow :mod:`kamim.errors` (shared with ``kamim-analyze``): bad input (config values,
missing files, unreadable checkpoints, a full disk, ...) and argument errors print a single
``kamim: error: ...`` line and exit with status 2; a diverged run (``NonFiniteLossError``) exits
with status 1; ``KAMIM_DEBUG=1`` shows tracebacks. Parsing imports no torch, so ``--help`` and
argument errors are fast. Run multi-GPU with ``torchrun --nproc_per_node N -m kamim.cli pretrain ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from kamim.errors import ArgumentParser, configure_logging, run_command

if TYPE_CHECKING:
    from kamim.config import ConfigFlags

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

PROG = "kamim"


# --------------------------------------------------------------------------- shared helpers

# The layer numbering of kamim.backbone, for the --help of every command that takes layers.
LAYERS_HELP = ("layers are transformer blocks numbered 1..depth (a Swin's blocks counted across its stages: "
               "1..24 for Swin-B); 'stage:K' = the last block of Swin stage K; negative counts from the end; "
               "'default' = block 8 of 12 scaled to the depth (last block for Swin), 'all', 'last'")


def _csv_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def _pixels(text: str) -> int:
    """An image side in pixels: an int of at least 16 (a smaller one cannot hold a single ViT patch)
    and at most ``MAX_IMAGE_SIDE``."""
    from kamim.config import MAX_IMAGE_SIDE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 pixels, got {value}")
    if value > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGE_SIDE} pixels, got {value}")
    return value


def _folder(text: str) -> Path:
    if not text.strip():  # Path("") would silently mean the current directory
        raise argparse.ArgumentTypeError("expected a folder, got an empty value")
    return Path(text)


def _add_out_argument(p: argparse.ArgumentParser, help: str, metavar: str = "RUN_DIR",
                      action: str = "resumed or updated") -> None:
    """``--out`` and ``--overwrite``, with the output-folder rule of :mod:`kamim.outputs`."""
    from kamim.outputs import OUT_RULE, OVERWRITE_HELP

    p.add_argument("--out", required=True, type=_folder, metavar=metavar,
                   help=f"{help}; {OUT_RULE.format(action=action)}")
    p.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP)


def _add_resume_argument(p: argparse.ArgumentParser) -> None:
    """``--resume`` with the rules of ``kamim.engine.pretrain.find_resume_checkpoint``."""
    p.add_argument("--resume", default="auto", metavar="RUN_DIR|CKPT|auto|none",
                   help="'auto' (default): resume from RUN_DIR/checkpoint-last.pt if it exists; "
                        "'none': start from scratch; or a run directory / checkpoint file")


# --------------------------------------------------------------------------- pretrain

def _add_pretrain_config(p: argparse.ArgumentParser) -> None:
    """``--config PRESET|FILE`` (required: a pretraining preset or file) and ``--set KEY=VALUE ...``."""
    from kamim.config import Config, add_config_arguments

    add_config_arguments(p, Config, required=True)


def _pretrain_config(args: argparse.Namespace):
    """The validated pretraining ``Config`` of ``--config`` + ``--set`` (checked before torch is imported)."""
    from kamim.config import load_config

    extra = ["run.progress=false"] if getattr(args, "no_progress", False) else []
    return load_config(args.config, [*extra, *args.overrides])


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a model (SimMIM, KAMIM or MoCo v3)",
        description="Pretrain with a preset or YAML config. Resumes automatically from RUN_DIR/checkpoint-last.pt.",
    )
    _add_pretrain_config(p)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="image folder, NAME:ROOT torchvision dataset or 'demo' (default: the config's data.path)")
    _add_out_argument(p, "run directory")
    _add_resume_argument(p)
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bar (a shorthand of --set run.progress=false)")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _pretrain_config(args)  # refused before torch is imported
    from kamim.engine.pretrain import ENCODER_FILE, pretrain

    ckpt = pretrain(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite)
    if _is_main():
        print(f"checkpoint: {ckpt}")
        print(f"encoder:    {ckpt.parent / ENCODER_FILE}")
    return 0


# --------------------------------------------------------------------------- sweep

def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from kamim.config import SWEEP_EVAL_METHODS, Config, ConfigFlags

    p = sub.add_parser(
        "sweep", help="KAMIM grid over detectors x weight patch sizes x temperatures",
        description="One run directory per grid point under OUT (finished points are reused, interrupted "
                    "ones resumed), a results table OUT/results.csv + OUT/results.json and OUT/config.yaml "
                    "(the pretraining config with its sweep: section; rerun with --config OUT/config.yaml). "
                    "Final losses are not comparable across temperatures (the KAMIM weights scale the loss): "
                    "give --eval-data to add an evaluation column (top-1 as a fraction in [0, 1]; the table is "
                    "printed best first). Recorded evaluations of unchanged encoders are reused on rerun.",
    )
    f = ConfigFlags(p, Config, config_required=True)
    f.add("--data", key="data.path", metavar="PATH", help="training data (default: the config's data.path)")
    _add_out_argument(p, "sweep directory", metavar="OUT")
    f.add("--detectors", key="sweep.detectors", type=_csv_list(str), metavar="D1,D2",
          help="keypoint detectors, e.g. fast,sift,orb (default: the config's kamim.detector)")
    f.add("--weight-patch-sizes", key="sweep.weight_patch_sizes", type=_csv_list(int), metavar="W1,W2",
          help="the paper's grid")
    f.add("--temperatures", key="sweep.temperatures", type=_csv_list(float), metavar="T1,T2", help="the paper's grid")
    g = p.add_argument_group("evaluation of each run's encoder (the config's sweep.evaluation)")
    f.add("--eval-data", key="sweep.evaluation.data", metavar="PATH", type=_labelled_data, group=g,
          help="labelled data: folder with train/ and val/ class folders, NAME:ROOT torchvision dataset, "
               "demo-photos or demo-digits (enables evaluation)")
    f.add("--eval", key="sweep.evaluation.methods", type=_csv_list(str), metavar="M1,M2", group=g,
          help=f"evaluations, some of {','.join(SWEEP_EVAL_METHODS)}; the first sorts the table")
    f.add("--eval-layer", key="sweep.evaluation.layer", metavar="LAYER", group=g, help="one layer: " + LAYERS_HELP)
    f.add("--eval-k", key="sweep.evaluation.k", type=int, group=g, help="k-NN neighbours")
    f.add("--eval-batch-size", key="sweep.evaluation.batch_size", type=int, group=g)
    f.add("--linprobe-epochs", key="sweep.evaluation.linprobe_epochs", type=int, group=g, help="linear probe epochs")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kamim.config import SweepGrid, parsed_config

    cfg = parsed_config(args)  # refused before torch is imported
    grid = cfg.sweep or SweepGrid()
    from kamim.experiments.sweep import result_fields, sort_by_metric, sweep

    evaluation = grid.evaluation
    rows = sweep(cfg, None, args.out, detectors=grid.detectors, weight_patch_sizes=grid.weight_patch_sizes,
                 temperatures=grid.temperatures, evaluation=evaluation, overwrite=args.overwrite)
    if _is_main():
        from kamim.eval.common import format_table

        title = "sweep results"
        if evaluation is not None:
            metric = evaluation.metric(evaluation.methods[0])
            rows = sort_by_metric(rows, metric)
            title += f", best {metric} first"
        print(format_table(rows, columns=result_fields(evaluation), title=title))
        print(f"results: {Path(args.out) / 'results.csv'}")
    return 0


# --------------------------------------------------------------------------- presets

def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the bundled config presets and recipes, by command",
                       description="List the names usable with --config, by command, with their description.")
    p.set_defaults(func=_cmd_presets)


def _cmd_presets(args: argparse.Namespace) -> int:
    from kamim.config import COMMAND_CONFIGS, list_presets, preset_path

    for command, cls in COMMAND_CONFIGS.items():
        names = list_presets(cls)
        if not names:
            continue
        print(f"{command}:")
        for name in names:
            first = next((ln.lstrip("# ").strip() for ln in preset_path(name, cls).read_text().splitlines()
                          if ln.startswith("#")), "")
            print(f"  {name:<16} {first}")
    return 0


# --------------------------------------------------------------------------- evaluation

def _labelled_data(text: str) -> str:
    """``--data`` of the evaluations: ``demo`` (unlabelled, for pretraining) is refused with a hint,
    unless a folder of that name exists."""
    if text == "demo" and not Path(text).is_dir():
        raise argparse.ArgumentTypeError("'demo' is the unlabelled pretraining demo; the labelled "
                                         "demo sets are demo-photos and demo-digits")
    return text


def _add_eval_arguments(f: "ConfigFlags") -> None:
    """Arguments shared by linprobe / finetune / knn: encoder, data, run directory, execution."""
    f.add("--checkpoint", metavar="SOURCE",
          help="encoder: checkpoint file in any supported format (e.g. a kamim pretrain run's "
               "encoder.safetensors or checkpoint-last.pt, or the run directory), Hugging Face directory, "
               "manifest name or timm model name (random init)")
    f.add("--data", metavar="PATH", type=_labelled_data,
          help="folder with train/ and val/ class folders, NAME:ROOT torchvision dataset, demo-photos or demo-digits")
    _add_out_argument(f.p, "run directory (results, checkpoints, config.yaml)")
    f.add("--model-name", key="load_options.model_name",
          help="timm model to build for a plain state dict (an hf-hub: name is read from the local Hugging Face "
               "cache)")
    f.add("--allow-download", key="load_options.allow_download", action="store_const", const=True,
          help="let timm download the config of an hf-hub: --model-name (nothing reaches the network without it)")
    f.add("--num-heads", key="load_options.num_heads", type=int,
          help="attention heads when the checkpoint cannot tell")
    f.add("--encoder-img-size", key="load_options.img_size", type=_pixels, metavar="PX",
          help="build the encoder at this size (position embeddings resampled)")
    f.add("--img-size", type=_pixels, metavar="PX", help="data image size (default: the encoder's)")
    _add_execution_arguments(f, "global batch size")


def _add_execution_arguments(f: "ConfigFlags", batch_help: str) -> None:
    """Batch size, loader workers, device, autocast and progress bars (every evaluation command)."""
    f.add("--batch-size", type=int, help=batch_help)
    f.add("--num-workers", type=int,
          help="data loader workers per process (default: min(4, CPUs available)); more than the CPUs are clamped")
    f.add("--device", help="auto, cpu, cuda or cuda:N")
    f.add("--amp", choices=("auto", "bf16", "fp16", "none"),
          help="autocast; auto: bf16 on CUDA and on CPUs that multiply bf16 natively, else none (the resolved "
               "choice is logged and recorded in the results)")
    f.add("--no-progress", "--quiet", key="progress", action="store_const", const=False, help="no progress bars")


def _add_training_arguments(f: "ConfigFlags") -> None:
    f.add("--epochs", type=int)
    f.add("--warmup-epochs", type=int)
    f.add("--accum-steps", type=int, help="gradient accumulation steps")
    f.add("--lr", type=float, help="absolute peak learning rate (overrides --base-lr)")
    f.add("--min-lr", type=float)
    f.add("--seed", type=int)
    f.add("--resume", metavar="RUN_DIR|CKPT|auto|none",
          help="'auto': resume from RUN_DIR/checkpoint-last.pt if it exists; 'none': start from scratch; "
               "or a run directory / checkpoint file")
    f.add("--stop-epoch", type=int, metavar="N", help="stop after N epochs without shortening the schedule (resume later)")


def _eval_config(args: argparse.Namespace):
    """An evaluation config: ``--out`` is its ``output_dir``, ``--overwrite`` its ``overwrite``."""
    from kamim.config import parsed_config
    from kamim.inputs import preflight

    cfg = parsed_config(args, output_dir=str(args.out), **({"overwrite": True} if args.overwrite else {}))
    preflight(cfg, args.command)  # a missing path or a refused --out: one line before torch is imported
    return cfg


def _add_linprobe(sub: argparse._SubParsersAction) -> None:
    from kamim.config import ConfigFlags, LinprobeConfig, linprobe_recipes

    p = sub.add_parser(
        "linprobe", help="linear probing of a frozen encoder at one or every layer",
        description="Train one linear head per layer on frozen features in a single pass over the data; "
                    "writes RUN_DIR/linprobe.json + linprobe.csv (accuracy per layer per epoch) and config.yaml "
                    "(rerun with --config RUN_DIR/config.yaml). Recipes: --config reference or --config mae.",
    )
    f = ConfigFlags(p, LinprobeConfig)
    _add_eval_arguments(f)
    _add_training_arguments(f)
    f.add("--layers", metavar="SPEC", help=LAYERS_HELP + "; e.g. 8 or 1,4,8 or stage:3")
    f.add("--pool", choices=("avg", "cls"), help="avg: patch-token average; cls: the class token")
    f.add("--recipe", choices=tuple(linprobe_recipes()),
          help="fills opt, base-lr, weight-decay, batchnorm and aug where not given: reference = AdamW, "
               "finetune augmentation, no BN; mae = BN + LARS, light augmentation")
    f.add("--opt", choices=("adamw", "lars", "sgd"), help="default: the recipe's")
    f.add("--base-lr", type=float, help="peak lr = base-lr x batch / 256 (default: the recipe's)")
    f.add("--weight-decay", type=float, help="default: the recipe's")
    f.add("--batchnorm", action=argparse.BooleanOptionalAction,
          help="BatchNorm1d(affine=False) before each head (default: the recipe's)")
    f.add("--aug", choices=("finetune", "light", "none"), help="default: the recipe's")
    p.set_defaults(func=_cmd_linprobe)


def _cmd_linprobe(args: argparse.Namespace) -> int:
    cfg = _eval_config(args)  # validated before torch is imported
    from kamim.eval.linprobe import linear_probe

    linear_probe(cfg)
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from kamim.config import ConfigFlags, FinetuneConfig

    p = sub.add_parser(
        "finetune", help="finetune an encoder for classification (layer decay, mixup/cutmix, EMA)",
        description="MAE-style finetuning (the defaults are MAE's ViT-B recipe, also --config mae); writes "
                    "RUN_DIR/checkpoint-best.pt, checkpoint-last.pt, finetune.json + finetune.csv (top-1/top-5 "
                    "per epoch) and config.yaml.",
    )
    f = ConfigFlags(p, FinetuneConfig)
    _add_eval_arguments(f)
    _add_training_arguments(f)
    f.add("--pool", choices=("avg", "cls"), help="avg: patch-token average (reference head); cls: class token")
    f.add("--base-lr", type=float, help="peak lr = base-lr x batch / 256")
    f.add("--weight-decay", type=float)
    f.add("--layer-decay", type=float, help="layer-wise lr decay, 1 = off")
    f.add("--drop-path", type=float)
    f.add("--clip-grad", type=float, help="max grad norm (default: no clipping)")
    f.add("--mixup", type=float, help="mixup alpha, 0 = off")
    f.add("--cutmix", type=float, help="cutmix alpha, 0 = off")
    f.add("--smoothing", key="label_smoothing", type=float, help="label smoothing")
    f.add("--auto-augment", metavar="POLICY", help="timm RandAugment string, 'trivialaugment' or 'none'")
    f.add("--re-prob", type=float, help="random erasing probability")
    f.add("--ema", action="store_const", const=True, help="also evaluate an EMA of the weights")
    f.add("--ema-decay", type=float)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    cfg = _eval_config(args)
    from kamim.eval.finetune import finetune

    finetune(cfg)
    return 0


def _add_knn(sub: argparse._SubParsersAction) -> None:
    from kamim.config import ConfigFlags, KNNConfig

    p = sub.add_parser(
        "knn", help="weighted k-NN classification of frozen features (DINO protocol)",
        description="Extract train/val features of the chosen layers once and classify val by weighted k-NN; "
                    "writes RUN_DIR/knn.json + knn.csv and config.yaml. k larger than the train set is clamped.",
    )
    f = ConfigFlags(p, KNNConfig)
    _add_eval_arguments(f)
    f.add("--layers", metavar="SPEC", help=LAYERS_HELP + "; e.g. 8 or 1,4,8")
    f.add("--pool", choices=("avg", "cls"), help="avg: patch-token average; cls: the class token")
    f.add("--k", key="ks", type=_csv_list(int), metavar="K1,K2", help="neighbour counts")
    f.add("--temperature", type=float)
    f.add("--train-chunk-size", type=int, help="train rows per similarity block")
    f.add("--query-chunk-size", type=int, help="queries per similarity block")
    f.add("--bank-dtype", choices=("float16", "float32"), help="feature bank storage")
    p.set_defaults(func=_cmd_knn)


def _cmd_knn(args: argparse.Namespace) -> int:
    cfg = _eval_config(args)
    from kamim.eval.knn import run_knn

    run_knn(cfg)
    return 0


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    from kamim.config import ConfigFlags, ReconstructConfig

    p = sub.add_parser(
        "reconstruct", help="PSNR/SSIM of SimMIM/KAMIM reconstructions and a comparison figure",
        description="Score one or more pretraining checkpoints on the same images and masks; writes "
                    "RUN_DIR/reconstruct.json + reconstruct.csv, reconstructions.png and config.yaml.",
    )
    f = ConfigFlags(p, ReconstructConfig)
    f.add("--checkpoints", nargs="+", metavar="[NAME=]RUN_DIR|CKPT",
          help="kamim pretrain run directories or checkpoint files (names default to the run directory)")
    f.add("--data", metavar="PATH", help="image folder, NAME:ROOT torchvision dataset or demo")
    _add_out_argument(p, "output directory", action="whose results are replaced")
    f.add("--mask-ratio", type=float, help="the paper's")
    f.add("--mask-patch-size", type=int, help="default: the checkpoint's")
    f.add("--seed", type=int, help="mask seed")
    f.add("--max-images", type=int, help="only the first N images")
    f.add("--figure-images", type=int, help="rows of the figure, 0 = none")
    _add_execution_arguments(f, "images per batch and process")
    p.set_defaults(func=_cmd_reconstruct)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    cfg = _eval_config(args)
    from kamim.eval.reconstruct import run_reconstruct

    run_reconstruct(cfg)
    return 0


# --------------------------------------------------------------------------- doctor

def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="print versions, device and CPU (for bug reports)",
                       description="One line each: kamim, python, the libraries kamim uses, the device, "
                                   "the CPU model with its bf16 support, and the CPUs available.")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from kamim.doctor import environment_report

    report = environment_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


# --------------------------------------------------------------------------- entry point

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_pretrain, _add_sweep, _add_presets, _add_linprobe, _add_finetune, _add_knn, _add_reconstruct, _add_doctor,
]


def build_parser() -> argparse.ArgumentParser:
    from kamim import __version__

    parser = ArgumentParser(
        prog=PROG, description="Keypoint Aware Masked Image Modelling: pretraining and evaluation toolkit.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on the log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``kamim`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet)
    return run_command(PROG, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
