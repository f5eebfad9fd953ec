"""Learning-rate schedules over OPTIMIZER steps and the batch/epoch arithmetic of a training run.

Every task (pretraining, probing, finetuning) uses timm's ``CosineLRScheduler`` with
``t_in_epochs=False``: linear warmup from ``warmup_lr`` then cosine to ``min_lr``, ``step_update(n)``
called after optimizer step n (:class:`kamim.runtime.step.TrainStep` does it), so gradient
accumulation does not change the schedule. Per-group ``lr_scale`` (layer decay) is honoured.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from timm.scheduler import CosineLRScheduler

from kamim.config import ConfigError, clamped_warmup  # noqa: F401  (clamped_warmup re-exported)

__all__ = ["cosine_scheduler", "EpochRunConfig", "epoch_scheduler", "stop_epoch", "micro_batch_size",
           "clamped_warmup"]


def cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
) -> CosineLRScheduler:
    """timm ``CosineLRScheduler`` over ``total_steps`` optimizer steps (warmup included, clamped to
    ``total_steps - 1``): linear warmup ``warmup_lr -> peak`` then cosine ``peak -> min_lr``.

    Call ``step_update(n)`` after optimizer step n; the LR of update n+1 is then set.
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


def epoch_scheduler(optimizer: torch.optim.Optimizer, cfg: EpochRunConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """:func:`cosine_scheduler` over ``cfg.epochs`` epochs with ``cfg.warmup_epochs`` of warmup."""
    return cosine_scheduler(
        optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, cfg.warmup_lr, cfg.min_lr
    )


def stop_epoch(cfg: EpochRunConfig) -> int:
    """The epoch after which this invocation stops: ``cfg.stop_epoch`` (capped at ``cfg.epochs``) or ``cfg.epochs``."""
    return cfg.epochs if cfg.stop_epoch is None else min(int(cfg.stop_epoch), cfg.epochs)


def micro_batch_size(batch_size: int, world_size: int, accum_steps: int, key: str = "batch_size") -> int:
    """Per-rank micro-batch of a GLOBAL ``batch_size``; a one-line ``ConfigError`` (naming the setting
    ``key``) unless it divides evenly. The one divisibility rule of every task and sampler."""
    if batch_size <= 0 or accum_steps <= 0:
        raise ConfigError(f"{key}={batch_size} and accumulation steps {accum_steps} must be positive")
    if batch_size % (world_size * accum_steps):
        raise ConfigError(f"{key}={batch_size} is not divisible by world size {world_size} x "
                          f"accumulation steps {accum_steps}")
    return batch_size // (world_size * accum_steps)
