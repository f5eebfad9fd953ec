"""How fast a bad configuration is refused, against the time ``import torch`` takes.

Every command validates its config (preset, keys, values) before importing torch, so a typo costs
a fraction of a second instead of a torch start-up. This script times, in one run and side by side,
fresh processes of::

    kamim pretrain --config no_such_preset --out OUT
    kamim pretrain --config tiny_kamim --out OUT --set no.such.key=1
    kamim linprobe --config nope --checkpoint c --data d --out OUT
    python -c "import torch"

and prints the median wall time of each over ``--repeats`` rounds (interleaved, so that machine load
affects all alike) and its ratio to ``import torch``. Target: under a third of ``import torch``.

    python bench/bench_config_errors.py --repeats 7
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(argv: list[str], expect: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}, expected {expect}: {proc.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "out"
    kamim = [sys.executable, "-m", "kamim.cli"]
    cases = {
        "unknown preset": ([*kamim, "pretrain", "--config", "no_such_preset", "--out", str(out)], 2),
        "unknown --set key": ([*kamim, "pretrain", "--config", "tiny_kamim", "--out", str(out),
                               "--set", "no.such.key=1"], 2),
        "unknown eval recipe": ([*kamim, "linprobe", "--config", "nope", "--checkpoint", "c", "--data", "d",
                                 "--out", str(out)], 2),
        "import torch": ([sys.executable, "-c", "import torch"], 0),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (argv, expect) in cases.items():
            times[name].append(_time(argv, expect))
    torch_s = statistics.median(times["import torch"])
    print(f"{'case':<22} {'median s':>9} {'/ import torch':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22} {med:>9.3f} {med / torch_s:>15.3f}")


if __name__ == "__main__":
    main()
