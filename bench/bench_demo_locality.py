"""Does the demo's SimMIM learn local attention? Its recipe side by side with timm's default start.

Trains the demo SimMIM (``analysis.demo.demo_overrides("SimMIM")``: 150 epochs from timm's xavier
initialisation with a sin-cos start for the position embedding) and the same recipe from timm's
default start (``model.init=timm model.pos_embed_init=timm``), both through the real pretraining
engine, analyses both (and ``random-vit_pico``) on the demo's evaluation images exactly as the demo
does, and prints the mean attention distance per layer with its gap to uniform attention.
The demo's criterion: at least one layer 10% or more below uniform. About 5 minutes on 2 CPU cores.

    python bench/bench_demo_locality.py
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from analysis.baselines import UNIFORM_BASELINES
from analysis.demo import demo_eval_folder, demo_overrides, demo_settings
from analysis.pipeline import analyze
from kamim import load_config, pretrain
from kamim.doctor import cpu_model

STARTS = {
    "demo start (xavier + sin-cos)": (),
    "timm default start": ("model.init=timm", "model.pos_embed_init=timm"),
}


def main() -> None:
    settings = demo_settings()
    print(f"demo SimMIM recipe: {' '.join(demo_overrides('SimMIM'))}")
    print(f"on {cpu_model()}, {os.cpu_count()} logical CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {}
        for name, extra in STARTS.items():
            cfg = load_config("tiny_simmim", [*demo_overrides("SimMIM"), *extra, "run.device=cpu",
                                              "run.progress=false"])
            t0 = time.perf_counter()
            checkpoints[name] = str(pretrain(cfg, data=None, out_dir=Path(tmp) / f"run{len(checkpoints)}",
                                             resume="none"))
            print(f"trained {name}: {time.perf_counter() - t0:.0f} s")
        out = analyze(checkpoints, demo_eval_folder(), Path(tmp) / "analysis", analyses=["attention-distance"],
                      images=settings.images, batch_size=settings.batch_size, progress=False,
                      baseline="random", cross_images=0)
    for name, result in out.results.items():
        rows = result.table[(result.table["metric"] == "attention-distance") & (result.table["head"] < 0)]
        uniform = UNIFORM_BASELINES["attention-distance"].value(result.geometry)
        gaps = [f"{v / uniform - 1:+.1%}" for v in rows["value"]]
        print(f"{name:32s} distance by layer (px): {', '.join(f'{v:.2f}' for v in rows['value'])}")
        print(f"{'':32s} vs uniform {uniform:.2f} px: {', '.join(gaps)}; most local layer "
              f"{rows['value'].min() / uniform - 1:+.1%}")


if __name__ == "__main__":
    main()
