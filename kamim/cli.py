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
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from kamim.errors import ArgumentParser, run_command

__all__ = ["main", "build_parser", "SUBCOMMANDS", "add_config_arguments", "load_config_from_args"]

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


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config PRESET|FILE.yaml`` and ``--set key=value ...`` (shared by training commands)."""
    p.add_argument("--config", required=True, metavar="PRESET|FILE",
                   help="preset name (see `kamim presets`) or a YAML config file")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set optim.epochs=10 kamim.temperature=0.5")


def load_config_from_args(args: argparse.Namespace):
    """The validated ``Config`` of ``--config`` + ``--set``."""
    from kamim.config import load_config

    return load_config(args.config, args.overrides)


def _pixels(text: str) -> int:
    """An image side in pixels: an int of at least 16 (a smaller one cannot hold a single ViT patch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 pixels, got {value}")
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
                   help=OVERWRITE_HELP.format(effect="files of the same name are replaced, others kept"))


def _add_resume_argument(p: argparse.ArgumentParser) -> None:
    """``--resume`` with the rules of ``kamim.engine.pretrain.find_resume_checkpoint``."""
    p.add_argument("--resume", default="auto", metavar="RUN_DIR|CKPT|auto|none",
                   help="'auto' (default): resume from RUN_DIR/checkpoint-last.pt if it exists; "
                        "'none': start from scratch; or a run directory / checkpoint file")


