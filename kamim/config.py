"""Typed run configuration: nested dataclasses, YAML presets and ``key.sub=value`` overrides.

A config is built from a preset name (``kamim/configs/NAME.yaml``) or a YAML file, then
``key.sub=value`` overrides whose values are parsed with ``yaml.safe_load``. Every key is
checked against the dataclasses (unknown keys are an error listing the valid ones) and the
whole config is validated with one-line ``ConfigError`` messages naming the bad value: every
number must be finite (NaN/inf never pass) and in its range, and a YAML file with the same key
twice in one mapping is refused (PyYAML alone keeps the last one silently).

Presets may start with ``base: OTHER_PRESET`` (a preset name or a path relative to the file):
the base is loaded first and the file's keys are deep-merged over it.

Learning rate convention (SimMIM): ``optim.lr`` is the absolute peak LR when set; otherwise the
peak LR is ``optim.base_lr * optim.batch_size / 512`` with ``batch_size`` the GLOBAL batch
(all ranks and accumulation steps together). ``min_lr`` and ``warmup_lr`` are absolute.

Schedule length: the cosine schedule spans ``optim.epochs`` epochs of optimizer steps, warmup
included (``warmup_epochs`` of them). ``run.max_steps`` only stops the run early (smoke tests,
stop-and-resume) unless ``run.max_steps_schedule`` is true, in which case the schedule is
compressed to ``max_steps`` optimizer steps (warmup scaled by ``warmup_epochs / epochs``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, TypeVar, Union

import yaml

__all__ = [
    "Config", "ModelConfig", "DataConfig", "MaskConfig", "KamimConfig", "MoCoConfig",
    "OptimConfig", "RunConfig", "ConfigError", "load_config", "list_presets", "preset_path",
    "to_dict", "from_dict", "apply_overrides", "save_config", "config_diff", "dotted_get",
    "METHODS", "AMP_MODES", "CROPS", "INITS", "POS_EMBED_INITS", "RESUME_SAFE_KEYS", "CONFIG_DIR", "EVAL_CONFIG_DIR",
    "load_command_config", "dump_config", "add_config_arguments", "config_from_args", "field_default",
    "field_help", "ConfigFlags", "parsed_config", "MissingConfigKey", "LinprobeConfig", "FinetuneConfig", "KNNConfig", "ReconstructConfig",
    "linprobe_recipes", "clamped_warmup", "LINPROBE_RECIPE_KEYS", "COMMAND_CONFIGS", "SweepEval",
    "SWEEP_EVAL_METHODS",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EVAL_CONFIG_DIR = CONFIG_DIR / "eval"  # evaluation recipes: COMMAND_NAME.yaml
T = TypeVar("T")
METHODS = ("simmim", "kamim", "moco")
AMP_MODES = ("bf16", "fp16", "none")
LOSS_NORMALIZE = ("mask", "weight")
#: timm.create_model arguments that open a file or reach the network: refused wherever a config or a
#: checkpoint's metadata supplies model arguments (kamim.checkpoints too)
FETCHING_TIMM_KWARGS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                                  "cache_dir", "pretrained_strict"})
#: the largest image side (pixels) a command or a checkpoint's metadata may ask for (a ViT-B/16 at this
#: size has a million tokens per image)
MAX_IMAGE_SIDE = 16384
# Fallbacks used only if kamim.keypoints / kamim.models.presets cannot be imported.
_DEFAULT_DETECTORS = ("fast", "sift", "orb")
_DEFAULT_RENDERS = ("ring", "point", "disk")
# the pretraining crops (kamim.data.transforms.MIMTransform): the reference pipeline's, or antialiased PIL
CROPS = ("reference", "antialiased")
# how pretraining initialises the encoder (kamim.models.factory.initialise_encoder): timm's default,
# or one of timm's own ``init_weights`` modes; and where the learned ViT position embedding starts
INITS = ("timm", "jax", "moco")
POS_EMBED_INITS = ("timm", "sincos")
_DEFAULT_ARCHS = ("vit_t", "vit_s", "vit_b", "swin_t", "swin_b", "vit_pico", "swin_pico")

# Keys that may differ between a run and its resumption: they change how a run is executed or
# logged, not what it computes. Pretraining's keys are dotted, the evaluation recipes' flat.
RESUME_SAFE_KEYS = frozenset({
    "data.path", "data.num_workers", "run.device", "run.log_every", "run.ckpt_every_steps",
    "run.keep_step_checkpoints", "run.max_steps", "run.compile", "run.tensorboard", "run.wandb",
    "run.wandb_project", "run.progress",
    "num_workers", "device", "progress", "resume", "stop_epoch", "load_options", "overwrite",
})


class ConfigError(ValueError):
    """A bad configuration value, key or preset (one-line message)."""


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice (raised by ``_UniqueKeyLoader``)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (merge keys ``<<`` may be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key: SafeConstructor raises its own error
                    continue
                if duplicate:
                    raise _DuplicateKeyError(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` semantics, but a duplicate key raises ``_DuplicateKeyError``."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ModelConfig:
    """Architecture preset (see ``kamim.models.presets.PRESETS``) and input size."""

    arch: str = "vit_b"
    img_size: int = 192
    # timm keyword arguments of the encoder (``timm.create_model``), e.g. depth, embed_dim,
    # drop_path_rate; nothing else (KAMIM's temperature is ``kamim.temperature``, the initialisation
    # is ``init``: it is how this run starts, not part of the architecture a checkpoint records)
    overrides: dict[str, Any] = field(default_factory=dict)
    # pretraining initialisation (one of INITS): "timm" = timm's default (truncated normal, std 0.02),
    # "jax" / "moco" = timm's init_weights modes (xavier-uniform linear layers; "moco" as MoCo v3)
    init: str = "timm"
    # where the learned position embedding of a ViT starts (one of POS_EMBED_INITS): "timm" (truncated
    # normal, std 0.02) or "sincos" (the fixed 2-D sin-cos table of MAE and MoCo v3, then learned)
    pos_embed_init: str = "timm"


@dataclass
class DataConfig:
    """Dataset location and the SimMIM/KAMIM augmentation: RandomResizedCrop, then horizontal and
    vertical flips (MoCo v3 has its own two-view augmentation and ignores ``crop`` and the flips).

    ``crop``: ``"reference"`` reproduces the KAMIM reference pipeline exactly (the uint8 image tensor
    cropped by ``RandomResizedCrop(antialias=False)``, bilinear; the paper presets, with
    ``vflip: 0.5``); ``"antialiased"`` crops the PIL image with antialiasing (the tiny presets and
    the dataclass default, as before the option existed). Keypoints are detected on the crop, so
    the choice changes them: on identical crop boxes, BENCHMARKS.md ("Reference crop") gives the
    share of keypoint-map pixels and the mean KAMIM-weight change per detector.
    """

    path: Optional[str] = None
    crop_scale: tuple[float, float] = (0.67, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5  # horizontal flip probability
    vflip: float = 0.0  # vertical flip probability (the reference: 0.5)
    crop: str = "antialiased"  # one of CROPS
    num_workers: int = 8
    strict: bool = False  # True: a corrupt image is an error instead of being skipped and counted


@dataclass
class MaskConfig:
    """SimMIM block masking."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6


