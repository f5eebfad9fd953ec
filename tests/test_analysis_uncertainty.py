"""95% intervals over images (analysis.uncertainty): the streaming interval equals the one from all
per-image values in memory, whatever the batch size and when merged over halves; it covers a known
population mean; every mean-over-images metric of a run carries one in its tidy table."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

import analysis_models
from analysis.attention import AttentionDistance, _distance_per_image, distance_accumulator, uniform_attention_distance
from analysis.capture import capture, model_geometry
from analysis.registry import Batch, Context
from analysis.results import records_to_frame
from analysis.runner import RunOptions, run_analyses
from analysis.uncertainty import CI_LEVEL, Moments, level_text, t_interval


def _reference(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and Student-t interval from all per-image values held in memory (scipy)."""
    n = len(values)
    mean = float(np.mean(values))
    low, high = stats.t.interval(CI_LEVEL, n - 1, loc=mean, scale=np.std(values, ddof=1) / math.sqrt(n))
    return mean, float(low), float(high)


def test_moments_equal_in_memory_statistics_for_any_batching_and_merge():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 3.0, size=(37, 4)) + 100.0  # an offset that a naive sum of squares would lose
    values[[3, 20], 2] = np.nan  # two images without a value for element 2
    for batch in (1, 3, 8, 37):
        m = Moments()
        for i in range(0, len(values), batch):
            m.add(values[i:i + batch])
        for k in range(4):
            column = values[:, k][~np.isnan(values[:, k])]
            mean, low, high = _reference(column)
            assert m.count[k] == len(column) and m.images == 37
            np.testing.assert_allclose([m.mean[k], m.std[k]], [mean, np.std(column, ddof=1)], rtol=1e-12)
            np.testing.assert_allclose([m.interval()[0][k], m.interval()[1][k]], [low, high], rtol=1e-12)
    halves = Moments(), Moments()
    halves[0].add(values[:15])
    halves[1].add(values[15:])
    halves[0].merge(halves[1])
    whole = Moments()
    whole.add(values)
    np.testing.assert_allclose(halves[0].interval(), whole.interval(), rtol=1e-12)
    # fewer than two images: no interval; a level outside (0, 1) and an empty state are refused
    one = Moments()
    one.add(values[:1])
    assert np.isnan(one.interval()[0]).all() and not np.isnan(one.mean).any()
    with pytest.raises(ValueError, match="level must be in"):
        t_interval(0.0, 1.0, 5, level=95)
    with pytest.raises(ValueError, match="no images"):
        Moments().interval()
    assert level_text() == "95%"


def _photos(n: int) -> torch.Tensor:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    x = torch.stack([analysis_models.resize(analysis_models.photo_tensor(photos[i % 5])[:, 12 * i:, 9 * i:], 32)
                     for i in range(n)])
    return (x - 0.45) / 0.25


def test_streaming_interval_of_attention_distance_equals_the_in_memory_one():
    """Batch sizes 1, 3 and 8 through run_analyses, and two halves merged, give the interval that all
    per-image distances of layer 1 held in memory give (head mean and every head)."""
    model = analysis_models.tiny_vit(seed=0).eval()
    x = _photos(17)
    g = model_geometry(model)
    with torch.no_grad():
        attn = capture(model, x, attention=[1]).attention[1]
    per_image = _distance_per_image(attn, g.grid, g.patch_size, g.num_prefix_tokens).numpy()  # (17, heads)
    expected = {-1: _reference(per_image.mean(1))} | {h: _reference(per_image[:, h]) for h in range(per_image.shape[1])}
    assert expected[-1][2] - expected[-1][1] > 1e-3  # the images do differ: the interval is not degenerate

    def rows(table):
        layer = table[(table.metric == "attention-distance") & (table.layer == 1)]
        return {int(r.head): (r.value, r.ci_low, r.ci_high, r.n_images) for r in layer.itertuples()}

    for batch in (1, 3, 8):
        result = run_analyses(model, [x[i:i + batch] for i in range(0, 17, batch)], ["attention-distance"],
                              model_name="m", progress=False)
        got = rows(result.table)
        for head, (mean, low, high) in expected.items():
            np.testing.assert_allclose(got[head][:3], (mean, low, high), rtol=1e-9, err_msg=f"batch {batch} head {head}")
            assert got[head][3] == 17

    context = Context("m", g, RunOptions(), 0, model)

    def accumulate(images, start):
        acc = distance_accumulator(context)
        with torch.no_grad():
            captured = capture(model, images, attention=True)
        acc.update(Batch(images, None, torch.arange(start, start + len(images)), captured, g))
        return acc

    first, second = accumulate(x[:9], 0), accumulate(x[9:], 9)
    first.merge(second)
    got = rows(records_to_frame(first.finish()[0]))
    for head, (mean, low, high) in expected.items():
        np.testing.assert_allclose(got[head][:3], (mean, low, high), rtol=1e-9, err_msg=f"merged head {head}")


