"""Model-agnostic representation analysis for vision transformers.

Pure functions on tensors plus streaming accumulators (bounded memory, batch-size invariant) for
any timm ViT (any depth, patch size, image size, prefix tokens); geometry comes from the model.
Layers are numbered ``1..L`` (block ``l - 1``), ``0`` is the embedding. Entry point for a whole
dataset: :func:`analysis.runner.run_analyses`, which runs analyses registered in
:mod:`analysis.registry` (built-ins and plugins: :func:`register`, :func:`load_plugin`).

The names below are imported on first use (PEP 562), so that ``import analysis.cli`` (and
``kamim-analyze --help``) does not import torch.
"""
from __future__ import annotations

from kamim.lazy import lazy_exports
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attention import (
        AttentionMapsAccumulator,
        FirstImages,
        HeadMetricAccumulator,
        MeanOverImages,
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
    from .attribution import AttributionAccumulator, ProbeClassifier, integrated_gradients, patch_occlusion
    from .capture import (
        Captured,
        Geometry,
        SwinCapture,
        SwinGeometry,
        ViTCapture,
        ViTGeometry,
        capture,
        geometry_from_dict,
        model_geometry,
    )
    from .fourier import FourierAccumulator, LayerFourierAccumulator, delta_log_amplitude, fourier_frequencies
    from .demo import demo_eval_folder, ensure_demo_checkpoints, run_demo
    from .paper import (
        PAPER_ANALYSES,
        PAPER_FIGURES,
        PAPER_PREPROCESSING,
        figure_tables,
        paper_captions,
        paper_queries,
        reconstruction_figure,
        reproduce_paper_figures,
    )
    from .pipeline import (
        AnalyzeOutput,
        ModelSpec,
        Preprocessing,
        analyze,
        load_models,
        load_run,
        make_loader,
        plot_results,
    )
    from .plots import ModelPalette, plot_analysis, save_figure
    from .registry import Accumulator, Analysis, Batch, Context, get, load_plugin, register
    from .report import library_versions, summary_table, write_report
    from .results import AnalysisResult, Record, matrix_records, records_to_frame
    from .uncertainty import CI_LEVEL, Moments, t_interval
    from .seeds import combine_seeds, expand_seeds, shown_results
    from .evaluations import evaluation_table, read_evaluation
    from .rollout import RolloutAccumulator, RolloutMap, attention_rollout, rollout_map
    from .runner import ANALYSES, RunOptions, cross_model_cka, run_analyses
    from .crossmodel import cknna, compare_all, compare_models, cross_cka, mutual_knn
    from .similarity import (
        AttentionSimilarity,
        AttentionSimilarityAccumulator,
        CKAAccumulator,
        LayerCKAAccumulator,
        HeadSimilarity,
        attention_similarity,
        head_similarity,
        linear_cka,
    )
    from .norms import HighNormAccumulator, NormHistogram, high_norm_mask
    from .pca_images import PCAImagesAccumulator, oriented_components, pca_rgb
    from .rank import RankAccumulator, SecondMoments, rankme, spectrum_alpha
    from .tokens import AttentionShift, PrePostAccumulator, Reservoir, TSNEAccumulator, pre_post_pca, tsne_embedding

# public name -> submodule that defines it
_MODULES = {
    "attention": (
        "PatchAttention", "AttentionDistance", "AttentionEntropy", "AttentionNMI", "MeanOverImages", "FirstImages",
        "HeadMetricAccumulator", "AttentionMapsAccumulator", "attention_distance", "attention_entropy",
        "attention_maps", "normalized_mutual_information", "uniform_attention_distance", "uniform_attention_entropy",
        "uniform_nmi",
    ),
    "attribution": ("ProbeClassifier", "AttributionAccumulator", "integrated_gradients", "patch_occlusion"),
    "capture": (
        "Captured", "Geometry", "SwinCapture", "SwinGeometry", "ViTCapture", "ViTGeometry", "capture",
        "geometry_from_dict", "model_geometry",
    ),
    "fourier": ("FourierAccumulator", "LayerFourierAccumulator", "delta_log_amplitude", "fourier_frequencies"),
    # the registry's names() stays qualified (analysis.registry.names()): ``analysis.names`` is the
    # torch-free module of CLI names
    "registry": ("Accumulator", "Analysis", "Batch", "Context", "get", "load_plugin", "register"),
    # whole runs: analyse folders of images, redraw saved results, the demo, the paper's figures
    "pipeline": ("analyze", "plot_results", "make_loader", "load_models", "load_run", "ModelSpec", "AnalyzeOutput",
                 "Preprocessing"),
    "demo": ("run_demo", "ensure_demo_checkpoints", "demo_eval_folder"),
    "paper": ("reproduce_paper_figures", "PAPER_ANALYSES", "PAPER_FIGURES", "PAPER_PREPROCESSING", "paper_queries",
              "paper_captions", "figure_tables", "reconstruction_figure"),
    "plots": ("ModelPalette", "plot_analysis", "save_figure"),
    "report": ("library_versions", "summary_table", "write_report"),
    "results": ("AnalysisResult", "Record", "records_to_frame", "matrix_records"),
    # 95% intervals over images of the means over images (streaming, mergeable)
    "uncertainty": ("CI_LEVEL", "Moments", "t_interval"),
    # several checkpoints (seeds) under one model name, shown as their mean
    "seeds": ("expand_seeds", "combine_seeds", "shown_results"),
    # kamim linprobe / knn / finetune results shown in the report (--evaluation)
    "evaluations": ("read_evaluation", "evaluation_table"),
    "rollout": ("RolloutMap", "RolloutAccumulator", "attention_rollout", "rollout_map"),
    "runner": ("ANALYSES", "RunOptions", "cross_model_cka", "run_analyses"),
    # cross-model measures from saved features (mutual k-NN, CKNNA, layer x layer CKA)
    "crossmodel": ("mutual_knn", "cknna", "cross_cka", "compare_models", "compare_all"),
    "similarity": (
        "AttentionSimilarity", "AttentionSimilarityAccumulator", "CKAAccumulator", "LayerCKAAccumulator",
        "HeadSimilarity", "attention_similarity", "head_similarity", "linear_cka",
    ),
    "norms": ("high_norm_mask", "NormHistogram", "HighNormAccumulator"),
    "rank": ("rankme", "spectrum_alpha", "SecondMoments", "RankAccumulator"),
    "pca_images": ("pca_rgb", "oriented_components", "PCAImagesAccumulator"),
    "tokens": ("AttentionShift", "Reservoir", "TSNEAccumulator", "PrePostAccumulator", "pre_post_pca", "tsne_embedding"),
}
_EXPORTS = {name: f".{module}" for module, exported in _MODULES.items() for name in exported}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
