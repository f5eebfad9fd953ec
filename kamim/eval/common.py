"""Shared plumbing of the evaluation engines: encoders, labelled data, loaders, schedules, results.

Conventions shared by ``linprobe``, ``finetune``, ``knn`` and ``reconstruct``:

* Training data order is a function of ``(seed, epoch, index)`` (``kamim.engine.sampler``), the
  batch size is GLOBAL (all ranks and accumulation steps) and the cosine schedule is stepped once
  per optimizer step, like the pretraining engine.
* Evaluation splits the dataset into disjoint per-rank shards (``range(rank, N, world)``, no
  padding) and sums counts over ranks, so DDP metrics are exact (``DistributedSampler`` would
  duplicate samples to even out the shards).
* Results are written atomically as ``<name>.json`` (everything) and ``<name>.csv`` (the table)
  in the run directory and printed as a table by rank 0.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from tqdm.auto import tqdm

from kamim import distributed as kdist
from kamim import outputs
from kamim.checkpoints import load_encoder
from kamim.data import EvalTransform, build_labelled_splits, collate_skip_bad
from kamim.data.transforms import harden_auto_augment
from kamim.distributed import DistInfo, all_reduce_sum
from kamim.runtime import NonFiniteLossError, ResumableBatchSampler, SeededDataset, find_resume_checkpoint
# the training region moved to kamim.runtime; re-exported here for old imports
from kamim.runtime import (  # noqa: F401
    AMP_MODES, EpochRunConfig, amp_dtype_of, autocast, clamped_warmup, cosine_scheduler, epoch_scheduler,
    micro_batch_size, stop_epoch,
)
from kamim.serialization import CheckpointError, atomic_write_json, atomic_write_text, safe_load

from .features import check_input_size, num_layers, unpack_labelled

__all__ = [
    "AMP_MODES",
    "amp_dtype_of",
    "autocast",
    "Encoder",
    "encoder_from_module",
    "resolve_encoder",
    "image_size_2d",
    "classification_train_transform",
    "config_changes",
    "LabelledData",
    "build_labelled_data",
    "eval_transform",
    "eval_loader",
    "train_loader",
    "cosine_scheduler",
    "distributed_session",
    "check_output_dir",
    "micro_batch_size",
    "classification_data",
    "training_loaders",
    "epoch_scheduler",
    "config_record",
    "load_resume_checkpoint",
    "ddp_wrap",
    "sync_context",
    "zero_loss",
    "check_finite_loss",
    "epoch_progress",
    "stop_epoch",
    "clamped_warmup",
    "EpochRunConfig",
    "RESUME_SAFE_KEYS",
    "claimed_run_dir",
    "topk_correct",
    "evaluate_logits",
    "json_safe",
    "write_results",
    "format_table",
    "print_table",
]

@dataclass
class Encoder:
    """An in-memory encoder with the geometry fields of ``kamim.checkpoints.LoadedEncoder``."""

    model: nn.Module
    image_size: tuple[int, int]
    patch_size: int | tuple[int, int] | None
    num_prefix_tokens: int
    format: str = "module"
    report: Any = None


def encoder_from_module(model: nn.Module) -> Encoder:
    """Wrap an in-memory timm ViT/Swin (``num_classes=0``) with its geometry read from the model."""
    num_layers(model)  # one-line error for a non-timm model
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__} (no patch_embed.img_size)")
    patch = tuple(int(p) for p in pe.patch_size)
    return Encoder(model, (int(size[0]), int(size[1])), patch[0] if patch[0] == patch[1] else patch,
                   int(getattr(model, "num_prefix_tokens", 0)))


def image_size_2d(size: int | Sequence[int]) -> tuple[int, int]:
    """``img_size`` as (H, W); one-line error for anything else."""
    vals = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"image size must be a positive int or an (H, W) pair, got {size!r}")
    return int(vals[0]), int(vals[1])


def resolve_encoder(
    source: str | os.PathLike | nn.Module, device: torch.device, options: Mapping[str, Any] | None = None,
    frozen: bool = True,
):
    """``kamim.checkpoints.load_encoder(source, **options)`` (or an in-memory model) on ``device``.

    ``frozen=True``: eval mode and ``requires_grad=False`` (probing, k-NN; an in-memory model is used
    as is). ``frozen=False`` (finetuning): an in-memory model is deep-copied, never modified.
    """
    if isinstance(source, nn.Module):
        enc = encoder_from_module(source if frozen else copy.deepcopy(source))
    else:
        enc = load_encoder(source, **dict(options or {}))
    enc.model.to(device)
    if frozen:
        enc.model.eval().requires_grad_(False)
    return enc


# --------------------------------------------------------------------------- data


# moved to kamim.eval.data; re-exported here for old imports
from .data import (  # noqa: E402,F401
    AUGMENTATIONS, LabelledData, build_labelled_data, classification_data, classification_train_transform,
    eval_loader, eval_transform, train_loader, training_loaders,
)


# --------------------------------------------------------------------------- optimisation


# moved to kamim.eval.scoring; re-exported here for old imports
from .scoring import evaluate_logits, topk_correct  # noqa: E402,F401


# --------------------------------------------------------------------------- training runs

# moved to kamim.eval.session; re-exported here for old imports
from .session import (  # noqa: E402,F401
    RESUME_SAFE_KEYS, check_output_dir, claimed_run_dir, config_changes, distributed_session,
)


def config_record(cfg: EpochRunConfig) -> dict[str, Any]:
    """A dataclass config as plain JSON for checkpoints and results (an in-memory model is named, not stored)."""
    d = dataclasses.asdict(cfg)
    if isinstance(cfg.checkpoint, nn.Module):
        d["checkpoint"] = f"<in-memory {type(cfg.checkpoint).__name__}>"
    return json_safe(d)


def load_resume_checkpoint(
    out_dir: Path,
    resume: Any,
    fmt: str,
    what: str,
    config: Mapping[str, Any],
    ignore: Iterable[str] = RESUME_SAFE_KEYS,
) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) to resume from (``kamim.engine.pretrain.find_resume_checkpoint`` rules), or None.

    One-line errors for a checkpoint of another ``fmt`` (``what`` names the kind in the message) and
    for one whose stored config differs from ``config`` outside ``ignore``.
    """
    path = find_resume_checkpoint(out_dir, resume)
    if path is None:
        return None
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise CheckpointError(f"{path} is not a kamim {what} checkpoint (format '{fmt}')")
    diff = config_changes(ckpt["config"], config, ignore=ignore)
    if diff:
        show = ", ".join(f"{k} ({ckpt['config'].get(k)!r} -> {config.get(k)!r})" for k in diff[:4])
        raise ValueError(
            f"cannot resume from {path}: the config differs in {show}; use a new output dir or resume=none"
        )
    return path, ckpt


