"""The analysis registry: one registered :class:`Analysis` object per analysis (torch-free).

An analysis is a name, a title, what it needs captured (:data:`NEEDS`), the geometries it supports
(:data:`GEOMETRIES`), an accumulator factory, a plot function and the array keys it writes. The
runner (:func:`analysis.runner.run_analyses`) captures the union of the requested analyses' needs,
streams every batch into each analysis' accumulator and collects what ``finish`` returns; it has no
per-analysis code. Figures (:func:`analysis.plots.plot_analysis`), titles and the analysis names
of the CLI are read from here, so nothing has to be kept in step by hand.

Accumulator contract (:class:`Accumulator`), for one model:

* ``accumulator(context)`` builds a fresh accumulator from a :class:`Context` (model name,
  geometry, run options, seed, model, device) and validates its options there (one-line
  ``ValueError`` before any forward pass);
* ``update(batch)`` streams one :class:`Batch` (images, labels, stream indices of the images,
  captured activations); results must not depend on how images are split into batches;
* ``merge(other)`` adds another accumulator of the same analysis and context that saw disjoint
  images which come *after* this one's in stream order; merge-then-finish equals accumulating
  everything in one accumulator (the basis of multi-process analysis);
* ``finish()`` returns tidy :class:`~analysis.results.Record` rows and a dict of arrays (the keys
  listed in :attr:`Analysis.arrays`); it does not change the state.

Third-party analyses register without editing the package: a ``.py`` file that calls
:func:`register` (loaded by :func:`load_plugin`, ``kamim-analyze run --plugin FILE.py``) or an
entry point in the group ``kamim.analyses`` (loaded once, lazily, by :func:`get` / :func:`names`)
naming an :class:`Analysis`, a callable returning one or several, or a module that registers them.

Geometry kinds are the ``"kind"`` of a geometry's ``to_dict()`` (``"vit"``, ``"swin"``); a new
model family with its own attention implementation adds a kind here and claims it per analysis.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from .capture import Captured
    from .results import Record

__all__ = [
    "NEEDS", "GEOMETRIES", "ENTRY_POINT_GROUP",
    "Analysis", "Accumulator", "Batch", "Context",
    "register", "get", "names", "load_plugin", "load_entry_points", "lazy",
    "geometry_kind", "supported", "unsupported_message", "check_supported", "on_device",
]

#: What an analysis can ask to be captured, per batch (all layers ``1..L`` of the model):
#: ``attention`` softmax maps, ``pre_attention`` / ``post_attention`` tokens around the attention
#: branch, ``tokens`` block outputs, ``embedding`` the layer-0 tokens; ``inputs``: the images only
#: (no capture); ``gradients``: the analysis runs its own backward passes in ``finish``.
NEEDS = frozenset({"attention", "pre_attention", "post_attention", "tokens", "embedding", "inputs", "gradients"})
#: Geometry kinds and how messages name them.
GEOMETRIES = {"vit": "ViT", "swin": "Swin"}
ENTRY_POINT_GROUP = "kamim.analyses"


@runtime_checkable
class Accumulator(Protocol):
    """Streaming state of one analysis for one model (see the module docstring)."""

    def update(self, batch: Batch) -> None: ...

    def merge(self, other: Accumulator) -> None: ...

    def finish(self) -> tuple[list[Record], dict[str, Any]]: ...


@dataclass(frozen=True)
class Analysis:
    """One analysis: ``accumulator(context) -> Accumulator``; ``plot(results, *, palette, out) -> Figure``."""

    name: str
    title: str
    needs: frozenset[str]
    geometries: frozenset[str]
    accumulator: Callable[..., Accumulator]
    plot: Callable[..., Any] | None = None
    figure_stem: str = ""
    arrays: tuple[str, ...] = ()
    caption: str = ""  # shown under the figure in the report: what is plotted and how to read it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or any(c.isspace() or c == "," for c in self.name):
            raise ValueError(f"analysis name must be a non-empty string without spaces or commas, got {self.name!r}")
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "geometries", frozenset(self.geometries))
        object.__setattr__(self, "arrays", tuple(self.arrays))
        bad = sorted(self.needs - NEEDS)
        if bad:
            raise ValueError(f"analysis {self.name!r}: unknown needs {bad}; expected a subset of {sorted(NEEDS)}")
        bad = sorted(self.geometries - set(GEOMETRIES))
        if bad or not self.geometries:
            raise ValueError(f"analysis {self.name!r}: geometries must be a non-empty subset of "
                             f"{sorted(GEOMETRIES)}, got {sorted(self.geometries)}")
        if not callable(self.accumulator):
            raise ValueError(f"analysis {self.name!r}: accumulator must be callable (context -> accumulator)")
        if self.plot is not None and not callable(self.plot):
            raise ValueError(f"analysis {self.name!r}: plot must be callable or None")
        if not self.figure_stem:
            object.__setattr__(self, "figure_stem", self.name.replace("-", "_"))


@dataclass(frozen=True)
class Context:
    """What an accumulator is built from: one model's name, geometry, run options, seed, model, device.

    ``options`` is the :class:`analysis.runner.RunOptions` of the run (analysis-specific options
    such as ``map_queries`` or ``head_fusion`` reach the accumulators through it).
    """

    model_name: str
    geometry: Any
    options: Any
    seed: int = 0
    model: Any = None
    device: Any = "cpu"

    @property
    def layers(self) -> range:
        """Block layers ``1..L``."""
        return range(1, self.geometry.depth + 1)


@dataclass
class Batch:
    """One micro-batch: ``images`` (B, C, H, W) on the device, ``labels`` (B,) or None, ``indices`` (B,)
    the images' positions in the stream, ``captured`` the requested activations (None without capture)."""

    images: Tensor
    labels: Tensor | None
    indices: Tensor
    captured: Captured | None
    geometry: Any
    _attention: dict[int, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def patch_attention(self, layer: int) -> Any:
        """:class:`analysis.attention.PatchAttention` of ``layer``, shared by all analyses of the batch
        (its row sums and entropy sweeps are computed once)."""
        if layer not in self._attention:
            from .attention import PatchAttention

            self._attention[layer] = PatchAttention(self.captured.attention[layer], self.geometry.num_prefix_tokens,
                                                    self.geometry.grid)
        return self._attention[layer]


# --------------------------------------------------------------------------------------------
# the registry

_REGISTRY: dict[str, Analysis] = {}
_STATE = {"builtins": False, "entry_points": False}
_PLUGINS: dict[str, list[str]] = {}


def _ensure_builtins() -> None:
    if _STATE["builtins"]:
        return
    _STATE["builtins"] = True
    from .builtin import BUILTIN

    plugins = dict(_REGISTRY)
    _REGISTRY.clear()
    _REGISTRY.update({a.name: a for a in BUILTIN})
    for name, analysis in plugins.items():  # registered before the built-ins were loaded
        if name in _REGISTRY:
            raise ValueError(f"analysis {name!r} is a built-in analysis")
        _REGISTRY[name] = analysis


def register(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add ``analysis`` to the registry (after the built-ins, in call order) and return it."""
    if not isinstance(analysis, Analysis):
        raise ValueError(f"register() takes an analysis.registry.Analysis, got {type(analysis).__name__}")
    _ensure_builtins()
    if analysis.name in _REGISTRY and not replace and _REGISTRY[analysis.name] != analysis:
        raise ValueError(f"analysis {analysis.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[analysis.name] = analysis
    return analysis


def _loaded() -> dict[str, Analysis]:
    _ensure_builtins()
    if not _STATE["entry_points"]:
        load_entry_points()
    return _REGISTRY


def get(name: str) -> Analysis:
    """The registered analysis ``name``; ``ValueError`` listing the known names otherwise."""
    registry = _loaded()
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown analysis {name!r}; expected one of {', '.join(registry)}") from None


def names() -> tuple[str, ...]:
    """Registered analysis names in registration order (built-ins first, then plugins)."""
    return tuple(_loaded())


def lazy(target: str) -> Callable[..., Any]:
    """``"module:attribute"`` -> a callable that imports the attribute on first call and calls it.

    Keeps the registry declarations free of heavy imports (``kamim-analyze --help`` imports no torch).
    """
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"lazy target must be 'module:attribute', got {target!r}")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attribute
    call.__doc__ = f"Lazily imported {target}."
    return call


def _snapshot() -> dict[str, Analysis]:
    _ensure_builtins()
    return dict(_REGISTRY)


def _restore(snapshot: Mapping[str, Analysis]) -> None:
    _REGISTRY.clear()
    _REGISTRY.update(snapshot)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_plugin(path: str | os.PathLike) -> list[str]:
    """Import the Python file ``path`` (which calls :func:`register`); returns the names it added.

    Loading the same file again returns its names without running it twice. A missing file, a
    file that is not ``.py``, one that fails to import or registers nothing is a one-line ValueError
    (the registry is left as it was).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"analysis plugin {str(path)!r}: no such file")
    if file.suffix != ".py":
        raise ValueError(f"analysis plugin {str(path)!r}: expected a .py file")
    key = str(file.resolve())
    if key in _PLUGINS:
        return list(_PLUGINS[key])
    before = _snapshot()
    module_name = f"kamim_analysis_plugin_{file.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"analysis plugin {str(path)!r}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a plugin's own error, reported in one line
        sys.modules.pop(module_name, None)
        _restore(before)
        raise ValueError(f"analysis plugin {str(path)!r} failed: {_one_line(err)}") from err
    added = [n for n in _REGISTRY if n not in before or _REGISTRY[n] is not before[n]]
    if not added:
        sys.modules.pop(module_name, None)
        raise ValueError(f"analysis plugin {str(path)!r} registers no analysis "
                         "(call analysis.registry.register(Analysis(...)) in it)")
    _PLUGINS[key] = added
    return list(added)


def _register_loaded(value: Any, where: str) -> None:
    if isinstance(value, Analysis):
        register(value)
    elif type(value).__name__ == "module":
        pass  # importing it registered its analyses
    elif callable(value):
        _register_loaded(value(), where)
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        for item in value:
            _register_loaded(item, where)
    elif value is not None:
        raise ValueError(f"{where} gave a {type(value).__name__}, not an Analysis")


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load the analyses of the installed entry points of ``group``; returns the names added.

    Called once, lazily, by :func:`get` and :func:`names` for the default group. An entry point
    may name an :class:`Analysis`, a callable returning one (or an iterable of them), or a module
    that calls :func:`register` when imported. A failing entry point is a one-line ValueError.
    """
    from importlib.metadata import entry_points

    if group == ENTRY_POINT_GROUP:
        _STATE["entry_points"] = True
    before = _snapshot()
    for ep in entry_points(group=group):
        where = f"analysis entry point {ep.name!r} ({ep.value}) of group {group!r}"
        try:
            _register_loaded(ep.load(), where)
        except Exception as err:
            _restore(before)
            raise ValueError(f"{where} failed: {_one_line(err)}") from err
    return [n for n in _REGISTRY if n not in before]


# --------------------------------------------------------------------------------------------
# geometry support


def geometry_kind(geometry: Any) -> str:
    """``"vit"`` / ``"swin"``: the ``kind`` of a geometry (attribute, else its ``to_dict()`` entry)."""
    kind = getattr(geometry, "kind", None)
    if kind is None and hasattr(geometry, "to_dict"):
        kind = geometry.to_dict().get("kind")
    if kind not in GEOMETRIES:
        raise ValueError(f"unknown geometry {type(geometry).__name__}; expected one of {', '.join(GEOMETRIES)}")
    return str(kind)


def supported(kind: str) -> tuple[str, ...]:
    """Names of the registered analyses that support geometry ``kind``."""
    return tuple(n for n, a in _loaded().items() if kind in a.geometries)


def unsupported_message(name: str, kind: str) -> str:
    """The one message refusing analysis ``name`` for a model of geometry ``kind`` (used everywhere)."""
    label = GEOMETRIES.get(kind, kind)
    return f"analysis {name!r} is not supported for {label} models (supported: {', '.join(supported(kind))})"


def check_supported(analyses: Iterable[str], geometry: Any) -> tuple[Analysis, ...]:
    """The :class:`Analysis` objects of ``analyses`` (registry order, duplicates dropped); a
    ValueError for an unknown name, none at all, or one the geometry does not support."""
    requested = (analyses,) if isinstance(analyses, str) else tuple(analyses)
    if not requested:
        raise ValueError(f"no analyses requested; choose from {', '.join(names())}")
    chosen = {n: get(n) for n in requested}
    kind = geometry_kind(geometry)
    for name, analysis in chosen.items():
        if kind not in analysis.geometries:
            raise ValueError(unsupported_message(name, kind))
    return tuple(a for n, a in _loaded().items() if n in chosen)


@contextlib.contextmanager
def on_device(model: Any, device: Any) -> Iterator[None]:
    """Move ``model`` to ``device`` for the duration, then back to where it was."""
    param = next(model.parameters(), None)
    original = param.device if param is not None else device
    model.to(device)
    try:
        yield
    finally:
        model.to(original)
