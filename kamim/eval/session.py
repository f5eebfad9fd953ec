"""The session of one evaluation run: its process group and its output directory.

* :func:`distributed_session` sets up torch.distributed for the body and tears down only what it
  created (a sweep under torchrun keeps its one process group across runs).
* :func:`claimed_run_dir` / :func:`locked_output` hold an exclusive lock on the run directory for the
  run's lifetime, so two processes never write into one folder (the folder itself was checked by
  :func:`kamim.inputs.preflight`: new, empty or this command's own earlier output).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kamim import distributed as kdist
from kamim import outputs
from kamim.distributed import DistInfo
from kamim.serialization import remove_stale_temp_files

__all__ = ["distributed_session", "claimed_run_dir", "locked_output"]


@contextlib.contextmanager
def distributed_session(device: str) -> Iterator[DistInfo]:
    """``init_distributed(device)`` for the body; the process group is destroyed afterwards only if
    this call created it (one set up by the caller, e.g. a sweep under torchrun, is left alone)."""
    created = not kdist.is_distributed()
    info = kdist.init_distributed(device)
    try:
        yield info
    finally:
        if created:
            kdist.cleanup()


@contextlib.contextmanager
def locked_output(out_dir: str | os.PathLike, info: DistInfo, claim: str | None = None,
                  what: str = "--out") -> Iterator[None]:
    """Rank 0 holds the output folder's lock (:func:`kamim.outputs.lock_output`, the one lock every
    command takes on its ``--out``) for the body; a second process gets a one-line error naming this
    one's pid; every rank waits for rank 0. Without ``claim`` nothing is created in ``out_dir`` (bad
    input leaves no empty folder behind); with ``claim`` (a task name) rank 0 then creates the folder,
    marks it as ``kamim TASK``'s and removes the temporary files of earlier killed saves."""
    lock = None
    if info.is_main:
        lock = outputs.lock_output(out_dir, f"{what} '{out_dir}'")
        if claim is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            outputs.mark_output_dir(out_dir, f"kamim {claim}")
            remove_stale_temp_files(out_dir)
    try:
        kdist.barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


def claimed_run_dir(out_dir: Path, task: str, info: DistInfo) -> contextlib.AbstractContextManager[None]:
    """The run directory of a training evaluation, locked and claimed for ``kamim TASK`` until exit
    (:func:`locked_output` with ``claim``)."""
    return locked_output(out_dir, info, claim=task, what="run directory")
