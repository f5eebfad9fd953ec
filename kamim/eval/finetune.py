"""End-to-end finetuning of a pretrained encoder for classification (MAE / BEiT / DeiT recipe).

* Model: the loaded timm encoder with a new Linear head (``reset_classifier``; weights ~ N(0, 2e-5)
  as MAE). ``pool="avg"`` is the KAMIM reference head (final norm, prefix tokens dropped,
  patch tokens averaged); ``pool="cls"`` classifies the CLS token. Stochastic depth
  ``drop_path`` is timm's ``drop_path_rate`` (passed to ``timm.create_model`` by
  :func:`kamim.checkpoints.load_encoder`; linearly increasing with depth); an in-memory model
  is rewired the same way (:func:`set_drop_path`).
* Optimizer: AdamW over timm ``param_groups_layer_decay`` (``layer_decay`` 0.65 by default as for
  ViT-B: block ``i`` of ``L`` (1-based) gets ``lr * layer_decay ** (L + 1 - i)``, the embeddings
  ``layer_decay ** (L + 1)``, the head 1), no weight decay on norms, biases, position embedding and
  prefix tokens. Peak LR ``lr`` or ``base_lr * batch_size / 256`` (global batch). Cosine schedule
  with linear warmup, stepped once per optimizer step (accumulation included).
* Data: RandomResizedCrop + flip + RandAugment (or ``auto_augment="trivialaugment"``) + random
  erasing (timm ``create_transform``), ``timm.data.Mixup`` (mixup 0.8, cutmix 1.0, label smoothing
  0.1) with ``SoftTargetCrossEntropy``; optional EMA of the weights (``timm.utils.ModelEmaV3``).
* The step (bf16 autocast, fp16 scaler on CUDA, accumulation, clipping, a non-finite loss or
  gradient norm stopping the run) and the resumable state are the shared runtime's
  (:mod:`kamim.runtime`). DDP via torchrun, exact sharded evaluation (top-1/top-5) after every
  epoch. ``checkpoint-last.pt`` (model, optimizer, scheduler, scaler, EMA, history, every rank's
  RNG states) is written after every epoch and, on SIGINT/SIGTERM, after the current optimizer
  step with the epoch's partial sums, so a run resumed at any step ends exactly as an
  uninterrupted one; ``checkpoint-best.pt`` holds the best model (by top-1).
  Results: ``finetune.json`` / ``finetune.csv`` (one row per epoch), ``config.yaml`` (the resolved
  config), all writes atomic.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import one_hot
from timm.layers import DropPath
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from kamim.backbone import check_pool
from kamim.checkpoints import resolve_encoder
from kamim.config import FinetuneConfig
from kamim.optim import fused_kwargs
from kamim.precision import resolve_amp
from kamim.runtime import LAST_CHECKPOINT, StepResult, seed_all
from kamim.serialization import atomic_save
from kamim.inputs import preflight

from .common import LabelledTask, print_table
from .features import is_token_model
from .session import distributed_session

__all__ = ["FinetuneConfig", "set_drop_path", "add_classifier", "build_finetune_optimizer", "finetune"]

_TIMM_POOL = {"avg": "avg", "cls": "token"}  # our pooling names -> timm's global_pool

CHECKPOINT_FORMAT = "kamim-finetune"
BEST_CHECKPOINT = "checkpoint-best.pt"


def set_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth on every residual block, linearly increasing from 0 to ``rate`` (timm's rule).

    Works on timm ViT and Swin blocks (``drop_path1``/``drop_path2`` attributes), so the rate can be
    set after loading a checkpoint. Returns the number of blocks.
    """
    blocks = [m for m in model.modules() if hasattr(m, "drop_path1") and hasattr(m, "drop_path2")]
    if not blocks and rate > 0:
        raise ValueError(f"{type(model).__name__} has no timm blocks with drop_path1/drop_path2; cannot set drop_path")
    n = len(blocks)
    for i, blk in enumerate(blocks):
        r = rate * i / max(n - 1, 1)
        blk.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
    return n


def add_classifier(model: nn.Module, num_classes: int, pool: str = "avg") -> nn.Module:
    """A new ``num_classes`` Linear head on ``pool`` (``avg``/``cls``) via timm ``reset_classifier``
    (MAE init: N(0, 2e-5), zero bias)."""
    if is_token_model(model):
        check_pool(pool, has_class_token=getattr(model, "cls_token", None) is not None, name=type(model).__name__)
        model.reset_classifier(num_classes, global_pool=_TIMM_POOL[pool])
    else:
        if pool != "avg":
            raise ValueError(f"{type(model).__name__} has no class token; only pool='avg' is possible")
        model.reset_classifier(num_classes)
    head = model.get_classifier()
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    return model


def build_finetune_optimizer(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """AdamW over timm layer-decay parameter groups (each group carries its ``lr_scale``)."""
    return create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas),
        layer_decay=layer_decay if layer_decay < 1 else None, **fused_kwargs(model, "adamw"),
    )