def test_interval_covers_the_population_attention_distance_in_at_least_90_of_100_draws():
    """Each image attends uniformly with weight w ~ U(0, 1) and to itself with 1 - w, so its mean
    attention distance is w · D_uniform and the population mean is D_uniform / 2, known exactly."""
    geometry = SimpleNamespace(grid=(6, 6), patch_size=(16, 16))
    uniform = uniform_attention_distance(geometry)
    truth = uniform / 2
    n_tokens = 36
    rng = np.random.default_rng(2024)
    covered, widths = 0, []
    for _ in range(100):
        w = torch.from_numpy(rng.uniform(0, 1, size=(20, 1, 1, 1)))
        attn = w / n_tokens + (1 - w) * torch.eye(n_tokens, dtype=torch.float64)  # (20, 1 head, 36, 36)
        acc = AttentionDistance(geometry.grid, geometry.patch_size, num_prefix_tokens=0)
        for i in range(0, 20, 7):
            acc.update(attn[i:i + 7].float())
        low, high = (float(v[0]) for v in acc.interval())
        covered += low <= truth <= high
        widths.append(high - low)
    assert covered >= 90, f"covered the population mean in {covered} of 100 draws"
    # and the intervals are informative: about 2 · t · sd / sqrt(20), sd = D_uniform / sqrt(12)
    expected_width = 2 * stats.t.ppf(0.975, 19) * uniform / math.sqrt(12) / math.sqrt(20)
    assert np.mean(widths) == pytest.approx(expected_width, rel=0.1)


def test_every_mean_over_images_metric_has_an_interval_and_matrices_are_tidy_rows():
    model = analysis_models.tiny_vit(seed=0).eval()
    x = _photos(8)
    analyses = ["attention-distance", "nmi", "attention-entropy", "attention-similarity", "cka", "fourier",
                "pre-post", "high-norm-tokens", "representation-rank"]
    result = run_analyses(model, [x[:5], x[5:]], analyses, model_name="m", progress=False, pre_post_images=2)
    t = result.table
    with_interval = {"attention-distance", "nmi", "attention-entropy", "attention-similarity", "head-pair-similarity",
                     "head-similarity", "fourier-high-frequency", "attention-shift-ratio", "attention-shift-cosine",
                     "high-norm-fraction", "sink-prefix-mass", "sink-high-norm-mass"}
    for metric in with_interval:
        rows = t[t.metric == metric]
        assert len(rows) and (rows.ci_low <= rows.value + 1e-12).all() and (rows.value <= rows.ci_high + 1e-12).all(), metric
    # frequency 0 of the Fourier curve is 0 in every image: its interval too (the embedding: layer 0)
    assert set(t[t.metric == "fourier-high-frequency"].layer) == {0, 1, 2, 3}
    # statistics of the whole image set have none
    for metric in ("rankme", "spectrum-alpha", "cka", "norm-q50", "attention-distance-excluded-rows"):
        rows = t[t.metric == metric]
        assert len(rows) and rows.ci_low.isna().all() and rows.ci_high.isna().all(), metric
    # matrices: entry (i, j) of the layer x layer matrices at layer i + 1, column j + 1, equal to the arrays
    for metric, key in (("cka", "cka"), ("attention-similarity", "attention_similarity")):
        rows = t[t.metric == metric]
        matrix = np.full((3, 3), np.nan)
        matrix[rows.layer - 1, rows.column - 1] = rows.value
        np.testing.assert_array_equal(matrix, np.asarray(result.arrays[key]))
    pairs = t[(t.metric == "head-pair-similarity") & (t.layer == 2)]
    heads = np.full((2, 2), np.nan)
    heads[pairs["head"], pairs.column] = pairs.value
    np.testing.assert_array_equal(heads, np.asarray(result.arrays["head_similarity"])[1])
    assert (t[~t.metric.isin(["cka", "attention-similarity", "head-pair-similarity"])].column == -1).all()
    assert set(t.n_images) == {8}


