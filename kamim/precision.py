"""Precision: the one autocast of the toolkit (training, evaluation and analysis), and whether this
CPU multiplies bfloat16 natively.

``amp`` is a name (``bf16`` | ``fp16`` | ``none``, :data:`kamim.config.AMP_MODES`); :func:`amp_dtype_of`
turns it into a dtype at the boundary (one-line errors), :func:`autocast` enters ``torch.autocast`` for it.

Without AVX512-BF16 or AMX (x86), or the BF16 extension (Arm), torch multiplies bf16 through a slow
fallback: on the AVX2 machine of ``BENCHMARKS.md`` a bf16-autocast training step ran 12x slower than
fp32 (bf16 matmuls at 0.01-0.04x the fp32 rate). Runs that ask for bf16 on such a CPU get a one-line
warning; nothing is changed behind the user's back.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

from kamim.config import AMP_MODES

__all__ = ["amp_dtype_of", "autocast", "cpu_bf16_flags", "cpu_has_native_bf16", "resolve_amp", "warn_if_slow_bf16"]

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


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """``amp`` with ``"auto"`` resolved for ``device``: ``bf16`` on CUDA (where the GPU supports it)
    and on CPUs that multiply bf16 natively, ``none`` (fp32) elsewhere, logged once per call. Other
    values are returned unchanged. Runs record the resolved value (their results and config.yaml)."""
    if amp != "auto":
        return amp
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        where = "CUDA " + ("with" if native else "without") + " bf16"
    else:
        native = device.type == "cpu" and cpu_has_native_bf16() is True
        where = f"a {device.type.upper()} " + ("with native bf16" if native else "without native bf16")
    resolved = "bf16" if native else "none"
    log.info("amp auto -> %s (%s)", resolved, where)
    return resolved


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def amp_dtype_of(amp: str, device: torch.device | str, warn: bool = True, key: str = "amp") -> torch.dtype | None:
    """``bf16`` -> bfloat16, ``fp16`` -> float16 (CUDA only), ``none`` -> None (full precision).

    bf16 on a CPU without native bf16 logs a one-time warning (:func:`warn_if_slow_bf16`)
    unless ``warn=False`` (e.g. on non-zero ranks). ``key`` names the setting in the one-line
    ``ConfigError`` for an invalid value.
    """
    from kamim.config import ConfigError

    if amp not in AMP_MODES:
        raise ConfigError(f"{key} {amp!r} is not valid; expected one of {', '.join(AMP_MODES)}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ConfigError(f"{key}=fp16 needs a CUDA device (device is {device}); use bf16 or none")
    if warn:
        warn_if_slow_bf16(amp, device)
    return _DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | str | None):
    """``torch.autocast`` for ``dtype`` (a dtype or an ``amp`` name) on ``device``, or a no-op
    context for full precision."""
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
