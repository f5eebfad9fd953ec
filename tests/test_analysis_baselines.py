"""Honest baselines: the uniform-attention verdict in figures and report, and --baseline random."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from analysis.attention import uniform_attention_distance
from analysis.baselines import UNIFORM_BASELINES, near_uniform, uniform_sentences
from analysis.pipeline import UsageError, analyze
from kamim.serialization import save_safetensors

KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def _save(model: torch.nn.Module, path: Path) -> Path:
    meta = {"format": "kamim-encoder", "model_name": "vit_tiny_patch16_224", "kwargs": json.dumps(KWARGS),
            "method": "simmim"}
    return save_safetensors(model.state_dict(), path, metadata=meta)


def _vit(kind: str) -> torch.nn.Module:
    """``uniform``: queries and keys zeroed, so every attention row is exactly uniform; ``local``: a
    large random position embedding and identity queries/keys, so every token attends mostly to itself."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()
    d = model.embed_dim
    with torch.no_grad():
        for block in model.blocks:
            qk_w, qk_b = block.attn.qkv.weight[: 2 * d], block.attn.qkv.bias[: 2 * d]
            qk_b.zero_()
            if kind == "uniform":
                qk_w.zero_()
            else:
                qk_w.copy_(torch.cat([torch.eye(d), torch.eye(d)]) * 4.0)
        if kind == "local":
            model.pos_embed.normal_(0, 3.0)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kamim.data import write_labelled_demo

    root = write_labelled_demo(tmp_path_factory.mktemp("bl") / "photos", n_train_per_class=1, n_val_per_class=2,
                               size=32, photos=["astronaut", "coffee", "chelsea"])
    return Path(root) / "val"


def test_uniform_model_is_said_indistinguishable_and_a_local_one_is_not(data, tmp_path):
    models = {name: str(_save(_vit(name), tmp_path / f"{name}.safetensors")) for name in ("uniform", "local")}
    out = analyze(models, data, tmp_path / "out", analyses=["attention-distance", "nmi", "attention-entropy"],
                  images=6, batch_size=3, progress=False, baseline="random")
    res = out.results
    u = uniform_attention_distance(res["uniform"].geometry)
    dist = {n: r.table[(r.table["metric"] == "attention-distance") & (r.table["head"] == -1)]["value"].to_numpy()
            for n, r in res.items()}
    np.testing.assert_allclose(dist["uniform"], u, rtol=1e-6)  # exactly uniform attention
    assert dist["local"].min() < 0.5 * u
    assert [near_uniform(res["uniform"], m) for m in UNIFORM_BASELINES] == [True, True, True]
    assert [near_uniform(res["local"], m) for m in UNIFORM_BASELINES] == [False, False, False]
    # the random-init baseline of the same architecture is analysed and tabled like any model
    assert list(res) == ["uniform", "local", "random-vit_tiny_patch16_224"]
    random_init = res["random-vit_tiny_patch16_224"]
    assert all(near_uniform(random_init, m) for m in UNIFORM_BASELINES)  # what a model learns is read against it
    html = (tmp_path / "out" / "report.html").read_text()
    assert ("uniform: attention indistinguishable from uniform (the 95% interval over images reaches attention "
            "distance within 1%") in html
    assert "local: attention indistinguishable" not in html
    assert "random-vit_tiny_patch16_224: attention indistinguishable from uniform" in html
    assert sorted(set(out.metrics["model"])) == ["local", "random-vit_tiny_patch16_224", "uniform"]
    # the figure says it in the legend entry of the model concerned
    from analysis.plots import plot_attention_distance

    labels = [t.get_text() for t in plot_attention_distance(res).axes[0].get_legend().get_texts()]
    assert any(t.startswith("uniform") and "indistinguishable from uniform" in t for t in labels)
    assert not any(t.startswith("local") and "indistinguishable" in t for t in labels)


def test_the_rule_uses_the_stated_tolerances(data, tmp_path):
    assert [(m, b.tolerance, b.relative) for m, b in UNIFORM_BASELINES.items()] == [
        ("attention-distance", 0.01, True), ("attention-entropy", 0.01, True), ("nmi", 0.01, False)]
    out = analyze({"u": str(_save(_vit("uniform"), tmp_path / "u.safetensors"))}, data, tmp_path / "o",
                  analyses=["attention-distance"], images=3, batch_size=3, progress=False)
    res = out.results["u"]
    u = uniform_attention_distance(res.geometry)
    t = res.table
    dist = t["metric"] == "attention-distance"
    # (value, interval) as shifts above the uniform value: the interval must reach the 1% band
    for (shift, low, high), verdict in (((0.009, 0.009, 0.009), True), ((0.011, 0.011, 0.011), False),
                                        ((0.015, 0.009, 0.021), True), ((0.015, 0.011, 0.019), False),
                                        ((-0.015, -0.021, -0.0095), True), ((-0.015, -0.02, -0.0105), False),
                                        ((0.009, np.nan, np.nan), True), ((0.011, np.nan, np.nan), False)):
        res.table = t.assign(**{c: np.where(dist, u * (1 + v), t[c]) for c, v in
                                (("value", shift), ("ci_low", low), ("ci_high", high))})
        assert near_uniform(res, "attention-distance") is verdict, (shift, low, high)
        assert bool(uniform_sentences({"u": res})) is verdict
    with pytest.raises(UsageError, match="--baseline 'zero' is not valid; expected one of random"):
        analyze({"u": str(tmp_path / "u.safetensors")}, data, tmp_path / "x", analyses=["nmi"], images=3,
                progress=False, baseline="zero")


@pytest.mark.parametrize("scale", ["shared", "figure"])
def test_similarity_matrices_share_one_colour_scale_unless_asked(data, tmp_path, scale):
    from analysis import make_loader, run_analyses
    from analysis.plots import plot_attention_similarity, plot_cka

    loader, _ = make_loader(data, (32, 32), batch_size=3, workers=0)
    res = run_analyses(_vit("local"), loader, ["attention-similarity", "cka"], model_name="m", progress=False,
                       matrix_scale=scale)
    for plot, key in ((plot_attention_similarity, "attention_similarity"), (plot_cka, "cka")):
        clim = plot({"m": res}).axes[0].collections[0].get_clim()
        m = np.asarray(res.arrays[key])
        want = (0.0, 1.0) if scale == "shared" else (float(m.min()), float(m.max()))
        assert clim == pytest.approx(want), (key, clim)
