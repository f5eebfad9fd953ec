"""Datasets over image folders, local torchvision datasets and the offline demo data.

Every dataset here yields ``dict`` samples: ``transform(PIL RGB image)`` (a dict, e.g. from
`kamim.data.transforms`; a non-dict result is stored under ``"image"``) plus ``"label"`` (int,
-1 for unlabelled folders). Unreadable files are skipped, not fatal: the sample comes back as
``None`` with a `CorruptImageWarning` naming the file, and `collate_skip_bad` drops it and counts
it in ``batch["num_skipped"]`` so the training loop can report skips across worker processes.
"""
from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .images import ImageLoadError, ensure_rgb, find_images, load_rgb

__all__ = [
    "TORCHVISION_DATASETS",
    "CorruptImageWarning",
    "ImageFolderDataset",
    "LabelledSplit",
    "TorchvisionDataset",
    "build_dataset",
    "build_labelled_splits",
    "collate_skip_bad",
    "data_loader",
    "loader_workers",
]

Transform = Callable[[Image.Image], Any]


_warned_workers: set[tuple[int, int]] = set()


#: loader workers per process when none are asked for (fewer where fewer CPUs are available)
DEFAULT_LOADER_WORKERS = 4


def loader_workers(requested: int | None) -> int:
    """DataLoader workers for a request of ``requested``: at most the CPUs this process may run on
    (more only oversubscribe them, and torch warns), with one logged warning per distinct clamp;
    None: ``min(4, CPUs)``, silently. Every loader kamim builds (pretraining, evaluation, analysis)
    takes its worker count from here."""
    from kamim.doctor import available_cpus

    if requested is None:
        return min(DEFAULT_LOADER_WORKERS, available_cpus())
    requested = int(requested)
    if requested < 0:
        raise ValueError(f"num_workers must be >= 0, got {requested}")
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _warned_workers:
        _warned_workers.add((requested, cpus))
        logging.getLogger("kamim").warning("%d loader workers asked for, but only %d CPUs are available: using %d",
                                           requested, cpus, cpus)
    return cpus


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and its sample was skipped."""


def _as_sample(out: Any) -> dict:
    return dict(out) if isinstance(out, Mapping) else {"image": out}


class ImageFolderDataset(Dataset):
    """Images in class subfolders (``root/<class>/**/*.jpg``) or in a flat folder.

    Class layout: labels index the sorted subfolder names, as in torchvision's ``ImageFolder``;
    pass ``class_to_idx`` to impose another mapping (e.g. a val split mapped onto train's
    classes; subfolders missing from it are an error). Flat layout: every image under ``root``
    (recursively), label -1. ``layout="auto"`` picks flat when ``root`` itself holds images and
    classes when only its subfolders do; both at once is an error. Subfolders without images are
    ignored.

    ``strict=False``: an unreadable file yields ``None`` plus a `CorruptImageWarning` naming it
    (use `collate_skip_bad`); entries that are not readable regular files at listing time
    (dangling symlinks, FIFOs, unreadable sub-folders) are left out with one warning
    (`find_images`). ``strict=True``: `ImageLoadError` naming the file, at listing or at loading.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        strict: bool = False,
        layout: Literal["auto", "classes", "flat"] = "auto",
        class_to_idx: Mapping[str, int] | None = None,
    ) -> None:
        if layout not in ("auto", "classes", "flat"):
            raise ValueError(f"layout must be 'auto', 'classes' or 'flat', got {layout!r}")
        self.root = Path(root).expanduser()
        self.transform = transform
        self.strict = strict
        files = find_images(self.root, strict=strict)  # raises for a missing folder / no images
        top_level = [p for p in files if p.parent == self.root]
        if layout == "auto":
            if top_level and len(top_level) != len(files):
                subdirs = sorted({p.relative_to(self.root).parts[0] for p in files if p.parent != self.root})
                raise ValueError(
                    f"'{self.root}' mixes {len(top_level)} top-level images (e.g. '{top_level[0].name}') "
                    f"with image sub-folders {subdirs[:5]}, so it is neither one class folder per class "
                    f"nor a flat folder: move the top-level images into a class folder (or the "
                    f"sub-folders out), or point --data at a folder that holds only class folders "
                    f"(Python API: ImageFolderDataset(..., layout='flat' or 'classes'))"
                )
            layout = "flat" if top_level else "classes"
        self.layout = layout
        if layout == "flat":
            if class_to_idx is not None:
                raise ValueError("class_to_idx only applies to layout='classes'")
            self.classes: list[str] = []
            self.class_to_idx: dict[str, int] = {}
            self.samples: list[tuple[Path, int]] = [(p, -1) for p in files]
        else:
            by_class: dict[str, list[Path]] = {}
            for p in files:
                if p.parent != self.root:  # torchvision ImageFolder also ignores top-level files
                    by_class.setdefault(p.relative_to(self.root).parts[0], []).append(p)
            if not by_class:
                raise FileNotFoundError(f"no class subfolders with images under '{self.root}'")
            found = sorted(by_class)
            if class_to_idx is None:
                class_to_idx = {c: i for i, c in enumerate(found)}
            else:
                unknown = [c for c in found if c not in class_to_idx]
                if unknown:
                    raise ValueError(f"classes {unknown} in '{self.root}' are not in the given class_to_idx")
            self.class_to_idx = dict(class_to_idx)
            self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
            self.samples = [(p, self.class_to_idx[c]) for c in found for p in by_class[c]]
        self.targets = [t for _, t in self.samples]

    @property
    def labelled(self) -> bool:
        return self.layout == "classes"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except ImageLoadError as err:
            if self.strict:
                raise
            warnings.warn(f"skipping unreadable image: {err}", CorruptImageWarning, stacklevel=2)
            return None
        sample = _as_sample(self.transform(img) if self.transform is not None else img)
        sample["label"] = label
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root='{self.root}', layout={self.layout}, "
                f"samples={len(self)}, classes={len(self.classes)})")


