"""Keypoint maps: pixel parity of render="ring" with the KAMIM reference (cv2.drawKeypoints)."""
from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from kamim import keypoints as K
from kamim.keypoints import DETECTORS, RENDERS, KeypointMapper, detect_keypoints, keypoint_map, render_keypoints

FACTORY = {
    "fast": cv2.FastFeatureDetector_create,
    "sift": cv2.SIFT_create,
    "orb": cv2.ORB_create,
    "gftt": cv2.GFTTDetector_create,
}


def reference_map(image: np.ndarray, keypoints) -> np.ndarray:
    """The KAMIM reference: draw on black, channel 0 > 0."""
    return cv2.drawKeypoints(np.zeros_like(image), keypoints, None, color=(255, 0, 0))[..., 0] > 0


def reference_for(image: np.ndarray, detector: str, **params) -> np.ndarray:
    return reference_map(image, FACTORY[detector](**params).detect(image, None))


def crops(photos: dict[str, np.ndarray], rng: np.random.Generator, n: int, lo: int, hi: int):
    imgs = list(photos.values())
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        yield np.ascontiguousarray(img[y : y + h, x : x + w])


def test_detectors_offered():
    assert {"fast", "sift", "orb", "gftt"} <= set(DETECTORS)
    assert RENDERS == ("ring", "point", "disk")


@pytest.mark.parametrize("detector", ["fast", "sift", "orb", "gftt"])
def test_ring_equals_drawkeypoints_on_photographs(photos, detector):
    rng = np.random.default_rng(hash(detector) % 2**32)
    images = [cv2.resize(p, (96, 80), interpolation=cv2.INTER_AREA) for p in photos.values()]
    images += list(crops(photos, rng, 8, 16, 110))  # random sizes, keypoints on borders
    images.append(np.ascontiguousarray(photos["astronaut"][100:111, 200:213]))  # tiny (11 x 13)
    n_kps = 0
    for img in images:
        kps = FACTORY[detector]().detect(img, None)
        n_kps += len(kps)
        got = keypoint_map(img, detector, render="ring")
        assert got.dtype == np.float32 and got.shape == img.shape[:2]
        assert set(np.unique(got)) <= {0.0, 1.0}
        np.testing.assert_array_equal(got.astype(bool), reference_map(img, kps))
    assert n_kps > 50  # the comparison actually involved keypoints


@pytest.fixture(params=["dilate", "scatter"])
def ring_path(request, monkeypatch) -> str:
    """Force one of the two exact ring renderers (cv2.dilate per phase, or stencil scatter)."""
    monkeypatch.setattr(K, "_DILATE_MIN_KEYPOINTS", 1 if request.param == "dilate" else 10**9)
    return request.param


@pytest.mark.parametrize("name,size", [("astronaut", 192), ("chelsea", 160), ("coffee", 96)])
def test_ring_parity_training_resolution(photos, ring_path, name, size):
    """FAST / ORB maps of real photographs at training resolution, through both render paths."""
    img = cv2.resize(photos[name], (size, size), interpolation=cv2.INTER_AREA)
    for detector in ("fast", "orb"):
        kps = FACTORY[detector]().detect(img, None)
        assert len(kps) > 20
        np.testing.assert_array_equal(keypoint_map(img, detector).astype(bool), reference_map(img, kps))


def test_ring_parity_synthetic_borders_and_subpixel(ring_path):
    """Arbitrary sub-pixel centres, incl. on/off the borders, rounding ties and tiny images."""
    rng = np.random.default_rng(0)
    for t in range(300):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        n = int(rng.integers(0, 40))
        xs, ys = rng.uniform(-6, w + 6, n), rng.uniform(-6, h + 6, n)
        if t % 2:  # multiples of 1/32: exact ties of cvRound(16 * x)
            xs, ys = np.round(xs * 32) / 32, np.round(ys * 32) / 32
        kps = [cv2.KeyPoint(float(x), float(y), 7.0) for x, y in zip(xs, ys)]
        want = reference_map(np.zeros((h, w, 3), np.uint8), kps)
        np.testing.assert_array_equal(render_keypoints(kps, (h, w)).astype(bool), want)


def test_ring_parity_subpixel_phases(ring_path):
    """Hundreds of rings sharing few non-zero sub-pixel phases (non-trivial dilate kernels)."""
    rng = np.random.default_rng(1)
    n = 800
    phases = rng.integers(0, 2, (n, 2)) * np.array([5, 11]) / 16  # two phases per axis
    centres = rng.integers(0, 64, (n, 2)) + phases
    kps = [cv2.KeyPoint(float(x), float(y), 7.0) for x, y in centres]
    want = reference_map(np.zeros((64, 64, 3), np.uint8), kps)
    np.testing.assert_array_equal(render_keypoints(kps, (64, 64)).astype(bool), want)


def test_non_contiguous_views(photos):
    """Flipped / strided views (e.g. a numpy horizontal flip) give the map of their contents."""
    view = photos["chelsea"][::3, ::-3]
    img = np.ascontiguousarray(view)
    kps = cv2.FastFeatureDetector_create().detect(img, None)
    np.testing.assert_array_equal(keypoint_map(view).astype(bool), reference_map(img, kps))


