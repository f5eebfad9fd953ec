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
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.data import create_transform
from timm.scheduler import CosineLRScheduler
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
from kamim.engine.pretrain import NonFiniteLossError, find_resume_checkpoint
from kamim.engine.sampler import ResumableBatchSampler, SeededDataset
from kamim.precision import warn_if_slow_bf16
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

AMP_MODES = ("bf16", "fp16", "none")


def amp_dtype_of(amp: str, device: torch.device | str) -> torch.dtype | None:
    """``bf16`` -> bfloat16, ``fp16`` -> float16 (CUDA only), ``none`` -> None (full precision).

    bf16 on a CPU without native bf16 logs a one-time warning (:func:`kamim.precision.warn_if_slow_bf16`).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp {amp!r} is not valid; expected one of {', '.join(AMP_MODES)}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"amp=fp16 needs a CUDA device (device is {device}); use bf16 or none")
    warn_if_slow_bf16(amp, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


@dataclass
class LabelledData:
    """Train/val datasets (dict samples with ``image`` and ``label``) and their class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    img_size: tuple[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_geometry(self, model: nn.Module) -> None:
        """One-line error naming both shapes if the data's image size does not fit ``model``."""
        check_input_size(model, (3, *self.img_size))


def eval_transform(img_size: int | Sequence[int]) -> Callable:
    """The evaluation transform (resize + centre crop + ImageNet normalisation) of ``kamim.data``."""
    return EvalTransform(image_size_2d(img_size))


AUGMENTATIONS = ("finetune", "light", "none")


def classification_train_transform(
    img_size: int | Sequence[int],
    aug: str = "finetune",
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    scale: tuple[float, float] = (0.08, 1.0),
    interpolation: str = "bicubic",
) -> Callable:
    """Training transform for classification (PIL image -> normalised tensor).

    * ``finetune``: timm ``create_transform`` (RandomResizedCrop ``scale``, flip, ``auto_augment``:
      a timm RandAugment/AutoAugment string, or ``"trivialaugment"`` for torchvision's
      ``TrivialAugmentWide``; random erasing with probability ``re_prob``), the DeiT/MAE recipe;
    * ``light``: RandomResizedCrop + horizontal flip only (MAE linear probing);
    * ``none``: the evaluation transform.
    """
    if aug not in AUGMENTATIONS:
        raise ValueError(f"aug {aug!r} is not valid; expected one of {', '.join(AUGMENTATIONS)}")
    if not 0.0 <= re_prob <= 1.0:
        raise ValueError(f"re_prob must be in [0, 1], got {re_prob}")
    img_size = image_size_2d(img_size)
    if aug == "none":
        return eval_transform(img_size)
    if aug == "light":
        return create_transform(img_size, is_training=True, scale=scale, hflip=0.5, color_jitter=None,
                                auto_augment=None, interpolation=interpolation, re_prob=0.0)
    aa = None if auto_augment in (None, "", "none") else auto_augment
    if aa in ("trivialaugment", "ta_wide"):
        primary, _, final = create_transform(
            img_size, is_training=True, scale=scale, hflip=0.5, color_jitter=None, auto_augment=None,
            interpolation=interpolation, re_prob=re_prob, re_mode="pixel", separate=True,
        )
        return T.Compose([primary, T.TrivialAugmentWide(interpolation=T.InterpolationMode.BICUBIC), final])
    try:
        return harden_auto_augment(create_transform(
            img_size, is_training=True, scale=scale, hflip=0.5, color_jitter=0.4, auto_augment=aa,
            interpolation=interpolation, re_prob=re_prob, re_mode="pixel"))
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(f"auto_augment {auto_augment!r} is not a valid timm augmentation string ({e})") from None


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ between two flat config dicts (tuples compared as lists)."""
    norm = lambda v: json_safe(v)  # noqa: E731
    skip = set(ignore)
    return sorted(k for k in set(old) | set(new) if k not in skip and norm(old.get(k)) != norm(new.get(k)))


def build_labelled_data(
    spec: str | os.PathLike,
    img_size: int | Sequence[int],
    train_transform: Callable | None = None,
    val_transform: Callable | None = None,
    strict: bool = False,
) -> LabelledData:
    """Labelled train/val splits of ``spec`` (``kamim.data.build_labelled_splits``: a folder with
    train/ and val/ class folders, ``NAME:ROOT`` torchvision data, ``demo-photos``/``demo-digits``).

    Both splits default to the evaluation transform at ``img_size``.
    """
    img_size = image_size_2d(img_size)
    ev = eval_transform(img_size)
    split = build_labelled_splits(spec, train_transform or ev, val_transform or ev, strict=strict)
    if len(split.classes) < 2:
        raise ValueError(f"labelled data {spec} has {len(split.classes)} class(es); classification needs at least 2")
    return LabelledData(split.train, split.val, list(split.classes), img_size)


def eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, info: DistInfo
) -> tuple[DataLoader, Callable[[int, int], list[int]] | None]:
    """Loader over this rank's disjoint shard ``range(rank, N, world)`` in order.

    Returns the loader and, under DDP, ``indices_fn(batch_idx, batch_len)`` mapping a batch to
    dataset indices (None single-process). Unreadable images are dropped (``collate_skip_bad``);
    under DDP they are an error for feature banks, since rows would be misplaced.
    """
    n, world, rank = len(dataset), info.world_size, info.rank
    shard = dataset if world == 1 else Subset(dataset, list(range(rank, n, world)))
    loader = DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_skip_bad,
        pin_memory=info.device.type == "cuda", persistent_workers=False,
    )
    if world == 1:
        return loader, None

    def indices_fn(batch_idx: int, batch_len: int) -> list[int]:
        first = batch_idx * batch_size
        if batch_len != min(batch_size, len(shard) - first):
            raise RuntimeError(
                "unreadable images in a sharded feature bank (kamim.data warns about each one); fix or remove them"
            )
        return [rank + world * j for j in range(first, first + batch_len)]

    return loader, indices_fn


def train_loader(
    dataset: Dataset, global_batch: int, accum_steps: int, info: DistInfo, seed: int, num_workers: int
):
    """Deterministic, resumable training loader (``SeededDataset`` + ``ResumableBatchSampler``).

    Returns (loader, sampler); call ``sampler.set_epoch(epoch)`` before each epoch.
    """
    sampler = ResumableBatchSampler(
        len(dataset), global_batch, rank=info.rank, world_size=info.world_size, accum_steps=accum_steps, seed=seed
    )
    loader = DataLoader(
        SeededDataset(dataset, seed), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_skip_bad,
        pin_memory=info.device.type == "cuda", persistent_workers=num_workers > 0,
    )
    return loader, sampler


def classification_data(
    spec: str | os.PathLike,
    img_size: int | Sequence[int],
    aug: str,
    auto_augment: str | None,
    re_prob: float,
    model: nn.Module,
) -> LabelledData:
    """Labelled splits of ``spec`` for classifier training: ``classification_train_transform`` on train,
    the evaluation transform on val, both at ``img_size``; checked against ``model``'s input size."""
    img = image_size_2d(img_size)
    train_tf = classification_train_transform(img, aug, auto_augment, re_prob)
    data = build_labelled_data(spec, img, train_tf, eval_transform(img))
    data.check_geometry(model)
    return data


def micro_batch_size(batch_size: int, accum_steps: int, info: DistInfo) -> int:
    """Per-rank micro-batch of a GLOBAL ``batch_size``; one-line error unless it divides evenly."""
    world_micro = info.world_size * accum_steps
    if batch_size % world_micro:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by world size {info.world_size} x accum_steps={accum_steps}"
        )
    return batch_size // world_micro


