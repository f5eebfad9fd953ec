"""Publication-ready figures from the :class:`analysis.runner.AnalysisResult` of several models.

Every function takes ``results``: a mapping ``model name -> AnalysisResult`` (insertion order is the
legend order) and returns a :class:`matplotlib.figure.Figure`; with ``out=STEM`` it also writes
``STEM.pdf`` and ``STEM.png`` atomically (temp file in the same folder, then ``os.replace``).

Conventions shared by all figures:

* one colour and one marker per model across ALL figures: build one :class:`ModelPalette` for a
  set of models and pass it to every function (the default palette follows ``results`` order);
* depth on x runs from 1 to L (block outputs), 0 = patch embedding where it is shown;
* labels say the resolution each model was evaluated at (``SimMIM · 192 px, 12×12 × 16 px``),
  because pixel distances are only comparable between models evaluated at one geometry;
* attention distance and NMI carry a dashed line at the value of uniform attention
  (:func:`analysis.attention.uniform_attention_distance`, 99.75 px on a 12×12 grid of 16 px; NMI 0)
  so that collapsed attention is visible at a glance.

Figures are created with :class:`~matplotlib.figure.Figure` and the Agg canvas directly (no pyplot
global state, nothing to close, headless-safe); they still display in Jupyter.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from kamim.backbone import to_hw

__all__ = [
    "ModelStyle", "ModelPalette", "save_figure", "model_label", "resolution_label",
    "plot_layer_metric", "plot_attention_distance", "plot_nmi", "plot_attention_entropy",
    "plot_similarity_heatmaps", "plot_attention_similarity", "plot_cka", "plot_cross_model",
    "METHOD_COLOURS", "method_family", "result_family", "class_styles",
    "CROSS_FIGURES",
    "plot_fourier", "plot_tsne", "plot_pre_post", "plot_attention_maps", "plot_rollout",
    "plot_attribution", "plot_analysis", "FIGURE_FUNCTIONS", "FIGURE_TITLES", "query_pixel_box", "center_crop",
    "plot_keypoint_maps", "plot_keypoint_weights",
]

PathLike = Union[str, Path]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
_BASELINE_GID = "uniform-baseline"
_BAND_GID = "interval-band"  # the shaded 95% intervals over images
_DPI = 150


# ----------------------------------------------------------------------------------------------
# styles
@dataclass(frozen=True)
class ModelStyle:
    """How one model is drawn in every figure."""

    name: str
    color: tuple[float, float, float]
    marker: str
    linestyle: str = "-"

    def line_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Axes.plot``."""
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle}


#: pretraining method family -> its fixed colour (index into the colour-blind palette; None: grey)
METHOD_COLOURS: dict[str, Optional[int]] = {"SimMIM": 0, "KAMIM": 1, "MoCo v3": 2, "MAE": 4, "DINO": 5,
                                            "random": None}
_FAMILY = {"simmim": "SimMIM", "kamim": "KAMIM", "moco": "MoCo v3", "moco-v3": "MoCo v3", "mae": "MAE",
           "dino": "DINO", "random": "random", "timm-name": "random"}  # method or checkpoint format -> family


def method_family(method: Optional[str], fmt: Optional[str] = None) -> Optional[str]:
    """The method family a model is coloured by: its recorded pretraining method (``simmim``, ``kamim``,
    ``moco``, ``random``), else what its checkpoint format says (``moco-v3``, ``mae``, ``dino``, a
    ``timm-name`` random init); None when neither tells."""
    for key in (method, fmt):
        if isinstance(key, str) and key.lower() in _FAMILY:
            return _FAMILY[key.lower()]
    return None


def result_family(result: Any) -> Optional[str]:
    """:func:`method_family` of an analysis result, from its provenance (``kamim-analyze run`` records
    the checkpoint's method and format); None for a result without them."""
    provenance = getattr(result, "provenance", None) or {}
    return method_family(provenance.get("method"), provenance.get("format"))


class ModelPalette(Mapping[str, ModelStyle]):
    """Stable ``model name -> ModelStyle`` mapping (colour-blind safe seaborn palette + markers).

    A model's colour follows its method family (``families``: name -> :func:`method_family`; SimMIM
    blue, KAMIM orange, MoCo v3 green, MAE purple, DINO brown, random grey: :data:`METHOD_COLOURS`),
    and its marker and line style its name's rank among the models of that family; models of no
    known family take the remaining colours in order of name. Nothing depends on the order the names
    are given in, so the same model is drawn the same way whatever order ``--model`` flags list it.
    """

    def __init__(self, names: Iterable[str], palette: str = "colorblind",
                 families: Optional[Mapping[str, Optional[str]]] = None) -> None:
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("ModelPalette needs at least one model name")
        families = {n: (families or {}).get(n) for n in names}
        known = {n: f for n, f in families.items() if f in METHOD_COLOURS}
        reserved = set(METHOD_COLOURS.values()) - {None}  # a method's colour always means that method
        others = [n for n in names if n not in known]
        colors = sns.color_palette(palette, n_colors=max(10, len(others) + len(reserved)))
        free = [i for i in range(len(colors)) if i not in reserved and i % 10 != 7]  # 7: grey, random's
        groups: dict[Optional[str], list[str]] = {}
        for n in sorted(names):
            groups.setdefault(known.get(n), []).append(n)
        self._styles = {}
        for n in names:
            family = known.get(n)
            rank = groups[family].index(n)  # among the models of its family, or of no known family
            if family is None:
                color = colors[free[rank % len(free)]]
            else:
                index = METHOD_COLOURS[family]
                color = (0.5, 0.5, 0.5) if index is None else colors[index]
            self._styles[n] = ModelStyle(n, tuple(float(c) for c in color), _MARKERS[rank % len(_MARKERS)],
                                         "-" if rank < len(_MARKERS) else "--")

    def __getitem__(self, name: str) -> ModelStyle:
        try:
            return self._styles[name]
        except KeyError:
            raise KeyError(f"model {name!r} has no style in this palette; known: "
                           f"{', '.join(self._styles)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._styles)

    def __len__(self) -> int:
        return len(self._styles)


def _palette(results: Mapping[str, Any], palette: Optional[ModelPalette]) -> ModelPalette:
    if not results:
        raise ValueError("no results to plot: pass a mapping of model name -> AnalysisResult")
    palette = palette if palette is not None else ModelPalette(
        results, families={n: result_family(r) for n, r in results.items()})
    missing = [n for n in results if n not in palette]
    if missing:
        raise KeyError(f"models {missing} have no style in the palette; known: {list(palette)}")
    return palette


# ----------------------------------------------------------------------------------------------
# saving and labels
def save_figure(fig: Figure, out: PathLike, formats: Sequence[str] = ("pdf", "png"),
                dpi: int = _DPI) -> list[Path]:
    """Write ``fig`` to ``out.<fmt>`` for each format atomically; returns the written paths.

    ``out`` is a path stem; a suffix equal to one of ``formats`` is dropped.
    """
    from kamim.serialization import atomic_write

    out = Path(out)
    if out.suffix.lstrip(".").lower() in formats:
        out = out.with_suffix("")
    written = []
    for fmt in formats:
        path = out.with_name(f"{out.name}.{fmt}")
        # Fixed metadata -> byte-stable PDFs/PNGs for identical inputs.
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        written.append(path)
    return written


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, out: Optional[PathLike]) -> Figure:
    if out is not None:
        save_figure(fig, out)
    return fig