def test_ring_isolated_keypoint_covers_a_ring():
    m = render_keypoints([cv2.KeyPoint(20.0, 20.0, 7.0)], (40, 40))
    assert 40 <= m.sum() <= 60 and m[20, 20] == 0  # unfilled ring of radius 3


def test_gray_input_and_params(photos):
    gray = cv2.cvtColor(cv2.resize(photos["coffee"], (120, 96)), cv2.COLOR_RGB2GRAY)
    kps = cv2.FastFeatureDetector_create().detect(gray, None)
    np.testing.assert_array_equal(keypoint_map(gray).astype(bool), reference_map(gray, kps))
    rgb = cv2.resize(photos["coffee"], (120, 96))
    strict = keypoint_map(rgb, "fast", threshold=60)
    np.testing.assert_array_equal(strict.astype(bool), reference_for(rgb, "fast", threshold=60))
    assert 0 < strict.sum() < keypoint_map(rgb, "fast").sum()
    assert len(detect_keypoints(rgb, "fast", threshold=60)) < len(detect_keypoints(rgb, "fast"))


def test_point_render():
    pts = [(3.2, 4.7), (10.5, 2.0), (11.5, 7.49), (-3.0, 1.0), (0.0, 30.0)]
    kps = [cv2.KeyPoint(x, y, 7.0) for x, y in pts]
    m = render_keypoints(kps, (12, 16), "point")
    want = np.zeros((12, 16), np.float32)
    for y, x in [(5, 3), (2, 10), (7, 12)]:  # rint: 10.5 -> 10, 11.5 -> 12 (half to even)
        want[y, x] = 1
    np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("x,y,size", [(10.0, 12.0, 7.0), (9.3, 11.6, 12.5), (1.0, 2.0, 9.0), (8.0, 8.0, 0.0)])
def test_disk_render(x, y, size):
    h, w = 24, 20
    m = render_keypoints([cv2.KeyPoint(x, y, size)], (h, w), "disk")
    yy, xx = np.mgrid[0:h, 0:w]
    want = ((xx - x) ** 2 + (yy - y) ** 2 <= (size / 2) ** 2).astype(np.float32)
    np.testing.assert_array_equal(m, want)


def test_disk_contains_points_and_grows_with_size(photos):
    img = cv2.resize(photos["chelsea"], (96, 64))
    disk, point = keypoint_map(img, "fast", "disk"), keypoint_map(img, "fast", "point")
    assert point.sum() > 0 and np.all(disk >= point) and disk.sum() > point.sum()
    kps = detect_keypoints(img, "orb")
    small = [cv2.KeyPoint(k.pt[0], k.pt[1], k.size / 2) for k in kps]
    assert render_keypoints(small, img.shape[:2], "disk").sum() < render_keypoints(kps, img.shape[:2], "disk").sum()


def test_mapper_pickle_and_density(photos):
    img = cv2.resize(photos["astronaut"], (128, 96))
    mapper = KeypointMapper("orb", "ring", nfeatures=200)
    clone = pickle.loads(pickle.dumps(mapper))
    np.testing.assert_array_equal(clone(img), mapper(img))
    np.testing.assert_array_equal(mapper(img), keypoint_map(img, "orb", nfeatures=200))
    dens = mapper.density(img, 8)
    assert dens.dtype == np.float32 and dens.shape == (12, 16)
    m = mapper(img)
    want = np.array([[m[i : i + 8, j : j + 8].mean() for j in range(0, 128, 8)] for i in range(0, 96, 8)])
    np.testing.assert_allclose(dens, want, rtol=0, atol=1e-7)
    assert 0 < dens.max() <= 1


def test_mapper_in_dataloader_workers(photos):
    import torch
    from torch.utils.data import DataLoader, Dataset

    images = [cv2.resize(p, (48, 48)) for p in photos.values()]
    mapper = KeypointMapper("fast")
    mapper(images[0])  # detector created in the parent; workers must build their own

    class DS(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.from_numpy(mapper.density(images[i], 16))

    got = torch.cat(list(DataLoader(DS(), batch_size=2, num_workers=2, multiprocessing_context="fork")))
    want = torch.stack([torch.from_numpy(mapper.density(img, 16)) for img in images])
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32, 3), np.float32),
        np.zeros((32, 32, 4), np.uint8),
        np.zeros((32, 32, 3, 1), np.uint8),
        np.zeros((0, 32, 3), np.uint8),
        np.zeros((32,), np.uint8),
        [[0, 1], [2, 3]],
    ],
)
def test_bad_image(image):
    with pytest.raises(ValueError, match="image must be"):
        keypoint_map(image)


def test_bad_detector_render_params():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown detector 'surf'.*fast"):
        keypoint_map(img, "surf")
    with pytest.raises(ValueError, match="unknown render 'blob'"):
        keypoint_map(img, render="blob")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['thresh'\].*threshold"):
        keypoint_map(img, "fast", thresh=3)
    with pytest.raises(ValueError, match="invalid parameters"):
        KeypointMapper("fast", threshold="high")
    with pytest.raises(ValueError, match="patch_size 7 must divide"):
        KeypointMapper().density(img, 7)
    with pytest.raises(ValueError, match="shape must be"):
        render_keypoints([], (0, 5))
