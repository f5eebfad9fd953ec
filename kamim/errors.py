"""How the command-line tools (``kamim``, ``kamim-analyze``) end: one rule for both.

* Errors caused by the input (:data:`USER_ERRORS`: ``ValueError`` and its subclasses, such as the
  config, checkpoint and output-folder errors; ``KeyError``; ``OSError`` and its subclasses,
  such as missing files, permissions, a full or read-only disk and the unreadable images of
  ``kamim.data``; errors of the ``safetensors`` library) print one line ``PROG: error: ...`` and
  exit with status 2. So does a ``torch.save`` that fails because the disk is full (torch
  reports it as a ``RuntimeError``).
* A diverged training run (``kamim.engine.pretrain.NonFiniteLossError``) prints one line, exit 1.
* ``KeyboardInterrupt`` prints ``PROG: interrupted`` (plus its message, if it has one) and exits
  with its ``exit_status`` (``kamim.interrupt.Interrupted``: 128 + the signal) or 130. SIGTERM is
  handled like SIGINT (``kamim.interrupt.sigterm_interrupts``): one line, exit 143.
* Anything else is a bug and keeps its traceback. ``KAMIM_DEBUG=1`` shows the traceback of every
  error.

Argument errors of both tools are one line too (:class:`ArgumentParser`). This module imports
no torch, so that ``--help`` and usage errors stay fast.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import textwrap
from typing import Any, Callable, NoReturn, Optional

__all__ = ["USER_ERRORS", "ArgumentParser", "configure_logging", "debug_enabled", "exit_code", "format_error",
           "run_command"]

#: exception types that are the user's input (or environment), not a bug: one line, exit 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError)
# OSError numbers that only a write can raise: "cannot write FILE: <reason>"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}
# torch.save to a path on a full disk raises RuntimeError("[enforce fail at inline_container.cc:..]
# unexpected pos ...") or, for a small file, RuntimeError("basic_ios::clear: iostream error")
_TORCH_WRITE_FAILURE = re.compile(r"enforce fail at inline_container|basic_ios::clear|No space left on device|"
                                  r"file write failed")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but a line never breaks inside a hyphenated name (``attention-distance``,
    ``demo-photos``), so that names in ``--help`` can be copied and searched for."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line ``PROG: error: ...`` (exit 2).

    ``PROG`` is the tool's name, also for a subcommand's parser; pass ``parser_class=`` this class
    to ``add_subparsers`` so that every subcommand gets it. Help lines do not break inside
    hyphenated names (:class:`HelpFormatter`).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def debug_enabled() -> bool:
    """``KAMIM_DEBUG`` is set to anything but ``""`` or ``"0"``: show tracebacks."""
    return os.environ.get("KAMIM_DEBUG", "") not in ("", "0")


def _is_non_finite_loss(err: BaseException) -> bool:
    # looked up only if the training engine was imported: no torch import here
    pretrain = sys.modules.get("kamim.engine.pretrain")
    return pretrain is not None and isinstance(err, pretrain.NonFiniteLossError)


def _is_safetensors_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "safetensors"


def _torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and bool(_TORCH_WRITE_FAILURE.search(str(err)))


def exit_code(err: BaseException) -> Optional[int]:
    """The exit status of a command that raised ``err``: 1 for a diverged run, 2 for a user error,
    ``exit_status`` or 130 for an interrupt, None for a bug (keep the traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return int(getattr(err, "exit_status", 130))
    if _is_non_finite_loss(err):
        return 1
    if isinstance(err, USER_ERRORS) or _is_safetensors_error(err) or _torch_write_failure(err):
        return 2
    return None


def _oneline(text: str) -> str:
    """The first paragraph of ``text`` on one line (a long explanation after a blank line is dropped)."""
    return " ".join(re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].split())


def _os_error_message(err: OSError) -> str:
    if not err.strerror:  # raised with a message of its own, e.g. FileNotFoundError("... not found: 'x'")
        return _oneline(str(err)) or type(err).__name__
    reason = err.strerror[:1].lower() + err.strerror[1:]
    name = os.fsdecode(err.filename) if err.filename is not None else None
    if err.filename2 is not None:
        name = f"{name} -> {os.fsdecode(err.filename2)}"
    if err.errno in _WRITE_ERRNOS:
        return f"cannot write '{name}': {reason}" if name else f"cannot write a file: {reason}"
    return f"'{name}': {reason}" if name else reason


def _message(err: BaseException) -> str:
    if isinstance(err, OSError):
        return _os_error_message(err)
    if _torch_write_failure(err):
        context = err.__cause__ or err.__context__
        if isinstance(context, OSError) and context.strerror:
            return _os_error_message(context)
        if "No space left" in str(err):
            return "cannot write a file: no space left on device"
        return f"cannot write a file (is the disk full?): {_oneline(str(err))}"
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        key = err.args[0]  # str(KeyError) quotes it; a message is shown as is, a bare key named
        return _oneline(key) if " " in key.strip() else f"no such key: '{key}'"
    text = _oneline(str(err))
    if _is_safetensors_error(err):
        return f"safetensors: {text}" if text else "not a valid safetensors file"
    return text or type(err).__name__


def format_error(prog: str, err: BaseException) -> str:
    """The one line printed for ``err`` (see the module docstring)."""
    if isinstance(err, KeyboardInterrupt):
        text = _oneline(str(err))
        return f"{prog}: interrupted" + (f": {text}" if text else "")
    return f"{prog}: error: {_message(err)}"


def configure_logging(quiet: bool = False) -> None:
    """Both tools log ``HH:MM:SS logger: message`` lines to stderr: INFO and up (start-up lines, progress
    lines in a log, warnings), WARNING and up with ``quiet`` or on a torchrun rank other than 0."""
    import logging

    main = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.WARNING if (quiet or not main) else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_command(prog: str, func: Callable[[Any], Optional[int]], args: Any) -> int:
    """``func(args)`` with the error rule of the module docstring; returns the exit status."""
    from kamim.interrupt import sigterm_interrupts

    try:
        with sigterm_interrupts():  # SIGTERM (a scheduler's stop) ends a command like Ctrl-C
            return int(func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code(err)
        if code is None or debug_enabled():
            raise
        print(format_error(prog, err), file=sys.stderr)
        return code
