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
             lazy("analysis.attention:distance_accumulator"), lazy("analysis.plots:plot_attention_distance"),
             caption="Mean distance (px) between each query patch and the patches it attends to, weighted by attention, per "
                     "block; faint markers: heads; dashed: uniform attention on the model's grid; shaded: 95% interval "
                     "over images (across seeds for a mean of seeds). Higher = more global.\n"
                     "Paper: KAMIM's ViT-B attends farther than SimMIM's, like contrastive MoCo v3 (Krishna & "
                     "Subramanyam 2024); contrastive models' distances grow in later blocks while MIM's stay local "
                     "(Park et al. 2023)."),
    Analysis("nmi", "Normalised mutual information", frozenset({"attention"}), _VIT,
             lazy("analysis.attention:nmi_accumulator"), lazy("analysis.plots:plot_nmi"),
             caption="Normalised mutual information between query and key positions per block (0: every query attends "
        "alike, 1: each query to its own key); dashed: uniform attention (0); shaded: 95% interval over images.\n"
        "Paper: contrastive attention collapses to the same map for every query in later blocks (low NMI) while "
        "MIM's depends on the query (Park et al. 2023); KAMIM is reported to behave like contrastive learning."),
    Analysis("attention-entropy", "Attention entropy", frozenset({"attention"}), _VIT,
             lazy("analysis.attention:entropy_accumulator"), lazy("analysis.plots:plot_attention_entropy"),
             caption="Mean entropy (nats) of each query patch's attention over the patches per block; dashed: uniform "
                      "attention, log N; shaded: 95% interval over images. Lower = attention on fewer patches.\n"
                      "Not a figure of the KAMIM paper: read it beside attention distance (a long distance with a "
                      "high entropy is spread-out attention, not a few far patches)."),
    Analysis("attention-similarity", "Self-attention similarity across layers", frozenset({"attention"}), _VIT,
             lazy("analysis.similarity:AttentionSimilarityAccumulator"),
             lazy("analysis.plots:plot_attention_similarity"), arrays=("attention_similarity", "head_similarity"),
             caption="Similarity of the attention maps of every pair of blocks (option similarity_kind), averaged "
                         "over images; a bright block means those blocks attend alike. Every entry, with its 95% "
                         "interval over images, is in metrics.csv (metric attention-similarity).\n"
                         "Paper: KAMIM's self-attention is homogeneous across layers, as in contrastive learning, "
                         "unlike SimMIM's (Krishna & Subramanyam 2024)."),
    Analysis("cka", "CKA across layers", frozenset({"tokens"}), _BOTH,
             lazy("analysis.similarity:LayerCKAAccumulator"), lazy("analysis.plots:plot_cka"), arrays=("cka",),
             caption="Linear CKA between the pooled outputs of every pair of blocks of one model (option cka_pool): 1 = the same "
        "representation up to rotation and scale; every entry is in metrics.csv (metric cka).\n"
        "Not a figure of the KAMIM paper; a bright block of late layers is the layer-to-layer homogeneity reported "
        "for contrastive models (Park et al. 2023)."),
    Analysis("fourier", "Fourier analysis of feature maps", frozenset({"embedding", "tokens"}), _VIT,
             lazy("analysis.fourier:LayerFourierAccumulator"), lazy("analysis.plots:plot_fourier"),
             arrays=("fourier", "fourier_freqs"),
             caption="Left: Δ log amplitude of the token maps' Fourier spectrum from frequency 0 to the grid's highest, per "
            "depth; right: its value at the highest frequency per depth, shaded: 95% interval over images. Lower = "
            "more low-pass (shape-like) features.\n"
            "Paper: contrastive models keep low frequencies and MIM models high ones (Park et al. 2023); the KAMIM "
            "paper reads its Fourier analysis as a move of KAMIM toward contrastive learning."),
    Analysis("tsne", "Token t-SNE", frozenset({"tokens"}), _BOTH,
             lazy("analysis.tokens:TSNEAccumulator"), lazy("analysis.plots:plot_tsne"),
             arrays=("tsne_xy", "tsne_labels", "tsne_images", "tsne_label_kind", "tsne_layer"),
             caption="t-SNE of a seeded sample of the patch tokens of one block (option tsne_layer, default the last), coloured "
         "by class (or by image); a marker per class when colours repeat.\n"
         "Paper: contrastive tokens cluster by image (an image-level representation), MIM tokens spread within the "
         "image (token-level) (Park et al. 2023); the KAMIM paper's token visualisation draws KAMIM toward the former."),
    Analysis("pre-post", "Pre- vs post-attention tokens", frozenset({"pre_attention", "post_attention"}), _VIT,
             lazy("analysis.tokens:PrePostAccumulator"), lazy("analysis.plots:plot_pre_post"), arrays=("pre_post",),
             caption="Left: PCA of one block's input tokens (after norm1) and of its attention output, coloured by image, large "
             "markers the image centroids; right: the attention shift ||attn(norm1 x)|| / ||norm1 x|| per block, "
             "shaded: 95% interval over images.\n"
             "Paper: an attention output that moves all tokens of an image the same way is the attention collapse of "
             "contrastive models (Park et al. 2023), which the KAMIM paper reports to resemble KAMIM's."),
    Analysis("attention-maps", "Attention maps", frozenset({"attention", "inputs"}), _VIT,
             lazy("analysis.attention:AttentionMapsAccumulator"), lazy("analysis.plots:plot_attention_maps"),
             arrays=("attention_maps", "attention_map_queries", *_FIRST),
             caption="Attention of query patches (outlined; option map_queries) over the patches, per block (mean over "
                   "heads), on one analysed image. Maps that do not move with the query are query-independent attention.\n"
                   "Paper: contrastive attention is the same for every query and head in later blocks, MIM attention "
                   "stays around the query (Park et al. 2023)."),
    Analysis("rollout", "Attention rollout", frozenset({"attention", "inputs"}), _VIT,
             lazy("analysis.rollout:RolloutAccumulator"), lazy("analysis.plots:plot_rollout"),
             arrays=("rollout", "rollout_mean", *_FIRST),
             caption="Attention rollout (Abnar & Zuidema 2020): attention multiplied through the blocks with the residual, the "
            "class token's (or the patches' mean) relevance per patch, on the first images and averaged over all.\n"
            "Not a figure of the KAMIM paper; shown to see which image regions reach the last block."),
    Analysis("attribution", "Attributions", frozenset({"inputs", "gradients"}), _VIT,
             lazy("analysis.attribution:AttributionAccumulator"), lazy("analysis.plots:plot_attribution"),
             arrays=("attribution", *_FIRST),
             caption="Integrated gradients and patch occlusion (captum) of a linear probe on the frozen features, per patch, "
                "on the first images; each row has its own labelled colour scale.\n"
                "Not a figure of the KAMIM paper; shown to see which image regions the linear probe relies on."),
    Analysis("representation-rank", "Representation rank", frozenset({"tokens"}), _BOTH,
             lazy("analysis.rank:RankAccumulator"), lazy("analysis.plots:plot_representation_rank"),
             arrays=("rank_spectrum",),
             caption="Left: RankMe (Garrido et al. 2023), the effective rank of the images' pooled features (option "
                     "rank_pool) after each block, uncentred. Right: α of the centred covariance spectrum "
                     "λ_k ∝ k^−α fitted on its top half (α-ReQ); a higher RankMe and a lower α mean features that "
                     "use more dimensions.\n"
                     "Not a figure of the KAMIM paper; a collapse of RankMe in the last blocks is the dimensional "
                     "collapse reported for joint-embedding methods (Garrido et al. 2023)."),
    Analysis("high-norm-tokens", "High-norm tokens and attention sinks", frozenset({"attention", "tokens", "embedding"}),
             _VIT, lazy("analysis.norms:HighNormAccumulator"), lazy("analysis.plots:plot_high_norm_tokens"),
             arrays=("norm_histogram", "norm_log_edges"),
             caption="Left: share of each block's patch tokens by L2 norm (log scale). Right: attention of patch "
                     "queries on the prefix tokens (class token, registers; solid) and on the high-norm patches of "
                     "the block's input (median + norm_outlier_mads MADs of their image; dashed) (Darcet et al. 2024); shaded: "
                     "95% interval over images.\n"
                     "Not a figure of the KAMIM paper; high-norm patches that draw attention are the artefacts "
                     "Darcet et al. (2024) remove with registers."),
    Analysis("pca-images", "Patch-feature PCA images", frozenset({"tokens", "inputs"}), _VIT,
             lazy("analysis.pca_images:PCAImagesAccumulator"), lazy("analysis.plots:plot_pca_images"),
             arrays=("pca_rgb", "pca_mask", "pca_inputs", "pca_explained_variance_ratio"),
             caption="The first three principal components of the last block's patch tokens, fitted jointly over "
                     "the shown images, as red, green and blue (DINOv2, Fig. 1); each component's largest loading is "
                     "positive, so colours are comparable between runs. Similar colours: patches the model "
                     "represents alike.\n"
                     "Not a figure of the KAMIM paper (Oquab et al. 2024, Fig. 1)."),
)

