"""Cross-model comparisons from saved features: layer-by-layer CKA, mutual k-NN alignment and CKNNA.

Every model of a ``kamim-analyze run`` saves the pooled block outputs of a fixed, seeded subset of
the images (:func:`extract_features`; default 1,000, at most :data:`MAX_CROSS_IMAGES`) with the
list of those files. Any two models whose saved lists are equal (the same images in the same order)
are compared from these features alone, in ``run`` and when ``kamim-analyze plot`` combines runs;
different image sets are refused with one line (:func:`check_same_images`).

* **Cross-model CKA** (Kornblith et al. 2019; the layer x layer heatmaps of Raghu et al. 2021, "Do
  vision transformers see like convolutional neural networks?"): linear CKA between every layer of
  model A and every layer of model B. ``"debiased"`` (default) uses the unbiased HSIC of Song et al.
  (2012) over all saved images; ``"biased"`` the plug-in HSIC of Kornblith et al. Both are the
  estimators of :class:`analysis.similarity.CKAAccumulator` (``minibatch`` with one chunk, ``exact``),
  so a model compared with itself gives the within-model CKA of the ``cka`` analysis on those images.
* **Mutual k-NN alignment** (Huh et al. 2024, "The Platonic Representation Hypothesis", ICML; their
  ``metrics.py``): features are L2-normalised, each image's k nearest neighbours are taken by inner
  product with the image itself excluded, and the score is the mean over images of
  ``|N_A(i) ∩ N_B(i)| / k`` (1 for identical neighbourhoods; about ``k / (N - 1)`` for independent
  representations). ``k = 10`` as in their figures.
* **CKNNA** (same paper): CKA with unbiased HSIC computed on the kernels ``K = f_A f_A^T`` and
  ``L = f_B f_B^T`` of the normalised features, keeping only the pairs (i, j) where j is among the k
  nearest neighbours of i in both A and B (their ``cknna(feats_A, feats_B, topk)``).

The best-aligned layer of model B for each layer of model A is the arg-max of the mutual k-NN row.
These are computed here rather than taken from a library: platonic-rep is not packaged, and its
per-pair loops would recompute each layer's neighbours once per layer pair.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kamim.backbone import layer_features, num_layers, unwrap

from .results import AnalysisResult, Record, matrix_records, records_to_frame
from .names import CROSS_CKA, DEFAULT_CROSS_K as DEFAULT_K
from .similarity import CKAAccumulator, _chunk_hsic, _cka_from_hsic

__all__ = [
    "CROSS_CKA", "FEATURES", "FILES",
    "extract_features", "files_digest", "saved_features", "check_same_images", "mutual_knn", "cknna",
    "cross_cka", "compare_models", "compare_all",
]

FEATURES = "cross_features"  # arrays key: {layer: (n, d) float32}
FILES = "cross_files"  # arrays key: (n,) the image files, relative to the data folder, in order


def extract_features(model: torch.nn.Module, batches: Iterable[Tensor], *, pool: str = "avg",
                     device: str | torch.device = "cpu") -> dict[int, np.ndarray]:
    """Pooled block outputs of every layer (1..L) for the images of ``batches``, in order: layer ->
    ``(n, d)`` float32 (:func:`kamim.backbone.layer_features`, the features the evaluations use)."""
    backbone = unwrap(model)
    layers = list(range(1, num_layers(backbone) + 1))
    parts: dict[int, list[Tensor]] = {}
    with torch.no_grad():
        for images in batches:
            feats = layer_features(backbone, images.to(device), layers, pool=pool)
            for k, f in feats.items():
                parts.setdefault(k, []).append(f.float().cpu())
    if not parts:
        raise ValueError("no images to extract features from")
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def files_digest(files: Sequence[str]) -> str:
    """sha256 of the ordered file list (the key under which saved features are comparable)."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def saved_features(result: AnalysisResult) -> tuple[list[np.ndarray], list[str]] | None:
    """A result's saved features (layers 1..L in order) and image files; None when it has none."""
    feats, files = result.arrays.get(FEATURES), result.arrays.get(FILES)
    if not feats or files is None:
        return None
    return [np.asarray(feats[k]) for k in sorted(feats, key=int)], [str(f) for f in np.asarray(files)]


def check_same_images(name_a: str, files_a: Sequence[str], name_b: str, files_b: Sequence[str]) -> None:
    """One-line ``ValueError`` unless both models saved features of the same images in the same order."""
    if list(files_a) != list(files_b):
        raise ValueError(
            f"cross-model analyses need the same images: {name_a} saved features of {len(files_a)} images "
            f"(file list sha256 {files_digest(files_a)[:12]}), {name_b} of {len(files_b)} "
            f"(sha256 {files_digest(files_b)[:12]}); analyse both on the same --data, --seed and --cross-images")


