"""Linear probing of a frozen encoder at any number of layers in one pass over the data.

The backbone runs once per batch (frozen, eval mode, no gradients) and returns the pooled features
of every probed layer (:func:`kamim.eval.features.extract_features`); one independent head per
layer (optional ``BatchNorm1d(affine=False)`` + ``Linear``) is trained on them simultaneously, so
``layers="all"`` yields a table of accuracy per layer at the cost of a single probe. The heads
share nothing: the summed loss gives each head exactly the gradient it would get alone.

Recipes (explicit config values override them):

* ``reference`` (KAMIM repository protocol): average-pooled patch tokens, one Linear layer (no BN),
  AdamW, finetune-style augmentation (RandAugment, random erasing). Learning rate and weight decay
  are ours (the reference hard-codes neither in a way we can reproduce): base_lr 1e-3, wd 0.05.
* ``mae`` (He et al. 2022, ``main_linprobe.py``): ``BatchNorm1d(affine=False, eps=1e-6)`` + Linear
  (weights ~ N(0, 0.01)), LARS (timm ``Lars``, momentum 0.9, trust ratio on weight matrices),
  base_lr 0.1, no weight decay, RandomResizedCrop + flip only.

The peak LR is ``lr`` if set, else ``base_lr * batch_size / 256`` (``batch_size`` global). The
cosine schedule (linear warmup) is stepped once per optimizer step, accumulation included.
The step (autocast over the frozen encoder and the heads, accumulation, non-finite guard, fp16
scaler) and the resumable state are the shared runtime's (:mod:`kamim.runtime`). DDP via torchrun
(heads wrapped in DDP; exact sharded evaluation). ``checkpoint-last.pt`` (heads, optimizer,
scheduler, RNG, history) is written after every epoch and, on SIGINT/SIGTERM, after the current
optimizer step, with the epoch's partial loss sums; augmentations are functions of (seed, epoch,
index), so a run resumed at any step sees exactly the batches of an uninterrupted one and ends
with the same heads and results. The resolved config is written as ``config.yaml``.
Results: ``linprobe.json`` / ``linprobe.csv`` (one row per epoch and layer: top-1/top-5/loss)
rewritten atomically after every epoch, and a printed table of the final epoch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn

from kamim.backbone import layer_columns
from kamim.checkpoints import resolve_encoder
from kamim.config import LINPROBE_OPTIMIZERS, LinprobeConfig
from kamim.optim import fused_kwargs
from kamim.precision import resolve_amp
from kamim.inputs import preflight

from .common import LabelledTask, print_table
from .features import extract_features, feature_dims, resolve_layers
from .session import distributed_session

__all__ = ["LinprobeConfig", "ProbeHeads", "build_probe_optimizer", "linear_probe"]

CHECKPOINT_FORMAT = "kamim-linprobe"


class ProbeHeads(nn.Module):
    """One classifier per layer: optional ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear`` (MAE init)."""

    def __init__(self, dims: Mapping[int, int], num_classes: int, batchnorm: bool = False) -> None:
        super().__init__()
        self.layers = sorted(int(k) for k in dims)
        self.heads = nn.ModuleDict()
        for k in self.layers:
            linear = nn.Linear(dims[k], num_classes)
            nn.init.trunc_normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
            norm = nn.BatchNorm1d(dims[k], affine=False, eps=1e-6) if batchnorm else nn.Identity()
            self.heads[str(k)] = nn.Sequential(norm, linear)

    def forward(self, feats: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {k: self.heads[str(k)](feats[k].float()) for k in self.layers}


def build_probe_optimizer(heads: nn.Module, opt: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW / SGD (momentum 0.9) / LARS over the heads; biases and norms get no weight decay.

    LARS follows MAE: trust ratio on weight matrices (even with zero weight decay), plain momentum
    SGD on biases (timm ``Lars`` with ``always_adapt`` per parameter group).
    """
    mats = [p for p in heads.parameters() if p.requires_grad and p.ndim > 1]
    vecs = [p for p in heads.parameters() if p.requires_grad and p.ndim <= 1]
    if opt == "adamw":
        return torch.optim.AdamW(
            [{"params": mats, "weight_decay": weight_decay}, {"params": vecs, "weight_decay": 0.0}], lr=lr,
            **fused_kwargs(heads, opt),
        )
    if opt == "sgd":
        return torch.optim.SGD(
            [{"params": mats, "weight_decay": weight_decay}, {"params": vecs, "weight_decay": 0.0}],
            lr=lr, momentum=0.9, **fused_kwargs(heads, opt),
        )
    if opt == "lars":
        return Lars(
            [{"params": mats, "weight_decay": weight_decay, "always_adapt": True},
             {"params": vecs, "weight_decay": 0.0, "always_adapt": False}],
            lr=lr, momentum=0.9,
        )
    raise ValueError(f"opt {opt!r} is not valid; expected one of {', '.join(LINPROBE_OPTIMIZERS)}")


