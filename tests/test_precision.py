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


def test_auto_amp_resolves_by_device_and_cpu(monkeypatch, caplog):
    import logging

    import kamim.precision as precision

    for native, expected in ((True, "bf16"), (False, "none"), (None, "none")):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        with caplog.at_level(logging.INFO, logger="kamim"):
            caplog.clear()
            assert precision.resolve_amp("auto", "cpu") == expected
        assert f"amp auto -> {expected}" in caplog.text
    assert precision.resolve_amp("bf16", "cpu") == "bf16" and precision.resolve_amp("none", "cuda") == "none"


def test_evaluations_default_to_auto_and_record_the_resolved_choice(tmp_path, monkeypatch):
    import json

    import kamim.precision as precision
    from eval_helpers import photo_crops, tiny_vit
    from kamim.config import COMMAND_CONFIGS, field_default
    from kamim.eval.knn import KNNConfig, run_knn

    assert all(field_default(COMMAND_CONFIGS[c], "amp") == "auto" for c in ("linprobe", "finetune", "knn"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    data = photo_crops(tmp_path / "data", n_train_per_class=3, n_val_per_class=2)
    summary = run_knn(KNNConfig(checkpoint=tiny_vit(2), data=str(data), output_dir=str(tmp_path / "knn"), ks=(3,),
                                device="cpu", num_workers=0, progress=False))
    assert summary["amp"] == "none" and json.loads((tmp_path / "knn" / "knn.json").read_text())["amp"] == "none"
