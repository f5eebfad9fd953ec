"""Fused optimizers: chosen where torch has them, and identical to the plain implementation."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from kamim.config import OptimConfig
from kamim.engine.pretrain import build_optimizer
from kamim.eval.finetune import build_finetune_optimizer
from kamim.eval.linprobe import build_probe_optimizer
from kamim.models import create_pretrain_model
from kamim.optim import fused_kwargs, uses_fused


def test_fused_kwargs_selects_supported_optimizers_and_parameters():
    model = nn.Linear(3, 2)
    assert fused_kwargs(model, "adamw") == {"fused": True}
    assert fused_kwargs(model, "AdamW") == {"fused": True}
    assert fused_kwargs(model.parameters(), "sgd") == {"fused": True}
    assert fused_kwargs([{"params": [model.weight]}, {"params": [model.bias]}], "adam") == {"fused": True}
    assert fused_kwargs(model, "lamb") == {}  # no fused torch implementation
    assert fused_kwargs(nn.Linear(3, 2).to(torch.float16).requires_grad_(False), "adamw") == {}  # nothing to train
    assert fused_kwargs(nn.Embedding(4, 2).to(torch.float64), "adamw") == {"fused": True}
    assert fused_kwargs([], "adamw") == {}


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.rand(2, 2, 2, generator=g) > 0.5}
        opt.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        opt.step()
    return model


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_engine_optimizer_is_fused_and_matches_the_plain_implementation(opt_name):
    torch.manual_seed(0)
    base = create_pretrain_model("simmim", "vit_pico", img_size=32, patch_size=8)
    cfg = OptimConfig(opt=opt_name, lr=1e-3, weight_decay=0.05)
    extra = {"betas": tuple(cfg.betas)} if opt_name == "adamw" else {}
    # the fused kernel rounds differently (last bits); later steps amplify that through the training
    # dynamics, so the bound grows with the steps but stays far below one update (lr = 1e-3)
    for steps, atol in ((1, 1e-7), (4, 1e-5)):
        fast_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
        fast = build_optimizer(fast_model, cfg)
        plain = create_optimizer_v2(plain_model, opt=opt_name, lr=cfg.peak_lr(), weight_decay=cfg.weight_decay,
                                    **extra)
        assert uses_fused(fast) and not uses_fused(plain)
        assert [len(g["params"]) for g in fast.param_groups] == [len(g["params"]) for g in plain.param_groups]
        _train(fast_model, fast, steps)
        _train(plain_model, plain, steps)
        for (name, a), b in zip(fast_model.named_parameters(), plain_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{steps} steps, {name}: {m}")
        moved = max((a - b).abs().max().item() for a, b in zip(fast_model.parameters(), base.parameters()))
        assert moved > 100 * atol  # it trained


def test_finetune_and_probe_optimizers_are_fused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert uses_fused(build_finetune_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=1.0))
    assert uses_fused(build_probe_optimizer(model, "adamw", 1e-3, 0.0))
    assert uses_fused(build_probe_optimizer(model, "sgd", 1e-3, 0.0))
    assert not uses_fused(build_probe_optimizer(model, "lars", 1e-3, 0.0))  # timm's LARS: no fused kernel
