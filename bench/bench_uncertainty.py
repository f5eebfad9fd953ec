"""What the 95% intervals over images cost: the streaming moments against the analysis they ride on.

Side by side in one run, on one ViT-B-sized layer stack (12 blocks, 12 heads, a 14x14 grid plus the
class token) and batches of 64 images of random attention:

* the attention-distance accumulator of the registry as it runs (per-image distances, the per-head
  and head-mean moments of :class:`analysis.uncertainty.Moments`);
* :class:`Moments` alone on the same per-image values (per head and head mean, every layer), with the
  intervals, and its state size: the share of the accumulator's time that the intervals cost.

Prints the time per batch of each and the ratio; BENCHMARKS.md records a run.
"""
from __future__ import annotations

import platform
import time
from types import SimpleNamespace

import torch

from analysis.attention import _distance_per_image, distance_accumulator
from analysis.registry import Batch, Context
from analysis.runner import RunOptions
from analysis.uncertainty import Moments

LAYERS, HEADS, GRID, BATCH, BATCHES = 12, 12, 14, 64, 6


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    torch.manual_seed(0)
    n = GRID * GRID + 1
    geometry = SimpleNamespace(grid=(GRID, GRID), patch_size=(16, 16), num_prefix_tokens=1, depth=LAYERS)
    batches = [{l: torch.softmax(torch.randn(BATCH, HEADS, n, n) * 2, -1) for l in range(1, LAYERS + 1)}
               for _ in range(2)]  # two distinct batches, cycled
    context = Context("bench", geometry, RunOptions())

    def registry_pass() -> None:
        acc = distance_accumulator(context)
        for i in range(BATCHES):
            captured = SimpleNamespace(attention=batches[i % 2])
            acc.update(Batch(torch.zeros(BATCH, 3, 1, 1), None, torch.arange(BATCH), captured, geometry))
        acc.finish()

    per_image = {l: _distance_per_image(batches[0][l], (GRID, GRID), (16, 16), 1) for l in range(1, LAYERS + 1)}

    def moments_only() -> None:
        moments = {l: (Moments(), Moments()) for l in range(1, LAYERS + 1)}
        for _ in range(BATCHES):
            for l, (heads, mean) in moments.items():
                heads.add(per_image[l])
                mean.add(per_image[l].nanmean(-1))
        for heads, mean in moments.values():
            heads.interval(), mean.interval()

    timings = {}
    for name, fn in (("registry accumulator (distances + moments + intervals)", registry_pass),
                     ("moments + intervals alone", moments_only)):
        fn()  # warm-up
        best = min(_timed(fn) for _ in range(3))
        timings[name] = best / BATCHES
    print(f"CPU: {_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{LAYERS} blocks x {HEADS} heads, {GRID}x{GRID} grid + class token, batches of {BATCH} images")
    for name, t in timings.items():
        print(f"  {name:<58} {1000 * t:8.2f} ms per batch")
    names = list(timings)
    print(f"  moments + intervals / registry accumulator:                {timings[names[1]] / timings[names[0]]:.4f}")
    m = Moments()
    m.add(per_image[1])
    state = sum(a.nbytes for a in (m.count, m._mean, m.m2))
    print(f"  Moments state per layer: {state} bytes for {HEADS} heads, whatever the number of images")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
