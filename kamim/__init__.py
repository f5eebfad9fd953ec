"""KAMIM: Keypoint Aware Masked Image Modelling.

The public surface: every name in ``__all__`` is importable as ``from kamim import NAME`` and stays
there when modules move. Names are imported on first use (PEP 562), so ``import kamim`` (and
``kamim --help``) does not import torch.
"""
from __future__ import annotations

from kamim.lazy import lazy_exports

__version__ = "0.1.0"

# submodule -> the public names it defines
_MODULES: dict[str, tuple[str, ...]] = {
    # the method
    "kamim.keypoints": ("keypoint_map", "detect_keypoints", "KeypointMapper", "DETECTORS", "RENDERS"),
    "kamim.weights": ("patch_density", "weights_from_density", "patch_weights"),
    "kamim.loss": ("reconstruction_loss",),
    "kamim.masking": ("MaskGenerator",),
    # models and checkpoints
    "kamim.models": ("create_pretrain_model", "create_encoder", "arch_of"),
    "kamim.checkpoints": ("load_encoder", "LoadedEncoder"),
    "kamim.backbone": ("Geometry", "ViTGeometry", "SwinGeometry", "model_geometry"),
    "kamim.inputs": ("looks_like_path",),
    # data
    "kamim.data": ("EvalTransform", "ImageFolderDataset", "build_dataset", "collate_skip_bad", "data_loader",
                   "find_images", "loader_workers"),
    "kamim.data.demo": ("kamim_data_dir", "demo_photographs", "write_demo_folder", "write_labelled_demo"),
    # configuration and the machine
    "kamim.config": ("Config", "load_config"),
    "kamim.doctor": ("available_memory",),
    # training and evaluation
    "kamim.engine.pretrain": ("pretrain",),
    "kamim.eval.linprobe": ("linear_probe",),
    "kamim.eval.finetune": ("finetune",),
    "kamim.eval.knn": ("knn_evaluate", "run_knn"),
    "kamim.eval.reconstruct": ("MaskedImages", "evaluate_reconstruction", "load_pretrain_model",
                               "plot_reconstructions", "run_reconstruct"),
    "kamim.experiments.sweep": ("sweep",),
}
_WHERE = {name: mod for mod, names in _MODULES.items() for name in names}

__all__ = [  # literal, so that tools read it without importing (a test keeps it equal to _MODULES)
    "__version__", "keypoint_map", "detect_keypoints", "KeypointMapper", "DETECTORS", "RENDERS", "patch_density",
    "weights_from_density", "patch_weights", "reconstruction_loss", "MaskGenerator", "create_pretrain_model",
    "create_encoder", "arch_of", "load_encoder", "LoadedEncoder", "Geometry", "ViTGeometry", "SwinGeometry", "model_geometry",
    "looks_like_path", "EvalTransform", "ImageFolderDataset",
    "build_dataset", "collate_skip_bad", "data_loader", "find_images", "loader_workers", "kamim_data_dir", "demo_photographs",
    "write_demo_folder", "write_labelled_demo", "Config", "load_config", "available_memory", "pretrain", "linear_probe",
    "finetune", "knn_evaluate", "run_knn", "MaskedImages", "evaluate_reconstruction", "load_pretrain_model",
    "plot_reconstructions", "run_reconstruct", "sweep",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals(), __all__)
