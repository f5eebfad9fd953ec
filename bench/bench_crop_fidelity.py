"""How much the pretraining crop changes KAMIM's keypoints: reference crop vs antialiased crop.

The KAMIM reference crops the uint8 image tensor with ``RandomResizedCrop(antialias=False)``
(bilinear, torchvision v1) and flips it horizontally and vertically; ``data.crop=antialiased``
crops the PIL image with antialiasing. For the SAME crop box and flips (drawn as the reference
draws them), this script measures on real photographs (scikit-image and scikit-learn samples,
their native sizes, 192 px crops):

* the share of keypoint-map pixels that differ between the two crops, and
* the mean relative change of the KAMIM weights ``exp(density / T)`` (min 1; w_ps 8, T 0.25),
  ``mean |w_antialiased - w_reference| / w_reference`` over patches,

per detector (FAST, SIFT, ORB), each averaged over every photo and crop. It also times both crops.

    python bench/bench_crop_fidelity.py --crops 20
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import functional as TF
from torchvision.transforms import v2

from kamim.keypoints import KeypointMapper
from kamim.weights import weights_from_density

SCALE, RATIO, SIZE, WPS, T = (0.67, 1.0), (3 / 4, 4 / 3), 192, 8, 0.25


def _photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = {n: getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "cat")}
    for i, img in enumerate(load_sample_images().images):
        out[f"sklearn{i}"] = img
    return out


def _crops(image: Image.Image, box: tuple[int, int, int, int], hflip: bool, vflip: bool):
    """(reference, antialiased) uint8 HWC crops of ``box`` with the given flips."""
    ref = TF.resized_crop(TF.pil_to_tensor(image), *box, [SIZE, SIZE], antialias=False)  # v1 on the tensor
    aa = v2.functional.resized_crop(image, *box, [SIZE, SIZE], antialias=True)  # v2 on the PIL image
    aa = torch.from_numpy(np.array(aa)).permute(2, 0, 1)
    for flip, op in ((hflip, TF.hflip), (vflip, TF.vflip)):
        if flip:
            ref, aa = op(ref), op(aa)
    return [np.ascontiguousarray(c.permute(1, 2, 0).numpy()) for c in (ref, aa)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=20, help="crop boxes per photograph")
    args = ap.parse_args()
    photos = _photos()
    torch.manual_seed(0)
    pairs, t_ref, t_aa = [], 0.0, 0.0
    for array in photos.values():
        image = Image.fromarray(array)
        for _ in range(args.crops):
            box = v1.RandomResizedCrop.get_params(TF.pil_to_tensor(image), list(SCALE), list(RATIO))
            hflip, vflip = bool(torch.rand(1) < 0.5), bool(torch.rand(1) < 0.5)
            pairs.append(_crops(image, box, hflip, vflip))
    # timing of the two crops alone (same boxes), for the data-loader cost of the choice
    image, box = Image.fromarray(photos["astronaut"]), (40, 40, 400, 400)
    for _ in range(50):
        t0 = time.perf_counter()
        TF.resized_crop(TF.pil_to_tensor(image), *box, [SIZE, SIZE], antialias=False)
        t_ref += time.perf_counter() - t0
        t0 = time.perf_counter()
        v2.functional.resized_crop(image, *box, [SIZE, SIZE], antialias=True)
        t_aa += time.perf_counter() - t0
    print(f"{len(photos)} photographs x {args.crops} crops = {len(pairs)} crop pairs at {SIZE} px")
    print(f"{'detector':>8}  {'map pixels changed':>18}  {'mean weight change':>18}")
    for det in ("fast", "sift", "orb"):
        mapper = KeypointMapper(det)
        changed, dw = [], []
        for ref, aa in pairs:
            changed.append(np.mean(mapper(ref) != mapper(aa)))
            d = torch.from_numpy(np.stack([mapper.density(ref, WPS), mapper.density(aa, WPS)]).astype(np.float32))
            w = weights_from_density(d, T)
            dw.append(float(((w[1] - w[0]).abs() / w[0]).mean()))
        print(f"{det:>8}  {100 * np.mean(changed):17.1f}%  {100 * np.mean(dw):17.1f}%")
    print(f"crop time per image: reference {1e3 * t_ref / 50:.2f} ms, antialiased {1e3 * t_aa / 50:.2f} ms")


if __name__ == "__main__":
    main()
