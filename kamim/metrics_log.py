"""Training metrics as JSONL + CSV (plus optional TensorBoard / Weights & Biases).

Rows are appended and flushed one by one. When a run resumes from step ``s`` the files are
rewritten (atomically) to the rows with ``step <= s`` so that the metrics of steps computed
after the last checkpoint by a crashed run are not duplicated. TensorBoard and wandb are
imported lazily and only when asked for.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from kamim.serialization import atomic_write_text

__all__ = ["MetricsLogger", "read_metrics", "CSV_FIELDS"]

CSV_FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "num_skipped", "time")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # strict JSON has no NaN/inf
    return v


def _csv_text(rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    return buf.getvalue()


class MetricsLogger:
    """Append-only metrics log in ``out_dir/metrics.jsonl`` and ``out_dir/metrics.csv``.

    ``enabled=False`` (non-main ranks) makes every method a no-op.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: Optional[int] = None,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "kamim",
        run_name: Optional[str] = None,
        config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.csv_path = self.out_dir / "metrics.csv"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.jsonl_path) if resume_step is not None and r.get("step", 0) <= resume_step]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.jsonl_path)
        atomic_write_text(_csv_text(kept), self.csv_path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "run.tensorboard=true needs the 'tensorboard' package (pip install 'kamim[logging]')"
                ) from None
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=resume_step)
        if wandb:
            try:
                import wandb as _wandb
            except ImportError:
                raise ValueError("run.wandb=true needs the 'wandb' package (pip install 'kamim[logging]')") from None
            self._wandb = _wandb.init(
                project=wandb_project, name=run_name or self.out_dir.name, dir=str(self.out_dir),
                config=dict(config or {}), resume="allow",
            )

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (must hold ``step``)."""
        if not self.enabled:
            return
        row = {k: _json_value(v) for k, v in row.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a") as f:
            f.write(_csv_text([row], header=False))
        step = int(row["step"])
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"pretrain/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
