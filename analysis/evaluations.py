"""Evaluation results of the analysed models, shown in the report (torch-free).

``kamim-analyze run --evaluation NAME=RUN_DIR`` names the output folder of a ``kamim linprobe``,
``kamim knn`` or ``kamim finetune`` run of model ``NAME``; its summary (``linprobe.json``,
``knn.json``, ``finetune.json``: :data:`EVALUATION_FILES`) is read once, turned into tidy rows
(:func:`read_evaluation`) and saved with the run (``raw/run.json``), so that ``kamim-analyze plot``
redraws them without the folder. The report gives them as a table and as one sentence per model
(:func:`evaluation_sentences`). Which model an evaluation belongs to is said by the user, never
guessed from paths; the checkpoint the evaluation names is shown beside it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EVALUATION_FILES", "read_evaluation", "evaluation_table", "evaluation_sentences"]

#: summary file of each evaluation command -> how the report names it
EVALUATION_FILES = {"linprobe.json": "linear probe", "knn.json": "k-NN", "finetune.json": "finetune"}


def _summary(folder: Path) -> tuple[str, dict[str, Any]]:
    found = [f for f in EVALUATION_FILES if (folder / f).is_file()]
    if not folder.is_dir():
        raise ValueError(f"evaluation folder '{folder}' does not exist")
    if len(found) != 1:
        what = "none" if not found else ", ".join(found)
        raise ValueError(f"evaluation folder '{folder}' holds {what} of {', '.join(EVALUATION_FILES)}; expected "
                         "one (the output folder of kamim linprobe, knn or finetune)")
    try:
        summary = json.loads((folder / found[0]).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"evaluation file '{folder / found[0]}' is not readable JSON ({err})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"evaluation file '{folder / found[0]}' is not a kamim summary (expected a JSON object)")
    return found[0], summary


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def read_evaluation(model: str, folder: str | os.PathLike) -> dict[str, Any]:
    """The evaluation of ``model`` in ``folder`` as ``{model, evaluation, folder, checkpoint, images,
    rows}``; each row: ``layer`` (block; -1: the whole finetuned network), ``k`` (k-NN; else -1),
    ``top1``, ``top5``, ``best_top1``, ``epochs``. One-line ValueError for a folder without exactly one
    known summary or with one that lacks its results."""
    folder = Path(folder).expanduser()
    name, s = _summary(folder)
    kind = EVALUATION_FILES[name]
    config = s.get("config") if isinstance(s.get("config"), dict) else {}
    checkpoint = s.get("checkpoint", config.get("checkpoint"))
    epochs = int(s["epochs_done"]) if isinstance(s.get("epochs_done"), int) else -1
    try:
        if name == "knn.json":
            rows = [{"layer": int(r["layer"]), "k": int(r["k"]), "top1": _number(r["top1"]), "top5": _number(r["top5"]),
                     "best_top1": float("nan"), "epochs": -1} for r in s["results"]]
        elif name == "linprobe.json":
            rows = [{"layer": int(r["layer"]), "k": -1, "top1": _number(r["top1"]), "top5": _number(r["top5"]),
                     "best_top1": _number(r.get("best_top1")), "epochs": epochs} for r in s["final"]]
        else:
            final, best = s["final"], s.get("best") or {}
            rows = [{"layer": -1, "k": -1, "top1": _number(final["top1"]), "top5": _number(final["top5"]),
                     "best_top1": _number(best.get("top1")), "epochs": epochs}]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"evaluation file '{folder / name}' lacks its results ({type(err).__name__}: {err})") from None
    if not rows:
        raise ValueError(f"evaluation file '{folder / name}' holds no results")
    images = s.get("num_val")
    return {"model": model, "evaluation": kind, "folder": str(folder.absolute()), "checkpoint": str(checkpoint),
            "images": int(images) if isinstance(images, int) else -1, "rows": rows}


def evaluation_table(evaluations: Sequence[Mapping[str, Any]]) -> Any:
    """Every evaluation row as one table (model, evaluation, layer, k, top-1, top-5, best top-1,
    epochs, validation images, checkpoint)."""
    import pandas as pd

    rows = [{"model": e["model"], "evaluation": e["evaluation"], **r, "images": e["images"],
             "checkpoint": e["checkpoint"]} for e in evaluations for r in e["rows"]]
    columns = ["model", "evaluation", "layer", "k", "top1", "top5", "best_top1", "epochs", "images", "checkpoint"]
    return pd.DataFrame(rows, columns=columns)


def _where(row: Mapping[str, Any]) -> str:
    parts = ["whole network" if row["layer"] < 0 else f"block {row['layer']}"]
    if row["k"] >= 0:
        parts.append(f"k = {row['k']}")
    if row["epochs"] >= 0:
        parts.append(f"{row['epochs']} epoch{'s' if row['epochs'] != 1 else ''}")
    return ", ".join(parts)


def evaluation_sentences(evaluations: Sequence[Mapping[str, Any]]) -> list[str]:
    """One sentence per model: each evaluation's top-1 at its best layer (and k), with the images."""
    by_model: dict[str, list[str]] = {}
    for e in evaluations:
        best = max(e["rows"], key=lambda r: -1.0 if r["top1"] != r["top1"] else r["top1"])
        images = f", on {e['images']} images" if e["images"] >= 0 else ""
        by_model.setdefault(e["model"], []).append(f"{e['evaluation']} top-1 {best['top1']:.2f}% ({_where(best)}"
                                                   f"{images})")
    return [f"{model}: {'; '.join(parts)}." for model, parts in by_model.items()]
