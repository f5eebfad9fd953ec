"""``load_encoder``: load any encoder checkpoint people compare with into a timm model.

Sources (:func:`resolve_source`): a checkpoint file (``.pt``, ``.pth``, ``.pth.tar``, ``.bin``,
``.safetensors``; the container is sniffed from the bytes, not the suffix), a Hugging Face
``save_pretrained`` directory (``config.json`` + ``model.safetensors``/``pytorch_model.bin``), a name from
``checkpoints/manifest.yaml`` (resolving to a local file under the checkpoint directory,
``$KAMIM_CHECKPOINT_DIR`` or the repository's ``checkpoints/``), or a timm model name, which is
created with ``pretrained=False``: nothing is ever downloaded.

Formats (:data:`FORMATS`) are detected from the keys, converted to timm names (:mod:`kamim.convert`) and
loaded with every key accounted for: keys the model lacks and the checkpoint has ("unexpected") or the
other way round ("missing") fail the load with a message listing them, unless they are known extras of
the format (MIM decoders, mask tokens, projectors, predictors, momentum encoders, DINO heads, poolers,
classifier heads: the returned model has ``num_classes=0``) or named by ``allow_extra``. Everything set
aside is listed by category in :attr:`LoadedEncoder.report`.

Pickles are read only with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which MAE and
DINO store their arguments in, is allow-listed: it only sets attributes); safetensors need no pickle.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import timm
import torch
import yaml
from timm.layers import resample_abs_pos_embed
from timm.models import clean_state_dict
from torch import nn

from kamim.backbone import Geometry, model_geometry, to_hw
from kamim.config import FETCHING_TIMM_KWARGS, MAX_IMAGE_SIDE
from kamim.convert import Conversion, ConversionError
from kamim.convert.hf import convert_hf_swin, convert_hf_vit, is_hf_swin, is_hf_vit
from kamim.convert.layouts import (
    convert_dino, convert_mae, convert_moco_v3, convert_timm_vit, is_dino, is_mae, is_moco_v3, is_timm_vit,
)
from kamim.serialization import CheckpointError, load_safetensors, read_safetensors_metadata, safe_load

__all__ = [
    "FORMATS", "MANIFEST_PATH", "CHECKPOINT_DIR_ENV", "CheckpointError", "LoadedEncoder", "ResolvedSource",
    "load_encoder", "encoder_from_module", "resolve_encoder", "resolve_source", "load_manifest", "read_checkpoint", "convert_checkpoint", "sha256_file",
    "check_run_export", "check_export",
]

#: Formats :func:`load_encoder` detects, with what identifies them.
FORMATS: dict[str, str] = {
    "kamim-pretrain": "this project's training checkpoint (torch dict, format='kamim-pretrain', encoder weights "
                      "under 'encoder.' or 'backbone.encoder.' of the wrapper's state dict)",
    "kamim-encoder": "this project's encoder export (safetensors with format='kamim-encoder' metadata)",
    "hf-vit": "Hugging Face ViTForMaskedImageModeling/ViTModel state dict (KAMIM/SimMIM reference release)",
    "hf-swin": "Hugging Face SwinForMaskedImageModeling/SwinModel state dict",
    "moco-v3": "MoCo v3 checkpoint ('state_dict' -> module.base_encoder.*)",
    "mae": "MAE/DeiT layout: timm ViT keys under 'model' (mask_token, decoder_* extras)",
    "dino": "DINO full checkpoint ('teacher'/'student' -> backbone.*)",
    "timm-vit": "plain timm VisionTransformer state dict (geometry inferred from shapes)",
    "timm": "plain state dict of the timm model named by model_name=",
    "timm-name": "a timm model name: random initialisation (pretrained=False)",
}

#: The manifest of public checkpoints shipped with the repository.
MANIFEST_PATH = Path(__file__).resolve().parents[1] / "checkpoints" / "manifest.yaml"
#: Environment variable overriding the directory the manifest's files live in.
CHECKPOINT_DIR_ENV = "KAMIM_CHECKPOINT_DIR"

# Containers a state dict is found under, in order (DINO: the teacher is the evaluated network).
_CONTAINERS = ("model_state_dict", "state_dict", "model", "teacher", "student", "module")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_RUN_FILES = ("encoder.safetensors", "checkpoint-last.pt")  # what `kamim pretrain` writes
_CLASSIFIER = ("head", "head_dist")  # timm classifier heads: dropped since the encoder has num_classes=0

_Converter = Callable[..., Conversion]
_LAYOUTS: tuple[tuple[str, Callable[[Mapping[str, Any], str | None], bool], _Converter], ...] = (
    ("moco-v3", is_moco_v3, convert_moco_v3),
    ("dino", is_dino, convert_dino),
    ("hf-swin", is_hf_swin, convert_hf_swin),
    ("hf-vit", is_hf_vit, convert_hf_vit),
    ("mae", is_mae, convert_mae),
    ("timm-vit", is_timm_vit, convert_timm_vit),
)


@dataclass
class LoadedEncoder:
    """A timm encoder loaded from a checkpoint (or wrapped from memory: :func:`encoder_from_module`).

    Attributes:
        model: the timm model, ``eval()`` mode, ``num_classes=0``, on the requested device.
        format: detected format (a key of :data:`FORMATS`, or ``"module"`` for an in-memory model).
        source: the file loaded (or the timm model name, or the in-memory model's class name).
        sha256: hex digest of the file (None for a timm model name or an in-memory model).
        report: what happened: ``loaded`` (tensors loaded), ``converted`` (source tensors renamed/fused),
            ``ignored`` ({category: [keys]} set aside), ``missing``/``unexpected`` (tolerated with
            ``strict=False`` only), ``resampled``, ``verified_buffers``, ``notes``, ...
        spec: ``{"model_name", "kwargs"}`` recreating the architecture with ``timm.create_model``
            (kwargs may hold a ``norm_layer`` callable, e.g. for Hugging Face eps 1e-12).
        method: pretraining method recorded in the checkpoint (this project's formats), else None.
        geometry: :func:`kamim.backbone.model_geometry` of the model, read once at load (None for
            architectures other than ViT and Swin). ``image_size``, ``patch_size`` and
            ``num_prefix_tokens`` are read from it, not stored a second time.
    """

    model: nn.Module
    format: str
    source: str
    sha256: str | None
    report: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    geometry: Geometry | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the model is built for (the checkpoint's, or ``img_size`` when given at load); for an
        architecture without a geometry, the input size timm records for it."""
        if self.geometry is not None:
            return self.geometry.img_size
        size = getattr(self.model, "pretrained_cfg", {}).get("input_size", (3, 0, 0))
        return int(size[1]), int(size[2])

    @property
    def patch_size(self) -> int | tuple[int, int] | None:
        """Patch size in pixels (an int for square patches, else (h, w)); None without a geometry."""
        if self.geometry is None:
            return None
        ph, pw = self.geometry.patch_size
        return ph if ph == pw else (ph, pw)

    @property
    def num_prefix_tokens(self) -> int:
        """Class/register tokens before the patch tokens (0 for Swin)."""
        if self.geometry is not None:
            return self.geometry.num_prefix_tokens
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @classmethod
    def of(cls, model: nn.Module, format: str, source: str, sha256: str | None, report: dict[str, Any],
           spec: dict[str, Any] | None = None, method: str | None = None) -> LoadedEncoder:
        """The record of ``model``, its geometry read from the model (None: not a fixed-size ViT/Swin)."""
        try:
            geometry = model_geometry(model)
        except ValueError:
            geometry = None
        return cls(model, format, source, sha256, report, spec or {}, method, geometry)


@dataclass(frozen=True)
class ResolvedSource:
    """What a ``source`` string refers to: ``kind`` is ``"file"`` or ``"timm"``."""

    kind: str
    name: str
    path: Path | None = None
    entry: Mapping[str, Any] | None = None  # manifest entry
    hf_config: Mapping[str, Any] | None = None  # config.json of a Hugging Face directory


# --------------------------------------------------------------------------------------------- sources
def load_manifest(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Read and validate a checkpoint manifest (default :data:`MANIFEST_PATH`) -> ``{name: entry}``."""
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint manifest not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"invalid YAML in checkpoint manifest {path}: {str(e).splitlines()[0]}") from None
    entries = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"checkpoint manifest {path} needs a top-level 'checkpoints:' mapping of name -> entry")
    for name, entry in entries.items():
        required = ("source", "format", "file", "image_size")
        missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"checkpoint manifest {path}: entry '{name}' lacks {', '.join(missing)}")
        if entry["format"] not in FORMATS:
            raise ValueError(f"checkpoint manifest {path}: entry '{name}' has unknown format '{entry['format']}' "
                             f"(known: {', '.join(FORMATS)})")
    return entries


def _hf_directory(path: Path, name: str, entry: Mapping[str, Any] | None = None) -> ResolvedSource:
    weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        sharded = [f.name for f in path.glob("*.index.json")]
        why = f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""
        raise FileNotFoundError(f"directory {path} holds no {' or '.join(_WEIGHT_FILES)}{why}")
    config = None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON in {path / 'config.json'}: {e}") from None
    return ResolvedSource("file", name, weights, entry, config)


def resolve_source(
    name_or_path: str | os.PathLike[str],
    *,
    manifest: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
) -> ResolvedSource:
    """Resolve a checkpoint file, kamim run directory, Hugging Face directory, manifest name or timm name.

    Files and directories win over names. A manifest entry's ``file`` is looked up under
    ``checkpoint_dir``, else ``$KAMIM_CHECKPOINT_DIR``, else the manifest's directory; a missing file
    raises ``FileNotFoundError`` saying where to get it and where to put it.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        check_export(path)  # an export named directly is checked against the checkpoint beside it
        return ResolvedSource("file", name, path)
    if path.is_dir():
        # a kamim run directory: its encoder export, else its training checkpoint
        own = next((path / f for f in _RUN_FILES if (path / f).is_file()), None)
        if own is not None:
            check_run_export(path)
        return ResolvedSource("file", name, own) if own is not None else _hf_directory(path, name)
    manifest_path = Path(manifest) if manifest is not None else MANIFEST_PATH
    entries = load_manifest(manifest_path) if (manifest is not None or MANIFEST_PATH.is_file()) else {}
    if name in entries:
        entry = entries[name]
        root = Path(checkpoint_dir or os.environ.get(CHECKPOINT_DIR_ENV) or manifest_path.parent).expanduser()
        target = root / entry["file"]
        if target.is_dir():
            return _hf_directory(target, name, entry)
        if not target.is_file():
            raise FileNotFoundError(
                f"checkpoint '{name}' is not available locally: get it from {entry['source']} "
                f"and save it as {target}")
        return ResolvedSource("file", name, target, entry)
    if isinstance(name_or_path, str) and timm.is_model(name):
        return ResolvedSource("timm", name)
    known = ", ".join(sorted(entries)[:6]) + (", ..." if len(entries) > 6 else "")
    raise FileNotFoundError(
        f"'{name}' is not a checkpoint file, a manifest entry ({known or 'none'}) or a timm model name")


def check_run_export(run_dir: str | os.PathLike) -> None:
    """Refuse a run directory whose encoder export does not come from its last checkpoint
    (:func:`check_export` of ``RUN/encoder.safetensors``)."""
    check_export(Path(run_dir) / _RUN_FILES[0])


def check_export(export: str | os.PathLike) -> None:
    """Refuse an encoder export that does not come from the ``checkpoint-last.pt`` beside it, however
    the export is named on the command line (``RUN``, ``RUN/encoder.safetensors``, a copy renamed in
    place).

    ``kamim pretrain`` records one id in ``checkpoint-last.pt`` (``save_id``) and in the export's
    metadata (``checkpoint_id``); they differ only when a save was interrupted between the two
    writes (rerunning the pretraining command repairs the export). Exports without the id, or without
    a checkpoint beside them, are not checked. Reads the checkpoint memory-mapped: no tensor data is
    loaded.
    """
    export = Path(export)
    run, last = export.parent, export.parent / _RUN_FILES[1]
    if not (export.is_file() and last.is_file() and _is_safetensors(export)):
        return
    exported = read_safetensors_metadata(export).get("checkpoint_id")
    if not exported:
        return
    try:
        saved = torch.load(last, map_location="cpu", mmap=True, weights_only=True).get("save_id")
    except Exception as err:  # noqa: BLE001 - any failure to read means "not a readable checkpoint"
        raise CheckpointError(f"cannot read checkpoint {last}: {' '.join(str(err).split())[:200]}") from None
    if saved != exported:
        raise CheckpointError(
            f"{export} does not come from {last} (a save was interrupted): rerun the same `kamim pretrain` "
            f"command on {run} to repair the export, or load {last} instead")


# ----------------------------------------------------------------------------------------------- files
def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    # safetensors: little-endian u64 header length, then a JSON header starting with '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


@contextlib.contextmanager
def _allow_namespace() -> Iterator[None]:
    # MAE/DINO pickle their argparse arguments; Namespace only sets attributes, so it is safe to allow.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
        yield


def read_checkpoint(path: str | Path) -> tuple[Any, dict[str, str]]:
    """Read a checkpoint file -> ``(object, safetensors metadata)`` without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        return load_safetensors(path)
    with _allow_namespace():
        return safe_load(path), {}


# ------------------------------------------------------------------------------------------ conversion
def _sample(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, checkpoint_key: str | None, where: str) -> tuple[str | None, Mapping[str, torch.Tensor] | None]:
    if checkpoint_key is not None:
        if not isinstance(obj, Mapping) or checkpoint_key not in obj:
            top = _sample(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{where}: no entry '{checkpoint_key}' (top-level keys: {top})")
        if not _is_state_dict(obj[checkpoint_key]):
            raise CheckpointError(f"{where}: entry '{checkpoint_key}' is not a state dict of tensors")
        return checkpoint_key, obj[checkpoint_key]
    if _is_state_dict(obj):
        return None, obj
    if isinstance(obj, Mapping):
        for key in _CONTAINERS:
            if _is_state_dict(obj.get(key)):
                return key, obj[key]
    return None, None


# timm.create_model arguments that open a file or reach the network: never taken from a checkpoint
_FETCHING_KWARGS = FETCHING_TIMM_KWARGS


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False


def _checked_spec(name: Any, kwargs: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A model spec read from a checkpoint, as data: a locally registered timm architecture name
    (no ``hf-hub:``/``timm/`` names, which download) and plain keyword values, none of which open
    or fetch anything. One-line :class:`CheckpointError` otherwise."""
    if not isinstance(name, str) or not name or ":" in name or "/" in name or not timm.is_model(name):
        raise CheckpointError(f"{where}: model name {name!r} in the checkpoint metadata is not a timm "
                              f"architecture name (pass --model-name to choose one)")
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{where}: model kwargs in the checkpoint metadata must be a mapping, got {kwargs!r}")
    bad = sorted(str(k) for k, v in kwargs.items() if not isinstance(k, str) or k in _FETCHING_KWARGS
                 or not _is_plain(v))
    if bad:
        raise CheckpointError(f"{where}: refusing model kwargs {', '.join(bad)} from the checkpoint metadata "
                              f"(only plain architecture options are used)")
    for key, value in kwargs.items():  # sizes timm would fail on with a traceback, or allocate without bound
        rule = _SIZE_RULES.get(key)
        if rule is None:
            continue
        low, high = rule
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
                                 for v in values):
            raise CheckpointError(f"{where}: model kwarg {key}={value!r} in the checkpoint metadata is not in "
                                  f"[{low}, {high}]")
    return name, dict(kwargs)


# architecture sizes read from checkpoint metadata: each value must lie in [low, high]
_SIZE_RULES: dict[str, tuple[float, float]] = {
    "depth": (1, 1024), "depths": (1, 1024), "num_heads": (1, 4096), "embed_dim": (1, 65536),
    "patch_size": (1, 4096), "img_size": (1, MAX_IMAGE_SIDE), "mlp_ratio": (1e-3, 1024), "window_size": (1, 4096),
    "reg_tokens": (0, 4096), "in_chans": (1, 64),
}


def _spec(spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"{where}: 'encoder_spec' must be {{'model_name': str, 'kwargs': dict}}, got {spec!r}")
    return _checked_spec(spec.get("model_name"), spec.get("kwargs", {}), where)


def _native_img(kwargs: Mapping[str, Any]) -> tuple[int, int] | None:
    img = kwargs.get("img_size")
    return None if img is None else to_hw(img)


def _convert_kamim_pretrain(obj: Mapping[str, Any], where: str) -> Conversion:
    if obj.get("version") != 1:
        raise CheckpointError(
            f"{where}: kamim-pretrain checkpoint version {obj.get('version')!r} is not supported (expected 1)")
    state = obj.get("model")
    if not _is_state_dict(state):
        raise CheckpointError(f"{where}: kamim-pretrain checkpoint has no 'model' state dict")
    name, kwargs = _spec(obj.get("encoder_spec"), where)
    # The encoder's prefix in the wrapper's state dict: recorded, or one of the wrappers' conventions.
    recorded = obj.get("encoder_prefix")
    candidates = [recorded] if isinstance(recorded, str) else ["encoder.", "backbone.encoder."]
    prefix = next((p for p in candidates if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise CheckpointError(f"{where}: no encoder weights under {' or '.join(candidates)} "
                              f"(keys: {_sample(state)})")
    parent = prefix[: prefix.rstrip(".").rfind(".") + 1]  # "backbone." for "backbone.encoder."
    conv = Conversion("kamim-pretrain", {}, name, kwargs, native_img_size=_native_img(kwargs),
                      method=obj.get("method") if isinstance(obj.get("method"), str) else None)
    for k, v in state.items():
        if k.startswith(prefix):
            conv.state_dict[k[len(prefix):]] = v
            conv.converted += 1
        else:
            rest = k[len(parent):] if parent and k.startswith(parent) else k
            conv.add_extra(rest.split(".")[0], k)
    conv.notes.append(f"encoder weights under '{prefix}'")
    return conv


def _convert_kamim_encoder(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], where: str) -> Conversion:
    name = meta.get("model_name")
    if not name:
        raise CheckpointError(f"{where}: kamim-encoder metadata lacks 'model_name'")
    try:
        kwargs = json.loads(meta.get("kwargs") or "{}")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: kamim-encoder metadata 'kwargs' is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: kamim-encoder metadata 'kwargs' must be a JSON object, got {kwargs!r}")
    name, kwargs = _checked_spec(name, kwargs, where)
    return Conversion("kamim-encoder", dict(sd), name, kwargs, native_img_size=_native_img(kwargs),
                      method=meta.get("method"))


def convert_checkpoint(
    obj: Any,
    metadata: Mapping[str, str] | None = None,
    *,
    model_name: str | None = None,
    num_heads: int | Sequence[int] | None = None,
    native_img_size: int | tuple[int, int] | None = None,
    checkpoint_key: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
    where: str = "checkpoint",
) -> Conversion:
    """Detect the format of a loaded checkpoint object and convert it to timm keys.

    ``model_name`` overrides the inferred timm name (for a state dict of another architecture it is
    required: format ``timm``); ``num_heads``/``native_img_size`` fill in what shapes cannot tell;
    ``checkpoint_key`` picks the container (e.g. ``"student"`` for DINO).
    """
    metadata = metadata or {}
    if metadata.get("format") == "kamim-encoder":
        return _convert_kamim_encoder(obj, metadata, where)
    if isinstance(obj, Mapping) and obj.get("format") == "kamim-pretrain":
        return _convert_kamim_pretrain(obj, where)
    container, sd = _unwrap(obj, checkpoint_key, where)
    if sd is None:
        seen = _sample(map(str, obj)) if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{where}: unknown checkpoint format: no state dict of tensors found (saw {seen}); "
                              f"known formats: {', '.join(FORMATS)}")
    notes = []
    cleaned = clean_state_dict(dict(sd))
    if list(cleaned) != list(sd):
        sd = cleaned
        notes.append("stripped the DistributedDataParallel/torch.compile 'module.'/'_orig_mod.' prefixes")
    for fmt, matches, convert in _LAYOUTS:
        if matches(sd, container):
            kw: dict[str, Any] = {"num_heads": num_heads, "native_img_size": native_img_size,
                                  "model_name": model_name}
            if fmt.startswith("hf-"):
                kw["config"] = hf_config
            try:
                conv = convert(sd, **kw)
            except ConversionError as e:
                raise CheckpointError(f"{where} ({fmt}): {e}") from None
            break
    else:
        if model_name is None:
            raise CheckpointError(
                f"{where}: unknown checkpoint format; saw {len(sd)} keys such as {_sample(sd)}; known formats: "
                f"{', '.join(FORMATS)} (pass model_name= to load a plain timm state dict of another architecture)")
        conv = Conversion("timm", dict(sd), model_name, {}, native_img_size=None)
    conv.notes[:0] = notes + ([f"state dict under '{container}'"] if container else [])
    return conv


# ----------------------------------------------------------------------------------------------- loading
def offline_model_name(name: str, allow_download: bool = False) -> str:
    """The timm name to build for ``name`` without reaching the network.

    A Hugging Face Hub name (``hf-hub:ORG/NAME[@REVISION]``) is built from the ``config.json`` in the
    local Hugging Face cache (as timm's ``local-dir:`` source); when it is not there, a one-line
    ``FileNotFoundError`` names what to download. ``allow_download=True`` hands the name to timm, which
    fetches the config. Other names are returned unchanged.
    """
    from timm.models import parse_model_name

    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        raise CheckpointError(f"model name {name!r}: {e}") from None
    if source != "hf-hub" or allow_download:
        return name
    import huggingface_hub

    repo, _, revision = model_id.partition("@")
    cached = huggingface_hub.try_to_load_from_cache(repo, "config.json", revision=revision or None)
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model '{name}' is not in the local Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}): "
            f"download its config first (hf download {repo} config.json) or pass --allow-download")
    try:
        model_args = json.loads(Path(cached).read_text()).get("model_args") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{cached}: not a timm model config ({e})") from None
    fetching = sorted(set(map(str, model_args)) & FETCHING_TIMM_KWARGS)
    if fetching:
        raise CheckpointError(f"{cached}: refusing model_args {', '.join(fetching)} (they make timm open or fetch "
                              f"files)")
    return f"local-dir:{Path(cached).parent}"


