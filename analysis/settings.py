"""The configs of ``kamim-analyze run`` and ``kamim-analyze paper-figures`` (torch-free).

They load like every kamim command's config (:func:`kamim.config.load_command_config`): dataclass
defaults, then ``--config FILE`` (e.g. an earlier run's ``OUT/config.yaml``), then the flags given,
then ``--set KEY=VALUE``. ``--option KEY=VALUE`` is a shorthand of ``--set options.KEY=VALUE``; the
analysis options themselves (:class:`analysis.runner.RunOptions`) are checked by the runner. Each
run writes its resolved config as ``config.yaml`` into its output folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from kamim.config import ConfigError

from .names import CROSS_CKA, DEFAULT_CROSS_IMAGES, DEFAULT_CROSS_K, MAX_CROSS_IMAGES

__all__ = ["AnalyzeConfig", "PaperFiguresConfig", "PlotConfig", "ANALYZE_CONFIGS", "INTERPOLATIONS", "CROSS_CKA",
           "MAX_CROSS_IMAGES"]

#: resize interpolations of the analyses' preprocessing (analysis.pipeline.Preprocessing)
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(kw_only=True)
class _AnalysisRun:
    """The settings every analysing command shares (keyword-only, so a command's own fields come first
    in its config and its file)."""

    images: Optional[int] = None  # at most this many images per model; null: all
    batch_size: int = 32
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    seed: int = 0  # image subset, t-SNE, ...
    num_workers: Optional[int] = None  # loader workers; null: min(4, CPUs available)
    progress: bool = True
    options: dict = field(default_factory=dict)  # analysis options (analysis.runner.RunOptions)
    # preprocessing (analysis.pipeline.Preprocessing: timm's eval transform): resize interpolation and
    # crop_pct; run: bicubic (timm's ViT default), paper-figures: bilinear (the reference notebooks')
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def _check_run(self) -> None:
        if self.images is not None and self.images < 1:
            raise ConfigError(f"images must be >= 1 (or null: all), got {self.images}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (or null: min(4, CPUs)), got {self.num_workers}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a mapping of analysis options, got {self.options!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r} is not valid; expected one of: "
                              f"{', '.join(INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct={self.crop_pct} must be in (0, 1]")


@dataclass
class AnalyzeConfig(_AnalysisRun):
    """``kamim-analyze run``: any number of models on the images of one folder."""

    COMMAND: ClassVar[str] = "kamim-analyze run"

    data: str  # image folder, or demo / demo-photos / demo-digits
    # name -> checkpoint (file, run directory, manifest or timm name), or a list of them / "a,b,c": seeds
    # of one method, drawn as their mean (analysis.seeds)
    models: dict = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)  # Python files registering analyses (analysis.registry)
    analyses: Any = "all"  # "all" or a list of analysis names
    image_size: Optional[int] = None  # every model at this size; null: each at its own
    reuse: list[str] = field(default_factory=list)  # earlier outputs whose matching models are not analysed again
    baseline: Optional[str] = None  # "random": also a randomly initialised model of each architecture
    # model name -> output folder(s) of kamim linprobe / knn / finetune for it, shown in the report
    evaluations: dict = field(default_factory=dict)
    # cross-model analyses (analysis.crossmodel): every model saves pooled block outputs of this many
    # images (a seeded subset; 0: none); mutual k-NN / CKNNA neighbours; CKA estimator
    cross_images: int = DEFAULT_CROSS_IMAGES
    cross_k: int = DEFAULT_CROSS_K
    cross_cka: str = CROSS_CKA[0]

    def validate(self) -> "AnalyzeConfig":
        if not self.models:
            raise ConfigError("no models: give --model NAME=CHECKPOINT (or models: {NAME: CHECKPOINT})")
        from .seeds import expand_seeds

        try:
            expand_seeds(self.models)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for plugin in self.plugins:
            if not str(plugin).endswith(".py"):
                raise ConfigError(f"plugin {plugin!r} is not a .py file")
        if self.baseline not in (None, "random"):
            raise ConfigError(f"baseline={self.baseline!r} is not valid; expected random (or null: none)")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16 px (or null), got {self.image_size}")
        check_cross(self.cross_images, self.cross_k, self.cross_cka)
        self._check_run()
        return self


def check_cross(images: Any, k: Any, cka: Any) -> None:
    """The cross-model settings (``cross_images``, ``cross_k``, ``cross_cka``): one-line ``ConfigError``."""
    if isinstance(images, bool) or not isinstance(images, int) or not 0 <= images <= MAX_CROSS_IMAGES:
        raise ConfigError(f"cross_images must be an integer in [0, {MAX_CROSS_IMAGES}] (0: no cross-model "
                          f"analyses), got {images!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"cross_k must be an integer >= 2 (CKNNA needs two neighbours), got {k!r}")
    if cka not in CROSS_CKA:
        raise ConfigError(f"cross_cka={cka!r} is not valid; expected one of: {', '.join(CROSS_CKA)}")


@dataclass
class PaperFiguresConfig(_AnalysisRun):
    """``kamim-analyze paper-figures``: the KAMIM paper's representation figures."""

    COMMAND: ClassVar[str] = "kamim-analyze paper-figures"

    simmim: str  # SimMIM checkpoint (a pretraining run or checkpoint-last.pt also gives reconstructions)
    kamim: str  # KAMIM checkpoint
    moco: str  # MoCo v3 checkpoint
    data: str  # validation images (the paper: Imagenette val)
    mim_image_size: Optional[int] = None  # null: the paper's 192 px
    moco_image_size: Optional[int] = None  # null: the checkpoint's own (224 px for the released ViT-B/16)
    interpolation: str = field(default="bilinear", kw_only=True)  # the reference notebooks' preprocessing

    def validate(self) -> "PaperFiguresConfig":
        for name in ("mim_image_size", "moco_image_size"):
            v = getattr(self, name)
            if v is not None and v < 16:
                raise ConfigError(f"{name} must be at least 16 px (or null), got {v}")
        self._check_run()
        return self


@dataclass
class PlotConfig:
    """``kamim-analyze plot``: redraw and combine the saved results of earlier runs."""

    COMMAND: ClassVar[str] = "kamim-analyze plot"

    results: list[str] = field(default_factory=list)  # output folders of kamim-analyze run (their raw/)
    allow_mixed: bool = False  # combine runs on other data, images, seed, resolution, preprocessing or options
    title: Optional[str] = None  # report title; null: the first run's

    def validate(self) -> "PlotConfig":
        if not self.results:
            raise ConfigError("no results: give RESULTS_DIR ... (or results: [DIR, ...])")
        return self


#: command -> its config dataclass
ANALYZE_CONFIGS: dict[str, type] = {"run": AnalyzeConfig, "paper-figures": PaperFiguresConfig, "plot": PlotConfig}
