"""One optimizer step, the same for pretraining, linear probing and finetuning.

A task gives :class:`TrainStep` its micro-batches and a ``loss_fn(batch) -> loss | None``; the step
does the rest, MAE-style (``engine_pretrain.train_one_epoch``):

* ``loss_fn`` runs under :func:`kamim.precision.autocast` (bf16 / fp16 / none);
* a micro-batch whose images were all unreadable (``loss_fn`` returns None) contributes a zero loss
  touching every trainable parameter, so DDP ranks stay in step;
* the mean loss over ranks is checked every micro-batch (all ranks stop together with a one-line
  ``NonFiniteLossError`` before anything is updated);
* ``loss / accum_steps`` is backpropagated through :class:`kamim.runtime.amp.LossScaler`, inside
  DDP ``no_sync`` on every micro-batch but the last;
* the gradient is clipped to ``clip_grad`` (global norm; None: measured only), a non-finite norm
  stops the run (without fp16 scaling, which skips such steps instead), the optimizer steps, and
  the scheduler is stepped once per optimizer step (timm ``step_update``);
* **the non-finite rule, the same for every task:** a NaN/inf loss or gradient norm never reaches
  the weights; the run stops at once with a one-line ``NonFiniteLossError`` naming the step and
  what is on disk (``last checkpoint left intact (PATH)`` or ``no checkpoint written``), and the
  last good checkpoint is never overwritten (:meth:`kamim.runtime.state.TrainState.checkpoint`
  also refuses to write NaN/inf state). Only fp16 loss scaling skips inf-gradient steps, as its
  scale search requires;
* :meth:`TrainStep.epoch` runs the rest of an epoch from ``state.batch_in_epoch`` (mid-epoch
  resume with :class:`kamim.runtime.sampler.ResumableBatchSampler`) and, after the optimizer step
  during which SIGINT/SIGTERM arrived (:func:`kamim.interrupt.graceful_stop`), lets the task save
  a checkpoint and raises :class:`kamim.interrupt.Interrupted`. Creating the loader's iterator does not
  consume the task's RNG stream (drop path, Mixup), so that stream resumes exactly.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kamim import distributed as kdist
from kamim.interrupt import Interrupted, StopRequest
from kamim.precision import amp_dtype_of, autocast

from .amp import NonFiniteGradient
from .checkpoint import on_disk
from .state import NonFiniteLossError, TrainState

__all__ = ["TrainStep", "StepResult", "agreed_signal", "stopped"]


def agreed_signal(signum: int | None, device: torch.device) -> int:
    """The stop signal any rank received (0: none); a collective under DDP, so every rank stops
    after the same optimizer step (a rank that received nothing reports SIGTERM)."""
    if kdist.get_world_size() == 1:
        return int(signum or 0)
    anyone = kdist.all_reduce_sum(torch.tensor([float(signum or 0)], device=device)).item() > 0
    return int(signum) if signum else (int(signal.SIGTERM) if anyone else 0)


def stopped(signum: int, step: int, last: Path) -> Interrupted:
    """What a run raises after writing ``last`` on a stop signal received during ``step``."""
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved "
                               f"({last}); rerun the same command to resume")


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did: mean loss over micro-batches and ranks, the gradient norm before
    clipping, the learning rate of parameter group 0 used by the step."""

    loss: float
    grad_norm: float
    lr: float


