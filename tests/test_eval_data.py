"""The evaluation transform (timm ``create_transform``) and top-k counts (``timm.utils.accuracy``)
checked against the hand-written versions they replaced."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from kamim.data import EvalTransform
from kamim.eval.data import eval_transform
from kamim.eval.scoring import topk_correct


@pytest.mark.parametrize("size", [32, 56, 224])
@pytest.mark.parametrize("name", ["rocket", "coffee", "astronaut"])
def test_eval_transform_equals_old_eval_transform_on_photographs(photos, name, size):
    img = Image.fromarray(photos[name])
    new = eval_transform(size)(img)
    old = EvalTransform(size)(img)["image"]
    assert new.shape == old.shape == (3, size, size) and new.dtype == torch.float32
    # same resize (short side to floor(size / 0.875), bicubic), crop and normalisation; ToTensor's
    # div(255) and v2.ToDtype's scaling may differ in the last float32 bit
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)


def test_eval_transform_non_square_keeps_more_of_the_image(photos):
    img = Image.fromarray(photos["rocket"])  # 640 x 427 (W x H)
    new, old = eval_transform((32, 64))(img), EvalTransform((32, 64))(img)["image"]
    assert new.shape == old.shape == (3, 32, 64)
    assert not torch.allclose(new, old, atol=1e-3)  # documented difference (kamim.eval.data)


def _old_topk_correct(logits, target, ks=(1, 5)):
    kmax = min(max(ks), logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices == target[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).float()


@pytest.mark.parametrize("classes,ks", [(10, (1, 5)), (3, (1, 5)), (7, (1, 2, 3))])
def test_topk_correct_matches_old_formula_with_ties(classes, ks):
    g = torch.Generator().manual_seed(classes)
    for ties in (False, True):
        logits = torch.randn(257, classes, generator=g)
        if ties:  # few distinct values: many tied logits
            logits = torch.randint(0, 3, (257, classes), generator=g).float()
        target = torch.randint(0, classes, (257,), generator=g)
        new = topk_correct(logits, target, ks)
        assert torch.equal(new, _old_topk_correct(logits, target, ks))
        assert new.dtype == torch.float32 and bool((new == new.round()).all())
    assert new[0] > 0 and new[-1] <= 257


def test_topk_correct_empty_batch():
    assert torch.equal(topk_correct(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), torch.zeros(2))
