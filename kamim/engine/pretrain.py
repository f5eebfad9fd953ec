"""The pretraining loop for SimMIM, KAMIM and MoCo v3 (single process or torchrun DDP).

Design (MAE/SimMIM engines, minus the reference KAMIM bugs listed in ANCHORS.md):

* Data order and augmentation are functions of ``(seed, epoch, index)`` only
  (:mod:`kamim.engine.sampler`), so a run gives the same batches for any number of loader
  workers, any world size with the same global batch, and any resume point.
* ``optim.batch_size`` is global: per-rank micro-batch = batch / (world x accum_steps).
  Gradients are accumulated with DDP ``no_sync`` on non-final micro-steps.
* AdamW from ``timm.optim.create_optimizer_v2`` (no weight decay on norms, biases and the
  model's ``no_weight_decay()`` names; torch's fused kernel on CPU and CUDA);
  ``timm.scheduler.CosineLRScheduler`` with ``t_in_epochs=False`` stepped once per OPTIMIZER
  step (accumulation does not change the schedule), linear warmup from ``warmup_lr`` then
  cosine to ``min_lr``; the schedule ends exactly at the last step of ``optim.epochs`` (warmup
  included).
* The step (bf16 autocast, ``no_sync`` accumulation, fp16-only loss scaling, global grad-norm
  clipping, a non-finite loss or gradient norm stopping every rank with a one-line
  ``NonFiniteLossError`` before the parameters are touched) and the resumable state are the
  shared runtime's (:class:`kamim.runtime.TrainStep`, :class:`kamim.runtime.TrainState`), as for
  linear probing and finetuning; this module keeps the method's loss and the step-based policy.
* The model comes from :func:`kamim.models.build_pretrain_model` (``build_model`` is its alias).
* Checkpoints (``checkpoint-last.pt``, optionally ``checkpoint-STEP.pt`` copies) are written
  atomically every ``run.ckpt_every_steps`` optimizer steps and at the end, with model, optimizer,
  scheduler, scaler, every rank's RNG states, step, epoch and config; everything loads with
  ``torch.load(weights_only=True)``. ``encoder.safetensors`` (timm key layout) is exported with
  each checkpoint. Resuming checks that the config matches (``RESUME_SAFE_KEYS`` may differ).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from kamim import distributed as kdist
from kamim.backbone import model_geometry
from kamim.config import Config, ConfigError, OptimConfig, from_dict, save_config, to_dict
from kamim.interrupt import graceful_stop
from kamim.metrics_log import MetricsLogger
from kamim.models import build_pretrain_model
from kamim.optim import fused_kwargs
from kamim.outputs import check_output_dir, lock_output, mark_output_dir
from kamim.precision import amp_dtype_of
from kamim.progress import progress
from kamim.runtime import (  # re-exported: these names were defined here before kamim.runtime
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CONFIG_FILE, ENCODER_FILE, LAST_CHECKPOINT, SUMMARY_FILE, LossScaler,
    NonFiniteLossError, ResumableBatchSampler, SeededDataset, StepResult, TrainState, TrainStep, cosine_scheduler,
    encoder_prefix, export_encoder, find_resume_checkpoint, gather_rng_states, load_pretrain_checkpoint,
    micro_batch_size, nonfinite_state, resume_checkpoint, rng_state, seed_all, set_rng_state,
)
from kamim.serialization import atomic_save, atomic_write_json, remove_stale_temp_files

__all__ = [
    "pretrain", "NonFiniteLossError", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "LAST_CHECKPOINT",
    "ENCODER_FILE", "SUMMARY_FILE", "ScheduleLengths", "schedule_lengths", "build_optimizer", "build_scheduler",
    "build_model", "build_pretrain_dataset", "build_pretrain_transform", "model_patch_size", "encoder_prefix", "export_encoder",
    "load_pretrain_checkpoint",
    "find_resume_checkpoint", "rng_state", "set_rng_state", "seed_all", "gather_rng_states", "nonfinite_state",
]

log = logging.getLogger("kamim.pretrain")

COMMAND = "kamim pretrain"  # the writer recorded in a run directory (kamim.outputs)


# --------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class ScheduleLengths:
    """Optimizer-step counts of a run."""

    steps_per_epoch: int
    total_steps: int  # length of the LR schedule
    warmup_steps: int
    stop_step: int  # the run ends after this many optimizer steps (<= total unless max_steps says more)


def schedule_lengths(cfg: Config, steps_per_epoch: int) -> ScheduleLengths:
    """Schedule and stop lengths in optimizer steps (see ``kamim.config`` for ``max_steps``)."""
    o, r = cfg.optim, cfg.run
    if r.max_steps_schedule:
        total = int(r.max_steps)
        warmup = int(round(total * o.warmup_epochs / o.epochs))
    else:
        total = o.epochs * steps_per_epoch
        warmup = o.warmup_epochs * steps_per_epoch
    warmup = min(warmup, total - 1)
    stop = total if r.max_steps is None else int(r.max_steps)
    return ScheduleLengths(steps_per_epoch, total, warmup, stop)


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` (no weight decay on norms, biases and the model's
    ``no_weight_decay()`` names) at the peak LR, torch's fused implementation where it has one
    (:func:`kamim.optim.fused_kwargs`). Build it after moving the model to its device."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, opt=optim.opt, lr=optim.peak_lr(), weight_decay=optim.weight_decay, betas=tuple(optim.betas),
        **fused_kwargs(model, optim.opt),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, lengths: ScheduleLengths):
    """:func:`kamim.runtime.cosine_scheduler` over ``lengths.total_steps`` optimizer steps: linear
    warmup ``warmup_lr -> peak`` for ``warmup_steps``, then cosine ``peak -> min_lr``."""
    return cosine_scheduler(optimizer, lengths.total_steps, lengths.warmup_steps, cfg.optim.warmup_lr,
                            cfg.optim.min_lr)


# --------------------------------------------------------------------------- model / data

# the one constructor of pretraining models (kamim.models); the name is kept for callers and tests
build_model = build_pretrain_model


def model_patch_size(model: nn.Module) -> int:
    """Pixel stride of the grid the SimMIM mask is applied on: the encoder's (square) patch size."""
    ph, pw = model_geometry(model.encoder).patch_size
    if ph != pw:
        raise ConfigError(f"pretraining needs square patches; {type(model.encoder).__name__} has {ph}x{pw}")
    return ph