def resolution_label(geometry: Any) -> str:
    """``'192 px, 12×12 × 16 px'`` (image side(s), token grid and patch size) for a geometry."""
    h, w = to_hw(geometry.img_size)
    gh, gw = to_hw(geometry.grid)
    ph, pw = to_hw(geometry.patch_size)
    img = f"{h} px" if h == w else f"{h}×{w} px"
    patch = f"{ph} px" if ph == pw else f"{ph}×{pw} px"
    return f"{img}, {gh}×{gw} × {patch}"


def model_label(name: str, result: Any, sample: bool = False) -> str:
    """Legend label: model name and the resolution it was evaluated at; for a group of seeds
    (:mod:`analysis.seeds`), ``mean of n seeds``, or with ``sample`` (a figure of one model's samples:
    t-SNE points, maps of example images) which seed is drawn."""
    return f"{_sample_name(name, result) if sample else name} · {resolution_label(result.geometry)}" + (
        f" · mean of {len(_seed_names(result))} seeds" if _seed_names(result) and not sample else "")


def _seed_names(result: Any) -> list[str]:
    return list((getattr(result, "options", None) or {}).get("seeds") or [])


def _sample_name(name: str, result: Any) -> str:
    """``name``, or for a group of seeds the seed whose samples are drawn (the first)."""
    seeds = _seed_names(result)
    return f"{name} ({seeds[0]}, first of {len(seeds)} seeds)" if seeds else name


def _suptitle(fig: Figure, title: str, results: Mapping[str, Any], shown: Optional[int] = None) -> None:
    """``title`` with the number of images behind it: ``(N images)`` for statistics over the images,
    ``(K of N images)`` for a figure that shows ``shown`` of them."""
    n_images = "/".join(map(str, sorted({int(r.images) for r in results.values() if _is_int(r.images)})))
    if shown is not None:
        suffix = f" ({shown} of {n_images} images)" if n_images else f" ({shown} images)"
    else:
        suffix = f" ({n_images} images)" if n_images else ""
    fig.suptitle(title + suffix)


def _is_int(v: Any) -> bool:
    try:
        int(v)
        return True
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# per-layer metrics
def _metric_rows(result: Any, metric: str) -> pd.DataFrame:
    table = result.table
    rows = table[(table["metric"] == metric)]
    if rows.empty:
        raise ValueError(f"result has no metric {metric!r}; available: "
                         f"{sorted(table['metric'].unique())}")
    return rows


def _per_layer(rows: pd.DataFrame, first_layer: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per layer: the mean over heads ``value`` and its interval ``ci_low``/``ci_high``, per-head rows)
    from tidy rows of one metric (NaN intervals where the table has none)."""
    rows = rows[rows["layer"] >= first_layer]
    heads = rows[rows["head"] >= 0]
    mean_rows = rows[rows["head"] < 0]
    if mean_rows.empty:  # a table with per-head rows only: their mean, without an interval
        mean_rows = heads.groupby("layer", as_index=False)["value"].mean()
    mean = mean_rows.groupby("layer").agg(
        value=("value", "mean"), **{c: (c, "mean") for c in ("ci_low", "ci_high") if c in mean_rows})
    for c in ("ci_low", "ci_high"):
        if c not in mean:
            mean[c] = np.nan
    return mean.sort_index(), heads


def _band(ax: Any, x: Any, low: Any, high: Any, color: Any) -> bool:
    """Shade a 95% interval over images (nothing where there is none); whether anything was drawn."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    finite = np.isfinite(low) & np.isfinite(high)
    if not finite.any():
        return False
    ax.fill_between(np.asarray(x, dtype=float), np.where(finite, low, np.nan), np.where(finite, high, np.nan),
                    color=color, alpha=0.22, linewidth=0, zorder=1, gid=_BAND_GID)
    return True


def _legend(ax: Any, banded: bool, fontsize: str = "small", seeds: bool = False) -> None:
    """The axes' legend, with one more entry saying what the shaded bands are when there are any
    (``seeds``: some model is a mean over seeds, whose band is its interval across seeds)."""
    from matplotlib.patches import Patch

    from analysis.uncertainty import level_text

    handles, labels = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(facecolor="0.5", alpha=0.3, linewidth=0))
        labels.append(f"shaded: {level_text()} interval over images" + ("\n(across seeds for a mean of seeds)"
                                                                        if seeds else ""))
    ax.legend(handles, labels, fontsize=fontsize, frameon=False)


def _baseline_groups(results: Mapping[str, Any], fn: Any) -> dict[float, list[str]]:
    groups: dict[float, list[str]] = {}
    for name, r in results.items():
        groups.setdefault(round(float(fn(r.geometry)), 6), []).append(name)
    return groups