def ddp_wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when running on several ranks, else ``module`` itself."""
    if info.world_size == 1:
        return module
    device = info.device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_context(module: nn.Module, sync: bool):
    """``module.no_sync()`` for a DDP module on a micro-batch that must not all-reduce (gradient
    accumulation), else a no-op context."""
    if not sync and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def zero_loss(module: nn.Module) -> torch.Tensor:
    """A zero loss touching every parameter: a micro-batch whose images were all unreadable still
    backpropagates (zero gradients), which keeps DDP ranks in step."""
    return sum(p.sum() for p in module.parameters()) * 0.0


def check_finite_loss(loss: torch.Tensor, what: str, epoch: int, step: int, checkpoint: Path) -> None:
    """``NonFiniteLossError`` naming 1-based ``epoch``/``step`` if ``loss`` is NaN/inf."""
    if not math.isfinite(float(loss.detach())):
        raise NonFiniteLossError(
            f"non-finite {what} loss at epoch {epoch + 1}, step {step + 1}; stopped, last checkpoint left intact "
            f"({checkpoint})"
        )


def epoch_progress(total: int, desc: str, enabled: bool) -> tqdm:
    """Progress bar over the optimizer steps of one epoch."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- results


def json_safe(obj: Any) -> Any:
    """Plain JSON data: tuples -> lists, Paths -> str, tensors -> numbers/lists, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return obj


def write_results(
    out_dir: str | os.PathLike, name: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``summary`` to ``out_dir/name.json`` and ``rows`` to ``out_dir/name.csv`` (both atomic);
    ``out_dir`` is created and marked as an output of ``kamim NAME``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs.mark_output_dir(out, f"kamim {name}")
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in json_safe(dict(r)).items()})
    csv_path = atomic_write_text(buf.getvalue(), out / f"{name}.csv")
    json_path = atomic_write_json(json_safe(dict(summary)), out / f"{name}.json")
    return json_path, csv_path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
    return "" if v is None else str(v)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, title: str | None = None
) -> str:
    """A plain-text, right-aligned table of ``rows`` (floats with 2 decimals, 3 significant digits below 0.01)."""
    if not rows:
        return (title + "\n" if title else "") + "(no rows)"
    cols = list(columns) if columns else [k for k in rows[0]]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, title: str | None = None
) -> None:
    """Print :func:`format_table`."""
    print(format_table(rows, columns, title), flush=True)