def _config_from_args(cls: type, args: argparse.Namespace, **explicit):
    """``cls(...)`` from every field of the dataclass ``cls`` that is also an argument of the same
    name, plus ``explicit`` values (renamed or converted arguments), which take precedence."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **explicit})


# --------------------------------------------------------------------------- pretrain

def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a model (SimMIM, KAMIM or MoCo v3)",
        description="Pretrain with a preset or YAML config. Resumes automatically from RUN_DIR/checkpoint-last.pt.",
    )
    add_config_arguments(p)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="image folder, NAME:ROOT torchvision dataset or 'demo' (default: the config's data.path)")
    _add_out_argument(p, "run directory")
    _add_resume_argument(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from kamim.engine.pretrain import ENCODER_FILE, pretrain

    cfg = load_config_from_args(args)
    ckpt = pretrain(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite)
    if _is_main():
        print(f"checkpoint: {ckpt}")
        print(f"encoder:    {ckpt.parent / ENCODER_FILE}")
    return 0


# --------------------------------------------------------------------------- sweep

def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from kamim.engine.sweep_grid import EVAL_METHODS, PAPER_TEMPERATURES, PAPER_WEIGHT_PATCH_SIZES

    p = sub.add_parser(
        "sweep", help="KAMIM grid over detectors x weight patch sizes x temperatures",
        description="One run directory per grid point under OUT (finished points are reused, interrupted "
                    "ones resumed) and a results table OUT/results.csv + OUT/results.json. Final losses are "
                    "not comparable across temperatures (the KAMIM weights scale the loss): give --eval-data "
                    "to add an evaluation column (top-1 as a fraction in [0, 1]; the table is printed best "
                    "first). Recorded evaluations of unchanged encoders are reused on rerun.",
    )
    add_config_arguments(p)
    p.add_argument("--data", default=None, metavar="PATH", help="training data (default: the config's data.path)")
    _add_out_argument(p, "sweep directory", metavar="OUT")
    p.add_argument("--detectors", type=_csv_list(str), default=None, metavar="D1,D2",
                   help="keypoint detectors, e.g. fast,sift,orb (default: the config's kamim.detector)")
    p.add_argument("--weight-patch-sizes", type=_csv_list(int), default=list(PAPER_WEIGHT_PATCH_SIZES),
                   metavar="W1,W2", help="default: %(default)s (the paper's grid)")
    p.add_argument("--temperatures", type=_csv_list(float), default=list(PAPER_TEMPERATURES),
                   metavar="T1,T2", help="default: %(default)s (the paper's grid)")
    g = p.add_argument_group("evaluation of each run's encoder")
    g.add_argument("--eval-data", default=None, metavar="PATH", type=_labelled_data,
                   help="labelled data: folder with train/ and val/ class folders, NAME:ROOT torchvision "
                        "dataset, demo-photos or demo-digits (enables evaluation)")
    g.add_argument("--eval", dest="eval_methods", type=_csv_list(str), default=None, metavar="M1,M2",
                   help=f"evaluations, some of {','.join(EVAL_METHODS)}; the first sorts the table "
                        "(default: knn)")
    g.add_argument("--eval-layer", default="default", metavar="LAYER",
                   help="one layer: " + LAYERS_HELP)
    g.add_argument("--eval-k", type=int, default=20, help="k-NN neighbours (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=128, help="default: %(default)s")
    g.add_argument("--linprobe-epochs", type=int, default=10, help="linear probe epochs (default: %(default)s)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kamim.engine.sweep import SweepEval, result_fields, sort_by_metric, sweep

    cfg = load_config_from_args(args)
    evaluation = None
    if args.eval_data is not None:
        evaluation = SweepEval(
            data=args.eval_data, methods=tuple(args.eval_methods or ["knn"]), layer=args.eval_layer, k=args.eval_k,
            batch_size=args.eval_batch_size, linprobe_epochs=args.linprobe_epochs,
        ).validate()
    elif args.eval_methods is not None:  # checked before the grid is trained
        raise ValueError("--eval needs --eval-data (labelled data to evaluate each run's encoder on)")
    rows = sweep(cfg, args.data, args.out, detectors=args.detectors, weight_patch_sizes=args.weight_patch_sizes,
                 temperatures=args.temperatures, evaluation=evaluation, overwrite=args.overwrite)
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
    p = sub.add_parser("presets", help="list the bundled config presets",
                       description="List preset names usable with --config, with their description.")
    p.set_defaults(func=_cmd_presets)


def _cmd_presets(args: argparse.Namespace) -> int:
    from kamim.config import list_presets, preset_path

    for name in list_presets():
        first = next((ln.lstrip("# ").strip() for ln in preset_path(name).read_text().splitlines()
                      if ln.startswith("#")), "")
        print(f"{name:<16} {first}")
    return 0


# --------------------------------------------------------------------------- evaluation

def _labelled_data(text: str) -> str:
    """``--data`` of the evaluations: ``demo`` (unlabelled, for pretraining) is refused with a hint,
    unless a folder of that name exists."""
    if text == "demo" and not Path(text).is_dir():
        raise argparse.ArgumentTypeError("'demo' is the unlabelled pretraining demo; the labelled "
                                         "demo sets are demo-photos and demo-digits")
    return text


def _clamp_workers(args: argparse.Namespace) -> None:
    """Lower ``--num-workers`` to the CPUs available (more only oversubscribe them), with a warning."""
    from kamim.doctor import available_cpus

    cpus = available_cpus()
    if getattr(args, "num_workers", None) is not None and args.num_workers > cpus:
        logging.getLogger("kamim").warning("--num-workers %d is more than the %d CPUs available; using %d",
                                           args.num_workers, cpus, cpus)
        args.num_workers = cpus


def _add_eval_arguments(p: argparse.ArgumentParser, batch_size: int, amp: str = "bf16") -> None:
    """Arguments shared by linprobe / finetune / knn: encoder, data, run directory, execution."""
    p.add_argument("--checkpoint", required=True, metavar="SOURCE",
                   help="encoder: checkpoint file in any supported format (e.g. a kamim pretrain run's "
                        "encoder.safetensors or checkpoint-last.pt), Hugging Face directory, manifest name or "
                        "timm model name (random init)")
    p.add_argument("--data", required=True, metavar="PATH", type=_labelled_data,
                   help="folder with train/ and val/ class folders, NAME:ROOT torchvision dataset, "
                        "demo-photos or demo-digits")
    _add_out_argument(p, "run directory (results, checkpoints)")
    p.add_argument("--model-name", default=None, help="timm model to build for a plain state dict")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads when the checkpoint cannot tell")
    p.add_argument("--encoder-img-size", type=_pixels, default=None, metavar="PX",
                   help="build the encoder at this size (position embeddings resampled)")
    p.add_argument("--img-size", type=_pixels, default=None, metavar="PX", help="data image size (default: the encoder's)")
    _add_execution_arguments(p, batch_size, amp, "global batch size")


def _add_execution_arguments(p: argparse.ArgumentParser, batch_size: int, amp: str, batch_help: str) -> None:
    """Batch size, loader workers, device, autocast and progress bars (every evaluation command)."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_help} (default: %(default)s)")
    from kamim.doctor import default_num_workers

    p.add_argument("--num-workers", type=int, default=default_num_workers(),
                   help="data loader workers per process, at most the CPUs available (default: %(default)s "
                        "= min(4, CPUs available))")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--amp", default=amp, choices=("bf16", "fp16", "none"), help="autocast (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_training_arguments(p: argparse.ArgumentParser, epochs: int, warmup: int, min_lr: float) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help="default: %(default)s")
    p.add_argument("--warmup-epochs", type=int, default=warmup, help="default: %(default)s")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="absolute peak learning rate (overrides --base-lr)")
    p.add_argument("--min-lr", type=float, default=min_lr, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    _add_resume_argument(p)
    p.add_argument("--stop-epoch", type=int, default=None, metavar="N",
                   help="stop after N epochs without shortening the schedule (resume later)")


def _load_options(args: argparse.Namespace) -> dict:
    opts = {"model_name": args.model_name, "num_heads": args.num_heads, "img_size": args.encoder_img_size}
    return {k: v for k, v in opts.items() if v is not None}


def _eval_config(cls: type, args: argparse.Namespace, **explicit):
    """An evaluation config from the arguments (``--out`` and the encoder-building options renamed)."""
    return _config_from_args(cls, args, output_dir=str(args.out), load_options=_load_options(args), **explicit)


def _add_linprobe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "linprobe", help="linear probing of a frozen encoder at one or every layer",
        description="Train one linear head per layer on frozen features in a single pass over the data; "
                    "writes RUN_DIR/linprobe.json + linprobe.csv (accuracy per layer per epoch).",
    )
    _add_eval_arguments(p, batch_size=256)
    _add_training_arguments(p, epochs=90, warmup=10, min_lr=0.0)
    p.add_argument("--layers", default="default", metavar="SPEC",
                   help=LAYERS_HELP + "; e.g. 8 or 1,4,8 or stage:3 (default: %(default)s)")
    p.add_argument("--pool", default="avg", choices=("avg", "cls"), help="patch-token average or CLS token")
    p.add_argument("--recipe", default="reference", choices=("reference", "mae"),
                   help="reference: AdamW, finetune augmentation, no BN; mae: BN + LARS, light augmentation")
    p.add_argument("--opt", default=None, choices=("adamw", "lars", "sgd"), help="default: the recipe's")
    p.add_argument("--base-lr", type=float, default=None, help="peak lr = base-lr x batch / 256 (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the recipe's")
    p.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm1d(affine=False) before each head (default: the recipe's)")
    p.add_argument("--aug", default=None, choices=("finetune", "light", "none"), help="default: the recipe's")
    p.set_defaults(func=_cmd_linprobe)


def _cmd_linprobe(args: argparse.Namespace) -> int:
    from kamim.eval.linprobe import LinprobeConfig, linear_probe

    linear_probe(_eval_config(LinprobeConfig, args))
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="finetune an encoder for classification (layer decay, mixup/cutmix, EMA)",
        description="MAE-style finetuning; writes RUN_DIR/checkpoint-best.pt, checkpoint-last.pt and "
                    "finetune.json + finetune.csv (top-1/top-5 per epoch).",
    )
    _add_eval_arguments(p, batch_size=1024)
    _add_training_arguments(p, epochs=100, warmup=5, min_lr=1e-6)
    p.add_argument("--pool", default="avg", choices=("avg", "cls"), help="avg: patch-token average (reference head); cls: class token")
    p.add_argument("--base-lr", type=float, default=5e-4, help="peak lr = base-lr x batch / 256 (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="default: %(default)s")
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay, 1 = off (default: %(default)s)")
    p.add_argument("--drop-path", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--clip-grad", type=float, default=None, help="max grad norm (default: no clipping)")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, 0 = off (default: %(default)s)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, 0 = off (default: %(default)s)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)")
    p.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", metavar="POLICY",
                   help="timm RandAugment string, 'trivialaugment' or 'none' (default: %(default)s)")
    p.add_argument("--re-prob", type=float, default=0.25, help="random erasing probability (default: %(default)s)")
    p.add_argument("--ema", action="store_true", help="also evaluate an EMA of the weights")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="default: %(default)s")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from kamim.eval.finetune import FinetuneConfig, finetune

    finetune(_eval_config(
        FinetuneConfig, args, label_smoothing=args.smoothing,
        auto_augment=None if args.auto_augment == "none" else args.auto_augment,
    ))
    return 0


