"""Reconstruction quality of SimMIM / KAMIM models: PSNR and SSIM of masked-region reconstructions.

What is measured (per image, then averaged over the dataset):

* images and predictions are un-normalised (ImageNet mean/std) and clamped to [0, 1];
* the pixel mask is the model-token mask upsampled to pixels (1 = masked);
* ``composite = original * (1 - mask) + prediction * mask``: the reconstruction pasted into the
  visible image (SimMIM only predicts masked patches);
* ``psnr`` / ``ssim``: full-image PSNR and SSIM of ``composite`` against ``original``
  (``data_range = 1``; SSIM = scikit-image's ``structural_similarity`` defaults: 7x7 uniform
  window, sample covariance, K1 = 0.01, K2 = 0.03, mean over the valid region and channels);
* ``psnr_masked``: PSNR over the masked pixels only (MSE over masked pixels and channels).

A perfect reconstruction has infinite PSNR; the dataset summary therefore also reports the PSNR of
the dataset-mean MSE (``psnr_of_mean_mse``), which is finite unless every image is perfect.
Masks are drawn by ``kamim.masking.MaskGenerator`` from a seeded generator, so every model sees
the same images with the same masks.
"""
from __future__ import annotations

import dataclasses

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from kamim.progress import progress as progress_bar
from kamim import distributed as kdist
from kamim.config import ReconstructConfig, from_dict
from kamim.data import build_dataset
from kamim.masking import MaskGenerator
from kamim.models import build_pretrain_model
from kamim.precision import amp_dtype_of, autocast, resolve_amp
from kamim.runtime.checkpoint import LAST_CHECKPOINT, load_pretrain_checkpoint, write_run_config
from kamim.serialization import CheckpointError, atomic_write
from kamim.inputs import preflight

from .common import print_table, write_results
from .data import eval_loader, eval_transform
from .session import distributed_session, locked_output

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "unnormalize",
    "psnr",
    "ssim",
    "mask_to_pixels",
    "paste_reconstruction",
    "reconstruction_metrics",
    "ReconstructConfig",
    "load_pretrain_model",
    "reconstruct",
    "MaskedImages",
    "evaluate_reconstruction",
    "plot_reconstructions",
    "run_reconstruct",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unnormalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """(B, C, H, W) normalised images -> [0, 1] (clamped)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp_(0.0, 1.0)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            "expected two (B, C, H, W) image batches of the same shape, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def psnr(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image PSNR (B,) in dB; with ``mask`` (B, 1 or C, H, W) the MSE is over masked pixels only."""
    _check_pair(pred, target)
    err = (pred.double() - target.double()) ** 2
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.to(err.dtype).expand_as(err)
        count = m.flatten(1).sum(1)
        if (count == 0).any():
            raise ValueError("masked PSNR needs at least one masked pixel per image")
        mse = (err * m).flatten(1).sum(1) / count
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_kernel1d(sigma: float, truncate: float, dtype: torch.dtype, device) -> torch.Tensor:
    # same taps as scipy.ndimage.gaussian_filter (radius int(truncate * sigma + 0.5), normalised)
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    win_size: int | None = None,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    use_sample_covariance: bool = True,
    K1: float = 0.01,
    K2: float = 0.03,
) -> torch.Tensor:
    """Per-image mean SSIM (B,), identical to ``skimage.metrics.structural_similarity(..., channel_axis=-1)``.

    Hand-written in torch (batched on the GPU) instead of calling scikit-image per image: the local
    statistics are separable filters; a "valid" convolution equals scikit-image's reflect-padded
    filter followed by its border crop of ``(win_size - 1) // 2`` pixels.
    """
    _check_pair(pred, target)
    x, y = pred.double(), target.double()
    b, c, h, w = x.shape
    if gaussian_weights:
        k1 = _gaussian_kernel1d(sigma, 3.5, x.dtype, x.device)
        win_size = k1.numel() if win_size is None else win_size
        if win_size != k1.numel():
            raise ValueError(f"win_size {win_size} does not match the Gaussian window ({k1.numel()}) for sigma {sigma}")
    else:
        win_size = 7 if win_size is None else int(win_size)
        if win_size % 2 != 1:
            raise ValueError(f"win_size must be odd, got {win_size}")
        k1 = torch.full((win_size,), 1.0 / win_size, dtype=x.dtype, device=x.device)
    if min(h, w) < win_size:
        raise ValueError(f"images of {h}x{w} are smaller than the SSIM window {win_size}x{win_size}")
    kh = k1.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = k1.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    ux, uy = filt(x), filt(y)
    uxx, uyy, uxy = filt(x * x), filt(y * y), filt(x * y)
    n = win_size**2
    cov_norm = n / (n - 1) if use_sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def mask_to_pixels(mask: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) token mask (1 = masked) -> (B, 1, H, W) float pixel mask (nearest upsampling)."""
    if mask.ndim != 3:
        raise ValueError(f"expected a (B, h, w) token mask, got shape {tuple(mask.shape)}")
    H, W = image_hw
    h, w = mask.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"a {h}x{w} token mask does not tile {H}x{W} images")
    return mask.float().repeat_interleave(H // h, 1).repeat_interleave(W // w, 2).unsqueeze(1)


def paste_reconstruction(
    original: torch.Tensor, reconstruction: torch.Tensor, pixel_mask: torch.Tensor
) -> torch.Tensor:
    """The reconstruction inside the masked pixels, the original elsewhere."""
    return original * (1 - pixel_mask) + reconstruction * pixel_mask


def reconstruction_metrics(
    original: torch.Tensor, reconstruction: torch.Tensor, pixel_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image ``psnr``, ``ssim`` (composite vs original), ``psnr_masked`` and ``mse_masked`` for [0, 1] images."""
    composite = paste_reconstruction(original, reconstruction, pixel_mask)
    err = ((reconstruction.double() - original.double()) ** 2 * pixel_mask).flatten(1).sum(1)
    mse_masked = err / (pixel_mask.expand_as(original).flatten(1).sum(1).clamp_min(1))
    return {
        "psnr": psnr(composite, original),
        "ssim": ssim(composite, original),
        "psnr_masked": psnr(reconstruction, original, mask=pixel_mask),
        "mse_masked": mse_masked,
    }