def _model_spec(enc, num_classes: int, pool: str) -> dict | None:
    """How to rebuild the finetuned model: ``timm.create_model(model_name, **kwargs)`` then
    ``reset_classifier(num_classes, global_pool)``; None when the spec is not plain JSON."""
    spec = getattr(enc, "spec", None)
    if not spec:
        return None
    out = {"model_name": spec["model_name"], "kwargs": dict(spec["kwargs"]), "num_classes": num_classes,
           "global_pool": _TIMM_POOL[pool]}
    try:
        return json.loads(json.dumps(out))
    except TypeError:  # e.g. a norm_layer callable (Hugging Face eps): not storable without pickle
        return None


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a finetuning run; returns the results summary (also written to ``output_dir``)."""
    cfg = dataclasses.replace(cfg).validate()  # a copy: validate() may clamp the warmup
    out_dir = preflight(cfg, "finetune")
    with distributed_session(cfg.device) as info:
        cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, info.device))  # recorded as resolved
        return _Finetuner(cfg, out_dir, info).run()


class _Finetuner(LabelledTask):
    """The finetuning task: its loss (Mixup/CutMix, smoothed cross-entropy), EMA and its epoch policy
    (evaluate every epoch, keep the best); step, state and epoch loop are the runtime's."""

    task, checkpoint_format = "finetune", CHECKPOINT_FORMAT

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, info) -> None:
        super().__init__(cfg, out_dir, info)
        if cfg.mixup_active and self.micro_batch % 2:
            raise ValueError(
                f"mixup/cutmix need an even per-rank micro-batch, got {self.micro_batch} (batch_size="
                f"{cfg.batch_size} / world {info.world_size} / accum_steps {cfg.accum_steps})"
            )
        torch.manual_seed(cfg.seed)
        in_memory = isinstance(cfg.checkpoint, nn.Module)
        # drop path is a timm constructor argument; an in-memory model is rewired instead
        options = dict(cfg.load_options) if in_memory else {**cfg.load_options, "drop_path_rate": cfg.drop_path}
        self.enc = resolve_encoder(cfg.checkpoint, self.device, options, frozen=False)
        self.load_data("finetune", self.enc.model)
        self.model = add_classifier(self.enc.model, self.data.num_classes, cfg.pool)
        if in_memory:
            set_drop_path(self.model, cfg.drop_path)
        self.model.to(self.device).requires_grad_(True)
        seed_all(cfg.seed + info.rank)  # same weights on every rank; per-rank drop path / mixup draws
        self.mixup = None
        if cfg.mixup_active:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                mode="batch", label_smoothing=cfg.label_smoothing, num_classes=self.data.num_classes,
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.spec = _model_spec(self.enc, self.data.num_classes, cfg.pool)
        optimizer = build_finetune_optimizer(self.model, cfg.peak_lr(), cfg.weight_decay, cfg.layer_decay, cfg.betas)
        ckpt = self.start(self.model, optimizer, 2, "finetuning", clip_grad=cfg.clip_grad)  # 2: loss sum, batch count
        self.best: dict[str, Any] = dict(ckpt["best"]) if ckpt else {"top1": -1.0, "epoch": 0}
        if ckpt and self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])

    def loss(self, batch: Any) -> torch.Tensor | None:
        if (labelled := self.labelled(batch)) is None:
            return None
        images, target = labelled
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, target = self.mixup(images, target)
        elif self.mixup is not None:  # odd batch after unreadable images were dropped: smoothed one-hot
            off = self.cfg.label_smoothing / self.data.num_classes
            target = one_hot(target, self.data.num_classes, 1.0 - self.cfg.label_smoothing + off, off)
        loss = self.criterion(self.train_module(images).float(), target)
        self.stats.add(torch.stack([loss.detach().float(), torch.ones((), device=self.device)]))
        return loss

    def after_step(self, result: StepResult) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)

    def evaluate(self) -> dict[str, dict[str, float]]:
        self.model.eval()

        def heads(x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {"model": self.model(x)}
            if self.ema is not None:
                out["ema"] = self.ema.module(x)
            return out

        return self.score(heads)

    def end_epoch(self, sums: torch.Tensor, lr: float, res: dict[str, dict[str, float]]) -> None:
        row = {"epoch": self.state.epoch, "train_loss": float(sums[0] / sums[1].clamp_min(1)), "lr": lr,
               "top1": res["model"]["top1"], "top5": res["model"]["top5"], "val_loss": res["model"]["loss"]}
        if "ema" in res:
            row.update(ema_top1=res["ema"]["top1"], ema_top5=res["ema"]["top5"])
        self.history.append(row)
        improved = row["top1"] > self.best["top1"]
        if improved:
            self.best = {"top1": row["top1"], "top5": row["top5"], "epoch": self.state.epoch}
        self.save_last()
        if improved and self.info.is_main:  # after the last checkpoint's non-finite check
            atomic_save({**self._common_state(), "kind": "best", "model": self.model.state_dict(),
                         "metrics": self.history[-1]}, self.out_dir / BEST_CHECKPOINT)
        self.write_results()

    def _common_state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": 1, "epoch": self.state.epoch, "step": self.state.step,
                "config": self.config, "classes": self.data.classes, "model_spec": self.spec, "pool": self.cfg.pool}

    def save_last(self) -> None:
        self.save_state({**self._common_state(), "kind": "last", "best": self.best, "history": self.history,
                         "ema": self.ema.state_dict() if self.ema is not None else None})

    def describe(self) -> str:
        return f"finetuning on {super().describe()}, peak lr {self.cfg.peak_lr():.3g}"

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(), "model_spec": self.spec,
            "encoder": {"format": self.enc.format, "image_size": list(self.enc.image_size)}, "best": self.best,
            "final": self.history[-1] if self.history else None,
            "checkpoints": {"best": str(self.out_dir / BEST_CHECKPOINT), "last": str(self.out_dir / LAST_CHECKPOINT)},
        }

    def print_summary(self, summary: dict[str, Any]) -> None:
        print_table(self.history, title=f"finetuning (best top-1 {self.best['top1']:.2f} at epoch {self.best['epoch']})")