@dataclass
class KamimConfig:
    """Keypoint weighting of the reconstruction loss (method ``kamim`` only)."""

    detector: str = "fast"
    render: str = "ring"
    weight_patch_size: int = 8
    temperature: float = 0.25
    normalize: str = "mask"  # "mask": reference loss; "weight": renormalised by the weights


@dataclass
class MoCoConfig:
    """MoCo v3 hyper-parameters (method ``moco`` only)."""

    temperature: float = 0.2
    momentum: float = 0.99  # start value, cosine-increased to 1 over training
    dim: Optional[int] = None  # output dim of projector/predictor; None: MoCo v3's 256
    mlp_dim: Optional[int] = None  # hidden dim of the MLPs; None: MoCo v3's 4096


@dataclass
class OptimConfig:
    """Optimizer and LR schedule; ``batch_size`` is GLOBAL (world size x accumulation included)."""

    opt: str = "adamw"
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 2048
    accum_steps: int = 1
    base_lr: float = 2.0e-4  # peak LR = base_lr * batch_size / 512 unless ``lr`` is set
    lr: Optional[float] = None  # absolute peak LR, overrides base_lr
    min_lr: float = 1.0e-5
    warmup_lr: float = 1.0e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = 1.0  # max global grad norm; null or 0 disables clipping

    def peak_lr(self) -> float:
        """The absolute peak learning rate (after warmup)."""
        return float(self.lr) if self.lr is not None else self.base_lr * self.batch_size / 512.0


@dataclass
class RunConfig:
    """Execution: seed, precision, device, logging and checkpointing."""

    seed: int = 0
    amp: str = "bf16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # optimizer steps between metric rows
    ckpt_every_steps: int = 1000  # 0: only at the end
    keep_step_checkpoints: bool = False  # also keep checkpoint-STEP.pt copies
    max_steps: Optional[int] = None  # stop after this many optimizer steps (see module doc)
    max_steps_schedule: bool = False  # True: the LR schedule spans max_steps instead of epochs
    compile: bool = False
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "kamim"