def _add_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "knn", help="weighted k-NN classification of frozen features (DINO protocol)",
        description="Extract train/val features of the chosen layers once and classify val by weighted k-NN; "
                    "writes RUN_DIR/knn.json + knn.csv. k larger than the train set is clamped.",
    )
    _add_eval_arguments(p, batch_size=128)
    p.add_argument("--layers", default="default", metavar="SPEC",
                   help=LAYERS_HELP + "; e.g. 8 or 1,4,8 (default: %(default)s)")
    p.add_argument("--pool", default="avg", choices=("avg", "cls"))
    p.add_argument("--k", dest="ks", type=_csv_list(int), default=[20, 200], metavar="K1,K2",
                   help="neighbour counts (default: 20,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="default: %(default)s")
    p.add_argument("--train-chunk-size", type=int, default=65536, help="train rows per similarity block")
    p.add_argument("--query-chunk-size", type=int, default=1024, help="queries per similarity block")
    p.add_argument("--bank-dtype", default="float16", choices=("float16", "float32"), help="feature bank storage")
    p.set_defaults(func=_cmd_knn)


def _cmd_knn(args: argparse.Namespace) -> int:
    from kamim.eval.knn import KNNConfig, run_knn

    run_knn(_eval_config(KNNConfig, args, ks=tuple(args.ks)))
    return 0


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct", help="PSNR/SSIM of SimMIM/KAMIM reconstructions and a comparison figure",
        description="Score one or more pretraining checkpoints on the same images and masks; writes "
                    "RUN_DIR/reconstruct.json + reconstruct.csv and reconstructions.png.",
    )
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="[NAME=]RUN_DIR|CKPT",
                   help="kamim pretrain run directories or checkpoint files (names default to the run directory)")
    p.add_argument("--data", required=True, metavar="PATH", help="image folder, NAME:ROOT torchvision dataset or demo")
    _add_out_argument(p, "output directory", action="whose results are replaced")
    p.add_argument("--mask-ratio", type=float, default=0.4, help="default: %(default)s (the paper's)")
    p.add_argument("--mask-patch-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--figure-images", type=int, default=4, help="rows of the figure, 0 = none (default: %(default)s)")
    _add_execution_arguments(p, batch_size=32, amp="none", batch_help="images per batch and process")
    p.set_defaults(func=_cmd_reconstruct)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from kamim.eval.reconstruct import ReconstructConfig, run_reconstruct

    run_reconstruct(_config_from_args(ReconstructConfig, args, output_dir=str(args.out)))
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
    level = logging.WARNING if (args.quiet or not _is_main()) else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _clamp_workers(args)
    return run_command(PROG, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
