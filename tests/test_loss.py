"""Masked (weighted) L1 reconstruction loss against the SimMIM / KAMIM reference formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kamim.loss import reconstruction_loss
from kamim.weights import patch_weights


def up(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest upsampling of (B, gh, gw) to (B, 1, h, w) with np.kron."""
    b, gh, gw = grid.shape
    return np.stack([np.kron(g, np.ones((h // gh, w // gw))) for g in grid])[:, None]


def reference_kamim(x, x_hat, mask, weights=None, normalize="mask") -> float:
    """sum(|w x - w x_hat| * m) / (sum(m) + 1e-5) / C, float64 numpy."""
    x, x_hat = x.double().numpy(), x_hat.double().numpy()
    _, c, h, w = x.shape
    m = up(mask.double().numpy(), h, w)
    wt = np.ones_like(m) if weights is None else up(weights.double().numpy(), h, w)
    num = (np.abs(wt * x - wt * x_hat) * m).sum()
    den = m.sum() if normalize == "mask" else (wt * m).sum()
    return num / (den + 1e-5) / c


def simmim_loss(x, x_rec, mask, patch_size):
    """microsoft/SimMIM's loss, re-typed from its forward()."""
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / x.shape[1]


@pytest.mark.parametrize(
    "shape,mask_grid,weight_grid",
    [
        ((2, 3, 32, 32), (2, 2), (4, 4)),  # mask coarser than weights
        ((2, 3, 32, 32), (8, 8), (2, 2)),  # mask finer than weights
        ((3, 3, 48, 32), (3, 2), (6, 4)),  # non-square
        ((1, 1, 16, 16), (16, 16), (16, 16)),  # pixel grids, one channel
    ],
)
@pytest.mark.parametrize("normalize", ["mask", "weight"])
def test_matches_reference(shape, mask_grid, weight_grid, normalize):
    g = torch.Generator().manual_seed(0)
    b = shape[0]
    x, x_hat = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = (torch.rand((b, *mask_grid), generator=g) < 0.6).to(torch.uint8)
    weights = 1 + 3 * torch.rand((b, *weight_grid), generator=g)
    got = reconstruction_loss(x_hat, x, mask, weights, normalize=normalize)
    assert got.ndim == 0 and got.dtype == torch.float32
    want = reference_kamim(x, x_hat, mask, weights, normalize)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # unweighted: the same reference with w = 1
    assert reconstruction_loss(x_hat, x, mask).item() == pytest.approx(reference_kamim(x, x_hat, mask), rel=1e-5)


def test_unweighted_is_simmim():
    g = torch.Generator().manual_seed(1)
    x, x_rec = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    mask = (torch.rand(2, 4, 4, generator=g) < 0.5).int()
    want = simmim_loss(x, x_rec, mask, 16).item()
    assert reconstruction_loss(x_rec, x, mask).item() == pytest.approx(want, rel=1e-6)
    ones = torch.ones(2, 8, 8)
    assert reconstruction_loss(x_rec, x, mask, ones, "weight").item() == pytest.approx(want, rel=1e-6)


def test_large_temperature_kamim_equals_simmim():
    g = torch.Generator().manual_seed(2)
    x, x_rec = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    mask = (torch.rand(2, 2, 2, generator=g) < 0.6).int()
    maps = torch.rand(2, 32, 32, generator=g) < 0.4
    w = patch_weights(maps, 8, 1e12)
    assert torch.equal(reconstruction_loss(x_rec, x, mask, w), reconstruction_loss(x_rec, x, mask))
    # while at T = 0.25 the weights raise the loss (reference: not renormalised)
    assert reconstruction_loss(x_rec, x, mask, patch_weights(maps, 8, 0.25)) > reconstruction_loss(x_rec, x, mask)


def test_weight_normalisation_is_weighted_mean():
    x, x_rec = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    x_rec[:, :, :4, :4] = 1.0  # error 1 per channel in the top-left 4x4 patch, 0 elsewhere
    mask = torch.ones(1, 2, 2)
    w = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
    # mask: sum(w |e|) / 64 / 3 = 3 * 16 * 3 / 64 / 3 ; weight: 3 * 16 * 3 / (3 * 16 + 48) / 3
    assert reconstruction_loss(x_rec, x, mask, w).item() == pytest.approx(48 / (64 + 1e-5))
    assert reconstruction_loss(x_rec, x, mask, w, "weight").item() == pytest.approx(48 / (96 + 1e-5))


def test_float32_under_bf16_autocast_and_grad():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g).bfloat16()
    x_hat = torch.randn(2, 3, 16, 16, generator=g).bfloat16().requires_grad_()
    mask, w = torch.ones(2, 2, 2), 1 + torch.rand(2, 4, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reconstruction_loss(x_hat, x, mask, w)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_kamim(x.float(), x_hat.detach().float(), mask, w), rel=1e-5)
    loss.backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad.float()).all()


def test_bad_inputs():
    x = torch.zeros(2, 3, 32, 32)
    m = torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match=r"mask grid 5x5 must divide the image size 32x32"):
        reconstruction_loss(x, x, torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match=r"weights grid 3x4 must divide"):
        reconstruction_loss(x, x, m, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, h, w\), got \(3, 4, 4\)"):
        reconstruction_loss(x, x, torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match=r"weights must have shape \(2, h, w\), got \(2, 1, 4, 4\)"):
        reconstruction_loss(x, x, m, torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="pred and target must both have shape"):
        reconstruction_loss(x, torch.zeros(2, 3, 32, 16), m)
    with pytest.raises(ValueError, match="pred and target must both have shape"):
        reconstruction_loss(x[0], x[0], m)
    with pytest.raises(ValueError, match="normalize must be one of"):
        reconstruction_loss(x, x, m, normalize="sum")
    with pytest.raises(ValueError, match="mask must be a torch.Tensor"):
        reconstruction_loss(x, x, np.ones((2, 4, 4)))
