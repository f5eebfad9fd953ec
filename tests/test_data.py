"""Tests for kamim.data: image loading, datasets, demo data, transforms."""
from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from kamim.data import (
    CorruptImageWarning,
    EvalTransform,
    ImageFolderDataset,
    ImageLoadError,
    MIMTransform,
    TwoViewTransform,
    build_dataset,
    build_labelled_splits,
    collate_skip_bad,
    demo_photographs,
    find_images,
    load_rgb,
    write_demo_folder,
    write_labelled_demo,
)
from kamim.data.demo import MANIFEST_NAME


# ----------------------------------------------------------------------------- helpers / fixtures
def _rgb(photos, name="astronaut", size=64) -> np.ndarray:
    return cv2.resize(photos[name], (size, size), interpolation=cv2.INTER_AREA)


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The default demo folder, written once for the module (as build_dataset('demo') would)."""
    return write_demo_folder(tmp_path_factory.mktemp("kamim_data") / "demo")


@pytest.fixture()
def class_folder(tmp_path, photos) -> Path:
    """root/{cat,dog}/ with small real crops and one truncated JPEG in dog/."""
    root = tmp_path / "cls"
    for c, name in (("cat", "chelsea"), ("dog", "coffee")):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_rgb(photos, name, 24 + 8 * i)).save(root / c / f"{i}.png")
    good = root / "dog" / "big.jpg"
    Image.fromarray(photos["rocket"]).save(good, quality=90)
    raw = good.read_bytes()
    (root / "dog" / "broken.jpg").write_bytes(raw[: len(raw) // 3])
    return root


# ----------------------------------------------------------------------------- load_rgb
def test_load_gray_rgba_palette(tmp_path, photos):
    gray = cv2.cvtColor(photos["astronaut"], cv2.COLOR_RGB2GRAY)[:40, :50]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = np.asarray(load_rgb(tmp_path / "g.png"))
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    # RGBA: composited on black -> rgb * alpha / 255
    rgb = _rgb(photos, size=16)
    alpha = np.tile(np.array([0, 64, 128, 255], np.uint8), (16, 4))
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png")).astype(int)
    expected = rgb.astype(int) * alpha[..., None].astype(int) / 255.0
    assert np.abs(out - expected).max() <= 1.0
    np.testing.assert_array_equal(out[alpha == 0], 0)
    np.testing.assert_array_equal(out[alpha == 255], rgb[alpha == 255])

    # LA: gray + alpha
    Image.fromarray(np.dstack([gray[:16, :16], alpha]), mode="LA").save(tmp_path / "la.png")
    out = np.asarray(load_rgb(tmp_path / "la.png")).astype(int)
    assert np.abs(out[..., 1] - gray[:16, :16].astype(int) * alpha.astype(int) / 255.0).max() <= 1.0

    # palette with a transparent index
    idx = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    pal = Image.fromarray(idx, mode="P")
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0, 255, 255, 255]
    pal.putpalette(palette + [0] * (768 - len(palette)))
    pal.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    np.testing.assert_array_equal(out[idx == 1], 0)  # transparent -> black
    np.testing.assert_array_equal(out[idx == 0], np.broadcast_to([10, 20, 30], out[idx == 0].shape))
    np.testing.assert_array_equal(out[idx == 3], np.broadcast_to([255, 255, 255], out[idx == 3].shape))


@pytest.mark.parametrize("fmt", ["png16", "tiff16", "tiff16b", "tiff32"])
def test_load_16bit_scaled_not_clipped(tmp_path, fmt):
    values = np.array([[0, 1, 128, 257, 1000], [32767, 32768, 40000, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / f"x.{'png' if fmt == 'png16' else 'tif'}"
    if fmt == "png16":
        cv2.imwrite(str(path), values)
    elif fmt == "tiff16":
        Image.fromarray(values).save(path)
    elif fmt == "tiff16b":
        Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(values.astype(np.int32)).save(path)
    mode = Image.open(path).mode
    assert mode == {"png16": "I;16", "tiff16": "I;16", "tiff16b": "I;16B", "tiff32": "I"}[fmt]
    out = np.asarray(load_rgb(path))
    expected = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert out.max() == 255 and tuple(out[0, 3]) == (1, 1, 1)  # 257 -> 1, not clipped to 255


def test_load_int32_out_of_range_is_error(tmp_path):
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageLoadError, match=r"big\.tif.*\[0, 65535\]"):
        load_rgb(tmp_path / "big.tif")


def test_load_cmyk_jpeg(tmp_path, photos):
    rgb = _rgb(photos, "coffee", 64)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(load_rgb(tmp_path / "c.jpg"))
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6


def test_load_errors_name_the_file(tmp_path, photos):
    Image.fromarray(photos["astronaut"]).save(tmp_path / "full.jpg", quality=90)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("trunc.jpg", "noise.png"):
        with pytest.raises(ImageLoadError) as info:
            load_rgb(tmp_path / name)
        msg = str(info.value)
        assert name in msg and "\n" not in msg
        assert info.value.path == tmp_path / name
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_rgb(tmp_path / "nope.png")
    assert load_rgb(tmp_path / "full.jpg").size == (512, 512)


def test_image_load_error_survives_pickle_and_worker_reraise():
    err = ImageLoadError("/data/x.jpg", "OSError: truncated")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ImageLoadError and str(back) == str(err) and back.path == "/data/x.jpg"
    # torch's ExceptionWrapper.reraise() rebuilds the exception from one message string
    assert str(ImageLoadError("Caught ImageLoadError in worker")) == "Caught ImageLoadError in worker"


# ----------------------------------------------------------------------------- find_images
def test_find_images(tmp_path):
    for rel in ("b/2.JPG", "a/1.png", "a/deep/3.TiFf", "c.webp", "notes.txt", ".hidden.png",
                ".ipynb_checkpoints/x.png", "a/._1.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/1.png", "a/deep/3.TiFf", "b/2.JPG", "c.webp"]


def test_find_images_empty_or_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="empty"):
        find_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")


# ----------------------------------------------------------------------------- datasets
def test_image_folder_classes_and_flat(class_folder, tmp_path, photos):
    ds = ImageFolderDataset(class_folder, strict=True)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.targets == [0, 0, 0, 1, 1, 1, 1, 1]
    assert [p.name for p, _ in ds.samples][:3] == ["0.png", "1.png", "2.png"]
    sample = ds[1]
    assert isinstance(sample["image"], Image.Image) and sample["image"].size == (32, 32)
    assert sample["label"] == 0

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(photos, size=16 + i)).save(flat / f"{i}.png")
    ds = ImageFolderDataset(flat, transform=EvalTransform(16, resize_ratio=1.0))
    assert ds.layout == "flat" and ds.classes == [] and len(ds) == 3
    out = ds[2]
    assert out["label"] == -1 and out["image"].shape == (3, 16, 16)

    (flat / "sub").mkdir()
    Image.fromarray(_rgb(photos, size=16)).save(flat / "sub" / "x.png")
    with pytest.raises(ValueError, match="mixes"):
        ImageFolderDataset(flat)
    assert len(ImageFolderDataset(flat, layout="flat")) == 4
    assert ImageFolderDataset(flat, layout="classes").classes == ["sub"]


def test_corrupt_sample_skipped_with_warning_and_strict(class_folder):
    ds = ImageFolderDataset(class_folder, transform=EvalTransform(16))
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.jpg")
    with pytest.warns(CorruptImageWarning, match="broken.jpg"):
        assert ds[bad] is None
    strict = ImageFolderDataset(class_folder, transform=EvalTransform(16), strict=True)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        strict[bad]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_collate_skip_bad_counts_across_workers(class_folder, num_workers):
    ds = ImageFolderDataset(class_folder, transform=EvalTransform(16))
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skip_bad)
    seen, skipped, labels = 0, 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        for batch in loader:
            assert batch["num_skipped"].dtype == torch.int64
            skipped += int(batch["num_skipped"])
            seen += batch["image"].shape[0]
            assert batch["image"].shape[1:] == (3, 16, 16)
            labels += batch["label"].tolist()
    assert skipped == 1 and seen == len(ds) - 1
    assert labels == [0, 0, 0, 1, 1, 1, 1]


def test_strict_error_keeps_type_through_workers(class_folder):
    ds = ImageFolderDataset(class_folder, transform=EvalTransform(16), strict=True)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_skip_bad)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        next(iter(loader))


def test_collate_skip_bad_edge_cases():
    out = collate_skip_bad([None, None])
    assert set(out) == {"num_skipped"} and int(out["num_skipped"]) == 2
    out = collate_skip_bad([{"x": torch.ones(2), "label": 3}, None])
    assert out["x"].shape == (1, 2) and out["label"].tolist() == [3] and int(out["num_skipped"]) == 1
    with pytest.raises(TypeError, match="dict"):
        collate_skip_bad([(torch.ones(2), 1)])


def test_labelled_splits_map_val_onto_train(tmp_path, photos):
    for split, classes in (("train", ["a", "b", "c"]), ("val", ["b", "c"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(_rgb(photos, size=16)).save(tmp_path / split / c / "0.png")
    splits = build_labelled_splits(tmp_path)
    assert splits.classes == ["a", "b", "c"] and splits.num_classes == 3
    assert splits.val.targets == [1, 2]  # not [0, 1]
    assert splits.val.classes == ["a", "b", "c"]

    (tmp_path / "val" / "zebra").mkdir()
    Image.fromarray(_rgb(photos, size=16)).save(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(ValueError, match="zebra"):
        build_labelled_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match="val/"):
        build_labelled_splits(tmp_path / "train")


def test_build_dataset_specs(tmp_path, class_folder, demo_dir, monkeypatch):
    ds = build_dataset(str(class_folder), transform=EvalTransform(16))
    assert isinstance(ds, ImageFolderDataset) and ds.classes == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match=r"cifar10.*nowhere"):
        build_dataset(f"cifar10:{tmp_path / 'nowhere'}", transform=None)
    (tmp_path / "empty_cifar").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py"):
        build_dataset(f"CIFAR10:{tmp_path / 'empty_cifar'}", transform=None)
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_devkit"):
        build_dataset(f"imagenet:{tmp_path / 'empty_cifar'}", transform=None, split="val")
    with pytest.raises(ValueError, match="no split"):
        build_dataset(f"cifar10:{tmp_path}", transform=None, split="extra")
    # "demo" reuses the folder materialised under $KAMIM_DATA_DIR
    monkeypatch.setenv("KAMIM_DATA_DIR", str(demo_dir.parent))
    demo = build_dataset("demo", transform=EvalTransform(32))
    assert Path(demo.root) == demo_dir and len(demo) >= 64
    assert demo[0]["image"].shape == (3, 32, 32) and demo[0]["label"] == -1
    # labelled demo splits, and a train/ + val/ folder read at ROOT/split
    digits_val = build_dataset("demo-digits", split="val")
    assert Path(digits_val.root) == demo_dir.parent / "demo-digits" / "val"
    assert digits_val.classes == [str(i) for i in range(10)] and len(digits_val) == 100
    assert len(build_dataset(demo_dir.parent / "demo-digits")) == 200
    with pytest.raises(ValueError, match="split"):
        build_dataset(demo_dir.parent / "demo-digits", split="test")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX file (MNIST's format): magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, data."""
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">i4").tobytes() + arr.astype(np.uint8).tobytes())


