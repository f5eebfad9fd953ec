"""Data: robust image loading, datasets, offline demo data and pretraining transforms."""
from .datasets import (
    TORCHVISION_DATASETS,
    CorruptImageWarning,
    ImageFolderDataset,
    LabelledSplit,
    TorchvisionDataset,
    build_dataset,
    build_labelled_splits,
    collate_skip_bad,
    data_loader,
    loader_workers,
)
from .demo import demo_photographs, kamim_data_dir, write_demo_folder, write_labelled_demo
from .images import IMG_EXTENSIONS, ImageLoadError, ensure_rgb, find_images, load_rgb
from .transforms import EvalTransform, MIMTransform, TwoViewTransform, to_pil_rgb

__all__ = [
    "IMG_EXTENSIONS",
    "TORCHVISION_DATASETS",
    "CorruptImageWarning",
    "EvalTransform",
    "ImageFolderDataset",
    "ImageLoadError",
    "LabelledSplit",
    "MIMTransform",
    "TorchvisionDataset",
    "TwoViewTransform",
    "build_dataset",
    "build_labelled_splits",
    "collate_skip_bad",
    "data_loader",
    "demo_photographs",
    "ensure_rgb",
    "find_images",
    "kamim_data_dir",
    "load_rgb",
    "loader_workers",
    "to_pil_rgb",
    "write_demo_folder",
    "write_labelled_demo",
]
