"""The built-in analyses, declared once (torch-free: accumulators and figures are imported lazily).

Each entry says what the analysis needs captured, which geometries it supports, its accumulator
(``analysis.<module>:<factory>``, the module that implements the analysis), its figure and title,
and the arrays it writes into :attr:`analysis.results.AnalysisResult.arrays`. Swin models have no
``(N, N)`` attention over the image (windowed attention) and their stages have different grids,
so only the block-output analyses that need neither (``cka``, ``tsne``, ``representation-rank``)
claim Swin; Fourier analysis needs one square token grid for all layers, i.e. a ViT with a square
grid (refused with one line at accumulator construction otherwise).
"""
from __future__ import annotations

from .registry import Analysis, lazy

__all__ = ["BUILTIN", "FIGURE_ONLY_TITLES", "CROSS_CAPTIONS"]

_VIT, _BOTH = frozenset({"vit"}), frozenset({"vit", "swin"})
_FIRST = ("inputs", "labels")  # the first ``map_images`` input images and their labels

BUILTIN: tuple[Analysis, ...] = (
    Analysis("attention-distance", "Attention distance", frozenset({"attention"}), _VIT,
             lazy("analysis.attention:distance_accumulator"), lazy("analysis.plots:plot_attention_distance")),
    Analysis("nmi", "Normalised mutual information", frozenset({"attention"}), _VIT,
             lazy("analysis.attention:nmi_accumulator"), lazy("analysis.plots:plot_nmi")),
    Analysis("attention-entropy", "Attention entropy", frozenset({"attention"}), _VIT,
             lazy("analysis.attention:entropy_accumulator"), lazy("analysis.plots:plot_attention_entropy")),
    Analysis("attention-similarity", "Self-attention similarity across layers", frozenset({"attention"}), _VIT,
             lazy("analysis.similarity:AttentionSimilarityAccumulator"),
             lazy("analysis.plots:plot_attention_similarity"), arrays=("attention_similarity", "head_similarity")),
    Analysis("cka", "CKA across layers", frozenset({"tokens"}), _BOTH,
             lazy("analysis.similarity:LayerCKAAccumulator"), lazy("analysis.plots:plot_cka"), arrays=("cka",)),
    Analysis("fourier", "Fourier analysis of feature maps", frozenset({"embedding", "tokens"}), _VIT,
             lazy("analysis.fourier:LayerFourierAccumulator"), lazy("analysis.plots:plot_fourier"),
             arrays=("fourier", "fourier_freqs")),
    Analysis("tsne", "Token t-SNE", frozenset({"tokens"}), _BOTH,
             lazy("analysis.tokens:TSNEAccumulator"), lazy("analysis.plots:plot_tsne"),
             arrays=("tsne_xy", "tsne_labels", "tsne_images", "tsne_label_kind", "tsne_layer")),
    Analysis("pre-post", "Pre- vs post-attention tokens", frozenset({"pre_attention", "post_attention"}), _VIT,
             lazy("analysis.tokens:PrePostAccumulator"), lazy("analysis.plots:plot_pre_post"), arrays=("pre_post",)),
    Analysis("attention-maps", "Attention maps", frozenset({"attention", "inputs"}), _VIT,
             lazy("analysis.attention:AttentionMapsAccumulator"), lazy("analysis.plots:plot_attention_maps"),
             arrays=("attention_maps", "attention_map_queries", *_FIRST)),
    Analysis("rollout", "Attention rollout", frozenset({"attention", "inputs"}), _VIT,
             lazy("analysis.rollout:RolloutAccumulator"), lazy("analysis.plots:plot_rollout"),
             arrays=("rollout", "rollout_mean", *_FIRST)),
    Analysis("attribution", "Attributions", frozenset({"inputs", "gradients"}), _VIT,
             lazy("analysis.attribution:AttributionAccumulator"), lazy("analysis.plots:plot_attribution"),
             arrays=("attribution", *_FIRST)),
    Analysis("representation-rank", "Representation rank", frozenset({"tokens"}), _BOTH,
             lazy("analysis.rank:RankAccumulator"), lazy("analysis.plots:plot_representation_rank"),
             arrays=("rank_spectrum",),
             caption="Left: RankMe (Garrido et al. 2023), the effective rank of the images' pooled features (option "
                     "rank_pool) after each block, uncentred. Right: α of the centred covariance spectrum "
                     "λ_k ∝ k^−α fitted on its top half (α-ReQ); a higher RankMe and a lower α mean features that "
                     "use more dimensions."),
    Analysis("high-norm-tokens", "High-norm tokens and attention sinks", frozenset({"attention", "tokens", "embedding"}),
             _VIT, lazy("analysis.norms:HighNormAccumulator"), lazy("analysis.plots:plot_high_norm_tokens"),
             arrays=("norm_histogram", "norm_log_edges"),
             caption="Left: share of each block's patch tokens by L2 norm (log scale). Right: attention of patch "
                     "queries on the prefix tokens (class token, registers; solid) and on the high-norm patches of "
                     "the block's input (median + norm_outlier_mads MADs of their image; dashed) (Darcet et al. 2024)."),
    Analysis("pca-images", "Patch-feature PCA images", frozenset({"tokens", "inputs"}), _VIT,
             lazy("analysis.pca_images:PCAImagesAccumulator"), lazy("analysis.plots:plot_pca_images"),
             arrays=("pca_rgb", "pca_mask", "pca_inputs", "pca_explained_variance_ratio"),
             caption="The first three principal components of the last block's patch tokens, fitted jointly over "
                     "the shown images, as red, green and blue (DINOv2, Fig. 1); each component's largest loading is "
                     "positive, so colours are comparable between runs. Similar colours: patches the model "
                     "represents alike."),
)

#: Titles of figures that belong to no single-model analysis.
FIGURE_ONLY_TITLES = {"cross-cka": "Cross-model CKA", "cross-mutual-knn": "Cross-model mutual k-NN alignment",
                      "cross-cknna": "Cross-model CKNNA", "reconstructions": "Masked-image reconstructions"}

#: Captions of the cross-model figures (analysis.crossmodel), shown under them in the report.
CROSS_CAPTIONS = {
    "cross-cka": "Linear CKA between every block of the row model and every block of the column model, on the "
                 "same saved images (Raghu et al. 2021): 1 = the same representation up to rotation and scale. A "
                 "bright diagonal means the two models build their representations in the same order.",
    "cross-mutual-knn": "Mutual k-nearest-neighbour alignment (Huh et al. 2024): the share of each image's k "
                        "nearest neighbours that both blocks agree on; about k / N for unrelated representations, 1 "
                        "for identical neighbourhoods. Outlined: the column block best aligned with each row block.",
    "cross-cknna": "CKNNA (Huh et al. 2024): CKA restricted to image pairs that are k-nearest neighbours in both "
                   "blocks, which weighs local agreement over the global layout; 1 = identical local structure.",
}
