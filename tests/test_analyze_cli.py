"""`kamim-analyze` end to end on tiny ViTs and real photographs, its bad-input errors, paper figures."""
from __future__ import annotations

import hashlib
from html import escape as html_escape
import json
import shutil
import os
import stat
import re
from pathlib import Path

import pandas as pd
import yaml
import pytest
import timm
import torch

from analysis import cli, pipeline
from analysis.runner import ANALYSES
from kamim.serialization import save_safetensors

FAST = ["--images", "6", "--batch-size", "4", "--quiet", "--option", "tsne_samples=30",
        "--option", "attribution_steps=2", "--option", "map_images=2"]


def _export(path: Path, seed: int, method: str = "simmim", **kw) -> Path:
    """A tiny random timm ViT saved like the pretraining engine's encoder.safetensors."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    kwargs.update(kw)
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    meta = {"format": "kamim-encoder", "model_name": "vit_tiny_patch16_224",
            "kwargs": json.dumps(kwargs), "method": method}
    return save_safetensors(model.state_dict(), path, metadata=meta)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from kamim.data import write_labelled_demo

    root = tmp_path_factory.mktemp("assets")
    data = write_labelled_demo(root / "photos", n_train_per_class=1, n_val_per_class=2, size=48,
                               photos=["astronaut", "coffee", "chelsea"])
    return {
        "data": Path(data) / "val",
        "a": _export(root / "a.safetensors", 0),
        "b": _export(root / "b.safetensors", 1),
        "b48": _export(root / "b48.safetensors", 2, img_size=48),
        "rect": _export(root / "rect.safetensors", 3, img_size=(32, 48)),
        "root": root,
    }


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


@pytest.mark.parametrize("argv,expected", [
    ([], ["run", "paper-figures", "plot", "demo"]),
    (["plot"], ["RESULTS_DIR", "--out", "--allow-mixed", "--overwrite"]),
    (["run"], ["--model", "--data", "--out", "--analyses", "--images", "--batch-size",
               "--image-size", "--device", "--seed", "--workers", "attention-distance"]),
    (["paper-figures"], ["--simmim", "--kamim", "--moco", "--data", "--out"]),
    (["demo"], ["--out", "--fast", "--cache"]),
])
def test_help_of_every_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text


def test_run_all_analyses_end_to_end(assets, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run(["run", "--model", f"A={assets['a']}", "--model", f"B={assets['b']}",
                            "--data", assets["data"], "--out", out, *FAST], capsys)
    assert rc == 0, err
    figures = [a.replace("-", "_") for a in ANALYSES] + ["cross_cka", "cross_mutual_knn", "cross_cknna"]
    for stem in figures:
        for ext in ("pdf", "png"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    for name in ("metrics.csv", "metrics.json", "summary.csv", "report.html"):
        assert (out / name).is_file()
    for model in ("A", "B"):
        assert (out / "raw" / model / "arrays.npz").is_file()

    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["model"]) == {"A", "B", "A vs B"}
    dist = metrics[(metrics["metric"] == "attention-distance") & (metrics["head"] == -1)]
    assert sorted(dist[dist.model == "A"]["layer"]) == [1, 2]
    assert set(dist["n_images"]) == {6}
    assert len(json.loads((out / "metrics.json").read_text())) == len(metrics)

    html = (out / "report.html").read_text()
    for stem in figures:
        assert f'href="{stem}.png"' in html and f'href="{stem}.pdf"' in html
    assert html.count("data:image/png;base64,") == len(figures)
    for model_file in ("a.safetensors", "b.safetensors"):
        assert model_file in html
    sha = __import__("hashlib").sha256(assets["a"].read_bytes()).hexdigest()
    assert sha in html and "kamim-encoder" in html and "32 px, 4×4 × 8 px" in html
    assert "attention distance (px)" in stdout and str(out) in stdout
    _no_leftovers(tmp_path)


def test_run_timm_name_and_common_resolution(assets, tmp_path, capsys):
    out = tmp_path / "same"
    rc, _, err = _run(["run", "--model", "T=test_vit", "--model", f"B48={assets['b48']}",
                       "--data", assets["data"], "--out", out, "--analyses",
                       "attention-distance,nmi", "--image-size", "32", *FAST], capsys)
    assert rc == 0, err
    html = (out / "report.html").read_text()
    assert "all models at 32 px" in html and "timm-name" in html
    meta = {m: json.loads((out / "raw" / m / "meta.json").read_text()) for m in ("T", "B48")}
    assert meta["T"]["geometry"]["img_size"] == [32, 32]  # test_vit is natively 160 px
    assert meta["B48"]["geometry"]["grid"] == [4, 4]
    assert sorted(p.name for p in out.glob("*.png")) == ["attention_distance.png", "nmi.png"]

    out2 = tmp_path / "own"
    rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--model", f"B48={assets['b48']}",
                       "--data", assets["data"], "--out", out2, "--analyses", "cka", *FAST],
                      capsys)
    assert rc == 0, err
    html = (out2 / "report.html").read_text()
    assert "each model at its own resolution" in html
    # 32 px vs 48 px: compared on the same image files, each model at its own resolution
    assert (out2 / "cross_cka.png").is_file() and (out2 / "cross_mutual_knn.png").is_file()


def _bad_cases(assets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    textonly = tmp_path / "textonly"
    textonly.mkdir()
    (textonly / "notes.txt").write_text("not an image")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    good = ["--model", f"A={assets['a']}"]
    data = ["--data", str(assets["data"])]
    return {
        "missing checkpoint": ([*data, "--model", f"A={tmp_path / 'nope.safetensors'}"],
                               r"model A: checkpoint not found: .*nope\.safetensors"),
        "unreadable checkpoint": ([*data, "--model", f"G={garbage}"], r"model G: cannot load"),
        "unknown analysis": ([*data, *good, "--analyses", "nmi,bogus"],
                             r"unknown analysis 'bogus'; valid: all, attention-distance, nmi"),
        "empty folder": (["--data", str(empty), *good], r"--data: no image files .* found"),
        "imageless folder": (["--data", str(textonly), *good], r"--data: no image files"),
        "missing folder": (["--data", str(tmp_path / "nowhere"), *good], r"image folder not found"),
        "zero images": ([*data, *good, "--images", "0"], r"^kamim-analyze: error: images must be >= 1 \(or null: all\), got 0$"),
        "non-square grid": ([*data, "--model", f"R={assets['rect']}", "--analyses", "fourier"],
                            r"model R: Fourier analysis needs a square token grid, got 4x6"),
        "unknown option": ([*data, *good, "--analyses", "nmi", "--option", "colour=red"],
                           r"unknown analysis option colour; valid: similarity_kind, cka_pool"),
        "duplicate model names": ([*data, *good, "--model", f"A={assets['b']}"],
                                  r"model names must be unique, repeated: A"),
        "image size not a multiple of the patch": ([*data, *good, "--image-size", "36"],
                                                   r"image size 36x36 is not a multiple of its "
                                                   r"patch size 8x8"),
        "attribution without labels": (["--data", str(assets["root"] / "flat"), *good,
                                        "--analyses", "attribution"],
                                       r"attribution needs images in at least 2 class subfolders"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "unreadable checkpoint", "unknown analysis",
                                  "empty folder", "imageless folder", "missing folder",
                                  "zero images", "non-square grid", "unknown option",
                                  "image size not a multiple of the patch",
                                  "duplicate model names", "attribution without labels"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, assets, tmp_path, capsys):
    flat = assets["root"] / "flat"
    if not flat.exists():
        flat.mkdir()
        for p in sorted(assets["data"].rglob("*.png"))[:2]:
            (flat / p.name).write_bytes(p.read_bytes())
    args, pattern = _bad_cases(assets, tmp_path)[case]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    rc, stdout, err = _run(["run", *args, "--out", out, "--quiet", "--images", "4"]
                           if "--images" not in args else ["run", *args, "--out", out, "--quiet"],
                           capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kamim-analyze: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert [p.name for p in work.iterdir()] in ([], [".out.lock"])  # no half-written staging folder


def test_out_holding_user_files_is_refused_and_kept(assets, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.txt").write_text("my data")
    argv = ["run", "--model", f"A={assets['a']}", "--data", assets["data"], "--out", out,
            "--analyses", "nmi", "--quiet"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "holds files this command did not write (notes.txt, sub); choose an empty" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes.txt", "sub", "sub/data.txt"]
    _no_leftovers(tmp_path)
    old = os.umask(0o022)
    try:  # --overwrite writes into it and keeps the user's files; the outputs follow the umask
        rc, stdout, _ = _run(argv + ["--overwrite"], capsys)
        assert rc == 0 and f"wrote 1 figure, metrics.csv, metrics.json and report.html to {out}" in stdout
        assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "data.txt").read_text() == "my data"
        assert (out / "nmi.png").is_file()
        (out / "nmi.png").write_bytes(b"stale")  # the command's own file: replaced by the next run
        (out / "mine").mkdir()
        (out / "mine" / "a.txt").write_text("added after the run")
        assert _run(argv, capsys)[0] == 0  # an earlier output of this command: no --overwrite needed
    finally:
        os.umask(old)
    assert (out / "nmi.png").stat().st_size > 1000
    assert (out / "notes.txt").read_text() == "my notes" and (out / "mine" / "a.txt").read_text() == "added after the run"
    assert (out / "sub" / "data.txt").read_text() == "my data"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "report.html").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "raw").stat().st_mode) == 0o755
    _no_leftovers(tmp_path)


def test_demo_refuses_a_foreign_out_before_training(tmp_path, monkeypatch):
    from analysis import demo

    monkeypatch.setattr(demo, "ensure_demo_checkpoints", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "report.txt").write_text("someone else's")
    assert cli.main(["demo", "--out", str(tmp_path), "--quiet"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_failed_run_leaves_existing_output_untouched(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--data", assets["data"], "--out", out,
                       "--analyses", "nmi", "--option", "tsne_samples=0", "--quiet", "--overwrite"], capsys)
    assert rc == 2 and "option tsne_samples must be a positive int" in err  # refused by the runner
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _no_leftovers(tmp_path)


def test_argparse_errors_are_one_line_exit_2(capsys, tmp_path):
    assert cli.main(["run", "--data", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kamim-analyze: error: no models: give --model NAME=CHECKPOINT (or models: {NAME: CHECKPOINT})"]
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--bogus"])
    assert exc.value.code == 2
    if not torch.cuda.is_available():
        assert cli.main(["run", "--model", "A=test_vit", "--data", ".", "--out", str(tmp_path / "o"),
                         "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_parsers_and_staged_output(tmp_path):
    assert pipeline.parse_model_spec("KAMIM=/x/y.pt") == pipeline.ModelSpec("KAMIM", "/x/y.pt")
    assert pipeline.parse_model_spec("/x/run/encoder.safetensors") == pipeline.ModelSpec(
        "encoder", "/x/run/encoder.safetensors")
    assert pipeline.parse_model_spec("vit_small_patch16_224") == pipeline.ModelSpec(
        "vit_small_patch16_224", "vit_small_patch16_224")
    with pytest.raises(pipeline.UsageError, match="NAME=CHECKPOINT"):
        pipeline.parse_model_spec("A=")
    assert pipeline.parse_analyses("all") == ANALYSES
    assert pipeline.parse_analyses("nmi, attention-distance") == ("attention-distance", "nmi")
    assert cli.parse_option("map_queries=[[1, 2]]") == ("map_queries", [[1, 2]])
    assert cli.parse_option("tsne-samples=5") == ("tsne_samples", 5)

    out = tmp_path / "res"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(pipeline.UsageError, match=r"holds files this command did not write \(old.txt\)"):
        with pipeline.staged_output(out):
            pass
    with pipeline.staged_output(out, overwrite=True) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # nothing replaced before success
    # --overwrite: the user's old.txt is kept, the command's files are added
    assert sorted(p.name for p in out.iterdir()) == [".kamim-output.json", "new.txt", "old.txt"]
    assert json.loads((out / ".kamim-output.json").read_text())["files"] == ["new.txt"]
    with pytest.raises(RuntimeError):
        with pipeline.staged_output(out) as staging:  # its own earlier output: may be replaced
            (staging / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [".kamim-output.json", "new.txt", "old.txt"]
    with pipeline.staged_output(out) as staging:
        (staging / "newer.txt").write_text("newer")
    # what the command wrote before (new.txt) is replaced, what it did not write (old.txt) is kept
    assert sorted(p.name for p in out.iterdir()) == [".kamim-output.json", "newer.txt", "old.txt"]
    assert (out / "old.txt").read_text() == "old"
    with pytest.raises(pipeline.UsageError, match="an output of 'kamim-analyze run'"):
        with pipeline.staged_output(out, command="kamim-analyze demo"):
            pass
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------ paper figures
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, assets):
    """SimMIM, KAMIM and MoCo v3 training checkpoints of the tiny presets (one optimizer step)."""
    from analysis.demo import ensure_demo_checkpoints

    cache = tmp_path_factory.mktemp("demo-cache")
    overrides = ["run.max_steps=1", "optim.batch_size=4", "data.num_workers=0"]
    ckpts = ensure_demo_checkpoints(cache, fast=True, progress=False, overrides=overrides,
                                    data=assets["data"])
    return cache, overrides, ckpts


def test_demo_checkpoints_are_cached(pretrained, assets):
    from analysis.demo import demo_checkpoints, ensure_demo_checkpoints

    cache, overrides, ckpts = pretrained
    assert set(ckpts) == {"SimMIM", "KAMIM", "MoCo v3"}
    mtimes = {n: p.stat().st_mtime_ns for n, p in ckpts.items()}
    again = ensure_demo_checkpoints(cache, fast=True, progress=False, overrides=overrides,
                                    data=assets["data"])  # second call: no training
    assert again == ckpts and {n: p.stat().st_mtime_ns for n, p in again.items()} == mtimes
    assert demo_checkpoints(cache, fast=True, overrides=overrides, data=assets["data"]) == ckpts
    with pytest.raises(FileNotFoundError, match="kamim-analyze demo --fast --cache"):
        demo_checkpoints(cache, fast=True)  # the standard fast demo was never trained here


def test_paper_queries_same_relative_position():
    from analysis.paper import paper_queries

    assert paper_queries((12, 12)) == ((6, 6), (3, 9))
    assert paper_queries((14, 14)) == ((7, 7), (3, 10))
    assert paper_queries((24, 24)) == ((12, 12), (6, 18))


@pytest.mark.slow
def test_paper_figures_end_to_end(pretrained, assets, tmp_path, capsys):
    from analysis.paper import PAPER_FIGURES, paper_queries

    _, _, ckpts = pretrained
    out = tmp_path / "paper"
    rc, stdout, err = _run(["paper-figures", "--simmim", ckpts["SimMIM"], "--kamim", ckpts["KAMIM"],
                            "--moco", ckpts["MoCo v3"], "--data", assets["data"], "--out", out,
                            "--mim-image-size", "48", *FAST], capsys)
    assert rc == 0, err
    for key, stem in PAPER_FIGURES.items():
        assert (out / f"{stem}.pdf").is_file() and (out / f"{stem}.png").is_file(), stem
        assert (out / f"{stem}.csv").is_file(), stem
    dist = pd.read_csv(out / "fig_attention_distance.csv")
    assert set(dist["model"]) == {"SimMIM", "KAMIM", "MoCo v3"}
    assert sorted(dist["layer"].unique()) == list(range(1, 7))  # vit_pico: 6 blocks
    fourier = pd.read_csv(out / "fig_fourier_analysis.csv")
    assert sorted(fourier["layer"].unique()) == list(range(0, 7))
    maps = pd.read_csv(out / "fig_attention_maps.csv")
    mim = maps[maps.model == "KAMIM"]
    assert set(map(tuple, mim[["query_row", "query_col"]].drop_duplicates().values)) == \
        set(paper_queries((6, 6)))  # 48 px / 8 px
    moco = maps[maps.model == "MoCo v3"]  # MoCo at its own 96 px: 12x12 grid
    assert set(map(tuple, moco[["query_row", "query_col"]].drop_duplicates().values)) == \
        set(paper_queries((12, 12)))
    sums = mim.groupby(["layer", "query_row", "query_col"])["attention"].sum()
    assert sums.values == pytest.approx(1.0, abs=1e-5)  # each map is one attention row
    recon = pd.read_csv(out / "fig_reconstructions.csv")
    assert set(recon["model"]) == {"SimMIM", "KAMIM"} and (recon["psnr"] > 0).all()
    html = (out / "report.html").read_text()
    for stem in PAPER_FIGURES.values():
        assert f'href="{stem}.png"' in html
    assert "48 px, 6×6 × 8 px" in html and "96 px, 12×12 × 8 px" in html
    # the report says how the images were preprocessed: the reference notebooks' bilinear eval transform
    assert "short side resized to size / 0.875 (bilinear), centre crop" in html
    assert "the reference notebooks&#x27; preprocessing." in html
    assert yaml.safe_load((out / "config.yaml").read_text())["interpolation"] == "bilinear"
    # every figure's caption names the reference conventions it does not copy; a redraw keeps them
    from analysis.paper import paper_captions

    for caption in paper_captions().values():
        assert html_escape(caption) in html
    assert "blocks 1-11 for SimMIM/KAMIM but blocks 1-12 for MoCo v3" in html
    assert _run(["plot", out, "--out", tmp_path / "redrawn"], capsys)[0] == 0
    assert html_escape(paper_captions()["nmi"]) in (tmp_path / "redrawn" / "report.html").read_text()
    # the resolved settings are written with the figures, and rerunning from them gives the same numbers
    again = tmp_path / "again"
    rc, _, err = _run(["paper-figures", "--config", out / "config.yaml", "--out", again], capsys)
    assert rc == 0, err
    for name in ("metrics.csv", "fig_attention_distance.csv", "fig_reconstructions.csv", "config.yaml"):
        assert (out / name).read_text() == (again / name).read_text(), name


def test_out_overlapping_an_input_is_refused_even_with_overwrite(assets, tmp_path, capsys):
    """``--data imgs --out imgs --overwrite`` used to delete the input images."""
    imgs = tmp_path / "imgs"
    shutil.copytree(assets["data"], imgs)
    before = sorted(p.relative_to(imgs) for p in imgs.rglob("*"))
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "a.safetensors"
    shutil.copy(assets["a"], ckpt)
    for out, message in [(imgs, f"--out '{imgs}' is the --data folder"),
                         (imgs / "results", "lies inside the --data folder"),
                         (ckpt_dir, f"--out '{ckpt_dir}' contains the checkpoint of model A")]:
        rc, _, err = _run(["run", "--model", f"A={ckpt}", "--data", imgs, "--out", out, "--analyses", "nmi",
                           "--quiet", "--overwrite"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.relative_to(imgs) for p in imgs.rglob("*")) == before and ckpt.is_file()


def test_more_images_asked_than_the_folder_has_is_said_once(assets, tmp_path, capsys, caplog):
    import logging

    n = len([p for p in assets["data"].rglob("*.png")])
    with caplog.at_level(logging.WARNING, logger="kamim.analyze"):
        rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--model", f"B={assets['b']}", "--data",
                           assets["data"], "--out", tmp_path / "o", "--analyses", "nmi", "--images", n + 10,
                           "--quiet"], capsys)
    assert rc == 0, err
    said = [r.getMessage() for r in caplog.records if "--images" in r.getMessage()]
    assert said == [f"--images {n + 10}: the folder has {n} images, all of which are analysed."]
    assert said[0] in (tmp_path / "o" / "report.html").read_text()


def test_paper_figures_from_run_directories_include_the_reconstructions(pretrained, assets, tmp_path, capsys):
    """Given `kamim pretrain` run directories (whose encoder export has no decoder), the reconstructions
    come from their checkpoint-last.pt; nothing is dropped silently."""
    _, _, ckpts = pretrained
    runs = {n: p.parent for n, p in ckpts.items()}
    assert all((r / "checkpoint-last.pt").is_file() and (r / "encoder.safetensors").is_file() for r in runs.values())
    out = tmp_path / "paper"
    rc, _, err = _run(["paper-figures", "--simmim", runs["SimMIM"], "--kamim", runs["KAMIM"], "--moco",
                       runs["MoCo v3"], "--data", assets["data"], "--out", out, "--mim-image-size", "48", *FAST],
                      capsys)
    assert rc == 0, err
    recon = pd.read_csv(out / "fig_reconstructions.csv")
    assert set(recon["model"]) == {"SimMIM", "KAMIM"} and (out / "fig_reconstructions.png").is_file()
    assert "Reconstructions skipped" not in (out / "report.html").read_text()


def test_pass_memory_lower_bound_is_the_captured_maps_and_one_blocks_transients():
    from analysis.runner import pass_bytes
    from kamim.backbone import ViTGeometry

    g = ViTGeometry(img_size=(32, 32), patch_size=(8, 8), grid=(4, 4), num_prefix_tokens=1, depth=2, num_heads=3,
                    embed_dim=16)
    scores, tokens = 2 * 3 * 17 * 17 * 4, 2 * 17 * 16 * 4  # batch 2: B x heads x N x N, B x N x D floats
    assert pass_bytes(g, 2, {"attention"}) == 2 * scores + scores + 4 * tokens  # + the scores before softmax
    assert pass_bytes(g, 2, {"tokens", "embedding"}) == 2 * tokens + tokens + 4 * tokens  # fused attention
    assert pass_bytes(g, 2, {"inputs"}) == 4 * tokens


def test_a_pass_that_cannot_fit_in_memory_is_refused_before_it_starts(assets, tmp_path, capsys, monkeypatch):
    """The bound, the memory left and a batch size under it, before any output is written; with too
    little for one image, the largest --image-size that fits."""
    import kamim
    from analysis.registry import get
    from analysis.runner import pass_bytes
    from kamim import load_encoder

    geometry = load_encoder(assets["a"]).geometry
    needs = get("attention-distance").needs
    monkeypatch.setattr(kamim, "available_memory", lambda device: pass_bytes(geometry, 4, needs) - 1)
    argv = ["run", "--model", f"a={assets['a']}", "--data", assets["data"], "--out", tmp_path / "o",
            "--analyses", "attention-distance", *FAST]
    rc, _, err = _run(argv, capsys)
    assert pass_bytes(geometry, 4, needs) == 3 * 9248 + 4 * 8704  # (2 blocks + 1) x 4 x 2 x 17 x 17, MLP hidden
    assert rc == 2 and err.strip() == (
        "kamim-analyze: error: model a: the analysis pass needs at least 61.1 KiB for a batch of 4 images at 32x32 "
        "px (17 tokens per image); cpu has 61.1 KiB available: use --batch-size 3 or less")
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(kamim, "available_memory", lambda device: pass_bytes(geometry, 1, needs) - 1)
    rc, _, err = _run([*argv, "--image-size", "64"], capsys)
    # one 32 px image needs one byte more than there is: 24 px (9 tokens) is the largest size under it
    assert rc == 2 and err.strip().endswith("use --batch-size 1 and --image-size 24 or less"), err


# ------------------------------------------------------------------------------------------ kamim-analyze plot
PLOT_ANALYSES = "attention-distance,nmi,cka,fourier,tsne,attention-maps"


def _figure_set(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".pdf", ".html"))


def test_plot_redraws_every_figure_and_the_report_from_saved_results_alone(assets, tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(assets["a"], a)
    shutil.copy(assets["b"], b)
    run = tmp_path / "run"
    rc, _, err = _run(["run", "--model", f"A={a}", "--model", f"B={b}", "--data", assets["data"], "--out", run,
                       "--analyses", PLOT_ANALYSES, *FAST], capsys)
    assert rc == 0, err
    figures, metrics = _figure_set(run), pd.read_csv(run / "metrics.csv")
    assert "cross_cka.png" in figures
    meta = json.loads((run / "raw" / "A" / "meta.json").read_text())["provenance"]
    assert meta["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest() and meta["versions"]["torch"]
    assert len(meta["data files"]) == 64 and meta["resolution"] == [32, 32]
    # the checkpoints gone, the figures, tables and report deleted: plot redraws them all
    a.unlink()
    b.unlink()
    for p in run.iterdir():
        if p.is_file() and p.suffix in (".png", ".pdf", ".html", ".csv", ".json"):
            p.unlink()
    rc, stdout, err = _run(["plot", run, "--out", tmp_path / "redrawn"], capsys)
    assert rc == 0, err
    assert _figure_set(tmp_path / "redrawn") == figures
    assert f"wrote {len(figures) // 2} figures" in stdout  # each figure is a .pdf and a .png
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "redrawn" / "metrics.csv"), metrics)
    # the redrawn output is itself saved results: plot it again; its config.yaml reruns the redraw
    assert _run(["plot", tmp_path / "redrawn", "--out", tmp_path / "again"], capsys)[0] == 0
    assert _figure_set(tmp_path / "again") == figures
    assert _run(["plot", "--config", tmp_path / "redrawn" / "config.yaml", "--out", tmp_path / "rerun"], capsys)[0] == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "rerun" / "metrics.csv"), metrics)
    rc, _, err = _run(["plot", "--out", tmp_path / "none"], capsys)
    assert rc == 2 and "no results: give RESULTS_DIR" in err


def test_plot_combines_separate_runs_into_the_table_of_one_run(assets, tmp_path, capsys):
    analyses = "attention-distance,nmi,fourier"
    common = ["--data", assets["data"], "--analyses", analyses, *FAST]
    for name, argv in (("both", ["--model", f"A={assets['a']}", "--model", f"B={assets['b']}"]),
                       ("a", ["--model", f"A={assets['a']}"]), ("b", ["--model", f"B={assets['b']}"])):
        assert _run(["run", *argv, "--out", tmp_path / name, *common], capsys)[0] == 0
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab"], capsys)
    assert rc == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ab" / "metrics.csv"),
                                  pd.read_csv(tmp_path / "both" / "metrics.csv"))
    assert _figure_set(tmp_path / "ab") == _figure_set(tmp_path / "both")
    # the same model twice, and runs on other images, are refused with one line
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "both", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and err.strip() == (f"kamim-analyze: error: model A is in both {tmp_path / 'a'} and "
                                       f"{tmp_path / 'both'}: combine outputs of different models (name them with "
                                       f"kamim-analyze run --model NAME=CHECKPOINT)")
    fewer = list(common)
    fewer[fewer.index("--images") + 1] = "3"
    assert _run(["run", "--model", f"B={assets['b']}", "--out", tmp_path / "b3", *fewer], capsys)[0] == 0
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "b3", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and err.strip() == (f"kamim-analyze: error: the results differ in images: 6 ({tmp_path / 'a'}) "
                                       f"vs 3 ({tmp_path / 'b3'}); pass --allow-mixed to combine them anyway")
    assert not (tmp_path / "x").exists()
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "b3", "--out", tmp_path / "x", "--allow-mixed"], capsys)
    assert rc == 0 and "Combined with --allow-mixed: the runs differ in images" in (tmp_path / "x" / "report.html").read_text()
    rc, _, err = _run(["plot", tmp_path / "nothing", "--out", tmp_path / "y"], capsys)
    assert rc == 2 and "holds no saved analysis results" in err
    # another preprocessing is another setting; a run saved before it was recorded used bicubic, 0.875
    assert _run(["run", "--model", f"B={assets['b']}", "--out", tmp_path / "b-bilinear", *common,
                 "--interpolation", "bilinear"], capsys)[0] == 0
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "b-bilinear", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "the results differ in preprocessing: {'interpolation': 'bicubic', 'crop_pct': 0.875}" in err
    for meta in (tmp_path / "a" / "raw").rglob("meta.json"):
        saved = json.loads(meta.read_text())
        del saved["provenance"]["preprocessing"]
        meta.write_text(json.dumps(saved))
    assert _run(["plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "legacy"], capsys)[0] == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "legacy" / "metrics.csv"),
                                  pd.read_csv(tmp_path / "both" / "metrics.csv"))


def test_baseline_random_from_the_command_line(assets, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--baseline", "random", "--data", assets["data"],
                       "--analyses", "attention-distance,nmi", "--out", out, *FAST], capsys)
    assert rc == 0, err
    assert set(pd.read_csv(out / "metrics.csv")["model"]) == {"A", "random-vit_tiny_patch16_224"}
    assert yaml.safe_load((out / "config.yaml").read_text())["baseline"] == "random"
    assert "random-vit_tiny_patch16_224: attention indistinguishable from uniform" in (out / "report.html").read_text()
    with pytest.raises(SystemExit) as exit_:
        _run(["run", "--model", f"A={assets['a']}", "--baseline", "zero", "--data", assets["data"],
              "--out", tmp_path / "x"], capsys)
    assert exit_.value.code == 2 and "argument --baseline: invalid choice: 'zero'" in capsys.readouterr().err


def test_reuse_analyses_only_the_models_without_matching_saved_results(assets, tmp_path, capsys, caplog):
    c = _export(tmp_path / "c.safetensors", 7)
    analyses = ["--data", assets["data"], "--analyses", "attention-distance,nmi,fourier", *FAST]
    models = ["--model", f"A={assets['a']}", "--model", f"B={assets['b']}"]
    assert _run(["run", *models, "--out", tmp_path / "ab", *analyses], capsys)[0] == 0
    assert _run(["run", *models, "--model", f"C={c}", "--out", tmp_path / "fresh", *analyses], capsys)[0] == 0
    with caplog.at_level("INFO", logger="kamim.analyze"):
        rc, _, err = _run(["run", *models, "--model", f"C={c}", "--out", tmp_path / "reused", "--reuse",
                           tmp_path / "ab", *analyses], capsys)
    assert rc == 0, err
    assert "reused the saved results of A, B; analysed C" in caplog.text
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "reused" / "metrics.csv"),
                                  pd.read_csv(tmp_path / "fresh" / "metrics.csv"))
    # other settings (here: the seed of the image subset) or another checkpoint: analysed again
    caplog.clear()
    with caplog.at_level("INFO", logger="kamim.analyze"):
        assert _run(["run", "--model", f"A={assets['b']}", "--model", f"B={assets['b']}", "--out", tmp_path / "x",
                     "--reuse", tmp_path / "ab", "--seed", "1", *analyses], capsys)[0] == 0
    assert "reused the saved results of no model; analysed A, B" in caplog.text
    # a matching model under another name is reused under the new name
    caplog.clear()
    with caplog.at_level("INFO", logger="kamim.analyze"):
        assert _run(["run", "--model", f"first={assets['a']}", "--out", tmp_path / "renamed", "--reuse",
                     tmp_path / "ab", *analyses], capsys)[0] == 0
    assert "reused the saved results of first; analysed no model" in caplog.text
    renamed = pd.read_csv(tmp_path / "renamed" / "metrics.csv")
    expected = pd.read_csv(tmp_path / "ab" / "metrics.csv").query("model == 'A'").assign(model="first")
    pd.testing.assert_frame_equal(renamed, expected.reset_index(drop=True))


def test_cross_model_analyses_from_saved_features_in_run_and_plot(assets, tmp_path, capsys):
    from analysis import load_run
    import numpy as np

    from analysis.crossmodel import FILES

    common = ["--data", assets["data"], "--analyses", "cka", *FAST]
    for name, argv in (("both", ["--model", f"A={assets['a']}", "--model", f"B={assets['b']}"]),
                       ("a", ["--model", f"A={assets['a']}"]), ("b", ["--model", f"B={assets['b']}"]),
                       ("twice", ["--model", f"A={assets['a']}", "--model", f"A2={assets['a']}"]),
                       ("b4", ["--model", f"B={assets['b']}", "--cross-images", "4"])):
        rc, _, err = _run(["run", *argv, "--out", tmp_path / name, *common], capsys)
        assert rc == 0, err
    # every model of every run on these images saved the same files in the same order
    saved = {(run, m): list(r.arrays[FILES]) for run in ("both", "a", "b", "twice")
             for m, r in load_run(tmp_path / run)[0].items()}
    assert len(set(map(tuple, saved.values()))) == 1 and len(next(iter(saved.values()))) == 6
    # the same checkpoint under two names: cross-model CKA is the within-model CKA of the cka analysis
    results, cross, *_ = load_run(tmp_path / "twice")
    np.testing.assert_allclose(cross[("A", "A2")].arrays["cka"], results["A"].arrays["cka"], rtol=1e-7)
    np.testing.assert_allclose(np.diag(cross[("A", "A2")].arrays["mutual_knn"]), 1.0)
    # plot combines two separate runs into the cross-model figures and rows of one run of both
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab"], capsys)
    assert rc == 0, err
    for stem in ("cross_cka", "cross_mutual_knn", "cross_cknna"):
        assert (tmp_path / "ab" / f"{stem}.png").is_file()
    rows = {run: pd.read_csv(tmp_path / run / "metrics.csv").query("model == 'A vs B'") for run in ("ab", "both")}
    assert set(rows["ab"]["metric"]) == {"cka-same-layer", "mutual-knn-same-layer", "cknna-same-layer",
                                         "mutual-knn-best-layer", "mutual-knn-best", "cross-cka",
                                         "cross-mutual-knn", "cross-cknna"}
    # the matrices are tidy rows: A's layer, column = B's layer
    entries = rows["ab"].query("metric == 'cross-cka'")
    matrix = np.full((2, 2), np.nan)  # depth 2
    matrix[entries.layer - 1, entries.column - 1] = entries.value
    np.testing.assert_allclose(matrix, load_run(tmp_path / "ab")[1][("A", "B")].arrays["cka"], rtol=1e-12)
    pd.testing.assert_frame_equal(rows["ab"].reset_index(drop=True), rows["both"].reset_index(drop=True))
    html = (tmp_path / "ab" / "report.html").read_text()
    assert "Mutual k-nearest-neighbour alignment (Huh et al. 2024)" in html
    # features of other images: refused with one line
    rc, _, err = _run(["plot", tmp_path / "a", tmp_path / "b4", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and err.strip().startswith("kamim-analyze: error: cross-model analyses need the same images: "
                                              "A saved features of 6 images") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--cross-k", "1", "--out", tmp_path / "y", *common],
                      capsys)
    assert rc == 2 and "cross_k must be an integer >= 2" in err
    # a run saved before models saved features (its cross-model results: the CKA only) redraws its CKA
    from analysis.crossmodel import FEATURES
    from analysis.pipeline import save_run

    results, cross, record, _ = load_run(tmp_path / "both")
    for r in results.values():
        r.arrays = {k: v for k, v in r.arrays.items() if k not in (FEATURES, FILES)}
    for r in cross.values():
        r.arrays = {"cka": r.arrays["cka"]}
    save_run(tmp_path / "old" / "raw", results, cross, record)
    assert _run(["plot", tmp_path / "old", "--out", tmp_path / "old-redrawn"], capsys)[0] == 0
    assert (tmp_path / "old-redrawn" / "cross_cka.png").is_file()
    assert not (tmp_path / "old-redrawn" / "cross_mutual_knn.png").exists()


def test_a_model_is_drawn_in_its_method_colour_whatever_the_order_of_model_flags(assets, tmp_path, capsys):
    import seaborn as sns
    from matplotlib.colors import to_rgb

    from analysis import load_run, plots
    from analysis.pipeline import model_palette

    k = _export(tmp_path / "k.safetensors", 5, method="kamim")
    common = ["--data", assets["data"], "--analyses", "attention-distance", "--baseline", "random", *FAST]
    styles = []
    for name, order in (("first", [f"S={assets['a']}", f"K={k}"]), ("last", [f"K={k}", f"S={assets['a']}"])):
        argv = [a for m in order for a in ("--model", m)]
        assert _run(["run", *argv, "--out", tmp_path / name, *common], capsys)[0] == 0
        results, _, record, _ = load_run(tmp_path / name)
        fig = plots.plot_analysis("attention-distance", results, palette=model_palette(results, record.models))
        lines = {l.get_label().split(" · ")[0]: l for l in fig.axes[0].lines if l.get_gid() != "uniform-baseline"}
        styles.append({n: (to_rgb(l.get_color()), l.get_marker()) for n, l in lines.items()})
    assert styles[0] == styles[1] and set(styles[0]) == {"S", "K", "random-vit_tiny_patch16_224"}
    blind = sns.color_palette("colorblind")
    assert styles[0]["S"][0] == pytest.approx(blind[0]) and styles[0]["K"][0] == pytest.approx(blind[1])
    assert styles[0]["random-vit_tiny_patch16_224"][0] == pytest.approx((0.5, 0.5, 0.5))  # random: grey


def test_seeds_under_one_model_name_are_drawn_as_their_mean_and_tabled_each(assets, tmp_path, capsys):
    import numpy as np
    from scipy import stats

    from analysis import load_run

    third = _export(tmp_path / "c.safetensors", 5, method="kamim")
    out = tmp_path / "seeds"
    rc, _, err = _run(["run", "--model", f"kamim={assets['a']},{assets['b']},{third}", "--model", f"other={assets['a']}",
                       "--data", assets["data"], "--out", out, "--analyses", "attention-distance,fourier,cka", *FAST],
                      capsys)
    assert rc == 0, err
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"kamim@1", "kamim@2", "kamim@3", "kamim", "other"} <= set(metrics["model"])  # every seed kept
    rows = metrics.query("metric == 'attention-distance' and head == -1 and layer == 2").set_index("model")
    seeds = rows.loc[["kamim@1", "kamim@2", "kamim@3"], "value"].to_numpy()
    low, high = stats.t.interval(0.95, 2, loc=seeds.mean(), scale=seeds.std(ddof=1) / np.sqrt(3))
    np.testing.assert_allclose(rows.loc["kamim", ["value", "ci_low", "ci_high"]].to_numpy(float),
                               [seeds.mean(), low, high], rtol=1e-9)
    np.testing.assert_allclose(rows.loc["kamim@1", "value"], rows.loc["other", "value"], rtol=1e-12)  # same file
    # the CKA matrix drawn for kamim is the mean of its seeds' matrices
    results, cross, record, _ = load_run(out)
    assert record.groups == {"kamim": ["kamim@1", "kamim@2", "kamim@3"]}
    cka = metrics.query("metric == 'cka' and layer == 1 and column == 2").set_index("model")["value"]
    assert cka["kamim"] == pytest.approx(cka[["kamim@1", "kamim@2", "kamim@3"]].mean(), rel=1e-9)
    # the figure draws kamim once, as the mean over seeds, with its band; the report says which seeds
    from analysis.plots import plot_attention_distance
    from analysis.seeds import shown_results

    shown = shown_results(results, record.groups)
    assert list(shown) == ["kamim", "other"]
    texts = [t.get_text() for t in plot_attention_distance(shown).axes[0].get_legend().get_texts()]
    assert any(t.startswith("kamim · 32 px") and "mean of 3 seeds" in t for t in texts)
    assert any("across seeds for a mean of seeds" in t for t in texts) and not any("kamim@" in t for t in texts)
    html = (out / "report.html").read_text()
    assert "kamim@1: " in html and "c.safetensors" in html
    # two-line captions (what is plotted; what the paper reports); the per-layer table gives each interval
    assert "shaded: 95% interval over images (across seeds for a mean of seeds). Higher = more global.<br>Paper: " in html
    assert "<th>95% interval</th>" in html and '<div class="table">' in html
    lo, hi = rows.loc["kamim", ["ci_low", "ci_high"]]
    assert f"{lo:.4g} – {hi:.4g}" in html
    # a redraw keeps the groups and the numbers
    rc, _, err = _run(["plot", out, "--out", tmp_path / "again"], capsys)
    assert rc == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "metrics.csv"), metrics)
    # an empty checkpoint in the list and a name that is also a seed's name: one line each
    for models, message in (([f"kamim={assets['a']},"], "model kamim: empty checkpoint in the list"),
                            ([f"kamim={assets['a']},{assets['b']}", f"kamim@1={assets['a']}"],
                             "model name 'kamim@1' is also the name of a seed")):
        rc, _, err = _run(["run", *[a for m in models for a in ("--model", m)], "--data", assets["data"],
                           "--out", tmp_path / "bad", *FAST], capsys)
        assert rc == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_evaluation_folders_are_read_once_and_bad_ones_refused_in_one_line(assets, tmp_path, capsys):
    from analysis.evaluations import evaluation_sentences, evaluation_table, read_evaluation

    lp, knn, ft = (tmp_path / n for n in ("lp", "knn", "ft"))
    for folder, name, summary in (
            (lp, "linprobe.json", {"task": "linprobe", "config": {"checkpoint": "runs/k"}, "epochs_done": 2,
                                   "num_val": 150, "final": [{"layer": 1, "top1": 3.3, "top5": 33.3, "best_top1": 4.0},
                                                             {"layer": 2, "top1": 10.0, "top5": 48.7, "best_top1": 10.0}]}),
            (knn, "knn.json", {"checkpoint": "runs/k", "num_val": 150,
                               "results": [{"layer": 2, "k": 20, "top1": 52.0, "top5": 97.3},
                                           {"layer": 2, "k": 200, "top1": 44.0, "top5": 93.3}]}),
            (ft, "finetune.json", {"task": "finetune", "config": {"checkpoint": "runs/k"}, "epochs_done": 1,
                                   "num_val": 150, "final": {"top1": 15.3, "top5": 63.3}, "best": {"top1": 16.0}})):
        folder.mkdir()
        (folder / name).write_text(json.dumps(summary))
    evals = [read_evaluation("K", f) for f in (lp, knn, ft)]
    assert evaluation_sentences(evals) == [
        "K: linear probe top-1 10.00% (block 2, 2 epochs, on 150 images); k-NN top-1 52.00% (block 2, k = 20, on 150 "
        "images); finetune top-1 15.30% (whole network, 1 epoch, on 150 images)."]
    table = evaluation_table(evals)
    assert table[["evaluation", "layer", "k", "top1"]].values.tolist() == [
        ["linear probe", 1, -1, 3.3], ["linear probe", 2, -1, 10.0], ["k-NN", 2, 20, 52.0], ["k-NN", 2, 200, 44.0],
        ["finetune", -1, -1, 15.3]]
    assert set(table["checkpoint"]) == {"runs/k"}
    # refused before anything is loaded, one line each, nothing written
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "knn.json").write_text("{not json")
    for value, message in ((f"X={lp}", "--evaluation X=...: no model 'X' (models: A)"),
                           (f"A={tmp_path / 'empty'}", "holds none of linprobe.json, knn.json, finetune.json"),
                           (f"A={tmp_path / 'bad'}", "is not readable JSON"),
                           (str(lp), "--evaluation needs NAME=RUN_DIR")):
        rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--evaluation", value, "--data", assets["data"],
                           "--out", tmp_path / "out", *FAST], capsys)
        assert rc == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    # the output may not be written into an evaluation folder (the command did not write it)
    rc, _, err = _run(["run", "--model", f"A={assets['a']}", "--evaluation", f"A={lp}", "--data", assets["data"],
                       "--out", lp / "analysis", *FAST], capsys)
    assert rc == 2 and "--evaluation 1 (A)" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in lp.iterdir()) == ["linprobe.json"]
