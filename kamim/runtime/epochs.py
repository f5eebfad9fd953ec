"""The epoch skeleton of linear probing and finetuning (pretraining counts steps instead).

:class:`EpochTrainer` trains the rest of the current epoch with the task's :class:`TrainStep`
(resuming mid-epoch where the state says), evaluates, lets the task record the epoch and write
its checkpoint and results, and repeats until the stop epoch. SIGINT/SIGTERM during training
writes ``checkpoint-last.pt`` after the current optimizer step and raises ``Interrupted``
(:meth:`TrainStep.epoch`). A task implements only its loss and its epoch/evaluation policy.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kamim.progress import progress
from kamim import distributed as kdist
from kamim.distributed import DistInfo
from kamim.interrupt import StopRequest, graceful_stop
from kamim.precision import amp_dtype_of

from .checkpoint import LAST_CHECKPOINT
from .schedule import micro_batch_size, stop_epoch
from .step import StepResult, TrainStep

__all__ = ["EpochTrainer"]


class EpochTrainer:
    """Base of an epoch-based task. ``__init__`` keeps ``cfg`` (amp, batch_size, accum_steps, epochs,
    stop_epoch, progress), ``out_dir`` and ``info``; the subclass then sets ``state``, ``stats``
    (:class:`kamim.runtime.EpochStats`), ``loader``, ``sampler`` and ``steps_per_epoch``, calls
    :meth:`build_step`, and implements :meth:`loss`, :meth:`evaluate`, :meth:`end_epoch` and
    :meth:`save_last`."""

    task = "train"  # name in the progress bar

    def __init__(self, cfg: Any, out_dir: Path, info: DistInfo) -> None:
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.device = info.device
        self.amp = amp_dtype_of(cfg.amp, self.device)
        self.micro_batch = micro_batch_size(cfg.batch_size, info.world_size, cfg.accum_steps)

    def build_step(self, module: nn.Module, **kwargs: Any) -> nn.Module:
        """``self.train_step`` over ``module`` (DDP-wrapped on several ranks, which it returns: the
        module the task's loss calls); ``kwargs`` go to :class:`TrainStep` (clip_grad, params)."""
        wrapped = kdist.ddp_wrap(module, self.info)
        self.train_step = TrainStep(self.state, wrapped, self.device, self.cfg.amp, self.cfg.accum_steps,
                                    last=self.out_dir / LAST_CHECKPOINT, warn=False, **kwargs)
        return wrapped

    def loss(self, batch: Any) -> torch.Tensor | None:
        """The loss of one micro-batch (None: every image unreadable); adds to ``self.stats``."""
        raise NotImplementedError

    def evaluate(self) -> Any:
        raise NotImplementedError

    def end_epoch(self, sums: torch.Tensor, lr: float, results: Any) -> None:
        """Record the epoch (``state.epoch`` already counts it), checkpoint, write results."""
        raise NotImplementedError

    def save_last(self) -> None:
        """Write ``checkpoint-last.pt`` (every rank calls it), also mid-epoch: :meth:`save_state`."""
        raise NotImplementedError

    def save_state(self, extra: Mapping[str, Any]) -> None:
        """``checkpoint-last.pt``: the state and ``extra`` (every rank calls it); mid-epoch also the
        epoch's partial statistics, which :meth:`restore` gives back."""
        mid_epoch = self.state.batch_in_epoch(self.steps_per_epoch) > 0
        partial = self.stats.state_dict() if mid_epoch else None  # a collective: every rank
        self.state.save(self.out_dir / LAST_CHECKPOINT, self.info.world_size, self.info.is_main,
                        {**extra, "partial": partial})

    def restore(self, ckpt: Mapping[str, Any], source: Any = "checkpoint") -> None:
        """Continue from a checkpoint of :meth:`save_state` (read from ``source``): weights, optimizer,
        schedule, RNG, counters and the epoch's partial statistics (bit-exact at the same world size)."""
        self.state.load(ckpt, self.info.rank, self.info.world_size, self.cfg.seed, source)
        self.stats.load_state_dict(ckpt.get("partial"), self.info.rank)

    def after_step(self, result: StepResult) -> None:
        """Called after each optimizer step (e.g. an EMA update)."""

    def train_epoch(self, stop: StopRequest) -> tuple[torch.Tensor, float]:
        """The rest of epoch ``state.epoch``: (its statistics summed over ranks, its first LR)."""
        state, spe = self.state, self.steps_per_epoch
        done = state.batch_in_epoch(spe)
        if done == 0:
            self.stats.reset(max(g["lr"] for g in state.optimizer.param_groups))
        self.train_step.module.train()
        bar = progress(total=spe, initial=done, desc=f"{self.task} epoch {state.epoch + 1}/{self.cfg.epochs}",
                       unit="step", enabled=self.cfg.progress and self.info.is_main)

        def after(result: StepResult) -> None:
            self.after_step(result)
            bar.update(1)

        try:
            self.train_step.epoch(self.loader, self.sampler, self.loss, stop, self.save_last, spe, after_step=after)
        finally:
            bar.close()
        return self.stats.reduced(), float(self.stats.lr)

    def run_epochs(self) -> None:
        """Train, evaluate and record epochs until ``stop_epoch(cfg)``."""
        with graceful_stop() as stop:
            while self.state.epoch < stop_epoch(self.cfg):
                sums, lr = self.train_epoch(stop)
                results = self.evaluate()
                self.state.epoch += 1
                self.end_epoch(sums, lr, results)
                kdist.barrier()
