"""A command's inputs, and what can be refused about them and its ``--out`` before torch is imported.

Evaluation commands (``linprobe``, ``finetune``, ``knn``, ``reconstruct``) call :func:`preflight` on
their validated config, so a missing ``--data`` folder, a checkpoint path that does not exist or an
``--out`` the output rule refuses costs a fraction of a second, not a torch start-up. The engines
apply the same checks again (the Python API has no CLI in front of it); the messages are made here
once. Names that are not paths (``demo-photos``, ``NAME:ROOT`` torchvision datasets, manifest and
timm model names) are left to the loaders. Standard library only.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kamim import outputs

__all__ = ["CHECKPOINT_SUFFIXES", "DATA_NAMES", "looks_like_path", "missing_data_folder", "run_inputs",
           "check_output_dir", "preflight"]

#: file endings of checkpoints: a source ending so is a path, never a model name
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".tar", ".ckpt", ".pkl")
#: --data values that name generated data rather than a folder
DATA_NAMES = ("demo", "demo-photos", "demo-digits")


def looks_like_path(source: str | os.PathLike) -> bool:
    """Whether a checkpoint source names a file or folder (a separator or a checkpoint file ending)
    rather than a manifest or timm model name, which may contain dots (``vit_base_patch16_224.mae``)."""
    text = os.fspath(source)
    return "/" in text or os.sep in text or Path(text).suffix.lower() in CHECKPOINT_SUFFIXES


def missing_data_folder(path: str | os.PathLike, labelled: bool) -> FileNotFoundError:
    """The error for a ``--data`` folder that does not exist."""
    if labelled:
        return FileNotFoundError(f"labelled data folder not found: '{path}' (expected train/ and val/ inside)")
    return FileNotFoundError(f"image folder not found: '{path}'")


def run_inputs(cfg: Any) -> dict[str, Any]:
    """The input paths of an evaluation config (its data, its checkpoint or checkpoints) for the output
    rule; an in-memory model, or a name that is no path (timm, manifest), is skipped there."""
    inputs: dict[str, Any] = {"--data folder": cfg.data}
    sources = getattr(cfg, "checkpoints", None)
    if sources is None:
        sources = [getattr(cfg, "checkpoint", None)]
    elif isinstance(sources, Mapping):
        sources = list(sources.values())
    elif isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for i, source in enumerate(sources):
        if not isinstance(source, (str, os.PathLike)):
            continue
        text = str(source)
        _, sep, path = text.partition("=")  # NAME=PATH of reconstruct
        inputs[f"checkpoint {i + 1}" if len(sources) > 1 else "checkpoint"] = \
            path if sep and not Path(text).exists() else text
    return inputs


def check_output_dir(path: str | os.PathLike, task: str, overwrite: bool = False,
                     inputs: Mapping[str, Any] | None = None) -> Path:
    """``path`` as a Path if ``kamim TASK`` may write into it (:func:`kamim.outputs.check_output_dir`:
    new, empty or an earlier ``kamim TASK`` output, whose results file ``TASK.json`` also marks it;
    not one of the ``inputs`` paths, nor inside or around one)."""
    return outputs.check_output_dir(path, f"kamim {task}", overwrite=overwrite, legacy=(f"{task}.json",),
                                    inputs=inputs)


def preflight(cfg: Any, task: str) -> Path:
    """Refuse, without importing torch, the ``--out`` of an evaluation config that the output rule
    refuses, a ``--data`` folder that does not exist, and a checkpoint path that does not exist;
    returns the output folder."""
    inputs = run_inputs(cfg)
    out = check_output_dir(cfg.output_dir, task, cfg.overwrite, inputs)
    data = os.fspath(cfg.data)
    if data not in DATA_NAMES and ":" not in data and not Path(data).expanduser().is_dir():
        raise missing_data_folder(Path(data).expanduser(), labelled=task != "reconstruct")
    for name, source in inputs.items():
        if name.startswith("checkpoint") and looks_like_path(source) and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"checkpoint not found: '{source}'")
    return out
