"""Output folders: the one rule every command that writes a folder follows.

A command writes into ``OUT`` only when ``OUT`` does not exist, is empty, or holds an earlier
output of the same command (marked by ``OUT/.kamim-output.json``, written when the command first
creates its output, or recognised by a file only that command writes, for folders written before
the marker existed). Anything else is refused with :class:`OutputDirError` (one line, exit 2)
unless the caller passes ``overwrite=True`` (``--overwrite`` on the command line). Commands that
replace their whole output (``kamim-analyze``) thus never delete a file they did not write without
that explicit flag, and training commands never resume into or mix files with a foreign folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MARKER", "OUT_RULE", "OVERWRITE_HELP", "OutputDirError", "check_output_dir", "mark_output_dir",
           "output_command"]

MARKER = ".kamim-output.json"
#: the rule as the ``--help`` of every command with ``--out`` states it
OUT_RULE = ("it must be new, empty or an earlier output of this command ({action}); "
            "anything else is refused unless --overwrite is given")
OVERWRITE_HELP = "use --out even if it holds files this command did not write ({effect})"
_SHOWN = 3  # foreign entries named in the error message


class OutputDirError(ValueError):
    """An output folder this command may not write into (one-line message)."""


def output_command(out: str | os.PathLike) -> str | None:
    """The command recorded in ``out``'s marker, or None (no marker, or unreadable)."""
    try:
        record = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return command if isinstance(command, str) else None


def check_output_dir(
    out: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    legacy: Sequence[str] = (),
    option: str = "--out",
) -> Path:
    """``out`` as a Path if ``command`` may write into it, else :class:`OutputDirError`.

    ``legacy``: file names that only ``command`` writes; a folder holding one of them is an
    earlier output of ``command`` made before markers existed. ``option`` names the value in
    messages. Nothing is created or written.
    """
    if not str(out).strip():
        raise OutputDirError(f"{option} is empty: give the folder to write into")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option} '{path}' exists and is not a folder")
    if not path.exists() or overwrite:
        return path
    try:
        entries = sorted(e.name for e in path.iterdir())
    except OSError as err:
        raise OutputDirError(f"cannot read {option} '{path}': {err.strerror or err}") from None
    if not entries:
        return path
    owner = output_command(path)
    if owner == command or (owner is None and any((path / name).is_file() for name in legacy)):
        return path
    what = f"an output of '{owner}'" if owner else "files this command did not write"
    shown = ", ".join(entries[:_SHOWN]) + (f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else "")
    raise OutputDirError(
        f"{option} '{path}' holds {what} ({shown}); choose an empty or new folder, "
        f"or pass --overwrite to write into it anyway"
    )


def mark_output_dir(out: str | os.PathLike, command: str) -> None:
    """Record ``command`` as the writer of the (existing) folder ``out`` (atomic, idempotent)."""
    from kamim import __version__
    from kamim.serialization import atomic_write_json

    if output_command(out) != command:
        atomic_write_json({"command": command, "kamim": __version__}, Path(out) / MARKER)
