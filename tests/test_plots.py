"""Figures (analysis.plots) and the HTML report (analysis.report)."""
from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import seaborn as sns
import timm
import torch
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle

from analysis import plots
from analysis.capture import ViTGeometry
from analysis.report import render_report, summary_table, write_report


def _geometry(img: int, patch: int, depth: int = 4, heads: int = 3) -> ViTGeometry:
    g = img // patch
    return ViTGeometry(img_size=(img, img), patch_size=(patch, patch), grid=(g, g),
                       num_prefix_tokens=1, depth=depth, num_heads=heads, embed_dim=heads * 16)


def _uniform_distance(img: int, patch: int) -> float:
    """Mean pairwise Euclidean distance (px) between all patch centres, by brute force."""
    g = img // patch
    pos = [(r, c) for r in range(g) for c in range(g)]
    d = [np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in itertools.product(pos, pos)]
    return patch * float(np.mean(d))


def _synthetic(name: str, geometry: ViTGeometry, offset: float) -> SimpleNamespace:
    """A result with per-head and mean rows for the layer metrics (values are arbitrary)."""
    rows = []
    for metric in ("attention-distance", "nmi", "attention-entropy"):
        for layer in range(1, geometry.depth + 1):
            vals = [offset + layer + 0.1 * h for h in range(geometry.num_heads)]
            rows += [dict(model=name, layer=layer, head=h, metric=metric, value=v, images=5)
                     for h, v in enumerate(vals)]
            rows.append(dict(model=name, layer=layer, head=-1, metric=metric,
                             value=float(np.mean(vals)), images=5))
    L = geometry.depth
    arrays = {"fourier": np.linspace(0, -1, (L + 1) * 4).reshape(L + 1, 4) - offset,
              "fourier_freqs": np.arange(4) * 2.0 / 8,
              "cka": np.eye(L) * 0.5 + 0.5 * offset / 10,
              "attention_similarity": np.full((L, L), offset)}
    return SimpleNamespace(table=pd.DataFrame(rows), arrays=arrays, geometry=geometry, images=5,
                           options={"similarity_kind": "jsd"})


@pytest.fixture(scope="module")
def synthetic():
    return {"SimMIM": _synthetic("SimMIM", _geometry(192, 16, depth=4), 1.0),
            "KAMIM": _synthetic("KAMIM", _geometry(192, 16, depth=4), 2.0)}


@pytest.fixture(scope="module")
def real_results():
    """run_analyses of two tiny random ViTs on real photographs (all figure-producing analyses)."""
    from skimage import data

    from analysis.runner import run_analyses
    from kamim.data import EvalTransform

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = {}
    for name, (img, patch, seed) in {"A": (32, 8, 0), "B": (48, 8, 1)}.items():
        tf = EvalTransform(img)
        x = torch.stack([tf(p)["image"] for p in photos])
        torch.manual_seed(seed)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img,
                                  patch_size=patch, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=3).eval()
        batch = {"image": x, "label": torch.tensor([0, 1, 2, 0])}
        out[name] = run_analyses(
            model, [batch], ["attention-distance", "nmi", "attention-maps", "rollout", "pre-post",
                             "tsne", "attribution"],
            model_name=name, progress=False, tsne_samples=24, map_images=2,
            map_queries=((0, 3),), attribution_steps=4, attribution_methods=("occlusion",))
    return out


def _baselines(ax):
    return [l for l in ax.lines if l.get_gid() == "uniform-baseline"]


def test_palette_is_stable_and_distinct():
    pal = plots.ModelPalette(["SimMIM", "KAMIM", "MoCo v3", "SimMIM"])
    assert list(pal) == ["SimMIM", "KAMIM", "MoCo v3"]
    assert len({s.color for s in pal.values()}) == 3
    assert len({s.marker for s in pal.values()}) == 3
    assert plots.ModelPalette(["SimMIM", "KAMIM"])["KAMIM"] == pal["KAMIM"]
    with pytest.raises(KeyError, match="no style"):
        pal["DINO"]
    with pytest.raises(ValueError):
        plots.ModelPalette([])