def test_torchvision_dataset_from_local_files(tmp_path):
    """A local MNIST (real sklearn digits in the IDX layout torchvision reads) through build_labelled_splits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = np.stack([cv2.resize(d * 255 / 16, (28, 28), interpolation=cv2.INTER_LINEAR) for d in digits.images[:40]])
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, 30)), ("t10k", slice(30, 40))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.clip(np.rint(imgs[sl]), 0, 255))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", digits.target[sl])
    splits = build_labelled_splits(f"mnist:{tmp_path}", train_transform=EvalTransform(28, resize_ratio=1.0))
    assert len(splits.train) == 30 and len(splits.val) == 10 and splits.num_classes == 10
    sample = splits.train[3]
    assert sample["label"] == digits.target[3] and sample["image"].shape == (3, 28, 28)
    unnorm = [sample["image"][c] * IMAGENET_DEFAULT_STD[c] + IMAGENET_DEFAULT_MEAN[c] for c in range(3)]
    torch.testing.assert_close(unnorm[0], unnorm[2])  # gray MNIST replicated to RGB
    val = splits.val[0]
    assert val["label"] == digits.target[30] and isinstance(val["image"], Image.Image) and val["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(val["image"])[..., 1], np.clip(np.rint(imgs[30]), 0, 255))


# ----------------------------------------------------------------------------- demo data
def test_demo_photographs_are_real():
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = demo_photographs()
    assert len(photos) >= 12
    assert {"astronaut", "chelsea", "coffee", "china", "flower", "camera"} <= set(photos)
    for name, img in photos.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 256 and img.std() > 10, name
    np.testing.assert_array_equal(photos["chelsea"], data.chelsea())
    np.testing.assert_array_equal(photos["china"], load_sample_images().images[0])
    packed = {n: (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
              for n, img in photos.items() if not np.array_equal(img[..., 0], img[..., 1])}
    colors = [len(np.unique(v)) for v in packed.values()]
    assert len(colors) >= 8 and min(colors) > 20_000
    photos["astronaut"][:] = 0  # callers get copies
    assert demo_photographs()["astronaut"].max() > 0
    assert "camera" not in demo_photographs(include_gray=False)


def test_demo_folder(demo_dir):
    files = find_images(demo_dir)
    assert len(files) >= 64
    assert {p.suffix for p in files} == {".jpg", ".png"}
    sizes = {load_rgb(p).size for p in files[:10]}
    assert len(sizes) > 3 and all(max(s) <= 512 for s in sizes)


def test_demo_folder_deterministic_and_idempotent(tmp_path):
    a = write_demo_folder(tmp_path / "a", crops_per_photo=1, max_side=48, seed=3)
    b = write_demo_folder(tmp_path / "b", crops_per_photo=1, max_side=48, seed=3)
    assert _tree_digest(a) == _tree_digest(b)
    mtime = (a / MANIFEST_NAME).stat().st_mtime_ns
    assert write_demo_folder(tmp_path / "a", crops_per_photo=1, max_side=48, seed=3) == a
    assert (a / MANIFEST_NAME).stat().st_mtime_ns == mtime
    c = write_demo_folder(tmp_path / "c", crops_per_photo=1, max_side=48, seed=4)
    assert _tree_digest(c) != _tree_digest(a)
    with pytest.raises(FileExistsError, match="seed"):
        write_demo_folder(tmp_path / "a", crops_per_photo=1, max_side=48, seed=4)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="user"):
        write_demo_folder(tmp_path / "user")
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary folders left behind
    assert a.stat().st_mode & 0o777 == 0o755


def test_labelled_demo_photo_crops(tmp_path):
    kw = dict(n_train_per_class=6, n_val_per_class=3, size=24, seed=1)
    a = write_labelled_demo(tmp_path / "a", **kw)
    assert _tree_digest(a) == _tree_digest(write_labelled_demo(tmp_path / "b", **kw))
    assert write_labelled_demo(tmp_path / "a", **kw) == a
    splits = build_labelled_splits(a)
    assert splits.classes == sorted(demo_photographs())
    assert len(splits.train) == 6 * splits.num_classes and len(splits.val) == 3 * splits.num_classes
    train = {hashlib.sha256(np.asarray(load_rgb(p)).tobytes()).hexdigest() for p, _ in splits.train.samples}
    val = {hashlib.sha256(np.asarray(load_rgb(p)).tobytes()).hexdigest() for p, _ in splits.val.samples}
    assert len(train) == len(splits.train) and not train & val  # distinct, disjoint crops
    assert np.asarray(load_rgb(splits.train.samples[0][0])).shape == (24, 24, 3)


def test_labelled_demo_is_learnable(tmp_path):
    """Real content: k-NN on colour/texture statistics of the crops beats chance (1/15) clearly."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    root = write_labelled_demo(tmp_path / "p", n_train_per_class=20, n_val_per_class=10, size=32)
    splits = build_labelled_splits(root)

    def features(img: np.ndarray) -> np.ndarray:
        x = img.reshape(-1, 3).astype(np.float64)
        grad = [np.abs(np.diff(img.astype(np.float64), axis=a)).mean() for a in (0, 1)]
        return np.concatenate([x.mean(0), x.std(0), grad])

    def xy(ds):
        return np.stack([features(np.asarray(load_rgb(p))) for p, _ in ds.samples]), np.array(ds.targets)

    (xt, yt), (xv, yv) = xy(splits.train), xy(splits.val)
    scaler = StandardScaler().fit(xt)
    acc = KNeighborsClassifier(5).fit(scaler.transform(xt), yt).score(scaler.transform(xv), yv)
    assert acc > 5.0 / splits.num_classes


