"""Weighted k-NN: parity with a brute-force numpy reference, chunking, clamping, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kamim.eval.knn import knn_evaluate, knn_scores, knn_topk


def _numpy_knn_scores(train, train_labels, query, k, T, num_classes):
    """Brute force DINO weighted k-NN written independently: full similarity matrix, argsort."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = q @ tr.T
    k = min(k, len(train))
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(query), num_classes))
    for i in range(len(query)):
        for j in order[i]:
            scores[i, train_labels[j]] += np.exp(sim[i, j] / T)
    return scores


def _numpy_accuracy(scores, labels):
    top1 = (scores.argmax(1) == labels).mean() * 100
    # top-5: the target got a vote and fewer than 5 classes scored strictly higher
    t = scores[np.arange(len(labels)), labels]
    top5 = np.mean((t > 0) & ((scores > t[:, None]).sum(1) < 5)) * 100
    return top1, top5


@pytest.fixture()
def random_bank():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(257, 16)).astype(np.float32)
    labels = rng.integers(0, 7, size=257)
    query = rng.normal(size=(61, 16)).astype(np.float32)
    qlabels = rng.integers(0, 7, size=61)
    return train, labels, query, qlabels


@pytest.mark.parametrize("train_chunk", [10_000, 64, 7])
def test_scores_match_numpy_reference_across_chunks(random_bank, train_chunk):
    train, labels, query, _ = random_bank
    sims, idx = knn_topk(torch.from_numpy(train), torch.from_numpy(query), 20, train_chunk_size=train_chunk)
    assert sims.shape == (61, 20)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])  # sorted best first
    for k in (1, 5, 20):
        ours = knn_scores(sims, idx, torch.from_numpy(labels), 7, k, 0.07).numpy()
        ref = _numpy_knn_scores(train, labels, query, k, 0.07, 7)
        np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_accuracy_matches_numpy_with_query_and_train_chunks(random_bank):
    train, labels, query, qlabels = random_bank
    res = knn_evaluate(
        torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(query), torch.from_numpy(qlabels),
        ks=(5, 20), temperature=0.07, num_classes=7, train_chunk_size=50, query_chunk_size=13,
    )
    for k in (5, 20):
        top1, top5 = _numpy_accuracy(_numpy_knn_scores(train, labels, query, k, 0.07, 7), qlabels)
        assert res[k]["top1"] == pytest.approx(top1)
        assert res[k]["top5"] == pytest.approx(top5)
        assert res[k]["k_used"] == k


def test_separable_clusters_are_perfect_in_float16_bank():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 5
    train_labels = torch.arange(5).repeat_interleave(40)
    query_labels = torch.arange(5).repeat_interleave(9)
    train = (centres[train_labels] + 0.3 * torch.randn(200, 32, generator=g)).half()
    query = centres[query_labels] + 0.3 * torch.randn(45, 32, generator=g)
    res = knn_evaluate(train, train_labels, query, query_labels, ks=(1, 20), train_chunk_size=32, query_chunk_size=8)
    assert res[1]["top1"] == 100.0 and res[20]["top1"] == 100.0 and res[20]["top5"] == 100.0


def test_k_larger_than_train_set_is_clamped(random_bank):
    train, labels, query, qlabels = random_bank
    small = torch.from_numpy(train[:30])
    # the neighbour search runs for max(k) = 200 > 30 rows over 4 chunks; smaller k must still see the best first
    res = knn_evaluate(small, torch.from_numpy(labels[:30]), torch.from_numpy(query), torch.from_numpy(qlabels),
                       ks=(3, 200), num_classes=7, train_chunk_size=8)
    assert res[200]["k_used"] == 30 and res[3]["k_used"] == 3
    for k, k_used in ((3, 3), (200, 30)):
        top1, top5 = _numpy_accuracy(_numpy_knn_scores(train[:30], labels[:30], query, k_used, 0.07, 7), qlabels)
        assert res[k]["top1"] == pytest.approx(top1) and res[k]["top5"] == pytest.approx(top5)
    sims, _ = knn_topk(small, torch.from_numpy(query), 200, train_chunk_size=8)
    assert sims.shape == (61, 30) and torch.all(sims[:, :-1] >= sims[:, 1:])


def test_bad_inputs_have_clear_errors(random_bank):
    train, labels, query, qlabels = random_bank
    t, l, q, ql = map(torch.from_numpy, (train, labels, query, qlabels))
    with pytest.raises(ValueError, match="16 channels but query features have 8"):
        knn_evaluate(t, l, q[:, :8], ql)
    with pytest.raises(ValueError, match="positive"):
        knn_evaluate(t, l, q, ql, ks=(0,))
    with pytest.raises(ValueError, match="train labels have shape"):
        knn_evaluate(t, l[:10], q, ql)
    with pytest.raises(ValueError, match="temperature"):
        knn_evaluate(t, l, q, ql, temperature=0)


def test_run_knn_end_to_end_matches_manual_features(tmp_path):
    import csv
    import json

    from kamim.checkpoints import load_encoder
    from kamim.data import build_labelled_splits, write_labelled_demo
    from kamim.eval.data import eval_transform
    from kamim.eval.features import extract_features
    from kamim.eval.knn import KNNConfig, run_knn

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_labelled_demo(tmp_path / "d", kind="photo-crops", size=32, n_train_per_class=6,
                                   n_val_per_class=3, photos=["astronaut", "coffee", "chelsea", "rocket"])
        opts = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        torch.manual_seed(0)
        res = run_knn(KNNConfig(checkpoint="vit_tiny_patch16_224", data=str(data), output_dir=str(tmp_path / "o"),
                                layers="all", ks=(3, 100), batch_size=5, num_workers=0, device="cpu", amp="none",
                                bank_dtype="float32", train_chunk_size=7, progress=False, load_options=opts))
        rows = res["results"]
        assert [(r["layer"], r["k"], r["k_used"]) for r in rows] == [(1, 3, 3), (1, 100, 24), (2, 3, 3), (2, 100, 24)]
        # independent path: same weights, features image by image, numpy brute force
        torch.manual_seed(0)
        model = load_encoder("vit_tiny_patch16_224", **opts).model
        split = build_labelled_splits(data, eval_transform(32), eval_transform(32))
        with torch.no_grad():
            tr = [extract_features(model, s["image"][None], "all") for s in split.train]
            va = [extract_features(model, s["image"][None], "all") for s in split.val]
        ytr = np.array([s["label"] for s in split.train])
        yva = np.array([s["label"] for s in split.val])
        for r in rows:
            a = torch.cat([f[r["layer"]] for f in tr]).numpy()
            b = torch.cat([f[r["layer"]] for f in va]).numpy()
            top1, top5 = _numpy_accuracy(_numpy_knn_scores(a, ytr, b, r["k_used"], 0.07, 4), yva)
            assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5)
        assert json.loads((tmp_path / "o" / "knn.json").read_text())["num_train"] == 24
        assert len(list(csv.DictReader((tmp_path / "o" / "knn.csv").open()))) == 4
    finally:
        torch.set_num_threads(n)
