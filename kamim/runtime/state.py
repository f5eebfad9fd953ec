"""The resumable state of a training run: model, optimizer, scheduler, scaler, RNG and counters.

:meth:`TrainState.checkpoint` gathers every rank's RNG state (a collective), refuses to produce a
checkpoint with a NaN/inf parameter or optimizer tensor (``NonFiniteLossError``: the last
checkpoint on disk is left intact) and returns a plain dict; :meth:`TrainState.save` writes it
atomically. :meth:`TrainState.load` restores everything and sets the scheduler to the restored
step, so a resumed run continues bit-exactly (same world size) wherever it stopped, also
mid-epoch (``batch_in_epoch``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kamim import distributed as kdist
from kamim.serialization import atomic_save

from .amp import LossScaler
from .checkpoint import on_disk
from .rng import gather_rng_states, restore_rng

__all__ = ["NonFiniteLossError", "nonfinite_state", "TrainState", "EpochStats"]


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss or gradient); the last checkpoint was left untouched."""


def nonfinite_state(*states: Any) -> list[str]:
    """Names of the floating-point tensors with a NaN or inf anywhere in nested ``states``
    (model / optimizer state dicts); empty when everything is finite."""
    bad: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}")

    for i, state in enumerate(states):
        walk(state, "model" if i == 0 else "optimizer")
    return bad


@dataclass
class TrainState:
    """What a resumed run needs. ``epoch``: epochs completed; ``step``: optimizer steps done.

    ``model_key`` is the checkpoint key of ``model``'s state dict (linear probing stores ``heads``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: LossScaler
    epoch: int = 0
    step: int = 0
    model_key: str = "model"

    def batch_in_epoch(self, steps_per_epoch: int) -> int:
        """Optimizer steps already done in the current epoch (``steps_per_epoch``: the epoch is
        trained but not yet closed, e.g. interrupted before its evaluation)."""
        return self.step - self.epoch * steps_per_epoch

    def checkpoint(self, world_size: int, main: bool, last: Path, extra: Mapping[str, Any] = ()) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); every rank must call it (RNG gather).

        Raises ``NonFiniteLossError`` (naming ``last``, the checkpoint left intact) instead of
        returning a state with a NaN/inf tensor.
        """
        rngs = gather_rng_states(world_size)
        if not main:
            return None
        model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        bad = nonfinite_state(model_state, optim_state)
        if bad:
            raise NonFiniteLossError(
                f"non-finite values in {len(bad)} parameter/optimizer tensors after step {self.step} "
                f"(e.g. {bad[0]}); stopped without saving, "
                + on_disk(last))
        return {
            **dict(extra), self.model_key: model_state, "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
            "epoch": self.epoch, "step": self.step,
        }

    def save(self, path: Path, world_size: int, main: bool, extra: Mapping[str, Any] = ()) -> Path:
        """:meth:`checkpoint` written atomically to ``path`` by rank 0."""
        ckpt = self.checkpoint(world_size, main, path, extra)
        if ckpt is not None:
            atomic_save(ckpt, path)
        return path

    def load(self, ckpt: Mapping[str, Any], rank: int, world_size: int, seed: int, source: Any = "checkpoint") -> bool:
        """Restore everything :meth:`checkpoint` stored; returns whether the RNG streams are exact
        (same world size; otherwise fresh deterministic per-rank streams).

        A one-line ``ConfigError`` naming ``source`` if the stored LR schedule has another length than
        this run's (e.g. the data gained images): the restored scheduler would follow the old one.
        """
        from kamim.config import ConfigError

        saved = ckpt.get("scheduler") or {}
        old = (saved.get("t_initial"), saved.get("warmup_t"))
        new = (getattr(self.scheduler, "t_initial", None), getattr(self.scheduler, "warmup_t", None))
        if saved and old != new and None not in old:
            raise ConfigError(
                f"cannot resume from {source}: its LR schedule is {sum(old)} steps (warmup {old[1]}), this config "
                f"gives {sum(new)} (warmup {new[1]}): the number of images or a schedule setting (e.g. run.max_steps "
                f"with run.max_steps_schedule=true) changed; keep them, or start a new output directory")
        self.model.load_state_dict(ckpt[self.model_key], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt.get("scaler"))
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.scheduler.step_update(self.step)
        return restore_rng(ckpt.get("rng"), rank, world_size, seed, self.step)


class EpochStats:
    """Running sums of one epoch's training statistics (losses, counts) and the epoch's starting LR,
    kept across a mid-epoch checkpoint so the resumed epoch reports what an uninterrupted one would.

    :meth:`state_dict` sums over ranks (a collective: every rank calls it); :meth:`load_state_dict`
    gives the sums to rank 0 only, so the next reduction counts them once.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = int(size), device
        self.reset()

    def reset(self, lr: float | None = None) -> None:
        self.sums = torch.zeros(self.size, device=self.device)
        self.lr = lr

    def add(self, values: torch.Tensor) -> None:
        self.sums += values.detach().float()

    def reduced(self) -> torch.Tensor:
        """The sums over ranks."""
        return kdist.all_reduce_sum(self.sums.clone())

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.reduced().cpu(), "lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any] | None, rank: int) -> None:
        if not state:
            return
        self.reset(state["lr"])
        if rank == 0:
            self.sums = state["sums"].to(self.device, torch.float32).clone()
