"""The offline demo: tiny SimMIM, KAMIM and MoCo v3 ViTs pretrained on the demo photographs.

Everything runs on a fresh machine without network: the photographs ship with scikit-image and
scikit-learn (:mod:`kamim.data.demo`), the models are the tiny CPU presets (``tiny_simmim``,
``tiny_kamim``, ``tiny_moco``: ``vit_pico``, 96 px, patch 8, 12×12 tokens) and training runs through
the real pretraining engine (:func:`kamim.engine.pretrain.pretrain`).

Checkpoints are cached (default ``checkpoints/demo/`` in the repository checkout, else
``$KAMIM_DATA_DIR/demo-checkpoints``): each run directory gets a ``demo.json`` fingerprint (preset,
overrides, kamim version) once training has finished, and a later call with the same settings reuses
it instead of training again. An interrupted training run resumes from its last checkpoint.

These are small demonstration models trained for a few minutes on 75 photographs (:func:`demo_note`):
their numbers show what the toolkit measures, not what KAMIM, SimMIM or MoCo v3 do at ImageNet scale.
SimMIM's recipe is chosen so that its attention is measurably local (its first layer's mean distance
more than 10% below uniform; tested), so the demo's figures compare structure, not noise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from analysis.pipeline import AnalyzeOutput, analyze

__all__ = [
    "DEMO_MODELS", "DemoSettings", "demo_note", "default_cache_dir", "demo_settings", "demo_overrides",
    "demo_checkpoints", "ensure_demo_checkpoints", "demo_eval_folder", "run_demo",
]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

# display name -> tiny preset (kamim/configs/<preset>.yaml)
DEMO_MODELS: dict[str, str] = {"SimMIM": "tiny_simmim", "KAMIM": "tiny_kamim", "MoCo v3": "tiny_moco"}
_FINGERPRINT = "demo.json"
_COMMAND = "kamim-analyze demo"


@dataclass(frozen=True)
class DemoSettings:
    """How the demo models are trained and analysed."""

    recipes: Mapping[str, tuple[str, ...]]  # tiny preset -> config overrides it is trained with
    images: int  # images analysed per model
    batch_size: int
    tsne_samples: int  # tokens in the t-SNE
    attribution_steps: int  # integrated-gradients steps

    tag: str  # cache sub-folder suffix distinguishing the settings


# Where the MIM models start: timm's xavier ("jax") initialisation and the 2-D sin-cos table as the
# starting value of the learned position embedding. From timm's default start (weights and position
# embedding ~N(0, 0.02)) the same 600 steps leave SimMIM's most local layer 0.1% below uniform
# attention; from this start its first layer's mean distance is 15% below (bench/bench_demo_locality.py,
# BENCHMARKS.md).
_MIM_START = ("model.init=jax", "model.pos_embed_init=sincos")


def demo_settings(fast: bool = False) -> DemoSettings:
    """Full demo (SimMIM and KAMIM 600 steps, MoCo v3 240) or ``fast`` (12 steps each, fewer images)."""
    if fast:
        quick = ("optim.epochs=3", "optim.warmup_epochs=1")
        return DemoSettings(recipes={"tiny_simmim": quick + _MIM_START, "tiny_kamim": quick + _MIM_START,
                                     "tiny_moco": quick + ("model.init=moco",)},
                            images=16, batch_size=16, tsne_samples=300, attribution_steps=8, tag="fast")
    # 4 steps an epoch (75 photographs, batch 16). SimMIM and KAMIM train long enough for SimMIM's
    # attention to become measurably local; MoCo v3 (two views and a momentum encoder: twice the
    # cost of a step) gets 60 epochs, so a fresh `kamim-analyze demo` stays under 10 minutes on 2
    # CPU cores (BENCHMARKS.md).
    mim = ("optim.epochs=150", "optim.warmup_epochs=5") + _MIM_START
    return DemoSettings(recipes={"tiny_simmim": mim, "tiny_kamim": mim,
                                 "tiny_moco": ("optim.epochs=60", "optim.warmup_epochs=5", "model.init=moco")},
                        images=60, batch_size=20, tsne_samples=1000, attribution_steps=32, tag="full")


def _epochs(recipe: Sequence[str]) -> str:
    return next(o.split("=", 1)[1] for o in reversed(recipe) if o.startswith("optim.epochs="))


def demo_note(fast: bool = False) -> str:
    """What the demo models are and how they were trained (printed by the CLI, carried by the report)."""
    recipes = demo_settings(fast).recipes
    mim, moco = _epochs(recipes["tiny_simmim"]), _epochs(recipes["tiny_moco"])
    return ("These are small demonstration models (vit_pico, 96 px, 12×12 tokens of 8 px) pretrained on the "
            f"75 demo photographs with the tiny presets: SimMIM and KAMIM for {mim} epochs from timm's xavier "
            "initialisation with a sin-cos start for the position embedding, MoCo v3 for "
            f"{moco} epochs{' (the --fast demo)' if fast else ''}. Their numbers illustrate the analyses and "
            "are not representative of KAMIM, SimMIM or MoCo v3 at scale. random-vit_pico is the same "
            "architecture with timm's random initialisation: curves at its level, or on the dashed "
            "uniform-attention lines, show no learned structure.")


def default_cache_dir() -> Path:
    """``checkpoints/demo`` of the repository checkout, else ``<kamim data dir>/demo-checkpoints``."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "checkpoints").is_dir():
        return repo / "checkpoints" / "demo"
    from kamim import kamim_data_dir

    return kamim_data_dir() / "demo-checkpoints"