def _build(model_name: str, kwargs: Mapping[str, Any], skip_init: bool = False,
           allow_download: bool = False) -> nn.Module:
    """``timm.create_model(pretrained=False)`` with one-line errors; a Hub name only from the local
    cache unless ``allow_download`` (:func:`offline_model_name`).

    ``skip_init`` skips timm's weight initialisation (``weight_init="skip"``; seconds for a ViT-B on CPU)
    where the model supports it, for weights that are about to be overwritten by a checkpoint.
    """
    model_name = offline_model_name(model_name, allow_download)
    try:
        if skip_init and "weight_init" not in kwargs:
            with contextlib.suppress(TypeError):  # architectures without the option are built normally
                return timm.create_model(model_name, pretrained=False, weight_init="skip", **kwargs)
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError, MemoryError) as e:
        shown = {k: v for k, v in kwargs.items() if k != "norm_layer"}
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        size = re.search(r"tried to allocate (\d+) bytes", msg)
        if size or isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            need = f" ({int(size.group(1)) / 2**30:.1f} GiB in one tensor)" if size else ""
            msg = f"not enough memory{need}; a smaller img_size needs less"
        raise CheckpointError(f"cannot build timm model '{model_name}' with {shown}: {msg}") from None


def _category(key: str, allow_extra: Sequence[str]) -> str | None:
    for name in allow_extra:
        if key == name or key.startswith(name + ".") or fnmatch.fnmatchcase(key, name):
            return name
    if key.split(".")[0] in _CLASSIFIER:
        return "classifier"
    return None


