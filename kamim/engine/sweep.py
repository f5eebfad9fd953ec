"""KAMIM hyper-parameter sweep: one pretraining run per (detector, weight patch size, temperature).

Each grid point gets its own run directory ``OUT/<detector>_wps<w>_T<t>``; a point whose run
finished with the same config (``summary.json``) is skipped, an interrupted one resumes from its
last checkpoint. After every point the results table is rewritten atomically as
``OUT/results.csv`` and ``OUT/results.json`` (settings, final loss, steps, run directory).
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from kamim import distributed as kdist
from kamim.config import RESUME_SAFE_KEYS, Config, ConfigError, config_diff, to_dict
from kamim.serialization import atomic_write_json, atomic_write_text

__all__ = ["PAPER_WEIGHT_PATCH_SIZES", "PAPER_TEMPERATURES", "sweep", "sweep_run_name", "RESULT_FIELDS"]

log = logging.getLogger("kamim.sweep")

PAPER_WEIGHT_PATCH_SIZES = (8, 16, 32)
PAPER_TEMPERATURES = (0.1, 0.25, 0.5, 1.0, 2.5)
RESULT_FIELDS = ("detector", "weight_patch_size", "temperature", "final_loss", "step", "status", "run_dir")

# What must match for a finished run to be reused: everything but execution details.
_REUSE_IGNORE = RESUME_SAFE_KEYS - {"run.max_steps"}


def sweep_run_name(detector: str, weight_patch_size: int, temperature: float) -> str:
    """Run directory name of one grid point, e.g. ``fast_wps8_T0.25``."""
    return f"{detector}_wps{weight_patch_size}_T{temperature:g}"


def _finished(run_dir: Path, cfg: Config) -> Optional[dict[str, Any]]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config_diff(summary.get("config", {}), to_dict(cfg), ignore=_REUSE_IGNORE):
        return None
    if summary.get("stop_step") is None or summary.get("step", -1) < summary["stop_step"]:
        return None
    return summary


def _write_table(rows: list[dict[str, Any]], out_dir: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), out_dir / "results.csv")
    atomic_write_json(rows, out_dir / "results.json")


def sweep(
    cfg: Config,
    data: Optional[str | Path],
    out_dir: str | Path,
    *,
    detectors: Optional[Sequence[str]] = None,
    weight_patch_sizes: Sequence[int] = PAPER_WEIGHT_PATCH_SIZES,
    temperatures: Sequence[float] = PAPER_TEMPERATURES,
) -> list[dict[str, Any]]:
    """Run the KAMIM grid (``detectors`` defaults to the config's detector); returns the table rows."""
    if cfg.method != "kamim":
        raise ConfigError(f"a sweep varies KAMIM settings but the config has method={cfg.method!r}")
    detectors = list(detectors) if detectors else [cfg.kamim.detector]
    grid = list(itertools.product(detectors, weight_patch_sizes, temperatures))
    if not grid:
        raise ValueError("empty sweep grid: give at least one detector, weight patch size and temperature")
    # Validate every point before training anything.
    configs = []
    for det, wps, t in grid:
        c = copy.deepcopy(cfg)
        c.kamim.detector, c.kamim.weight_patch_size, c.kamim.temperature = det, int(wps), float(t)
        if data is not None:
            c.data.path = str(data)
        configs.append(c.validate())

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    created_group = not kdist.is_distributed()
    kdist.init_distributed(cfg.run.device)  # one process group for all runs under torchrun
    try:
        return _run_grid(configs, out_dir)
    finally:
        if created_group:
            kdist.cleanup()


def _run_grid(configs: list[Config], out_dir: Path) -> list[dict[str, Any]]:
    from kamim.engine.pretrain import pretrain

    rows: list[dict[str, Any]] = []
    for c in configs:
        k = c.kamim
        run_dir = out_dir / sweep_run_name(k.detector, k.weight_patch_size, k.temperature)
        summary = _finished(run_dir, c)
        status = "reused"
        if summary is None:
            log.info("sweep point %s", run_dir.name)
            pretrain(c, None, run_dir, resume="auto")
            kdist.barrier()
            summary = json.loads((run_dir / "summary.json").read_text())
            status = "trained"
        rows.append({
            "detector": k.detector, "weight_patch_size": k.weight_patch_size, "temperature": k.temperature,
            "final_loss": summary.get("final_loss"), "step": summary.get("step"), "status": status,
            "run_dir": str(run_dir),
        })
        if kdist.is_main_process():
            _write_table(rows, out_dir)
    return rows