class TrainStep:
    """``step(micro_batches, loss_fn) -> StepResult``; advances ``state.step`` and the scheduler.

    ``module`` is what the task calls (possibly DDP-wrapped); ``params`` the trainable parameters to
    clip (default: those of ``state.model``); ``last`` the checkpoint named in error messages.
    """

    def __init__(
        self,
        state: TrainState,
        module: nn.Module,
        device: torch.device,
        amp: str = "none",
        accum_steps: int = 1,
        clip_grad: float | None = None,
        params: Iterable[nn.Parameter] | None = None,
        last: Path | str = "checkpoint-last.pt",
        warn: bool = True,
    ) -> None:
        self.state, self.module, self.device = state, module, device
        self.amp_dtype = amp_dtype_of(amp, device, warn=warn)
        self.accum_steps = int(accum_steps)
        self.clip_grad = clip_grad
        self.params = [p for p in (params if params is not None else state.model.parameters()) if p.requires_grad]
        self.last = Path(last)

    def autocast(self):
        """The step's autocast context (also for evaluation under the same precision)."""
        return autocast(self.device, self.amp_dtype)

    def _sync(self, sync: bool):
        if not sync and isinstance(self.module, nn.parallel.DistributedDataParallel):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _stop(self, what: str) -> NonFiniteLossError:
        return NonFiniteLossError(f"{what} at step {self.state.step + 1}; stopped, {on_disk(self.last)}")

    def __call__(self, micro_batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor | None]) -> StepResult:
        state, n = self.state, self.accum_steps
        lr = float(state.optimizer.param_groups[0]["lr"])
        losses: list[float] = []
        grad_norm: float | None = None
        for j, batch in enumerate(micro_batches):
            if j >= n:
                raise RuntimeError(f"TrainStep got more than accum_steps={n} micro-batches")
            with self._sync(j == n - 1):
                with self.autocast():
                    loss = loss_fn(batch)
                if loss is None:  # every image unreadable: zero gradient, keeps DDP ranks in step
                    loss = sum(p.sum() for p in self.params) * 0.0
                    stats = torch.zeros(2, device=self.device)
                else:
                    stats = torch.cat([loss.detach().float().reshape(1), torch.ones(1, device=self.device)])
                stats = kdist.all_reduce_sum(stats)
                mean = (stats[0] / stats[1].clamp_min(1)).item()
                if not math.isfinite(mean):
                    raise self._stop(f"non-finite loss {mean}")
                losses.append(mean)
                try:
                    grad_norm = state.scaler(loss / n, state.optimizer, clip_grad=self.clip_grad,
                                             parameters=self.params, need_update=j == n - 1)
                except NonFiniteGradient as e:
                    state.optimizer.zero_grad(set_to_none=True)
                    raise self._stop(str(e)) from None
        if len(losses) != n:
            raise RuntimeError(f"TrainStep got {len(losses)} micro-batches, expected accum_steps={n}")
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.scheduler.step_update(state.step)
        return StepResult(sum(losses) / n, float(grad_norm), lr)

    def epoch(
        self,
        loader: Iterable[Any],
        sampler: Any,
        loss_fn: Callable[[Any], torch.Tensor | None],
        stop: StopRequest,
        save: Callable[[], None],
        steps_per_epoch: int,
        after_step: Callable[[StepResult], None] | None = None,
        end: int | None = None,
        save_due: Callable[[int], bool] | None = None,
    ) -> None:
        """Train epoch ``state.epoch`` from its ``state.batch_in_epoch`` to its end (or to its step
        ``end``, e.g. pretraining's ``run.max_steps``).

        ``sampler.set_epoch(epoch, start)`` skips the steps already done. After each step
        ``after_step(result)`` runs, then ``save()`` when ``save_due(state.step)`` says so or a stop
        signal arrived (any rank); after a signal :class:`kamim.interrupt.Interrupted` is raised.
        """
        state = self.state
        start = state.batch_in_epoch(steps_per_epoch)
        sampler.set_epoch(state.epoch, start)
        # a DataLoader without a generator draws its base seed from the global RNG when iterated:
        # keep that out of the task's stream (drop path, mixup), which a mid-epoch resume restores
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        for _ in range(start, steps_per_epoch if end is None else end):
            result = self(itertools.islice(batches, self.accum_steps), loss_fn)
            if after_step is not None:
                after_step(result)
            signum = agreed_signal(stop.signum, self.device)
            if signum or (save_due is not None and save_due(state.step)):
                save()
            if signum:
                raise stopped(signum, state.step, self.last)