def build_pretrain_dataset(cfg: Config, model: nn.Module):
    """Dataset of ``cfg.data.path`` with the transform of ``cfg.method`` (geometry from the model)."""
    from kamim.data import build_dataset

    dataset = build_dataset(cfg.data.path, build_pretrain_transform(cfg, model), strict=cfg.data.strict)
    if len(dataset) == 0:
        raise FileNotFoundError(f"no images found in {cfg.data.path}")
    return dataset


def build_pretrain_transform(cfg: Config, model: nn.Module):
    """The train-time transform of ``cfg.method`` (PIL image -> sample dict; geometry from the model)."""
    img = cfg.model.img_size
    d = cfg.data
    if cfg.method == "moco":
        from kamim.data import TwoViewTransform

        transform = TwoViewTransform(img)
    else:
        from kamim.data import MIMTransform
        from kamim.masking import MaskGenerator

        patch = model_patch_size(model)
        if cfg.mask.mask_patch_size % patch:
            raise ConfigError(
                f"mask.mask_patch_size={cfg.mask.mask_patch_size} must be a multiple of the model patch size {patch}"
            )
        masker = MaskGenerator(
            input_size=img, mask_patch_size=cfg.mask.mask_patch_size, model_patch_size=patch,
            mask_ratio=cfg.mask.mask_ratio,
        )
        keypoints = None
        if cfg.method == "kamim":
            from kamim.keypoints import KeypointMapper

            keypoints = KeypointMapper(cfg.kamim.detector, cfg.kamim.render)
        transform = MIMTransform(
            img, crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio), hflip=d.hflip, vflip=d.vflip,
            crop=d.crop,
            mask_generator=masker, keypoints=keypoints, weight_patch_size=cfg.kamim.weight_patch_size,
        )
    return transform


# --------------------------------------------------------------------------- batches

def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- the loop