def test_palette_follows_method_family_then_name_not_order():
    families = {"kamim-b": "KAMIM", "kamim-a": "KAMIM", "sim": "SimMIM", "rnd": "random", "x": None, "y": None}
    one = plots.ModelPalette(list(families), families=families)
    two = plots.ModelPalette(list(reversed(families)), families=families)
    assert all(one[n] == two[n] for n in families) and list(two) == list(reversed(families))
    blind = sns.color_palette("colorblind")
    assert one["kamim-a"].color == one["kamim-b"].color == tuple(blind[1])
    assert one["kamim-a"].marker != one["kamim-b"].marker and one["sim"].color == tuple(blind[0])
    assert one["rnd"].color == (0.5, 0.5, 0.5)
    assert {one["x"].color, one["y"].color}.isdisjoint({tuple(blind[i]) for i in (0, 1, 2, 4, 5)})
    assert (plots.method_family("kamim"), plots.method_family(None, "mae"), plots.method_family("n/a", "hf-vit")) \
        == ("KAMIM", "MAE", None)


def test_tsne_classes_keep_one_distinguishable_style_in_every_panel(synthetic):
    from matplotlib.colors import to_rgb

    rng = np.random.default_rng(0)
    res = {}
    for name, r, classes in (("A", synthetic["SimMIM"], range(20)), ("B", synthetic["KAMIM"], range(1, 20))):
        labels = np.repeat(np.array(list(classes)), 3)
        res[name] = SimpleNamespace(**{**vars(r), "arrays": {**r.arrays, "tsne_labels": labels,
                                                              "tsne_xy": rng.normal(size=(len(labels), 2))}})
    fig = plots.plot_tsne(res)
    styles = [{c.get_label(): (to_rgb(c.get_facecolor()[0]), c.get_paths()[0].vertices.round(3).tobytes())
               for c in ax.collections} for ax in fig.axes[:2]]
    assert len(set(styles[0].values())) == 20  # 20 classes: 20 distinct colour-and-marker pairs
    assert all(styles[1][lab] == styles[0][lab] for lab in styles[1])  # B lacks class 0: same styles still
    assert len(fig.legends[0].get_texts()) == 20


def test_attention_distance_baseline_is_uniform_value(synthetic, tmp_path):
    fig = plots.plot_attention_distance(synthetic, out=tmp_path / "dist")
    ax = fig.axes[0]
    (base,) = _baselines(ax)
    assert base.get_linestyle() == "--"
    assert np.allclose(base.get_ydata(), _uniform_distance(192, 16), rtol=0, atol=1e-6)
    assert base.get_ydata()[0] == pytest.approx(99.75, abs=0.01)  # the paper's collapse value
    assert [t for t in ax.get_xticks()] == [1, 2, 3, 4]
    assert ax.get_xlim() == (0.5, 4.5)
    assert "(px)" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("SimMIM · 192 px, 12×12 × 16 px" == t for t in labels)
    assert any("99.75 px" in t for t in labels)  # 4 significant digits in the legend
    assert (tmp_path / "dist.pdf").read_bytes()[:4] == b"%PDF"
    assert (tmp_path / "dist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.pdf", "dist.png"]  # no temp files


def test_baseline_per_geometry_when_resolutions_differ():
    res = {"MIM": _synthetic("MIM", _geometry(192, 16), 1.0),
           "MoCo": _synthetic("MoCo", _geometry(64, 16), 1.0)}
    fig = plots.plot_attention_distance(res)
    values = sorted(float(l.get_ydata()[0]) for l in _baselines(fig.axes[0]))
    assert values == pytest.approx(sorted([_uniform_distance(192, 16), _uniform_distance(64, 16)]),
                                   abs=1e-6)
    pal = plots.ModelPalette(res)
    colours = {to_rgb(l.get_color()) for l in _baselines(fig.axes[0])}
    assert colours == {pal["MIM"].color, pal["MoCo"].color}


def test_nmi_baseline_zero_and_entropy_baseline_log_n(synthetic):
    (base,) = _baselines(plots.plot_nmi(synthetic).axes[0])
    assert np.allclose(base.get_ydata(), 0.0)
    (ent,) = _baselines(plots.plot_attention_entropy(synthetic).axes[0])
    assert np.allclose(ent.get_ydata(), np.log(144))