def training_loaders(
    data: LabelledData, batch_size: int, accum_steps: int, info: DistInfo, seed: int, num_workers: int
) -> tuple[DataLoader, ResumableBatchSampler, DataLoader]:
    """(train loader, its sampler, val loader): :func:`train_loader` over ``data.train`` and the sharded
    :func:`eval_loader` over ``data.val`` at the per-rank micro-batch size."""
    loader, sampler = train_loader(data.train, batch_size, accum_steps, info, seed, num_workers)
    val_loader, _ = eval_loader(data.val, micro_batch_size(batch_size, accum_steps, info), num_workers, info)
    return loader, sampler, val_loader


# --------------------------------------------------------------------------- optimisation


def cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
):
    """timm ``CosineLRScheduler`` over optimizer steps: linear warmup then cosine to ``min_lr``.

    Honours per-group ``lr_scale`` (layer decay). Call ``step_update(n)`` after optimizer step n.
    """
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
    return CosineLRScheduler(
        optimizer, t_initial=max(1, int(total_steps) - warmup_steps), lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr, warmup_prefix=True, cycle_limit=1, t_in_epochs=False,
    )


class EpochRunConfig(Protocol):
    """The fields of an epoch-based training config (``LinprobeConfig``, ``FinetuneConfig``) used here."""

    checkpoint: Any
    epochs: int
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    stop_epoch: int | None