#: Titles of figures that belong to no single-model analysis.
FIGURE_ONLY_TITLES = {"cross-cka": "Cross-model CKA", "cross-mutual-knn": "Cross-model mutual k-NN alignment",
                      "cross-cknna": "Cross-model CKNNA", "reconstructions": "Masked-image reconstructions"}

#: Captions of the cross-model figures (analysis.crossmodel), shown under them in the report.
CROSS_CAPTIONS = {
    "cross-cka": "Linear CKA between every block of the row model and every block of the column model, on the "
                 "same saved images (Raghu et al. 2021): 1 = the same representation up to rotation and scale. A "
                 "bright diagonal means the two models build their representations in the same order.\n"
                 "Not a figure of the KAMIM paper; every entry is in metrics.csv (metric cross-cka).",
    "cross-mutual-knn": "Mutual k-nearest-neighbour alignment (Huh et al. 2024): the share of each image's k "
                        "nearest neighbours that both blocks agree on; about k / N for unrelated representations, 1 "
                        "for identical neighbourhoods. Outlined: the column block best aligned with each row block.\n"
                        "Not a figure of the KAMIM paper; every entry is in metrics.csv (metric cross-mutual-knn).",
    "cross-cknna": "CKNNA (Huh et al. 2024): CKA restricted to image pairs that are k-nearest neighbours in both "
                   "blocks, which weighs local agreement over the global layout; 1 = identical local structure.\n"
                   "Not a figure of the KAMIM paper; every entry is in metrics.csv (metric cross-cknna).",
}
