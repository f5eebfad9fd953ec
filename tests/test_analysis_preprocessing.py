"""The analyses' preprocessing: timm's eval transform, bilinear for paper-figures (as the reference
notebooks), bicubic for run; stated in the report and compared by --reuse and plot."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from timm.data import create_transform

from analysis.paper import PAPER_PREPROCESSING
from analysis.pipeline import Preprocessing, UsageError, make_loader
from analysis.settings import AnalyzeConfig, PaperFiguresConfig


def _same(ours: torch.Tensor, timm_out: torch.Tensor) -> None:
    """Same resize, crop and normalisation; ToTensor's div(255) and v2.ToDtype's scaling may differ
    in the last float32 bit (as in tests/test_eval_data.py)."""
    torch.testing.assert_close(ours, timm_out, rtol=0, atol=1e-6)


def _timm(size: int, interpolation: str, crop_pct: float = 0.875):
    return create_transform(size, is_training=False, interpolation=interpolation, crop_pct=crop_pct)


@pytest.mark.parametrize("size", [192, 224])
def test_paper_figures_default_is_timms_bilinear_eval_transform(photos, size):
    cfg = PaperFiguresConfig(simmim="s", kamim="k", moco="m", data="d")
    ours = Preprocessing(cfg.interpolation, cfg.crop_pct)
    assert ours == PAPER_PREPROCESSING == Preprocessing("bilinear", 0.875)
    for array in photos.values():
        image = Image.fromarray(array)
        _same(ours.transform((size, size))(image)["image"], _timm(size, "bilinear")(image))


def test_run_default_is_timms_bicubic_eval_transform_and_the_two_differ(photos):
    cfg = AnalyzeConfig(data="d", models={"a": "b"})
    ours = Preprocessing(cfg.interpolation, cfg.crop_pct)
    image = Image.fromarray(photos["astronaut"])
    bicubic = ours.transform((192, 192))(image)["image"]
    _same(bicubic, _timm(192, "bicubic")(image))
    bilinear = PAPER_PREPROCESSING.transform((192, 192))(image)["image"]
    assert (bicubic - bilinear).abs().mean() > 0.01  # far beyond float32 rounding
    cropped = Preprocessing("bicubic", 1.0).transform((192, 192))(image)["image"]
    _same(cropped, _timm(192, "bicubic", crop_pct=1.0)(image))


def test_make_loader_applies_the_preprocessing(tmp_path, photos):
    for name, array in photos.items():
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    loader, _ = make_loader(tmp_path, (64, 64), batch_size=4, workers=0, preprocessing=PAPER_PREPROCESSING)
    batch = next(iter(loader))["image"]
    files = sorted(tmp_path.glob("*.png"))
    want = torch.stack([_timm(64, "bilinear")(Image.open(f).convert("RGB")) for f in files])
    _same(batch, want)


def test_bad_preprocessing_is_one_line():
    with pytest.raises(UsageError, match="interpolation 'lanczos' is not valid; expected one of bilinear, bicubic"):
        Preprocessing("lanczos")
    with pytest.raises(UsageError, match=r"crop_pct must be in \(0, 1\], got 1.5"):
        Preprocessing("bicubic", 1.5)
    from kamim.config import ConfigError

    with pytest.raises(ConfigError, match=r"crop_pct=0.0 must be in \(0, 1\]"):
        AnalyzeConfig(data="d", models={"a": "b"}, crop_pct=0.0).validate()
