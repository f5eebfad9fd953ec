"""The default train-time augmentation of every recipe survives thousands of draws on real photos.

Regression for timm RandAugment asking Pillow 13's posterize for 0 bits (``ValueError: bits must
be between or equal to 1 and 8`` inside a DataLoader worker, about 6 in 3,000 applications).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kamim.config import list_presets, load_config
from kamim.data import transforms as ktf
from kamim.data.demo import demo_photographs
from kamim.engine.pretrain import build_model, build_pretrain_transform
from kamim.eval.data import classification_train_transform
from kamim.eval.finetune import FinetuneConfig
from kamim.config import LinprobeConfig, linprobe_recipes


@pytest.fixture(scope="module")
def small_photos() -> list[Image.Image]:
    """Every demo photograph (scikit-image + scikit-learn), longest side 64 px."""
    out = []
    for img in demo_photographs().values():
        pil = ktf.to_pil_rgb(img)
        pil.thumbnail((64, 64))
        out.append(pil)
    return out


def test_posterize_matches_bit_masking(photos):
    img = Image.fromarray(photos["astronaut"][:64, :64])
    arr = np.asarray(img)
    for bits in range(9):
        mask = (0xFF << (8 - bits)) & 0xFF
        np.testing.assert_array_equal(np.asarray(ktf.posterize(img, bits)), arr & mask)
    assert not np.asarray(ktf.posterize(img, 0)).any()  # 0 bits kept: black, as TF and Pillow <= 12
    np.testing.assert_array_equal(np.asarray(ktf.posterize(img, 12)), arr)  # clamped to 8


def _posterize_ops(transform):
    ra = next(t for t in transform.transforms if hasattr(t, "ops"))
    return [op for op in ra.ops if op.name.startswith("Posterize")]


def test_randaugment_top_magnitude_posterize_keeps_zero_bits(photos):
    """The draw that crashed: magnitude noise clipped at level 10 -> 'keep 0 bits'."""
    tf = classification_train_transform(32, "finetune", "rand-m9-mstd0.5-inc1", 0.25)
    (op,) = _posterize_ops(tf)
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    img = Image.fromarray(photos["coffee"][:48, :48])
    assert op.level_fn(10, op.hparams) == (0,)  # timm really asks for 0 bits here
    assert not np.asarray(op(img)).any()


def test_harden_refuses_an_unknown_posterize_op():
    class Op:
        name = "PosterizeIncreasing"

    class Policy:
        ops = [Op()]

    with pytest.raises(RuntimeError, match="aug_fn"):
        ktf.harden_auto_augment(Policy())


def _eval_recipes() -> dict[str, tuple]:
    recipes = {}
    for recipe in linprobe_recipes():
        cfg = LinprobeConfig(checkpoint=None, data="", output_dir="", recipe=recipe).resolved()
        recipes[f"linprobe-{recipe}"] = (cfg.aug, cfg.auto_augment, cfg.re_prob)
    ft = FinetuneConfig(checkpoint=None, data="", output_dir="")
    recipes["finetune"] = ("finetune", ft.auto_augment, ft.re_prob)
    return recipes


@pytest.mark.parametrize("name", sorted(_eval_recipes()))
def test_evaluation_recipe_augmentation_3000_draws(name, small_photos, monkeypatch):
    aug, auto_augment, re_prob = _eval_recipes()[name]
    tf = classification_train_transform(32, aug, auto_augment, re_prob)
    zero_bits = []
    real = ktf.posterize
    monkeypatch.setattr(ktf, "posterize", lambda img, bits: (zero_bits.append(bits == 0), real(img, bits))[1])
    torch.manual_seed(0)
    import random

    random.seed(0)  # timm's RandAugment draws from python's RNG
    for i in range(3000):
        out = tf(small_photos[i % len(small_photos)])
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    if aug == "finetune":
        assert sum(zero_bits) >= 1  # the crashing draw really occurred and was handled
    else:
        assert not zero_bits


@pytest.mark.parametrize("preset", list_presets())
def test_pretraining_preset_augmentation(preset, small_photos):
    cfg = load_config(preset)
    with torch.device("meta"):  # geometry only: no weights allocated
        model = build_model(cfg)
    tf = build_pretrain_transform(cfg, model)
    draws = 300 if preset.startswith("tiny") else 40
    torch.manual_seed(0)
    for i in range(draws):
        sample = tf(small_photos[i % len(small_photos)])
        for key, value in sample.items():
            assert torch.isfinite(value.float()).all(), key
