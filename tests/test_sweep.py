"""``kamim sweep``: the grid, the results table, reuse of finished runs, and the evaluation column
(k-NN / linear probe of each run's exported encoder) checked against a direct recomputation."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.data import DataLoader

import kamim.engine.pretrain as pretrain_module
import kamim.eval.knn as knn_module
from kamim.checkpoints import load_encoder
from kamim.cli import main
from kamim.data import collate_skip_bad, write_demo_folder, write_labelled_demo
from kamim.experiments.sweep import EVAL_FILE, sort_by_metric
from kamim.eval.data import build_labelled_data
from kamim.eval.features import default_layer, extract_dataset_features
from kamim.eval.knn import knn_evaluate
from kamim.metrics_log import read_metrics
from kamim.serialization import safe_load

SMALL = [
    "model.img_size=48", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}", "optim.batch_size=6",
    "run.progress=false", "run.ckpt_every_steps=0", "run.max_steps=2",
]
EVAL_BATCH = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_folder(tmp_path_factory.mktemp("demo"), crops_per_photo=1, max_side=96)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """15 classes (one per demo photograph) x (8 train + 4 val) tiles of 48 px."""
    return write_labelled_demo(tmp_path_factory.mktemp("labelled"), n_train_per_class=8, n_val_per_class=4, size=48)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # exactly one line, no traceback
    assert err[0].startswith("kamim: error: ")
    return err[0]


def _knn_top1(encoder_file, labelled, k: int) -> tuple[float, int]:
    """k-NN top-1 (fraction) of an exported encoder, recomputed directly (features + knn_evaluate)."""
    enc = load_encoder(encoder_file)
    layer = default_layer(enc.model)
    data = build_labelled_data(str(labelled), img_size=enc.image_size)
    banks = {}
    for split, ds in (("train", data.train), ("val", data.val)):
        loader = DataLoader(ds, batch_size=EVAL_BATCH, shuffle=False, collate_fn=collate_skip_bad)
        banks[split] = extract_dataset_features(enc.model, loader, [layer], pool="avg", store_dtype=torch.float16,
                                                progress=False)
    res = knn_evaluate(banks["train"][0][layer], banks["train"][1], banks["val"][0][layer], banks["val"][1],
                       ks=(k,), temperature=0.07, num_classes=data.num_classes)
    return res[k]["top1"] / 100.0, layer


def test_help_lists_eval_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("--eval-data", "--eval ", "--eval-layer", "--eval-k", "--linprobe-epochs"):
        assert word in out


def test_sort_by_metric_best_first_missing_last():
    rows = [{"n": 0, "m": 0.2}, {"n": 1, "m": None}, {"n": 2, "m": 0.7}, {"n": 3, "m": 0.2}, {"n": 4, "m": 0.0}]
    assert [r["n"] for r in sort_by_metric(rows, "m")] == [2, 0, 3, 4, 1]


def test_sweep_writes_table_and_reuses_finished_runs(tmp_path, demo, capsys):
    out = tmp_path / "sweep"
    argv = ["-q", "sweep", "--config", "tiny_kamim", "--data", str(demo), "--out", str(out),
            "--detectors", "fast,sift", "--weight-patch-sizes", "8", "--temperatures", "0.25,1", "--set", *SMALL]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    table = json.loads((out / "results.json").read_text())
    assert [(r["detector"], r["weight_patch_size"], r["temperature"]) for r in table] == [
        ("fast", 8, 0.25), ("fast", 8, 1.0), ("sift", 8, 0.25), ("sift", 8, 1.0)]
    assert [r["status"] for r in table] == ["trained"] * 4
    assert "knn_top1" not in rows[0]  # no evaluation column without --eval-data
    for r, c in zip(table, rows):
        run = out / f"{r['detector']}_wps8_T{r['temperature']:g}"
        assert r["run_dir"] == str(run) == c["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        assert r["final_loss"] == summary["final_loss"] == read_metrics(run / "metrics.jsonl")[-1]["loss"]
        assert float(c["final_loss"]) == pytest.approx(r["final_loss"])
        ckpt = safe_load(run / "checkpoint-last.pt")
        assert ckpt["config"]["kamim"]["detector"] == r["detector"]
        assert ckpt["config"]["kamim"]["temperature"] == r["temperature"]
    # FAST finds keypoints in these crops; a higher temperature flattens the weights towards 1, so the
    # weighted loss on the same batches is lower
    assert table[1]["final_loss"] < table[0]["final_loss"]
    capsys.readouterr()
    assert main(argv) == 0  # second call: every point is reused, nothing retrained
    again = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in again] == ["reused"] * 4
    assert [r["final_loss"] for r in again] == [r["final_loss"] for r in table]
    assert "results:" in capsys.readouterr().out


def test_sweep_knn_column_matches_recomputation_and_is_reused(tmp_path, demo, labelled, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["-q", "sweep", "--config", "tiny_kamim", "--data", str(demo), "--out", str(out),
            "--detectors", "fast,sift", "--weight-patch-sizes", "8", "--temperatures", "0.25",
            "--eval-data", str(labelled), "--eval-batch-size", str(EVAL_BATCH), "--set", *SMALL]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    table = json.loads((out / "results.json").read_text())
    assert "knn_top1" in rows[0] and "eval_layer" in rows[0]
    assert [r["detector"] for r in table] == ["fast", "sift"]
    assert [(r["status"], r["eval_status"]) for r in table] == [("trained", "computed")] * 2
    for r, c in zip(table, rows):
        assert 0.0 <= r["knn_top1"] <= 1.0
        assert float(c["knn_top1"]) == pytest.approx(r["knn_top1"], abs=1e-12)
        # per-run k-NN outputs of kamim.eval.knn (percent there, fraction in the sweep table)
        knn_json = json.loads((out / f"{r['detector']}_wps8_T0.25" / "knn" / "knn.json").read_text())
        assert knn_json["results"][0]["top1"] / 100 == pytest.approx(r["knn_top1"], abs=1e-12)
    # one run recomputed directly from its exported encoder: same layer (the reference probing layer,
    # block 1 of 2 here) and the same accuracy
    run = out / "fast_wps8_T0.25"
    top1, layer = _knn_top1(run / "encoder.safetensors", labelled, k=20)
    assert table[0]["eval_layer"] == layer == 1
    assert table[0]["knn_top1"] == pytest.approx(top1, abs=1e-12)
    assert top1 > 2 / 15  # the features carry class information (chance is 1/15)
    # the table is printed best first
    printed = [ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if "_wps8_T" in ln]
    assert printed == [r["run_dir"] for r in sort_by_metric(table, "knn_top1")]

    # rerun: neither training nor k-NN runs again
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    with monkeypatch.context() as m:
        m.setattr(pretrain_module, "pretrain", fail)
        m.setattr(knn_module, "run_knn", fail)
        assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [(r["status"], r["eval_status"]) for r in again] == [("reused", "reused")] * 2
    assert [r["knn_top1"] for r in again] == [r["knn_top1"] for r in table]

    # other evaluation settings: the runs are reused, the evaluation is recomputed
    with monkeypatch.context() as m:
        m.setattr(pretrain_module, "pretrain", fail)
        assert main([*argv[:-len(SMALL) - 1], "--eval-k", "5", "--set", *SMALL]) == 0
    k5 = json.loads((out / "results.json").read_text())
    assert [(r["status"], r["eval_status"]) for r in k5] == [("reused", "computed")] * 2
    assert k5[0]["knn_top1"] == pytest.approx(_knn_top1(run / "encoder.safetensors", labelled, k=5)[0], abs=1e-12)
    assert json.loads((run / EVAL_FILE).read_text())["knn"]["key"]["k"] == 5

    # a run that trains further has a new encoder (same evaluation settings): trained and evaluated again
    assert main([*argv[:-len(SMALL) - 1], "--eval-k", "5", "--set", *SMALL, "run.max_steps=3"]) == 0
    more = json.loads((out / "results.json").read_text())
    assert [(r["status"], r["eval_status"], r["step"]) for r in more] == [("trained", "computed", 3)] * 2
    assert more[0]["knn_top1"] == pytest.approx(_knn_top1(run / "encoder.safetensors", labelled, k=5)[0], abs=1e-12)


def test_sweep_linprobe_column(tmp_path, demo, labelled):
    out = tmp_path / "sweep"
    argv = ["-q", "sweep", "--config", "tiny_kamim", "--data", str(demo), "--out", str(out),
            "--weight-patch-sizes", "8", "--temperatures", "0.5", "--eval-data", str(labelled),
            "--eval", "linprobe,knn", "--linprobe-epochs", "1", "--eval-batch-size", "30",
            "--set", *SMALL, "run.max_steps=1"]
    assert main(argv) == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert list(row)[5:7] == ["linprobe_top1", "knn_top1"]
    probe = json.loads((out / "fast_wps8_T0.5" / "linprobe" / "linprobe.json").read_text())
    assert probe["epochs_done"] == 1 and probe["layers"] == [row["eval_layer"]]
    assert row["linprobe_top1"] == pytest.approx(probe["final"][0]["top1"] / 100, abs=1e-12)
    assert 0.0 <= row["linprobe_top1"] <= 1.0 and 0.0 <= row["knn_top1"] <= 1.0


def test_bad_eval_inputs_fail_before_training(tmp_path, demo, labelled, capsys):
    base = ["sweep", "--config", "tiny_kamim", "--data", str(demo), "--out", str(tmp_path / "s"),
            "--weight-patch-sizes", "8", "--temperatures", "0.25"]
    missing = tmp_path / "no_such_labels"
    cases = [
        (["--eval-data", str(missing)], f"labelled data folder not found: '{missing}'"),
        (["--eval-data", str(labelled), "--eval", "knn,svm"], "eval method(s) ['svm'] not valid"),
        (["--eval", "linprobe"], "missing config key 'sweep.evaluation.data': give --eval-data"),
        (["--eval-data", str(labelled), "--eval-k", "0"], "eval k must be >= 1, got 0"),
        (["--eval-data", str(labelled), "--eval-layer", "7", "--set", *SMALL], "layer 7 is out of range"),
        (["--eval-data", str(labelled), "--eval-layer", "all", "--set", *SMALL],
         "eval layer 'all' selects layers [1, 2]; the sweep table needs exactly one"),
        (["--detectors", "fast,surf"], "sweep.detectors='surf' is not valid"),
        (["--set", "model.overrides={depht: 2}"], "model.overrides={'depht': 2} rejected by vit_pico"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2, extra
        assert expected in _error_line(capsys), extra
    assert not (tmp_path / "s").exists()  # nothing was trained
