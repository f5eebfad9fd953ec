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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kamim import outputs
from kamim.runtime import EpochRunConfig, EpochTrainer, resume_checkpoint, write_run_config
from kamim.serialization import atomic_write_json, atomic_write_text, json_safe

from .features import unpack_labelled
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

    It adds to :class:`kamim.runtime.EpochTrainer` what both tasks do alike: resuming from the run
    directory (:meth:`resume`), a micro-batch on the device (:meth:`labelled`), the results files and
    the run itself (:meth:`run`: lock the folder, record the config, train the epochs, write and print
    the results). A task sets ``checkpoint_format``, ``config`` (:func:`config_record`) and
    ``history``, and gives :meth:`describe`, :meth:`summary` and :meth:`print_summary`.
    """

    checkpoint_format = ""
    history: list[dict[str, Any]]

    def resume(self, what: str) -> dict[str, Any] | None:
        """Restore ``checkpoint-last.pt`` (``cfg.resume`` rules; ``what`` names the kind in messages);
        the checkpoint, for the task's own entries, or None when the run starts afresh."""
        resumed = resume_checkpoint(self.out_dir, self.cfg.resume, self.checkpoint_format, what, self.config)
        if resumed is None:
            return None
        path, ckpt = resumed
        self.restore(ckpt, path)
        self.history = list(ckpt["history"])
        log.info("resumed %s from %s at epoch %d, step %d", what, path, self.state.epoch, self.state.step)
        return ckpt

    def labelled(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, targets) of a micro-batch on the device; None when every image was unreadable."""
        if "image" not in batch:
            return None
        images, target = unpack_labelled(batch)
        return images.to(self.device, non_blocking=True), target.to(self.device)

    def describe(self) -> str:
        """The line logged when the run starts."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Everything ``<task>.json`` holds."""
        raise NotImplementedError

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
