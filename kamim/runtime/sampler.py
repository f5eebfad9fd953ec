"""Deterministic, resumable data order for every training task (pretraining, probing, finetuning).

Two pieces make a run reproducible whatever the number of loader workers, the world size
and the resume point:

* ``ResumableBatchSampler`` draws one permutation per epoch from ``seed + epoch``; optimizer
  step ``k`` of an epoch consumes the global batch ``perm[k*G:(k+1)*G]``; rank ``r`` takes
  ``[r::world]`` of it (``DistributedSampler`` semantics, so the union over ranks is the same
  set of images for any world size) and splits it into ``accum_steps`` micro-batches. Resuming
  at step ``k`` skips the consumed batches without loading them. The tail that does not fill a
  global batch is dropped.
* ``SeededDataset`` receives ``(epoch, index)`` keys and produces each sample under a private
  RNG state seeded from ``(seed, epoch, index)`` (torch CPU, numpy and ``random`` are forked and
  restored), so the augmentation of a given image in a given epoch never depends on which worker
  or process produced it, nor on what was produced before.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .schedule import micro_batch_size

__all__ = ["sample_seed", "SeededDataset", "ResumableBatchSampler"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one (run seed, epoch, sample index) triple."""
    # numpy's SeedSequence hashes the entropy words properly (no correlated seeds for
    # neighbouring indices), unlike e.g. ``seed + epoch * n + index``.
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededDataset(Dataset):
    """Wrap a map-style dataset so that ``ds[(epoch, index)]`` is a pure function of its key.

    All transform randomness must come from torch's (or numpy's / ``random``'s) global RNG; it is
    reseeded per sample and the caller's RNG state is restored afterwards.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                np.random.seed(s & 0xFFFFFFFF)
                random.seed(s)
                return self.dataset[index]
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches of ``(epoch, index)`` keys for one epoch.

    Call ``set_epoch(epoch, start_step)`` before iterating; ``len()`` is the number of
    micro-batches left in the epoch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        seed: int = 0,
    ) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.micro_batch_size = micro_batch_size(global_batch_size, world_size, accum_steps)
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} images, fewer than one global batch of {global_batch_size}: "
                f"lower the batch size (--batch-size N for linprobe/finetune, --set optim.batch_size=N for "
                f"pretraining)"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.seed = int(seed)
        self.steps_per_epoch = num_samples // global_batch_size
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} must be in [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global sample order of ``epoch`` (identical on every rank)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """Indices consumed by optimizer step ``step`` of ``epoch`` over all ranks."""
        g = self.global_batch_size
        return self.permutation(epoch)[step * g:(step + 1) * g].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch)
        g, m = self.global_batch_size, self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            mine: Sequence[int] = perm[step * g:(step + 1) * g][self.rank::self.world_size].tolist()
            for j in range(self.accum_steps):
                yield [(self.epoch, i) for i in mine[j * m:(j + 1) * m]]
