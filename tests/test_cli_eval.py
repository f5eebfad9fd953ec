"""`kamim linprobe | finetune | knn | reconstruct`: end to end on tiny models, one-line errors."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
from eval_helpers import photo_crops

from kamim.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Labelled real-photo crops and a 2-step SimMIM pretraining run (checkpoint + encoder export)."""
    from kamim.config import from_dict
    from kamim.engine.pretrain import pretrain

    base = tmp_path_factory.mktemp("cli")
    data = photo_crops(base / "data", n_train_per_class=6, n_val_per_class=3)
    cfg = from_dict({
        "method": "simmim",
        "model": {"arch": "vit_pico", "img_size": 32, "overrides": {"embed_dim": 32, "depth": 3, "num_heads": 2}},
        "data": {"path": str(data / "train"), "num_workers": 0}, "mask": {"mask_patch_size": 16},
        "optim": {"batch_size": 8, "epochs": 1, "warmup_epochs": 0, "lr": 1e-3},
        "run": {"device": "cpu", "amp": "none", "max_steps": 2, "progress": False},
    })
    run = base / "pretrain"
    pretrain(cfg, out_dir=run, resume="none")
    return {"data": data, "run": run, "encoder": run / "encoder.safetensors"}


def _common(setup, out, *extra):
    return ["--checkpoint", str(setup["encoder"]), "--data", str(setup["data"]), "--out", str(out),
            "--num-workers", "0", "--device", "cpu", "--amp", "none", "--no-progress", *extra]


def test_linprobe_all_layers(setup, tmp_path, capsys):
    out = tmp_path / "lp"
    rc = main(["-q", "linprobe", *_common(setup, out, "--layers", "all", "--epochs", "2", "--warmup-epochs", "0",
                                         "--batch-size", "12", "--aug", "none", "--batchnorm", "--lr", "0.01")])
    assert rc == 0
    rows = list(csv.DictReader((out / "linprobe.csv").open()))
    assert [(int(r["epoch"]), int(r["layer"])) for r in rows] == [(e, k) for e in (1, 2) for k in (1, 2, 3)]
    summary = json.loads((out / "linprobe.json").read_text())
    assert summary["config"]["batchnorm"] is True and summary["encoder"]["format"] == "kamim-encoder"
    assert "best_top1" in capsys.readouterr().out
    # rerun with resume=auto: nothing left to do, same results
    assert main(["-q", "linprobe", *_common(setup, out, "--layers", "all", "--epochs", "2", "--warmup-epochs", "0",
                                            "--batch-size", "12", "--aug", "none", "--batchnorm", "--lr", "0.01")]) == 0
    assert json.loads((out / "linprobe.json").read_text())["final"] == summary["final"]


def test_knn_and_finetune(setup, tmp_path):
    assert main(["-q", "knn", *_common(setup, tmp_path / "knn", "--layers", "-1", "--k", "5,100",
                                       "--train-chunk-size", "7")]) == 0
    res = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert [(r["layer"], r["k"], r["k_used"]) for r in res["results"]] == [(3, 5, 5), (3, 100, 24)]
    assert main(["-q", "finetune", *_common(setup, tmp_path / "ft", "--epochs", "1", "--warmup-epochs", "0",
                                            "--batch-size", "8", "--lr", "1e-3", "--ema")]) == 0
    assert (tmp_path / "ft" / "checkpoint-best.pt").is_file() and (tmp_path / "ft" / "checkpoint-last.pt").is_file()
    hist = json.loads((tmp_path / "ft" / "finetune.json").read_text())["history"]
    assert len(hist) == 1 and "ema_top1" in hist[0]


def test_output_folder_rule(setup, tmp_path, capsys):
    """A folder holding the user's files, or another command's output, is refused (exit 2) and kept."""
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "data.txt").write_text("mine too")
    capsys.readouterr()
    for argv in (["knn", *_common(setup, user)],
                 ["linprobe", *_common(setup, user)],
                 ["reconstruct", "--checkpoints", str(setup["run"]), "--data", str(setup["data"] / "val"),
                  "--out", str(user)],
                 ["knn", *_common(setup, setup["run"])]):  # a pretraining run directory is not knn's
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--overwrite" in err[0], err
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == ["notes.txt", "sub", "sub/data.txt"]
    assert (user / "notes.txt").read_text() == "mine"
    # with --overwrite the results are written beside the user's files, which stay
    assert main(["-q", "knn", *_common(setup, user, "--layers", "-1", "--k", "5", "--overwrite")]) == 0
    assert (user / "knn.json").is_file() and (user / "sub" / "data.txt").read_text() == "mine too"
    assert main(["-q", "knn", *_common(setup, user, "--layers", "-1", "--k", "5")]) == 0  # now its own output


