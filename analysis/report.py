"""Self-contained HTML report of an analysis run: every figure, every table and the settings used.

The report embeds each figure's PNG as base64 (it opens anywhere, even when moved alone) and links
the PNG/PDF files next to it by relative path. It states what is needed to reproduce the numbers:
models with their checkpoint source, format and sha256, the resolution each was evaluated at,
number of images, seed, analyses, and library versions.
"""
from __future__ import annotations

import base64
import html
import importlib.metadata
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

__all__ = ["library_versions", "summary_table", "render_report", "write_report"]

PathLike = Union[str, Path]
_LIBRARIES = ("kamim", "torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib",
              "seaborn", "opencv-python-headless", "pillow", "captum", "safetensors")

# Headline metrics of the summary table: (tidy metric name, column title).
SUMMARY_METRICS = (
    ("attention-distance", "attention distance (px)"),
    ("nmi", "NMI"),
    ("attention-entropy", "attention entropy (nats)"),
    ("head-similarity", "head similarity"),
    ("attention-shift-ratio", "attention shift ratio"),
    ("fourier-high-frequency", "Δ log amplitude (highest freq.)"),
    ("cka-same-layer", "CKA same layer"),
)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.table{max-width:100%;overflow-x:auto;margin:.5em 0}
table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;max-width:24em;overflow-wrap:anywhere}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.9em}.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.5em 1em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
"""


def library_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Installed versions of python and the libraries that produce the numbers."""
    versions = {"python": platform.python_version()}
    for name in (*_LIBRARIES, *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def summary_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """Per model and depth, the head-mean of the headline metrics (wide, one row per layer)."""
    frames = []
    for name, r in results.items():
        t = r.table
        for metric, title in SUMMARY_METRICS:
            rows = t[t["metric"] == metric]
            if rows.empty:
                continue
            mean_rows = rows[rows["head"] < 0]
            rows = mean_rows if not mean_rows.empty else rows
            s = rows.groupby("layer")["value"].mean().rename(title)
            frames.append(s.to_frame().assign(model=name).reset_index())
    if not frames:
        return pd.DataFrame(columns=["model", "layer"])
    long = pd.concat(frames, ignore_index=True)
    wide = long.groupby(["model", "layer"], sort=False).first().reset_index()
    order = {n: i for i, n in enumerate(results)}
    return wide.sort_values(["model", "layer"], key=lambda c: c.map(order) if c.name == "model"
                            else c).reset_index(drop=True)


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in items.items())
    return f"<table>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _df_html(df: pd.DataFrame, max_rows: int = 200) -> str:
    """A table that fits the page: long cells wrap, a wide table scrolls inside its own box."""
    if len(df) > max_rows:
        df = df.head(max_rows)
    table = df.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0, escape=True, na_rep="")
    return f'<div class="table">{table}</div>'


def layer_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """The report's table of the tidy metrics (:data:`analysis.results.TABLE_COLUMNS`): the per-layer
    scalars (mean over heads, no matrix entries), each value with its 95% interval as text; every
    row stays in ``metrics.csv``."""
    from analysis.uncertainty import level_text

    rows = metrics[(metrics["head"] < 0) & (metrics["column"] < 0)]
    interval = [f"{lo:.4g} – {hi:.4g}" if pd.notna(lo) and pd.notna(hi) else ""
                for lo, hi in zip(rows["ci_low"], rows["ci_high"])]
    return pd.DataFrame({"model": rows["model"], "metric": rows["metric"], "layer": rows["layer"],
                         "value": rows["value"], f"{level_text()} interval": interval,
                         "images": rows["n_images"]}).reset_index(drop=True)


