"""Weighted k-NN classification of frozen features (DINO protocol), chunked for any dataset size.

Protocol (Wu et al. 2018 / DINO ``eval_knn.py``): features are L2-normalised, the ``k`` nearest
training samples by cosine similarity vote with weight ``exp(sim / T)`` (T = 0.07) and the class
with the largest summed weight wins; top-5 ranks classes by the same scores, and a class that got
no vote never counts as a top-5 hit (with k < 5 neighbours or fewer than 5 voted classes, DINO's
``topk`` would count zero-score classes in arbitrary tie order).

Memory: the training bank is held once (float16 or float32, CPU or GPU) and scanned in chunks of
``train_chunk_size`` rows for each chunk of ``query_chunk_size`` queries; each train chunk yields
its own top-k which is merged with the running top-k, so peak memory is
``query_chunk_size x train_chunk_size`` similarities whatever the dataset size (a 2-core CPU
handles tens of thousands of images, a GPU ImageNet's 1.28M).

``k`` larger than the training set is clamped to the training set size (all samples vote); the
result tables report the requested ``k`` and the ``k`` actually used.
"""
from __future__ import annotations

import dataclasses

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from kamim.progress import progress as progress_bar
from kamim.distributed import all_reduce_sum, is_main_process
from kamim.backbone import layer_columns
from kamim.checkpoints import resolve_encoder
from kamim.config import KNNConfig
from kamim.precision import amp_dtype_of, resolve_amp
from kamim.runtime import write_run_config
from kamim.inputs import preflight

from .common import print_table, write_results
from .data import build_labelled_data, eval_loader
from .features import extract_dataset_features, resolve_layers
from .session import distributed_session, locked_output

__all__ = ["knn_topk", "knn_scores", "knn_evaluate", "KNNConfig", "run_knn"]

_log = logging.getLogger(__name__)


