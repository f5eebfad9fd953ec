"""Model-agnostic representation analysis for vision transformers.

Pure functions on tensors plus streaming accumulators (bounded memory, batch-size invariant) for
any timm ViT (any depth, patch size, image size, prefix tokens); geometry comes from the model.
Layers are numbered ``1..L`` (block ``l - 1``), ``0`` is the embedding. Entry point for a whole
dataset: :func:`analysis.runner.run_analyses`.

The names below are imported on first use (PEP 562), so that ``import analysis.cli`` (and
``kamim-analyze --help``) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attention import (
        PatchAttention,
        AttentionDistance,
        AttentionEntropy,
        AttentionNMI,
        attention_distance,
        attention_entropy,
        attention_maps,
        normalized_mutual_information,
        uniform_attention_distance,
        uniform_attention_entropy,
        uniform_nmi,
    )
    from .attribution import ProbeClassifier, integrated_gradients, patch_occlusion
    from .capture import (
        Captured,
        SwinCapture,
        SwinGeometry,
        ViTCapture,
        ViTGeometry,
        capture,
        geometry_from_dict,
        model_geometry,
    )
    from .fourier import FourierAccumulator, delta_log_amplitude, fourier_frequencies
    from .results import AnalysisResult, Record, records_to_frame
    from .rollout import RolloutMap, attention_rollout, rollout_map
    from .runner import ANALYSES, cross_model_cka, run_analyses
    from .similarity import (
        AttentionSimilarity,
        CKAAccumulator,
        HeadSimilarity,
        attention_similarity,
        head_similarity,
        linear_cka,
    )
    from .tokens import AttentionShift, Reservoir, pre_post_pca, tsne_embedding

# public name -> submodule that defines it
_EXPORTS = {
    "PatchAttention": "attention", "AttentionDistance": "attention", "AttentionEntropy": "attention",
    "AttentionNMI": "attention", "attention_distance": "attention", "attention_entropy": "attention",
    "attention_maps": "attention", "normalized_mutual_information": "attention", "uniform_attention_distance":
    "attention", "uniform_attention_entropy": "attention", "uniform_nmi": "attention",
    "ProbeClassifier": "attribution", "integrated_gradients": "attribution", "patch_occlusion": "attribution",
    "Captured": "capture", "SwinCapture": "capture", "SwinGeometry": "capture", "ViTCapture": "capture",
    "ViTGeometry": "capture", "capture": "capture", "geometry_from_dict": "capture", "model_geometry": "capture",
    "FourierAccumulator": "fourier", "delta_log_amplitude": "fourier", "fourier_frequencies": "fourier",
    "AnalysisResult": "results", "Record": "results", "records_to_frame": "results",
    "RolloutMap": "rollout", "attention_rollout": "rollout", "rollout_map": "rollout",
    "ANALYSES": "runner", "cross_model_cka": "runner", "run_analyses": "runner",
    "AttentionSimilarity": "similarity", "CKAAccumulator": "similarity", "HeadSimilarity": "similarity",
    "attention_similarity": "similarity", "head_similarity": "similarity", "linear_cka": "similarity",
    "AttentionShift": "tokens", "Reservoir": "tokens", "pre_post_pca": "tokens", "tsne_embedding": "tokens",
}
__all__ = [
    "ANALYSES", "AnalysisResult", "AttentionDistance", "AttentionEntropy", "AttentionNMI", "AttentionShift",
    "AttentionSimilarity", "CKAAccumulator", "Captured", "FourierAccumulator", "HeadSimilarity", "ProbeClassifier",
    "PatchAttention", "Record", "Reservoir", "RolloutMap", "SwinCapture", "SwinGeometry", "ViTCapture", "ViTGeometry",
    "attention_distance", "attention_entropy", "attention_maps", "attention_rollout", "attention_similarity",
    "capture", "cross_model_cka", "geometry_from_dict", "delta_log_amplitude", "fourier_frequencies", "head_similarity",
    "integrated_gradients", "linear_cka", "model_geometry", "normalized_mutual_information", "patch_occlusion",
    "pre_post_pca", "records_to_frame", "rollout_map", "run_analyses", "tsne_embedding",
    "uniform_attention_distance", "uniform_attention_entropy", "uniform_nmi",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