def test_labelled_demo_digits(tmp_path):
    from sklearn.datasets import load_digits

    root = write_labelled_demo(tmp_path / "d", kind="digits", n_train_per_class=5, n_val_per_class=2, size=16)
    splits = build_labelled_splits(root)
    assert splits.classes == [str(i) for i in range(10)]
    assert len(splits.train) == 50 and len(splits.val) == 20
    img = np.asarray(load_rgb(splits.val.samples[0][0]))
    assert img.shape == (16, 16, 3)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    # each file is one sklearn digit of its class, upsampled: downsampling brings back the 8x8 digit
    digits = load_digits()
    small = cv2.resize(img[..., 0].astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) * 16 / 255
    dists = np.abs(digits.images - small).mean(axis=(1, 2))
    assert digits.target[dists.argmin()] == 0 and dists.min() < 1.0
    with pytest.raises(ValueError, match="kind"):
        write_labelled_demo(tmp_path / "x", kind="faces")


# ----------------------------------------------------------------------------- transforms
def _keypoint_mapper():
    from kamim.keypoints import KeypointMapper

    return KeypointMapper("fast", "ring")


def _mask_generator(*args, **kwargs):
    from kamim.masking import MaskGenerator

    return MaskGenerator(*args, **kwargs)


def _reference_crop(img: Image.Image, size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """The crop + flip a MIMTransform must draw first from the torch RNG, built independently."""
    aug = v2.Compose([v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True),
                      v2.RandomHorizontalFlip(0.5)])
    return np.asarray(aug(img))


