"""Checkpoint files: the pretraining format (read by evaluation), the resume-path rule of every task and
the encoder export (timm keys + spec as safetensors).

Every checkpoint is a plain dict written atomically (:func:`kamim.serialization.atomic_save`) and
read with ``torch.load(weights_only=True)`` (:func:`kamim.serialization.safe_load`); a ``format``
key names the task that wrote it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from torch import nn

from kamim.serialization import CheckpointError, safe_load, save_safetensors

log = logging.getLogger("kamim")

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "LAST_CHECKPOINT", "ENCODER_FILE", "SUMMARY_FILE", "CONFIG_FILE",
    "load_checkpoint", "load_pretrain_checkpoint", "find_resume_checkpoint", "resume_checkpoint", "write_run_config",
    "encoder_prefix", "export_encoder", "on_disk",
]

CHECKPOINT_FORMAT = "kamim-pretrain"  # the pretraining checkpoint's ``format``
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "checkpoint-last.pt"  # the resumable checkpoint of every task
ENCODER_FILE = "encoder.safetensors"  # pretraining's encoder export (timm keys)
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"  # the resolved config in every output directory


def on_disk(last: str | Path) -> str:
    """What a stopped run leaves, in words that are true: ``last checkpoint left intact (PATH)`` when
    ``last`` exists, else ``no checkpoint written``. The one wording of every stop message."""
    return f"last checkpoint left intact ({last})" if Path(last).is_file() else "no checkpoint written"


def load_checkpoint(path: str | Path, fmt: str, what: str, version: int | None = None) -> dict[str, Any]:
    """Load ``path`` (``weights_only``) and check its ``format`` (and ``version``); ``what`` names the
    kind in the one-line ``CheckpointError``."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise CheckpointError(f"{path} is not a kamim {what} checkpoint (format '{fmt}')")
    if version is not None and ckpt.get("version") != version:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}, expected {version}")
    return ckpt


def load_pretrain_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a ``kamim-pretrain`` checkpoint (``weights_only``)."""
    return load_checkpoint(path, CHECKPOINT_FORMAT, "pretraining", CHECKPOINT_VERSION)


def find_resume_checkpoint(out_dir: Path, resume: str | Path | bool | None) -> Optional[Path]:
    """The checkpoint to resume from: ``"auto"``/True -> ``out_dir/checkpoint-last.pt`` if present;
    None/False/``"none"`` -> none; a run directory or checkpoint file -> that one (must exist)."""
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() == "none"):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() == "auto"):
        path = Path(out_dir) / LAST_CHECKPOINT
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    return path


def resume_checkpoint(
    out_dir: Path, resume: Any, fmt: str, what: str, config: Mapping[str, Any], version: int | None = None,
    ignore: Iterable[str] | None = None, complete: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) to resume from (:func:`find_resume_checkpoint` rules), or None: the one
    resume check of every task. One-line errors for a checkpoint of another ``fmt``/``version``
    (:func:`load_checkpoint`) and for one whose stored ``config`` differs from ``config`` outside
    ``ignore`` (default :data:`kamim.config.RESUME_SAFE_KEYS`). ``complete`` fills the stored config
    with the defaults of keys added since it was written (their defaults keep the old behaviour)."""
    from kamim.config import RESUME_SAFE_KEYS, ConfigError, config_diff, dotted_get

    path = find_resume_checkpoint(out_dir, resume)
    if path is None:
        return None
    ckpt = load_checkpoint(path, fmt, what, version)
    stored = complete(ckpt["config"]) if complete is not None else ckpt["config"]
    diff = config_diff(stored, config, RESUME_SAFE_KEYS if ignore is None else ignore)
    if diff:
        show = ", ".join(f"{k} ({dotted_get(stored, k)!r} -> {dotted_get(config, k)!r})" for k in diff[:5])
        raise ConfigError(f"cannot resume from {path}: the config differs in {show}; "
                          f"use a new output directory, or resume none to start over")
    return path, ckpt


def write_run_config(cfg: Any, out_dir: Path, main: bool = True) -> Optional[Path]:
    """Rank 0 writes the resolved dataclass config ``cfg`` as ``out_dir/config.yaml``
    (:func:`kamim.config.dump_config`; rerun with ``--config``). A run on an in-memory model
    (``cfg.checkpoint`` is a module) cannot be rerun from a file and gets none (logged)."""
    if not main:
        return None
    import torch.nn as nn

    from kamim.config import dump_config

    if isinstance(getattr(cfg, "checkpoint", None), nn.Module):
        log.info("no %s written: the encoder is an in-memory model", CONFIG_FILE)
        return None
    return dump_config(cfg, Path(out_dir) / CONFIG_FILE)


def encoder_prefix(model: nn.Module) -> Optional[str]:
    """Prefix of ``model.encoder``'s keys in ``model.state_dict()`` (e.g. ``"backbone.encoder."``)."""
    target = getattr(model, "encoder", None)
    return next((f"{name}." for name, module in model.named_modules() if name and module is target), None)


def export_encoder(model: nn.Module, path: str | Path, *, method: str, step: int, checkpoint_id: str = "") -> Path:
    """Write ``model.encoder.state_dict()`` (timm keys) + ``encoder_spec`` metadata as safetensors;
    ``checkpoint_id`` is the ``save_id`` of the checkpoint it was exported with (see
    :func:`kamim.checkpoints.check_run_export`)."""
    spec = getattr(model, "encoder_spec", None) or {}
    meta = {
        "format": "kamim-encoder", "model_name": str(spec.get("model_name", "")),
        "kwargs": json.dumps(spec.get("kwargs", {})), "method": method, "step": str(step),
    }
    if checkpoint_id:
        meta["checkpoint_id"] = checkpoint_id
    return save_safetensors(model.encoder.state_dict(), path, metadata=meta)
