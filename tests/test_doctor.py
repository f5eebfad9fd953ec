"""``kamim doctor`` and :func:`kamim.doctor.environment_report`: versions, device, CPU."""
from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch

import kamim
from kamim import doctor
from kamim.cli import main

KEYS = ["kamim", "python", "platform", "torch", "torchvision", "timm", "opencv", "pillow", "numpy",
        "safetensors", "transformers", "device", "cpu", "cpus"]


@pytest.fixture(scope="module")
def report() -> dict[str, str]:
    return doctor.environment_report()


def test_report_has_one_text_per_fact(report):
    assert list(report) == KEYS
    assert all(isinstance(v, str) and v and "\n" not in v for v in report.values()), report
    assert report["kamim"] == kamim.__version__
    assert report["python"].startswith(platform.python_version())
    assert report["torch"] == torch.__version__ and report["numpy"] == np.__version__
    import cv2
    import PIL

    assert report["opencv"] == cv2.__version__ and report["pillow"] == PIL.__version__
    assert report["cpus"].startswith(f"{doctor.available_cpus()} available")
    assert report["cpu"].startswith(doctor.cpu_model())
    if torch.cuda.is_available():
        assert report["device"].startswith("cuda: " + torch.cuda.get_device_name(0))
    else:
        assert report["device"].startswith("cpu")


def test_cpu_model_and_versions(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
                    "flags\t\t: fpu avx2\n")
    assert doctor.cpu_model(str(info)) == "Intel(R) Xeon(R) Gold 6338"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert doctor.cpu_model(str(info)) == (platform.processor() or platform.machine() or "unknown")
    assert doctor.cpu_model(str(tmp_path / "missing")) == (platform.processor() or platform.machine() or "unknown")
    assert doctor.package_version("kamim_no_such_package") == "not installed"
    assert doctor.package_version("numpy") == np.__version__


def test_available_cpus_follow_the_affinity_mask():
    if hasattr(os, "sched_getaffinity"):
        assert doctor.available_cpus() == len(os.sched_getaffinity(0))
    assert doctor.available_cpus() >= 1


def test_doctor_command_prints_one_line_each(report, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "environment_report", lambda: dict(report))
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == KEYS
    assert [ln.split(":", 1)[1].strip() for ln in lines] == list(report.values())


def test_available_memory_is_meminfo_capped_by_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert doctor.available_memory("cpu", str(meminfo), str(cgroup)) == 20000000 * 1024  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("5000\n")
    assert doctor.available_memory("cpu", str(meminfo), str(cgroup)) == 20000000 * 1024  # unlimited
    (cgroup / "memory.max").write_text(f"{8 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    assert doctor.available_memory("cpu", str(meminfo), str(cgroup)) == 7 * 2**30  # the job's limit
    assert doctor.available_memory("cpu", str(tmp_path / "none"), str(tmp_path / "none")) is None