# --------------------------------------------------------------------------- models and data

def load_pretrain_model(source: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The full SimMIM/KAMIM pretraining model (encoder + decoder) of a ``kamim pretrain`` checkpoint.

    ``source`` is a checkpoint file or a run directory (``checkpoint-last.pt``). The model is rebuilt
    from the checkpoint's config (:func:`kamim.models.build_pretrain_model`) and loaded with
    ``strict=True``. Returns (model in eval mode, info dict with method, arch, img_size,
    mask_patch_size, step).
    """
    path = Path(source)
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"pretraining checkpoint not found: {path}")
    ckpt = load_pretrain_checkpoint(path)
    method = ckpt.get("method") or ckpt["config"].get("method")
    if method not in ("simmim", "kamim"):
        raise ValueError(
            f"{path} is a '{method}' checkpoint; reconstruction needs a SimMIM/KAMIM checkpoint (it has the decoder)"
        )
    cfg = from_dict(ckpt["config"], validate=False)
    model = build_pretrain_model(cfg)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the model rebuilt from its config ({first})") from None
    model.to(device).eval().requires_grad_(False)
    info = {"path": str(path), "method": method, "arch": cfg.model.arch, "img_size": int(cfg.model.img_size),
            "mask_patch_size": int(cfg.mask.mask_patch_size), "step": int(ckpt.get("step", 0))}
    return model, info


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM prediction (B, C, H, W) in the normalised image space for ``mask`` (B, h, w), 1 = masked.

    Encoder + decoder only: no loss, so KAMIM models need no keypoint densities here.
    """
    if not (hasattr(model, "backbone") and hasattr(model, "decoder")):
        raise ValueError(f"{type(model).__name__} is not a SimMIM/KAMIM model (needs .backbone and .decoder)")
    return model.decoder(model.backbone(images, mask)).float()


class MaskedImages(Dataset):
    """Wrap an image dataset: each sample gets ``index`` and a SimMIM block ``mask`` drawn from
    ``np.random.default_rng([seed, index])``, so masks depend only on (seed, image), never on batching,
    workers or ranks, and every model is scored on identical masks."""

    def __init__(self, dataset: Dataset, mask_generator, seed: int = 0) -> None:
        self.dataset, self.mask_generator, self.seed = dataset, mask_generator, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def mask(self, index: int) -> np.ndarray:
        return self.mask_generator(np.random.default_rng([self.seed, int(index)]))

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        if sample is None:  # unreadable image (kamim.data skips and counts it)
            return None
        sample = dict(sample)
        sample.pop("label", None)
        sample["index"] = index
        sample["mask"] = torch.from_numpy(self.mask(index).copy())
        return sample


def _check_same_geometry(infos: Mapping[str, Mapping[str, Any]]) -> int:
    sizes = {name: info["img_size"] for name, info in infos.items()}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{n}: {s}x{s}" for n, s in sizes.items())
        raise ValueError(f"models disagree on the input size ({shown}); compare models trained at one image size")
    return next(iter(sizes.values()))


@torch.no_grad()
def evaluate_reconstruction(
    models: Mapping[str, nn.Module],
    loader,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Mean per-image ``psnr``, ``ssim``, ``psnr_masked`` of every model over ``loader`` (batches with
    ``image`` and ``mask``), plus ``psnr_of_mean_mse`` and ``num_images``; exact over DDP ranks."""
    device = torch.device(device)
    keys = ("psnr", "ssim", "psnr_masked", "mse_masked")
    sums = {name: torch.zeros(len(keys) + 1, dtype=torch.float64, device=device) for name in models}
    for batch in progress_bar(loader, desc="reconstruct", unit="batch", enabled=progress):
        if "image" not in batch:
            continue  # every image of the batch was unreadable
        images = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        original = unnormalize(images.float())
        pixel_mask = mask_to_pixels(mask, tuple(images.shape[-2:]))
        for name, model in models.items():
            with autocast(device, amp_dtype):
                pred = reconstruct(model, images, mask)
            m = reconstruction_metrics(original, unnormalize(pred.float()), pixel_mask)
            count = torch.tensor(float(len(images)), device=device, dtype=torch.float64)
            sums[name] += torch.stack([m[k].sum() for k in keys] + [count])
    out = {}
    for name, s in sums.items():
        s = kdist.all_reduce_sum(s)
        n = float(s[-1])
        if n == 0:
            raise ValueError("no readable images to evaluate")
        mean = {k: float(s[i]) / n for i, k in enumerate(keys)}
        mse = mean.pop("mse_masked")
        out[name] = {**mean, "psnr_of_mean_mse": 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf,
                     "mse_masked": mse, "num_images": int(n)}
    return out


@torch.no_grad()
def plot_reconstructions(
    models: Mapping[str, nn.Module],
    dataset: MaskedImages,
    indices: Sequence[int],
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    cell_inches: float = 1.8,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
):
    """Figure grid, one row per image: original | masked input | each model's reconstruction
    (pasted into the visible pixels). Same images and masks for every model. ``metrics`` (model ->
    :func:`evaluate_reconstruction`'s ``psnr`` / ``ssim``) puts each model's PSNR and SSIM under its
    column header. Saved atomically as PNG when ``path`` is given; returns the matplotlib figure."""
    # a pyplot-free Figure: no global figure registry to leak into, no backend to select
    from matplotlib.figure import Figure

    device = torch.device(device)
    samples = [dataset[i] for i in indices]
    samples = [s for s in samples if s is not None]
    if not samples:
        raise ValueError("no readable images to plot")
    images = torch.stack([s["image"] for s in samples]).to(device)
    mask = torch.stack([s["mask"] for s in samples]).to(device)
    original = unnormalize(images.float())
    pm = mask_to_pixels(mask, tuple(images.shape[-2:]))
    columns = {"original": original, "masked": original * (1 - pm) + 0.5 * pm}
    for name, model in models.items():
        columns[name] = paste_reconstruction(original, unnormalize(reconstruct(model, images, mask)), pm)
    # constrained layout: a title added by the caller (fig.suptitle) gets its own room above the headers
    fig = Figure(figsize=(cell_inches * len(columns), cell_inches * len(samples)), layout="constrained")
    axes = fig.subplots(len(samples), len(columns), squeeze=False)
    for c, (title, imgs) in enumerate(columns.items()):
        for r in range(len(samples)):
            ax = axes[r][c]
            ax.imshow(imgs[r].permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                m = (metrics or {}).get(title)
                ax.set_title(title if not m else f"{title}\nPSNR {m['psnr']:.1f} dB · SSIM {m['ssim']:.3f}",
                             fontsize=9)
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        with atomic_write(path, "wb") as f:
            f.write(buf.getvalue())
    return fig


# --------------------------------------------------------------------------- run


def _named_checkpoints(checkpoints: Any) -> dict[str, str]:
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    if isinstance(checkpoints, Mapping):
        named = {str(k): str(v) for k, v in checkpoints.items()}
    else:
        named = {}
        for c in checkpoints:
            text = str(c)
            name, sep, path = text.partition("=")
            if not sep:
                p = Path(text)
                name, path = (p.name if p.is_dir() else p.parent.name or p.stem), text
            if name in named:
                name = f"{name}-{len(named)}"
            named[name] = path
    if not named:
        raise ValueError("no checkpoints given")
    return named


def run_reconstruct(cfg: ReconstructConfig) -> dict[str, Any]:
    """Load every checkpoint, score PSNR/SSIM on identical masked images, write results and a figure."""
    cfg.validate()
    preflight(cfg, "reconstruct")
    with distributed_session(cfg.device) as info, locked_output(cfg.output_dir, info):
        cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, info.device))  # recorded as resolved
        amp = amp_dtype_of(cfg.amp, info.device)
        models, infos = {}, {}
        for name, path in _named_checkpoints(cfg.checkpoints).items():
            models[name], infos[name] = load_pretrain_model(path, info.device)
        img = _check_same_geometry(infos)
        mps = int(cfg.mask_patch_size or next(iter(infos.values()))["mask_patch_size"])
        for name, model in models.items():
            grid = model.backbone.mask_grid((img, img))
            if img % mps or (img // mps) == 0 or grid[0] % (img // mps):
                raise ValueError(
                    f"mask_patch_size {mps} does not tile model '{name}' ({img} px, token grid {grid[0]}x{grid[1]})"
                )
        masker = MaskGenerator(input_size=img, mask_patch_size=mps, model_patch_size=mps, mask_ratio=cfg.mask_ratio)
        base = build_dataset(cfg.data, eval_transform(img))
        if cfg.max_images is not None:
            base = Subset(base, range(min(int(cfg.max_images), len(base))))
        data = MaskedImages(base, masker, cfg.seed)
        loader, _ = eval_loader(data, cfg.batch_size, cfg.num_workers, info)
        metrics = evaluate_reconstruction(models, loader, info.device, amp, progress=cfg.progress and info.is_main)
        rows = [{"model": name, **infos[name], **m} for name, m in metrics.items()]
        summary = {"task": "reconstruct", "mask_ratio": cfg.mask_ratio, "mask_patch_size": mps, "img_size": img,
                   "seed": cfg.seed, "data": str(cfg.data), "num_images": len(data), "results": rows,
                   "definition": "psnr/ssim: reconstruction pasted into the visible image vs original, [0,1], "
                                 "skimage SSIM defaults; psnr_masked: masked pixels only; means over images"}
        if info.is_main:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_run_config(cfg, out)  # the run's config first, then its results
            if cfg.figure_images > 0:
                fig_path = out / "reconstructions.png"
                rows_shown = list(range(min(cfg.figure_images, len(data))))
                plot_reconstructions(models, data, rows_shown, fig_path, info.device, metrics=metrics)
                summary["figure"] = str(fig_path)
            write_results(out, "reconstruct", rows, summary)
            print_table(rows, ["model", "method", "step", "psnr", "ssim", "psnr_masked", "num_images"],
                        title=f"reconstruction at mask ratio {cfg.mask_ratio} ({len(data)} images)")
        return summary