def test_mim_transform_paper_geometry(photos):
    mg = _mask_generator(input_size=192, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6)
    kp = _keypoint_mapper()
    t = MIMTransform(192, mask_generator=mg, keypoints=kp, weight_patch_size=8)
    img = Image.fromarray(photos["astronaut"])
    torch.manual_seed(123)
    out = t(img)
    assert set(out) == {"image", "mask", "density"}
    assert out["image"].shape == (3, 192, 192) and out["image"].dtype == torch.float32
    assert type(out["image"]) is torch.Tensor
    assert out["mask"].shape == (12, 12) and out["mask"].dtype == torch.uint8
    assert int(out["mask"].sum()) == 22 * 4  # ceil(0.6 * 36) mask blocks of 2x2 tokens
    assert out["density"].shape == (24, 24) and out["density"].dtype == torch.float16

    # independent replay of the contract: crop+flip, then one torch draw seeds the mask rng
    torch.manual_seed(123)
    crop = _reference_crop(img, 192)
    mask = mg(np.random.default_rng(int(torch.randint(0, 2**62, ()))))
    np.testing.assert_array_equal(out["mask"].numpy(), mask)
    density = kp.density(crop, 8)
    np.testing.assert_array_equal(out["density"].float().numpy(), density)  # fp16 exact for k/64
    assert 0.05 < density.mean() < 0.9
    mean, std = np.array(IMAGENET_DEFAULT_MEAN), np.array(IMAGENET_DEFAULT_STD)
    expected = ((crop / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-5)


def test_mim_transform_other_geometry_and_small_images(photos):
    kp = _keypoint_mapper()
    mg = _mask_generator(input_size=96, mask_patch_size=16, model_patch_size=8, mask_ratio=0.5)
    t = MIMTransform(96, crop_scale=(0.2, 1.0), mask_generator=mg, keypoints=kp, weight_patch_size=16)
    tiny = photos["coffee"][::40, ::40]  # 10 x 15, smaller than the crop
    out = t(tiny)
    assert out["image"].shape == (3, 96, 96) and out["mask"].shape == (12, 12)
    assert out["density"].shape == (6, 6)
    assert abs(float(out["mask"].float().mean()) - 0.5) < 1e-6

    rect = MIMTransform((64, 96), keypoints=kp, weight_patch_size=32)
    img = Image.fromarray(photos["rocket"])
    torch.manual_seed(5)
    out = rect(img)
    assert set(out) == {"image", "density"}
    assert out["image"].shape == (3, 64, 96) and out["density"].shape == (2, 3)
    torch.manual_seed(5)
    np.testing.assert_array_equal(out["density"].float().numpy(), kp.density(_reference_crop(img, (64, 96)), 32))

    gray = Image.fromarray(photos["astronaut"][..., 0], mode="L")
    assert MIMTransform(32)(gray)["image"].shape == (3, 32, 32)


def test_mim_transform_validation():
    kp = _keypoint_mapper()
    with pytest.raises(ValueError, match="weight_patch_size"):
        MIMTransform(96, keypoints=kp, weight_patch_size=7)
    with pytest.raises(ValueError, match="input_size"):
        MIMTransform(128, mask_generator=_mask_generator(96, 32, 16, 0.6))
    with pytest.raises(ValueError, match="crop_scale"):
        MIMTransform(96, crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="img_size"):
        MIMTransform(0)
    with pytest.raises(TypeError, match="PIL image"):
        MIMTransform(32)("not an image")


def test_mim_transform_deterministic_under_torch_seed(photos):
    t = MIMTransform(64, mask_generator=_mask_generator(64, 16, 8, 0.6), keypoints=_keypoint_mapper())
    t = pickle.loads(pickle.dumps(t))  # as shipped to DataLoader workers
    img = Image.fromarray(photos["chelsea"])
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        np.random.seed(seed + 100)  # the numpy global RNG must play no part
        outs.append(t(img))
    for k in ("image", "mask", "density"):
        assert torch.equal(outs[0][k], outs[1][k]), k
    assert not torch.equal(outs[0]["image"], outs[2]["image"])


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, img, transform, n):
        self.img, self.transform, self.n = img, transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(self.img)