def test_mean_line_uses_head_mean_rows(synthetic):
    fig = plots.plot_nmi(synthetic)
    lines = {l.get_label(): l for l in fig.axes[0].lines if l.get_gid() != "uniform-baseline"}
    line = lines["KAMIM · 192 px, 12×12 × 16 px"]
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert np.allclose(line.get_ydata(), [2.0 + l + 0.1 for l in range(1, 5)])  # mean of 3 heads


def test_same_colour_per_model_across_figures(synthetic):
    pal = plots.ModelPalette(["KAMIM", "SimMIM"])  # order differs from the results mapping
    figs = [plots.plot_attention_distance(synthetic, palette=pal),
            plots.plot_nmi(synthetic, palette=pal)]
    fourier = plots.plot_fourier(synthetic, palette=pal)
    for name in synthetic:
        label = plots.model_label(name, synthetic[name])
        found = [l for f in figs for l in f.axes[0].lines if l.get_label() == label]
        found += [l for l in fourier.axes[len(synthetic)].lines if l.get_label() == label]
        assert len(found) == 3
        assert {to_rgb(l.get_color()) for l in found} == {pal[name].color}
        assert {l.get_marker() for l in found} == {pal[name].marker}


def test_heatmaps_share_one_colour_scale(synthetic):
    import copy

    fig = plots.plot_attention_similarity(synthetic)
    clims = [ax.collections[0].get_clim() for ax in fig.axes[:2]]  # the last axes: colourbar
    assert clims[0] == clims[1] == (0.0, 1.0)  # the scale every similarity matrix shares
    assert len(fig.axes) == 3  # one shared colourbar
    own = {n: copy.copy(r) for n, r in synthetic.items()}
    for r in own.values():
        r.options = {**r.options, "matrix_scale": "figure"}
    fig = plots.plot_attention_similarity(own)
    clims = [ax.collections[0].get_clim() for ax in fig.axes[:2]]
    assert clims[0] == clims[1] == (1.0, 2.0)  # the figure's data range, still one for both models
    fig = plots.plot_cka(synthetic)
    assert all(ax.collections[0].get_clim() == (0.0, 1.0) for ax in fig.axes[:2])
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["1", "2", "3", "4"]


def test_fourier_curves_and_high_frequency(synthetic):
    fig = plots.plot_fourier(synthetic)
    hf = fig.axes[len(synthetic)]
    label = plots.model_label("SimMIM", synthetic["SimMIM"])
    (line,) = [l for l in hf.lines if l.get_label() == label]
    assert list(line.get_xdata()) == [0, 1, 2, 3, 4]
    assert np.allclose(line.get_ydata(), synthetic["SimMIM"].arrays["fourier"][:, -1])
    assert len(fig.axes[0].lines) == 5  # one curve per depth, embedding included
    # the axes end at the grid's highest frequency (an 8x8 grid: 3π/4, not π) and say which it is
    assert fig.axes[0].get_xlim() == (0.0, 0.75)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "π/2", "3π/4"]
    assert hf.get_ylabel() == "Δ log amplitude at frequency 3π/4"
    from analysis.fourier import fourier_frequencies

    assert plots._pi(float(fourier_frequencies(12)[-1])) == "5π/6" and plots._pi(1.0) == "π"


def test_attention_maps_mark_query_at_pixel_position(real_results):
    fig = plots.plot_attention_maps(real_results)
    boxes = [p for ax in fig.axes for p in ax.patches
             if isinstance(p, Rectangle) and p.get_gid() == "query-patch"]
    assert len(boxes) == 2 * (1 + 2)  # per model: the input column and each of the 2 blocks
    # query (0, 3) on an 8 px grid: x = 3 * 8 = 24, y = 0, 8x8 box
    assert plots.query_pixel_box((0, 3), (8, 8)) == (24.0, 0.0, 8.0, 8.0)
    first_row = fig.axes[0]
    (box,) = [p for p in first_row.patches if p.get_gid() == "query-patch"]
    assert box.get_xy() == (24.0, 0.0) and box.get_width() == 8.0 and box.get_height() == 8.0
    # image shown in pixel units at the model's resolution
    assert first_row.get_xlim() == (0.0, 32.0)
    # every block of both models plotted (depth 2) + the input column
    assert sum(1 for ax in fig.axes if ax.get_title().startswith("block")) == 2 * 2