def test_small_inputs_that_used_to_fail_late_or_silently(setup, tmp_path, capsys, caplog):
    capsys.readouterr()
    for argv in (["knn", *_common(setup, tmp_path / "k", "--img-size", "0")],
                 ["knn", *_common(setup, tmp_path / "k", "--encoder-img-size", "7")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "expected at least 16 pixels" in err[0], err
    with pytest.raises(SystemExit) as exc:
        main(["knn", *_common(setup, tmp_path / "k", "--encoder-img-size", "100000")])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == ("kamim: error: argument --encoder-img-size: expected at most 16384 "
                                               "pixels, got 100000")
    assert not (tmp_path / "k").exists()
    # --epochs 1 with the default 10 warmup epochs: the warmup is clamped, and the log says so
    with caplog.at_level("WARNING", logger="kamim.linprobe"):
        assert main(["linprobe", *_common(setup, tmp_path / "lp", "--epochs", "1", "--aug", "none",
                                          "--batch-size", "12")]) == 0
    assert "warmup_epochs=10 leaves no epoch after the warmup of a 1-epoch run: using 0" in caplog.text
    # sweep --eval without --eval-data is refused before any grid point is trained
    assert main(["sweep", "--config", "tiny_kamim", "--data", str(setup["data"] / "train"), "--out",
                 str(tmp_path / "sw"), "--eval", "knn"]) == 2
    assert "missing config key 'sweep.evaluation.data': give --eval-data" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_outputs_follow_the_umask(setup, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main(["-q", "knn", *_common(setup, tmp_path / "knn", "--layers", "-1", "--k", "5")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "knn").iterdir()}
    assert modes == {"knn.json": 0o644, "knn.csv": 0o644, "config.yaml": 0o644, ".kamim-output.json": 0o644}
    assert stat.S_IMODE(setup["encoder"].stat().st_mode) & 0o044 == 0o044  # pretraining outputs too


def test_reconstruct(setup, tmp_path):
    out = tmp_path / "rec"
    assert main(["-q", "reconstruct", "--checkpoints", f"mine={setup['run']}", "--data", str(setup["data"] / "val"),
                 "--out", str(out), "--num-workers", "0", "--device", "cpu", "--figure-images", "2",
                 "--no-progress"]) == 0
    res = json.loads((out / "reconstruct.json").read_text())
    assert res["results"][0]["model"] == "mine" and res["results"][0]["num_images"] == 12
    assert (out / "reconstructions.png").is_file()


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("kamim: error: ") and "\n" not in msg and "Traceback" not in msg
        return msg

    assert "valid layers are 1..3" in err(["-q", "linprobe", *_common(setup, tmp_path / "x", "--layers", "7")])
    assert "3x48x48 but the model expects 3x32x32" in err(
        ["-q", "knn", *_common(setup, tmp_path / "x", "--img-size", "48")])
    bad = tmp_path / "bad"
    shutil.copytree(setup["data"], bad)
    shutil.copytree(bad / "val" / "coffee", bad / "val" / "zebra")
    args = _common(setup, tmp_path / "x")
    args[args.index("--data") + 1] = str(bad)
    assert "zebra" in err(["-q", "knn", *args])
    assert "checkpoint not found: '" in err(["-q", "finetune", "--checkpoint", str(tmp_path / "missing.pt"),
                                           "--data", str(setup["data"]), "--out", str(tmp_path / "x")])
    assert "mask_ratio" in err(["-q", "reconstruct", "--checkpoints", str(setup["run"]), "--data", "x",
                                "--out", str(tmp_path / "x"), "--mask-ratio", "1.5"])


def test_eval_out_overlapping_an_input_is_refused(setup, tmp_path, capsys):
    data = setup["data"]
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out, what in [(data, "is the --data folder"), (data / "train" / "res", "lies inside the --data folder"),
                      (setup["run"], "contains the checkpoint")]:
        assert main(["-q", "knn", *_common(setup, out, "--layers", "-1", "--k", "5", "--overwrite")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_hub_model_name_is_never_fetched_without_allow_download(setup, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    capsys.readouterr()
    assert main(["knn", *_common(setup, tmp_path / "k", "--model-name", "hf-hub:org/x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kamim: error: model 'hf-hub:org/x' is not in the local Hugging Face cache "
                   f"({tmp_path / 'empty-cache'}): download its config first (hf download org/x config.json) or "
                   f"pass --allow-download"], err
    assert not (tmp_path / "k").exists()
