"""The training runtime shared by pretraining (:mod:`kamim.engine.pretrain`), linear probing and
finetuning (:mod:`kamim.eval`): each task keeps only its loss and its epoch/evaluation policy.

* :mod:`~kamim.runtime.step` — :class:`TrainStep`: autocast, accumulation with DDP ``no_sync``,
  zero loss for empty micro-batches, non-finite loss/gradient guard, fp16 scaler, clipping,
  scheduler stepped per optimizer step;
* :mod:`~kamim.runtime.state` — :class:`TrainState`: model, optimizer, scheduler, scaler, RNG and
  counters saved/loaded atomically (``weights_only``), the non-finite-state guard;
* :mod:`~kamim.runtime.epochs` — :class:`EpochTrainer`, the epoch skeleton of probing and finetuning;
* :mod:`~kamim.runtime.amp` — the one autocast and :class:`LossScaler`;
* :mod:`~kamim.runtime.rng` — RNG capture/restore over ranks;
* :mod:`~kamim.runtime.schedule` — cosine schedules over optimizer steps, epoch arithmetic;
* :mod:`~kamim.runtime.sampler` — resumable, rank-invariant data order (mid-epoch resume);
* :mod:`~kamim.runtime.checkpoint` — checkpoint formats, the resume-path rule and the encoder export.

Dependency rule: ``runtime`` imports the method, models, data, config, serialization and
distributed layers only, never ``kamim.engine`` or ``kamim.eval``.
"""
from .amp import AMP_MODES, LossScaler, NonFiniteGradient, amp_dtype_of, autocast
from .checkpoint import (
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CONFIG_FILE, ENCODER_FILE, LAST_CHECKPOINT, SUMMARY_FILE,
    encoder_prefix, export_encoder, find_resume_checkpoint, load_checkpoint, load_pretrain_checkpoint, on_disk,
    resume_checkpoint, write_run_config,
)
from .epochs import EpochTrainer
from .rng import gather_rng_states, restore_rng, rng_state, seed_all, set_rng_state
from .sampler import ResumableBatchSampler, SeededDataset, sample_seed
from .schedule import EpochRunConfig, clamped_warmup, cosine_scheduler, epoch_scheduler, micro_batch_size, stop_epoch
from .state import EpochStats, NonFiniteLossError, TrainState, nonfinite_state
from .step import StepResult, TrainStep, agreed_signal, stopped

__all__ = [
    "TrainStep", "StepResult", "agreed_signal", "stopped", "EpochTrainer", "TrainState", "EpochStats", "NonFiniteLossError", "nonfinite_state",
    "AMP_MODES", "amp_dtype_of", "autocast", "LossScaler", "NonFiniteGradient",
    "rng_state", "seed_all", "set_rng_state", "gather_rng_states", "restore_rng",
    "cosine_scheduler", "EpochRunConfig", "epoch_scheduler", "stop_epoch", "micro_batch_size", "clamped_warmup",
    "ResumableBatchSampler", "SeededDataset", "sample_seed",
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "LAST_CHECKPOINT", "ENCODER_FILE", "SUMMARY_FILE", "CONFIG_FILE",
    "load_checkpoint", "load_pretrain_checkpoint", "find_resume_checkpoint", "resume_checkpoint", "write_run_config",
    "encoder_prefix", "export_encoder", "on_disk",
]
