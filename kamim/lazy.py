"""Names of a package imported on first use (PEP 562), so that importing the package stays cheap.

``kamim``, ``kamim.models`` and ``analysis`` export many names whose modules import torch; their
``__init__`` maps each name to its module and takes ``__getattr__``/``__dir__`` from
:func:`lazy_exports`. (``importlib.util.LazyLoader`` defers whole modules, not names of a package.)
Standard library only.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str], namespace: dict[str, Any],
                 public: Iterable[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``where`` maps each exported name to its module
    (absolute, or relative to ``package`` with a leading dot); a name is imported on first access and
    cached in ``namespace`` (the package's ``globals()``); ``__dir__`` also lists ``public``."""
    listed = set(where) | set(public)

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | listed)

    return __getattr__, __dir__