def plot_layer_metric(results: Mapping[str, Any], metric: str, *, ylabel: str, title: str,
                      baseline: Optional[Any] = None, baseline_label: str = "uniform attention",
                      baseline_unit: str = "", first_layer: int = 1, show_heads: bool = True,
                      palette: Optional[ModelPalette] = None, ax: Any = None,
                      out: Optional[PathLike] = None) -> Figure:
    """One line per model (mean over heads) vs depth with its 95% interval over images shaded,
    per-head values as faint markers.

    ``baseline``: a callable ``geometry -> value`` (or a number) drawn as a dashed horizontal line;
    models with different geometries get one dashed line each, in the model's colour. A model whose
    curve is indistinguishable from uniform attention (:mod:`analysis.baselines`) says so in its
    legend entry.
    """
    from analysis.baselines import near_uniform

    palette = _palette(results, palette)
    if ax is None:
        fig = _new_figure(6.0, 4.0)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    depth, banded = 0, False
    for name, r in results.items():
        style = palette[name]
        mean, heads = _per_layer(_metric_rows(r, metric), first_layer)
        if show_heads and not heads.empty:
            ax.scatter(heads["layer"], heads["value"], s=10, alpha=0.35, color=style.color,
                       marker=style.marker, linewidths=0)
        label = model_label(name, r)
        if baseline is not None and near_uniform(r, metric):
            label += "\n(indistinguishable from uniform)"
        ax.plot(mean.index, mean["value"], label=label, markersize=5, **style.line_kwargs())
        banded |= _band(ax, mean.index, mean["ci_low"], mean["ci_high"], style.color)
        depth = max(depth, int(r.geometry.depth))
    if baseline is not None:
        fn = baseline if callable(baseline) else (lambda _g, v=float(baseline): v)
        groups = _baseline_groups(results, fn)
        for value, names in groups.items():
            one = len(groups) == 1
            color = "0.35" if one else palette[names[0]].color
            where = "" if one else f" ({', '.join(names)})"
            text = f"{value:.4g}{(' ' + baseline_unit) if baseline_unit else ''}"
            ax.axhline(value, linestyle="--", linewidth=1.2, color=color, zorder=0,
                       gid=_BASELINE_GID, label=f"{baseline_label}{where}: {text}")
    ax.set_xlim(first_layer - 0.5, depth + 0.5)
    ax.set_xticks(range(first_layer, depth + 1))
    ax.set_xlabel("depth (block)" if first_layer >= 1 else "depth (0 = patch embedding)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, banded, seeds=any(_seed_names(r) for r in results.values()))
    return _finish(fig, out)


def plot_attention_distance(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
                            out: Optional[PathLike] = None) -> Figure:
    """Mean attention distance (px) per block; dashed line = uniform attention on each geometry."""
    from analysis.attention import uniform_attention_distance

    return plot_layer_metric(results, "attention-distance", ylabel="mean attention distance (px)",
                             title="Attention distance", baseline=uniform_attention_distance,
                             baseline_unit="px", palette=palette, out=out)


def plot_nmi(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
             out: Optional[PathLike] = None) -> Figure:
    """Normalised mutual information between query and key positions per block (uniform = 0)."""
    return plot_layer_metric(results, "nmi", ylabel="normalised mutual information",
                             title="Normalised mutual information of attention", baseline=0.0,
                             palette=palette, out=out)


def plot_attention_entropy(results: Mapping[str, Any], *,
                           palette: Optional[ModelPalette] = None,
                           out: Optional[PathLike] = None) -> Figure:
    """Attention entropy (nats) per block; dashed line = entropy of uniform attention, log(N)."""
    from analysis.attention import uniform_attention_entropy

    return plot_layer_metric(results, "attention-entropy", ylabel="attention entropy (nats)",
                             title="Attention entropy", baseline=uniform_attention_entropy,
                             baseline_unit="nats", palette=palette, out=out)


# ----------------------------------------------------------------------------------------------
# heatmaps
def _layer_ticks(n: int, depth: int) -> list[str]:
    # An (L+1) x (L+1) matrix includes the patch embedding as layer 0.
    start = 0 if n == depth + 1 else 1
    return [str(i) for i in range(start, start + n)]


def plot_similarity_heatmaps(matrices: Mapping[str, np.ndarray], *,
                             depths: Mapping[str, Union[int, tuple[int, int]]],
                             titles: Mapping[str, str], cbar_label: str, title: str,
                             vmin: Optional[float] = None, vmax: Optional[float] = None,
                             cmap: str = "magma",
                             axis_labels: Optional[Mapping[str, tuple[str, str]]] = None,
                             markers: Optional[Mapping[str, Sequence[tuple[int, int]]]] = None,
                             out: Optional[PathLike] = None) -> Figure:
    """One heatmap panel per matrix (at most four a row) with a single shared colour scale and colourbar.

    ``depths[key]``: the model depth L (or ``(L_rows, L_columns)``), so that an (L+1)-sized axis
    is labelled from 0 (patch embedding). ``axis_labels[key]``: (x label, y label).
    ``markers[key]``: (row, column) cells outlined in that panel.
    """
    if not matrices:
        raise ValueError("no matrices to plot")
    mats = {k: np.asarray(v, dtype=np.float64) for k, v in matrices.items()}
    finite = np.concatenate([m[np.isfinite(m)].ravel() for m in mats.values()] + [np.zeros(0)])
    vmin = float(finite.min()) if vmin is None and finite.size else (vmin if vmin is not None else 0.0)
    vmax = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-12
    n = len(mats)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = _new_figure(3.4 * cols + 0.8, 3.6 * rows)
    grid = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in grid[n:]:
        ax.set_visible(False)
    axes = grid[:n]
    for ax, (name, m) in zip(axes, mats.items()):
        d = depths[name]
        d_rows, d_cols = (d, d) if isinstance(d, (int, np.integer)) else d
        sns.heatmap(m, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, cbar=False,
                    xticklabels=_layer_ticks(m.shape[1], int(d_cols)),
                    yticklabels=_layer_ticks(m.shape[0], int(d_rows)))
        ax.set_title(titles[name], fontsize="small")
        for r, c in (markers or {}).get(name, ()):
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="#00e5ff", linewidth=1.4))
        xlabel, ylabel = (axis_labels or {}).get(name, ("depth (block)", "depth (block)"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.tick_params(labelsize="x-small")
    mappable = axes[0].collections[0]
    fig.colorbar(mappable, ax=list(axes), label=cbar_label, shrink=0.85)
    fig.suptitle(title)
    return _finish(fig, out)


def _array(result: Any, key: str) -> Any:
    arrays = result.arrays
    if key not in arrays:
        raise ValueError(f"result has no array {key!r}; available: {sorted(arrays)}")
    v = arrays[key]
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v


def _matrix_scale(results: Mapping[str, Any]) -> tuple[Optional[float], Optional[float]]:
    """The colour range of similarity matrices: [0, 1] for every model and figure (option
    ``matrix_scale=shared``, the default: CKA, 1 − JSD and the cosine of attention rows all lie in
    it, so equal colours mean equal values everywhere), or the figure's own data range
    (``matrix_scale=figure``, for differences too small to see on the shared scale)."""
    scales = {str(getattr(r, "options", {}).get("matrix_scale", "shared")) for r in results.values()}
    return (None, None) if scales == {"figure"} else (0.0, 1.0)


def plot_attention_similarity(results: Mapping[str, Any], *, out: Optional[PathLike] = None,
                              palette: Optional[ModelPalette] = None) -> Figure:
    """Layer x layer self-attention similarity per model, one colour scale for all models
    (:func:`_matrix_scale`)."""
    _palette(results, palette)
    mats = {n: _array(r, "attention_similarity") for n, r in results.items()}
    vmin, vmax = _matrix_scale(results)
    kinds = {str(getattr(r, "options", {}).get("similarity_kind", "")) for r in results.values()}
    label = {"jsd": "1 − Jensen–Shannon divergence (bits)", "cosine": "cosine similarity"}.get(
        kinds.pop(), "attention similarity") if len(kinds) == 1 else "attention similarity"
    return plot_similarity_heatmaps(
        mats, depths={n: r.geometry.depth for n, r in results.items()},
        titles={n: model_label(n, r) for n, r in results.items()}, cbar_label=label,
        title="Self-attention similarity across layers", cmap="viridis", vmin=vmin, vmax=vmax, out=out)


def plot_cka(results: Mapping[str, Any], *, out: Optional[PathLike] = None,
             palette: Optional[ModelPalette] = None) -> Figure:
    """Layer x layer linear CKA within each model (one colour scale: :func:`_matrix_scale`)."""
    _palette(results, palette)
    mats = {n: _array(r, "cka") for n, r in results.items()}
    vmin, vmax = _matrix_scale(results)
    return plot_similarity_heatmaps(
        mats, depths={n: r.geometry.depth for n, r in results.items()},
        titles={n: model_label(n, r) for n, r in results.items()}, cbar_label="linear CKA",
        title="Representation similarity (CKA) across layers", vmin=vmin, vmax=vmax, out=out)


#: cross-model figure key -> (array of :func:`analysis.crossmodel.compare_models`, colour-bar label, title)
CROSS_FIGURES: dict[str, tuple[str, str, str]] = {
    "cross-cka": ("cka", "linear CKA", "Cross-model CKA (same images)"),
    "cross-mutual-knn": ("mutual_knn", "mutual k-NN alignment", "Cross-model mutual k-NN alignment (same images)"),
    "cross-cknna": ("cknna", "CKNNA", "Cross-model CKNNA (same images)"),
}


def _cross_heatmaps(matrices: Mapping[tuple[str, str], np.ndarray], depths: Mapping[str, int], *, cbar_label: str,
                    title: str, markers: Optional[Mapping[tuple[str, str], Sequence[tuple[int, int]]]] = None,
                    out: Optional[PathLike] = None) -> Figure:
    keys = {(a, b): f"{a} vs {b}" for a, b in matrices}
    return plot_similarity_heatmaps(
        {keys[p]: m for p, m in matrices.items()},
        depths={k: (depths[a], depths[b]) for (a, b), k in keys.items()},
        titles={k: f"{a} (rows) vs {b} (columns)" for (a, b), k in keys.items()},
        axis_labels={k: (f"{b}: depth (block)", f"{a}: depth (block)")
                     for (a, b), k in keys.items()},
        markers={keys[p]: m for p, m in (markers or {}).items()},
        cbar_label=cbar_label, title=title, vmin=0.0, vmax=1.0, out=out)


def plot_cross_model(cross: Mapping[tuple[str, str], Any], depths: Mapping[str, int], key: str, *,
                     out: Optional[PathLike] = None) -> Figure:
    """One cross-model figure (``key`` of :data:`CROSS_FIGURES`) of the results of
    :func:`analysis.crossmodel.compare_models`, one panel per pair on the shared [0, 1] scale; the
    mutual k-NN panels outline each row's best-aligned column."""
    array, label, title = CROSS_FIGURES[key]
    options = [r.options for r in cross.values()]
    if key == "cross-cka":
        label = f"{label} ({', '.join(sorted({str(o.get('cka', 'debiased')) for o in options}))})"
    else:
        label = f"{label} (k = {', '.join(sorted({str(o.get('k')) for o in options}))})"
    markers = None
    if key == "cross-mutual-knn":
        markers = {pair: [(i, int(b) - 1) for i, b in enumerate(np.asarray(r.arrays["best_layer"]))]
                   for pair, r in cross.items()}
    return _cross_heatmaps({pair: np.asarray(r.arrays[array]) for pair, r in cross.items()}, depths,
                           cbar_label=label, title=title, markers=markers, out=out)


# ----------------------------------------------------------------------------------------------
# Fourier
def _pi(f: float) -> str:
    """A frequency in units of π as a label: ``0``, ``π``, ``5π/6``, ``0.5π`` -> ``π/2``."""
    from fractions import Fraction

    q = Fraction(f).limit_denominator(64)
    if q == 0:
        return "0"
    num = "π" if q.numerator == 1 else f"{q.numerator}π"
    return num if q.denominator == 1 else f"{num}/{q.denominator}"


def plot_fourier(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
                 out: Optional[PathLike] = None) -> Figure:
    """Δ log amplitude vs frequency per depth (one panel per model) + high-frequency value per depth.

    Left panels: one curve per depth (0 = patch embedding ... L), coloured by depth. Right panel:
    the value at the highest frequency on the half diagonal per depth, one line per model in its
    colour. That frequency is the grid's own highest, the last of
    :func:`analysis.fourier.fourier_frequencies` (5π/6 on a 12×12 grid, not π); the axes end there
    and the labels say which it is.
    """
    palette = _palette(results, palette)
    n = len(results)
    fig = _new_figure(3.2 * n + 4.2, 3.4)
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    cmap = colormaps["plasma"]
    max_depth = max(int(r.geometry.depth) for r in results.values())
    norm = Normalize(0, max_depth)
    hf_ax = axes[-1]
    highest, banded = {}, False
    for ax, (name, r) in zip(axes[:-1], results.items()):
        amp = np.asarray(_array(r, "fourier"), dtype=np.float64)
        freqs = np.asarray(_array(r, "fourier_freqs"), dtype=np.float64)  # units of pi
        highest[name] = float(freqs[-1])
        for d, curve in enumerate(amp):
            ax.plot(freqs, curve, color=cmap(norm(d)), linewidth=1.2)
        ax.set_xlim(0, freqs[-1])
        ticks = [0.0, 0.5, float(freqs[-1])] if freqs[-1] > 0.6 else [0.0, float(freqs[-1])]
        ax.set_xticks(ticks, [_pi(t) for t in ticks])
        ax.set_xlabel("frequency")
        ax.set_ylabel("Δ log amplitude")
        ax.set_title(model_label(name, r), fontsize="small")
        ax.grid(alpha=0.3)
        style = palette[name]
        hf_ax.plot(np.arange(amp.shape[0]), amp[:, -1], label=model_label(name, r),
                   markersize=5, **style.line_kwargs())
        hf = r.table[r.table["metric"] == "fourier-high-frequency"].sort_values("layer")
        if len(hf) == amp.shape[0] and "ci_low" in hf:  # its interval (over seeds for a mean of seeds)
            banded |= _band(hf_ax, hf["layer"], hf["ci_low"], hf["ci_high"], style.color)
    # below the spectra: to their right, its label would collide with the last panel's y label
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[:-1]), location="bottom",
                 label="depth (0 = patch embedding)", shrink=0.5, aspect=40)
    hf_ax.set_xlabel("depth (0 = patch embedding)")
    hf_ax.set_xticks(range(0, max_depth + 1))
    shared = set(highest.values())
    at = _pi(shared.pop()) if len(shared) == 1 else "each grid's highest"
    hf_ax.set_ylabel(f"Δ log amplitude at frequency {at}")
    hf_ax.set_title(f"Highest frequency ({at})", fontsize="small")
    hf_ax.grid(alpha=0.3)
    _legend(hf_ax, banded, "x-small", seeds=any(_seed_names(r) for r in results.values()))
    _suptitle(fig, "Fourier analysis of feature maps", results)
    return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# tokens
