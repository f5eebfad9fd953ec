"""Tidy analysis results: records -> pandas DataFrame, arrays, atomic saving and loading.

Table columns (:data:`TABLE_COLUMNS`): ``model, layer, head, column, metric, value, ci_low, ci_high,
n_images`` with ``layer`` in ``1..L`` (``0`` = embedding where relevant), ``head = -1`` for a mean over
heads / not applicable, ``column`` the second index of a matrix value (the column layer of ``cka`` and
``attention-similarity``, the column head of ``head-pair-similarity``; ``-1`` for a scalar),
``ci_low``/``ci_high`` the 95% interval over images of a mean over images
(:mod:`analysis.uncertainty`; NaN for a statistic with none) and ``n_images`` the images behind the
value. Tables saved before ``column`` and the intervals existed (their count column was ``images``)
load with ``column = -1`` and NaN intervals.

``AnalysisResult.save(dir)`` writes, each atomically (temporary file in the same directory, then
``os.replace``): ``table.csv``, ``table.json`` (records), ``arrays.npz`` (nested dicts flattened
with ``/`` in the keys) and ``meta.json`` (model name, geometry, images, analyses, options).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kamim.serialization import atomic_write, atomic_write_text

__all__ = [
    "TABLE_COLUMNS",
    "Record",
    "records_to_frame",
    "matrix_records",
    "atomic_open",
    "save_table",
    "save_arrays",
    "load_arrays",
    "AnalysisResult",
]

TABLE_COLUMNS = ("model", "layer", "head", "column", "metric", "value", "ci_low", "ci_high", "n_images")
_TYPES = {"model": str, "layer": "int64", "head": "int64", "column": "int64", "metric": str, "value": "float64",
          "ci_low": "float64", "ci_high": "float64", "n_images": "int64"}
_NAN = float("nan")


@dataclass(frozen=True)
class Record:
    """One tidy measurement (positional: model, layer, head, metric, value, n_images)."""

    model: str
    layer: int
    head: int
    metric: str
    value: float
    n_images: int
    ci_low: float = _NAN
    ci_high: float = _NAN
    column: int = -1


def records_to_frame(records: Iterable[Record | Mapping[str, Any]]) -> pd.DataFrame:
    """Records -> DataFrame with exactly :data:`TABLE_COLUMNS`, typed (int indices and counts, float values).

    Mappings may leave out ``column`` (-1) and the interval (NaN), and may name the count ``images``
    (tables saved before ``n_images``)."""
    rows = []
    for r in records:
        row = dict(r.__dict__) if isinstance(r, Record) else dict(r)
        if "n_images" not in row and "images" in row:
            row["n_images"] = row.pop("images")
        row.setdefault("column", -1)
        row.setdefault("ci_low", _NAN)
        row.setdefault("ci_high", _NAN)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return frame.astype(_TYPES)


def matrix_records(model: str, metric: str, matrix: Any, images: int, interval: Any = None, *,
                   layer: int | None = None) -> list[Any]:
    """Tidy rows of a matrix: entry ``(i, j)`` as ``layer = i + 1, column = j + 1`` (a layer-by-layer
    matrix), or, given ``layer``, as ``head = i, column = j`` of that layer (a head-by-head matrix);
    ``interval``: ``(low, high)`` matrices of the same shape (NaN without)."""
    m = np.asarray(_to_numpy(matrix), dtype=np.float64)
    nan = np.full_like(m, np.nan)
    low, high = (nan, nan) if interval is None else (np.asarray(v, dtype=np.float64) for v in interval)
    rows = []
    for i, j in np.ndindex(m.shape):
        where = dict(layer=i + 1, head=-1, column=j + 1) if layer is None else dict(layer=layer, head=i, column=j)
        rows.append(Record(model, where["layer"], where["head"], metric, float(m[i, j]), images,
                           float(low[i, j]), float(high[i, j]), where["column"]))
    return rows


# Kept for callers of the old name: the project's one atomic writer is kamim.serialization's.
atomic_open = atomic_write


def save_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Atomically save a table as ``.csv`` or ``.json`` (list of records), chosen by the suffix."""
    path = Path(path)
    if path.suffix == ".csv":
        with atomic_write(path, "w") as f:
            frame.to_csv(f, index=False)
    elif path.suffix == ".json":
        with atomic_write(path, "w") as f:
            json.dump(frame.to_dict(orient="records"), f, indent=1)
    else:
        raise ValueError(f"table path must end in .csv or .json, got {path}")
    return path


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, Mapping):
        return {str(k): _to_numpy(v) for k, v in value.items()}
    return np.asarray(value)


def _flatten(arrays: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if "/" in str(key):
            raise ValueError(f"array names may not contain '/': {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = np.asarray(_to_numpy(value))
    return flat


def save_arrays(arrays: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomically save (nested) arrays to an ``.npz``; nested dict keys are joined with ``/``."""
    path = Path(path)
    flat = _flatten(arrays)
    with atomic_write(path, "wb") as f:
        np.savez(f, **flat)
    return path


def load_arrays(path: str | os.PathLike) -> dict[str, Any]:
    """Inverse of :func:`save_arrays` (pickles disabled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no arrays file at {path}")
    out: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            node = out
            *parents, leaf = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = data[name]
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return repr(value)


@dataclass
class AnalysisResult:
    """Output of :func:`analysis.runner.run_analyses` (see the runner for the array names)."""

    model_name: str
    table: pd.DataFrame
    arrays: dict[str, Any]
    geometry: Any
    images: int
    analyses: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    #: where the numbers come from (set by ``kamim-analyze run``): the checkpoint and its sha256, the data
    #: folder and the hash of its file list, the resolution, the run's settings, the library versions
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.arrays = {k: _to_numpy(v) for k, v in self.arrays.items()}

    def metric(self, name: str) -> pd.DataFrame:
        """Rows of the table for one metric."""
        return self.table[self.table["metric"] == name]

    def meta(self) -> dict[str, Any]:
        geometry = self.geometry.to_dict() if hasattr(self.geometry, "to_dict") else self.geometry
        return _jsonable({"model": self.model_name, "images": self.images, "analyses": list(self.analyses),
                          "geometry": geometry, "options": self.options, "provenance": self.provenance})

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``table.csv``, ``table.json``, ``arrays.npz`` and ``meta.json`` atomically into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_table(self.table, directory / "table.csv")
        save_table(self.table, directory / "table.json")
        save_arrays(self.arrays, directory / "arrays.npz")
        atomic_write_text(json.dumps(self.meta(), indent=1), directory / "meta.json")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AnalysisResult:
        """Load a directory written by :meth:`save` (the geometry comes back as its dataclass)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no analysis result in {directory} (missing meta.json)")
        meta = json.loads(meta_path.read_text())
        table = records_to_frame(pd.read_csv(directory / "table.csv").to_dict(orient="records"))
        from .capture import geometry_from_dict

        return cls(model_name=meta["model"], table=table, arrays=load_arrays(directory / "arrays.npz"),
                   geometry=geometry_from_dict(meta["geometry"]), images=int(meta["images"]),
                   analyses=tuple(meta["analyses"]), options=meta.get("options", {}),
                   provenance=meta.get("provenance", {}))
