"""Classification scores of the evaluation engines: top-k hit counts and exact, rank-summed accuracy.

Counts, not percentages, are what crosses ranks: every rank evaluates its disjoint shard
(:func:`kamim.eval.data.eval_loader`), :func:`evaluate_logits` sums hits, losses and sample counts
with one all-reduce and divides once, so a DDP accuracy equals the single-process one exactly.
Top-k membership is timm's (:func:`timm.utils.accuracy`, ``torch.topk`` tie order).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from timm.utils import accuracy
from torch import nn

from kamim.progress import progress as progress_bar
from kamim.distributed import all_reduce_sum
from kamim.precision import autocast

from .features import unpack_labelled

__all__ = ["topk_correct", "evaluate_logits"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (clamped to #classes):
    :func:`timm.utils.accuracy` turned from percent back into counts (float tensor of ``len(ks)``)."""
    n = len(target)
    if n == 0:
        return torch.zeros(len(ks), device=logits.device)
    percent = torch.stack(accuracy(logits, target, topk=tuple(ks)))
    return (percent.double() * n / 100.0).round().float()


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
    for batch in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
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