def plot_tsne(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
              class_names: Optional[Sequence[str]] = None,
              out: Optional[PathLike] = None) -> Figure:
    """t-SNE of patch tokens, one panel per model, points coloured by class (or image)."""
    _palette(results, palette)
    n = len(results)
    fig = _new_figure(3.6 * n + 1.2, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    handles: dict[Any, Any] = {}
    every = sorted({lab for r in results.values()
                    for lab in np.unique(np.asarray(r.arrays.get("tsne_labels", [0]))).tolist()})
    styles = class_styles(every)  # the same class looks the same in every panel
    for ax, (name, r) in zip(axes, results.items()):
        xy = np.asarray(_array(r, "tsne_xy"), dtype=np.float64)
        labels = np.asarray(r.arrays.get("tsne_labels", np.zeros(len(xy), dtype=int)))
        for lab in sorted(np.unique(labels).tolist()):
            sel = labels == lab
            text = _class_text(lab, class_names, r)
            color, marker = styles[lab]
            h = ax.scatter(xy[sel, 0], xy[sel, 1], s=9 if marker == "o" else 11, alpha=0.8, color=color,
                           marker=marker, label=text, linewidths=0, rasterized=True)
            handles.setdefault(text, h)
        ax.set_title(model_label(name, r, sample=True), fontsize="small")
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
    if 1 < len(handles) <= 20:
        fig.legend(list(handles.values()), list(handles), loc="outside right center",
                   fontsize="x-small", frameon=False, markerscale=2)
    source = next(iter(results.values())).arrays.get("tsne_label_kind", "class")
    _suptitle(fig, f"t-SNE of last-layer patch tokens (coloured by {source})", results)
    return _finish(fig, out)


_CLASS_MARKERS = ("o", "^", "s", "D")


def class_styles(labels: Sequence[Any]) -> dict[Any, tuple[tuple[float, float, float], str]]:
    """A (colour, marker) per class, distinguishable for up to 40 classes: the ten colour-blind-safe
    colours with a circle, then again with a triangle, a square and a diamond (more classes repeat)."""
    colors = sns.color_palette("colorblind", 10)
    return {lab: (tuple(colors[i % 10]), _CLASS_MARKERS[(i // 10) % len(_CLASS_MARKERS)])
            for i, lab in enumerate(labels)}


def _target_text(target: Any, index: int, result: Any, by_label: bool) -> str:
    """The title of an attribution panel: the attributed class, and the true one where they differ."""
    name = _class_text(target, None, result)
    if by_label:
        return f"label {name}"
    labels = result.arrays.get("labels")
    if labels is None or index >= len(labels) or int(labels[index]) < 0 or int(labels[index]) == int(target):
        return f"predicted {name}"
    return f"predicted {name} (label {_class_text(labels[index], None, result)})"


def _class_text(label: Any, class_names: Optional[Sequence[str]], result: Any) -> str:
    names = class_names if class_names is not None else result.arrays.get("class_names")
    try:
        if names is not None and 0 <= int(label) < len(names):
            return str(names[int(label)])
    except (TypeError, ValueError):
        pass
    return str(label)


# ----------------------------------------------------------------------------------------------
# pre/post attention
def plot_pre_post(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
                  out: Optional[PathLike] = None) -> Figure:
    """PCA of a block's pre-attention tokens (``norm1(x)``) vs its attention output, per model.

    Left: one row per model, tokens coloured by image with per-image centroids (large markers);
    right: the attention-shift ratio ``mean ||attn(norm1 x)|| / ||norm1 x||`` per depth.
    """
    palette = _palette(results, palette)
    n = len(results)
    fig = _new_figure(9.5, 2.9 * n + 0.6)
    left, right = fig.subfigures(1, 2, width_ratios=[2.0, 1.1])
    axes = left.subplots(n, 2, squeeze=False)
    for row, (name, r) in zip(axes, results.items()):
        pp = _array(r, "pre_post")
        image = np.asarray(pp["image"])
        uniq = np.unique(image)
        colors = sns.color_palette("husl", n_colors=max(len(uniq), 1))
        layer = int(np.asarray(pp.get("layer", r.geometry.depth)))
        joint = str(np.asarray(pp.get("mode", "separate"))) == "joint"
        if joint:  # one PCA fitted on both token sets: the same axes, so the shift between them shows
            row[1].sharex(row[0])
            row[1].sharey(row[0])
        for ax, kind, what in ((row[0], "pre", "block input (norm1)"),
                               (row[1], "post", "attention output" + (", joint PCA" if joint else ""))):
            xy = np.asarray(pp[f"{kind}_xy"], dtype=np.float64)
            cent = np.asarray(pp[f"{kind}_centroids"], dtype=np.float64)
            evr = np.asarray(pp.get(f"{kind}_explained_variance_ratio", [np.nan, np.nan]))
            for i, img in enumerate(uniq):
                sel = image == img
                ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.5, color=colors[i], linewidths=0,
                           rasterized=True)
            ax.scatter(cent[:, 0], cent[:, 1], s=60, c=[colors[i % len(colors)]
                       for i in range(len(cent))], marker=palette[name].marker,
                       edgecolors="black", linewidths=0.8, zorder=3)
            ax.set_title(f"{model_label(name, r, sample=True)}\nblock {layer}: {what}", fontsize="x-small")
            ax.set_xlabel(f"PC 1 ({100 * evr[0]:.0f}% var.)")
            ax.set_ylabel(f"PC 2 ({100 * evr[1]:.0f}% var.)")
            ax.tick_params(labelsize="x-small")
    modes = {str(np.asarray(_array(r, "pre_post").get("mode", "separate"))) for r in results.values()}
    how = {"separate": "a PCA per token set", "joint": "one PCA fitted on both token sets"}
    left.suptitle(f"Pre- vs post-attention tokens ({' / '.join(how[m] for m in sorted(modes))}; colour = image, "
                  "large = image centroid)", fontsize="medium")
    ax = right.subplots()
    if all((r.table["metric"] == "attention-shift-ratio").any() for r in results.values()):
        plot_layer_metric(results, "attention-shift-ratio",
                          ylabel="‖attn(norm1 x)‖ / ‖norm1 x‖ (mean over tokens)",
                          title="Attention shift per block", show_heads=False, palette=palette,
                          ax=ax)
    else:
        ax.set_axis_off()
    return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# spatial maps over images
def _display_images(inputs: Any) -> np.ndarray:
    """(M, C, H, W) ImageNet-normalised inputs -> (M, H, W, 3) floats in [0, 1] for imshow."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"inputs must be (M, C, H, W), got shape {x.shape}")
    mean = np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32).reshape(1, -1, 1, 1)
    x = np.clip(x * std + mean, 0.0, 1.0)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return x.transpose(0, 2, 3, 1)


def _overlay(ax: Any, image: np.ndarray, heat: Optional[np.ndarray], *, cmap: str = "inferno",
             alpha: float = 0.6, vmin: Optional[float] = None, vmax: Optional[float] = None,
             interpolation: str = "nearest") -> Any:
    """Show ``image`` (H, W, 3) with ``heat`` (any resolution) stretched over it in pixel units."""
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="bilinear")
    im = None
    if heat is not None:
        im = ax.imshow(heat, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                       interpolation=interpolation)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _gray(image: np.ndarray) -> np.ndarray:
    """Grey version of an (H, W, 3) image so that colour maps over it stay readable."""
    return np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)


def query_pixel_box(query: Sequence[int], patch_size: Any) -> tuple[float, float, float, float]:
    """Pixel rectangle ``(x0, y0, width, height)`` of the query patch at grid ``(row, col)``."""
    ph, pw = to_hw(patch_size)
    r, c = int(query[0]), int(query[1])
    return float(c * pw), float(r * ph), float(pw), float(ph)


def _mark_query(ax: Any, query: Sequence[int], patch_size: Any, color: Any) -> None:
    x0, y0, pw, ph = query_pixel_box(query, patch_size)
    ax.add_patch(Rectangle((x0, y0), pw, ph, fill=False, edgecolor=color, linewidth=1.5,
                           gid="query-patch"))
    ax.plot([x0 + pw / 2], [y0 + ph / 2], marker="x", color=color, markersize=5,
            markeredgewidth=1.5, gid="query-centre")


def _pick_layers(depth: int, layers: Optional[Sequence[int]], max_columns: int) -> list[int]:
    if layers is not None:
        bad = [l for l in layers if not 1 <= int(l) <= depth]
        if bad:
            raise ValueError(f"layers {bad} are outside 1..{depth}")
        return [int(l) for l in layers]
    if depth <= max_columns:
        return list(range(1, depth + 1))
    return sorted({int(round(v)) for v in np.linspace(1, depth, max_columns)})


def plot_attention_maps(results: Mapping[str, Any], *, image: int = 0,
                        layers: Optional[Mapping[str, Sequence[int]]] = None, max_columns: int = 6,
                        palette: Optional[ModelPalette] = None,
                        out: Optional[PathLike] = None) -> Figure:
    """Attention of each query patch (mean over heads) over the image, per model and depth.

    One row per (model, query); the first column shows the input with the query patch outlined at
    its true pixel position, then one column per depth (all blocks up to ``max_columns``, else
    evenly spaced; or ``layers[model]``). Each map is the query's attention row over the patch grid
    (prefix tokens removed, renormalised), stretched over the image in pixel units.
    """
    palette = _palette(results, palette)
    rows = []
    for name, r in results.items():
        maps = np.asarray(_array(r, "attention_maps"), dtype=np.float64)  # (M, L, heads, Q, h, w)
        if maps.ndim != 6:
            raise ValueError(f"{name}: attention_maps must be (M, L, heads, Q, h, w), got {maps.shape}")
        if not 0 <= image < maps.shape[0]:
            raise ValueError(f"image index {image} outside the {maps.shape[0]} kept images of {name}")
        queries = np.asarray(_array(r, "attention_map_queries")).reshape(-1, 2)
        chosen = _pick_layers(maps.shape[1], (layers or {}).get(name), max_columns)
        img = _display_images(_array(r, "inputs")[image:image + 1])[0]
        for qi, q in enumerate(queries):
            rows.append((name, r, img, q, [maps[image, l - 1, :, qi].mean(0) for l in chosen],
                         chosen))
    ncols = 1 + max(len(row[5]) for row in rows)
    fig = _new_figure(1.7 * ncols + 1.2, 1.8 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax_row, (name, r, img, q, maps_l, chosen) in zip(axes, rows):
        color = palette[name].color
        _overlay(ax_row[0], img, None)
        _mark_query(ax_row[0], q, r.geometry.patch_size, "cyan")
        ax_row[0].set_ylabel(f"{_sample_name(name, r)}\nquery ({int(q[0])}, {int(q[1])})\n"
                             f"{resolution_label(r.geometry).split(',')[0]}", fontsize="x-small",
                             color=color)
        # Scale: attention x number of patches (1 = uniform attention), shared along the row.
        scaled = [m * m.size for m in maps_l]
        vmax = max(float(m.max()) for m in scaled)
        im = None
        for ax, m, l in zip(ax_row[1:], scaled, chosen):
            im = _overlay(ax, _gray(img), m, vmin=0.0, vmax=max(vmax, 1.0 + 1e-6), alpha=0.7)
            _mark_query(ax, q, r.geometry.patch_size, "cyan")
            ax.set_title(f"block {l}", fontsize="x-small")
        for ax in ax_row[1 + len(chosen):]:
            ax.set_axis_off()
        if im is not None:
            cb = fig.colorbar(im, ax=list(ax_row), shrink=0.8, pad=0.01)
            cb.ax.tick_params(labelsize="xx-small")
    fig.supxlabel("colour: attention × number of patches (1 = uniform attention)", fontsize="x-small")
    _suptitle(fig, "Attention maps of query patches (mean over heads; box = query patch)", results, shown=1)
    return _finish(fig, out)


def plot_rollout(results: Mapping[str, Any], *, max_images: int = 4,
                 palette: Optional[ModelPalette] = None,
                 out: Optional[PathLike] = None) -> Figure:
    """Attention rollout (Abnar & Zuidema) over the first images, one row per model.

    The last column is the rollout averaged over every analysed image.
    """
    palette = _palette(results, palette)
    n_img = min(max_images, min(np.asarray(_array(r, "rollout")).shape[0]
                                for r in results.values()))
    ncols = n_img + 1
    fig = _new_figure(1.9 * ncols + 0.8, 2.0 * len(results) + 0.6)
    axes = fig.subplots(len(results), ncols, squeeze=False)
    im = None
    # one colour scale for the whole figure: relevance x number of patches (1 = uniform)
    vmax = max(max(float((np.asarray(_array(r, "rollout"))[:n_img] * np.asarray(
        _array(r, "rollout"))[0].size).max()) for r in results.values()), 1.0 + 1e-6)
    for ax_row, (name, r) in zip(axes, results.items()):
        maps = np.asarray(_array(r, "rollout"), dtype=np.float64)
        imgs = _display_images(_array(r, "inputs")[:n_img])
        for j in range(n_img):
            im = _overlay(ax_row[j], _gray(imgs[j]), maps[j] * maps[j].size, vmin=0.0,
                          vmax=vmax, alpha=0.7)
        mean = np.asarray(r.arrays.get("rollout_mean", maps.mean(0)), dtype=np.float64)
        gh, gw = mean.shape
        ax_row[-1].imshow(mean * mean.size, cmap="inferno", vmin=0.0, vmax=vmax,
                          extent=(0, r.geometry.img_size[1], r.geometry.img_size[0], 0))
        ax_row[-1].set_xticks([])
        ax_row[-1].set_yticks([])
        ax_row[-1].set_title(f"mean over {r.images} images", fontsize="x-small")
        ax_row[0].set_ylabel(model_label(name, r, sample=True).replace(" · ", "\n"), fontsize="x-small",
                             color=palette[name].color)
    if im is not None:
        fig.colorbar(im, ax=list(axes.ravel()), shrink=0.7,
                     label="relevance × number of patches (1 = uniform)")
    _suptitle(fig, "Attention rollout (class-token relevance of each patch)", results, shown=n_img)
    return _finish(fig, out)


def plot_attribution(results: Mapping[str, Any], *, max_images: int = 4,
                     palette: Optional[ModelPalette] = None,
                     out: Optional[PathLike] = None) -> Figure:
    """captum attributions (one row per model and method) over the first images.

    Maps are shown with a symmetric diverging colour scale per row (red = supports the target).
    """
    palette = _palette(results, palette)
    rows = []
    for name, r in results.items():
        attr = _array(r, "attribution")
        target = np.asarray(attr.get("target", []))
        for method, maps in attr.items():
            if method == "target":
                continue
            rows.append((name, r, method, np.asarray(maps, dtype=np.float64), target))
    # what is attributed: the class the classifier predicts (a linear probe fitted on the data for an
    # encoder without a head) or the true label; a prediction that differs from the label says both
    by_label = all(r.options.get("attribution_target", "prediction") == "label" for r in results.values())
    if not rows:
        raise ValueError("no attribution maps in the results")
    n_img = min(max_images, min(row[3].shape[0] for row in rows))
    fig = _new_figure(1.9 * n_img + 1.0, 2.0 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), n_img, squeeze=False)
    for ax_row, (name, r, method, maps, target) in zip(axes, rows):
        imgs = _display_images(_array(r, "inputs")[:n_img])
        lim = float(np.abs(maps[:n_img]).max()) or 1.0
        im = None
        for j in range(n_img):
            im = _overlay(ax_row[j], _gray(imgs[j]), maps[j], cmap="RdBu_r", alpha=0.7, vmin=-lim, vmax=lim,
                          interpolation="bilinear")
            if j < len(target):
                ax_row[j].set_title(_target_text(target[j], j, r, by_label), fontsize="x-small")
        ax_row[0].set_ylabel(f"{_sample_name(name, r)}\n{resolution_label(r.geometry).split(',')[0]}\n{method}",
                             fontsize="x-small", color=palette[name].color)
        fig.colorbar(im, ax=list(ax_row), shrink=0.8, label="attribution")
    what = "of the true class" if by_label else "of the predicted class"
    _suptitle(fig, f"Input attributions {what} (captum)", results, shown=n_img)
    return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# keypoints and KAMIM weights
def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Square centre crop of an (H, W[, 3]) uint8 image resized to ``size`` px (OpenCV, area).

    A deterministic stand-in for the training crop, so figures of keypoint maps are reproducible.
    """
    import cv2

    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) or (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[y:y + side, x:x + side])
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def plot_keypoint_maps(image: np.ndarray, *, detectors: Optional[Sequence[str]] = None,
                       renders: Optional[Sequence[str]] = None, size: int = 192,
                       out: Optional[PathLike] = None) -> Figure:
    """Keypoints of each detector on a ``size`` px centre crop, and their binary maps per rendering.

    One row per detector: the crop with keypoint centres, then the map of each rendering
    (``ring`` = the KAMIM reference's ``cv2.drawKeypoints`` circles); titles give the fraction of
    pixels marked (what the reference calls keypoint density).
    """
    from kamim.keypoints import DETECTORS, RENDERS, detect_keypoints, keypoint_map

    detectors = tuple(detectors or DETECTORS)
    renders = tuple(renders or RENDERS)
    crop = center_crop(image, size)
    fig = _new_figure(2.0 * (1 + len(renders)) + 0.4, 2.1 * len(detectors) + 0.5)
    axes = fig.subplots(len(detectors), 1 + len(renders), squeeze=False)
    for row, det in zip(axes, detectors):
        kps = detect_keypoints(crop, det)
        pts = np.array([k.pt for k in kps]).reshape(-1, 2)
        _overlay(row[0], crop.astype(np.float32) / 255.0, None)
        row[0].scatter(pts[:, 0], pts[:, 1], s=3, color="red", linewidths=0)
        row[0].set_title(f"{det}: {len(kps)} keypoints", fontsize="x-small")
        row[0].set_ylabel(det, fontsize="small")
        for ax, render in zip(row[1:], renders):
            m = keypoint_map(crop, det, render)
            ax.imshow(m, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
                      extent=(0, size, size, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{render}: {100 * float(m.mean()):.1f}% of pixels", fontsize="x-small")
    fig.suptitle(f"Keypoint maps on a {size} px crop (OpenCV default detectors)")
    return _finish(fig, out)


def plot_keypoint_weights(image: np.ndarray, *, detector: str = "fast", render: str = "ring",
                          patch_sizes: Sequence[int] = (8, 16, 32),
                          temperatures: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.5),
                          size: int = 192, out: Optional[PathLike] = None) -> Figure:
    """Per-patch keypoint density and KAMIM weights for each weight patch size ``w_ps`` and ``T``.

    Rows: ``w_ps``; columns: the density (fraction of marked pixels per patch), then the weight
    ``exp(density / T) / min`` for each temperature on one logarithmic colour scale (the paper's
    sweep grid by default). Titles give the largest weight, i.e. how much more the most
    keypoint-dense patch counts in the loss than a patch without keypoints.
    """
    from matplotlib.colors import LogNorm

    from kamim.keypoints import keypoint_map
    from kamim.weights import patch_density, weights_from_density

    crop = center_crop(image, size)
    kmap = keypoint_map(crop, detector, render)
    dens = {ps: patch_density(kmap[None], int(ps)) for ps in patch_sizes}
    weights = {(ps, t): weights_from_density(d, float(t))[0].numpy()
               for ps, d in dens.items() for t in temperatures}
    wmax = max(float(w.max()) for w in weights.values())
    norm = LogNorm(vmin=1.0, vmax=max(wmax, 1.0 + 1e-6))
    ncols = 2 + len(temperatures)
    fig = _new_figure(1.9 * ncols + 0.8, 2.0 * len(patch_sizes) + 0.6)
    axes = fig.subplots(len(patch_sizes), ncols, squeeze=False)
    dens_im = w_im = None
    for row, ps in zip(axes, patch_sizes):
        _overlay(row[0], crop.astype(np.float32) / 255.0, kmap, cmap="Reds", alpha=0.5)
        row[0].set_title(f"{detector}/{render} map", fontsize="x-small")
        row[0].set_ylabel(f"w_ps = {ps} px", fontsize="small")
        d = dens[ps][0].numpy()
        dens_im = row[1].imshow(d, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                                extent=(0, size, size, 0))
        row[1].set_title(f"density (max {d.max():.2f})", fontsize="x-small")
        for ax, t in zip(row[2:], temperatures):
            w = weights[(ps, t)]
            w_im = ax.imshow(w, cmap="magma", norm=norm, interpolation="nearest",
                             extent=(0, size, size, 0))
            ax.set_title(f"T = {t}: max {w.max():.3g}", fontsize="x-small")
        for ax in row[1:]:
            ax.set_xticks([])
            ax.set_yticks([])
    if dens_im is not None:
        fig.colorbar(dens_im, ax=list(axes[:, 1]), shrink=0.6, label="keypoint density")
    if w_im is not None:
        fig.colorbar(w_im, ax=list(axes[:, 2:].ravel()), shrink=0.6,
                     label="KAMIM weight (log scale, 1 = no keypoints)")
    fig.suptitle(f"KAMIM patch weights exp(density / T), normalised to min 1 ({size} px crop)")
    return _finish(fig, out)


# ----------------------------------------------------------------------------------------------
# dispatch: thin views over analysis.registry (each analysis carries its figure and title)
class _RegistryView(Mapping[str, Any]):
    """Read-only ``analysis name -> attribute`` view of the registered analyses (plugins included)."""

    def __init__(self, attribute: str, extra: Optional[Mapping[str, Any]] = None) -> None:
        self._attribute, self._extra = attribute, dict(extra or {})

    def _items(self) -> dict[str, Any]:
        from analysis import registry

        items = {n: getattr(registry.get(n), self._attribute) for n in registry.names()}
        return {**{n: v for n, v in items.items() if v is not None}, **self._extra}

    def __getitem__(self, name: str) -> Any:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


def _figure_only_titles() -> dict[str, str]:
    from analysis.builtin import FIGURE_ONLY_TITLES

    return FIGURE_ONLY_TITLES


#: analysis name -> figure function (a view over :mod:`analysis.registry`).
FIGURE_FUNCTIONS: Mapping[str, Any] = _RegistryView("plot")
#: analysis or figure name -> title (a view over :mod:`analysis.registry`, plus cross-model figures).
FIGURE_TITLES: Mapping[str, str] = _RegistryView("title", _figure_only_titles())


def plot_analysis(name: str, results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
                  out: Optional[PathLike] = None, **kwargs: Any) -> Figure:
    """The figure of registered analysis ``name`` (:attr:`analysis.registry.Analysis.plot`)."""
    from analysis import registry

    if name not in registry.names() or registry.get(name).plot is None:
        raise ValueError(f"no figure for analysis {name!r}; expected one of {', '.join(FIGURE_FUNCTIONS)}")
    return registry.get(name).plot(results, palette=palette, out=out, **kwargs)


# ----------------------------------------------------------------------------------------------
# representation rank, patch-feature PCA images
def plot_representation_rank(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
                             out: Optional[PathLike] = None) -> Figure:
    """RankMe (effective rank of the pooled features) and the spectrum's decay exponent alpha per block."""
    palette = _palette(results, palette)
    fig = _new_figure(10.5, 4.0)
    left, right = fig.subplots(1, 2)
    plot_layer_metric(results, "rankme", ylabel="RankMe (effective rank)", title="Representation rank (RankMe)",
                      show_heads=False, palette=palette, ax=left)
    plot_layer_metric(results, "spectrum-alpha", ylabel="α of λ_k ∝ k^−α (top half of the spectrum)",
                      title="Eigenspectrum decay (α-ReQ)", show_heads=False, palette=palette, ax=right)
    return _finish(fig, out)


def plot_pca_images(results: Mapping[str, Any], *, max_images: int = 4, palette: Optional[ModelPalette] = None,
                    out: Optional[PathLike] = None) -> Figure:
    """The first three principal components of the last block's patch tokens as RGB (DINOv2's figure),
    fitted jointly over the shown images, beside each input; one row per model."""
    palette = _palette(results, palette)
    n_img = min(max_images, min(np.asarray(_array(r, "pca_rgb")).shape[0] for r in results.values()))
    fig = _new_figure(1.9 * 2 * n_img + 0.6, 2.0 * len(results) + 0.6)
    axes = fig.subplots(len(results), 2 * n_img, squeeze=False)
    for ax_row, (name, r) in zip(axes, results.items()):
        rgb = np.asarray(_array(r, "pca_rgb"), dtype=np.float32)
        imgs = _display_images(_array(r, "pca_inputs")[:n_img])
        h, w = r.geometry.img_size
        evr = np.asarray(r.arrays.get("pca_explained_variance_ratio", [np.nan] * 3), dtype=np.float64)
        for j in range(n_img):
            ax_row[2 * j].imshow(imgs[j], extent=(0, w, h, 0))
            ax_row[2 * j + 1].imshow(rgb[j], extent=(0, w, h, 0), interpolation="nearest")
            ax_row[2 * j + 1].set_title(f"PC 1-3: {100 * evr.sum():.0f}% var." if j == 0 else "", fontsize="x-small")
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel(model_label(name, r, sample=True).replace(" · ", "\n"), fontsize="x-small",
                             color=palette[name].color)
    _suptitle(fig, "Patch features of the last block: first 3 principal components as RGB", results, shown=n_img)
    return _finish(fig, out)


def plot_high_norm_tokens(results: Mapping[str, Any], *, palette: Optional[ModelPalette] = None,
                          out: Optional[PathLike] = None) -> Figure:
    """Per model, the distribution of patch-token norms per block (rows: blocks, colour: share of the
    layer's tokens, log-norm axis); last panel: attention of patch queries on prefix tokens (solid) and
    on high-norm patches (dashed) per block."""
    palette = _palette(results, palette)
    n = len(results)
    fig = _new_figure(3.2 * n + 4.2, 3.8)
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    for ax, (name, r) in zip(axes, results.items()):
        hist = np.asarray(_array(r, "norm_histogram"), dtype=np.float64)
        edges = np.asarray(_array(r, "norm_log_edges"), dtype=np.float64)
        used = np.flatnonzero(hist.sum(0))
        lo, hi = (used[0], used[-1] + 1) if used.size else (0, hist.shape[1])
        share = hist[:, lo:hi] / np.maximum(hist.sum(1, keepdims=True), 1)
        ax.imshow(share, aspect="auto", cmap="magma", interpolation="nearest", origin="lower",
                  extent=(edges[lo], edges[hi], 0.5, hist.shape[0] + 0.5))
        ax.set_xlabel("log10 ‖patch token‖")
        ax.set_ylabel("depth (block)")
        ax.set_yticks(range(1, hist.shape[0] + 1))
        ax.set_title(model_label(name, r), fontsize="x-small", color=palette[name].color)
    ax = axes[-1]
    banded = False
    for name, r in results.items():
        style = palette[name]
        for metric, ls in (("sink-prefix-mass", "-"), ("sink-high-norm-mass", "--")):
            rows = _metric_rows(r, metric)
            ax.plot(rows["layer"], rows["value"], linestyle=ls, color=style.color, marker=style.marker,
                    markersize=4, label=f"{name}: {'prefix tokens' if ls == '-' else 'high-norm patches'}")
            if "ci_low" in rows:  # a share of attention: the t interval is drawn within [0, 1]
                banded |= _band(ax, rows["layer"], rows["ci_low"].clip(lower=0.0), rows["ci_high"].clip(upper=1.0),
                                style.color)
    ax.set_xlabel("depth (block)")
    ax.set_xticks(range(1, max(int(r.geometry.depth) for r in results.values()) + 1))
    ax.set_ylabel("attention of patch queries (mean)")
    ax.set_title("Attention sinks", fontsize="small")
    _legend(ax, banded, "xx-small", seeds=any(_seed_names(r) for r in results.values()))
    ax.grid(alpha=0.3)
    _suptitle(fig, "Patch-token norms and attention sinks", results)
    return _finish(fig, out)
