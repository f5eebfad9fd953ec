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
    assert rows["layer"].tolist() == [1, 2, 3] and set(rows["n_images"]) == {4} and set(rows["head"]) == {-1}
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


def readme_plugin_command() -> list[str]:
    import shlex

    section = README.read_text().split("## Your own analysis", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has exactly one shell block: the command that runs the plugin"
    return shlex.split(blocks[0].replace("\\\n", " "))


def test_readme_plugin_command_writes_rows_and_a_figure(clean_registry, tmp_path, photos):
    """The README's command, as written but for its paths: ``kamim-analyze run --plugin token_norm.py ...``
    puts the plugin's rows into metrics.csv and draws its figure."""
    import pandas as pd
    from PIL import Image

    from analysis.cli import main

    (tmp_path / "token_norm.py").write_text(readme_plugin())
    data = tmp_path / "val"
    data.mkdir()
    for name, image in list(photos.items())[:4]:
        Image.fromarray(image).save(data / f"{name}.png")
    argv = readme_plugin_command()
    assert argv[:2] == ["kamim-analyze", "run"] and "--plugin" in argv
    paths = {"--plugin": str(tmp_path / argv[argv.index("--plugin") + 1]), "--data": str(data),
             "--out": str(tmp_path / "out"), "--images": "4"}
    argv = [paths.get(prev, arg) for prev, arg in zip([None, *argv], argv)]
    model = argv.index("--model") + 1
    argv[model] = argv[model].split("=")[0] + "=test_vit"  # a timm model name: random init, nothing fetched
    assert main([*argv[1:], "--quiet"]) == 0
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    rows = metrics[metrics["metric"] == "token-norm"]
    assert sorted(rows["layer"]) == [1, 2, 3, 4, 5, 6] and (rows["value"] > 0).all() and set(rows["n_images"]) == {4}
    assert (tmp_path / "out" / "token_norm.png").stat().st_size > 1000 and (tmp_path / "out" / "token_norm.pdf").is_file()


def test_bad_plugins_are_one_line_errors(clean_registry, tmp_path, capsys):
    from analysis.cli import main

    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('oops')\n")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    (tmp_path / "data").mkdir()
    base = ["run", "--model", "A=test_vit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--quiet"]
    for plugin, message in [(tmp_path / "nope.py", "no such file"), (broken, "failed: RuntimeError: oops"),
                            (empty, "registers no analysis"), (tmp_path / "x.txt", "is not a .py file")]:
        assert main([*base, "--plugin", str(plugin)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