class _Trainer:
    def __init__(self, cfg: Config, out_dir: Path, info: kdist.DistInfo, resume: Any) -> None:
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.device = info.device
        self.main = info.is_main
        amp_dtype_of(cfg.run.amp, self.device, warn=self.main, key="run.amp")  # fail fast, warn once
        o = cfg.optim
        micro_batch_size(o.batch_size, info.world_size, o.accum_steps, key="optim.batch_size")
        self.resume_path, self.ckpt = resume_checkpoint(
            out_dir, resume, CHECKPOINT_FORMAT, "pretraining", to_dict(cfg), CHECKPOINT_VERSION,
            complete=lambda stored: to_dict(from_dict(stored, validate=False))) or (None, None)

        # Same initial weights on every rank (DDP would broadcast them anyway); training-time
        # randomness (drop path, ...) then differs per rank.
        seed_all(cfg.run.seed)
        self.model = build_model(cfg).to(self.device)
        if info.world_size > 1 and self.device.type == "cuda":
            # MoCo v3 normalises its projector/predictor with batch statistics over the global
            # batch; SyncBatchNorm keeps the parameters, so the optimizer is unaffected. (torch's
            # SyncBatchNorm runs on GPUs only: CPU/gloo runs keep per-rank statistics.)
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        seed_all(cfg.run.seed + info.rank)

        self.dataset = build_pretrain_dataset(cfg, self.model)
        n = len(self.dataset)
        if self.ckpt is not None and self.ckpt.get("num_samples") not in (None, n):
            raise ConfigError(
                f"cannot resume from {self.resume_path}: the dataset has {n} images, the run was started "
                f"with {self.ckpt['num_samples']}"
            )
        self.sampler = ResumableBatchSampler(
            n, o.batch_size, rank=info.rank, world_size=info.world_size, accum_steps=o.accum_steps,
            seed=cfg.run.seed,
        )
        self.lengths = schedule_lengths(cfg, self.sampler.steps_per_epoch)
        if self.main:  # only now: bad input must not leave an empty run directory behind
            out_dir.mkdir(parents=True, exist_ok=True)
            mark_output_dir(out_dir, COMMAND)
            for path in remove_stale_temp_files(out_dir):
                log.info("removed %s, left by an interrupted save", path.name)
        kdist.barrier()
        from kamim.data import data_loader

        self.loader = data_loader(
            SeededDataset(self.dataset, cfg.run.seed), workers=cfg.data.num_workers, persistent=True,
            batch_sampler=self.sampler, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.run.seed),
        )

        self.optimizer = build_optimizer(self.model, o)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.lengths)
        self.state = TrainState(self.model, self.optimizer, self.scheduler,
                                LossScaler(self.device, enabled=cfg.run.amp == "fp16"))
        self.num_skipped = 0
        self._pending_skipped = 0
        self.elapsed = 0.0
        self.final_loss: Optional[float] = None
        if self.ckpt is not None:
            self._restore(self.ckpt)

        self.train_model: nn.Module = kdist.ddp_wrap(self.model, info)
        if cfg.run.compile:
            self.train_model = torch.compile(self.train_model)
        self.train_step = TrainStep(
            self.state, self.train_model, self.device, cfg.run.amp, o.accum_steps, clip_grad=o.clip_grad or None,
            last=out_dir / LAST_CHECKPOINT, warn=False,  # warned above, on rank 0
        )

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.state.step

    # ---------------------------------------------------------------- state
    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.state.load(ckpt, self.info.rank, self.info.world_size, self.cfg.run.seed, self.resume_path)
        self.num_skipped = int(ckpt.get("num_skipped", 0))
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        self.final_loss = ckpt.get("final_loss")
        log.info("resumed from %s at step %d", self.resume_path, self.step)

    def save(self) -> Path:
        """Checkpoint + encoder export (rank 0 writes, all ranks take part in the collectives)."""
        self._sync_skipped()
        last = self.out_dir / LAST_CHECKPOINT
        self.state.epoch = self.step // self.lengths.steps_per_epoch
        save_id = uuid.uuid4().hex
        ckpt = self.state.checkpoint(self.info.world_size, self.main, last, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "config": to_dict(self.cfg), "encoder_spec": getattr(self.model, "encoder_spec", None),
            "encoder_prefix": encoder_prefix(self.model),
            "method": self.cfg.method, "num_samples": len(self.dataset), "num_skipped": self.num_skipped,
            "elapsed": self.elapsed + (time.perf_counter() - self.t0), "final_loss": self.final_loss,
            "world_size": self.info.world_size, "save_id": save_id,
        })
        if ckpt is not None:
            if self.cfg.run.keep_step_checkpoints:
                step_path = atomic_save(ckpt, self.out_dir / f"checkpoint-{self.step:08d}.pt")
                _atomic_link_or_copy(step_path, last)
            else:
                atomic_save(ckpt, last)
            export_encoder(self.model, self.out_dir / ENCODER_FILE, method=self.cfg.method, step=self.step,
                           checkpoint_id=save_id)
        kdist.barrier()
        return last

    def _repair_export(self) -> None:
        """Re-export the encoder when the export does not come from the restored checkpoint (a save
        interrupted between its two writes) or is missing."""
        if not self.main or self.ckpt is None:
            return
        from kamim.serialization import read_safetensors_metadata

        path = self.out_dir / ENCODER_FILE
        saved = self.ckpt.get("save_id")
        if path.is_file() and (not saved or read_safetensors_metadata(path).get("checkpoint_id") == saved):
            return
        if path.is_file():
            log.warning("%s does not come from %s (interrupted save): exported again", path, self.resume_path)
        export_encoder(self.model, path, method=self.cfg.method, step=self.step, checkpoint_id=saved or "")

    # ---------------------------------------------------------------- loop
    def _loss(self, batch: dict[str, Any]) -> Optional[torch.Tensor]:
        """The method's loss of one micro-batch (None: every image of it was unreadable)."""
        self._pending_skipped += int(batch.get("num_skipped", 0))
        if batch.keys() == {"num_skipped"}:  # every image unreadable (kamim.data.datasets.collate_skip_bad)
            return None
        return self.train_model(_to_device(batch, self.device))["loss"]

    def _sync_skipped(self) -> None:
        """Sum the unreadable images over ranks (a collective: every rank calls it)."""
        pending, self._pending_skipped = self._pending_skipped, 0
        self.num_skipped += int(kdist.all_reduce_sum(torch.tensor([pending], device=self.device)).item())

    def _save_due(self, step: int) -> bool:
        every = self.cfg.run.ckpt_every_steps
        return step == self.lengths.stop_step or bool(every and step % every == 0)

    def _after_step(self, out: StepResult) -> None:
        """The step-based policy: the model's hook (MoCo momentum), the bar, a metrics row every
        ``run.log_every`` steps and at the end."""
        cfg, lengths, step = self.cfg, self.lengths, self.step
        hook = getattr(self.model, "on_after_optimizer_step", None)
        if callable(hook):
            hook(step, lengths.total_steps)
        self.window.append(out.loss)
        self.bar.update(1)
        if step % cfg.run.log_every and step != lengths.stop_step:
            return
        self._sync_skipped()
        now = time.perf_counter()
        self.final_loss = loss = sum(self.window) / len(self.window)
        row = {"step": step, "epoch": round(step / lengths.steps_per_epoch, 4), "loss": loss, "lr": out.lr,
               "images_per_s": len(self.window) * cfg.optim.batch_size / max(now - self.t_window, 1e-9),
               "num_skipped": self.num_skipped, "time": round(self.elapsed + now - self.t0, 3),
               "grad_norm": out.grad_norm}
        self.logger.log(row)
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{out.lr:.2e}", img_s=f"{row['images_per_s']:.1f}")
        elif self.main:
            log.info("step %d/%d epoch %.2f loss %.4f lr %.3e %.1f img/s", step, lengths.stop_step, row["epoch"],
                     loss, out.lr, row["images_per_s"])
        self.window, self.t_window = [], now

    def run(self) -> Path:
        cfg, lengths = self.cfg, self.lengths
        self.t0 = time.perf_counter()
        self._repair_export()
        if self.step >= lengths.stop_step:
            log.info("nothing to do: checkpoint step %d >= stop step %d", self.step, lengths.stop_step)
            self._write_summary()
            return self.out_dir / LAST_CHECKPOINT

        if self.main:
            save_config(cfg, self.out_dir / CONFIG_FILE)
        self.logger = MetricsLogger(
            self.out_dir, enabled=self.main, resume_step=self.step if self.ckpt is not None else None,
            tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project,
            config=to_dict(cfg),
        )
        log.info(
            "pretraining %s/%s on %d images: %d steps/epoch, schedule %d steps (warmup %d), stopping at %d, "
            "world %d, micro-batch %d x %d accumulation",
            cfg.method, cfg.model.arch, len(self.dataset), lengths.steps_per_epoch, lengths.total_steps,
            lengths.warmup_steps, lengths.stop_step, self.info.world_size, self.sampler.micro_batch_size,
            cfg.optim.accum_steps,
        )
        # after the start-up line, which would otherwise break a terminal's bar: a live bar on a terminal,
        # a progress line every few seconds in a log; with run.progress=false, the metric rows are logged
        self.bar = progress(total=lengths.stop_step, initial=self.step, desc=f"{cfg.method} {cfg.model.arch}",
                            unit="step", enabled=self.main and cfg.run.progress)
        self.window, self.t_window = [], time.perf_counter()
        self.train_model.train()
        spe = lengths.steps_per_epoch
        try:
            with graceful_stop() as stop:
                while self.step < lengths.stop_step:
                    self.state.epoch = self.step // spe
                    self.train_step.epoch(self.loader, self.sampler, self._loss, stop, self.save, spe, self._after_step,
                                          end=min(spe, lengths.stop_step - self.state.epoch * spe),
                                          save_due=self._save_due)
        finally:
            self.bar.close()
            self.logger.close()
        if self.num_skipped:
            log.warning("skipped %d unreadable images during training", self.num_skipped)
        self._write_summary()
        return self.out_dir / LAST_CHECKPOINT

    def _write_summary(self) -> None:
        if not self.main:
            return
        atomic_write_json(
            {
                "method": self.cfg.method, "arch": self.cfg.model.arch, "step": self.step,
                "stop_step": self.lengths.stop_step, "total_steps": self.lengths.total_steps,
                "epoch": self.step // self.lengths.steps_per_epoch,
                "final_loss": self.final_loss if self.final_loss is None or math.isfinite(self.final_loss) else None,
                "num_skipped": self.num_skipped, "checkpoint": str(self.out_dir / LAST_CHECKPOINT),
                "encoder": str(self.out_dir / ENCODER_FILE), "config": to_dict(self.cfg),
            },
            self.out_dir / SUMMARY_FILE,
        )


