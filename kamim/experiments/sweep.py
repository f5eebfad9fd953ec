"""KAMIM hyper-parameter sweep: one pretraining run per (detector, weight patch size, temperature).

Each grid point gets its own run directory ``OUT/<detector>_wps<w>_T<t>``; a point whose run
finished with the same config (``summary.json``) is skipped, an interrupted one resumes from its
last checkpoint. After every point the results table is rewritten atomically as
``OUT/results.csv`` and ``OUT/results.json`` (settings, final loss, steps, run directory).

Final losses are NOT comparable across temperatures or weight patch sizes: the KAMIM weights
(``exp(density / T)``, minimum 1) scale the loss. With a :class:`SweepEval` each run's exported
encoder (``encoder.safetensors``) is also evaluated on labelled data, which is comparable:

* ``knn``: weighted k-NN (:func:`kamim.eval.knn.run_knn`, DINO protocol, ``k`` = 20, T = 0.07)
  on the reference probing layer (:func:`kamim.eval.features.default_layer`: block 8 of 12,
  scaled to depth) -> column ``knn_top1``; per-run outputs in ``RUN/knn/``.
* ``linprobe``: a short linear probe (:func:`kamim.eval.linprobe.linear_probe`, reference recipe)
  on the same layer -> column ``linprobe_top1`` (accuracy after the last epoch); ``RUN/linprobe/``.

Accuracies in the table are fractions in [0, 1] (the evaluation engines' own tables use percent).
Each result is recorded in ``RUN/sweep_eval.json`` with what identifies it (evaluation settings and
the SHA-256 of the encoder file); a rerun reuses a recorded result only when both still match, so a
run that trained further is re-evaluated, and an unchanged one is not.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from kamim import distributed as kdist
from kamim.config import (
    RESUME_SAFE_KEYS, Config, ConfigError, SweepEval, SweepGrid, config_diff, dump_config, to_dict,
)
from kamim.experiments.sweep_grid import EVAL_METHODS, PAPER_TEMPERATURES, PAPER_WEIGHT_PATCH_SIZES
from kamim.outputs import check_output_dir, mark_output_dir
from kamim.runtime.checkpoint import CONFIG_FILE
from kamim.serialization import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "PAPER_WEIGHT_PATCH_SIZES", "PAPER_TEMPERATURES", "RESULT_FIELDS", "EVAL_METHODS", "EVAL_FILE",
    "SweepEval", "sweep", "sweep_run_name", "result_fields", "sort_by_metric",
]

log = logging.getLogger("kamim.sweep")

RESULT_FIELDS = ("detector", "weight_patch_size", "temperature", "final_loss", "step", "status", "run_dir")
EVAL_FILE = "sweep_eval.json"
COMMAND = "kamim sweep"  # the writer recorded in a sweep directory (kamim.outputs)

# What must match for a finished run to be reused: everything but execution details.
_REUSE_IGNORE = RESUME_SAFE_KEYS - {"run.max_steps"}


def sweep_run_name(detector: str, weight_patch_size: int, temperature: float) -> str:
    """Run directory name of one grid point, e.g. ``fast_wps8_T0.25``."""
    return f"{detector}_wps{weight_patch_size}_T{temperature:g}"


def result_fields(evaluation: Optional[SweepEval] = None) -> tuple[str, ...]:
    """Columns of the results table: the settings, final loss, evaluation metrics, status, run dir."""
    if evaluation is None:
        return RESULT_FIELDS
    metrics = tuple(evaluation.metric(m) for m in evaluation.methods)
    return (*RESULT_FIELDS[:5], *metrics, "eval_layer", "status", "eval_status", "run_dir")


def sort_by_metric(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows best first by ``metric`` (higher is better); rows without a value last, grid order kept on ties."""
    return sorted(rows, key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0.0)))


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


def _write_table(rows: list[dict[str, Any]], out_dir: Path, fields: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), out_dir / "results.csv")
    atomic_write_json(rows, out_dir / "results.json")


def _meta_encoder(cfg: Config) -> "nn.Module":
    """The sweep's encoder built on the meta device (no memory, no compute): checks ``model.overrides``
    before anything trains and gives the geometry the evaluation is checked against."""
    import torch

    from kamim.models.presets import create_encoder

    try:
        with torch.device("meta"):
            encoder, _ = create_encoder(cfg.model.arch, img_size=cfg.model.img_size, **cfg.model.overrides)
    except TypeError as e:  # an override the timm model does not take
        raise ConfigError(f"model.overrides={cfg.model.overrides} rejected by {cfg.model.arch}: {e}") from None
    return encoder