def _fingerprint(preset: str, overrides: Sequence[str], data: Optional[str]) -> dict:
    from kamim import __version__

    return {"preset": preset, "overrides": list(overrides), "data": data,
            "kamim": __version__}


def _run_dir(cache: Path, preset: str, tag: str) -> Path:
    return cache / f"{preset}-{tag}"


def _resolve(fast: bool, overrides: Sequence[str], data: Optional[PathLike]
             ) -> tuple[dict[str, tuple[str, ...]], Optional[str], str]:
    """Preset -> the overrides it trains with (the recipe, then the caller's), the data, the cache tag."""
    settings = demo_settings(fast)
    extra = tuple(str(o) for o in overrides)
    recipes = {preset: tuple(settings.recipes[preset]) + extra for preset in DEMO_MODELS.values()}
    data = None if data is None else str(Path(data).expanduser().absolute())
    tag = settings.tag
    if extra or data is not None:  # custom runs get their own folder
        digest = hashlib.sha1(json.dumps([list(extra), data]).encode()).hexdigest()[:8]
        tag = f"{tag}-{digest}"
    return recipes, data, tag


def demo_overrides(name: str, fast: bool = False) -> tuple[str, ...]:
    """The config overrides the demo model ``name`` (a key of :data:`DEMO_MODELS`) is trained with."""
    return tuple(demo_settings(fast).recipes[DEMO_MODELS[name]])


def demo_checkpoints(cache: Optional[PathLike] = None, *, fast: bool = False,
                     overrides: Sequence[str] = (), data: Optional[PathLike] = None
                     ) -> dict[str, Path]:
    """The cached demo training checkpoints (name -> ``checkpoint-last.pt``) if all are complete.

    Raises FileNotFoundError (saying how to create them) when any is missing or was trained with
    other settings.
    """
    cache = Path(cache) if cache is not None else default_cache_dir()
    recipes, data_s, tag = _resolve(fast, overrides, data)
    found: dict[str, Path] = {}
    for name, preset in DEMO_MODELS.items():
        run = _run_dir(cache, preset, tag)
        if not _is_complete(run, _fingerprint(preset, recipes[preset], data_s)):
            flag = " --fast" if fast else ""
            raise FileNotFoundError(
                f"no finished demo checkpoint for {name} in {run}; create it with "
                f"`kamim-analyze demo{flag} --cache {cache}`")
        found[name] = run / "checkpoint-last.pt"
    return found


