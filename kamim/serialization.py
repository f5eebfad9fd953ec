"""Atomic writes and safe loading of checkpoints and results.

* Every write goes to a temporary file in the destination directory, is flushed and fsync'ed,
  then ``os.replace``'d over the target: a crash or a failing writer never leaves a partial file.
* ``safe_load`` only ever unpickles with ``torch.load(weights_only=True)``; a pickle that would
  import or call arbitrary code is refused with a one-line ``UnsafeCheckpointError``.
* ``save_safetensors``/``load_safetensors`` for weight exports (no pickle at all).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional

import torch

__all__ = [
    "json_safe",
    "CHECKSUM_KEY",
    "content_checksum",
    "CheckpointError", "UnsafeCheckpointError", "atomic_write", "atomic_save",
    "atomic_write_text", "atomic_write_json", "safe_load", "save_safetensors",
    "load_safetensors", "read_safetensors_metadata", "make_temp_dir", "umask_mode", "remove_stale_temp_files",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (corrupt, truncated, wrong format)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code when loaded; refused."""


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    # Linux shows the umask in /proc without changing it (os.umask can only set-and-restore,
    # which races with other threads creating files).
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def umask_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (0o666) or folder (0o777) under the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def make_temp_dir(parent: str | Path, prefix: str, suffix: str = "") -> Path:
    """A new uniquely named folder in ``parent`` with the umask's mode (``mkdtemp`` makes 0700),
    for staging an output that is renamed into place."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(path, umask_mode(directory=True))
    return path


# the names atomic_write's mkstemp gives: ".<target>.<8 random characters>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``directory``.

    Call it only while holding the directory's lock (:func:`kamim.outputs.lock_output`): a
    concurrent writer's temporary file would look the same. Returns the removed paths.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Context manager yielding a temp file in ``path``'s directory, renamed over ``path`` on success.

    The file gets the mode of any newly created file (``0o666`` minus the umask).
    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())  # mkstemp makes 0600; the result is an ordinary file
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


CHECKSUM_KEY = "kamim_checksum"  # the content checksum atomic_save puts into a dict checkpoint


def content_checksum(obj: Any) -> str:
    """sha256 over the content of a checkpoint object: every tensor's dtype, shape and bytes and every
    other value's ``repr``, walked in a fixed order (mapping keys sorted). torch does not check the
    CRCs of its zip archive, so flipped bytes inside a tensor would otherwise load silently."""
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            if t.numel():
                digest.update(t.view(torch.uint8).numpy())  # the tensor's own buffer, not a copy
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                walk(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                walk(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    walk(obj)
    return digest.hexdigest()


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically; a dict gets its :func:`content_checksum` under
    :data:`CHECKSUM_KEY`, which :func:`safe_load` verifies (a mismatch is a one-line error)."""
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
        obj[CHECKSUM_KEY] = content_checksum(obj)
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(obj: Any, path: str | Path, indent: int = 2) -> Path:
    """Write JSON atomically (``allow_nan=False``: NaN/inf must be handled by the caller)."""
    return atomic_write_text(json.dumps(obj, indent=indent, allow_nan=False) + "\n", path)


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Raises ``FileNotFoundError`` for a missing file, ``UnsafeCheckpointError`` for a pickle that
    needs code execution (anything outside the ``weights_only`` allow-list) and
    ``CheckpointError`` for a file that is no checkpoint, a truncated one, or one whose content does
    not match the checksum :func:`atomic_save` wrote into it (the key is removed from the result).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip archive, or a pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts "
                              f"with {head!r})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in reason if "GLOBAL" in ln), "")
        if not detail:  # the weights-only unpickler choked on the bytes, not on a forbidden global
            first = next((ln.strip() for ln in reason if "Unsupported" in ln), reason[0] if reason else "")
            raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {first}") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a weights-only checkpoint and could run code when "
            f"unpickled{(' (' + detail + ')') if detail else ''}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        # garbage bytes make the weights-only unpickler fail in assorted ways (IndexError on an
        # empty stack, KeyError on a bad memo, ...): all mean "not a readable checkpoint"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {first}") from None
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        recorded = obj.pop(CHECKSUM_KEY)
        if content_checksum(obj) != recorded:
            raise CheckpointError(f"{path} is corrupted: its content does not match the checksum written with it "
                                  f"(restore it from a copy, or rerun with --resume none)")
    return obj


def _contiguous_cpu(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage and non-contiguous views; an independent
    # contiguous CPU clone of each entry stores shared weights (e.g. tied embeddings) twice,
    # which keeps every key loadable with strict=True.
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict entry '{k}' is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``state_dict`` as safetensors atomically; metadata values are stored as strings
    (non-string values JSON-encoded)."""
    from safetensors.torch import save

    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    blob = save(_contiguous_cpu(state_dict), metadata=meta)
    with atomic_write(path, "wb") as f:
        f.write(blob)
    return Path(path)


def load_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file -> (state_dict, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        return load_file(path, device=device), read_safetensors_metadata(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (without loading the tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def json_safe(obj: Any) -> Any:
    """Plain JSON data: tuples -> lists, Paths -> str, tensors -> numbers/lists, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return obj
