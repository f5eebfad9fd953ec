"""Shared plumbing of the evaluation engines: run records, resume checks, results.

Data and loaders live in :mod:`kamim.eval.data`, output folders and sessions in
:mod:`kamim.eval.session`, scoring in :mod:`kamim.eval.scoring`, the training step and state in
:mod:`kamim.runtime`, encoders in :mod:`kamim.checkpoints`.

Conventions shared by ``linprobe``, ``finetune``, ``knn`` and ``reconstruct``:

* Training data order is a function of ``(seed, epoch, index)`` (``kamim.runtime.sampler``), the
  batch size is GLOBAL (all ranks and accumulation steps) and the cosine schedule is stepped once
  per optimizer step, like the pretraining engine.
* Evaluation splits the dataset into disjoint per-rank shards (``range(rank, N, world)``, no
  padding) and sums counts over ranks, so DDP metrics are exact (``DistributedSampler`` would
  duplicate samples to even out the shards).
* Results are written atomically as ``<name>.json`` (everything) and ``<name>.csv`` (the table)
  in the run directory and printed as a table by rank 0.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kamim import outputs
from kamim.runtime import (
    EpochRunConfig, EpochStats, EpochTrainer, LossScaler, TrainState, epoch_scheduler, resume_checkpoint,
    write_run_config,
)
from kamim.serialization import atomic_write_json, atomic_write_text, json_safe

from .data import classification_data, training_loaders
from .features import unpack_labelled
from .scoring import evaluate_logits
from .session import claimed_run_dir

__all__ = ["config_record", "LabelledTask", "write_results", "format_table", "print_table"]

log = logging.getLogger("kamim.eval")


# --------------------------------------------------------------------------- training runs

def config_record(cfg: EpochRunConfig) -> dict[str, Any]:
    """A dataclass config as plain JSON for checkpoints and results (an in-memory model is named, not stored)."""
    d = dataclasses.asdict(cfg)
    if isinstance(cfg.checkpoint, nn.Module):
        d["checkpoint"] = f"<in-memory {type(cfg.checkpoint).__name__}>"
    return json_safe(d)


class LabelledTask(EpochTrainer):
    """An epoch-based task on labelled images (linear probing, finetuning) in its run directory.

    It adds to :class:`kamim.runtime.EpochTrainer` what both tasks do alike: the data and loaders
    (:meth:`load_data`), the state, statistics and resume (:meth:`start`), a micro-batch on the device
    (:meth:`labelled`), evaluation (:meth:`score`), the results files and the run itself (:meth:`run`:
    lock the folder, record the config, train the epochs, write and print the results). A task sets
    ``enc`` (its encoder) and ``checkpoint_format``, adds its own entries to :meth:`describe` and
    :meth:`summary`, and gives :meth:`print_summary`.
    """

    checkpoint_format = ""

    def load_data(self, aug: str, model: nn.Module) -> None:
        """``data`` (labelled splits at ``cfg.img_size`` or the encoder's, checked against ``model``),
        ``loader``, ``sampler``, ``val_loader`` and ``steps_per_epoch``."""
        cfg = self.cfg
        self.data = classification_data(cfg.data, cfg.img_size or self.enc.image_size, aug, cfg.auto_augment,
                                        cfg.re_prob, model)
        self.loader, self.sampler, self.val_loader = training_loaders(
            self.data, cfg.batch_size, cfg.accum_steps, self.info, cfg.seed, cfg.num_workers)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_stats: int, what: str,
              model_key: str = "model", **step_options: Any) -> dict[str, Any] | None:
        """``state`` (``model``, ``optimizer``, the epoch schedule, the fp16 scaler), ``stats`` (``num_stats``
        running sums), ``config`` and ``history``, all restored from ``checkpoint-last.pt`` when
        resuming (``cfg.resume`` rules; ``what`` names the kind in messages); then ``train_module``, the
        module the loss calls (:meth:`build_step` with ``step_options``). Returns the resumed
        checkpoint, for the task's own entries, or None when the run starts afresh."""
        cfg = self.cfg
        self.state = TrainState(model, optimizer, epoch_scheduler(optimizer, cfg, self.steps_per_epoch),
                                LossScaler(self.device, enabled=cfg.amp == "fp16"), model_key=model_key)
        self.stats = EpochStats(num_stats, self.device)
        self.config, self.history = config_record(cfg), []
        path, ckpt = resume_checkpoint(self.out_dir, cfg.resume, self.checkpoint_format, what, self.config) or (None, None)
        if ckpt is not None:
            self.restore(ckpt, path)
            self.history = list(ckpt["history"])
            log.info("resumed %s from %s at epoch %d, step %d", what, path, self.state.epoch, self.state.step)
        self.train_module = self.build_step(model, **step_options)
        return ckpt

    def labelled(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, targets) of a micro-batch on the device; None when every image was unreadable."""
        if "image" not in batch:
            return None
        images, target = unpack_labelled(batch)
        return images.to(self.device, non_blocking=True), target.to(self.device)

    def score(self, heads: Callable[[torch.Tensor], Any]) -> dict[Any, dict[str, float]]:
        """:func:`kamim.eval.scoring.evaluate_logits` of ``heads`` on the val split (the run's precision)."""
        return evaluate_logits(heads, self.val_loader, self.device, self.amp,
                               progress=self.cfg.progress and self.info.is_main, desc=f"{self.task} eval")

    def describe(self) -> str:
        """The data part of the line logged when the run starts."""
        d = self.data
        return (f"{len(d.train)} train / {len(d.val)} val images, {d.num_classes} classes, "
                f"{self.steps_per_epoch} steps/epoch")

    def summary(self) -> dict[str, Any]:
        """What every ``<task>.json`` holds; a task adds its own entries."""
        d = self.data
        return {"task": self.task, "config": self.config, "classes": d.classes, "num_train": len(d.train),
                "num_val": len(d.val), "epochs_done": self.state.epoch, "steps": self.state.step,
                "history": self.history}

    def print_summary(self, summary: dict[str, Any]) -> None:
        """The table printed at the end."""
        raise NotImplementedError

    def write_results(self, summary: dict[str, Any] | None = None) -> None:
        """``<task>.json`` and ``<task>.csv`` (rank 0)."""
        if self.info.is_main:
            write_results(self.out_dir, self.task, self.history, summary or self.summary())

    def run(self) -> dict[str, Any]:
        """Train (or resume) to the stop epoch under the run directory's lock; the summary."""
        with claimed_run_dir(self.out_dir, self.task, self.info):
            log.info(self.describe())
            write_run_config(self.cfg, self.out_dir, self.info.is_main)
            t0 = time.perf_counter()
            self.run_epochs()
            summary = {**self.summary(), "time_s": time.perf_counter() - t0}
            self.write_results(summary)
            if self.info.is_main:
                self.print_summary(summary)
            return summary


# --------------------------------------------------------------------------- results


def write_results(
    out_dir: str | os.PathLike, name: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``summary`` to ``out_dir/name.json`` and ``rows`` to ``out_dir/name.csv`` (both atomic);
    ``out_dir`` is created and marked as an output of ``kamim NAME``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs.mark_output_dir(out, f"kamim {name}")
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in json_safe(dict(r)).items()})
    csv_path = atomic_write_text(buf.getvalue(), out / f"{name}.csv")
    json_path = atomic_write_json(json_safe(dict(summary)), out / f"{name}.json")
    return json_path, csv_path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
    return "" if v is None else str(v)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, title: str | None = None
) -> str:
    """A plain-text, right-aligned table of ``rows`` (floats with 2 decimals, 3 significant digits below 0.01)."""
    if not rows:
        return (title + "\n" if title else "") + "(no rows)"
    cols = list(columns) if columns else [k for k in rows[0]]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, title: str | None = None
) -> None:
    """Print :func:`format_table`."""
    print(format_table(rows, columns, title), flush=True)
