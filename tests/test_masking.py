"""SimMIM block mask generator."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kamim.masking import MaskGenerator


def blocks_of(mask: np.ndarray, scale: int) -> np.ndarray:
    """Collapse a token-grid mask to its block grid, asserting every block is constant."""
    h, w = mask.shape
    b = mask.reshape(h // scale, scale, w // scale, scale)
    assert (b.min(axis=(1, 3)) == b.max(axis=(1, 3))).all()
    return b[:, 0, :, 0]


def test_defaults_mask_22_of_36_blocks():
    gen = MaskGenerator(seed=0)
    assert gen.token_count == 36 and gen.mask_count == 22 and gen.grid_size == (12, 12)
    for _ in range(20):
        m = gen()
        assert m.shape == (12, 12) and m.dtype == np.uint8
        assert set(np.unique(m)) == {0, 1}
        assert blocks_of(m, 2).sum() == 22 and m.sum() == 22 * 4


@pytest.mark.parametrize(
    "kwargs,grid,scale,masked",
    [
        (dict(input_size=64, mask_patch_size=16, model_patch_size=8, mask_ratio=0.75), (8, 8), 2, 12),
        (dict(input_size=48, mask_patch_size=8, model_patch_size=8, mask_ratio=0.5), (6, 6), 1, 18),
        (dict(input_size=(64, 96), mask_patch_size=32, model_patch_size=16, mask_ratio=0.6), (4, 6), 2, 4),
        (dict(input_size=224, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6), (56, 56), 8, 30),
    ],
)
def test_geometry_and_counts(kwargs, grid, scale, masked):
    gen = MaskGenerator(**kwargs, seed=1)
    m = gen()
    assert m.shape == grid == gen.grid_size
    blocks = blocks_of(m, scale)
    assert blocks.sum() == masked == math.ceil(blocks.size * kwargs["mask_ratio"])


def test_seeded_determinism_and_different_seeds():
    a, b, c = MaskGenerator(seed=7), MaskGenerator(seed=7), MaskGenerator(seed=8)
    draws_a, draws_b, draws_c = [a() for _ in range(5)], [b() for _ in range(5)], [c() for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(draws_a, draws_b))
    assert not all(np.array_equal(x, y) for x, y in zip(draws_a, draws_c))
    assert not all(np.array_equal(draws_a[0], x) for x in draws_a[1:])  # consecutive draws differ


def test_explicit_generator_and_pickle():
    gen = MaskGenerator(seed=0)
    m1 = gen(np.random.default_rng(123))
    m2 = MaskGenerator(seed=99)(np.random.default_rng(123))
    assert np.array_equal(m1, m2)
    clone = pickle.loads(pickle.dumps(gen))
    assert repr(clone) == repr(gen)
    assert np.array_equal(clone(), MaskGenerator(seed=0)())


def test_blocks_uniformly_chosen():
    gen = MaskGenerator(seed=0)
    freq = np.mean([blocks_of(gen(), 2) for _ in range(2000)], axis=0)
    np.testing.assert_allclose(freq, 22 / 36, atol=0.05)


class _Masks(Dataset):
    def __init__(self, gen: MaskGenerator) -> None:
        self.gen = gen

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.gen())


def _worker_masks(seed: int | None) -> torch.Tensor:
    torch.manual_seed(0)
    loader = DataLoader(_Masks(MaskGenerator(seed=seed)), batch_size=1, num_workers=2, multiprocessing_context="fork")
    return torch.cat(list(loader))


def test_workers_draw_different_and_reproducible_masks():
    masks = _worker_masks(seed=3)  # items 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks, _worker_masks(seed=3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 1\), got 0.0"),
        (dict(mask_ratio=1.0), r"mask_ratio must be in \(0, 1\), got 1.0"),
        (dict(mask_ratio=1.5), r"mask_ratio must be in \(0, 1\)"),
        (dict(mask_ratio=-0.1), r"mask_ratio must be in \(0, 1\)"),
        (dict(mask_patch_size=24, model_patch_size=16), "mask_patch_size 24 must be divisible by model_patch_size 16"),
        (dict(input_size=200), r"input_size \(200, 200\) must be divisible by mask_patch_size 32"),
        (dict(input_size=(192, 100)), r"input_size \(192, 100\) must be divisible by mask_patch_size 32"),
        (dict(input_size=0), "input_size must be a positive int"),
        (dict(model_patch_size=16.0), "model_patch_size must be a positive int"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskGenerator(**kwargs)