def _match_state_dict(
    model: nn.Module, conv: Conversion, allow_extra: Sequence[str], strict: bool, resample: bool, where: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Check keys and shapes of ``conv.state_dict`` against ``model``; resample pos_embed if asked."""
    target = model.state_dict()
    ignored: dict[str, list[str]] = {c: list(keys) for c, keys in conv.extras.items()}
    unexpected: list[str] = []
    for k in conv.state_dict:
        if k not in target:
            cat = _category(k, allow_extra)
            if cat is None:
                unexpected.append(k)
            else:
                ignored.setdefault(cat, []).append(k)
    missing = [k for k in target if k not in conv.state_dict]
    if strict and (missing or unexpected):
        parts = [f"{len(missing)} missing key(s): {_sample(missing)}"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_sample(unexpected)} (allow with allow_extra=[...])")
        raise CheckpointError(f"{where} ({conv.format}) does not fit timm '{conv.model_name}': {'; '.join(parts)}")
    if missing or unexpected:
        warnings.warn(f"{where}: loading with strict=False: {len(missing)} missing key(s) ({_sample(missing, 3)}), "
                      f"{len(unexpected)} unexpected key(s) ({_sample(unexpected, 3)}) not loaded", stacklevel=3)

    out: dict[str, torch.Tensor] = {}
    resampled: dict[str, Any] = {}
    mismatched: list[str] = []
    for k, v in conv.state_dict.items():
        if k not in target:
            continue
        want = target[k].shape
        if v.shape != want and k == "pos_embed" and resample and hasattr(model, "patch_embed"):
            patch = model.patch_embed.patch_size
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            native = conv.native_img_size
            if native is not None:
                old = [native[0] // patch[0], native[1] // patch[1]]
            else:  # not recorded (plain state dict of a named model): a square grid, as timm assumes
                side = math.isqrt(int(v.shape[1]) - prefix)
                old = [side, side]
            new = list(model.patch_embed.grid_size)
            if old[0] * old[1] + prefix == v.shape[1]:
                v = resample_abs_pos_embed(v, new_size=new, old_size=old, num_prefix_tokens=prefix)
                resampled[k] = {"from": old, "to": new}
        if v.shape != want:
            hint = " (pass img_size= to resample the position embedding)" if k == "pos_embed" else ""
            mismatched.append(f"'{k}': checkpoint {tuple(v.shape)} vs model {tuple(want)}{hint}")
        out[k] = v
    nonfinite = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{where} ({conv.format}): non-finite values (NaN/inf) in {len(nonfinite)} "
                              f"tensor(s): {_sample(nonfinite)}")
    if mismatched:
        raise CheckpointError(f"{where} ({conv.format}): {len(mismatched)} shape mismatch(es) with timm "
                              f"'{conv.model_name}': {'; '.join(mismatched[:3])}"
                              f"{'; ...' if len(mismatched) > 3 else ''}")

    verified = 0
    for k, v in conv.derived.items():
        try:
            buf = model.get_buffer(k)
        except AttributeError:
            ignored.setdefault("derived_buffer", []).append(k)
            continue
        if buf.shape != v.shape or not torch.equal(buf.to(v.dtype), v):
            raise CheckpointError(f"{where} ({conv.format}): derived buffer '{k}' differs from the one timm computes "
                                  f"(checkpoint {tuple(v.shape)} vs model {tuple(buf.shape)}); "
                                  "different window layout?")
        verified += 1
    report = {"loaded": len(out), "converted": conv.converted,
              "ignored": {c: sorted(keys) for c, keys in sorted(ignored.items())},
              "missing": missing, "unexpected": unexpected, "resampled": resampled, "verified_buffers": verified}
    return out, report


def _buffers_finite(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(b).all() for n, b in model.named_buffers() if n not in state and b.is_floating_point())


def load_encoder(
    source: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    allow_extra: Sequence[str] | None = None,
    num_heads: int | Sequence[int] | None = None,
    img_size: int | tuple[int, int] | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
    checkpoint_key: str | None = None,
    manifest: str | Path | None = None,
    drop_path_rate: float | None = None,
    allow_download: bool = False,
    **model_kwargs: Any,
) -> LoadedEncoder:
    """Load an encoder checkpoint of any supported format into a timm model (``num_classes=0``, eval).

    Args:
        source: checkpoint file, Hugging Face directory, manifest name or timm model name (see
            :func:`resolve_source`; a timm name gives a randomly initialised model, never a download).
        model_name: timm model to build instead of the inferred one (required for plain state dicts of
            architectures other than ViT).
        allow_extra: extra checkpoint keys to tolerate, by key, prefix (``"decoder"`` matches
            ``decoder.*``) or glob; added to the format's known extras, which are always allowed.
        num_heads: attention heads (not visible in a ViT's shapes; a Swin's bias tables give them, a
            value given is checked). Default: the manifest entry, the HF config, or embed_dim / 64 (the
            standard head dim of ViT-T/S/B/L; noted in the report). Per stage for a timm Swin.
        img_size: build the model for this image size; learned absolute position embeddings are
            resampled from the checkpoint's grid with ``timm.layers.resample_abs_pos_embed`` (bicubic).
        strict: when False, missing/unexpected keys are tolerated, warned about and reported.
        device: where to put the model.
        checkpoint_key: container to read (e.g. ``"student"`` for a DINO checkpoint; default: teacher).
        manifest: manifest file to resolve names with (default: the repository's).
        drop_path_rate: stochastic depth rate passed to ``timm.create_model`` (finetuning); default: the
            architecture's (0 for inference).
        allow_download: let timm fetch the config of a Hugging Face Hub ``model_name``
            (``hf-hub:ORG/NAME``); by default it is read from the local cache only, and nothing reaches
            the network.
        **model_kwargs: passed to ``timm.create_model`` (override inferred kwargs, e.g. ``drop_path_rate``).

    Raises:
        FileNotFoundError: no such file / a manifest entry whose file is not downloaded (says where from).
        CheckpointError (a ValueError): unsafe pickle, corrupt file, unknown format, missing/unexpected
            keys, shape mismatch; always one line naming the file and the keys.
    """
    resolved = resolve_source(source, manifest=manifest)
    allow = list(allow_extra or [])
    if drop_path_rate is not None:
        model_kwargs = {**model_kwargs, "drop_path_rate": float(drop_path_rate)}
    if resolved.kind == "timm":
        kwargs = {**model_kwargs, "num_classes": 0}
        kwargs.update({k: v for k, v in (("img_size", img_size), ("num_heads", num_heads)) if v is not None})
        model = _build(resolved.name, kwargs, allow_download=allow_download).eval().to(device)
        report = {"loaded": 0, "converted": 0, "ignored": {}, "missing": [], "unexpected": [], "resampled": {},
                  "verified_buffers": 0, "notes": ["random initialisation (pretrained=False)"]}
        return LoadedEncoder.of(model, "timm-name", resolved.name, None, report,
                                {"model_name": resolved.name, "kwargs": kwargs})

    path = resolved.path
    assert path is not None
    where = str(path)
    entry = resolved.entry or {}
    digest = sha256_file(path)
    if entry.get("sha256") and digest != str(entry["sha256"]).lower():
        raise CheckpointError(f"{where}: its sha256 {digest} is not the {entry['sha256']} of manifest entry "
                              f"'{resolved.name}': not the published file (download it again from {entry['source']})")
    obj, metadata = read_checkpoint(path)
    conv = convert_checkpoint(
        obj, metadata, model_name=model_name, where=where, checkpoint_key=checkpoint_key,
        num_heads=num_heads if num_heads is not None else entry.get("num_heads"),
        native_img_size=entry.get("image_size"), hf_config=resolved.hf_config)
    del obj
    if entry.get("format") and entry["format"] != conv.format:
        raise CheckpointError(f"{where}: manifest entry '{resolved.name}' expects format '{entry['format']}' "
                              f"but the file is '{conv.format}'")
    if model_name is not None and conv.format in ("kamim-pretrain", "kamim-encoder"):
        conv.model_name = model_name
    kwargs = {**conv.model_kwargs, **model_kwargs, "num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_heads is not None and conv.format in ("timm", "kamim-pretrain", "kamim-encoder"):
        kwargs["num_heads"] = num_heads  # formats whose converter does not infer the heads
    model = _build(conv.model_name, kwargs, skip_init=True, allow_download=allow_download)
    state, report = _match_state_dict(model, conv, allow, strict, img_size is not None, where)
    if report["missing"] or not _buffers_finite(model, state):
        # strict=False: what the checkpoint lacks gets timm's own initialisation; likewise any buffer
        # an architecture only fills in its weight init.
        model = _build(conv.model_name, kwargs, allow_download=allow_download)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(report["missing"]):
        raise RuntimeError(f"internal error: key check and load_state_dict disagree ({result})")
    model.eval().to(device)
    report = {"format": conv.format, "model_name": conv.model_name, "requested": resolved.name, **report,
              "notes": conv.notes}
    if conv.method:
        report["method"] = conv.method
    return LoadedEncoder.of(model, conv.format, where, digest, report,
                            {"model_name": conv.model_name, "kwargs": kwargs}, conv.method)


def encoder_from_module(model: nn.Module) -> LoadedEncoder:
    """Wrap an in-memory timm ViT/Swin (``num_classes=0``) with its geometry read from the model.

    Format ``"module"``, source the class name, no hash, an empty report. One-line error
    (:class:`kamim.backbone.NotABackboneError`, a ValueError) for anything but a fixed-size ViT/Swin.
    """
    model_geometry(model)  # refuse what is not a fixed-size timm ViT/Swin
    return LoadedEncoder.of(model, "module", type(model).__name__, None, {})


def resolve_encoder(
    source: str | os.PathLike[str] | nn.Module, device: str | torch.device, options: Mapping[str, Any] | None = None,
    frozen: bool = True,
) -> LoadedEncoder:
    """:func:`load_encoder` ``(source, **options)`` (or an in-memory model) on ``device``.

    ``frozen=True``: eval mode and ``requires_grad=False`` (probing, k-NN; an in-memory model is used
    as is). ``frozen=False`` (finetuning): an in-memory model is deep-copied, never modified.
    """
    if isinstance(source, nn.Module):
        enc = encoder_from_module(source if frozen else copy.deepcopy(source))
    else:
        enc = load_encoder(source, **dict(options or {}))
    enc.model.to(device)
    if frozen:
        enc.model.eval().requires_grad_(False)
    return enc
