"""Evaluation of pretrained encoders: features of any layer, linear probing (every layer in one
pass), finetuning, weighted k-NN and SimMIM/KAMIM reconstruction quality (PSNR/SSIM)."""
from kamim.eval.features import (
    default_layer, extract_dataset_features, extract_features, feature_dims, num_layers, resolve_layers,
)
from kamim.eval.finetune import FinetuneConfig, finetune
from kamim.eval.knn import KNNConfig, knn_evaluate, run_knn
from kamim.eval.linprobe import LinprobeConfig, linear_probe
from kamim.eval.reconstruct import ReconstructConfig, evaluate_reconstruction, psnr, run_reconstruct, ssim

__all__ = [
    "FinetuneConfig",
    "KNNConfig",
    "LinprobeConfig",
    "ReconstructConfig",
    "default_layer",
    "evaluate_reconstruction",
    "extract_dataset_features",
    "extract_features",
    "feature_dims",
    "finetune",
    "knn_evaluate",
    "linear_probe",
    "num_layers",
    "psnr",
    "resolve_layers",
    "run_knn",
    "run_reconstruct",
    "ssim",
]
