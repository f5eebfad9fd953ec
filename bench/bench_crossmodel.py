"""Time and memory of the cross-model step: 5 models x 13 layers x 1,000 images (ViT-B width 768).

Runs :func:`analysis.crossmodel.compare_all` (cross-model CKA, mutual k-NN and CKNNA for every pair of
models and every layer pair) on saved features of that size, and, side by side for one pair of
models, the published per-pair definitions (platonic-rep's ``mutual_knn`` and ``cknna``, which find
each layer's neighbours again for every layer pair; restated in tests/test_analysis_crossmodel.py),
and prints both times, their ratio, and the peak resident memory of the process.

    python bench/bench_crossmodel.py                 # 5 models x 13 layers x 1000 images
    python bench/bench_crossmodel.py --images 300    # smaller
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from analysis.crossmodel import FEATURES, FILES, compare_all
from analysis.results import AnalysisResult, records_to_frame
from kamim.doctor import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_analysis_crossmodel import ref_cknna, ref_mutual_knn  # noqa: E402  (the restated definitions)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    files = np.array([f"img{i:05d}.JPEG" for i in range(args.images)])
    base = torch.randn(args.images, args.dim, generator=g)
    results = {}
    for m in range(args.models):  # correlated representations, as of models of one family
        feats = {str(layer + 1): (base + (0.5 + 0.1 * layer) * torch.randn(args.images, args.dim, generator=g)).numpy()
                 for layer in range(args.layers)}
        results[f"model{m}"] = AnalysisResult(f"model{m}", records_to_frame([]), {FEATURES: feats, FILES: files},
                                              None, args.images)
    before = _maxrss_mb()
    t0 = time.perf_counter()
    cross = compare_all(results, k=args.k)
    ours = time.perf_counter() - t0
    peak = _maxrss_mb()
    pairs = len(cross)
    a, b = (results[n].arrays[FEATURES] for n in ("model0", "model1"))
    t0 = time.perf_counter()
    for la in a.values():
        for lb in b.values():
            x, y = torch.as_tensor(la).double(), torch.as_tensor(lb).double()
            ref_mutual_knn(x, y, args.k)
            ref_cknna(x, y, args.k)
    ref_pair = time.perf_counter() - t0
    print(f"cross-model step on {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}")
    print(f"{args.models} models x {args.layers} layers x {args.images} images (width {args.dim}), k = {args.k}: "
          f"{pairs} pairs, {pairs * args.layers ** 2} layer pairs")
    print(f"compare_all (CKA + mutual k-NN + CKNNA, every pair):          {ours:8.1f} s")
    print(f"  per pair of models:                                         {ours / pairs:8.2f} s")
    print(f"published definitions, mutual k-NN + CKNNA, one pair:          {ref_pair:8.2f} s "
          f"({ref_pair / (ours / pairs):.1f}x ours per pair, which also includes CKA)")
    print(f"peak resident memory: {peak:.0f} MB (before the step: {before:.0f} MB; the saved features "
          f"take {args.models * args.layers * args.images * args.dim * 4 / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