def linear_probe(cfg: LinprobeConfig) -> dict[str, Any]:
    """Run (or resume) a linear probe; returns the results summary (also written to ``output_dir``)."""
    cfg = cfg.resolved()
    out_dir = preflight(cfg, "linprobe")
    with distributed_session(cfg.device) as info:
        cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, info.device))  # recorded as resolved
        return _Probe(cfg, out_dir, info).run()


class _Probe(LabelledTask):
    """The linear-probe task: its loss (features of the frozen encoder -> every head) and its epoch
    policy (evaluate every epoch, history rows per layer); step, state and epoch loop are the runtime's.
    It checkpoints after every epoch and on SIGINT/SIGTERM (after the current step)."""

    task, checkpoint_format = "linprobe", CHECKPOINT_FORMAT

    def __init__(self, cfg: LinprobeConfig, out_dir: Path, info) -> None:
        super().__init__(cfg, out_dir, info)
        self.enc = resolve_encoder(cfg.checkpoint, self.device, cfg.load_options, frozen=True)
        self.model = self.enc.model
        self.layers = resolve_layers(self.model, cfg.layers)
        self.geometry = self.enc.geometry  # read once by the encoder loader
        self.load_data(cfg.aug, self.model)
        torch.manual_seed(cfg.seed)
        self.heads = ProbeHeads(feature_dims(self.model, self.layers), self.data.num_classes, cfg.batchnorm)
        self.heads.to(self.device)
        optimizer = build_probe_optimizer(self.heads, cfg.opt, cfg.peak_lr(), cfg.weight_decay)
        self.start(self.heads, optimizer, len(self.layers) + 1, "linear-probe", model_key="heads")  # +1: batch count

    def _features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        with torch.no_grad():
            feats = extract_features(self.model, images, self.layers, pool=self.cfg.pool)
        return {k: v.float() for k, v in feats.items()}

    def loss(self, batch: Any) -> torch.Tensor | None:
        """The summed cross-entropy of every head (each head gets exactly its own gradient)."""
        if (labelled := self.labelled(batch)) is None:
            return None
        images, target = labelled
        logits = self.train_module(self._features(images))
        losses = torch.stack([F.cross_entropy(logits[k].float(), target) for k in self.layers])
        self.stats.add(torch.cat([losses.detach(), torch.ones(1, device=self.device)]))
        return losses.sum()

    def evaluate(self) -> dict[int, dict[str, float]]:
        self.heads.eval()
        return self.score(lambda x: self.heads(self._features(x)))

    def end_epoch(self, sums: torch.Tensor, lr: float, results: dict[int, dict[str, float]]) -> None:
        count = max(float(sums[-1]), 1.0)
        for j, k in enumerate(self.layers):
            r = results[k]
            self.history.append({
                "epoch": self.state.epoch, **layer_columns(self.geometry, k), "train_loss": float(sums[j]) / count,
                "top1": r["top1"], "top5": r["top5"], "val_loss": r["loss"], "lr": lr,
            })
        self.save_last()
        self.write_results()

    def save_last(self) -> None:
        self.save_state({"format": CHECKPOINT_FORMAT, "version": 1, "history": self.history, "config": self.config,
                         "layers": self.layers, "classes": self.data.classes})

    def describe(self) -> str:
        return f"linear probe of layers {self.layers} on {super().describe()}"

    def summary(self) -> dict[str, Any]:
        best: dict[int, dict[str, Any]] = {}
        for r in self.history:
            if r["layer"] not in best or r["top1"] > best[r["layer"]]["top1"]:
                best[r["layer"]] = r
        table = [
            {**layer_columns(self.geometry, r["layer"]), "top1": r["top1"], "top5": r["top5"], "loss": r["val_loss"],
             "best_top1": best[r["layer"]]["top1"], "best_epoch": best[r["layer"]]["epoch"]}
            for r in self.history if r["epoch"] == self.state.epoch
        ]
        return {**super().summary(), "encoder": {
            "format": self.enc.format, "image_size": self.enc.image_size, "patch_size": self.enc.patch_size,
            "num_prefix_tokens": self.enc.num_prefix_tokens, "num_layers": self.geometry.depth,
        }, "layers": self.layers, "final": table}

    def print_summary(self, summary: dict[str, Any]) -> None:
        print_table(summary["final"], title=f"linear probe ({self.cfg.recipe}, pool={self.cfg.pool}) after "
                                            f"{self.state.epoch} epochs")
