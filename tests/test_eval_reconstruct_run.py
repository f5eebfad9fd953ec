"""Reconstruction evaluation end to end from real ``kamim pretrain`` checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import photo_crops
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from kamim.eval.reconstruct import (
    MaskedImages, ReconstructConfig, evaluate_reconstruction, load_pretrain_model, run_reconstruct, unnormalize,
)


def _pretrain(root, out, method="simmim", img=32):
    from kamim.config import from_dict
    from kamim.engine.pretrain import pretrain

    cfg = from_dict({
        "method": method,
        "model": {"arch": "vit_pico", "img_size": img, "overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        "data": {"path": str(root), "num_workers": 0}, "mask": {"mask_patch_size": 16, "mask_ratio": 0.5},
        "kamim": {"weight_patch_size": 8, "temperature": 0.25},
        "optim": {"batch_size": 8, "epochs": 1, "warmup_epochs": 0, "lr": 1e-3},
        "run": {"device": "cpu", "amp": "none", "max_steps": 2, "progress": False},
    })
    pretrain(cfg, out_dir=out, resume="none")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("rec")
    data = photo_crops(base / "data", n_train_per_class=8, n_val_per_class=3)
    return {"data": data, "simmim": _pretrain(data / "train", base / "simmim"),
            "kamim": _pretrain(data / "train", base / "kamim", method="kamim")}


def test_run_matches_scikit_image_on_the_same_masked_images(runs, tmp_path):
    out = tmp_path / "out"
    res = run_reconstruct(ReconstructConfig(
        checkpoints=[str(runs["simmim"]), f"kam={runs['kamim']}"], data=str(runs["data"] / "val"), output_dir=str(out),
        mask_ratio=0.4, batch_size=5, num_workers=0, device="cpu", figure_images=3, progress=False))
    rows = {r["model"]: r for r in res["results"]}
    assert set(rows) == {"simmim", "kam"} and rows["kam"]["method"] == "kamim"
    assert all(r["num_images"] == 12 for r in rows.values())

    # independent recomputation: same dataset, same (seed, index) masks, scikit-image metrics per image
    from kamim.data import build_dataset
    from kamim.eval.data import eval_transform
    from kamim.masking import MaskGenerator

    model, info = load_pretrain_model(runs["simmim"])
    assert info["img_size"] == 32 and info["mask_patch_size"] == 16 and info["step"] == 2
    data = MaskedImages(build_dataset(str(runs["data"] / "val"), eval_transform(32)),
                        MaskGenerator(32, 16, 16, 0.4), seed=0)
    psnrs, ssims, masked = [], [], []
    for i in range(len(data)):
        s = data[i]
        assert int(s["mask"].sum()) == math.ceil(0.4 * 4)  # 2 of the 4 blocks of 16 px
        with torch.no_grad():
            pred = model.decoder(model.backbone(s["image"][None], s["mask"][None]))
        orig = unnormalize(s["image"][None])[0].permute(1, 2, 0).double().numpy()
        rec = unnormalize(pred.float())[0].permute(1, 2, 0).double().numpy()
        pm = np.kron(s["mask"].numpy(), np.ones((16, 16)))[..., None].astype(bool)
        comp = np.where(pm, rec, orig)
        psnrs.append(peak_signal_noise_ratio(orig, comp, data_range=1.0))
        ssims.append(structural_similarity(orig, comp, channel_axis=-1, data_range=1.0))
        sel = np.broadcast_to(pm, orig.shape)
        masked.append(peak_signal_noise_ratio(orig[sel], rec[sel], data_range=1.0))
    assert rows["simmim"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert rows["simmim"]["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert rows["simmim"]["psnr_masked"] == pytest.approx(np.mean(masked), abs=1e-4)

    saved = json.loads((out / "reconstruct.json").read_text())
    assert saved["mask_ratio"] == 0.4 and len(saved["results"]) == 2
    assert (out / "reconstruct.csv").read_text().count("\n") == 3
    with Image.open(out / "reconstructions.png") as fig:  # 3 rows x (original, masked, 2 models) at 1.8 in, 100 dpi
        assert fig.size == (720, 540)


class _Oracle(nn.Module):
    """Predicts the input exactly (or a constant gray): analytic PSNR/SSIM."""

    def __init__(self, gray: bool = False) -> None:
        super().__init__()
        self.gray = gray
        self.backbone = lambda images, mask: images
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.decoder = (lambda x: (0.5 - mean) / std + 0 * x) if gray else (lambda x: x)


def test_analytic_predictors(photos):
    img = torch.from_numpy(photos["coffee"][100:164, 200:264]).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images = ((img - mean) / std)[None].repeat(2, 1, 1, 1)
    mask = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]]], dtype=torch.uint8)
    res = evaluate_reconstruction({"oracle": _Oracle(), "gray": _Oracle(gray=True)}, [{"image": images, "mask": mask}])
    assert math.isinf(res["oracle"]["psnr"]) and res["oracle"]["ssim"] == pytest.approx(1.0)
    orig = unnormalize(images)
    expect = []
    for b in range(2):
        pm = mask[b].repeat_interleave(32, 0).repeat_interleave(32, 1).bool()
        err = ((orig[b] - 0.5) ** 2)[:, pm]
        expect.append(10 * math.log10(1 / err.double().mean().item()))
    assert res["gray"]["psnr_masked"] == pytest.approx(np.mean(expect), abs=1e-4)


def test_bad_inputs(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretraining checkpoint not found"):
        load_pretrain_model(tmp_path / "nothing")
    from kamim.serialization import atomic_save, safe_load

    ckpt = safe_load(runs["simmim"] / "checkpoint-last.pt")
    ckpt["method"] = "moco"
    atomic_save(ckpt, tmp_path / "moco.pt")  # a consistent file (its checksum written anew)
    with pytest.raises(ValueError, match="'moco' checkpoint; reconstruction needs a SimMIM/KAMIM"):
        load_pretrain_model(tmp_path / "moco.pt")
    big = _pretrain(runs["data"] / "train", tmp_path / "big", img=64)
    with pytest.raises(ValueError, match=r"simmim: 32x32, big: 64x64"):
        run_reconstruct(ReconstructConfig(checkpoints=[str(runs["simmim"]), str(big)], data=str(runs["data"] / "val"),
                                          output_dir=str(tmp_path / "o"), num_workers=0, device="cpu", progress=False))
    with pytest.raises(ValueError, match="mask_ratio"):
        run_reconstruct(ReconstructConfig(checkpoints=[str(runs["simmim"])], data="x", output_dir="o", mask_ratio=1.0))
