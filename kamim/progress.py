"""Progress of long work, the same in every command: one live bar on a terminal, log lines elsewhere.

When stderr is a terminal, :func:`progress` is a ``tqdm`` bar. Anywhere else (a log file, a pipe, a
batch job), ``tqdm`` would write carriage-return frames that no log shows as progress. There it is a
:class:`LogProgress`: every ``interval`` seconds (``$KAMIM_PROGRESS_INTERVAL``, default 10) it logs
``DESC: N/TOTAL UNIT (P%), R UNIT/s[, postfix]`` to the ``kamim.progress`` logger, and once more when
it closes if it logged before. So a job's log shows long work advancing, and short work adds no
lines. Disabled, it shows nothing. tqdm has no such mode (its ``mininterval`` still writes bar
frames to a file), hence this small wrapper.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LogProgress", "progress", "on_terminal"]

log = logging.getLogger("kamim.progress")

#: seconds between two progress lines in a log (``$KAMIM_PROGRESS_INTERVAL`` overrides it)
DEFAULT_INTERVAL = 10.0


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


class LogProgress:
    """A ``tqdm``-shaped progress that logs a line every ``interval`` seconds (see the module docstring).

    Supports what kamim's loops use of a bar: iteration, ``update``, ``set_postfix``, ``close``,
    ``disable`` and use as a context manager.
    """

    disable = False

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float = DEFAULT_INTERVAL) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start = int(initial)
        self.interval = float(interval)
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.lines = 0
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LogProgress without an iterable is updated by hand"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._log()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self) -> str:
        """The progress line as it is logged."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start) / elapsed
        return f"{self.desc}: {done} {self.unit}{share}, {rate:.3g} {self.unit}/s" + \
            (f", {self.postfix}" if self.postfix else "")

    def _log(self) -> None:
        self.lines += 1
        log.info("%s", self.line())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.lines:  # long work: say where it ended
                self._log()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, initial: int = 0, leave: bool = False) -> Any:
    """A progress bar over ``iterable`` (or updated by hand): ``tqdm`` on a terminal, a
    :class:`LogProgress` elsewhere, a silent ``tqdm(disable=True)`` when not ``enabled``."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    interval = float(os.environ.get("KAMIM_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval=interval)