def test_line_figures_shade_each_models_interval_and_say_so():
    from analysis.plots import _BAND_GID, plot_attention_distance, plot_fourier

    model = analysis_models.tiny_vit(seed=0).eval()
    result = run_analyses(model, [_photos(6)], ["attention-distance", "fourier"], model_name="m", progress=False)
    fig = plot_attention_distance({"m": result})
    ax = fig.axes[0]
    bands = [c for c in ax.collections if c.get_gid() == _BAND_GID]
    assert len(bands) == 1
    rows = result.table[(result.table.metric == "attention-distance") & (result.table["head"] == -1)]
    ys = bands[0].get_paths()[0].vertices[:, 1]  # the band's outline runs through every layer's low and high
    np.testing.assert_allclose([ys.min(), ys.max()], [rows.ci_low.min(), rows.ci_high.max()], rtol=1e-6)
    assert "shaded: 95% interval over images" in [t.get_text() for t in ax.get_legend().get_texts()]
    hf = plot_fourier({"m": result}).axes[-2]  # the high-frequency panel (the last axes is the colour bar)
    assert [c.get_gid() for c in hf.collections].count(_BAND_GID) == 1
    # a table without intervals (saved before they existed) draws no band and no legend entry
    result.table = result.table.assign(ci_low=np.nan, ci_high=np.nan)
    ax = plot_attention_distance({"m": result}).axes[0]
    assert not [c for c in ax.collections if c.get_gid() == _BAND_GID]
    assert "shaded" not in " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_a_table_saved_before_intervals_loads_with_none(tmp_path):
    from analysis.results import AnalysisResult

    model = analysis_models.tiny_vit(seed=0).eval()
    result = run_analyses(model, [_photos(4)], ["nmi"], model_name="m", progress=False)
    result.save(tmp_path / "m")
    old = result.table.rename(columns={"n_images": "images"}).drop(columns=["column", "ci_low", "ci_high"])
    old.to_csv(tmp_path / "m" / "table.csv", index=False)  # the columns of a run saved before intervals
    back = AnalysisResult.load(tmp_path / "m")
    assert list(back.table.columns) == ["model", "layer", "head", "column", "metric", "value", "ci_low", "ci_high",
                                        "n_images"]
    assert (back.table.column == -1).all() and back.table.ci_low.isna().all() and set(back.table.n_images) == {4}
    np.testing.assert_array_equal(back.table.value, result.table.value)


def test_combine_seeds_means_values_and_averageable_arrays_and_refuses_unlike_seeds():
    from analysis.seeds import combine_seeds, expand_seeds

    x = _photos(5)
    seeds = {f"k@{i}": run_analyses(analysis_models.tiny_vit(seed=i).eval(), [x], ["cka", "nmi", "tsne"],
                                    model_name=f"k@{i}", progress=False, tsne_samples=30, tsne_iterations=250)
             for i in (1, 2)}
    group = combine_seeds("k", seeds)
    np.testing.assert_allclose(group.arrays["cka"], (seeds["k@1"].arrays["cka"] + seeds["k@2"].arrays["cka"]) / 2)
    np.testing.assert_array_equal(group.arrays["tsne_xy"], seeds["k@1"].arrays["tsne_xy"])  # a sample: the first seed's
    nmi = [r.table.query("metric == 'nmi' and head == -1 and layer == 3").value.item() for r in seeds.values()]
    row = group.table.query("metric == 'nmi' and head == -1 and layer == 3").iloc[0]
    half = stats.t.ppf(0.975, 1) * abs(nmi[0] - nmi[1]) / 2
    np.testing.assert_allclose([row.value, row.ci_low, row.ci_high], [np.mean(nmi), np.mean(nmi) - half,
                                                                      np.mean(nmi) + half], rtol=1e-9)
    assert group.model_name == "k" and set(group.table.model) == {"k"} and group.options["seeds"] == ["k@1", "k@2"]
    other = run_analyses(analysis_models.tiny_vit(seed=3).eval(), [x[:4]], ["cka", "nmi", "tsne"], model_name="o",
                         progress=False, tsne_samples=30, tsne_iterations=250)
    with pytest.raises(ValueError, match=r"model k: its seeds differ in images \(k@1: 5, o: 4\)"):
        combine_seeds("k", {"k@1": seeds["k@1"], "o": other})
    assert expand_seeds({"a": "x", "k": ["p", "q"]}) == ({"a": "x", "k@1": "p", "k@2": "q"}, {"k": ["k@1", "k@2"]})