def _check_bank(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (N, C); got train {tuple(train_features.shape)}, query {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"train features have {train_features.shape[1]} channels but query features have {query_features.shape[1]}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train labels have shape {tuple(train_labels.shape)}, expected ({train_features.shape[0]},)"
        )
    if train_features.shape[0] == 0:
        raise ValueError("the k-NN training bank is empty")


@torch.no_grad()
def knn_topk(
    train_features: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    train_chunk_size: int = 65536,
    device: torch.device | str | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices (Q, k') of the k' = min(k, N) nearest train rows, best first.

    The train bank is scanned in chunks; per-chunk top-k are merged with the running top-k.
    """
    n = train_features.shape[0]
    k_eff = min(int(k), n)
    device = torch.device(device) if device is not None else query_features.device
    q = query_features.to(device, torch.float32)
    if normalize:
        q = F.normalize(q, dim=1)
    best_sim = torch.full((q.shape[0], 0), -math.inf, device=device)
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
    for start in range(0, n, train_chunk_size):
        chunk = train_features[start:start + train_chunk_size].to(device, torch.float32, non_blocking=True)
        if normalize:
            chunk = F.normalize(chunk, dim=1)
        sim = q @ chunk.T
        s, i = sim.topk(min(k_eff, chunk.shape[0]), dim=1)
        # merge with the running top-k; always re-sorted, so the result is ordered best first even
        # when fewer than k rows have been seen (k clamped to N)
        best_sim, order = torch.cat([best_sim, s], dim=1).topk(min(k_eff, best_sim.shape[1] + s.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, i + start], dim=1).gather(1, order)
    return best_sim, best_idx


def knn_scores(
    sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Class scores (Q, num_classes) from the first ``k`` neighbours (sorted best first): sum of exp(sim/T)."""
    sims, idx = sims[:, :k], idx[:, :k]
    labels = train_labels.to(idx.device)[idx]  # (Q, k)
    weights = (sims / temperature).exp()
    scores = torch.zeros(idx.shape[0], num_classes, device=idx.device, dtype=weights.dtype)
    return scores.scatter_add_(1, labels, weights)


@torch.no_grad()
def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    train_chunk_size: int = 65536,
    query_chunk_size: int = 1024,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN top-1 / top-5 accuracy (%) for every k in ``ks`` (one neighbour search for all k).

    Returns ``{k: {"top1", "top5", "k_used"}}``; ``k_used = min(k, len(train))``.
    """
    train_labels = torch.as_tensor(train_labels).long()
    query_labels = torch.as_tensor(query_labels).long()
    _check_bank(train_features, train_labels, query_features)
    if query_labels.shape != (query_features.shape[0],):
        raise ValueError(f"query labels have shape {tuple(query_labels.shape)}, expected ({query_features.shape[0]},)")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"k values must be positive integers, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if train_chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"chunk sizes must be >= 1, got train {train_chunk_size}, query {query_chunk_size}")
    n_cls = int(num_classes) if num_classes is not None else int(max(train_labels.max(), query_labels.max())) + 1
    n_train = train_features.shape[0]
    ks = sorted({int(k) for k in ks})
    k_used = {k: min(k, n_train) for k in ks}
    for k in ks:
        if k > n_train:
            _log.warning("k=%d exceeds the %d training samples; clamped to %d", k, n_train, n_train)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu":  # hold the bank on the accelerator once (float16 ImageNet-1k ViT-B: 2 GB)
        train_features = train_features.to(device, non_blocking=True)
    train_labels_dev = train_labels.to(device)
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    starts = range(0, query_features.shape[0], query_chunk_size)
    for start in progress_bar(starts, desc="k-NN", unit="chunk", enabled=progress):
        q = query_features[start:start + query_chunk_size]
        target = query_labels[start:start + query_chunk_size].to(device)
        sims, idx = knn_topk(train_features, q, max(ks), train_chunk_size, device)
        for k in ks:
            scores = knn_scores(sims, idx, train_labels_dev, n_cls, k_used[k], temperature)
            top = scores.topk(min(5, n_cls), dim=1).indices
            hit = top == target[:, None]
            voted = scores.gather(1, target[:, None]).squeeze(1) > 0
            correct1[k] += int(hit[:, 0].sum())
            correct5[k] += int((hit.any(dim=1) & voted).sum())
    total = query_features.shape[0]
    return {
        k: {"top1": 100.0 * correct1[k] / total, "top5": 100.0 * correct5[k] / total, "k_used": k_used[k]}
        for k in ks
    }


def run_knn(cfg: KNNConfig) -> dict:
    """Extract train/val features of every requested layer once, k-NN classify, write results."""
    cfg.validate()
    preflight(cfg, "knn")
    with distributed_session(cfg.device) as info, locked_output(cfg.output_dir, info):
        cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, info.device))  # recorded as resolved
        return _run_knn(cfg, info)


def _run_knn(cfg: KNNConfig, info) -> dict:
    enc = resolve_encoder(cfg.checkpoint, info.device, cfg.load_options)
    layers = resolve_layers(enc.model, cfg.layers)
    data = build_labelled_data(cfg.data, img_size=cfg.img_size or enc.image_size)
    data.check_geometry(enc.model)
    store = getattr(torch, cfg.bank_dtype)
    amp = amp_dtype_of(cfg.amp, info.device)
    # named in the error of non-finite features (an in-memory model as in config_record)
    source = f"<in-memory {type(cfg.checkpoint).__name__}>" if isinstance(cfg.checkpoint, torch.nn.Module) \
        else str(cfg.checkpoint)
    banks = {}
    for split, ds in (("train", data.train), ("val", data.val)):
        loader, indices_fn = eval_loader(ds, cfg.batch_size, cfg.num_workers, info)
        banks[split] = extract_dataset_features(
            enc.model, loader, layers, pool=cfg.pool, device=info.device, amp_dtype=amp, store_dtype=store,
            num_samples=len(ds) if indices_fn else None, indices_fn=indices_fn,
            progress=cfg.progress and is_main_process(), desc=f"{split} features", source=source,
        )
    # every rank holds the whole bank and classifies its own slice of the queries; hit counts are summed
    n_val = len(banks["val"][1])
    queries = slice(info.rank, n_val, info.world_size)
    n_local = len(range(n_val)[queries])
    rows = []
    for layer in layers:
        res = knn_evaluate(
            banks["train"][0][layer], banks["train"][1], banks["val"][0][layer][queries], banks["val"][1][queries],
            ks=cfg.ks, temperature=cfg.temperature, num_classes=data.num_classes,
            train_chunk_size=cfg.train_chunk_size, query_chunk_size=cfg.query_chunk_size, device=info.device,
        ) if n_local else {k: {"top1": 0.0, "top5": 0.0, "k_used": min(k, len(banks["train"][1]))} for k in cfg.ks}
        for k, r in sorted(res.items()):
            hits = torch.tensor([round(r["top1"] * n_local / 100), round(r["top5"] * n_local / 100)],
                                dtype=torch.float64, device=info.device)
            hits = all_reduce_sum(hits)
            rows.append({**layer_columns(enc.geometry, layer), "k": k, "k_used": r["k_used"],
                         "top1": 100.0 * float(hits[0]) / n_val,
                         "top5": 100.0 * float(hits[1]) / n_val})
    summary = {
        "checkpoint": str(cfg.checkpoint), "data": str(cfg.data), "pool": cfg.pool, "temperature": cfg.temperature,
        "amp": cfg.amp,
        "num_train": len(data.train), "num_val": len(data.val), "num_classes": data.num_classes,
        "layers": layers, "results": rows,
    }
    if is_main_process():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, Path(cfg.output_dir))  # the run's config first, then its results
        write_results(Path(cfg.output_dir), "knn", rows, summary)
        print_table(rows, title=f"k-NN (T={cfg.temperature}) on {cfg.data}")
    return summary
