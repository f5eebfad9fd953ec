"""Global RNG state of a process: capture, seed, restore, and gather over DDP ranks.

The states hold only tensors, ints, floats and lists, so checkpoints that store them load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["rng_state", "seed_all", "set_rng_state", "gather_rng_states", "restore_rng"]


def rng_state() -> dict[str, Any]:
    """This process' torch CPU/CUDA, numpy and python RNG states (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }


def seed_all(seed: int) -> None:
    """Seed torch, numpy's global RNG (timm's Mixup draws from it) and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, on every rank (a collective when ``world_size > 1``)."""
    state = rng_state()
    if world_size == 1:
        return [state]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def restore_rng(states: list[dict[str, Any]] | None, rank: int, world_size: int, seed: int, step: int) -> bool:
    """Restore this rank's saved state when the world size is unchanged (bit-exact resume); else
    seed fresh but deterministic per-rank streams from ``(seed, rank, step)``. Returns whether exact."""
    if states and len(states) == world_size:
        set_rng_state(states[rank])
        return True
    seed_all(seed + rank + 1_000_003 * step)
    return False
