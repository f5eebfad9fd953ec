"""Output folders: the one rule every command that writes a folder follows.

* A command writes into ``OUT`` only when ``OUT`` does not exist, is empty, or holds an earlier
  output of the same command (marked by ``OUT/.kamim-output.json``, written when the command first
  creates its output, or recognised by a file only that command writes, for folders written before
  the marker existed). Anything else is refused with :class:`OutputDirError` (one line, exit 2)
  unless the caller passes ``overwrite=True`` (``--overwrite``).
* ``--overwrite`` means the same in every command: write into ``OUT`` although it holds files this
  command did not write; **those files are kept**, files of the same name are replaced.
* Replacing an earlier output replaces what the command wrote and keeps everything else: commands
  that write in place never delete, and :func:`staged_dir` (``kamim-analyze``, which replaces its
  folder as a whole) carries every entry it did not write (the marker lists what it wrote) into the
  new folder, by hard link, before the atomic swap; a kill at any point loses none of them.
* An output folder that is, contains or lies inside an input of the command (data folder,
  checkpoint, plugin file: ``inputs=``) is refused, ``--overwrite`` or not.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["LOCK", "MARKER", "OUT_RULE", "OVERWRITE_HELP", "OutputDirError", "OutputLock", "check_output_dir",
           "check_not_input", "lock_output", "lock_path", "mark_output_dir", "output_command", "written_files",
           "staged_dir"]

MARKER = ".kamim-output.json"
LOCK = ".kamim.lock"  # the lock file inside run directories of earlier versions (skipped, never carried over)
#: the rule as the ``--help`` of every command with ``--out`` states it
OUT_RULE = ("it must be new, empty or an earlier output of this command ({action}); "
            "anything else is refused unless --overwrite is given")
OVERWRITE_HELP = ("use --out even if it holds files this command did not write: they are kept, files of the "
                  "same name are replaced")
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


def written_files(out: str | os.PathLike) -> set[str] | None:
    """The files (relative paths) the recorded command wrote into ``out``, from its marker; None
    where the marker lists none (written in place, or before markers listed files)."""
    try:
        record = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    return {str(f) for f in files} if isinstance(files, list) else None


def check_not_input(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                    option: str = "--out") -> None:
    """:class:`OutputDirError` if ``out`` is, contains or lies inside an existing input path.

    ``inputs``: what the path is (``"--data folder"``, ``"checkpoint of model A"``) -> path; values
    that are not existing paths (timm or manifest names, None) are skipped.
    """
    target = Path(out).expanduser().resolve()
    for what, source in inputs.items():
        if source is None or not str(source).strip():
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if target == src:
            relation = "is"
        elif target in src.parents:
            relation = "contains"
        elif src in target.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputDirError(f"{option} '{out}' {relation} the {what} '{source}': write the output apart from "
                             f"the inputs (--overwrite does not change this)")


def check_output_dir(
    out: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    legacy: Sequence[str] = (),
    option: str = "--out",
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> Path:
    """``out`` as a Path if ``command`` may write into it, else :class:`OutputDirError`.

    ``legacy``: file names that only ``command`` writes; a folder holding one of them is an
    earlier output of ``command`` made before markers existed. ``inputs``: the command's input
    paths, which ``out`` may not be, contain or lie inside (:func:`check_not_input`). ``option``
    names the value in messages. Nothing is created or written.
    """
    if not str(out).strip():
        raise OutputDirError(f"{option} is empty: give the folder to write into")
    text = os.fspath(out) if not isinstance(out, bytes) else os.fsdecode(out)
    if any(c in text for c in "\n\r"):
        raise OutputDirError(f"{option} {text!r} contains a line break: choose a folder name without one")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 (surrogate-escaped): metadata could not hold it
        raise OutputDirError(f"{option} {text!r} is not valid UTF-8: choose a folder name in UTF-8") from None
    path = Path(out).expanduser()
    check_not_input(path, inputs or {}, option)
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


class OutputLock:
    """An exclusive ``flock`` on a lock file, held until :meth:`release` (or the process dies: the
    OS drops it, so a killed run never leaves a stale lock). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        from kamim.serialization import umask_mode

        self.path = Path(path)
        self._fd: int | None = None  # set first: __del__ must find it even when open() fails
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, umask_mode())
        except OSError as err:
            raise OutputDirError(f"cannot create the lock file '{self.path}' for {what}: "
                                 f"{err.strerror or err}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirError(f"{what} is in use by another process (pid {holder}); wait for it to "
                                     f"finish or choose another folder") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# the longest folder name (bytes) whose lock and staging names beside it are ".NAME" plus a suffix;
# a longer legal name (up to the file system's 255 bytes) gets a shortened, still unique stem
_STEM_BYTES = 200


def sibling_stem(out: Path) -> str:
    """``.NAME``: how the lock file and the staging folders beside the output folder ``out`` begin.
    A name longer than 200 bytes is shortened to its first 180 bytes, ``~`` and 16 hex digits of its
    SHA-1, so that ``.NAME.lock`` and ``.NAME.TOKEN.partial`` fit the file system's 255 bytes."""
    raw = os.fsencode(out.name)
    if len(raw) <= _STEM_BYTES:
        return f".{out.name}"
    head = os.fsdecode(raw[:180])
    while len(os.fsencode(head)) > 180:  # a surrogate-escaped byte may encode longer: drop it
        head = head[:-1]
    return f".{head}~{hashlib.sha1(raw).hexdigest()[:16]}"


