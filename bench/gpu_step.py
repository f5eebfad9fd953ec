"""GPU pretraining-step throughput and model-FLOPs utilisation (MFU): ours vs the reference model.

ViT-B at 192 px (patch 16), batch 256, bf16 autocast; a step is forward + loss + backward + AdamW step.
Variants: our SimMIM (timm ViT, fused SDPA) eager and under ``torch.compile``, our KAMIM step, and the
reference Hugging Face ``ViTForMaskedImageModeling`` with eager attention (what the KAMIM reference trains).
Model FLOPs per step (forward + backward) are counted with ``torch.utils.flop_counter.FlopCounterMode``;
MFU = model FLOPs/s over the GPU's bf16 matmul rate measured here with a timed large matmul.

Needs one NVIDIA GPU and only the project's dependencies:

    python bench/gpu_step.py                     # ViT-B, batch 256, eager + compiled + reference
    python bench/gpu_step.py --dry-run           # CPU, tiny model, checks the code path (numbers meaningless)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import hf_reference, make_batch, make_step, matmul_rate, time_variants  # noqa: E402

from kamim.config import OptimConfig  # noqa: E402
from kamim.engine.pretrain import build_optimizer  # noqa: E402
from kamim.models import create_pretrain_model  # noqa: E402


def step_flops(loss_fn, amp_dtype: torch.dtype, device_type: str) -> int:
    """Model FLOPs of one forward + backward (the optimizer update is not model FLOPs).

    Counted with the math SDPA backend: attention is then explicit matmuls, counted on every device
    (FlopCounterMode has no formula for some fused kernels, e.g. the CPU flash kernel), so the count is
    a property of the model, not of the attention kernel.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type, dtype=amp_dtype):
            loss = loss_fn()
        loss.backward()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=["vit_t", "vit_s", "vit_b", "vit_pico"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (includes compilation)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU with vit_pico, batch 2, one step, no compile: checks the code path")
    args = parser.parse_args(argv)

    if args.dry_run:
        device = "cpu"
        args.model, args.batch, args.steps, args.rounds, args.warmup = "vit_pico", 2, 1, 1, 1
        args.matmul_size, args.no_compile = 256, True
    elif not torch.cuda.is_available():
        sys.exit("gpu_step.py needs an NVIDIA GPU (torch.cuda.is_available() is False); "
                 "use --dry-run to check the code path on the CPU")
    else:
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = torch.bfloat16
    torch.manual_seed(0)

    ours = create_pretrain_model("kamim", args.model, kamim={"temperature": 0.25}).to(device).train()
    vit = ours.encoder
    ref = hf_reference(vit).to(device).train()
    patch = int(vit.patch_embed.patch_size[0])
    data = make_batch(args.batch, int(vit.patch_embed.img_size[0]), patch, device=device)
    simmim_batch = {"image": data["image"], "mask": data["mask"]}
    ref_mask = data["mask"].flatten(1)
    # ours: the optimizer our engine builds (fused AdamW); the reference gets fused AdamW too, so that
    # on the GPU the comparison is of the models
    opt_ours = build_optimizer(ours, OptimConfig(lr=1e-4, weight_decay=0.05))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def simmim_loss(model=ours):
        ours.temperature = None
        return model(simmim_batch)["loss"]

    def kamim_loss():
        ours.temperature = 0.25
        return ours(data)["loss"]

    def ref_loss():
        return ref(pixel_values=data["image"], bool_masked_pos=ref_mask).loss

    variants = {
        "reference_bf16": make_step(ref, ref_loss, opt_ref, amp, device),
        "ours_bf16": make_step(ours, simmim_loss, opt_ours, amp, device),
        "kamim_bf16": make_step(ours, kamim_loss, opt_ours, amp, device),
    }
    if not args.no_compile:
        compiled = torch.compile(ours)
        variants["ours_compiled_bf16"] = make_step(ours, lambda: simmim_loss(compiled), opt_ours, amp, device)

    flops = {"ours": step_flops(simmim_loss, amp, device), "reference": step_flops(ref_loss, amp, device)}
    opt_ours.zero_grad(set_to_none=True)
    opt_ref.zero_grad(set_to_none=True)
    peak = matmul_rate(args.matmul_size, amp, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"device={name} model={args.model} batch={args.batch} steps={args.steps} rounds={args.rounds} "
          f"torch={torch.__version__} fused_sdpa={all(getattr(b.attn, 'fused_attn', False) for b in vit.blocks)}")
    print(f"measured bf16 matmul rate ({args.matmul_size}^3): {peak / 1e12:.1f} TFLOP/s")
    print(f"model GFLOPs per step (fwd+bwd): ours {flops['ours'] / 1e9:.3f}, reference {flops['reference'] / 1e9:.3f}")

    ips, warm, *_ = time_variants(variants, args.batch, args.steps, args.warmup, args.rounds, device)
    for vname, rate in ips.items():
        model_flops = flops["reference" if vname.startswith("reference") else "ours"]
        achieved = model_flops * rate / args.batch
        print(f"{vname:<22s} {rate:9.1f} img/s  {achieved / 1e12:7.1f} TFLOP/s  MFU {100 * achieved / peak:5.1f}%"
              f"  (warm-up {warm[vname]:.1f} s)")
    for vname in ("ours_bf16", "ours_compiled_bf16", "kamim_bf16"):
        if vname in ips:
            print(f"{vname + ' / reference_bf16':<40s} {ips[vname] / ips['reference_bf16']:6.2f}x")
    if "ours_compiled_bf16" in ips:
        print(f"{'ours_compiled_bf16 / ours_bf16':<40s} {ips['ours_compiled_bf16'] / ips['ours_bf16']:6.2f}x")
    print(f"{'kamim_bf16 / ours_bf16':<40s} {ips['kamim_bf16'] / ips['ours_bf16']:6.2f}x")


if __name__ == "__main__":
    main()