def _is_complete(run: Path, fingerprint: dict) -> bool:
    fp = run / _FINGERPRINT
    if not (fp.is_file() and (run / "checkpoint-last.pt").is_file()
            and (run / "encoder.safetensors").is_file()):
        return False
    try:
        return json.loads(fp.read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def ensure_demo_checkpoints(cache: Optional[PathLike] = None, *, fast: bool = False,
                            progress: bool = True, overrides: Sequence[str] = (),
                            data: Optional[PathLike] = None) -> dict[str, Path]:
    """Train (or reuse) the three demo models; returns name -> training checkpoint path.

    ``overrides`` (``key=value`` config overrides) and ``data`` (an image folder instead of the
    built-in demo photographs) customise the runs; customised runs are cached in their own
    folders (``<preset>-<fast|full>-<hash>``), so they never clobber the standard demo models.
    """
    from kamim import load_config, pretrain
    from kamim.serialization import atomic_write_json

    cache = Path(cache) if cache is not None else default_cache_dir()
    recipes, data_s, tag = _resolve(fast, overrides, data)
    out: dict[str, Path] = {}
    for name, preset in DEMO_MODELS.items():
        run = _run_dir(cache, preset, tag)
        fingerprint = _fingerprint(preset, recipes[preset], data_s)
        if _is_complete(run, fingerprint):
            log.info("demo %s: reusing %s", name, run)
            out[name] = run / "checkpoint-last.pt"
            continue
        if (run / _FINGERPRINT).exists():  # trained with other settings: start again
            shutil.rmtree(run)
        cfg = load_config(preset, [*recipes[preset], "run.device=cpu",
                                   f"run.progress={str(progress).lower()}"])
        log.info("demo %s: pretraining %s into %s", name, preset, run)
        ckpt = pretrain(cfg, data=data_s, out_dir=run, resume="auto")
        atomic_write_json(fingerprint, run / _FINGERPRINT)
        out[name] = Path(ckpt)
    return out


def demo_eval_folder(size: int = 96) -> Path:
    """Labelled evaluation images (``val/`` of the photo-crops demo: one class per photograph)."""
    from kamim import kamim_data_dir, write_labelled_demo

    root = write_labelled_demo(kamim_data_dir() / f"demo-labelled-{size}", kind="photo-crops",
                               n_train_per_class=2, n_val_per_class=6, size=size)
    return Path(root) / "val"


def describe(checkpoints: Mapping[str, Path]) -> str:
    """One line per demo model: name and checkpoint path."""
    return "\n".join(f"  {n}: {p}" for n, p in checkpoints.items())


def run_demo(out: PathLike, *, cache: Optional[PathLike] = None, fast: bool = False,
             progress: bool = True, device: str = "cpu", overwrite: bool = False) -> AnalyzeOutput:
    """Train (or reuse) the demo models, run every analysis on labelled demo images, write the report.

    Also writes the reconstruction grid of the SimMIM and KAMIM demo models. Returns
    :class:`analysis.pipeline.AnalyzeOutput`.
    """
    from analysis.paper import reconstruction_figure, reconstruction_note
    from kamim.outputs import check_output_dir

    check_output_dir(out, _COMMAND, overwrite=overwrite,  # before minutes of training
                     inputs={"demo checkpoint cache": cache or default_cache_dir()})
    settings = demo_settings(fast)
    checkpoints = ensure_demo_checkpoints(cache, fast=fast, progress=progress)
    data = demo_eval_folder()

    def extra(staging: Path, results: Mapping, loaded: Mapping, notes: list) -> dict[str, list[Path]]:
        from kamim.serialization import atomic_write_text

        mim = {n: checkpoints[n] for n in ("SimMIM", "KAMIM")}
        table = reconstruction_figure(mim, data, staging / "reconstructions",
                                      images=settings.images, seed=0,
                                      batch_size=settings.batch_size, device=device)
        atomic_write_text(table.to_csv(index=False), staging / "reconstructions.csv")
        notes.append(reconstruction_note(table))
        return {"reconstructions": [staging / "reconstructions.pdf",
                                    staging / "reconstructions.png"]}

    return analyze(
        {n: str(p) for n, p in checkpoints.items()}, data, out, analyses="all",
        images=settings.images, batch_size=settings.batch_size, device=device, progress=progress,
        notes=(demo_note(fast),), title="KAMIM toolkit demo (small demonstration models)",
        options={"tsne_samples": settings.tsne_samples, "map_images": 2,
                 "attribution_steps": settings.attribution_steps}, extra=extra,
        command=_COMMAND, overwrite=overwrite, baseline="random")
