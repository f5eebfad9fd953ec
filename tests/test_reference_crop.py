"""The paper presets' pretraining crop is the KAMIM reference pipeline's, pixel for pixel.

The reference converts the image to a uint8 tensor, applies ``RandomResizedCrop(192, scale=(0.67, 1),
ratio=(3/4, 4/3), antialias=False)``, ``RandomHorizontalFlip(0.5)``, ``RandomVerticalFlip(0.5)`` and
detects keypoints on that crop. It is restated below with torchvision's v1 transforms, independently
of ``kamim.data.transforms``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from kamim.config import ConfigError, load_config
from kamim.data import MIMTransform
from kamim.keypoints import KeypointMapper

SCALE, RATIO = (0.67, 1.0), (3 / 4, 4 / 3)


def _reference(size: int) -> T.Compose:
    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=False),
        T.RandomHorizontalFlip(0.5),
        T.RandomVerticalFlip(0.5),
    ])


def _boxes_and_flips(image: Image.Image, size: int, seed: int) -> tuple[tuple[int, ...], bool, bool]:
    """The crop box and flips the reference draws after ``torch.manual_seed(seed)`` (same draw order)."""
    torch.manual_seed(seed)
    box = T.RandomResizedCrop.get_params(TF.pil_to_tensor(image), list(SCALE), list(RATIO))
    return tuple(box), bool(torch.rand(1) < 0.5), bool(torch.rand(1) < 0.5)


@pytest.mark.parametrize("detector", ["fast", "sift", "orb"])
def test_reference_crop_gives_the_reference_pixels_and_keypoints(photos, detector):
    size, seen_flips, seen_boxes = 192, set(), set()
    mapper = KeypointMapper(detector)
    ours = MIMTransform(size, crop_scale=SCALE, crop_ratio=RATIO, hflip=0.5, vflip=0.5, crop="reference",
                        keypoints=mapper, weight_patch_size=8)
    reference = _reference(size)
    for name, array in photos.items():
        image = Image.fromarray(array)
        for seed in range(6):
            box, hflip, vflip = _boxes_and_flips(image, size, seed)
            seen_flips.add((hflip, vflip))
            seen_boxes.add((name, box))
            torch.manual_seed(seed)
            expected = reference(image)  # uint8 (3, 192, 192)
            torch.manual_seed(seed)
            crop = ours.crop(image)
            assert torch.equal(crop, expected), (name, seed, box, hflip, vflip)
            torch.manual_seed(seed)
            sample = ours(image)
            ref_hwc = np.ascontiguousarray(expected.permute(1, 2, 0).numpy())
            assert np.array_equal(mapper(ref_hwc), mapper(np.ascontiguousarray(crop.permute(1, 2, 0).numpy())))
            want = torch.from_numpy(np.asarray(mapper.density(ref_hwc, 8), dtype=np.float32)).half()
            assert torch.equal(sample["density"], want), (name, seed)
    assert seen_flips == {(False, False), (False, True), (True, False), (True, True)}
    assert len(seen_boxes) == 24


def test_the_antialiased_crop_differs_on_a_downscaling_box(photos):
    image = Image.fromarray(photos["astronaut"])  # 512 px: every 192 px crop downscales
    kw = dict(crop_scale=SCALE, crop_ratio=RATIO, hflip=0.5, vflip=0.5)
    torch.manual_seed(3)
    reference = MIMTransform(192, crop="reference", **kw).crop(image)
    torch.manual_seed(3)
    antialiased = np.asarray(MIMTransform(192, crop="antialiased", **kw).crop(image))
    assert antialiased.shape == (192, 192, 3)
    changed = np.mean(antialiased != reference.permute(1, 2, 0).numpy())
    assert changed > 0.3  # same box and flips, different resampling


def test_paper_presets_use_the_reference_crop_and_tiny_presets_the_antialiased_one():
    for name in ("simmim_vit_b", "kamim_vit_b", "kamim_swin_t", "simmim_vit_t"):
        cfg = load_config(name)
        assert (cfg.data.crop, cfg.data.vflip, cfg.data.hflip) == ("reference", 0.5, 0.5), name
    for name in ("tiny_kamim", "tiny_simmim"):
        assert (load_config(name).data.crop, load_config(name).data.vflip) == ("antialiased", 0.0)
    with pytest.raises(ConfigError, match=r"data.crop='bicubic' is not valid; expected one of: reference, antialiased"):
        load_config("kamim_vit_b", ["data.crop=bicubic"])
    with pytest.raises(ConfigError, match=r"data.vflip=2.0 must be in \[0, 1\]"):
        load_config("kamim_vit_b", ["data.vflip=2"])


def test_the_pretraining_transform_follows_the_config():
    from kamim.engine.pretrain import build_model, build_pretrain_transform

    cfg = load_config("tiny_kamim", ["data.crop=reference", "data.vflip=0.5"])
    t = build_pretrain_transform(cfg, build_model(cfg))
    assert (t.crop_mode, t.vflip) == ("reference", 0.5)
    assert (build_pretrain_transform(load_config("tiny_kamim"), build_model(cfg)).crop_mode) == "antialiased"
