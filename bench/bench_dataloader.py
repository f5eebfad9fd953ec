"""Data-loader throughput: MIMTransform without vs with keypoint densities (KAMIM) in the workers.

Both pipelines read the same real JPEG/PNG files (the offline demo folder unless ``--data``) with
identical DataLoader settings and the same SimMIM mask generator; the only difference is
``keypoints=KeypointMapper(detector, "ring")``. Configurations are alternated ``--repeats`` times
(the median is reported) so that load from other processes hits both alike. Worker start-up and
the first ``--warmup`` batches are excluded from the timing.

    python bench/bench_dataloader.py --workers 2 --batch-size 64 --samples 1536
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from kamim.data import MIMTransform, build_dataset, collate_skip_bad
from kamim.keypoints import KeypointMapper
from kamim.masking import MaskGenerator


def throughput(dataset, transform: MIMTransform, args: argparse.Namespace) -> float:
    """Images per second through a fresh DataLoader, after ``args.warmup`` batches."""
    dataset.transform = transform
    sampler = RandomSampler(dataset, num_samples=args.samples, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=collate_skip_bad, prefetch_factor=2 if args.workers else None)
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == args.warmup:
            start, seen = time.perf_counter(), 0
        seen += batch["image"].shape[0]
    if start is None:
        raise ValueError(f"--samples {args.samples} gives no batch after {args.warmup} warm-up batches")
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="demo", help="image folder or dataset spec (default: demo folder)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--model-patch", type=int, default=16)
    p.add_argument("--mask-patch", type=int, default=32)
    p.add_argument("--weight-patch", type=int, default=8)
    p.add_argument("--detector", default="fast")
    p.add_argument("--samples", type=int, default=1536, help="images per timed run (incl. warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="batches excluded from timing")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    dataset = build_dataset(args.data, transform=None)
    masks = MaskGenerator(args.img_size, args.mask_patch, args.model_patch, 0.6)
    mapper = KeypointMapper(args.detector, "ring")
    configs = {
        "simmim (no keypoints)": MIMTransform(args.img_size, mask_generator=masks),
        f"kamim ({args.detector} ring density)": MIMTransform(
            args.img_size, mask_generator=masks, keypoints=mapper, weight_patch_size=args.weight_patch),
    }
    n_files = len(dataset)
    print(f"data: {args.data} ({n_files} files, {type(dataset).__name__}), workers={args.workers}, "
          f"batch={args.batch_size}, img={args.img_size}, samples/run={args.samples}, repeats={args.repeats}, "
          f"torch {torch.__version__}")

    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, transform in configs.items():
            rates[name].append(throughput(dataset, transform, args))

    # in-process cost of one density on a typical crop (single thread), for the breakdown
    dataset.transform = None
    img = dataset[0]["image"]  # PIL RGB
    torch.manual_seed(0)
    crop = np.asarray(configs["simmim (no keypoints)"].crop(img))
    mapper.density(crop, args.weight_patch)
    t0 = time.perf_counter()
    for _ in range(50):
        mapper.density(crop, args.weight_patch)
    density_ms = (time.perf_counter() - t0) / 50 * 1e3

    sample = list(configs.values())[1](img)
    d = sample["density"]
    density_bytes = d.numel() * d.element_size()
    full_map_bytes = args.img_size * args.img_size * 4
    image_bytes = sample["image"].numel() * sample["image"].element_size()

    print()
    names = list(configs)
    print(f"{'':24s}" + "".join(f"{n:>30s}" for n in names))
    print(f"{'img/s per run':24s}" + "".join(f"{' '.join(f'{r:7.1f}' for r in rates[n]):>30s}" for n in names))
    med = {n: statistics.median(rates[n]) for n in names}
    print(f"{'img/s (median)':24s}" + "".join(f"{med[n]:30.1f}" for n in names))
    print()
    print(f"density per sample: {tuple(d.shape)} {str(d.dtype).replace('torch.', '')} = {density_bytes} B; "
          f"float32 full-size map would be {full_map_bytes} B ({full_map_bytes / density_bytes:.0f}x more); "
          f"image tensor {image_bytes} B")
    print(f"keypoint density on one {args.img_size}px crop, in-process: {density_ms:.2f} ms")
    print(f"ratio kamim/simmim throughput: {med[names[1]] / med[names[0]]:.2f}x  (target >= 0.80x)")


if __name__ == "__main__":
    main()
