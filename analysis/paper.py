"""Reproduce the representation figures of the KAMIM paper from SimMIM, KAMIM and MoCo v3 checkpoints.

Settings (the paper's, following naver-ai/cl-vs-mim on which its analysis notebooks are based):

* images preprocessed as in the reference notebooks (:data:`PAPER_PREPROCESSING`): timm's eval
  transform with **bilinear** interpolation (short side to size / 0.875, centre crop); ``kamim-analyze
  run`` defaults to bicubic, which moves distance, NMI and Fourier by 1-2%;
* MIM models (SimMIM, KAMIM) at 192 px (their pretraining resolution, 12×12 tokens of 16 px);
  MoCo v3 at its own resolution (224 px for the released ViT-B/16) rather than a 192 px crop
  resized to 224 (the notebooks' pitfall that makes pixel distances incomparable). Each figure
  states the resolution of every model.
* block outputs indexed by depth 1..L for every model (0 = patch embedding in the Fourier plot);
* attention maps for the same query positions in every model, given as fractions of the token
  grid (:data:`PAPER_QUERY_FRACTIONS`: the centre patch and one off-centre patch; the paper does not
  list its exact query patches), on the first analysed image;
* t-SNE of last-layer patch tokens coloured by class; pre/post-attention PCA of the last block;
* reconstructions of the SimMIM and KAMIM training checkpoints (they hold the decoder) at mask
  ratio :data:`PAPER_RECONSTRUCTION_MASK_RATIO`, same images and masks for both.

Output: one file per figure with stable names (:data:`PAPER_FIGURES`, PDF + PNG), the numbers
behind each as ``<figure>.csv``, plus ``metrics.csv``/``metrics.json`` and ``report.html``, where
each figure's caption (:func:`paper_captions`) names the conventions of the reference notebooks it
does not copy.
"""
from __future__ import annotations

import logging

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from analysis.pipeline import AnalyzeOutput, Preprocessing, UsageError, analyze

__all__ = [
    "PAPER_FIGURES", "PAPER_ANALYSES", "PAPER_MIM_IMAGE_SIZE", "PAPER_QUERY_FRACTIONS",
    "PAPER_RECONSTRUCTION_MASK_RATIO", "PAPER_PREPROCESSING", "paper_queries", "paper_captions", "figure_tables",
    "reconstruction_figure", "reconstruction_note", "reproduce_paper_figures",
]

PathLike = Union[str, Path]
PAPER_MIM_IMAGE_SIZE = 192
PAPER_RECONSTRUCTION_MASK_RATIO = 0.4
PAPER_QUERY_FRACTIONS: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.25, 0.75))
PAPER_ANALYSES = ("attention-maps", "attention-distance", "nmi", "fourier", "tsne", "pre-post")
# analysis (or "reconstructions") -> stable file stem
PAPER_FIGURES: dict[str, str] = {
    "attention-maps": "fig_attention_maps",
    "attention-distance": "fig_attention_distance",
    "nmi": "fig_normalized_mutual_information",
    "fourier": "fig_fourier_analysis",
    "tsne": "fig_token_tsne",
    "pre-post": "fig_pre_post_attention",
    "reconstructions": "fig_reconstructions",
}
_MIM = ("SimMIM", "KAMIM")
#: the reference notebooks' preprocessing: timm's eval transform, bilinear, crop_pct 0.875
PAPER_PREPROCESSING = Preprocessing("bilinear", 0.875)


def paper_queries(grid: tuple[int, int],
                  fractions: tuple[tuple[float, float], ...] = PAPER_QUERY_FRACTIONS
                  ) -> tuple[tuple[int, int], ...]:
    """Grid positions ``(row, col)`` of the query patches at ``fractions`` of a ``grid``.

    ``(0.5, 0.5)`` on a 12×12 grid is patch (6, 6): the same relative image position in every
    model whatever its grid.
    """
    h, w = int(grid[0]), int(grid[1])
    return tuple((min(h - 1, int(fr * h)), min(w - 1, int(fc * w))) for fr, fc in fractions)