def test_masks_differ_per_worker_and_reproduce(photos):
    t = MIMTransform(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0,
                     mask_generator=_mask_generator(32, 4, 4, 0.5))
    ds = _Repeat(Image.fromarray(_rgb(photos, size=32)), t, 8)

    def masks():
        torch.manual_seed(0)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
        return torch.cat([b["mask"] for b in loader]).flatten(1)

    first, again = masks(), masks()
    assert torch.equal(first, again)  # reproducible under torch.manual_seed
    assert len({tuple(m.tolist()) for m in first}) == 8  # every sample (both workers) differs
    assert torch.equal(ds[0]["image"], ds[1]["image"])  # full-frame crop, no flip: only masks vary


def test_two_view_transform(photos):
    t = TwoViewTransform(48)
    img = Image.fromarray(photos["coffee"])
    torch.manual_seed(0)
    out = t(img)
    assert set(out) == {"view1", "view2"}
    assert out["view1"].shape == out["view2"].shape == (3, 48, 48)
    assert out["view1"].dtype == torch.float32
    assert not torch.equal(out["view1"], out["view2"])
    torch.manual_seed(0)
    again = t(img)
    assert torch.equal(out["view1"], again["view1"]) and torch.equal(out["view2"], again["view2"])
    # no augmentation at all except a full-frame crop: both views equal the normalised resize
    plain = TwoViewTransform(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0,
                             grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0), hflip=0.0)
    out = plain(Image.fromarray(_rgb(photos, "coffee", 32)))
    assert torch.equal(out["view1"], out["view2"])


def test_eval_transform(photos):
    t = EvalTransform(56, resize_ratio=0.875)
    assert t.resize_size == 64
    img = Image.fromarray(photos["rocket"])  # 640 x 427
    a = t(img)["image"]
    torch.manual_seed(1)
    b = t(img)["image"]
    assert a.shape == (3, 56, 56) and torch.equal(a, b)
    # independent: short side to 64 (long side truncated, as torchvision), bicubic, centre crop 56
    small = img.resize((int(64 * 640 / 427), 64), Image.BICUBIC)
    left, top = int(round((small.width - 56) / 2)), (64 - 56) // 2
    ref = np.asarray(small.crop((left, top, left + 56, top + 56))) / 255.0
    ref = (ref - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    np.testing.assert_allclose(a.numpy().transpose(1, 2, 0), ref, atol=1e-5)
