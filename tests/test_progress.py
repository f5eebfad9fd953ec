"""Progress: a live bar on a terminal, periodic log lines anywhere else, nothing when disabled."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from kamim import progress as kp


def test_log_progress_lines_every_interval_and_at_the_end(caplog, monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 2.5, 3.0, 3.1, 3.2])  # start, 4 updates (+1 read per line), close
    monkeypatch.setattr(kp.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="kamim.progress"):
        bar = kp.LogProgress(total=4, desc="train", unit="step", interval=2.0)  # t0 = 0
        bar.update()  # t 0.0: no line yet
        bar.update()  # t 1.0
        bar.set_postfix(loss="0.5")
        bar.update()  # t 2.5: a line, its rate read at t 3.0: 3 steps / 3 s
        bar.update()  # t 3.1
        bar.close()   # the end, because it logged before: 4 steps / 3.2 s
    assert [r.getMessage() for r in caplog.records] == [
        "train: 3/4 step (75%), 1 step/s, loss=0.5", "train: 4/4 step (100%), 1.25 step/s, loss=0.5"]


def test_short_work_adds_no_line_and_iteration_closes(caplog):
    with caplog.at_level(logging.INFO, logger="kamim.progress"):
        assert list(kp.LogProgress(range(3), desc="x", interval=60)) == [0, 1, 2]
    assert caplog.records == []


def test_progress_is_a_bar_on_a_terminal_lines_elsewhere_and_silent_when_disabled(monkeypatch):
    monkeypatch.setattr(kp, "on_terminal", lambda: False)
    assert isinstance(kp.progress(total=3, desc="a"), kp.LogProgress)
    monkeypatch.setattr(kp, "on_terminal", lambda: True)
    bar = kp.progress(total=3, desc="a")
    from tqdm.std import tqdm

    assert isinstance(bar, tqdm) and not isinstance(bar, kp.LogProgress) and not bar.disable
    bar.close()
    silent = kp.progress(range(2), enabled=False)
    assert silent.disable and list(silent) == [0, 1]


def test_pretraining_piped_to_a_log_shows_progress_lines_and_no_bar_frames(tmp_path):
    from kamim.data import write_demo_folder

    data = write_demo_folder(tmp_path / "demo", crops_per_photo=1, max_side=96)
    env = {**os.environ, "KAMIM_PROGRESS_INTERVAL": "0"}
    proc = subprocess.run([sys.executable, "-m", "kamim.cli", "pretrain", "--config", "tiny_simmim", "--data",
                           str(data), "--out", str(tmp_path / "run"), "--set", "run.max_steps=2",
                           "--set", "optim.batch_size=8", "--set", "data.num_workers=0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if "kamim.pretrain: pretraining simmim/vit_pico" in line)
    steps = [line.split("kamim.progress: ", 1)[1].split(",")[0] for line in lines if "kamim.progress: " in line]
    assert steps[:2] == ["simmim vit_pico: 1/2 step (50%)", "simmim vit_pico: 2/2 step (100%)"], proc.stderr
    assert all("kamim.progress" not in line for line in lines[:start])  # no bar before the start-up line
    assert "\r" not in proc.stderr