# ------------------------------------------------------------------------------------------------
# the measures, on (n, d) features of the same n images
def _as_tensor(x: Any) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double()
    if t.ndim != 2:
        raise ValueError(f"features must be (n, d), got {tuple(t.shape)}")
    return t


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an integer in [1, {n - 1}] for {n} images, got {k!r}")


def _kernel_and_knn(f: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Inner-product kernel of the L2-normalised features and its k-NN mask (self excluded), (n, n)."""
    z = F.normalize(f, dim=1)
    kernel = z @ z.T
    sims = kernel.clone()
    sims.fill_diagonal_(float("-inf"))
    idx = sims.topk(k, dim=1).indices
    mask = torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, idx, True)
    return kernel, mask


def _masked_hsic(k_masked: Tensor, l_masked: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) of two kernels with zero diagonals, neither assumed symmetric."""
    n = k_masked.shape[0]
    trace = (k_masked * l_masked.T).sum()
    cross = k_masked.sum(0) @ l_masked.sum(1)  # 1' K L 1 without the n^3 product
    return (trace + k_masked.sum() * l_masked.sum() / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def mutual_knn(feats_a: Any, feats_b: Any, k: int = DEFAULT_K) -> float:
    """Mutual k-NN alignment of two ``(n, d)`` representations of the same images (Huh et al. 2024)."""
    a, b = _as_tensor(feats_a), _as_tensor(feats_b)
    _same_n(a, b)
    _check_k(k, a.shape[0])
    ma, mb = _kernel_and_knn(a, k)[1], _kernel_and_knn(b, k)[1]
    return float(((ma & mb).sum(1).double() / k).mean())


def cknna(feats_a: Any, feats_b: Any, k: int = DEFAULT_K) -> float:
    """CKNNA of two ``(n, d)`` representations of the same images (Huh et al. 2024; unbiased HSIC)."""
    a, b = _as_tensor(feats_a), _as_tensor(feats_b)
    _same_n(a, b)
    n = a.shape[0]
    if n < 4 or k < 2:
        raise ValueError(f"CKNNA needs k >= 2 and at least 4 images, got k={k}, {n} images")
    _check_k(k, n)
    (ka, ma), (kb, mb) = _kernel_and_knn(a, k), _kernel_and_knn(b, k)
    both = ma & mb
    sim_ab = _masked_hsic(ka * both, kb * both)
    sim_aa, sim_bb = _masked_hsic(ka * ma, ka * ma), _masked_hsic(kb * mb, kb * mb)
    return float(sim_ab / (sim_aa * sim_bb).clamp_min(0).sqrt())


def _same_n(a: Tensor, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"both representations must hold the same images, got {a.shape[0]} and {b.shape[0]}")


def cross_cka(feats_a: Sequence[Any], feats_b: Sequence[Any], estimator: str = "debiased") -> np.ndarray:
    """Linear CKA between every layer of A and every layer of B -> ``(La, Lb)`` float64."""
    if estimator not in CROSS_CKA:
        raise ValueError(f"cross-model CKA estimator {estimator!r} is not valid; expected one of {', '.join(CROSS_CKA)}")
    a = [torch.as_tensor(np.asarray(f)) for f in feats_a]
    b = [torch.as_tensor(np.asarray(f)) for f in feats_b]
    if estimator == "biased":
        acc = CKAAccumulator(estimator="exact", cross=True)
        acc.update(a, b)
        return acc.compute().numpy()
    hsic = _chunk_hsic([*a, *b])  # every pair of the La + Lb layers over all n images: one chunk
    la = len(a)
    diag = hsic.diagonal()
    return _cka_from_hsic(hsic[:la, la:], diag[:la], diag[la:]).numpy()


def _prepared(feats: Sequence[Any], k: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer: the normalised kernel, its k-NN mask and its CKNNA self-similarity."""
    out = []
    for f in feats:
        kernel, mask = _kernel_and_knn(_as_tensor(f), k)
        out.append((kernel, mask, _masked_hsic(kernel * mask, kernel * mask)))
    return out


def _alignment(a: Sequence[tuple[Tensor, Tensor, Tensor]], b: Sequence[tuple[Tensor, Tensor, Tensor]],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mutual k-NN and CKNNA between every layer pair of two :func:`_prepared` models -> two
    ``(La, Lb)`` arrays (each layer's kernel and neighbours computed once, not once per pair)."""
    mknn = np.zeros((len(a), len(b)))
    ckn = np.zeros((len(a), len(b)))
    for i, (ka, ma, self_a) in enumerate(a):
        for j, (kb, mb, self_b) in enumerate(b):
            both = ma & mb
            mknn[i, j] = float((both.sum(1).double() / k).mean())
            ckn[i, j] = float(_masked_hsic(ka * both, kb * both) / (self_a * self_b).clamp_min(0).sqrt())
    return mknn, ckn


def compare_models(name_a: str, result_a: AnalysisResult, name_b: str, result_b: AnalysisResult, *,
                   k: int = DEFAULT_K, cka: str = "debiased", _cache: dict | None = None) -> AnalysisResult:
    """Cross-model CKA, mutual k-NN and CKNNA between the saved features of two results.

    ``arrays``: ``cka``, ``mutual_knn``, ``cknna`` (La x Lb) and ``best_layer`` (for each layer of A,
    the layer of B with the highest mutual k-NN). Table rows (per layer l of A): ``cka-same-layer``,
    ``mutual-knn-same-layer``, ``cknna-same-layer`` (l of A with l of B, for the common depths),
    ``mutual-knn-best-layer`` (the best-aligned layer of B) and ``mutual-knn-best`` (its score), and
every entry of the three matrices (``cross-cka``, ``cross-mutual-knn``, ``cross-cknna``: ``layer`` of
A, ``column`` = layer of B).
    A ``k`` of at least the number of images is lowered to that number less one (``options["k"]``).
    """
    saved_a, saved_b = saved_features(result_a), saved_features(result_b)
    for name, saved in ((name_a, saved_a), (name_b, saved_b)):
        if saved is None:
            raise ValueError(f"{name} has no saved features (analysed with --cross-images 0, or before they "
                             f"were saved): run kamim-analyze run on it again")
    (fa, files_a), (fb, files_b) = saved_a, saved_b
    check_same_images(name_a, files_a, name_b, files_b)
    n = len(files_a)
    k = min(k, n - 1)  # a folder smaller than k + 1 images: every other image is a neighbour
    _check_k(k, n)
    matrix = cross_cka(fa, fb, cka)
    cache = {} if _cache is None else _cache  # name -> prepared layers, reused across the pairs of compare_all
    prepared = [cache[m] if m in cache else _prepared(f, k) for m, f in ((name_a, fa), (name_b, fb))]
    cache[name_a] = prepared[0]
    mknn, ckn = _alignment(prepared[0], prepared[1], k)
    best = mknn.argmax(axis=1) + 1
    name = f"{name_a} vs {name_b}"
    records = []
    for layer in range(1, min(len(fa), len(fb)) + 1):
        records += [Record(name, layer, -1, "cka-same-layer", float(matrix[layer - 1, layer - 1]), n),
                    Record(name, layer, -1, "mutual-knn-same-layer", float(mknn[layer - 1, layer - 1]), n),
                    Record(name, layer, -1, "cknna-same-layer", float(ckn[layer - 1, layer - 1]), n)]
    for layer in range(1, len(fa) + 1):
        records += [Record(name, layer, -1, "mutual-knn-best-layer", float(best[layer - 1]), n),
                    Record(name, layer, -1, "mutual-knn-best", float(mknn[layer - 1, best[layer - 1] - 1]), n)]
    for metric, values in (("cross-cka", matrix), ("cross-mutual-knn", mknn), ("cross-cknna", ckn)):
        records += matrix_records(name, metric, values, n)  # layer of A, column = layer of B
    gb = result_b.geometry
    return AnalysisResult(
        model_name=name, table=records_to_frame(records),
        arrays={"cka": matrix, "mutual_knn": mknn, "cknna": ckn, "best_layer": best},
        geometry=result_a.geometry, images=n, analyses=("cross-model",),
        options={"k": k, "cka": cka, "models": [name_a, name_b], "files sha256": files_digest(files_a),
                 "geometry_b": gb.to_dict() if hasattr(gb, "to_dict") else gb},
    )


def compare_all(results: Mapping[str, AnalysisResult], *, k: int = DEFAULT_K,
                cka: str = "debiased") -> dict[tuple[str, str], AnalysisResult]:
    """:func:`compare_models` for every pair of results with saved features, in the given order."""
    from itertools import combinations

    names = [n for n, r in results.items() if saved_features(r) is not None]
    out: dict[tuple[str, str], AnalysisResult] = {}
    cache: dict[str, Any] = {}
    for a, b in combinations(names, 2):  # a changes least often: its kernels are computed once, then kept
        if a not in cache:
            cache.clear()
        out[(a, b)] = compare_models(a, results[a], b, results[b], k=k, cka=cka, _cache=cache)
    return out
