"""Peak memory of the analysis pass against the lower bound ``kamim-analyze run`` refuses by.

``analysis.runner.pass_bytes`` is what one batch must hold at least (the captured maps and tokens of
every block, one block's transients); ``kamim-analyze run`` refuses a batch whose bound exceeds the
memory left, so that ``--image-size 4096`` is one line instead of an allocation traceback. This
script measures, in fresh processes (one per case, so that each peak is its own), the peak resident
memory of an analysis pass of the CPU preset ``vit_pico`` (patch 8, depth 6, 3 heads) over
real photographs, minus the peak of the same process with an analysis that captures nothing
heavy (``tsne`` at 32 px: imports, model, data), and prints it next to the bound and their ratio.
A ratio >= 1 everywhere is what makes the refusal safe (a run it refuses could not have fitted).

    python bench/bench_analysis_memory.py --sizes 192 288 384 --batch 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CASE = """
import json, resource, sys
from pathlib import Path
from analysis.pipeline import analyze
models, data, out, size, batch, analyses = json.loads(sys.argv[1])
analyze(models, data, out, analyses=tuple(analyses), image_size=size, images=batch, batch_size=batch,
        progress=False, workers=0, options={"tsne_samples": 8})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak(models: dict, data: str, out: str, size: int, batch: int, analyses: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", _CASE, json.dumps([models, data, out, size, batch, analyses])],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr.strip().splitlines()[-1])
    return int(proc.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 288, 384])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from analysis.registry import get
    from analysis.runner import pass_bytes
    from kamim import load_encoder, pretrain, write_demo_folder
    from kamim.config import load_config
    from kamim.doctor import cpu_model

    groups = {"attention (4 analyses)": ["attention-distance", "nmi", "attention-entropy", "attention-similarity"],
              "rollout": ["rollout"], "tokens (cka, fourier, pre-post)": ["cka", "fourier", "pre-post"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_demo_folder(tmp / "demo", crops_per_photo=1, max_side=192)
        run = tmp / "run"
        pretrain(load_config("tiny_simmim", ["run.max_steps=1", "run.progress=false"]), data, run, resume="none")
        models = {"pico": str(run / "encoder.safetensors")}
        base = _peak(models, str(data), str(tmp / "o"), 32, args.batch, ["tsne"])
        print(f"CPU: {cpu_model()}; batch {args.batch}; baseline process peak {base / 2**30:.2f} GiB")
        print(f"{'analyses':34s} {'size':>5s} {'bound GiB':>10s} {'measured GiB':>13s} {'ratio':>6s}")
        for size in args.sizes:
            geometry = load_encoder(models["pico"], img_size=size).geometry
            for label, analyses in groups.items():
                needs = set().union(*(get(a).needs for a in analyses))
                bound = pass_bytes(geometry, args.batch, needs)
                measured = _peak(models, str(data), str(tmp / "o"), size, args.batch, analyses) - base
                print(f"{label:34s} {size:5d} {bound / 2**30:10.2f} {measured / 2**30:13.2f} "
                      f"{measured / bound:6.2f}")


if __name__ == "__main__":
    main()
