"""Tidy analysis results: records -> pandas DataFrame, arrays, atomic saving and loading.

Table columns: ``model, layer, head, metric, value, images`` with ``layer`` in ``1..L`` (``0`` =
embedding where relevant) and ``head = -1`` for a mean over heads / not applicable.

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
    "atomic_open",
    "save_table",
    "save_arrays",
    "load_arrays",
    "AnalysisResult",
]

TABLE_COLUMNS = ("model", "layer", "head", "metric", "value", "images")


@dataclass(frozen=True)
class Record:
    """One tidy measurement."""

    model: str
    layer: int
    head: int
    metric: str
    value: float
    images: int


def records_to_frame(records: Iterable[Record | Mapping[str, Any]]) -> pd.DataFrame:
    """Records -> DataFrame with exactly :data:`TABLE_COLUMNS` (typed: int layer/head/images, float value)."""
    rows = [r.__dict__ if isinstance(r, Record) else dict(r) for r in records]
    frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return frame.astype({"model": str, "layer": "int64", "head": "int64", "metric": str, "value": "float64",
                         "images": "int64"})


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
