"""Graceful stop on SIGINT and SIGTERM (what SLURM and other schedulers send before a kill).

Inside :func:`graceful_stop` the first SIGINT/SIGTERM only records the request; a training loop
checks :attr:`StopRequest.signum` between optimizer steps, writes a checkpoint and raises
:class:`Interrupted`. A second signal raises :class:`Interrupted` at once. Outside the main
thread (where Python cannot install handlers) the context does nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

__all__ = ["Interrupted", "StopRequest", "graceful_stop", "sigterm_interrupts"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal; ``exit_status`` is the shell convention ``128 + signum``."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        self.exit_status = 128 + self.signum
        super().__init__(message or f"stopped by {signal.Signals(self.signum).name}")


@dataclass
class StopRequest:
    """The first stop signal received (None: none yet)."""

    signum: Optional[int] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` in the body, as SIGINT raises ``KeyboardInterrupt``: a
    command stops the same way for both (a training loop's :func:`graceful_stop` takes over inside
    it). Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a request (see module docstring); handlers restored on exit."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, _frame) -> None:
        if request.signum is not None:
            raise Interrupted(signum)
        request.signum = signum

    previous = {s: signal.signal(s, handle) for s in _SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