@pytest.mark.parametrize("fn", [plots.plot_rollout, plots.plot_pre_post, plots.plot_tsne,
                                plots.plot_attribution])
def test_other_figures_render_and_save(real_results, fn, tmp_path):
    fig = fn(real_results, out=tmp_path / "fig")
    assert fig.axes
    assert (tmp_path / "fig.png").stat().st_size > 1000
    texts = " ".join([fig._suptitle.get_text() if fig._suptitle else ""] +
                     [a.get_title() + a.get_ylabel() for a in fig.axes] +
                     [t.get_text() for sf in getattr(fig, "subfigs", [])
                      for t in ([sf._suptitle] if sf._suptitle else [])])
    assert "32 px" in texts and "48 px" in texts  # resolution of each model stated


def test_plot_analysis_dispatch_and_errors(synthetic):
    assert set(plots.FIGURE_FUNCTIONS) >= {"attention-distance", "nmi", "fourier", "cka"}
    with pytest.raises(ValueError, match="no figure for analysis 'bogus'"):
        plots.plot_analysis("bogus", synthetic)
    with pytest.raises(ValueError, match="no metric 'nmi'"):
        plots.plot_nmi({"x": SimpleNamespace(table=pd.DataFrame(
            columns=["model", "layer", "head", "metric", "value", "images"]),
            arrays={}, geometry=_geometry(32, 8), images=1)})
    with pytest.raises(ValueError, match="no results"):
        plots.plot_nmi({})


def test_summary_table_and_report(synthetic, tmp_path):
    summary = summary_table(synthetic)
    assert list(summary["model"].unique()) == ["SimMIM", "KAMIM"]
    row = summary[(summary.model == "KAMIM") & (summary.layer == 2)].iloc[0]
    assert row["attention distance (px)"] == pytest.approx(2.0 + 2 + 0.1)

    figures = {}
    for key, fn in (("attention-distance", plots.plot_attention_distance),
                    ("nmi", plots.plot_nmi)):
        fn(synthetic, out=tmp_path / key)
        figures[key] = [tmp_path / f"{key}.pdf", tmp_path / f"{key}.png"]
    sha = "ab" * 32
    path = write_report(tmp_path / "report.html", synthetic, figures,
                        settings={"seed": 3, "images": 5},
                        models={"SimMIM": {"sha256": sha, "format": "kamim-encoder"},
                                "KAMIM": {"sha256": "n/a", "format": "timm-name"}},
                        notes=["small <demo> models"])
    html = path.read_text()
    for key in figures:
        assert f'href="{key}.png"' in html and f'href="{key}.pdf"' in html
        assert f'data-file="{key}.png"' in html
    assert html.count("data:image/png;base64,") == 2
    assert sha in html and "kamim-encoder" in html and "192 px, 12×12 × 16 px" in html
    assert "small &lt;demo&gt; models" in html  # escaped
    for lib in ("torch", "timm", "scikit-learn", "python"):
        assert re.search(rf"<th>{lib}</th><td>[0-9]", html)
    linked = render_report(synthetic, figures, report_dir=tmp_path, settings={}, models={},
                           embed_images=False)
    assert '<img src="nmi.png"' in linked and "base64" not in linked


def test_cross_cka_axes_follow_each_model():
    from analysis.results import AnalysisResult, records_to_frame

    m = np.linspace(0, 1, 12).reshape(3, 4)
    pair = AnalysisResult("A vs B", records_to_frame([]), {"cka": m}, None, 8, options={"cka": "biased"})
    fig = plots.plot_cross_model({("A", "B"): pair}, {"A": 3, "B": 4}, "cross-cka")
    ax = fig.axes[0]
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("A: depth (block)", "B: depth (block)")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    assert ax.collections[0].get_clim() == (0.0, 1.0)


