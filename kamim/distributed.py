"""torchrun / DDP helpers. Everything degrades to single-process no-ops when not distributed.

Launch with ``torchrun --nproc_per_node N -m kamim.cli pretrain ...`` (or ``python -m
torch.distributed.run``): ``init_distributed`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and uses NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "init_distributed", "is_distributed", "get_rank", "get_world_size",
    "get_local_rank", "is_main_process", "barrier", "all_reduce_mean", "all_reduce_sum",
    "broadcast_object", "cleanup", "resolve_device", "ddp_wrap",
]


@dataclass(frozen=True)
class DistInfo:
    """Process placement: global rank, world size, local rank and this process' device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` if CUDA is available else ``cpu``; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        torch.cuda.set_device(index)
    elif device != "cpu":
        raise ValueError(f"device={device!r} is not valid; expected auto, cpu, cuda or cuda:N")
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise the default process group from torchrun environment variables (idempotent).

    Single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): nothing is initialised.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        dist.init_process_group(**kwargs)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned); identity when single-process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place and returned); identity when single-process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def cleanup() -> None:
    """Destroy the process group if one was initialised."""
    if is_distributed():
        dist.destroy_process_group()


def ddp_wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` when running on several ranks, else ``module`` itself
    (the one DDP wrapping of pretraining, probing and finetuning)."""
    if info.world_size == 1:
        return module
    device = info.device
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