def _atomic_link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, else copy) without a torn ``dst``."""
    import shutil
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def pretrain(
    cfg: Config,
    data: Optional[str | Path] = None,
    out_dir: str | Path = "runs/pretrain",
    resume: str | Path | bool | None = "auto",
    overwrite: bool = False,
) -> Path:
    """Pretrain ``cfg.method`` on the images of ``data`` (default ``cfg.data.path``) into ``out_dir``.

    ``out_dir`` must be new, empty or an earlier run directory (:mod:`kamim.outputs`) unless
    ``overwrite``.

    ``resume``: ``"auto"`` (resume from ``out_dir/checkpoint-last.pt`` if present), a run directory
    or checkpoint file, or None/``"none"`` (start from scratch). Returns the final checkpoint path
    (``out_dir/checkpoint-last.pt``; the encoder export is ``out_dir/encoder.safetensors``).
    Works single-process or under torchrun (the process group is created here if needed).
    """
    cfg = copy.deepcopy(cfg)
    if data is not None:
        cfg.data.path = str(data)
    if not cfg.data.path:
        raise ConfigError("no training data: pass data (CLI: --data PATH) or set data.path in the config")
    cfg.validate()
    out_dir = check_output_dir(out_dir, COMMAND, overwrite=overwrite, legacy=(LAST_CHECKPOINT, SUMMARY_FILE),
                               inputs={"data.path folder": cfg.data.path})
    created_group = not kdist.is_distributed()
    info = kdist.init_distributed(cfg.run.device)
    lock = None
    try:
        if info.is_main:  # before anything in the run directory is read (checkpoint lookup included)
            lock = lock_output(out_dir, f"run directory '{out_dir}'")
            check_output_dir(out_dir, COMMAND, overwrite=overwrite, legacy=(LAST_CHECKPOINT, SUMMARY_FILE))
        kdist.barrier()
        return _Trainer(cfg, out_dir, info, resume).run()
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            kdist.cleanup()