def test_cross_model_figures_outline_the_best_aligned_layer_and_wrap_many_pairs():
    from matplotlib.patches import Rectangle

    from analysis.results import AnalysisResult, records_to_frame

    def pair(seed: int) -> AnalysisResult:
        m = np.random.default_rng(seed).uniform(size=(3, 4))
        return AnalysisResult("x", records_to_frame([]), {"cka": m, "mutual_knn": m, "cknna": m,
                                                          "best_layer": m.argmax(1) + 1}, None, 8,
                              options={"k": 5, "cka": "debiased"})

    names = ["A", "B", "C", "D"]
    cross = {(a, b): pair(i) for i, (a, b) in enumerate((a, b) for a in names for b in names if a < b)}
    depths = {"A": 3, "B": 4, "C": 3, "D": 4}
    fig = plots.plot_cross_model({("A", "B"): cross[("A", "B")]}, depths, "cross-mutual-knn")
    ax = fig.axes[0]
    boxes = sorted((int(p.get_y()), int(p.get_x())) for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill())
    assert boxes == [(r, int(c) - 1) for r, c in enumerate(cross[("A", "B")].arrays["best_layer"])]
    assert fig.axes[-1].get_ylabel() == "mutual k-NN alignment (k = 5)"
    six = plots.plot_cross_model(cross, depths, "cross-cka")  # 6 pairs: two rows of at most four panels
    panels = [a for a in six.axes if a.get_visible() and a.get_title()]
    assert len(panels) == 6 and len({round(a.get_position().y0, 3) for a in panels}) == 2
    assert six.axes[-1].get_ylabel() == "linear CKA (debiased)"


def test_report_library_versions_name_every_library_behind_the_numbers():
    import importlib.metadata

    from analysis.report import library_versions

    versions = library_versions()
    for name in ("torch", "torchvision", "timm", "pillow", "numpy", "scikit-learn", "captum"):
        assert versions[name] == importlib.metadata.version(name), name


def test_figures_of_example_images_say_how_many_they_show(real_results):
    """Statistics say over how many images; figures of a few images say how many of how many."""
    from analysis import plots

    assert plots.plot_attention_maps(real_results)._suptitle.get_text().endswith("(1 of 4 images)")
    assert plots.plot_rollout(real_results, max_images=2)._suptitle.get_text().endswith("(2 of 4 images)")
    assert plots.plot_tsne(real_results)._suptitle.get_text().endswith("(4 images)")


def test_attribution_panels_name_the_attributed_class_and_the_label_where_they_differ(real_results):
    from analysis import plots

    fig = plots.plot_attribution(real_results, max_images=4)  # map_images=2: two were attributed
    assert fig._suptitle.get_text() == "Input attributions of the predicted class (captum) (2 of 4 images)"
    r = real_results["A"]
    targets, labels = r.arrays["attribution"]["target"], r.arrays["labels"][:2]
    expected = [f"predicted {int(t)}" + ("" if int(t) == int(y) else f" (label {int(y)})")
                for t, y in zip(targets, labels)]
    assert [ax.get_title() for ax in fig.axes[:2]] == expected
    # each wording, on a result whose first prediction is right and second wrong
    from analysis.plots import _target_text

    r = SimpleNamespace(arrays={"labels": np.array([0, 0, -1]), "class_names": ["cat", "dog"]})
    assert [_target_text(t, i, r, by_label=False) for i, t in enumerate([0, 1, 1])] == [
        "predicted cat", "predicted dog (label cat)", "predicted dog"]  # -1: no label known
    assert _target_text(1, 0, r, by_label=True) == "label dog"


def test_reconstruction_title_stays_clear_of_the_column_headers(tmp_path):
    """The caller's title (paper-figures adds one) gets room above the column headers."""
    from kamim.eval.reconstruct import plot_reconstructions
    from kamim.masking import MaskGenerator
    from kamim.models import create_pretrain_model
    from kamim.eval.reconstruct import MaskedImages
    from kamim.data import ImageFolderDataset, EvalTransform, write_demo_folder

    data = write_demo_folder(tmp_path / "demo", crops_per_photo=1, max_side=64)
    model = create_pretrain_model("simmim", "vit_pico", img_size=32).eval()
    masked = MaskedImages(ImageFolderDataset(data, EvalTransform(32)),
                          MaskGenerator(input_size=32, mask_patch_size=16, model_patch_size=8, mask_ratio=0.5), 0)
    fig = plot_reconstructions({"a": model}, masked, [0, 1], None, "cpu",
                               metrics={"a": {"psnr": 21.58, "ssim": 0.7028}})
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.suptitle("Reconstructions at mask ratio 0.5")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    headers = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert headers and all(title.y0 >= h.y1 for h in headers)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
        "original", "masked", "a\nPSNR 21.6 dB · SSIM 0.703"]
