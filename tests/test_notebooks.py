"""The notebooks execute top to bottom (nbclient) on tiny settings and produce their figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
OVERRIDES = ["run.max_steps=1", "optim.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def nb_env(tmp_path_factory):
    """Tiny demo checkpoints (one optimizer step each) and real photographs for the notebooks."""
    from analysis.demo import ensure_demo_checkpoints
    from kamim.data import write_labelled_demo

    root = tmp_path_factory.mktemp("nb")
    data = Path(write_labelled_demo(root / "photos", n_train_per_class=1, n_val_per_class=2,
                                    size=48, photos=["astronaut", "coffee", "chelsea"])) / "val"
    cache = root / "cache"
    ensure_demo_checkpoints(cache, fast=True, progress=False, overrides=OVERRIDES, data=data)
    return {"KAMIM_NB_FAST": "1", "KAMIM_NB_CACHE": str(cache),
            "KAMIM_NB_OVERRIDES": json.dumps(OVERRIDES), "KAMIM_NB_TRAIN_DATA": str(data),
            "KAMIM_NB_EVAL_DATA": str(data), "KAMIM_NB_OUT": str(root / "paper-out")}


def _execute(name: str, env: dict, monkeypatch, tmp_path) -> "nbformat.NotebookNode":
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def _outputs(nb, output_type=None):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if output_type is None or o.output_type == output_type]


def _check_thin_and_parametrised(nb) -> None:
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "KAMIM_NB_FAST" in code[0].source
    for cell in code:  # thin over the library: no function or class definitions in cells
        assert "def " not in cell.source and "class " not in cell.source


def test_notebooks_are_clean_and_listed():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["keypoint_weighting.ipynb", "paper_figures.ipynb", "quickstart.ipynb"]
    readme = (NOTEBOOKS / "README.md").read_text()
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert not _outputs(nb), f"{name} is committed with outputs"
        _check_thin_and_parametrised(nb)
        assert name in readme


@pytest.mark.slow
def test_quickstart_executes(nb_env, monkeypatch, tmp_path):
    nb = _execute("quickstart.ipynb", nb_env, monkeypatch, tmp_path)
    assert not _outputs(nb, "error")
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # distance, NMI, Fourier, CKA
    text = " ".join(o["data"].get("text/plain", "") for o in _outputs(nb, "execute_result"))
    assert "kamim-pretrain" in text and "SimMIM" in text and "MoCo v3" in text


@pytest.mark.slow
def test_paper_figures_notebook_executes(nb_env, monkeypatch, tmp_path):
    from analysis.paper import PAPER_FIGURES

    nb = _execute("paper_figures.ipynb", nb_env, monkeypatch, tmp_path)
    assert not _outputs(nb, "error")
    out = Path(nb_env["KAMIM_NB_OUT"])
    for stem in PAPER_FIGURES.values():
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.pdf").is_file(), stem


@pytest.mark.slow
def test_keypoint_weighting_executes(nb_env, monkeypatch, tmp_path):
    nb = _execute("keypoint_weighting.ipynb", nb_env, monkeypatch, tmp_path)
    assert not _outputs(nb, "error")
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    from kamim.keypoints import DETECTORS

    assert len(images) == 2 + len(DETECTORS) - 1  # maps, FAST sweep, one per other detector
