"""What this machine runs kamim with: versions, device, CPU (``kamim doctor``; reports record it too).

:func:`environment_report` returns the facts as ``{name: text}``, one entry per line that
``kamim doctor`` prints, so that a results file can store the same dict. :func:`available_cpus`
is the CPU count loader workers are clamped to (:func:`kamim.data.loader_workers`); this module
imports torch only inside :func:`environment_report`.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path
from typing import Optional

__all__ = ["PACKAGES", "available_cpus", "available_memory", "cpu_model", "environment_report", "package_version"]

#: report key -> module whose ``__version__`` is reported
PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "opencv": "cv2", "pillow": "PIL",
    "numpy": "numpy", "safetensors": "safetensors", "transformers": "transformers",
}
def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container allocation)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def available_memory(device: str = "cpu", meminfo: str = "/proc/meminfo",
                     cgroup: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes this process can still allocate on ``device`` (None where it cannot be told).

    CUDA: the device's free memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` of
    ``meminfo``, capped by the cgroup v2 limit of a container or job (``memory.max - memory.current``).
    """
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free: Optional[int] = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path(cgroup, "memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's name from ``cpuinfo`` ("model name", or "Hardware"/"Model" on Arm), else
    :func:`platform.processor` or the machine type."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def package_version(module: str) -> str:
    """``module.__version__``, ``"not installed"``, or ``"broken (...)"`` if importing it fails."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.split(".")[0] != err.name.split(".")[0]:
            return f"broken (missing {err.name})"
        return "not installed"
    except Exception as err:  # an installed package that does not import is worth one line
        return f"broken ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    return str(getattr(mod, "__version__", "unknown version"))


def _bf16(native: Optional[bool]) -> str:
    return {True: "native bf16", False: "no native bf16 (bf16 autocast is slow)", None: "bf16 support unknown"}[native]


def environment_report() -> dict[str, str]:
    """One line of text per fact: kamim and python, each package of :data:`PACKAGES`, the device
    (CUDA devices or ``cpu``), the CPU model with its bf16 support, and the CPUs available."""
    from kamim import __version__

    report = {"kamim": __version__,
              "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
              "platform": platform.platform()}
    report.update({key: package_version(module) for key, module in PACKAGES.items()})
    report["device"] = _device()
    from kamim.precision import cpu_has_native_bf16

    report["cpu"] = f"{cpu_model()}, {_bf16(cpu_has_native_bf16())}"
    report["cpus"] = f"{available_cpus()} available (of {os.cpu_count() or '?'} on the machine)"
    return report


def _device() -> str:
    try:
        import torch
    except Exception:
        return "cpu (torch unavailable)"
    if not torch.cuda.is_available():
        return "cpu (no CUDA device visible)" if torch.version.cuda else "cpu (torch built without CUDA)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"cuda: {', '.join(names)} (CUDA {torch.version.cuda})"
