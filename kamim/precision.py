"""bf16 on the CPU: does this CPU multiply bfloat16 natively?

Without AVX512-BF16 or AMX (x86), or the BF16 extension (Arm), torch multiplies bf16 through a slow
fallback: on the AVX2 machine of ``BENCHMARKS.md`` a bf16-autocast training step ran 12x slower than
fp32 (bf16 matmuls at 0.01-0.04x the fp32 rate). Runs that ask for bf16 on such a CPU get a one-line
warning; nothing is changed behind the user's back.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

__all__ = ["cpu_bf16_flags", "cpu_has_native_bf16", "warn_if_slow_bf16"]

log = logging.getLogger("kamim")

# /proc/cpuinfo flags that mean native bf16 arithmetic: x86 AVX512-BF16 / AMX, Arm BF16 (the
# "features" line of aarch64 kernels)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_warned = False


def cpu_bf16_flags(cpuinfo: str) -> tuple[set[str], bool]:
    """(the native-bf16 flags present, whether any flags line was found) in ``/proc/cpuinfo`` text."""
    flags: set[str] = set()
    found = False
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found = True
            flags.update(value.split())
    return flags & set(NATIVE_BF16_FLAGS), found


@functools.lru_cache(maxsize=4)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has native bf16 arithmetic, from ``cpuinfo``; None where unknown (no such
    file, e.g. not Linux, or no flags line)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    native, found = cpu_bf16_flags(text)
    return bool(native) if found else None


def warn_if_slow_bf16(amp: str, device: torch.device | str) -> bool:
    """Log one warning per process when ``amp="bf16"`` runs on a CPU known to lack native bf16.

    Returns whether this call warned.
    """
    global _warned
    if _warned or amp != "bf16" or torch.device(device).type != "cpu" or cpu_has_native_bf16() is not False:
        return False
    _warned = True
    log.warning("bf16 autocast on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): expect it to be "
                "several times slower than fp32 (12x on an AVX2 machine); amp none runs at full speed")
    return True