def _figure_html(name: str, title: str, files: Sequence[Path], report_dir: Path,
                 caption: str, embed: bool) -> str:
    png = next((Path(f) for f in files if Path(f).suffix.lower() == ".png"), None)
    links = " · ".join(
        f'<a href="{html.escape(_rel(Path(f), report_dir))}">{Path(f).suffix.lstrip(".").upper()}</a>'
        for f in files)
    if png is None:
        img = ""
    elif embed:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        img = (f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}" '
               f'data-file="{html.escape(_rel(png, report_dir))}">')
    else:
        img = f'<img src="{html.escape(_rel(png, report_dir))}" alt="{html.escape(title)}">'
    lines = [html.escape(line) for line in caption.split("\n") if line.strip()]
    cap = "<br>".join([*lines, f"Files: {links}"])
    return (f'<section id="{html.escape(name)}"><h2>{html.escape(title)}</h2>'
            f"<figure>{img}<figcaption>{cap}</figcaption></figure></section>")


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # different drive on Windows
        return Path(path).as_posix()


def render_report(results: Mapping[str, Any], figures: Mapping[str, Sequence[PathLike]], *,
                  report_dir: PathLike, settings: Mapping[str, Any],
                  models: Mapping[str, Mapping[str, Any]],
                  tables: Optional[Mapping[str, pd.DataFrame]] = None,
                  titles: Optional[Mapping[str, str]] = None,
                  captions: Optional[Mapping[str, str]] = None,
                  notes: Sequence[str] = (), title: str = "Representation analysis",
                  embed_images: bool = True) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    report_dir = Path(report_dir)
    titles = dict(titles or {})
    captions = dict(captions or {})
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    toc = "".join(f'<li><a href="#{html.escape(k)}">{html.escape(titles.get(k, k))}</a></li>'
                  for k in figures)
    parts.append(f"<h2>Contents</h2><ul>{toc}<li><a href='#tables'>Tables</a></li>"
                 f"<li><a href='#settings'>Settings</a></li></ul>")

    model_rows = []
    for name, info in models.items():
        row = {"model": name, **{k: _fmt(v) for k, v in info.items()}}
        r = results.get(name)
        if r is not None:
            from analysis.plots import resolution_label

            row.setdefault("evaluated at", resolution_label(r.geometry))
            row.setdefault("images", int(r.images))
        model_rows.append(row)
    parts.append("<h2 id='models'>Models</h2>" + _df_html(pd.DataFrame(model_rows)))

    for key, files in figures.items():
        parts.append(_figure_html(key, titles.get(key, key), [Path(f) for f in files],
                                  report_dir, captions.get(key, ""), embed_images))

    parts.append("<h2 id='tables'>Tables</h2>")
    summary = summary_table(results)
    if not summary.empty:
        parts.append("<h3>Summary (mean over heads, per depth)</h3>" + _df_html(summary))
    for name, df in (tables or {}).items():
        parts.append(f"<h3>{html.escape(name)}</h3>" + _df_html(df))

    parts.append("<h2 id='settings'>Settings</h2>" + _kv_table(settings))
    parts.append("<h3>Library versions</h3>" + _kv_table(library_versions()))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: PathLike, results: Mapping[str, Any],
                 figures: Mapping[str, Sequence[PathLike]], *, settings: Mapping[str, Any],
                 models: Mapping[str, Mapping[str, Any]],
                 tables: Optional[Mapping[str, pd.DataFrame]] = None,
                 titles: Optional[Mapping[str, str]] = None,
                 captions: Optional[Mapping[str, str]] = None, notes: Sequence[str] = (),
                 title: str = "Representation analysis", embed_images: bool = True) -> Path:
    """Write ``report.html`` (atomically) showing every figure and table with the settings used.

    ``figures``: key -> files of that figure (PNG embedded, all linked relatively). ``models``:
    name -> facts to show (source, format, sha256, ...). ``settings``: run settings (seed, images,
    analyses, device, ...); library versions are added automatically.
    """
    from kamim.serialization import atomic_write_text

    path = Path(path)
    text = render_report(results, figures, report_dir=path.parent, settings=settings,
                         models=models, tables=tables, titles=titles, captions=captions,
                         notes=notes, title=title, embed_images=embed_images)
    return atomic_write_text(text, path)