#: the paper's sweep grid (Krishna and Subramanyam, the w_ps x T ablation)
PAPER_WEIGHT_PATCH_SIZES = (8, 16, 32)
PAPER_TEMPERATURES = (0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class SweepGrid:
    """The ``sweep:`` section of a config (``kamim sweep`` only; pretraining ignores it): the KAMIM
    grid and how each point's encoder is evaluated. A sweep writes its whole config, this section
    included, as ``OUT/config.yaml``; ``kamim sweep --config OUT/config.yaml`` reruns it."""

    detectors: Optional[tuple[str, ...]] = None  # null: the config's kamim.detector
    weight_patch_sizes: tuple[int, ...] = PAPER_WEIGHT_PATCH_SIZES
    temperatures: tuple[float, ...] = PAPER_TEMPERATURES
    evaluation: Optional["SweepEval"] = None  # null: no evaluation column


@dataclass
class Config:
    """A complete pretraining run description (and, for ``kamim sweep``, its grid)."""

    method: str = "kamim"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    kamim: KamimConfig = field(default_factory=KamimConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: Optional[SweepGrid] = None

    def validate(self) -> "Config":
        """Check every value; raise a one-line ``ConfigError`` naming the first bad one."""
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------- dict conversion

def _fields(cls: Any) -> list[dataclasses.Field]:
    """The fields of a config dataclass in their reading order: its own first, the keyword-only
    settings it shares with other commands (a base class's) last. Used for files and messages."""
    return sorted(dataclasses.fields(cls), key=lambda f: bool(f.kw_only))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that YAML/JSON/``weights_only`` pickles can hold."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in _fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"config key '{key}': bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        item = (typing.get_args(tp) or (Any,))[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # e.g. a Path from an argparse flag
            return os.fspath(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")  # pragma: no cover


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}' (it has no default)")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict[str, Any], validate: bool = True) -> Config:
    """Build a ``Config`` from a (partial) nested dict; missing keys take their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    cfg = _from_dict(Config, data)
    return cfg.validate() if validate else cfg


# --------------------------------------------------------------------------- overrides

def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_path(data: dict[str, Any], dotted: str, value: Any, root: type = None) -> None:  # type: ignore[assignment]
    """Set ``a.b.c`` in a nested dict, checking every level against the dataclasses of ``root`` (``Config``)."""
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"bad override key '{dotted}'")
    cls: Any = Config if root is None else root
    node = data
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if cls is dict:  # free-form mapping (model.overrides): any sub-key
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        names = {f.name: f for f in _fields(cls)}
        if part not in names:
            parent = ".".join(parts[:i])
            raise ConfigError(
                f"unknown config key '{here}'; valid keys{' under ' + parent if parent else ''}: "
                f"{', '.join(names)}"
            )
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[X]: X's sub-keys
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif typing.get_origin(tp) is dict or tp is dict:
            cls = dict
        else:
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' has no sub-keys (in '{dotted}')")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def _parse_override(item: str) -> tuple[str, Any]:
    """``"key.sub=value"`` -> (``"key.sub"``, value parsed by ``yaml.safe_load``; empty -> None)."""
    if "=" not in item:
        raise ConfigError(f"bad override '{item}': expected key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override value in '{item}': {str(e).splitlines()[0]}") from None
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], cls: type = None) -> dict[str, Any]:  # type: ignore[assignment]
    """Apply ``key.sub=value`` strings (values parsed by ``yaml.safe_load``) to a config dict of ``cls`` (``Config``)."""
    out = copy.deepcopy(data)
    for item in overrides:
        _set_path(out, *_parse_override(item), root=cls)
    return out


# --------------------------------------------------------------------------- presets / files

def _preset_location(cls: type | None) -> tuple[Path, str] | None:
    """(folder, file-name prefix) of the bundled presets of a command config class, or None.

    ``Config`` (pretraining): ``kamim/configs/NAME.yaml``; a class with ``COMMAND = "linprobe"``:
    ``kamim/configs/eval/linprobe_NAME.yaml``; any other class has no presets (files only).
    """
    if cls is None or cls is Config:
        return CONFIG_DIR, ""
    command = getattr(cls, "COMMAND", None)
    return (EVAL_CONFIG_DIR, f"{command}_") if command else None


def list_presets(cls: type | None = None) -> list[str]:
    """Names of the bundled presets of ``cls`` (default ``Config``: ``kamim/configs/*.yaml``,
    ``_*.yaml`` are shared bases; an evaluation config: its recipes in ``kamim/configs/eval/``)."""
    where = _preset_location(cls)
    if where is None:
        return []
    folder, prefix = where
    return sorted(p.stem[len(prefix):] for p in folder.glob(f"{prefix}*.yaml")
                  if not p.stem.startswith("_") and p.stem[len(prefix):])


def preset_path(name: str, cls: type | None = None) -> Path:
    """Path of a bundled preset of ``cls`` (default ``Config``); ``ConfigError`` listing the valid names if unknown."""
    where = _preset_location(cls)
    if where is None:
        raise FileNotFoundError(f"config file not found: {name}")
    folder, prefix = where
    path = folder / f"{prefix}{name}.yaml"  # also a shared base (_NAME)
    if "/" not in name and path.is_file():
        return path
    names = list_presets(cls)
    raise ConfigError(
        f"unknown preset '{name}' (not a YAML file either); presets: {', '.join(names) or 'none'}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = _yaml_load(text) or {}
    except _DuplicateKeyError as e:
        raise ConfigError(f"config file {path} has duplicate key {e.key!r} (line {e.line}); keep one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _resolve(name_or_path: str | os.PathLike, _seen: tuple[Path, ...] = (), _rel: Path | None = None,
             cls: type | None = None) -> tuple[dict[str, Any], Path]:
    """(merged data, path) of a preset name or YAML file, its ``base:`` chain merged under it."""
    s = os.fspath(name_or_path)
    looks_like_file = s.endswith((".yaml", ".yml")) or "/" in s or Path(s).is_file()
    if looks_like_file:
        path = Path(s)
        if not path.is_absolute() and _rel is not None and not path.exists():
            path = _rel / path
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {s}")
    else:
        path = preset_path(s, cls)
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"circular 'base' in config {path}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(_resolve(base, _seen + (path,), path.parent, cls)[0], data)
    return data, path


def _check_keys(cls: type, data: dict[str, Any], prefix: str = "") -> None:
    """Every key of ``data`` is a field of ``cls`` (recursively into nested dataclasses)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _fields(cls)]
    for k, v in data.items():
        if k not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{k}'; valid keys"
                f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
            )
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            _check_keys(hints[k], v, f"{prefix}{k}.")


class MissingConfigKey(ConfigError):
    """A config field without a default was given no value (``key``: its dotted name)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"missing config key '{key}' (it has no default)")
        self.key = key


def load_command_config(
    cls: type[T],
    source: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
) -> T:
    """The validated config of a command, from four layers, each over the one before:

    1. the dataclass defaults of ``cls`` (the only place defaults are written);
    2. ``source``: a YAML file, or the name of a bundled preset of ``cls`` (:func:`list_presets`),
       which may start with ``base: OTHER``; an unknown key is a ``ConfigError`` naming the file,
       the key and the valid keys; a key written twice is refused;
    3. ``values``: ``{dotted key: value}`` (the CLI flags the user actually passed);
    4. ``overrides``: ``"key.sub=value"`` strings (values parsed by ``yaml.safe_load``, as ``--set``).

    Values are coerced to the annotated types (one-line ``ConfigError`` naming the key) and the
    result is validated with its ``validate()`` method if it has one.
    """
    data: dict[str, Any] = {}
    if source is not None:
        data, path = _resolve(source, cls=cls)
        try:
            _check_keys(cls, data)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    for key, value in (values or {}).items():
        _set_path(data, key, value, root=cls)
    data = apply_overrides(data, overrides, cls)
    try:
        cfg = _from_dict(cls, data)
    except ConfigError as e:
        missing = str(e).startswith("missing config key '")
        if missing:
            raise MissingConfigKey(str(e).split("'")[1]) from None
        raise
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def load_config(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Preset name or YAML path, plus ``key.sub=value`` overrides -> validated ``Config``."""
    return load_command_config(Config, name_or_path, overrides)


def _check_plain(value: Any, key: str) -> None:
    """``value`` (from :func:`to_dict`) is something YAML holds: None, bool, number, str, list, dict."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]")
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"config key '{key}' holds a {type(value).__name__}, which a YAML config file cannot hold")


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the dataclass config ``cfg`` as YAML (atomically); ``load_command_config(type(cfg), path) == cfg``.

    A value YAML cannot hold (an in-memory model, ...) is a ``ConfigError`` naming its key.
    """
    from kamim.serialization import atomic_write_text

    data = to_dict(cfg)
    _check_plain(data, "")
    command = "pretrain" if isinstance(cfg, Config) else getattr(cfg, "COMMAND", None)
    header = (f"# resolved config of `kamim {command}`; rerun with: kamim {command} --config THIS_FILE\n"
              if command else "")
    return atomic_write_text(header + yaml.safe_dump(data, sort_keys=False), path)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved pretraining config as YAML (atomically; :func:`dump_config`)."""
    dump_config(cfg, path)


# --------------------------------------------------------------------------- command-line layer

def field_default(cls: type, key: str) -> Any:
    """The dataclass default of the dotted field ``key`` of ``cls`` (``dataclasses.MISSING`` if none)."""
    node: Any = cls
    value: Any = dataclasses.MISSING
    for part in key.split("."):
        if node is dict or typing.get_origin(node) is dict:  # a free-form mapping's sub-key: no default
            return dataclasses.MISSING
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            raise ConfigError(f"unknown config key '{key}' of {getattr(cls, '__name__', cls)}")
        f = fields[part]
        value = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        node = typing.get_type_hints(node)[part]
        if typing.get_origin(node) in (Union, types.UnionType):  # Optional[X]: X's fields
            node = next((a for a in typing.get_args(node) if a is not type(None)), node)
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return str(value)


def field_help(cls: type, key: str, text: str = "") -> str:
    """Argparse help ``"TEXT (default: VALUE)"`` with VALUE read from the dataclass (``%`` escaped);
    a default of ``None`` is shown only through ``text`` (which says what None means)."""
    default = field_default(cls, key)
    text = text.replace("%", "%%")
    if default is dataclasses.MISSING or default is None:
        return text
    shown = f"default: {_show(default)}".replace("%", "%%")
    return f"{text} ({shown})" if text else shown


def add_config_arguments(parser: argparse.ArgumentParser, cls: type | None = None, *,
                         required: bool = False) -> None:
    """``--config PRESET|FILE`` and repeatable ``--set KEY=VALUE`` (dest ``config`` and ``overrides``).

    ``cls`` (optional) names the bundled presets in the help. Precedence: dataclass defaults <
    ``--config`` < the command's own flags < ``--set``.
    """
    names = list_presets(cls) if cls is not None else []
    shown = f" ({', '.join(names)})" if names else ""
    parser.add_argument(
        "--config", required=required, default=None, metavar="PRESET|FILE" if names or cls is None else "FILE",
        help=(f"preset{shown} or YAML config file, e.g. OUT/config.yaml of an earlier run to rerun it"
              if names or cls is None else "YAML config file, e.g. OUT/config.yaml of an earlier run to rerun it"),
    )
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="override config values (after --config and the flags), e.g. --set epochs=10 pool=cls",
    )


def config_from_args(cls: type[T], args: argparse.Namespace, flags: Mapping[str, str],
                     extra: Mapping[str, Any] | None = None) -> T:
    """:func:`load_command_config` of ``--config``, the flags the user passed and ``--set``.

    ``flags`` maps argparse dest -> dotted config key; a flag whose value is ``None`` (its argparse
    default) was not given and leaves the file's or the dataclass's value in place. ``extra``
    (dotted key -> value) are values the command sets itself (e.g. ``output_dir`` from ``--out``).
    """
    values = {key: getattr(args, dest) for dest, key in flags.items() if getattr(args, dest, None) is not None}
    values.update(extra or {})
    try:
        return load_command_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or (), values)
    except MissingConfigKey as e:
        dest = next((d for d, k in flags.items() if k == e.key), None)
        hint = f"give --{dest.replace('_', '-')} or " if dest else ""
        raise ConfigError(f"missing config key '{e.key}': {hint}set it in --config FILE or with --set {e.key}=...") \
            from None


class ConfigFlags:
    """The flags of a command's config dataclass ``cls``. Each flag is a shorthand of ``--set KEY=VALUE``:
    its argparse default is None ("not given"), so the dataclass is the only place a default is
    written (shown in the help from there). Precedence: defaults < ``--config`` < flags < ``--set``."""

    def __init__(self, p: argparse.ArgumentParser, cls: type, *, config_required: bool = False) -> None:
        self.p, self.cls, self.keys = p, cls, {}
        add_config_arguments(p, cls, required=config_required)
        p.set_defaults(config_cls=cls, config_flags=self.keys)

    def add(self, *names: str, key: str | None = None, help: str = "", group=None, **kw) -> None:
        dest = names[0].lstrip("-").replace("-", "_")  # the flag's name: one-line errors name the flag
        key = key or dest
        switch = kw.get("action") in ("store_const", argparse.BooleanOptionalAction)
        if not switch and "choices" not in kw:
            kw.setdefault("metavar", names[0].lstrip("-").replace("-", "_").upper())
        text = help if kw.get("action") == "store_const" else field_help(self.cls, key, help)
        (group or self.p).add_argument(*names, dest=dest, default=None, help=text, **kw)
        self.keys[dest] = key


def parsed_config(args: argparse.Namespace, **values: Any) -> Any:
    """The validated config of a command whose parser was built with :class:`ConfigFlags`: dataclass
    defaults < ``--config`` < the flags given (and ``values``: dotted key -> value, what the command
    sets itself) < ``--set``. One-line ``ConfigError`` for a bad key or value."""
    return config_from_args(args.config_cls, args, args.config_flags, values)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = RESUME_SAFE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, compared as plain JSON (tuples as
    lists); a key in ``ignore``, or under one (``load_options.x``), is skipped."""
    from kamim.serialization import json_safe

    fa, fb = _flatten(dict(a)), _flatten(dict(b))
    skip = set(ignore)

    def kept(key: str) -> bool:
        return not any(p in skip for p in itertools.accumulate(key.split("."), lambda x, y: f"{x}.{y}"))

    return sorted(k for k in set(fa) | set(fb) if kept(k) and json_safe(fa.get(k)) != json_safe(fb.get(k)))


def dotted_get(d: Mapping[str, Any], key: str) -> Any:
    """``d["a"]["b"]`` for ``key="a.b"`` (None where a part is missing)."""
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


# --------------------------------------------------------------------------- validation

def _known(module: str, name: str, fallback: Iterable[str]) -> tuple[str, ...]:
    try:
        mod = __import__(module, fromlist=[name])
        return tuple(getattr(mod, name))
    except (ImportError, AttributeError):
        return tuple(fallback)


def _check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; expected one of: {', '.join(choices)}")


def _check_number(key: str, value: float | tuple[float, ...], ok: bool, rule: str) -> None:
    """The one numeric check: ``value`` (a number or a tuple) must be finite and ``ok`` (its range test).

    Raises ``ConfigError("KEY=VALUE must be RULE")``; NaN/inf are refused even where the range test
    passes (``inf > 0``) or is vacuous, and named "a finite number" in the message.
    """
    many = isinstance(value, (tuple, list))
    values = tuple(value) if many else (value,)
    finite = all(math.isfinite(v) for v in values)
    if finite and ok:
        return
    shown = list(values) if many else value
    prefix = "" if finite else ("finite numbers " if many else "a finite number ")
    raise ConfigError(f"{key}={shown} must be {prefix}{rule}")


def _validate(cfg: Config) -> None:
    _check_choice("method", cfg.method, METHODS)
    fetching = sorted(set(map(str, cfg.model.overrides)) & FETCHING_TIMM_KWARGS)
    if fetching:
        raise ConfigError(f"model.overrides may not set {', '.join(fetching)}: they make timm open a file or "
                          f"download weights (kamim pretrains from scratch; load weights with load_encoder)")
    if "weight_init" in cfg.model.overrides:
        raise ConfigError(f"model.overrides may not set weight_init; set model.init (one of {', '.join(INITS)}): "
                          "the initialisation is a pretraining setting, not part of the recorded architecture")
    _check_choice("model.init", cfg.model.init, INITS)
    _check_choice("model.pos_embed_init", cfg.model.pos_embed_init, POS_EMBED_INITS)
    _check_choice("model.arch", cfg.model.arch, _known("kamim.models.presets", "PRESETS", _DEFAULT_ARCHS))
    img = cfg.model.img_size
    if img <= 0:
        raise ConfigError(f"model.img_size={img} must be positive")

    d = cfg.data
    lo, hi = d.crop_scale
    _check_number("data.crop_scale", d.crop_scale, 0 < lo <= hi <= 1, "[min, max] with 0 < min <= max <= 1")
    lo, hi = d.crop_ratio
    _check_number("data.crop_ratio", d.crop_ratio, 0 < lo <= hi, "[min, max] with 0 < min <= max")
    _check_number("data.hflip", d.hflip, 0 <= d.hflip <= 1, "in [0, 1] (a probability)")
    _check_number("data.vflip", d.vflip, 0 <= d.vflip <= 1, "in [0, 1] (a probability)")
    _check_choice("data.crop", d.crop, CROPS)
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")

    m = cfg.mask
    _check_number("mask.mask_ratio", m.mask_ratio, 0 < m.mask_ratio < 1, "in (0, 1)")
    if m.mask_patch_size <= 0 or img % m.mask_patch_size:
        raise ConfigError(
            f"mask.mask_patch_size={m.mask_patch_size} must divide model.img_size={img}"
        )

    k = cfg.kamim
    _check_choice("kamim.detector", k.detector, _known("kamim.keypoints", "DETECTORS", _DEFAULT_DETECTORS))
    _check_choice("kamim.render", k.render, _known("kamim.keypoints", "RENDERS", _DEFAULT_RENDERS))
    _check_choice("kamim.normalize", k.normalize, LOSS_NORMALIZE)
    if k.weight_patch_size <= 0 or img % k.weight_patch_size:
        raise ConfigError(
            f"kamim.weight_patch_size={k.weight_patch_size} must divide model.img_size={img}"
        )
    _check_number("kamim.temperature", k.temperature, k.temperature > 0, "> 0")

    mc = cfg.moco
    _check_number("moco.temperature", mc.temperature, mc.temperature > 0, "> 0")
    _check_number("moco.momentum", mc.momentum, 0 <= mc.momentum <= 1, "in [0, 1]")
    for name in ("dim", "mlp_dim"):
        v = getattr(mc, name)
        if v is not None and v <= 0:
            raise ConfigError(f"moco.{name}={v} must be a positive integer (or null: the arch preset's size)")

    o = cfg.optim
    if o.epochs <= 0:
        raise ConfigError(f"optim.epochs={o.epochs} must be positive")
    if not 0 <= o.warmup_epochs < o.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} must be in [0, optim.epochs={o.epochs})")
    if o.batch_size <= 0:
        raise ConfigError(f"optim.batch_size={o.batch_size} must be positive")
    if o.accum_steps <= 0 or o.batch_size % o.accum_steps:
        raise ConfigError(
            f"optim.accum_steps={o.accum_steps} must be positive and divide optim.batch_size={o.batch_size}"
        )
    for name in ("base_lr", "lr"):
        v = getattr(o, name)
        if v is not None:
            _check_number(f"optim.{name}", v, v > 0, "> 0")
    for name in ("min_lr", "warmup_lr", "weight_decay"):
        v = getattr(o, name)
        _check_number(f"optim.{name}", v, v >= 0, ">= 0")
    _check_number("optim.betas", o.betas, all(0 <= b < 1 for b in o.betas), "in [0, 1)")
    if o.clip_grad is not None:
        _check_number("optim.clip_grad", o.clip_grad, o.clip_grad >= 0, ">= 0 (0 or null disables clipping)")
    from timm.optim import list_optimizers

    if o.opt.lower() not in list_optimizers():
        raise ConfigError(f"optim.opt={o.opt!r} is not a timm optimizer; e.g. adamw, lamb, sgd, lars")

    r = cfg.run
    _check_choice("run.amp", r.amp, AMP_MODES)
    if not (r.device in ("auto", "cpu", "cuda") or (r.device.startswith("cuda:") and r.device[5:].isdigit())):
        raise ConfigError(f"run.device={r.device!r} is not valid; expected auto, cpu, cuda or cuda:N")
    if r.log_every <= 0:
        raise ConfigError(f"run.log_every={r.log_every} must be positive")
    if r.ckpt_every_steps < 0:
        raise ConfigError(f"run.ckpt_every_steps={r.ckpt_every_steps} must be >= 0")
    if r.max_steps is not None and r.max_steps <= 0:
        raise ConfigError(f"run.max_steps={r.max_steps} must be positive (or null)")
    if r.max_steps_schedule and r.max_steps is None:
        raise ConfigError("run.max_steps_schedule=true needs run.max_steps")

    s = cfg.sweep
    if s is not None:
        for name in ("detectors", "weight_patch_sizes", "temperatures"):
            if getattr(s, name) is not None and not getattr(s, name):
                raise ConfigError(f"sweep.{name} is empty; give at least one value (or null for detectors)")
        for det in s.detectors or ():
            _check_choice("sweep.detectors", det, _known("kamim.keypoints", "DETECTORS", _DEFAULT_DETECTORS))
        if any(w < 1 for w in s.weight_patch_sizes):
            raise ConfigError(f"sweep.weight_patch_sizes={list(s.weight_patch_sizes)} must be positive")
        _check_number("sweep.temperatures", s.temperatures, all(t > 0 for t in s.temperatures), "> 0")
        if s.evaluation is not None:
            s.evaluation.validate()


# --------------------------------------------------------------------------- evaluation commands
# The configs of ``kamim linprobe | finetune | knn | reconstruct``: torch-free, so that the CLI
# shows their defaults in ``--help`` without importing torch; the engines in ``kamim.eval`` use them.

EVAL_AMP_MODES = ("auto", *AMP_MODES)  # auto: kamim.precision.resolve_amp (bf16 where it is native, else none)
LINPROBE_OPTIMIZERS = ("adamw", "lars", "sgd")
LINPROBE_AUGS = ("finetune", "light", "none")
# the LinprobeConfig fields a linear-probe recipe fills where they are None
LINPROBE_RECIPE_KEYS = ("opt", "base_lr", "weight_decay", "batchnorm", "aug")


def _check_device(key: str, device: str) -> None:
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{key}={device!r} is not valid; expected auto, cpu, cuda or cuda:N")


def _check_execution(cfg: Any) -> None:
    """Device, autocast, batch size and loader workers: the fields every evaluation config has."""
    _check_device("device", cfg.device)
    _check_choice("amp", cfg.amp, EVAL_AMP_MODES)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0 (or null: min(4, CPUs)), got {cfg.num_workers}")
    if getattr(cfg, "img_size", None) is not None and cfg.img_size < 1:
        raise ConfigError(f"img_size must be >= 1, got {cfg.img_size}")


def clamped_warmup(warmup_epochs: int, epochs: int, default_fraction: float, task: str) -> int:
    """``warmup_epochs``, or ``int(epochs * default_fraction)`` with a logged warning when the warmup
    would leave no epoch after it (e.g. ``--epochs 1`` with a recipe's default warmup)."""
    if warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0 or warmup_epochs < epochs:
        return int(warmup_epochs)
    clamped = int(epochs * default_fraction)
    logging.getLogger(f"kamim.{task}").warning(
        "warmup_epochs=%d leaves no epoch after the warmup of a %d-epoch run: using %d", warmup_epochs, epochs, clamped)
    return clamped


def _check_epoch_run(cfg: Any) -> None:
    """The schedule fields of a trained evaluation (linear probe, finetuning)."""
    for name in ("epochs", "batch_size", "accum_steps"):
        if int(getattr(cfg, name)) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if cfg.stop_epoch is not None and cfg.stop_epoch < 1:
        raise ConfigError(f"stop_epoch must be >= 1 (or null), got {cfg.stop_epoch}")
    for name in ("min_lr", "warmup_lr"):
        v = getattr(cfg, name)
        _check_number(name, v, v >= 0, ">= 0")
    if cfg.lr is not None:
        _check_number("lr", cfg.lr, cfg.lr > 0, "> 0 (or null: base_lr x batch_size / 256)")
    _check_execution(cfg)


def linprobe_recipes() -> dict[str, dict[str, Any]]:
    """``{recipe: {field: value}}`` of the linear-probe recipes: the :data:`LINPROBE_RECIPE_KEYS` of
    each bundled preset ``kamim/configs/eval/linprobe_RECIPE.yaml`` (their only source)."""
    out = {}
    for name in list_presets(LinprobeConfig):
        data, path = _resolve(name, cls=LinprobeConfig)
        missing = [k for k in LINPROBE_RECIPE_KEYS if k not in data]
        if missing or data.get("recipe", name) != name:
            raise ConfigError(f"recipe file {path} must set recipe: {name} and {', '.join(LINPROBE_RECIPE_KEYS)}")
        out[name] = {k: data[k] for k in LINPROBE_RECIPE_KEYS}
    return out


@dataclass(kw_only=True)
class _EncoderRun:
    """The settings every evaluation of an encoder shares (keyword-only, so that each command's own
    required fields come first in its constructor)."""

    img_size: Optional[int] = None  # default: the encoder's
    num_workers: Optional[int] = None  # loader workers per process; null: min(4, CPUs available)
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 on CUDA and on CPUs that multiply bf16 natively, else none (fp32)
    progress: bool = True
    overwrite: bool = False  # write into an output_dir holding files of something else
    load_options: dict = field(default_factory=dict)  # model_name, num_heads, img_size of the encoder


@dataclass(kw_only=True)
class _TrainedRun(_EncoderRun):
    """The settings linear probing and finetuning share: the optimizer loop and its resume."""

    accum_steps: int = 1
    lr: Optional[float] = None  # absolute peak LR (overrides base_lr)
    warmup_lr: float = 0.0
    seed: int = 0
    resume: Any = "auto"  # auto | none | path to a run dir or checkpoint
    stop_epoch: Optional[int] = None  # stop after this many epochs (schedule still spans `epochs`); resume later


@dataclass
class LinprobeConfig(_TrainedRun):
    """A linear-probing run (``kamim linprobe``). ``None`` values take the recipe's (:func:`linprobe_recipes`)."""

    COMMAND: ClassVar[str] = "linprobe"

    checkpoint: Any  # anything kamim.checkpoints.load_encoder accepts, or an in-memory timm model
    data: str  # train/ + val/ class folders, "NAME:ROOT" torchvision data, "demo-photos", "demo-digits"
    output_dir: str
    layers: Any = "default"  # "default" (block 8 of 12 scaled to depth), "all", "last", 8, "1,4,8"
    pool: str = "avg"  # avg (patch tokens) | cls
    recipe: str = "reference"  # reference | mae (kamim/configs/eval/linprobe_RECIPE.yaml)
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256  # global: all ranks x accumulation steps
    opt: Optional[str] = None  # adamw | lars | sgd
    base_lr: Optional[float] = None  # peak lr = base_lr x batch_size / 256
    min_lr: float = 0.0
    weight_decay: Optional[float] = None
    batchnorm: Optional[bool] = None  # BatchNorm1d(affine=False) before each head
    aug: Optional[str] = None  # finetune | light | none
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25  # random erasing (finetune augmentation only)

    def validate(self) -> "LinprobeConfig":
        """Check every value given (recipe values still None are checked by :meth:`resolved`)."""
        recipes = linprobe_recipes()
        if self.recipe not in recipes:
            raise ConfigError(f"recipe {self.recipe!r} is not valid; expected one of {', '.join(recipes)}")
        if self.opt is not None and self.opt not in LINPROBE_OPTIMIZERS:
            raise ConfigError(f"opt {self.opt!r} is not valid; expected one of {', '.join(LINPROBE_OPTIMIZERS)}")
        if self.aug is not None and self.aug not in LINPROBE_AUGS:
            raise ConfigError(f"aug {self.aug!r} is not valid; expected one of {', '.join(LINPROBE_AUGS)}")
        if self.pool not in ("avg", "cls"):
            raise ConfigError(f"pool {self.pool!r} is not valid; expected avg or cls")
        _check_epoch_run(self)
        if self.base_lr is not None:
            _check_number("base_lr", self.base_lr, self.base_lr > 0, "> 0")
        if self.weight_decay is not None:
            _check_number("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check_number("re_prob", self.re_prob, 0 <= self.re_prob <= 1, "in [0, 1]")
        return self

    def resolved(self) -> "LinprobeConfig":
        """A validated copy with the recipe's values filled in and a too long warmup clamped (with a warning)."""
        self.validate()
        out = dataclasses.replace(self)
        for key, value in linprobe_recipes()[self.recipe].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        out.warmup_epochs = clamped_warmup(out.warmup_epochs, out.epochs, 10 / 90, "linprobe")  # recipe: 10 of 90
        return out.validate()

    def peak_lr(self) -> float:
        return float(self.lr) if self.lr is not None else float(self.base_lr) * self.batch_size / 256.0


@dataclass
class FinetuneConfig(_TrainedRun):
    """A finetuning run (``kamim finetune``); the defaults are MAE's ViT-B recipe (``kamim/configs/eval/finetune_mae.yaml``)."""

    COMMAND: ClassVar[str] = "finetune"

    checkpoint: Any  # anything kamim.checkpoints.load_encoder accepts, or an in-memory timm model
    data: str  # train/ + val/ class folders, "NAME:ROOT" torchvision data, "demo-photos", "demo-digits"
    output_dir: str
    pool: str = "avg"  # avg (reference: final norm, patch tokens averaged) | cls (class token)
    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 1024  # global: all ranks x accumulation steps
    base_lr: float = 5e-4  # peak lr = base_lr x batch_size / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65  # 1.0 disables layer-wise decay
    drop_path: float = 0.1
    clip_grad: Optional[float] = None  # max grad norm; null: no clipping
    mixup: float = 0.8  # mixup alpha, 0 = off
    cutmix: float = 1.0  # cutmix alpha, 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm string, "trivialaugment" or null/"none"
    re_prob: float = 0.25  # random erasing probability
    ema: bool = False  # also evaluate an EMA of the weights
    ema_decay: float = 0.9999

    def validate(self) -> "FinetuneConfig":
        """Check every value (one-line ``ConfigError``); ``auto_augment: none`` becomes None and a too long
        warmup is clamped (with a warning)."""
        if self.pool not in ("avg", "cls"):
            raise ConfigError(f"pool {self.pool!r} is not valid; expected avg or cls")
        if self.auto_augment == "none":
            self.auto_augment = None
        _check_epoch_run(self)
        self.warmup_epochs = clamped_warmup(self.warmup_epochs, self.epochs, 5 / 100, "finetune")  # recipe: 5 of 100
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        for name in ("drop_path", "mixup_prob", "mixup_switch_prob", "label_smoothing", "re_prob"):
            v = getattr(self, name)
            _check_number(name, v, 0 <= v <= 1, "in [0, 1]")
        for name in ("mixup", "cutmix", "weight_decay"):
            v = getattr(self, name)
            _check_number(name, v, v >= 0, ">= 0")
        _check_number("base_lr", self.base_lr, self.base_lr > 0, "> 0 (the learning rate)")
        _check_number("betas", self.betas, all(0 <= b < 1 for b in self.betas), "in [0, 1)")
        if self.clip_grad is not None:
            _check_number("clip_grad", self.clip_grad, self.clip_grad >= 0, ">= 0 (or null: no clipping)")
        _check_number("ema_decay", self.ema_decay, 0 < self.ema_decay < 1, "in (0, 1)")
        return self

    def peak_lr(self) -> float:
        return float(self.lr) if self.lr is not None else float(self.base_lr) * self.batch_size / 256.0

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class KNNConfig(_EncoderRun):
    """A k-NN evaluation run (``kamim knn``): encoder, labelled data, layers, k values."""

    COMMAND: ClassVar[str] = "knn"

    checkpoint: Any  # anything kamim.checkpoints.load_encoder accepts, or an in-memory timm model
    data: str  # folder with train/ and val/ class folders, or "NAME:ROOT" torchvision dataset
    output_dir: str
    layers: Any = "default"  # as for linprobe
    pool: str = "avg"  # avg | cls
    ks: tuple[int, ...] = (20, 200)  # neighbour counts
    temperature: float = 0.07
    batch_size: int = 128
    train_chunk_size: int = 65536  # train rows per similarity block
    query_chunk_size: int = 1024  # queries per similarity block
    bank_dtype: str = "float16"  # float16 | float32: feature bank storage

    def validate(self) -> "KNNConfig":
        """Check every value (one-line ``ConfigError``)."""
        _check_choice("bank_dtype", self.bank_dtype, ("float16", "float32"))
        if self.pool not in ("avg", "cls"):
            raise ConfigError(f"pool {self.pool!r} is not valid; expected avg or cls")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks={list(self.ks)} must be positive integers")
        _check_number("temperature", self.temperature, self.temperature > 0, "> 0")
        if self.train_chunk_size < 1 or self.query_chunk_size < 1:
            raise ConfigError(f"chunk sizes must be >= 1, got train {self.train_chunk_size}, "
                              f"query {self.query_chunk_size}")
        _check_execution(self)
        return self


@dataclass
class ReconstructConfig:
    """Reconstruction quality (``kamim reconstruct``) of SimMIM/KAMIM checkpoints on the same images and masks."""

    COMMAND: ClassVar[str] = "reconstruct"

    checkpoints: Any  # list of paths / run dirs / NAME=PATH, or {name: path}; names default to the run directories
    data: str  # image folder (flat or class folders), "NAME:ROOT" torchvision data or "demo"
    output_dir: str
    mask_ratio: float = 0.4  # the paper's
    mask_patch_size: Optional[int] = None  # default: the (first) checkpoint's
    seed: int = 0  # mask seed
    batch_size: int = 32  # images per batch and process
    num_workers: Optional[int] = None  # loader workers per process; null: min(4, CPUs available)
    max_images: Optional[int] = None  # evaluate the first N images only
    figure_images: int = 4  # rows of the figure grid (0: no figure)
    device: str = "auto"
    amp: str = "none"
    progress: bool = True
    overwrite: bool = False  # write into an output_dir holding files of something else

    def validate(self) -> "ReconstructConfig":
        """Check every value (one-line ``ConfigError``)."""
        _check_number("mask_ratio", self.mask_ratio, 0 < self.mask_ratio < 1, "in (0, 1)")
        if self.mask_patch_size is not None and self.mask_patch_size < 1:
            raise ConfigError(f"mask_patch_size must be >= 1 (or null), got {self.mask_patch_size}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1 (or null), got {self.max_images}")
        if self.figure_images < 0:
            raise ConfigError(f"figure_images must be >= 0, got {self.figure_images}")
        _check_execution(self)
        return self


#: The config dataclass of each command that reads one (``--config`` / ``--set``; ``kamim presets``).
COMMAND_CONFIGS: dict[str, type] = {
    "pretrain": Config, "linprobe": LinprobeConfig, "finetune": FinetuneConfig, "knn": KNNConfig,
    "reconstruct": ReconstructConfig,
}


#: the evaluations the sweep can run on each grid point's encoder
SWEEP_EVAL_METHODS = ("knn", "linprobe")


@dataclass
class SweepEval:
    """How each sweep run's encoder is evaluated on labelled data.

    ``data``: anything :func:`kamim.data.build_labelled_splits` accepts (a folder with ``train/``
    and ``val/`` class folders, ``NAME:ROOT``, ``demo-photos``, ``demo-digits``). ``layer``: a
    single layer spec (``"default"`` = the reference probing layer, ``"last"``, or a 1-based block
    index). Device, autocast, loader workers and seed come from the pretraining config.
    """

    data: str
    methods: tuple[str, ...] = ("knn",)
    layer: int | str = "default"
    pool: str = "avg"
    batch_size: int = 128
    k: int = 20
    knn_temperature: float = 0.07
    linprobe_epochs: int = 10
    linprobe_recipe: str = "reference"

    def validate(self) -> "SweepEval":
        """Check every value (one-line ValueError naming it); returns self."""
        methods = tuple(self.methods)
        bad = [m for m in methods if m not in SWEEP_EVAL_METHODS]
        if bad or not methods:
            raise ValueError(f"eval method(s) {bad or list(methods)} not valid; expected some of {', '.join(SWEEP_EVAL_METHODS)}")
        self.methods = tuple(dict.fromkeys(methods))
        if self.pool not in ("avg", "cls"):
            raise ValueError(f"eval pool {self.pool!r} is not valid; expected avg or cls")
        for name in ("batch_size", "k", "linprobe_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"eval {name} must be >= 1, got {getattr(self, name)}")
        if not self.knn_temperature > 0:
            raise ValueError(f"eval knn_temperature must be > 0, got {self.knn_temperature}")
        recipes = linprobe_recipes()
        if self.linprobe_recipe not in recipes:
            raise ValueError(f"linprobe recipe {self.linprobe_recipe!r} is not valid; expected one of {', '.join(recipes)}")
        return self

    def metric(self, method: str) -> str:
        """Table column of ``method``'s top-1 accuracy (a fraction in [0, 1])."""
        return f"{method}_top1"