def lock_path(out: str | os.PathLike) -> Path:
    """The one lock file of the output folder ``out``: ``.NAME.lock`` beside it (a symlinked ``out``:
    beside its target; :func:`sibling_stem` for a very long name), so that it survives the folder being
    swapped and every command, writing in place or replacing the folder, takes the same lock."""
    path = Path(out).expanduser().absolute()
    if path.is_symlink():
        path = path.resolve()
    return path.parent / f"{sibling_stem(path)}.lock"


def lock_output(out: str | os.PathLike, what: str | None = None) -> OutputLock:
    """Lock the output folder ``out`` (:func:`lock_path`) for this process; :class:`OutputDirError`
    naming the holder's pid if another process has it. Take it before reading anything in ``out``."""
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot write next to --out '{out}': {err.strerror or err}") from None
    return OutputLock(path, what or f"--out '{out}'")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    Python has no binding for it; without it a folder cannot be replaced by another in one step.
    """
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _debris(out: Path) -> list[Path]:
    """Staging folders of earlier killed runs of exactly ``out``: ``STEM.TOKEN.partial|.old``
    (:func:`sibling_stem`) where TOKEN has no dot (``make_temp_dir``'s), so that
    ``.res.v2.TOKEN.partial`` of a concurrent ``--out res.v2`` is never taken for debris of ``res``.
    Called with ``out``'s lock held."""
    stem, found = sibling_stem(out) + ".", []
    with os.scandir(out.parent) as entries:
        for entry in entries:
            for suffix in (".partial", ".old"):
                token = entry.name[len(stem): -len(suffix)]
                if (entry.name.startswith(stem) and entry.name.endswith(suffix) and token and "." not in token
                        and entry.is_dir(follow_symlinks=False)):
                    found.append(Path(entry.path))
    return sorted(found)


def _carry_over(old: Path, new: Path, ours: set[str] | None) -> list[str]:
    """Hard-link into ``new`` every file of ``old`` that the command did not write (not in ``ours``,
    the marker's list, nor written anew in ``new``); returns their relative paths. A hard link adds a
    name and never moves data, so the files stay in ``old`` until the swap and are never lost."""
    kept = []
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old).as_posix()
        if path.is_dir() and not path.is_symlink() or rel == MARKER or rel.startswith(LOCK):
            continue
        if (ours is not None and rel in ours) or (new / rel).exists() or (new / rel).is_symlink():
            continue  # written by this command: replaced
        dest = new / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), dest)
        else:
            try:
                os.link(path, dest)
            except OSError:  # another file system or no hard links there: a copy
                shutil.copy2(path, dest)
        kept.append(rel)
    return kept


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, command: str, *, overwrite: bool = False,
               inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Iterator[Path]:
    """Yield a staging folder next to ``out`` that replaces ``out`` as a whole on success.

    ``out`` must pass :func:`check_output_dir` for ``command`` (``inputs``: the paths it may not
    overlap). What ``out`` holds that the command did not write (user files, other tools' files)
    is carried into the new folder before the swap, so replacing an output never deletes them; the
    marker records the files the command wrote. While the context runs, the lock
    file ``.NAME.lock`` beside ``out`` is held (a second process gets a one-line error naming this
    one's pid) and the staging folders of earlier killed runs of the same output are removed. At
    every instant ``out`` is either the old or the new complete folder (an atomic exchange where
    the OS has one; elsewhere a killed swap is undone by the next run). A symlinked ``out`` is
    written through: its target is replaced. On any exception the staging folder is removed and
    ``out`` is left as it was.
    """
    from kamim import __version__
    from kamim.serialization import atomic_write_json, make_temp_dir

    out = check_output_dir(out, command, overwrite=overwrite, inputs=inputs).absolute()
    if out.is_symlink():
        out = out.resolve()
    try:
        lock = lock_output(out)
    except OSError as err:
        raise OutputDirError(f"cannot write next to --out '{out}': {err.strerror or err}") from None
    with lock:
        leftovers = _debris(out)
        if not out.exists() and any(p.suffix == ".old" for p in leftovers):
            # a run killed between the two renames of the fallback swap: put the old output back
            os.replace(max((p for p in leftovers if p.suffix == ".old"), key=lambda p: p.stat().st_mtime), out)
        for path in _debris(out):
            shutil.rmtree(path, ignore_errors=True)
        try:
            staging = make_temp_dir(out.parent, prefix=f"{sibling_stem(out)}.", suffix=".partial")
        except OSError as err:
            raise OutputDirError(f"cannot write next to --out '{out}': {err.strerror or err}") from None
        try:
            yield staging
            written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                             if p.is_file() or p.is_symlink())
            if out.is_dir():
                _carry_over(out, staging, written_files(out))
            atomic_write_json({"command": command, "kamim": __version__, "files": written}, staging / MARKER)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not out.exists():
            os.replace(staging, out)
        elif _exchange(staging, out):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old output
        else:
            old = staging.with_name(staging.name[: -len(".partial")] + ".old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
    # the lock file stays: unlinking it would let a process that opened it before the unlink
    # and one that creates it anew both take "the" lock