def epoch_scheduler(optimizer: torch.optim.Optimizer, cfg: EpochRunConfig, steps_per_epoch: int):
    """:func:`cosine_scheduler` over ``cfg.epochs`` epochs with ``cfg.warmup_epochs`` of warmup."""
    return cosine_scheduler(
        optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.warmup_lr, cfg.min_lr
    )


def clamped_warmup(warmup_epochs: int, epochs: int, default_fraction: float, task: str) -> int:
    """``warmup_epochs``, or ``int(epochs * default_fraction)`` with a logged warning when the warmup
    would leave no epoch after it (e.g. ``--epochs 1`` with a recipe's default warmup)."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0 or warmup_epochs < epochs:
        return int(warmup_epochs)
    clamped = int(epochs * default_fraction)
    logging.getLogger(f"kamim.{task}").warning(
        "warmup_epochs=%d leaves no epoch after the warmup of a %d-epoch run: using %d", warmup_epochs, epochs, clamped)
    return clamped


def stop_epoch(cfg: EpochRunConfig) -> int:
    """The epoch after which this invocation stops: ``cfg.stop_epoch`` (capped at ``cfg.epochs``) or ``cfg.epochs``."""
    return cfg.epochs if cfg.stop_epoch is None else min(int(cfg.stop_epoch), cfg.epochs)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (clamped to #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).float()


@torch.no_grad()
def evaluate_logits(
    heads: Callable[[torch.Tensor], Mapping[Any, torch.Tensor]],
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[Any, dict[str, float]]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of every named output of ``heads(images)``,
    exact over ranks (counts summed; shards must be disjoint)."""
    sums: dict[Any, torch.Tensor] = {}
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if isinstance(batch, dict) and "image" not in batch:
            continue  # every image of the batch was unreadable
        images, target = unpack_labelled(batch)
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            outs = heads(images)
        for name, logits in outs.items():
            logits = logits.float()
            loss = nn.functional.cross_entropy(logits, target, reduction="sum")
            count = torch.full((1,), float(len(target)), device=device)
            stats = torch.cat([topk_correct(logits, target), loss.reshape(1), count])
            sums[name] = sums[name] + stats if name in sums else stats
    if not sums:
        raise ValueError("the evaluation loader yielded no images")
    names = sorted(sums, key=str)
    packed = all_reduce_sum(torch.stack([sums[n] for n in names]))
    out = {}
    for name, (c1, c5, loss, count) in zip(names, packed.tolist()):
        out[name] = {"top1": 100.0 * c1 / count, "top5": 100.0 * c5 / count, "loss": loss / count, "count": int(count)}
    return out


# --------------------------------------------------------------------------- training runs

# config keys that may change between a run and its resumption
RESUME_SAFE_KEYS = frozenset({"num_workers", "device", "progress", "resume", "stop_epoch", "load_options",
                              "overwrite"})


@contextlib.contextmanager
def distributed_session(device: str) -> Iterator[DistInfo]:
    """``init_distributed(device)`` for the body; the process group is destroyed afterwards only if
    this call created it (one set up by the caller, e.g. a sweep under torchrun, is left alone)."""
    created = not kdist.is_distributed()
    info = kdist.init_distributed(device)
    try:
        yield info
    finally:
        if created:
            kdist.cleanup()


def check_output_dir(path: str | os.PathLike, task: str, overwrite: bool = False) -> Path:
    """``path`` as a Path if ``kamim TASK`` may write into it (:func:`kamim.outputs.check_output_dir`:
    new, empty or an earlier ``kamim TASK`` output, whose results file ``TASK.json`` also marks it)."""
    return outputs.check_output_dir(path, f"kamim {task}", overwrite=overwrite, legacy=(f"{task}.json",))


@contextlib.contextmanager
def claimed_run_dir(out_dir: Path, task: str, info: DistInfo) -> Iterator[None]:
    """Rank 0 creates, locks (:func:`kamim.outputs.lock_output`; a second process gets a one-line
    error naming this one's pid) and marks the run directory as ``kamim TASK``'s and removes the
    temporary files of earlier killed saves; every rank waits for it. The lock is held until exit."""
    from kamim.serialization import remove_stale_temp_files

    lock = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = outputs.lock_output(out_dir, f"run directory '{out_dir}'")
        outputs.mark_output_dir(out_dir, f"kamim {task}")
        remove_stale_temp_files(out_dir)
    try:
        kdist.barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


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
