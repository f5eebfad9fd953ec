"""captum attributions (Integrated Gradients, patch-aligned Occlusion) on tiny ViT classifiers."""
from __future__ import annotations

import pytest
import torch

from analysis.attribution import ProbeClassifier, integrated_gradients, patch_occlusion, predicted_class
from analysis.capture import capture

import analysis_models
from analysis_models import photo_batch


def tiny_vit(**kw):
    return analysis_models.tiny_vit(**{"depth": 2, "num_classes": 3, **kw})


@pytest.fixture()
def x(photos):
    return photo_batch(photos.values(), n=2, size=32)


def test_integrated_gradients_completeness(x):
    model = tiny_vit()
    model.train()
    maps = integrated_gradients(model, x, target=[0, 2], n_steps=64, internal_batch_size=32)
    assert maps.shape == (2, 32, 32)
    model.eval()
    with torch.no_grad():
        diff = model(x)[[0, 1], [0, 2]] - model(torch.zeros_like(x))[[0, 1], [0, 2]]
    torch.testing.assert_close(maps.sum((-1, -2)), diff, atol=0.02 * diff.abs().max().item() + 1e-4, rtol=0.02)
    # the training flags came back, and no parameter gradient was accumulated
    model.train()
    integrated_gradients(model, x, n_steps=8)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_patch_occlusion_equals_manual_patch_removal(x):
    model = tiny_vit().eval()
    maps = patch_occlusion(model, x, patch_size=8, target=1)
    assert maps.shape == (2, 32, 32)
    with torch.no_grad():
        base = model(x)[:, 1]
        for r, c in [(0, 0), (2, 3)]:
            occluded = x.clone()
            occluded[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
            drop = base - model(occluded)[:, 1]
            patch = maps[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            torch.testing.assert_close(patch, drop[:, None, None].expand_as(patch), atol=1e-5, rtol=1e-4)


def test_probe_classifier_on_a_chosen_layer(x):
    backbone = tiny_vit(num_classes=0, depth=3, reg_tokens=4)
    head = torch.nn.Linear(32, 4)
    probe = ProbeClassifier(backbone, head, layer=2).eval()
    got = capture(backbone, x, block_output=[2]).block_output[2]
    with torch.no_grad():
        torch.testing.assert_close(probe(x), head(got[:, 5:].mean(1)))
        cls_probe = ProbeClassifier(backbone, head, layer=2, pool="cls").eval()
        torch.testing.assert_close(cls_probe(x), head(got[:, 0]))
    assert predicted_class(probe, x).shape == (2,)
    assert integrated_gradients(probe, x, n_steps=4).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        ProbeClassifier(backbone, head, layer=4)


def test_errors(x):
    with pytest.raises(ValueError, match="no classifier head"):
        integrated_gradients(tiny_vit(num_classes=0), x)
    with pytest.raises(ValueError, match="not a multiple of the patch size 5x5"):
        patch_occlusion(tiny_vit(), x, patch_size=5)
