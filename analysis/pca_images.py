"""Patch-feature PCA images, as in the DINOv2 paper's figures (Oquab et al. 2023, Fig. 1).

For the first ``pca_images`` images of the stream, the last block's patch tokens of all of them are
fitted **jointly** with one PCA (``sklearn.decomposition.PCA``); the first three components, each
min-max scaled to [0, 1] over those images, are the red, green and blue channels of an ``h × w``
image per input. Option ``pca_foreground``: as DINOv2, the first component is thresholded at 0 to
separate foreground from background (the side with fewer patches is called foreground, objects
rarely fill half the image), and the three RGB components are fitted on the foreground patches only
(background drawn black).

**Sign convention:** a principal component is defined up to its sign, so without a rule the colours
of two runs or two models could be swapped. Every component is oriented so that its loading with
the largest absolute value is positive (scikit-learn's ``svd_flip(u_based_decision=False)``
convention, applied here explicitly so that it does not depend on the solver). With a fixed model
and images the arrays, and the figure's file bytes, are the same on every run.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["oriented_components", "pca_rgb", "PCAImagesAccumulator"]


def oriented_components(x: np.ndarray, n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the rows of ``x`` ``(M, D)``: (projections ``(M, n)``, components ``(n, D)``, explained
    variance ratios), each component signed by the convention of the module docstring."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    pca = PCA(n_components=n, svd_solver="full", random_state=seed).fit(x)
    comps = pca.components_.copy()
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    return (x - pca.mean_) @ comps.T, comps, pca.explained_variance_ratio_.copy()


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int], foreground: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """RGB images of the first three principal components of ``tokens`` ``(images, h * w, D)``,
    fitted jointly over the images: ``rgb`` ``(images, h, w, 3)`` in [0, 1], ``mask`` ``(images, h, w)``
    (foreground patches; all True without ``foreground``), ``explained_variance_ratio``."""
    m, n, d = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not form the {h}x{w} grid")
    flat = np.asarray(tokens, dtype=np.float64).reshape(m * n, d)
    mask = np.ones(m * n, dtype=bool)
    if foreground:
        first = oriented_components(flat, 1, seed)[0][:, 0]
        above = first > 0
        mask = above if above.sum() <= (~above).sum() else ~above
        if mask.sum() < 3:
            raise ValueError("the foreground threshold left fewer than 3 patches; run without pca_foreground")
    proj, _, evr = oriented_components(flat[mask], 3, seed)
    lo, hi = proj.min(0), proj.max(0)
    rgb = np.zeros((m * n, 3))
    rgb[mask] = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    return {"rgb": rgb.reshape(m, h, w, 3).astype(np.float32), "mask": mask.reshape(m, h, w),
            "explained_variance_ratio": evr.astype(np.float32)}


class PCAImagesAccumulator:
    """``pca-images``: the last block's patch tokens of the first ``pca_images`` images (options
    ``pca_images``, ``pca_foreground``) -> arrays ``pca_rgb``, ``pca_mask``, ``pca_inputs`` (the images)."""

    def __init__(self, context) -> None:
        from .attention import FirstImages

        self.context = context
        self.first = FirstImages(context.options.pca_images)

    def update(self, batch) -> None:
        g = self.context.geometry
        tokens: Tensor = batch.captured.block_output[g.depth][:, g.num_prefix_tokens:]
        self.first.add(batch.indices, tokens=tokens.float(), inputs=batch.images.float())

    def merge(self, other: PCAImagesAccumulator) -> None:
        self.first.merge(other.first)

    def finish(self):
        kept = self.first.arrays()
        g, opts = self.context.geometry, self.context.options
        out = pca_rgb(kept["tokens"].numpy(), tuple(g.grid), opts.pca_foreground, self.context.seed)
        return [], {"pca_rgb": out["rgb"], "pca_mask": out["mask"], "pca_inputs": kept["inputs"],
                    "pca_explained_variance_ratio": out["explained_variance_ratio"]}
