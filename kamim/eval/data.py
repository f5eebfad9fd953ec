"""Labelled data of the evaluations: transforms, train/val splits and the deterministic loaders.

* :func:`eval_transform` is timm's ``create_transform(is_training=False)`` (resize the short side to
  ``img_size / 0.875``, bicubic, centre crop, ImageNet normalisation), i.e. exactly
  ``kamim.data.EvalTransform`` for square sizes (``tests/test_eval_data.py`` compares them on
  photographs). For a non-square ``(H, W)`` timm resizes so that the image covers
  ``(H / 0.875, W / 0.875)`` (``ResizeKeepRatio``) where ``EvalTransform`` resizes the short side to
  ``max(H, W) / 0.875``; timm's crop keeps more of the image.
* :func:`classification_train_transform`: the DeiT/MAE finetuning recipe, MAE's light probing
  augmentation, or the evaluation transform.
* Training data order is a function of ``(seed, epoch, index)`` (``ResumableBatchSampler``), the
  batch size is GLOBAL (all ranks and accumulation steps).
* Evaluation splits the dataset into disjoint per-rank shards (``range(rank, N, world)``, no
  padding), so DDP metrics summed over ranks are exact (``DistributedSampler`` would duplicate
  samples to even out the shards).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from kamim.backbone import check_input_size, to_hw
from kamim.data import build_labelled_splits, data_loader
from kamim.data.transforms import harden_auto_augment
from kamim.distributed import DistInfo
from kamim.runtime.sampler import ResumableBatchSampler, SeededDataset
from kamim.runtime.schedule import micro_batch_size

__all__ = [
    "AUGMENTATIONS",
    "LabelledData",
    "eval_transform",
    "classification_train_transform",
    "build_labelled_data",
    "classification_data",
    "eval_loader",
    "train_loader",
    "training_loaders",
]

AUGMENTATIONS = ("finetune", "light", "none")
EVAL_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT, the resize ratio of kamim.data.EvalTransform


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
    """The evaluation transform: timm ``create_transform(is_training=False)`` at ``img_size``
    (short side resized to ``img_size / 0.875``, bicubic, centre crop, ImageNet mean/std).

    PIL RGB image -> float32 (3, H, W) tensor (the datasets of ``kamim.data`` store it as ``image``).
    """
    return create_transform(to_hw(img_size), is_training=False, interpolation="bicubic",
                            crop_pct=EVAL_CROP_PCT, crop_mode="center")


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
    img_size = to_hw(img_size)
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
    img_size = to_hw(img_size)
    ev = eval_transform(img_size)
    split = build_labelled_splits(spec, train_transform or ev, val_transform or ev, strict=strict)
    if len(split.classes) < 2:
        raise ValueError(f"labelled data {spec} has {len(split.classes)} class(es); classification needs at least 2")
    return LabelledData(split.train, split.val, list(split.classes), img_size)


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
    img = to_hw(img_size)
    train_tf = classification_train_transform(img, aug, auto_augment, re_prob)
    data = build_labelled_data(spec, img, train_tf, eval_transform(img))
    data.check_geometry(model)
    return data


def eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int | None, info: DistInfo
) -> tuple[DataLoader, Callable[[int, int], list[int]] | None]:
    """Loader over this rank's disjoint shard ``range(rank, N, world)`` in order.

    Returns the loader and, under DDP, ``indices_fn(batch_idx, batch_len)`` mapping a batch to
    dataset indices (None single-process). Unreadable images are dropped (``collate_skip_bad``);
    under DDP they are an error for feature banks, since rows would be misplaced.
    """
    n, world, rank = len(dataset), info.world_size, info.rank
    shard = dataset if world == 1 else Subset(dataset, list(range(rank, n, world)))
    loader = data_loader(shard, workers=num_workers, batch_size=batch_size, pin_memory=info.device.type == "cuda")
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
    dataset: Dataset, global_batch: int, accum_steps: int, info: DistInfo, seed: int, num_workers: int | None
) -> tuple[DataLoader, ResumableBatchSampler]:
    """Deterministic, resumable training loader (``SeededDataset`` + ``ResumableBatchSampler``).

    Returns (loader, sampler); call ``sampler.set_epoch(epoch)`` before each epoch.
    """
    sampler = ResumableBatchSampler(
        len(dataset), global_batch, rank=info.rank, world_size=info.world_size, accum_steps=accum_steps, seed=seed
    )
    loader = data_loader(SeededDataset(dataset, seed), workers=num_workers, persistent=True, batch_sampler=sampler,
                         pin_memory=info.device.type == "cuda")
    return loader, sampler


def training_loaders(
    data: LabelledData, batch_size: int, accum_steps: int, info: DistInfo, seed: int, num_workers: int | None
) -> tuple[DataLoader, ResumableBatchSampler, DataLoader]:
    """(train loader, its sampler, val loader): :func:`train_loader` over ``data.train`` and the sharded
    :func:`eval_loader` over ``data.val`` at the per-rank micro-batch size."""
    loader, sampler = train_loader(data.train, batch_size, accum_steps, info, seed, num_workers)
    val_loader, _ = eval_loader(data.val, micro_batch_size(batch_size, info.world_size, accum_steps), num_workers, info)
    return loader, sampler, val_loader
