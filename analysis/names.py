"""The names ``kamim-analyze --help`` lists, as plain tuples (no torch import).

:data:`ANALYSES` are the names of the built-in analyses, read from their registry declarations
(:mod:`analysis.builtin`; :func:`analysis.registry.names` adds plugins); :data:`RUN_OPTIONS` are the
fields of :class:`analysis.runner.RunOptions`, the keyword options of
:func:`analysis.runner.run_analyses` (a test keeps the two equal). :data:`CLI_OPTIONS` are those
that ``--option KEY=VALUE`` can set (a YAML value; not a module, a dtype, or ``batch_size``, which
has ``--batch-size``).
"""
from __future__ import annotations

from .builtin import BUILTIN

__all__ = ["ANALYSES", "RUN_OPTIONS", "CLI_OPTIONS", "CROSS_CKA", "MAX_CROSS_IMAGES", "DEFAULT_CROSS_IMAGES",
           "DEFAULT_CROSS_K"]

ANALYSES: tuple[str, ...] = tuple(a.name for a in BUILTIN)
RUN_OPTIONS = (
    "batch_size", "similarity_kind", "cka_pool", "cka_estimator", "cka_chunk", "tsne_layer", "tsne_samples",
    "tsne_perplexity", "tsne_iterations", "tsne_threads", "tsne_color", "pre_post_layer", "pre_post_images",
    "pre_post_pca", "matrix_scale", "rank_pool", "pca_images", "pca_foreground", "norm_outlier_mads",
    "map_images", "map_queries", "head_fusion", "attribution_methods", "attribution_model", "attribution_target",
    "attribution_steps", "attribution_internal_batch_size", "amp_dtype",
)
CLI_OPTIONS = tuple(n for n in RUN_OPTIONS if n not in ("batch_size", "attribution_model", "amp_dtype"))
#: cross-model CKA estimators, and the most images a model saves features of (analysis.crossmodel);
#: the n x n kernels of each layer of two models are held at once: 10,000 images take 800 MB each
CROSS_CKA = ("debiased", "biased")
MAX_CROSS_IMAGES = 10_000
DEFAULT_CROSS_IMAGES = 1000
DEFAULT_CROSS_K = 10  # as in Huh et al.'s figures
