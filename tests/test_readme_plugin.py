"""The README's "Your own analysis" example runs as written: loaded as a plugin file, run through
run_analyses on real photographs, its rows are the true mean token norms and it draws its figure;
an entry point in the group ``kamim.analyses`` is honoured."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import registry
from analysis.capture import capture
from analysis.runner import run_analyses

import analysis_models

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def clean_registry():
    """Restore the registry (and the plugin / entry-point bookkeeping) after the test."""
    saved, plugins, state = dict(registry._REGISTRY), dict(registry._PLUGINS), dict(registry._STATE)
    yield
    registry._restore(saved)
    registry._PLUGINS.clear()
    registry._PLUGINS.update(plugins)
    registry._STATE.update(state)


def readme_plugin() -> str:
    text = README.read_text()
    section = text.split("## Your own analysis", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has exactly one Python block: the plugin file"
    return blocks[0]


def test_readme_plugin_runs_into_rows_and_a_figure(clean_registry, tmp_path, photos):
    path = tmp_path / "token_norm.py"
    path.write_text(readme_plugin())
    assert registry.load_plugin(path) == ["token-norm"]
    assert registry.load_plugin(path) == ["token-norm"]  # loading twice is harmless
    assert "token-norm" in registry.names() and registry.get("token-norm").figure_stem == "token_norm"

    model = analysis_models.tiny_vit(seed=0, reg_tokens=2).eval()
    x = analysis_models.photo_batch(photos.values(), n=4, size=32)
    result = run_analyses(model, [x[:3], x[3:]], ["token-norm", "nmi"], model_name="tiny", progress=False,
                          batch_size=2)
    rows = result.metric("token-norm").sort_values("layer")
    assert rows["layer"].tolist() == [1, 2, 3] and set(rows["images"]) == {4} and set(rows["head"]) == {-1}
    tokens = capture(model, x, block_output=True).block_output
    expected = [tokens[l][:, 3:].double().norm(dim=-1).mean().item() for l in (1, 2, 3)]  # 1 cls + 2 registers
    np.testing.assert_allclose(rows["value"].to_numpy(), expected, rtol=1e-6)
    assert len(set(np.round(expected, 3))) == 3  # the layers really differ

    from analysis import plots

    plots.plot_analysis("token-norm", {"tiny": result}, out=tmp_path / "token_norm")
    assert (tmp_path / "token_norm.png").stat().st_size > 1000 and (tmp_path / "token_norm.pdf").is_file()
    assert plots.FIGURE_TITLES["token-norm"] == "Mean token norm per layer"


def test_entry_point_analyses_are_loaded_once_lazily(clean_registry, monkeypatch):
    import importlib.metadata

    from analysis.registry import Analysis

    class Plain:
        def __init__(self, context):
            self.n = 0

        def update(self, batch):
            self.n += len(batch)

        def merge(self, other):
            self.n += other.n

        def finish(self):
            return [], {"count": np.asarray(self.n)}

    made = Analysis("image-count", "Images", frozenset({"inputs"}), frozenset({"vit", "swin"}), Plain)
    loads = []

    class EntryPoint:
        name, value = "image-count", "pkg.module:ANALYSIS"

        def load(self):
            loads.append(1)
            return made

    def entry_points(group=None, **kw):
        return [EntryPoint()] if group == "kamim.analyses" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry._STATE["entry_points"] = False
    assert registry.get("image-count") is made and "image-count" in registry.names() and loads == [1]
    model = analysis_models.tiny_vit(seed=0).eval()
    res = run_analyses(model, [torch.zeros(3, 3, 32, 32)], ["image-count"], model_name="m", progress=False)
    assert int(res.arrays["count"]) == 3 and res.table.empty

    class Broken(EntryPoint):
        def load(self):
            raise ImportError("No module named 'pkg'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [Broken()])
    with pytest.raises(ValueError, match=r"entry point 'image-count' .* failed: ImportError: No module named 'pkg'"):
        registry.load_entry_points()
