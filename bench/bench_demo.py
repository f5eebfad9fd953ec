"""Wall time of ``kamim-analyze demo`` from a cold cache (install excluded), as a new user runs it.

Runs the demo in a fresh process with an empty ``$KAMIM_DATA_DIR`` (the demo photographs are
written again) and an empty checkpoint cache (the three demo models are trained again), then once
more on the warm cache (only the analyses and the report), and prints both times, the pretraining
share read from the demo's logs, and the CPU. The issue's budget: the first run under 10 minutes on
2 CPU cores.

    python bench/bench_demo.py            # the full demo
    python bench/bench_demo.py --fast     # kamim-analyze demo --fast
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kamim.doctor import cpu_model


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="time kamim-analyze demo --fast")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "KAMIM_DATA_DIR": str(Path(tmp) / "data"), "MPLBACKEND": "Agg"}
        argv = [sys.executable, "-m", "analysis.cli", "demo", "--cache", str(Path(tmp) / "cache"),
                "--no-progress", *(["--fast"] if args.fast else [])]
        cold, log = _run([*argv, "--out", str(Path(tmp) / "cold")], env)
        warm, _ = _run([*argv, "--out", str(Path(tmp) / "warm")], env)
    stamps = [time.strptime(t, "%H:%M:%S") for t in re.findall(r"^(\d\d:\d\d:\d\d) kamim\.pretrain", log, re.M)]
    train = (time.mktime(stamps[-1]) - time.mktime(stamps[0])) if len(stamps) > 1 else float("nan")
    print(f"kamim-analyze demo{' --fast' if args.fast else ''} on {cpu_model()}, {os.cpu_count()} logical CPUs")
    print(f"cold cache (photographs written, 3 models trained, analyses, report): {cold:7.1f} s")
    print(f"  of which pretraining (first to last pretraining log line):         {train:7.1f} s")
    print(f"warm cache (analyses and report only):                                {warm:7.1f} s")
    print(f"cold run within the 10-minute budget: {'yes' if cold < 600 else 'NO'}")


if __name__ == "__main__":
    main()
