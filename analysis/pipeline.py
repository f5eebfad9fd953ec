"""Analyse several ViT checkpoints on an image folder into an output folder.

The library behind ``kamim-analyze`` (:mod:`analysis.cli` only parses arguments and prints):
:func:`analyze` loads every checkpoint (:func:`load_models`), checks that the requested analyses
suit each model's geometry (:func:`check_geometry`), streams the images of the folder through
:func:`analysis.runner.run_analyses` (:func:`make_loader`; attributions get a linear-probe head
from :func:`fit_probe_classifier`), and writes ``metrics.csv``/``metrics.json``, one figure per
analysis, ``report.html`` and the raw arrays into a staging folder that replaces the output folder
only on success (:func:`staged_output`).

Bad input raises :class:`UsageError` (a ``ValueError``) with a one-line message naming the value.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from analysis.names import CROSS_CKA, DEFAULT_CROSS_IMAGES, DEFAULT_CROSS_K
from analysis.settings import INTERPOLATIONS, check_cross

log = logging.getLogger("kamim.analyze")

__all__ = [
    "UsageError", "ModelSpec", "AnalyzeOutput", "ExtraStep", "parse_model_spec", "parse_analyses",
    "check_unique_names", "models_from_specs", "one_line", "fit_probe_classifier",
    "check_geometry", "staged_output", "staged_output_check", "load_models", "make_loader", "analyze",
    "preflight", "check_memory", "RunRecord", "save_run", "load_run", "render", "plot_results",
    "Preprocessing", "INTERPOLATIONS", "BASELINES", "random_baselines",
]

PathLike = Union[str, Path]


class UsageError(ValueError):
    """A user error reported as one line ``kamim-analyze: error: ...`` with exit code 2."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize the short side to ``size / crop_pct`` with
    ``interpolation``, centre crop ``size``, ImageNet normalisation: timm's eval transform
    (``timm.data.create_transform(size, is_training=False, interpolation=, crop_pct=)``, which
    :class:`kamim.EvalTransform` equals up to float32 rounding: tests/test_analysis_preprocessing.py).

    ``kamim-analyze run`` uses bicubic (timm's default for ViTs); ``paper-figures`` uses bilinear, as
    the reference notebooks do (:data:`analysis.paper.PAPER_PREPROCESSING`): the interpolation alone
    moves attention distance, NMI and the Fourier values by 1-2%.
    """

    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"interpolation {self.interpolation!r} is not valid; expected one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if not 0 < float(self.crop_pct) <= 1:
            raise UsageError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def transform(self, img_size: Sequence[int]) -> Any:
        """The :class:`kamim.EvalTransform` at ``img_size``."""
        from kamim import EvalTransform

        return EvalTransform(tuple(img_size), resize_ratio=self.crop_pct, interpolation=self.interpolation)

    def describe(self) -> str:
        """The preprocessing in words (the report's settings)."""
        return (f"timm eval transform: short side resized to size / {self.crop_pct:g} ({self.interpolation}), "
                f"centre crop, ImageNet normalisation")


#: what every saved run made before ``Preprocessing`` existed used (:func:`load_run` fills it in)
_LEGACY_PREPROCESSING = {"interpolation": "bicubic", "crop_pct": 0.875}


# ----------------------------------------------------------------------------------------------
# model specs and argument checks
@dataclass(frozen=True)
class ModelSpec:
    """A model to analyse: display ``name`` and ``source`` (checkpoint path, manifest or timm name)."""

    name: str
    source: str


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=CHECKPOINT`` (or just ``CHECKPOINT``: the name is the file stem / model name)."""
    text = text.strip()
    if not text:
        raise UsageError("--model needs NAME=CHECKPOINT, got an empty value")
    name, sep, source = text.partition("=")
    if not sep:
        source, name = text, Path(text).stem if Path(text).suffix else text
    name, source = name.strip(), source.strip()
    if not name or not source:
        raise UsageError(f"--model needs NAME=CHECKPOINT, got '{text}'")
    return ModelSpec(name, source)


def check_unique_names(names: Sequence[str], hint: str = "") -> None:
    """Refuse repeated model names (``hint`` is appended to the message)."""
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise UsageError(f"model names must be unique, repeated: {', '.join(dupes)}"
                         + (f" {hint}" if hint else ""))


def models_from_specs(specs: Sequence[ModelSpec]) -> dict[str, str]:
    """``[ModelSpec]`` -> the ``{name: source}`` mapping :func:`analyze` takes (names unique)."""
    check_unique_names([s.name for s in specs], hint="(name them with --model NAME=CHECKPOINT)")
    return {s.name: s.source for s in specs}


def parse_analyses(text: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"all"`` or comma-separated analysis names -> validated tuple, in registration order: the
    built-ins, then plugins and entry points (:func:`analysis.registry.names`); ``"all"`` is all of them."""
    from analysis.registry import names

    ANALYSES = names()
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [s.strip() for s in items if s.strip()]
    if not names:
        raise UsageError(f"no analyses given; valid: all, {', '.join(ANALYSES)}")
    if "all" in names:
        return tuple(ANALYSES)
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise UsageError(f"unknown analysis {', '.join(repr(u) for u in unknown)}; valid: all, "
                         f"{', '.join(ANALYSES)}")
    return tuple(a for a in ANALYSES if a in names)


def _positive(name: str, value: Optional[int], allow_zero: bool = False) -> None:
    """Refuse a negative (or zero, unless ``allow_zero``) count; ``None`` means unset."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def _slug(name: str) -> str:
    """A file-system safe folder name for a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


# ----------------------------------------------------------------------------------------------
# atomic output folder
def staged_output_check(out: PathLike, command: str, overwrite: bool = False,
                        inputs: Optional[Mapping[str, Any]] = None) -> Path:
    """``out`` if :func:`staged_output` may replace it, else a :class:`UsageError` (``inputs``: the
    paths ``out`` may not be, contain or lie inside: :func:`kamim.outputs.check_not_input`)."""
    from kamim.outputs import OutputDirError, check_output_dir

    try:
        return check_output_dir(out, command, overwrite=overwrite, inputs=inputs)
    except OutputDirError as err:
        raise UsageError(str(err)) from None


def preflight(models: Mapping[str, Any], data: PathLike, out: PathLike, command: str = "kamim-analyze run",
              overwrite: bool = False, inputs: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What :func:`analyze` refuses before it imports torch (the CLI calls it first, so these cost a
    fraction of a second): no models, a ``--data`` folder or a checkpoint path that does not exist, an
    ``--out`` the output rule refuses. Returns the input paths ``out`` may not overlap."""
    from kamim import looks_like_path
    from kamim.inputs import DATA_NAMES, missing_data_folder

    if not models:
        raise UsageError("no models given: pass --model NAME=CHECKPOINT at least once")
    models, _ = _expand(models)
    if str(data) not in DATA_NAMES and not Path(data).expanduser().is_dir():  # a demo name: made on first use
        raise UsageError(f"--data: {missing_data_folder(data, labelled=False)}")
    for name, source in models.items():
        # anything else may be a timm or manifest name (which can contain dots: "vit_base_patch16_224.mae")
        if looks_like_path(source) and not Path(source).expanduser().exists():
            raise UsageError(f"model {name}: checkpoint not found: '{source}'")
    inputs = {"--data folder": data, **{f"checkpoint of model {name}": src for name, src in models.items()},
              **dict(inputs or {})}
    staged_output_check(out, command, overwrite, inputs)
    return inputs


@contextlib.contextmanager
def staged_output(out: PathLike, command: str = "kamim-analyze run", overwrite: bool = False,
                  inputs: Optional[Mapping[str, Any]] = None) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` on success, keeping the files the command did
    not write (:func:`kamim.outputs.staged_dir`: locked, atomic, the output-folder rule; one-line
    :class:`UsageError` for a folder it may not replace, or one overlapping ``inputs``)."""
    from kamim.outputs import OutputDirError, staged_dir

    try:
        context = staged_dir(out, command, overwrite=overwrite, inputs=inputs)
        staging = context.__enter__()
    except OutputDirError as err:
        raise UsageError(str(err)) from None
    with contextlib.ExitStack() as stack:
        stack.push(context.__exit__)
        yield staging


# ----------------------------------------------------------------------------------------------
# models and data
def _check_device(device: str) -> str:
    """``device`` if it names a usable device, else a :class:`UsageError`."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got '{device}'")
    return device


def load_models(specs: Sequence[ModelSpec], *, image_size: Optional[int] = None,
                device: str = "cpu") -> dict[str, Any]:
    """Load every model with :func:`kamim.checkpoints.load_encoder`; name -> ``LoadedEncoder``.

    ``image_size`` rebuilds every model for that resolution (position embeddings resampled).
    Errors name the model and its source in one line.
    """
    from kamim import load_encoder, looks_like_path

    check_unique_names([s.name for s in specs])
    loaded = {}
    for spec in specs:
        src = Path(spec.source).expanduser()
        if not src.exists() and looks_like_path(spec.source):  # else a timm or manifest name
            raise UsageError(f"model {spec.name}: checkpoint not found: '{spec.source}'")
        try:
            enc = load_encoder(str(src) if src.exists() else spec.source, device=device,
                               **({"img_size": image_size} if image_size else {}))
        except Exception as err:  # noqa: BLE001 - any failure to read a user's file is bad input
            # (e.g. torch's weights-only unpickler raises IndexError on some garbage files)
            kind = "" if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: "
            raise UsageError(f"model {spec.name}: cannot load '{spec.source}': "
                             f"{kind}{one_line(err)}") from None
        if enc.geometry is None:
            raise UsageError(f"model {spec.name}: '{spec.source}' is not a timm ViT or Swin with a fixed "
                             f"image size; only those can be analysed")
        (h, w), (ph, pw) = enc.geometry.img_size, enc.geometry.patch_size
        if h % ph or w % pw:
            raise UsageError(f"model {spec.name}: image size {h}x{w} is not a multiple of its "
                             f"patch size {ph}x{pw}; pick an --image-size divisible by {ph}")
        loaded[spec.name] = enc
    return loaded


#: ``--baseline`` choices: ``random`` adds a randomly initialised model of each analysed architecture
BASELINES = ("random",)


def random_baselines(loaded: Mapping[str, Any], *, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """A randomly initialised model (``timm.create_model(pretrained=False)`` under ``seed``) of every
    architecture and resolution in ``loaded``, named ``random-<arch>``: the floor any trained model's
    curves should be read against. One per distinct architecture; a model without a timm spec (an
    in-memory module) has none."""
    import timm
    import torch

    from kamim import LoadedEncoder, arch_of

    out: dict[str, Any] = {}
    for enc in loaded.values():
        spec = dict(enc.spec or {})
        if not spec.get("model_name"):
            continue
        kwargs = {**dict(spec.get("kwargs") or {}), "num_classes": 0, "img_size": tuple(enc.image_size)}
        name = f"random-{arch_of(spec) or spec['model_name']}"
        if any(kwargs == dict(o.spec["kwargs"]) and spec["model_name"] == o.spec["model_name"] for o in out.values()):
            continue
        if name in out:  # the same architecture at another resolution
            name = f"{name}-{enc.image_size[0]}x{enc.image_size[1]}"
        torch.manual_seed(seed)
        model = timm.create_model(spec["model_name"], pretrained=False, **kwargs).eval().to(device)
        out[name] = LoadedEncoder.of(model, "random-init", f"random init of {spec['model_name']} (seed {seed})",
                                     None, {}, {"model_name": spec["model_name"], "kwargs": kwargs}, method="random")
    return out


def one_line(err: BaseException) -> str:
    """The first line of an error message (a ``KeyError``'s key without quotes)."""
    text = str(err).strip().splitlines()
    msg = text[0] if text else type(err).__name__
    return msg.strip("'\"") if isinstance(err, KeyError) else msg


def check_geometry(name: str, geometry: Any, analyses: Sequence[str]) -> None:
    """Refuse analyses a model's geometry cannot support, before any work is done."""
    gh, gw = geometry.grid
    if "fourier" in analyses and gh != gw:
        raise UsageError(
            f"model {name}: Fourier analysis needs a square token grid, got {gh}x{gw} "
            f"({geometry.img_size[0]}x{geometry.img_size[1]} px / {geometry.patch_size[0]}x"
            f"{geometry.patch_size[1]} px patches); drop 'fourier' from --analyses or pass a "
            f"square --image-size")
    from analysis.capture import ViTGeometry

    attention_based = {"attention-distance", "nmi", "attention-entropy", "attention-similarity",
                       "attention-maps", "rollout", "pre-post"}
    if not isinstance(geometry, ViTGeometry) and attention_based & set(analyses):
        raise UsageError(
            f"model {name}: {type(geometry).__name__} models support only block-output analyses "
            f"(cka, fourier, tsne); drop {', '.join(sorted(attention_based & set(analyses)))}")


class _Indexed:
    """A dataset of sample dicts whose samples also carry ``index``: their index in the folder's
    ``samples`` (through a ``Subset``), so that skipped unreadable images leave no gap unaccounted."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.indices = list(getattr(dataset, "indices", range(len(dataset))))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Optional[dict]:
        sample = self.dataset[i]
        return None if sample is None else {**sample, "index": self.indices[i]}


class _NonEmptyBatches:
    """Iterate a loader, dropping batches whose every image was unreadable (``collate_skip_bad``)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = loader.dataset  # lets progress bars know the total
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.num_skipped += int(batch.get("num_skipped", 0))
            if "image" in batch:
                yield batch


def make_loader(data: PathLike, img_size: Sequence[int], *, images: Optional[int] = None, batch_size: int = 32,
                workers: Optional[int] = None, seed: int = 0,
                preprocessing: Preprocessing = Preprocessing(),
                with_index: bool = False) -> tuple[_NonEmptyBatches, Any]:
    """Deterministic evaluation loader over ``data`` at ``img_size`` -> (loader, dataset).

    Images go through ``preprocessing``. With ``images`` smaller than the folder, a seeded subset is
    used (the same images for every model, spread over all classes), in folder order.
    ``with_index``: batches also hold ``index``, each image's index in ``dataset.samples``.
    """
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from kamim import ImageFolderDataset, data_loader

    transform = preprocessing.transform(img_size)
    try:
        dataset = ImageFolderDataset(data, transform, layout="auto")
    except ValueError:
        dataset = ImageFolderDataset(data, transform, layout="flat")
    subset: Any = dataset
    if images is not None and images < len(dataset):
        idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:images])
        subset = Subset(dataset, idx.tolist())
    if with_index:
        subset = _Indexed(subset)
    loader = data_loader(subset, workers=workers, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    return _NonEmptyBatches(loader), dataset


def fit_probe_classifier(model: Any, loader: Any, *, max_images: Optional[int] = None,
                         device: str = "cpu", seed: int = 0) -> Any:
    """A linear-probe classifier for attributions on a headless encoder.

    Features are the mean-pooled patch tokens of the last block (as
    :class:`analysis.attribution.ProbeClassifier` computes them); the head is scikit-learn's
    ``LogisticRegression`` on standardised features, folded into one ``nn.Linear`` (the scaler's
    mean/scale absorbed into weights and bias). It is fitted on the analysed images themselves: it
    only has to give attributions a meaningful class logit, it is not an accuracy estimate.
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torch import nn

    from analysis.attribution import ProbeClassifier
    from analysis.runner import iterate_images

    extractor = ProbeClassifier(model, nn.Identity()).to(device).eval()
    feats, labels = [], []
    with torch.no_grad():
        for images, y in iterate_images(loader, max_images):
            if y is None or bool((y < 0).any()):
                raise UsageError("attribution needs class labels (class subfolders in --data) to fit "
                                 "a linear-probe head on these headless encoders")
            feats.append(extractor(images.to(device)).float().cpu())
            labels.append(y.cpu())
    x = torch.cat(feats).double().numpy()
    y = torch.cat(labels).numpy()
    classes = np.unique(y)
    if len(classes) < 2:
        raise UsageError(f"attribution needs images of at least 2 classes to fit a probe head, "
                         f"found only class {classes.tolist()}")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    pipe.fit(x, y)
    scaler, clf = pipe[0], pipe[1]
    coef = clf.coef_ / scaler.scale_
    bias = clf.intercept_ - coef @ scaler.mean_
    if len(classes) == 2:  # sklearn's binary model has one logit z: use logits (0, z)
        coef, bias = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, bias[0]])
    n_out = int(y.max()) + 1
    head = nn.Linear(x.shape[1], n_out)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)  # classes absent from the analysed images are never predicted
        head.weight[torch.as_tensor(classes)] = torch.as_tensor(coef, dtype=torch.float32)
        head.bias[torch.as_tensor(classes)] = torch.as_tensor(bias, dtype=torch.float32)
    return ProbeClassifier(model, head.to(device)).eval()


# ----------------------------------------------------------------------------------------------
# the analysis pipeline
@dataclass
class AnalyzeOutput:
    """What :func:`analyze` wrote: the output folder, per-model results, figure files, metrics."""

    out_dir: Path
    results: dict[str, Any]
    figures: dict[str, list[Path]]
    metrics: Any  # pandas DataFrame (tidy)
    summary: Any  # pandas DataFrame (wide, per model and depth)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


ExtraStep = Callable[[Path, dict[str, Any], dict[str, Any], list[str]], dict[str, list[Path]]]

#: ``raw/run.json``: what a run's figures and report need besides its per-model results
RUN_RECORD = "run.json"
#: settings that must agree between runs combined by :func:`plot_results` (unless ``allow_mixed``)
COMPARED_SETTINGS = ("data", "data files", "images", "seed", "resolution", "preprocessing", "options")


@dataclass
class RunRecord:
    """The run-level part of an analysis output (``raw/run.json``): the analyses, the settings and
    per-model facts the report shows, the notes, the title, the figure file names, the figures made
    from the models themselves (``extra``: paper-figures' reconstructions) and the figure captions
    (paper-figures' conventions), which a redraw keeps."""

    analyses: tuple[str, ...]
    settings: dict[str, Any]
    models: dict[str, dict[str, Any]]
    notes: list[str]
    title: str = "Representation analysis"
    figure_names: dict[str, str] = field(default_factory=dict)
    extra_figures: dict[str, list[str]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    #: model name -> the names of its seeds (``--model NAME=A,B,C``, :mod:`analysis.seeds`)
    groups: dict[str, list[str]] = field(default_factory=dict)
    #: the models' linear-probe / k-NN / finetune results (``--evaluation``, :mod:`analysis.evaluations`)
    evaluations: list[dict[str, Any]] = field(default_factory=list)


def _provenance(enc: Any, dataset: Any, data: PathLike, *, images: Optional[int], seed: int, batch_size: int,
                options: Mapping[str, Any], preprocessing: Preprocessing) -> dict[str, Any]:
    """Where one model's numbers come from: its checkpoint and sha256, the data folder with a hash of
    its file list, the images, seed, resolution, preprocessing and options, the library versions."""
    import hashlib

    from analysis.report import library_versions

    root = Path(getattr(dataset, "root", data)).expanduser().absolute()
    files = sorted(str(Path(p).relative_to(root)) for p, _ in getattr(dataset, "samples", []))
    return {"source": str(enc.source), "sha256": enc.sha256, "format": enc.format,
            "method": getattr(enc, "method", None), "data": str(root),
            "data files": hashlib.sha256("\n".join(files).encode()).hexdigest(), "images": images, "seed": seed,
            "resolution": list(enc.image_size), "preprocessing": dataclasses.asdict(preprocessing),
            "batch_size": batch_size, "options": dict(options),
            "versions": library_versions()}


#: provenance that must be equal for saved results to stand for a new analysis of a model
REUSE_KEYS = ("sha256", *COMPARED_SETTINGS)


def _reusable(saved: Sequence[Any], provenance: Mapping[str, Any], analyses: Sequence[str]) -> Optional[Any]:
    """The first of ``saved`` (results loaded from earlier outputs) made from the same checkpoint, data
    and settings, with the same analyses; None when none is."""
    from kamim.serialization import json_safe

    want = json_safe({k: provenance.get(k) for k in REUSE_KEYS})
    for res in saved:
        if provenance.get("sha256") and tuple(res.analyses) == tuple(analyses) and \
                json_safe({k: res.provenance.get(k) for k in REUSE_KEYS}) == want:
            return res
    return None


def _renamed(res: Any, name: str) -> Any:
    """``res`` under the model name ``name`` (its table's ``model`` column too)."""
    table = res.table.copy()
    table["model"] = name
    return dataclasses.replace(res, model_name=name, table=table)


def save_run(raw: Path, results: Mapping[str, Any], cross: Mapping[tuple[str, str], Any], record: RunRecord) -> None:
    """Write every model's results (``raw/<model>/``), the cross-model CKA results
    (``raw/cross/<a>--<b>/``) and ``raw/run.json``, before anything is drawn."""
    import json

    from kamim.serialization import atomic_write_text, json_safe

    raw.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, res in results.items():
        res.save(raw / _slug(name))
        models[name] = _slug(name)
    pairs = []
    for (a, b), res in cross.items():
        res.save(raw / "cross" / f"{_slug(a)}--{_slug(b)}")
        pairs.append([a, b, f"cross/{_slug(a)}--{_slug(b)}"])
    atomic_write_text(json.dumps(json_safe({**dataclasses.asdict(record), "results": models, "cross": pairs}),
                                 indent=1),
                      raw / RUN_RECORD)


def load_run(source: PathLike) -> tuple[dict[str, Any], dict[tuple[str, str], Any], RunRecord, Path]:
    """The results, cross-model results and record of an analysis output folder (or its ``raw/``);
    one-line :class:`UsageError` for a folder that holds none."""
    import json

    from analysis.results import AnalysisResult

    folder = Path(source).expanduser()
    raw = folder / "raw" if (folder / "raw" / RUN_RECORD).is_file() else folder
    if not (raw / RUN_RECORD).is_file():
        raise UsageError(f"'{source}' holds no saved analysis results (expected {Path('raw') / RUN_RECORD} "
                         f"inside: an output of kamim-analyze run)")
    meta = json.loads((raw / RUN_RECORD).read_text())
    results = {name: AnalysisResult.load(raw / sub) for name, sub in meta["results"].items()}
    for res in results.values():
        if res.provenance:  # saved before the preprocessing was a setting
            res.provenance.setdefault("preprocessing", dict(_LEGACY_PREPROCESSING))
    cross = {(a, b): AnalysisResult.load(raw / sub) for a, b, sub in meta.get("cross", [])}
    record = RunRecord(tuple(meta["analyses"]), dict(meta["settings"]), dict(meta["models"]), list(meta["notes"]),
                       meta.get("title", "Representation analysis"), dict(meta.get("figure_names") or {}),
                       dict(meta.get("extra_figures") or {}), dict(meta.get("captions") or {}),
                       {k: list(v) for k, v in (meta.get("groups") or {}).items()}, list(meta.get("evaluations") or []))
    return results, cross, record, raw.parent


def _cross_captions() -> dict[str, str]:
    from analysis.builtin import CROSS_CAPTIONS

    return dict(CROSS_CAPTIONS)


def _registered_captions(analyses: Sequence[str]) -> dict[str, str]:
    """Each analysis' own caption (:attr:`analysis.registry.Analysis.caption`), where it has one."""
    from analysis import registry

    return {a: registry.get(a).caption for a in analyses if registry.get(a).caption}


def model_palette(results: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> Any:
    """The figures' styles: each model coloured by its method family (``models``: the run record's
    per-model table, with ``method`` and ``format``), whatever the order of ``results``."""
    from analysis import plots

    return plots.ModelPalette(results, families={
        n: plots.method_family((models.get(n) or {}).get("method"), (models.get(n) or {}).get("format"))
        or plots.result_family(results[n]) for n in results})


def render(staging: Path, results: Mapping[str, Any], cross: Mapping[tuple[str, str], Any],
           record: RunRecord) -> tuple[dict[str, list[Path]], Any, Any]:
    """Draw every figure of ``record.analyses``, the cross-model CKA figure, ``metrics.csv/.json``,
    ``summary.csv`` and ``report.html`` into ``staging`` from results alone (no model, no data);
    returns (figure files by key, the tidy metrics, the summary)."""
    import pandas as pd

    from analysis import plots
    from analysis.baselines import uniform_sentences
    from analysis.evaluations import evaluation_sentences, evaluation_table
    from analysis.report import layer_table, summary_table, write_report
    from analysis.seeds import shown_results
    from kamim.serialization import atomic_write_text

    # the tables keep every seed; figures and report show each seed group as its mean
    shown = shown_results(results, record.groups)
    grouped = [r.table for n, r in shown.items() if n in record.groups]
    metrics = pd.concat([r.table for r in results.values()] + grouped, ignore_index=True)
    models = {**record.models, **{g: _group_info(g, members, record.models) for g, members in record.groups.items()}}
    palette = model_palette(shown, models)
    figures: dict[str, list[Path]] = {}
    for analysis_name in record.analyses:
        stem = record.figure_names.get(analysis_name, analysis_name.replace("-", "_"))
        plots.plot_analysis(analysis_name, shown, palette=palette, out=staging / stem)
        figures[analysis_name] = _figure_files(staging / stem)
    if cross:
        metrics = pd.concat([metrics] + [r.table for r in cross.values()], ignore_index=True)
        depths = {n: r.geometry.depth for n, r in results.items()}
        for key, (array, *_) in plots.CROSS_FIGURES.items():
            if not all(array in r.arrays for r in cross.values()):
                continue  # an older run's cross-model results hold the CKA only
            stem = record.figure_names.get(key, key.replace("-", "_"))
            plots.plot_cross_model(cross, depths, key, out=staging / stem)
            figures[key] = _figure_files(staging / stem)
    figures.update({k: [staging / p for p in v] for k, v in record.extra_figures.items()})
    atomic_write_text(metrics.to_csv(index=False), staging / "metrics.csv")
    atomic_write_text(metrics.to_json(orient="records", indent=1), staging / "metrics.json")
    summary = summary_table(shown)
    atomic_write_text(summary.to_csv(index=False), staging / "summary.csv")
    write_report(staging / "report.html", shown, figures, settings=record.settings,
                 models={n: models[n] for name in shown for n in (name, *record.groups.get(name, ())) if n in models},
                 titles=plots.FIGURE_TITLES,
                 tables={**({"Evaluations (kamim linprobe / knn / finetune; --evaluation)":
                             evaluation_table(record.evaluations)} if record.evaluations else {}),
                         "Per-layer metrics (mean over heads, first rows; every head, matrix entry and seed in "
                         "metrics.csv)": layer_table(metrics)},
                 notes=[*record.notes, *evaluation_sentences(record.evaluations), *uniform_sentences(shown)],
                 title=record.title,
                 captions={**_registered_captions(record.analyses), **(_cross_captions() if cross else {}),
                           **record.captions})
    return figures, metrics, summary


def _group_info(name: str, members: Sequence[str], models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The report's row of a seed group: its seeds and what they share (method, format, architecture)."""
    first = dict(models.get(members[0]) or {})
    return {"seeds": ", ".join(f"{m}: {(models.get(m) or {}).get('source', 'n/a')}" for m in members),
            **{k: first[k] for k in ("format", "method", "prefix tokens", "depth × heads") if k in first}}


def _expand(models: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """:func:`analysis.seeds.expand_seeds`, refused with one line."""
    from analysis.seeds import expand_seeds

    try:
        return expand_seeds(models)
    except ValueError as err:
        raise UsageError(str(err)) from None


def read_evaluations(evaluations: Optional[Mapping[str, Any]], models: Iterable[str]) -> list[dict[str, Any]]:
    """``{model: folder or [folders]}`` -> :func:`analysis.evaluations.read_evaluation` of each, in order;
    one-line :class:`UsageError` for an unknown model name or a folder that is not an evaluation output."""
    from analysis.evaluations import read_evaluation

    known = list(models)
    out = []
    for name, folders in (evaluations or {}).items():
        if name not in known:
            raise UsageError(f"--evaluation {name}=...: no model {name!r} (models: {', '.join(known)})")
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        elif not (isinstance(folders, (list, tuple)) and all(isinstance(f, (str, os.PathLike)) for f in folders)):
            raise UsageError(f"--evaluation {name}: expected an output folder or a list of them, got {folders!r}")
        for folder in folders:
            try:
                out.append(read_evaluation(name, folder))
            except ValueError as err:
                raise UsageError(f"--evaluation {name}: {err}") from None
    return out


def analyze(models: Mapping[str, Any], data: PathLike, out: PathLike, *,
            analyses: Union[str, Sequence[str]] = "all", images: Optional[int] = None,
            batch_size: int = 32, image_size: Optional[int] = None,
            image_sizes: Optional[Mapping[str, Optional[int]]] = None, device: str = "cpu",
            seed: int = 0, workers: int = 0, progress: bool = True, notes: Sequence[str] = (),
            title: str = "Representation analysis",
            figure_names: Optional[Mapping[str, str]] = None,
            options: Optional[Mapping[str, Any]] = None,
            model_options: Optional[Callable[[str, Any], Mapping[str, Any]]] = None,
            cross_images: int = DEFAULT_CROSS_IMAGES, cross_k: int = DEFAULT_CROSS_K, cross_cka: str = CROSS_CKA[0],
            extra: Optional[ExtraStep] = None,
            command: str = "kamim-analyze run", overwrite: bool = False, config: Any = None,
            inputs: Optional[Mapping[str, Any]] = None, reuse: Sequence[PathLike] = (),
            preprocessing: Preprocessing = Preprocessing(),
            captions: Optional[Mapping[str, str]] = None, baseline: Optional[str] = None,
            evaluations: Optional[Mapping[str, Any]] = None) -> AnalyzeOutput:
    """Analyse ``models`` (name -> checkpoint source) on the images in ``data``; write into ``out``.

    A name given several checkpoints (``"a,b,c"`` or a list: seeds of one method) is analysed as one
    model per checkpoint, ``name@1``, ``name@2``, ... whose rows ``metrics.csv`` keeps, and shown in the
    figures and report as their mean with its interval across seeds (:mod:`analysis.seeds`).

    Args:
        analyses: ``"all"`` or names from :data:`analysis.runner.ANALYSES`. With ``"all"``,
            ``attribution`` is skipped (with a note) when the data has no class labels to fit the
            linear-probe head it needs; asked for explicitly, that is an error.
        image_size: one resolution for all models (default: each model's own); ``image_sizes``:
            per-model resolution (None = the model's own), overriding ``image_size``.
        preprocessing: how images become inputs (:class:`Preprocessing`; default bicubic, crop 0.875).
        baseline: ``"random"`` also analyses a randomly initialised model of each architecture
            (:func:`random_baselines`, seeded by ``seed``), drawn and tabled like any other model.
        figure_names: analysis -> file stem (default: the analysis name with ``_``); ``captions``:
            figure key -> caption text shown under it in the report (kept by redraws).
        options: keyword options of :func:`analysis.runner.run_analyses` for every model;
            ``model_options(name, geometry)`` adds per-model ones (e.g. query positions).
        reuse: earlier outputs (:func:`save_run`); a model whose saved results match its checkpoint's
            sha256, the data (folder and file list), images, seed, resolution, preprocessing, options and analyses is
            taken from there instead of analysed again (the log and the report say which).
        cross_images: with ``cka`` among the analyses, every model saves the pooled block outputs of
            this many images (a seeded subset, the same files in the same order for every model; 0:
            none), from which every pair of models is compared (:mod:`analysis.crossmodel`: figures ``cross_cka``,
            ``cross_mutual_knn``, ``cross_cknna``), here and when ``kamim-analyze plot`` combines runs.
        cross_k: the k of mutual k-NN and CKNNA; ``cross_cka``: ``"debiased"`` or ``"biased"`` CKA.
        evaluations: model name (or seed group name) -> output folder(s) of ``kamim linprobe``, ``knn``
            or ``finetune`` for it, shown in the report (:mod:`analysis.evaluations`).
        extra: ``extra(staging_dir, results, loaded_encoders, notes) -> {figure key: files}`` runs
            before the report is written (used by the paper figures); it may append to ``notes``.
        config: the command's resolved config (:mod:`analysis.settings`), written as ``config.yaml``
            with the results: ``--config OUT/config.yaml`` reruns the analysis.
        inputs: more input paths ``out`` may not overlap (e.g. plugin files), beside ``data`` and
            the checkpoints.

    Everything is written into a temporary folder that replaces ``out`` at the end, keeping the files
    the command did not write; on any error ``out`` is left untouched. ``out`` must be new, empty or
    an earlier output of ``command`` (recorded in ``out/.kamim-output.json``) unless ``overwrite``,
    and may not be, contain or lie inside ``data`` or a checkpoint (see :mod:`kamim.outputs`).
    """
    import torch

    from analysis.runner import run_analyses
    from kamim import find_images

    asked_all = (analyses == "all") if isinstance(analyses, str) else ("all" in analyses)
    analyses = parse_analyses(analyses)
    _positive("--images", images)
    _positive("--batch-size", batch_size)
    _positive("--image-size", image_size)
    _positive("--workers", workers, allow_zero=True)
    device = _check_device(device)
    _check_cross(cross_images, cross_k, cross_cka)
    models, groups = _expand(models)
    evaluated = read_evaluations(evaluations, [*models, *groups])
    inputs = {**dict(inputs or {}), **{f"--evaluation {i + 1} ({e['model']})": e["folder"] for i, e in enumerate(evaluated)}}
    inputs = preflight(models, data, out, command, overwrite, inputs)  # before loading anything
    try:
        n_files = len(find_images(data))
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UsageError(f"--data: {one_line(err)}") from None
    notes = list(notes)

    loaded: dict[str, Any] = {}
    for name, source in models.items():  # one by one so that per-model resolutions apply
        size = (image_sizes or {}).get(name, image_size) if image_sizes else image_size
        loaded.update(load_models([ModelSpec(name, source)], image_size=size, device=device))
    if baseline is not None:
        if baseline not in BASELINES:
            raise UsageError(f"--baseline {baseline!r} is not valid; expected one of {', '.join(BASELINES)}")
        randoms = random_baselines(loaded, seed=seed, device=device)
        check_unique_names([*loaded, *randoms])
        loaded.update(randoms)
    geometries = {name: _geometry(name, enc, analyses) for name, enc in loaded.items()}
    batch = min(batch_size, n_files, images or n_files)  # the largest batch the loader makes
    for name, geometry in geometries.items():
        check_memory(name, geometry, batch, analyses, device)

    if "attribution" in analyses:
        why = _why_no_attribution(data, next(iter(loaded.values())).image_size, images=images,
                                  batch_size=batch_size, seed=seed)
        if why:
            if not asked_all:
                raise UsageError(why)
            analyses = tuple(a for a in analyses if a != "attribution")
            notes.append(f"Attribution skipped: {why}.")

    torch.manual_seed(seed)
    figure_names = dict(figure_names or {})
    with staged_output(out, command, overwrite, inputs) as staging:
        if config is not None:
            from kamim.config import dump_config

            dump_config(config, staging / "config.yaml")
        results: dict[str, Any] = {}
        saved = [r for source in reuse for r in load_run(source)[0].values()]
        features = bool(cross_images) and "cka" in analyses  # the cross-model measures go with cka
        reused: list[str] = []
        for name, enc in loaded.items():
            loader, dataset = make_loader(data, enc.image_size, images=images, batch_size=batch_size,
                                          workers=workers, seed=seed, preprocessing=preprocessing)
            provenance = _provenance(enc, dataset, data, images=images, seed=seed, batch_size=batch_size,
                                     preprocessing=preprocessing, options={**dict(options or {}), **dict(model_options(name, geometries[name])
                                                                            if model_options else {})})
            match = _reusable(saved, provenance, analyses)
            if match is not None:
                results[name] = _renamed(match, name)
                reused.append(name)
                if features and not _has_features(match, cross_images):
                    _attach_features(results[name], enc, data, images=cross_images, batch_size=batch_size,
                                     workers=workers, seed=seed, device=device, preprocessing=preprocessing)
                continue
            if images is not None and images > len(dataset) and name == next(iter(loaded)):  # said once
                fewer = f"--images {images}: the folder has {len(dataset)} images, all of which are analysed."
                notes.append(fewer)
                log.warning(fewer)
            opts = {"batch_size": batch_size, **dict(options or {}),
                    **dict(model_options(name, geometries[name]) if model_options else {})}
            try:
                if "attribution" in analyses and "attribution_model" not in opts:
                    opts["attribution_model"] = fit_probe_classifier(
                        enc.model, loader, max_images=images, device=device, seed=seed)
                res = run_analyses(enc.model, loader, analyses, model_name=name,
                                   max_images=images, device=device, seed=seed,
                                   num_prefix_tokens=enc.num_prefix_tokens, progress=progress,
                                   **opts)
            except (ValueError, TypeError, KeyError) as err:
                raise UsageError(f"model {name}: {one_line(err)}") from None
            except (RuntimeError, MemoryError) as err:  # torch's allocators: CPU RuntimeError, CUDA OOM
                if not (isinstance(err, MemoryError) or "can't allocate memory" in str(err)
                        or "out of memory" in str(err)):
                    raise
                raise UsageError(f"model {name}: out of memory during the analysis pass of batches of {batch} "
                                 f"images at {enc.image_size[0]}x{enc.image_size[1]} px; use a smaller "
                                 f"--batch-size or --image-size") from None
            if getattr(dataset, "classes", None):
                res.arrays["class_names"] = list(dataset.classes)
            res.provenance = provenance
            results[name] = res
            if loader.num_skipped:
                notes.append(f"{name}: {loader.num_skipped} unreadable image(s) skipped.")
            if features:
                _attach_features(res, enc, data, images=cross_images, batch_size=batch_size, workers=workers,
                                 seed=seed, device=device, preprocessing=preprocessing)

        if reuse:
            said = (f"reused the saved results of {', '.join(reused) or 'no model'}; analysed "
                    f"{', '.join(n for n in loaded if n not in reused) or 'no model'}")
            log.info("%s", said)
            notes.append(f"--reuse: {said}.")
        cross = _cross_models(results, notes, k=cross_k, cka=cross_cka) if features else {}
        settings = {
            "analyses": ", ".join(analyses), "data": str(Path(data).expanduser().absolute()),
            "images in folder": n_files, "images analysed per model": ", ".join(
                f"{n}: {r.images}" for n, r in results.items()),
            "resolution": ("each model at its own resolution" if image_size is None
                           or image_sizes else f"all models at {image_size} px (--image-size)"),
            "preprocessing": preprocessing.describe(),
            "batch size": batch_size, "device": device, "seed": seed,
            **{f"option {k}": v for k, v in (options or {}).items()},
            **({"cross-model features": f"up to {cross_images} images per model (mean-pooled patch tokens of every block)",
                CROSS_K_SETTING: cross_k, CROSS_CKA_SETTING: cross_cka} if features else {}),
        }
        extra_figures = extra(staging, results, loaded, notes) if extra is not None else {}
        record = RunRecord(tuple(analyses), settings, _model_info(loaded, geometries), list(notes), title,
                           figure_names, {k: [str(p.relative_to(staging)) for p in v] for k, v in extra_figures.items()},
                           dict(captions or {}), groups, evaluated)
        save_run(staging / "raw", results, cross, record)  # everything `kamim-analyze plot` redraws from
        figures, metrics, summary = render(staging, results, cross, record)
        rel_figures = {k: [p.relative_to(staging) for p in v] for k, v in figures.items()}
        files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    out_dir = Path(out).expanduser().absolute()
    return AnalyzeOutput(out_dir, results,
                         {k: [out_dir / p for p in v] for k, v in rel_figures.items()},
                         metrics, summary, [out_dir / f for f in files], record.notes)


def _compared(results: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The values of :data:`COMPARED_SETTINGS` in one run, read from its models' provenance (a run may
    hold several, e.g. paper-figures' per-model resolutions), each list sorted by its repr."""
    values: dict[str, list[Any]] = {}
    for key in COMPARED_SETTINGS:
        found = {repr(r.provenance.get(key)): r.provenance.get(key) for r in results.values()}
        values[key] = [found[k] for k in sorted(found)]
    return values


def plot_results(sources: Sequence[PathLike], out: PathLike, *, allow_mixed: bool = False, overwrite: bool = False,
                 title: Optional[str] = None, command: str = "kamim-analyze plot", config: Any = None) -> AnalyzeOutput:
    """Redraw every figure, table and the report of one or more saved analysis outputs into ``out``,
    from their saved results alone (no model, no data). Several outputs are combined into one
    comparison of all their models.

    Runs whose models were analysed on other data, images, seed, resolution, preprocessing or options are refused with
    one line naming the setting and the two values, unless ``allow_mixed`` (then a note in the report says
    so). Figures of analyses that not every run made are left out, with a note; the cross-model figures
    are computed again from the saved features for every pair of models (refused with one line when
    two models saved features of different images); figures made from the models themselves (paper-figures'
    reconstructions) are carried over from a single source and left out, with a note, when combining.
    """
    import shutil

    if not sources:
        raise UsageError("no results given: pass one or more output folders of kamim-analyze run")
    runs = [load_run(s) for s in sources]
    inputs = {f"results {i + 1}": folder for i, (*_, folder) in enumerate(runs)}
    staged_output_check(out, command, overwrite, inputs)
    results: dict[str, Any] = {}
    where: dict[str, Path] = {}
    notes: list[str] = []
    models: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    evaluated: list[dict[str, Any]] = []
    for res, _, record, folder in runs:  # cross-model results are computed again, for every pair
        for name in res:
            if name in results:
                raise UsageError(f"model {name} is in both {where[name]} and {folder}: combine outputs of different "
                                 f"models (name them with kamim-analyze run --model NAME=CHECKPOINT)")
            where[name] = folder
        results.update(res)
        models.update(record.models)
        for group, members in record.groups.items():
            if group in groups or group in results:
                raise UsageError(f"model {group} is in more than one of the results: combine outputs of different "
                                 f"models")
            groups[group] = members
        evaluated += record.evaluations
        notes += [n for n in record.notes if n not in notes]
    base = _compared(runs[0][0])
    for res, *_, folder in runs[1:]:
        for key, values in _compared(res).items():
            if values != base[key]:
                a, b = (repr(v[0]) if len(v) == 1 else repr(v) for v in (base[key], values))
                if not allow_mixed:
                    raise UsageError(f"the results differ in {key}: {a} ({runs[0][3]}) vs {b} ({folder}); pass "
                                     f"--allow-mixed to combine them anyway")
                notes.append(f"Combined with --allow-mixed: the runs differ in {key} ({runs[0][3]}: {a}; "
                             f"{folder}: {b}).")
    first = runs[0][2]
    common = [a for a in first.analyses if all(a in r[2].analyses for r in runs)]
    dropped = [a for r in runs for a in r[2].analyses if a not in common]
    if dropped:
        notes.append(f"Left out, not made for every model: {', '.join(sorted(set(dropped)))}.")
    extra = first.extra_figures if len(runs) == 1 else {}
    if len(runs) > 1 and any(r[2].extra_figures for r in runs):
        notes.append(f"Left out when combining: {', '.join(sorted({k for r in runs for k in r[2].extra_figures}))} "
                     f"(made from the models, not from saved results).")
    k = int(first.settings.get(CROSS_K_SETTING, DEFAULT_CROSS_K))
    cka = str(first.settings.get(CROSS_CKA_SETTING, CROSS_CKA[0]))
    cross: dict[tuple[str, str], Any] = {}
    try:
        cross = _cross_models(results, notes, k=k, cka=cka) if "cka" in common else {}
    except UsageError:
        if not allow_mixed:
            raise
        notes.append("Cross-model figures left out: the runs saved features of different images.")
    if not cross and len(runs) == 1:  # a run saved before models saved features: its own cross-model CKA
        cross = dict(runs[0][1])
    settings = {**first.settings, "models from": ", ".join(f"{n}: {where[n]}" for n in results),
                "analyses": ", ".join(common),
                "images analysed per model": ", ".join(f"{n}: {r.images}" for n, r in results.items())}
    captions = first.captions if all(r[2].captions == first.captions for r in runs) else {}
    record = RunRecord(tuple(common), settings, models, notes, title or first.title, first.figure_names, extra,
                       captions, groups, evaluated)
    with staged_output(out, command, overwrite, inputs) as staging:
        if config is not None:
            from kamim.config import dump_config

            dump_config(config, staging / "config.yaml")
        for key, files in extra.items():
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(runs[0][3] / rel, staging / rel)
        save_run(staging / "raw", results, cross, record)  # the combination is itself redrawable
        figures, metrics, summary = render(staging, results, cross, record)
        rel_figures = {k: [p.relative_to(staging) for p in v] for k, v in figures.items()}
        files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    for note in notes:  # what the combination could not keep, said on the terminal too
        if note.startswith(("Left out", "Combined")):
            log.warning("%s", note)
    out_dir = Path(out).expanduser().absolute()
    return AnalyzeOutput(out_dir, results, {k: [out_dir / p for p in v] for k, v in rel_figures.items()},
                         metrics, summary, [out_dir / f for f in files], notes)


def _geometry(name: str, enc: Any, analyses: Sequence[str]) -> Any:
    """The token geometry of a loaded encoder (read once by ``load_encoder``), checked against ``analyses``."""
    geometry = enc.geometry
    if geometry is None:
        raise UsageError(f"model {name}: cannot read its geometry: {type(enc.model).__name__} is not a timm "
                         f"ViT or Swin with a fixed image size")
    check_geometry(name, geometry, analyses)
    return geometry


def check_memory(name: str, geometry: Any, batch_size: int, analyses: Sequence[str], device: str) -> None:
    """Refuse, before the pass, a batch whose analysis pass cannot fit in the memory ``device`` has
    left, by the lower bound :func:`analysis.runner.pass_bytes` (so a run that would fit is never
    refused), with the bound and a --batch-size or --image-size under it."""
    from analysis.registry import get
    from analysis.runner import pass_bytes
    from kamim import available_memory

    needs = set().union(*(get(a).needs for a in analyses))
    need, free = pass_bytes(geometry, batch_size, needs), available_memory(device)
    if free is None or need <= free:
        return
    fits = next((b for b in range(batch_size - 1, 0, -1) if pass_bytes(geometry, b, needs) <= free), 0)
    if fits:
        hint = f"use --batch-size {fits} or less"
    else:
        (h, w), (ph, pw) = geometry.img_size, geometry.patch_size
        sizes = (s for s in range(h - ph, 0, -ph) if pass_bytes(
            dataclasses.replace(geometry, img_size=(s, s * w // h), grid=(s // ph, s * w // h // pw)), 1, needs) <= free)
        side = next(sizes, None) if geometry.to_dict()["kind"] == "vit" else None
        hint = f"use --batch-size 1 and --image-size {side} or less" if side else "use a smaller --image-size"
    (h, w) = geometry.img_size
    raise UsageError(f"model {name}: the analysis pass needs at least {_bytes(need)} for a batch of {batch_size} "
                     f"images at {h}x{w} px ({geometry.grid[0] * geometry.grid[1] + geometry.num_prefix_tokens} "
                     f"tokens per image); {device} has {_bytes(free)} available: {hint}")


def _bytes(n: int) -> str:
    """``n`` bytes in GiB, MiB or KiB with one decimal."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _why_no_attribution(data: PathLike, img_size: Sequence[int], *, images: Optional[int],
                        batch_size: int, seed: int) -> Optional[str]:
    """Why ``data`` cannot fit the linear-probe head attributions need (None: it can)."""
    _, dataset = make_loader(data, img_size, images=images, batch_size=batch_size, workers=0,
                             seed=seed)
    if getattr(dataset, "labelled", False) and len(dataset.classes) >= 2:
        return None
    return (f"attribution needs images in at least 2 class subfolders of --data to fit a "
            f"linear-probe head (found {len(getattr(dataset, 'classes', []))} classes)")


def _figure_files(stem: Path) -> list[Path]:
    """The files :mod:`analysis.plots` writes for one figure ``stem``."""
    return [stem.with_name(f"{stem.name}.pdf"), stem.with_name(f"{stem.name}.png")]


def _model_info(loaded: Mapping[str, Any], geometries: Mapping[str, Any]) -> dict[str, dict]:
    """The report's per-model table: source, format, hash, method, prefix tokens, depth x heads."""
    return {
        name: {"source": enc.source, "format": enc.format, "sha256": enc.sha256 or "n/a",
               "method": getattr(enc, "method", None) or "n/a",
               "prefix tokens": enc.num_prefix_tokens,
               "depth × heads": f"{geometries[name].depth} × "
                                f"{getattr(geometries[name], 'num_heads', 'n/a')}"}
        for name, enc in loaded.items()
    }


#: the run settings (RunRecord.settings) holding the cross-model measures' options, which plot reuses
CROSS_K_SETTING, CROSS_CKA_SETTING = "cross-model k (mutual k-NN, CKNNA)", "cross-model CKA"


def _check_cross(images: int, k: int, cka: str) -> None:
    """The cross-model settings (:func:`analysis.settings.check_cross`), refused with one line each."""
    from kamim.config import ConfigError

    try:
        check_cross(images, k, cka)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _has_features(result: Any, images: int) -> bool:
    """Whether ``result`` saved cross-model features of ``images`` images (or of all, if fewer)."""
    from analysis.crossmodel import saved_features

    saved = saved_features(result)
    return saved is not None and result.options.get("cross_images") == images


def _attach_features(result: Any, enc: Any, data: PathLike, *, images: int, batch_size: int, workers: Optional[int],
                     seed: int, device: str, preprocessing: Preprocessing) -> None:
    """Save into ``result`` the pooled block outputs of the seeded subset of ``images`` images of
    ``data`` (the same files, in folder order, for every model and run with this seed), with the list
    of those files (:mod:`analysis.crossmodel`)."""
    import numpy as np

    from analysis.crossmodel import FEATURES, FILES, extract_features, files_digest

    loader, dataset = make_loader(data, enc.image_size, images=images, batch_size=batch_size, workers=workers,
                                  seed=seed, preprocessing=preprocessing, with_index=True)
    indices: list[int] = []

    def batches() -> Iterator[Any]:
        for batch in loader:
            indices.extend(int(i) for i in batch["index"])
            yield batch["image"]

    try:
        feats = extract_features(enc.model, batches(), device=device)
    except ValueError as err:
        raise UsageError(f"model {result.model_name}: cross-model features: {one_line(err)}") from None
    root = Path(getattr(dataset, "root", data)).expanduser().absolute()
    files = [Path(dataset.samples[i][0]).relative_to(root).as_posix() for i in indices]
    result.arrays = {**result.arrays, FEATURES: {str(k): v for k, v in feats.items()}, FILES: np.array(files)}
    result.options = {**result.options, "cross_images": images, "cross_files_sha256": files_digest(files)}


def _cross_models(results: Mapping[str, Any], notes: list[str], *, k: int, cka: str) -> dict[tuple[str, str], Any]:
    """Cross-model CKA, mutual k-NN and CKNNA of every pair of ``results`` from their saved features;
    skipped with a note in ``notes`` when fewer than 4 images were saved (unbiased HSIC needs 4)."""
    from analysis.crossmodel import compare_all, saved_features

    counts = {len(saved[1]) for r in results.values() if (saved := saved_features(r)) is not None}
    if sum(saved_features(r) is not None for r in results.values()) < 2:
        return {}
    if min(counts) < 4:
        notes.append(f"Cross-model analyses skipped: the models saved features of only {min(counts)} images "
                     f"(at least 4 are needed).")
        return {}
    try:
        return compare_all(results, k=k, cka=cka)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
