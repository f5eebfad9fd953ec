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

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

__all__ = [
    "Config", "ModelConfig", "DataConfig", "MaskConfig", "KamimConfig", "MoCoConfig",
    "OptimConfig", "RunConfig", "ConfigError", "load_config", "list_presets", "preset_path",
    "to_dict", "from_dict", "apply_overrides", "save_config", "config_diff",
    "METHODS", "AMP_MODES", "RESUME_SAFE_KEYS", "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("simmim", "kamim", "moco")
AMP_MODES = ("bf16", "fp16", "none")
LOSS_NORMALIZE = ("mask", "weight")
# Fallbacks used only if kamim.keypoints / kamim.models.presets cannot be imported.
_DEFAULT_DETECTORS = ("fast", "sift", "orb")
_DEFAULT_RENDERS = ("ring", "point", "disk")
_DEFAULT_ARCHS = ("vit_t", "vit_s", "vit_b", "swin_t", "swin_b", "vit_pico", "swin_pico")

# Keys that may differ between a run and its resumption: they change how a run is executed or
# logged, not what it computes.
RESUME_SAFE_KEYS = frozenset({
    "data.path", "data.num_workers", "run.device", "run.log_every", "run.ckpt_every_steps",
    "run.keep_step_checkpoints", "run.max_steps", "run.compile", "run.tensorboard", "run.wandb",
    "run.wandb_project", "run.progress",
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
    overrides: dict[str, Any] = field(default_factory=dict)  # extra kwargs for the model factory


@dataclass
class DataConfig:
    """Dataset location and augmentation (RandomResizedCrop + horizontal flip)."""

    path: Optional[str] = None
    crop_scale: tuple[float, float] = (0.67, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5  # flip probability
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
    dim: int = 256
    mlp_dim: int = 4096


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


@dataclass
class Config:
    """A complete pretraining run description."""

    method: str = "kamim"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    kamim: KamimConfig = field(default_factory=KamimConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        """Check every value; raise a one-line ``ConfigError`` naming the first bad one."""
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------- dict conversion

def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that YAML/JSON/``weights_only`` pickles can hold."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
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
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")  # pragma: no cover


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
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


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, checking every level against the dataclasses."""
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"bad override key '{dotted}'")
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if cls is dict:  # free-form mapping (model.overrides): any sub-key
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        names = {f.name: f for f in dataclasses.fields(cls)}
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
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif typing.get_origin(tp) is dict or tp is dict:
            cls = dict
        else:
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' has no sub-keys (in '{dotted}')")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed by ``yaml.safe_load``) to a config dict."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"bad override value in '{item}': {str(e).splitlines()[0]}") from None
        _set_path(out, key, value)
    return out


# --------------------------------------------------------------------------- presets / files

def list_presets() -> list[str]:
    """Names of the bundled presets (``kamim/configs/*.yaml``; ``_*.yaml`` are shared bases)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_path(name: str) -> Path:
    """Path of a bundled preset; ``ConfigError`` listing the valid names if unknown."""
    path = CONFIG_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise ConfigError(
            f"unknown preset '{name}' (not a YAML file either); presets: {', '.join(list_presets())}"
        )
    return path


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


def _resolve(name_or_path: str | Path, _seen: tuple[Path, ...] = (), _rel: Path | None = None) -> dict:
    s = str(name_or_path)
    looks_like_file = s.endswith((".yaml", ".yml")) or "/" in s or Path(s).is_file()
    if looks_like_file:
        path = Path(s)
        if not path.is_absolute() and _rel is not None and not path.exists():
            path = _rel / path
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {s}")
    else:
        path = preset_path(s)
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"circular 'base' in config {path}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(_resolve(base, _seen + (path,), path.parent), data)
    return data


def load_config(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Preset name or YAML path, plus ``key.sub=value`` overrides -> validated ``Config``."""
    data = _resolve(name_or_path)
    data = apply_overrides(data, overrides)
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from kamim.serialization import atomic_write_text

    atomic_write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any], ignore: Iterable[str] = RESUME_SAFE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``ignore`` skipped)."""
    fa, fb = _flatten(a), _flatten(b)
    skip = set(ignore)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return sorted(k for k in set(fa) | set(fb) if k not in skip and norm(fa.get(k)) != norm(fb.get(k)))


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
    _check_choice("kamim.normalize", k.normalize, _known("kamim.loss", "NORMALIZE_MODES", LOSS_NORMALIZE))
    if k.weight_patch_size <= 0 or img % k.weight_patch_size:
        raise ConfigError(
            f"kamim.weight_patch_size={k.weight_patch_size} must divide model.img_size={img}"
        )
    _check_number("kamim.temperature", k.temperature, k.temperature > 0, "> 0")

    mc = cfg.moco
    _check_number("moco.temperature", mc.temperature, mc.temperature > 0, "> 0")
    _check_number("moco.momentum", mc.momentum, 0 <= mc.momentum <= 1, "in [0, 1]")
    if mc.dim <= 0 or mc.mlp_dim <= 0:
        raise ConfigError(f"moco.dim={mc.dim} and moco.mlp_dim={mc.mlp_dim} must be positive")

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
