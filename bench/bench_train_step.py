"""Pretraining-step throughput: our SimMIM/KAMIM (timm ViT) vs the reference model on the CPU.

The reference is what the KAMIM reference code trains: Hugging Face ``ViTForMaskedImageModeling`` with
eager attention, configured like our preset (192 px, patch 16, encoder_stride 16, same width / depth /
heads / MLP). A step is forward + loss + backward + AdamW step on the same batch (images, a SimMIM mask
of 32 px blocks at ratio 0.6 on the token grid, keypoint densities at w_ps = 8 for KAMIM). The optimizer
is part of the step: ours uses what our engine builds (``kamim.engine.pretrain.build_optimizer``: timm
parameter groups, torch's fused AdamW), the reference a plain ``torch.optim.AdamW`` (torch's default,
per-parameter implementation on the CPU), as the reference code builds it. ``reference_fusedadamw_fp32``
gives the reference the fused AdamW too, which isolates the models.

Variants are timed side by side, interleaved over ``--rounds`` rounds (order rotated each round) so that
load from other processes on shared cores hits all of them alike; the median over rounds is reported,
with the ratios last (each the median over rounds of the per-round ratio, with its interquartile range):
ours/reference in fp32 (target >= 1.0), ours bf16 autocast / ours fp32 (target >= 1.5), KAMIM / SimMIM
(target >= 0.98) and, with ``--compile``, torch.compile / eager.

    python bench/bench_train_step.py --model vit_t --batch 8 --steps 1 --rounds 9 --threads 1 --no-bf16
    python bench/bench_train_step.py --model vit_t --batch 8 --steps 1 --rounds 101 --threads 1 --no-bf16 \
        --only ours_fp32 kamim_fp32     # one pair, enough rounds for a 95% CI of about +-2%
    python bench/bench_train_step.py --model vit_t --batch 8 --steps 1 --rounds 3 --threads 1 --compile
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTForMaskedImageModeling

from kamim.config import OptimConfig
from kamim.engine.pretrain import build_optimizer
from kamim.loss import reconstruction_loss
from kamim.models import SimMIM, create_pretrain_model
from kamim.optim import uses_fused
from kamim.weights import weights_from_density

StepFn = Callable[[], torch.Tensor]


def hf_reference(vit: VisionTransformer, attn_implementation: str = "eager") -> ViTForMaskedImageModeling:
    """``ViTForMaskedImageModeling`` with the geometry of ``vit`` (reference KAMIM model, random init)."""
    block = vit.blocks[0]
    patch = int(vit.patch_embed.patch_size[0])
    config = ViTConfig(
        hidden_size=vit.embed_dim,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        image_size=int(vit.patch_embed.img_size[0]),
        patch_size=patch,
        encoder_stride=patch,
        qkv_bias=block.attn.qkv.bias is not None,
    )
    return ViTForMaskedImageModeling._from_config(config, attn_implementation=attn_implementation)


def make_batch(
    batch: int, img_size: int, patch: int, mask_patch: int = 32, ratio: float = 0.6, w_ps: int = 8,
    device: str | torch.device = "cpu", seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Images, a SimMIM block mask on the token grid (ceil(ratio * blocks) blocks per image) and densities."""
    g = torch.Generator().manual_seed(seed)
    blocks = img_size // mask_patch
    n_mask = math.ceil(ratio * blocks * blocks)
    order = torch.rand(batch, blocks * blocks, generator=g).argsort(dim=1)
    mask = torch.zeros(batch, blocks * blocks, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_mask], True)
    scale = mask_patch // patch
    mask = mask.view(batch, blocks, blocks).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    out = {
        "image": torch.randn(batch, 3, img_size, img_size, generator=g),
        "mask": mask,
        "density": torch.rand(batch, img_size // w_ps, img_size // w_ps, generator=g).half(),
    }
    return {k: v.to(device) for k, v in out.items()}


def make_step(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
    amp_dtype: torch.dtype | None, device_type: str = "cpu",
) -> StepFn:
    """One training step (zero_grad, forward + loss under optional autocast, backward, optimizer step)."""

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_variants(
    arch: str, batch: int, compile_model: bool, device: str = "cpu", amp_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[dict[str, StepFn], dict[str, object]]:
    """Step functions of every variant, all on the same batch, and a few facts about the models.

    ``amp_dtype=None`` leaves out the autocast variants.
    """
    ours: SimMIM = create_pretrain_model("kamim", arch, kamim={"temperature": 0.25}).to(device).train()
    vit = ours.encoder
    ref = hf_reference(vit).to(device).train()
    patch = int(vit.patch_embed.patch_size[0])
    data = make_batch(batch, int(vit.patch_embed.img_size[0]), patch, device=device)
    simmim_batch = {"image": data["image"], "mask": data["mask"]}
    ref_mask = data["mask"].flatten(1)
    # ours: the optimizer our engine builds (timm parameter groups, torch's fused AdamW);
    # reference: plain torch.optim.AdamW over all parameters, as the reference code trains
    opt_ours = build_optimizer(ours, OptimConfig(lr=1e-4, weight_decay=0.05))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)

    def simmim_loss(model: nn.Module = ours) -> torch.Tensor:
        ours.temperature = None
        return model(simmim_batch)["loss"]

    def kamim_loss() -> torch.Tensor:
        ours.temperature = 0.25
        return ours(data)["loss"]

    def ref_loss() -> torch.Tensor:
        return ref(pixel_values=data["image"], bool_masked_pos=ref_mask).loss

    amp_name = str(amp_dtype).removeprefix("torch.")
    opt_ref_fused = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    variants = {
        "reference_fp32": make_step(ref, ref_loss, opt_ref, None, device),
        "reference_fusedadamw_fp32": make_step(ref, ref_loss, opt_ref_fused, None, device),
        "ours_fp32": make_step(ours, simmim_loss, opt_ours, None, device),
        "kamim_fp32": make_step(ours, kamim_loss, opt_ours, None, device),
    }
    if amp_dtype is not None:
        variants[f"ours_{amp_name}"] = make_step(ours, simmim_loss, opt_ours, amp_dtype, device)
        if device != "cpu":
            variants[f"reference_{amp_name}"] = make_step(ref, ref_loss, opt_ref, amp_dtype, device)
            variants[f"kamim_{amp_name}"] = make_step(ours, kamim_loss, opt_ours, amp_dtype, device)
    if compile_model:
        compiled = torch.compile(ours)
        variants["ours_compiled_fp32"] = make_step(ours, lambda: simmim_loss(compiled), opt_ours, None, device)
        if amp_dtype is not None:
            variants[f"ours_compiled_{amp_name}"] = make_step(
                ours, lambda: simmim_loss(compiled), opt_ours, amp_dtype, device
            )
    n_ours = sum(p.numel() for n, p in ours.named_parameters() if "mask_token" not in n)
    facts = {
        "params_ours_M": round(n_ours / 1e6, 3),
        "params_reference_M": round(sum(p.numel() for p in ref.parameters()) / 1e6, 3),
        "fused_sdpa": all(getattr(b.attn, "fused_attn", False) for b in vit.blocks),
        "fused_adamw_ours": uses_fused(opt_ours),
        "reference_attn": ref.config._attn_implementation,
        "data": data,
        "model": ours,
    }
    return variants, facts


def matmul_rate(n: int, dtype: torch.dtype, device: str = "cpu", iters: int = 20) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        c = a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        c = a @ b
    float(c[0, 0])
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timings(NamedTuple):
    ips: dict[str, float]  # median images/s over rounds, wall clock
    warm_s: dict[str, float]  # warm-up seconds (includes compilation)
    cpu_ips: dict[str, float]  # median images per CPU-second of this process (all its threads)
    wall_rounds: dict[str, list[float]]  # images/s of every round, wall clock
    cpu_rounds: dict[str, list[float]]  # images per CPU-second of every round


def time_variants(
    variants: dict[str, StepFn], batch: int, steps: int, warmup: int, rounds: int, device: str = "cpu",
) -> Timings:
    """Median images/s of each variant over interleaved rounds (wall clock and per process CPU-second),
    and each variant's warm-up time (s).

    On a shared CPU the CPU-time rate is the steadier one: it leaves out the time other processes
    hold the cores (with one intra-op thread it is the step's own compute time; with more threads it
    also counts their spinning). On a GPU only the wall-clock rate means anything.
    """
    warm_s = {}
    for name, step in variants.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            float(step())
        warm_s[name] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu_rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        # rotate the order each round so no variant always runs right after the same neighbour
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = variants[name]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                loss = step()
            float(loss)  # wait for the last step
            _sync(device)
            rates[name].append(batch * steps / (time.perf_counter() - t0))
            cpu_rates[name].append(batch * steps / max(time.process_time() - c0, 1e-9))
    median = lambda d: {name: statistics.median(r) for name, r in d.items()}  # noqa: E731
    return Timings(median(rates), warm_s, median(cpu_rates), rates, cpu_rates)


def loss_overhead_ms(data: dict[str, torch.Tensor], temperature: float = 0.25, reps: int = 20) -> tuple[float, float]:
    """Median ms of the SimMIM and of the KAMIM loss (weights from densities + weighted L1), forward + backward.

    Isolates what KAMIM adds to a step, which end-to-end timings on shared cores cannot resolve.
    """
    image, mask = data["image"], data["mask"].float()
    pred = torch.randn_like(image, requires_grad=True)
    fns = {
        "simmim": lambda: reconstruction_loss(pred, image, mask),
        "kamim": lambda: reconstruction_loss(
            pred, image, mask, weights=weights_from_density(data["density"].float(), temperature)
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn().backward()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times["simmim"]), statistics.median(times["kamim"])


def optimizer_step_ms(model: nn.Module, reps: int = 7) -> dict[str, float]:
    """Median ms of one AdamW step over ``model``'s parameters (random gradients): torch's default
    implementation (per-parameter loop on the CPU), ``foreach`` and ``fused`` (what our engine uses)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kw)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            times.append(1e3 * (time.perf_counter() - t0))
        out[name] = statistics.median(times[1:])
    return out


def median_ci95(values: list[float]) -> tuple[float, float] | None:
    """Distribution-free 95% confidence interval of the median (order statistics of the binomial
    (n, 1/2) at its 2.5% / 97.5% points, normal approximation); None for fewer than 10 values."""
    n = len(values)
    if n < 10:
        return None
    v = sorted(values)
    half = 1.96 * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return v[lo], v[hi]


def ratio_lines(per_round: dict[str, list[float]], amp_name: str = "bfloat16") -> list[str]:
    """The target ratios that can be formed from the measured variants.

    Each ratio is the median over rounds of the two variants' rates *in the same round* (paired:
    slow drifts of the machine's speed cancel), with the interquartile range of those per-round
    ratios as its spread.
    """
    pairs = [
        ("ours_fp32 / reference_fp32", "ours_fp32", "reference_fp32", 1.0),
        ("ours_fp32 / reference_fusedadamw_fp32", "ours_fp32", "reference_fusedadamw_fp32", None),
        (f"ours_{amp_name} / ours_fp32", f"ours_{amp_name}", "ours_fp32", 1.5),
        ("kamim_fp32 / ours_fp32", "kamim_fp32", "ours_fp32", 0.98),
        (f"ours_{amp_name} / reference_{amp_name}", f"ours_{amp_name}", f"reference_{amp_name}", 1.0),
        (f"kamim_{amp_name} / ours_{amp_name}", f"kamim_{amp_name}", f"ours_{amp_name}", 0.98),
        ("ours_compiled_fp32 / ours_fp32", "ours_compiled_fp32", "ours_fp32", None),
        (f"ours_compiled_{amp_name} / ours_{amp_name}", f"ours_compiled_{amp_name}", f"ours_{amp_name}", None),
    ]
    lines = []
    for label, a, b, target in pairs:
        if a in per_round and b in per_round:
            ratios = [x / y for x, y in zip(per_round[a], per_round[b])]
            r = statistics.median(ratios)
            spread = ""
            if len(ratios) >= 4:
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                spread = f"  (IQR {q1:.2f}-{q3:.2f} over {len(ratios)} rounds"
                ci = median_ci95(ratios)
                spread += f"; 95% CI of the median {ci[0]:.3f}-{ci[1]:.3f})" if ci else ")"
            verdict = "" if target is None else (f"  target >= {target}: {'met' if r >= target else 'NOT met'}")
            lines.append(f"{label:<40s} {r:6.3f}x{spread}{verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_t", choices=["vit_t", "vit_s", "vit_b", "vit_pico"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (includes compilation)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours), fp32 and bf16")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 autocast variants")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="time only these variants (e.g. ours_fp32 kamim_fp32: many rounds of one pair)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --rounds must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    amp = None if args.no_bf16 else torch.bfloat16
    variants, facts = build_variants(args.model, args.batch, args.compile, amp_dtype=amp)
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            parser.error(f"--only: unknown variant(s) {unknown}; available: {sorted(variants)}")
        if "ours_fp32" not in args.only:
            parser.error("--only must include ours_fp32 (the other figures are given relative to its step)")
        variants = {name: step for name, step in variants.items() if name in args.only}
    data = facts.pop("data")
    model = facts.pop("model")
    print(f"model={args.model} batch={args.batch} steps={args.steps} rounds={args.rounds} warmup={args.warmup} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(" ".join(f"{k}={v}" for k, v in facts.items()))
    # bf16 autocast can only pay off if the CPU multiplies bf16 faster than fp32 (AVX512-BF16 / AMX).
    mm = {dt: matmul_rate(512, dt, iters=3) for dt in (torch.float32, torch.bfloat16)}
    print(f"cpu_capability={torch.backends.cpu.get_cpu_capability()} matmul 512^3: "
          f"fp32 {mm[torch.float32] / 1e9:.1f} GFLOP/s, bf16 {mm[torch.bfloat16] / 1e9:.1f} GFLOP/s "
          f"(bf16/fp32 {mm[torch.bfloat16] / mm[torch.float32]:.2f}x)")
    ips, warm, cpu_ips, wall_rounds, cpu_rounds = time_variants(
        variants, args.batch, args.steps, args.warmup, args.rounds)
    for name, rate in ips.items():
        print(f"{name:<26s} {rate:8.2f} img/s   {cpu_ips[name]:8.2f} img per CPU-s   (warm-up {warm[name]:.1f} s)")
    simmim_ms, kamim_ms = loss_overhead_ms(data)
    step_ms = 1e3 * args.batch / ips["ours_fp32"]
    print(f"loss only, fwd+bwd: simmim {simmim_ms:.2f} ms, kamim {kamim_ms:.2f} ms -> KAMIM adds "
          f"{kamim_ms - simmim_ms:.2f} ms = {100 * (kamim_ms - simmim_ms) / step_ms:.2f}% of the fp32 step")
    opt_ms = optimizer_step_ms(model)
    print(f"AdamW step alone over our model's parameters: default {opt_ms['default']:.1f} ms, foreach "
          f"{opt_ms['foreach']:.1f} ms, fused {opt_ms['fused']:.1f} ms (ours) -> fused saves "
          f"{100 * (opt_ms['default'] - opt_ms['fused']) / step_ms:.1f}% of the fp32 step")
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; ratios by CPU time "
          f"(steadier on a shared machine{'' if torch.get_num_threads() == 1 else '; summed over threads'}):")
    for line in ratio_lines(cpu_rounds):
        print("  " + line)
    print("ratios by wall-clock time:")
    for line in ratio_lines(wall_rounds):
        print("  " + line)


if __name__ == "__main__":
    main()