def _check_evaluation(encoder: "nn.Module", ev: SweepEval) -> int:
    """Validate ``ev`` against the sweep's architecture before any training; returns the 1-based layer.

    The labelled data is opened once, so a bad spec fails in seconds, not after the first run.
    """
    from kamim.backbone import model_geometry, resolve_layers
    from kamim.eval.data import build_labelled_data

    ev.validate()
    layers = resolve_layers(encoder, ev.layer)
    if len(layers) != 1:
        raise ValueError(f"eval layer {ev.layer!r} selects layers {layers}; the sweep table needs exactly one")
    build_labelled_data(ev.data, img_size=model_geometry(encoder).img_size)
    return layers[0]


def sweep(
    cfg: Config,
    data: Optional[str | Path],
    out_dir: str | Path,
    *,
    detectors: Optional[Sequence[str]] = None,
    weight_patch_sizes: Sequence[int] = PAPER_WEIGHT_PATCH_SIZES,
    temperatures: Sequence[float] = PAPER_TEMPERATURES,
    evaluation: Optional[SweepEval] = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the KAMIM grid (``detectors`` defaults to the config's detector); returns the table rows
    in grid order (with ``evaluation``, one ``<method>_top1`` column per evaluation method).

    ``out_dir`` must be new, empty or an earlier sweep directory (:mod:`kamim.outputs`) unless
    ``overwrite``."""
    if cfg.method != "kamim":
        raise ConfigError(f"a sweep varies KAMIM settings but the config has method={cfg.method!r}")
    detectors = list(detectors) if detectors else [cfg.kamim.detector]
    grid = list(itertools.product(detectors, weight_patch_sizes, temperatures))
    if not grid:
        raise ValueError("empty sweep grid: give at least one detector, weight patch size and temperature")
    # Validate every point (and the evaluation) before training anything.
    configs = []
    for det, wps, t in grid:
        c = copy.deepcopy(cfg)
        c.sweep = None  # each point is a plain pretraining run
        c.kamim.detector, c.kamim.weight_patch_size, c.kamim.temperature = det, int(wps), float(t)
        if data is not None:
            c.data.path = str(data)
        configs.append(c.validate())
    encoder = _meta_encoder(configs[0])  # every point has the same architecture
    layer = _check_evaluation(encoder, evaluation) if evaluation is not None else None

    out_dir = check_output_dir(out_dir, COMMAND, overwrite=overwrite, legacy=("results.json",),
                               inputs={"data.path folder": configs[0].data.path,
                                       "evaluation data": evaluation.data if evaluation is not None else None})
    out_dir.mkdir(parents=True, exist_ok=True)
    if kdist.is_main_process():
        mark_output_dir(out_dir, COMMAND)
        record = copy.deepcopy(cfg)  # the whole sweep as one config: rerun with --config OUT/config.yaml
        record.sweep = SweepGrid(tuple(detectors), tuple(int(w) for w in weight_patch_sizes),
                                 tuple(float(t) for t in temperatures), evaluation)
        if data is not None:
            record.data.path = str(data)
        dump_config(record, out_dir / CONFIG_FILE)
    created_group = not kdist.is_distributed()
    kdist.init_distributed(cfg.run.device)  # one process group for all runs under torchrun
    try:
        return _run_grid(configs, out_dir, evaluation, layer)
    finally:
        if created_group:
            kdist.cleanup()


def _run_grid(
    configs: list[Config], out_dir: Path, evaluation: Optional[SweepEval], layer: Optional[int]
) -> list[dict[str, Any]]:
    from kamim.engine import pretrain as engine

    fields = result_fields(evaluation)
    rows: list[dict[str, Any]] = []
    for c in configs:
        k = c.kamim
        run_dir = out_dir / sweep_run_name(k.detector, k.weight_patch_size, k.temperature)
        summary = _finished(run_dir, c)
        status = "reused"
        if summary is None:
            log.info("sweep point %s", run_dir.name)
            engine.pretrain(c, None, run_dir, resume="auto")
            kdist.barrier()
            summary = json.loads((run_dir / engine.SUMMARY_FILE).read_text())
            status = "trained"
        row = {
            "detector": k.detector, "weight_patch_size": k.weight_patch_size, "temperature": k.temperature,
            "final_loss": summary.get("final_loss"), "step": summary.get("step"), "status": status,
            "run_dir": str(run_dir),
        }
        if evaluation is not None:
            metrics, reused = _evaluate_run(run_dir / engine.ENCODER_FILE, run_dir, c, evaluation, layer)
            row.update(metrics, eval_layer=layer, eval_status="reused" if reused else "computed")
        rows.append({f: row.get(f) for f in fields})
        if kdist.is_main_process():
            _write_table(rows, out_dir, fields)
    return rows


# --------------------------------------------------------------------------- evaluation


def _eval_key(method: str, ev: SweepEval, layer: int, cfg: Config, encoder_sha256: str) -> dict[str, Any]:
    """Everything a recorded result depends on: it is reused only when all of it is unchanged."""
    key: dict[str, Any] = {"data": str(ev.data), "layer": layer, "pool": ev.pool, "amp": cfg.run.amp,
                           "encoder_sha256": encoder_sha256}
    if method == "knn":
        key.update(k=ev.k, temperature=ev.knn_temperature)
    else:
        key.update(epochs=ev.linprobe_epochs, recipe=ev.linprobe_recipe, batch_size=ev.batch_size,
                   seed=cfg.run.seed)
    return key


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _evaluate_run(
    encoder: Path, run_dir: Path, cfg: Config, ev: SweepEval, layer: int
) -> tuple[dict[str, Optional[float]], bool]:
    """``{<method>_top1: fraction}`` for one run, and whether every value was reused from its record."""
    from kamim.checkpoints import sha256_file

    if not encoder.is_file():
        raise FileNotFoundError(f"encoder export not found: '{encoder}' (the pretraining run did not finish)")
    sha = sha256_file(encoder)
    record_path = run_dir / EVAL_FILE
    # rank 0's view, taken before anyone writes: every rank makes the same reuse/resume decisions
    record = kdist.broadcast_object(_read_record(record_path) if kdist.is_main_process() else None)
    metrics: dict[str, Optional[float]] = {}
    all_reused = True
    for method in ev.methods:
        key = _eval_key(method, ev, layer, cfg, sha)
        previous = record.get(method) if isinstance(record.get(method), dict) else {}
        if previous.get("key") == key and previous.get("top1") is not None:
            metrics[ev.metric(method)] = float(previous["top1"])
            continue
        all_reused = False
        # a matching record without a result = the same evaluation was interrupted: resume it
        interrupted = previous.get("key") == key
        if kdist.is_main_process():
            record[method] = {"key": key, "top1": None}
            atomic_write_json(record, record_path)
        log.info("sweep eval %s: %s on %s, layer %d", run_dir.name, method, ev.data, layer)
        if method == "knn":
            top1 = _run_knn(encoder, run_dir / "knn", cfg, ev, layer)
        else:
            top1 = _run_linprobe(encoder, run_dir / "linprobe", cfg, ev, layer, resume="auto" if interrupted else "none")
        metrics[ev.metric(method)] = top1
        if kdist.is_main_process():
            record[method] = {"key": key, "top1": top1}
            atomic_write_json(record, record_path)
        kdist.barrier()
    return metrics, all_reused


def _top1_of(rows: Sequence[dict[str, Any]], layer: int, where: Path) -> float:
    for r in rows:
        if int(r["layer"]) == layer:
            return float(r["top1"]) / 100.0  # the evaluation engines report percent
    raise RuntimeError(f"{where}: no result for layer {layer}")


def _run_knn(encoder: Path, out: Path, cfg: Config, ev: SweepEval, layer: int) -> float:
    from kamim.eval import knn

    summary = knn.run_knn(knn.KNNConfig(
        checkpoint=str(encoder), data=str(ev.data), output_dir=str(out), layers=str(layer), pool=ev.pool,
        ks=(ev.k,), temperature=ev.knn_temperature, batch_size=ev.batch_size, num_workers=cfg.data.num_workers,
        device=cfg.run.device, amp=cfg.run.amp, progress=cfg.run.progress,
    ))
    return _top1_of(summary["results"], layer, out)


def _run_linprobe(encoder: Path, out: Path, cfg: Config, ev: SweepEval, layer: int, resume: str) -> float:
    from kamim.eval import linprobe

    summary = linprobe.linear_probe(linprobe.LinprobeConfig(
        checkpoint=str(encoder), data=str(ev.data), output_dir=str(out), layers=str(layer), pool=ev.pool,
        recipe=ev.linprobe_recipe, epochs=ev.linprobe_epochs, warmup_epochs=ev.linprobe_epochs // 10,
        batch_size=ev.batch_size, num_workers=cfg.data.num_workers, seed=cfg.run.seed, device=cfg.run.device,
        amp=cfg.run.amp, resume=resume, progress=cfg.run.progress,
    ))
    return _top1_of(summary["final"], layer, out)
