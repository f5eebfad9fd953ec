"""bf16 on the CPU: flag parsing and the one-time warning."""
from __future__ import annotations

import logging
import pytest
import torch

import kamim.precision as precision
from kamim.precision import amp_dtype_of

X86_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_cpu_bf16_flags():
    assert precision.cpu_bf16_flags(X86_AVX2) == (set(), True)
    assert precision.cpu_bf16_flags(X86_AMX) == ({"avx512_bf16", "amx_bf16"}, True)
    assert precision.cpu_bf16_flags(ARM) == ({"bf16"}, True)
    assert precision.cpu_bf16_flags("model name: something\n") == (set(), False)


def test_cpu_has_native_bf16_from_a_cpuinfo_file(tmp_path):
    for name, text, expected in (("avx2", X86_AVX2, False), ("amx", X86_AMX, True), ("arm", ARM, True),
                                 ("noflags", "model name: x\n", None)):
        path = tmp_path / name
        path.write_text(text)
        assert precision.cpu_has_native_bf16(str(path)) is expected, name
    assert precision.cpu_has_native_bf16(str(tmp_path / "missing")) is None


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(precision, "_warned", False)
    return monkeypatch


def test_warns_once_for_bf16_on_a_cpu_without_native_bf16(fresh_warning, caplog):
    fresh_warning.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kamim"):
        assert not precision.warn_if_slow_bf16("none", "cpu")
        assert not precision.warn_if_slow_bf16("bf16", "cuda")
        assert precision.warn_if_slow_bf16("bf16", "cpu")
        assert not precision.warn_if_slow_bf16("bf16", torch.device("cpu"))  # once per process
    assert len(caplog.records) == 1 and "without native bf16" in caplog.records[0].getMessage()


@pytest.mark.parametrize("native", [True, None])
def test_no_warning_with_native_or_unknown_bf16(fresh_warning, caplog, native):
    fresh_warning.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="kamim"):
        assert not precision.warn_if_slow_bf16("bf16", "cpu")
    assert not caplog.records


def test_eval_runs_warn_through_amp_dtype_of(fresh_warning, caplog):
    fresh_warning.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kamim"):
        assert amp_dtype_of("bf16", "cpu") is torch.bfloat16
    assert len(caplog.records) == 1