def collate_skip_bad(batch: Sequence[Mapping | None]) -> dict:
    """`default_collate` for dict samples that drops ``None`` (unreadable) entries.

    Adds ``num_skipped`` (int64 scalar tensor). If every sample of the batch was unreadable the
    result holds only ``num_skipped``; training loops should skip such a batch.
    """
    good = [b for b in batch if b is not None]
    if any(not isinstance(b, Mapping) for b in good):
        bad = next(type(b).__name__ for b in good if not isinstance(b, Mapping))
        raise TypeError(f"collate_skip_bad expects dict samples (or None), got {bad}")
    out = dict(default_collate(good)) if good else {}
    out["num_skipped"] = torch.tensor(len(batch) - len(good), dtype=torch.int64)
    return out


def _leave_stop_signals_to_main(_worker_id: int) -> None:
    """Loader workers ignore SIGINT and SIGTERM: a scheduler (SLURM) or a Ctrl-C signals the whole
    process group, and the main process stops the run (finishing its step and saving), then shuts the
    workers down; a worker killed by the signal would instead fail the loader mid-step."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def data_loader(dataset: Dataset, *, workers: int | None, persistent: bool = False, **kwargs: Any) -> DataLoader:
    """The ``DataLoader`` every kamim loader is (pretraining, evaluation, analysis): ``workers`` through
    :func:`loader_workers`, :func:`collate_skip_bad` unless ``collate_fn`` is given, workers that
    leave stop signals to the main process, ``persistent`` workers when there are any; other
    ``kwargs`` go to ``DataLoader`` (``batch_size``, ``batch_sampler``, ``generator``, ...)."""
    num_workers = loader_workers(workers)
    kwargs.setdefault("collate_fn", collate_skip_bad)
    return DataLoader(dataset, num_workers=num_workers, persistent_workers=persistent and num_workers > 0,
                      worker_init_fn=_leave_stop_signals_to_main if num_workers else None, **kwargs)


# --------------------------------------------------------------------------- torchvision datasets

@dataclass(frozen=True)
class _TVSpec:
    cls_name: str
    layout: str  # what build_dataset expects under ROOT, for the error message
    split_arg: str  # "train" (train=True/False) or "split"
    splits: Mapping[str, Any]  # kamim split name -> torchvision argument value
    files: bool = False  # one image file per sample: decoded with `load_rgb` (bad files skipped)


TORCHVISION_DATASETS: dict[str, _TVSpec] = {
    "cifar10": _TVSpec("CIFAR10", "ROOT/cifar-10-batches-py/", "train", {"train": True, "val": False, "test": False}),
    "cifar100": _TVSpec("CIFAR100", "ROOT/cifar-100-python/", "train", {"train": True, "val": False, "test": False}),
    "stl10": _TVSpec("STL10", "ROOT/stl10_binary/", "split",
                     {"train": "train", "val": "test", "test": "test", "unlabeled": "unlabeled",
                      "train+unlabeled": "train+unlabeled"}),
    "imagenet": _TVSpec("ImageNet", "ROOT/ILSVRC2012_devkit_t12.tar.gz (or meta.bin) and ROOT/train/, ROOT/val/",
                        "split", {"train": "train", "val": "val"}, files=True),
    "imagenette": _TVSpec("Imagenette", "ROOT/imagenette2/ (size='full')", "split", {"train": "train", "val": "val"},
                          files=True),
    "svhn": _TVSpec("SVHN", "ROOT/train_32x32.mat, ROOT/test_32x32.mat", "split",
                    {"train": "train", "val": "test", "test": "test", "extra": "extra"}),
    "flowers102": _TVSpec("Flowers102", "ROOT/flowers-102/", "split", {"train": "train", "val": "val", "test": "test"},
                          files=True),
    "food101": _TVSpec("Food101", "ROOT/food-101/", "split", {"train": "train", "val": "test", "test": "test"},
                       files=True),
    "pets": _TVSpec("OxfordIIITPet", "ROOT/oxford-iiit-pet/", "split",
                    {"train": "trainval", "val": "test", "test": "test"}),
    "mnist": _TVSpec("MNIST", "ROOT/MNIST/raw/", "train", {"train": True, "val": False, "test": False}),
    "fashionmnist": _TVSpec("FashionMNIST", "ROOT/FashionMNIST/raw/", "train",
                            {"train": True, "val": False, "test": False}),
}


class TorchvisionDataset(Dataset):
    """A local torchvision classification dataset (``download=False``) yielding kamim dict samples.

    Images are converted to RGB (`ensure_rgb`) before ``transform``; ``"label"`` is the target.
    File-backed datasets (imagenet, imagenette, flowers102, food101) decode with `load_rgb`, so an
    unreadable file is skipped (``None`` + `CorruptImageWarning`) or, with ``strict``, raised.
    """

    def __init__(self, name: str, root: str | os.PathLike, split: str = "train",
                 transform: Transform | None = None, strict: bool = False) -> None:
        import torchvision.datasets as tvd

        key = name.lower()
        if key not in TORCHVISION_DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known: {sorted(TORCHVISION_DATASETS)}")
        spec = TORCHVISION_DATASETS[key]
        if split not in spec.splits:
            raise ValueError(f"{key} has no split {split!r}; choose one of {sorted(spec.splits)}")
        self.name, self.split, self.transform, self.strict = key, split, transform, strict
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{key}: dataset folder not found: '{self.root}' (expected {spec.layout})")
        kwargs: dict[str, Any] = {spec.split_arg: spec.splits[split]}
        if key != "imagenet":  # torchvision's ImageNet has no download argument
            kwargs["download"] = False
        if spec.files:
            kwargs["loader"] = load_rgb
        try:
            self.dataset = getattr(tvd, spec.cls_name)(str(self.root), **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FileNotFoundError(
                f"{key} ({split}) not found under '{self.root}': expected {spec.layout}; "
                f"kamim never downloads ({first})"
            ) from None
        classes = getattr(self.dataset, "classes", None)
        # ImageNet / Imagenette list synonyms per class: keep the first name
        self.classes = [c[0] if isinstance(c, (tuple, list)) else str(c) for c in classes] if classes else []

    @property
    def labelled(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        try:
            img, target = self.dataset[index]
        except ImageLoadError as err:
            if self.strict:
                raise
            warnings.warn(f"skipping unreadable image: {err}", CorruptImageWarning, stacklevel=2)
            return None
        if not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        img = ensure_rgb(img)
        sample = _as_sample(self.transform(img) if self.transform is not None else img)
        sample["label"] = int(target) if target is not None else -1
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, split={self.split}, root='{self.root}', samples={len(self)})"


_DEMO_LABELLED = {"demo-photos": "photo-crops", "demo-digits": "digits"}


def _labelled_demo_root(text: str) -> Path | None:
    """``"demo-photos"`` / ``"demo-digits"`` -> the materialised labelled demo folder, else None."""
    if text not in _DEMO_LABELLED:
        return None
    from .demo import kamim_data_dir, write_labelled_demo

    kind = _DEMO_LABELLED[text]
    return write_labelled_demo(kamim_data_dir() / f"demo-{kind}", kind=kind)


def _parse_spec(spec: str | os.PathLike) -> tuple[str | None, str]:
    """``"NAME:ROOT"`` with a known NAME -> (name, root); anything else is a folder path."""
    text = os.fspath(spec)
    name, sep, rest = text.partition(":")
    if sep and name.lower() in TORCHVISION_DATASETS:
        if not rest:
            raise ValueError(f"dataset spec {text!r} has no root folder after ':' (expected NAME:ROOT)")
        return name.lower(), rest
    return None, text


def build_dataset(spec: str | os.PathLike, transform: Transform | None = None, strict: bool = False,
                  split: str = "train") -> Dataset:
    """Dataset from a spec string.

    * ``"demo"``: the offline demo folder (`kamim.data.demo.write_demo_folder`), materialised on
      first use under ``kamim_data_dir()/demo`` (``$KAMIM_DATA_DIR`` or ``~/.cache/kamim``);
    * ``"NAME:ROOT"`` with NAME in `TORCHVISION_DATASETS` (cifar10, cifar100, stl10, imagenet,
      imagenette, svhn, flowers102, food101, pets, mnist, fashionmnist): the local torchvision
      dataset, ``download=False``, split ``split``;
    * ``"demo-photos"`` / ``"demo-digits"``: split ``split`` of the labelled demo
      (`kamim.data.demo.write_labelled_demo` defaults);
    * anything else: an image folder (`ImageFolderDataset`, class subfolders or flat). A folder
      holding both ``train/`` and ``val/`` is read at ``ROOT/split`` (so a val split never leaks
      into pretraining as a "class").
    """
    text = os.fspath(spec)
    if text == "demo":
        from .demo import kamim_data_dir, write_demo_folder

        return ImageFolderDataset(write_demo_folder(kamim_data_dir() / "demo"), transform, strict=strict)
    text = os.fspath(_labelled_demo_root(text) or text)
    name, root = _parse_spec(text)
    if name is not None:
        return TorchvisionDataset(name, root, split=split, transform=transform, strict=strict)
    folder = Path(root).expanduser()
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        if split not in ("train", "val"):
            raise ValueError(f"'{folder}' has train/ and val/ splits; split must be 'train' or 'val', got {split!r}")
        folder = folder / split
    return ImageFolderDataset(folder, transform, strict=strict)


@dataclass
class LabelledSplit:
    """Train and val datasets sharing one class index."""

    train: Dataset
    val: Dataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)




def build_labelled_splits(root: str | os.PathLike, train_transform: Transform | None = None,
                          val_transform: Transform | None = None, strict: bool = False) -> LabelledSplit:
    """Train/val datasets for probing and finetuning.

    ``root`` is a folder with ``train/`` and ``val/`` class subfolders (val classes are mapped
    onto train's class index; a val class absent from train is an error naming it), a
    ``"NAME:ROOT"`` torchvision spec (train split + val split, which is "test" where the dataset
    has no val), or ``"demo-photos"`` / ``"demo-digits"`` (`write_labelled_demo` with its
    defaults under ``kamim_data_dir()``).
    """
    text = os.fspath(root)
    text = os.fspath(_labelled_demo_root(text) or text)
    name, folder = _parse_spec(text)
    if name is not None:
        train = TorchvisionDataset(name, folder, "train", train_transform, strict)
        val = TorchvisionDataset(name, folder, "val", val_transform, strict)
        return LabelledSplit(train, val, train.classes)
    base = Path(folder).expanduser()
    if not base.is_dir():
        from kamim.inputs import missing_data_folder

        raise missing_data_folder(base, labelled=True)
    for sub in ("train", "val"):
        if not (base / sub).is_dir():
            raise FileNotFoundError(f"'{base}' has no {sub}/ subfolder (expected train/ and val/ class folders)")
    train = ImageFolderDataset(base / "train", train_transform, strict=strict, layout="classes")
    val_classes = sorted(d.name for d in (base / "val").iterdir() if d.is_dir() and not d.name.startswith("."))
    missing = [c for c in val_classes if c not in train.class_to_idx]
    if missing:
        raise ValueError(f"val classes {missing} under '{base / 'val'}' have no train/ folder in '{base / 'train'}'")
    val = ImageFolderDataset(base / "val", val_transform, strict=strict, layout="classes",
                             class_to_idx=train.class_to_idx)
    return LabelledSplit(train, val, train.classes)