def figure_tables(results: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The numbers behind each paper figure, one tidy table per analysis key of :data:`PAPER_FIGURES`."""
    tables: dict[str, pd.DataFrame] = {}
    for key, metric in (("attention-distance", "attention-distance"), ("nmi", "nmi")):
        frames = [r.table[r.table["metric"] == metric] for r in results.values()]
        frames = [f for f in frames if not f.empty]
        if frames:
            tables[key] = pd.concat(frames, ignore_index=True)

    fourier, tsne, pre_post = [], [], []
    for name, r in results.items():
        if "fourier" in r.arrays:
            curves, freqs = np.asarray(r.arrays["fourier"]), np.asarray(r.arrays["fourier_freqs"])
            depth, f = np.indices(curves.shape).reshape(2, -1)
            fourier.append(pd.DataFrame({"model": name, "layer": depth, "frequency_pi": freqs[f],
                                         "delta_log_amplitude": curves.reshape(-1),
                                         "images": r.images}))
        if "tsne_xy" in r.arrays:
            xy, lab = np.asarray(r.arrays["tsne_xy"]), np.asarray(r.arrays["tsne_labels"])
            names = r.arrays.get("class_names")
            cls = [str(names[int(l)]) if names is not None and 0 <= int(l) < len(names) else ""
                   for l in lab]
            tsne.append(pd.DataFrame({
                "model": name, "layer": int(np.asarray(r.arrays.get("tsne_layer", -1))),
                "x": xy[:, 0], "y": xy[:, 1], "label": lab, "class": cls,
                "image": np.asarray(r.arrays.get("tsne_images", np.full(len(xy), -1)))}))
        pp = r.arrays.get("pre_post")
        if pp is not None:
            for kind in ("pre", "post"):
                xy = np.asarray(pp[f"{kind}_xy"])
                pre_post.append(pd.DataFrame({
                    "model": name, "layer": int(np.asarray(pp["layer"])), "tokens": kind,
                    "pc1": xy[:, 0], "pc2": xy[:, 1], "image": np.asarray(pp["image"])}))
    for key, frames_ in (("fourier", fourier), ("tsne", tsne), ("pre-post", pre_post)):
        if frames_:
            tables[key] = pd.concat(frames_, ignore_index=True)
    shift = [r.table[r.table["metric"].isin(["attention-shift-ratio", "attention-shift-cosine"])]
             for r in results.values()]
    shift = [t for t in shift if not t.empty]
    if shift:
        tables["pre-post-shift"] = pd.concat(shift, ignore_index=True)

    frames = []
    for name, r in results.items():
        if "attention_maps" not in r.arrays:
            continue
        maps = np.asarray(r.arrays["attention_maps"], dtype=np.float64)  # (M, L, heads, Q, h, w)
        queries = np.asarray(r.arrays["attention_map_queries"]).reshape(-1, 2)
        mean = maps[0].mean(1)  # first image, mean over heads -> (L, Q, h, w)
        layer, q, kr, kc = np.indices(mean.shape).reshape(4, -1)
        frames.append(pd.DataFrame({
            "model": name, "image": 0, "layer": layer + 1, "query_row": queries[q, 0],
            "query_col": queries[q, 1], "key_row": kr, "key_col": kc,
            "attention": mean.reshape(-1)}))
    if frames:
        tables["attention-maps"] = pd.concat(frames, ignore_index=True)
    return tables


def reconstruction_figure(checkpoints: Mapping[str, PathLike], data: PathLike, out_stem: PathLike,
                          *, images: Optional[int] = None, figure_images: int = 4,
                          mask_ratio: float = PAPER_RECONSTRUCTION_MASK_RATIO, seed: int = 0,
                          batch_size: int = 32, device: str = "cpu",
                          preprocessing: Preprocessing = PAPER_PREPROCESSING) -> pd.DataFrame:
    """Reconstruction grid (PDF + PNG at ``out_stem``) and PSNR/SSIM table of MIM checkpoints.

    Uses :mod:`kamim.eval.reconstruct`: the full pretraining models (encoder + decoder) are rebuilt
    from the training checkpoints; every model sees the same images and the same seeded masks.
    """
    import matplotlib.pyplot as plt
    import torch
    from torch.utils.data import Subset

    from analysis.plots import save_figure
    from kamim import (ImageFolderDataset, MaskedImages, MaskGenerator, data_loader, evaluate_reconstruction,
                       load_pretrain_model, plot_reconstructions)

    models, infos = {}, {}
    for name, path in checkpoints.items():
        models[name], infos[name] = load_pretrain_model(path, device)
    sizes = {int(i["img_size"]) for i in infos.values()}
    if len(sizes) != 1:
        raise ValueError(f"reconstruction models disagree on the image size: "
                         f"{ {n: i['img_size'] for n, i in infos.items()} }")
    img = sizes.pop()
    mps = int(next(iter(infos.values()))["mask_patch_size"])
    masker = MaskGenerator(input_size=img, mask_patch_size=mps, model_patch_size=mps,
                           mask_ratio=mask_ratio)
    base: Any = ImageFolderDataset(data, preprocessing.transform((img, img)))
    if images is not None and images < len(base):
        idx = np.sort(np.random.default_rng(seed).permutation(len(base))[:images])
        base = Subset(base, idx.tolist())
    masked = MaskedImages(base, masker, seed)
    loader = data_loader(masked, workers=0, batch_size=batch_size)
    with torch.no_grad():
        metrics = evaluate_reconstruction(models, loader, device)
    shown = min(figure_images, len(masked))
    fig = plot_reconstructions(models, masked, list(range(shown)), None, device, metrics=metrics)
    counted = int(next(iter(metrics.values())).get("num_images", len(masked)))
    fig.suptitle(f"Reconstructions at mask ratio {mask_ratio} ({img} px, mask patch {mps} px; {shown} of "
                 f"{counted} images, PSNR/SSIM over all {counted})", fontsize="medium")
    try:
        save_figure(fig, out_stem)
    finally:
        plt.close(fig)
    return pd.DataFrame([{"model": n, "img_size": img, "mask_ratio": mask_ratio,
                          "mask_patch_size": mps, **{k: float(v) for k, v in m.items()}}
                         for n, m in metrics.items()])


def reconstruction_note(table: pd.DataFrame) -> str:
    """The report's sentence on reconstruction quality, from :func:`reconstruction_figure`'s table."""
    models = "; ".join(f"{r['model']} PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}" for _, r in table.iterrows())
    first = table.iloc[0]
    return (f"Reconstructions at mask ratio {first['mask_ratio']:g} ({int(first['img_size'])} px, "
            f"{int(first['num_images'])} images, mean per image): {models}.")


def paper_captions(options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Each paper figure's caption: what it shows, and each convention of the reference notebooks
    (naver-ai/cl-vs-mim and the KAMIM fork) that it deliberately does not copy. ``options``: the run's
    analysis options (the pre/post PCA mode)."""
    joint = dict(options or {}).get("pre_post_pca") == "joint"
    return {
        "attention-maps": (
            "Attention of two query patches (the centre and one off-centre patch, at fixed fractions of each "
            "model's grid; the paper does not list its query patches) over the patches, per block, on the first "
            "analysed image. MoCo v3 is shown at its own resolution, not a 192 px crop resized to 224."),
        "attention-distance": (
            "Mean attention distance (px between patch centres, weighted by attention) per block, over every "
            "analysed image (the notebooks analyse one batch). Rows with no attention on patches are excluded "
            "(the notebooks' 1e-32 makes them uniform); MoCo v3 at its own resolution, not a 192 px crop resized "
            "to 224, which would make its pixel distances incomparable."),
        "nmi": (
            "Normalised mutual information between query and key positions per block, over every analysed image "
            "(the notebooks: one batch). Computed without cl-vs-mim's +1e-8 before renormalising (up to 7% on "
            "rows with almost all mass on the class token); rows with no attention on patches are excluded."),
        "fourier": (
            "Δ log amplitude at the highest frequency of the token maps, at the patch embedding (depth 0) and "
            "after every block, the same depths for every model. The KAMIM fork plots embedding + blocks 1-11 for "
            "SimMIM/KAMIM but blocks 1-12 for MoCo v3 at the same x positions; here no model is shifted."),
        "tsne": (
            "t-SNE of the last block's patch tokens (a seeded sample of every analysed image), coloured by class, "
            "block L for every model. cl-vs-mim's depth index selects block 5 of an interleaved list, and the "
            "KAMIM fork's block 11 for SimMIM/KAMIM but a post-attention residual of block 6 for MoCo v3."),
        "pre-post": (
            "PCA of the last block's input tokens (after norm1) and of its attention output, on sampled images: "
            + ("one PCA fitted on both token sets (option pre_post_pca=joint), as the KAMIM fork (which fits it "
               "on one image)." if joint else
               "a separate PCA per token set (option pre_post_pca=joint fits one on both, as the KAMIM fork).")),
        "reconstructions": (
            f"SimMIM and KAMIM reconstructions of the same images under the same seeded masks (mask ratio "
            f"{PAPER_RECONSTRUCTION_MASK_RATIO}); mean PSNR and SSIM per model in fig_reconstructions.csv."),
    }


def reproduce_paper_figures(checkpoints: Mapping[str, PathLike], data: PathLike, out: PathLike, *,
                            images: Optional[int] = None, batch_size: int = 32,
                            device: str = "cpu", seed: int = 0, workers: int = 0,
                            mim_image_size: Optional[int] = None,
                            moco_image_size: Optional[int] = None, map_images: int = 1,
                            progress: bool = True, notes: tuple[str, ...] = (),
                            options: Optional[Mapping[str, Any]] = None,
                            overwrite: bool = False, config: Any = None,
                            preprocessing: Preprocessing = PAPER_PREPROCESSING) -> AnalyzeOutput:
    """Write every paper figure for ``checkpoints`` (``{"SimMIM": .., "KAMIM": .., "MoCo v3": ..}``).

    Returns :class:`analysis.pipeline.AnalyzeOutput`. ``mim_image_size`` defaults to 192 px,
    ``moco_image_size`` to the checkpoint's own resolution; ``preprocessing`` to the reference
    notebooks' (the report says which was used). Reconstructions need SimMIM/KAMIM *training*
    checkpoints (with the decoder); with encoder-only files they are skipped and the report says so.
    """
    said = ("the reference notebooks' preprocessing" if preprocessing == PAPER_PREPROCESSING
            else f"not the reference notebooks' preprocessing ({PAPER_PREPROCESSING.describe()})")
    notes = (*notes, f"Preprocessing: {preprocessing.describe()}; {said}.")
    mim = mim_image_size or PAPER_MIM_IMAGE_SIZE
    sizes = {name: (mim if name in _MIM else moco_image_size) for name in checkpoints}

    def model_options(name: str, geometry: Any) -> dict[str, Any]:
        return {"map_queries": paper_queries(geometry.grid), "map_images": map_images}

    def extra(staging: Path, results: Mapping[str, Any], loaded: Mapping[str, Any],
              run_notes: list[str]) -> dict[str, list[Path]]:
        for key, table in figure_tables(results).items():
            stem = PAPER_FIGURES.get(key) or f"{PAPER_FIGURES['pre-post']}_shift"
            _write_csv(table, staging / f"{stem}.csv")
        mim_ckpts = {n: checkpoints[n] for n in _MIM if n in checkpoints}
        formats = {n: loaded[n].format for n in mim_ckpts}

        def has_decoder(name: str) -> bool:  # a training checkpoint, or a run directory holding one
            source = Path(str(mim_ckpts[name])).expanduser()
            return formats[name] == "kamim-pretrain" or (source / "checkpoint-last.pt").is_file()

        if mim_ckpts and all(has_decoder(n) for n in mim_ckpts):
            stem = staging / PAPER_FIGURES["reconstructions"]
            try:
                table = reconstruction_figure(mim_ckpts, data, stem, images=images, seed=seed,
                                              batch_size=batch_size, device=device, preprocessing=preprocessing)
            except (ValueError, KeyError) as err:
                raise UsageError(f"reconstructions: {err}") from None
            _write_csv(table, staging / f"{PAPER_FIGURES['reconstructions']}.csv")
            run_notes.append(reconstruction_note(table))
            return {"reconstructions": [stem.with_suffix(".pdf"), stem.with_suffix(".png")]}
        skipped = ("Reconstructions skipped: they need SimMIM/KAMIM training checkpoints with the decoder "
                   f"(a run directory or its checkpoint-last.pt), got {formats}.")
        run_notes.append(skipped)
        logging.getLogger("kamim.analyze").warning(skipped)  # on the terminal too, not only in the report
        return {}

    return analyze(
        dict(checkpoints), data, out, analyses=PAPER_ANALYSES, images=images,
        batch_size=batch_size, image_sizes=sizes, device=device, seed=seed, workers=workers,
        progress=progress, notes=notes, title="KAMIM paper figures",
        figure_names=PAPER_FIGURES, options={"tsne_color": "class", **dict(options or {})},
        model_options=model_options, cross_images=0, extra=extra,
        command="kamim-analyze paper-figures", overwrite=overwrite, config=config, preprocessing=preprocessing,
        captions=paper_captions(options))


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    from kamim.serialization import atomic_write_text

    atomic_write_text(table.to_csv(index=False), path)
