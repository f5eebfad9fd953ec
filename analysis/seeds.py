"""Several checkpoints of one method (seeds) under one model name (torch-free).

``--model kamim=run_a,run_b,run_c`` (or ``models: {kamim: [run_a, run_b, run_c]}``) analyses each
checkpoint as its own model, ``kamim@1``, ``kamim@2``, ``kamim@3`` (:func:`expand_seeds`): their
results, provenance and tidy rows are kept, one per seed. The figures and the report then show one
model ``kamim``, :func:`combine_seeds`: every tidy value is the mean over the seeds and its
``ci_low``/``ci_high`` the 95% Student interval **across seeds** (:mod:`analysis.uncertainty`; the
spread that matters when two methods are compared, larger than the interval over images of one
seed), and the averageable arrays (:data:`AVERAGED_ARRAYS`: matrices, spectra, histograms) are the
mean over seeds. Arrays that are samples of one model (t-SNE points, attention maps of example
images, PCA images, attributions) cannot be averaged: they are the first seed's, and the model's
label says so. ``metrics.csv`` holds both the rows of each seed and the rows of the mean.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .uncertainty import Moments

__all__ = ["SEED_MARK", "AVERAGED_ARRAYS", "expand_seeds", "combine_seeds", "shown_results"]

#: ``kamim@2``: the second checkpoint given for the model name ``kamim``
SEED_MARK = "@"
#: Arrays that are the same quantity for every seed (same shape), so their mean over seeds is drawn.
AVERAGED_ARRAYS = ("attention_similarity", "head_similarity", "cka", "fourier", "fourier_freqs", "rank_spectrum",
                   "norm_histogram", "norm_log_edges", "rollout_mean")


def _sources(value: Any) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",")]
    if isinstance(value, Sequence):
        return [str(s).strip() for s in value]
    return [str(value)]


def expand_seeds(models: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``{name: "a,b,c" | [a, b, c] | "a"}`` -> (``{name@1: a, name@2: b, ...}`` with single-checkpoint
    names unchanged, ``{name: [name@1, ...]}``). A ValueError (one line) for an empty checkpoint in a
    list, a seed list of one, or a name that would collide with a seed's name."""
    flat: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name, value in models.items():
        sources = _sources(value)
        if len(sources) == 1:
            flat[name] = sources[0]
            continue
        if any(not s for s in sources):
            raise ValueError(f"model {name}: empty checkpoint in the list {','.join(sources)!r}; expected "
                             "NAME=CKPT_A,CKPT_B,... (one checkpoint per seed)")
        groups[name] = [f"{name}{SEED_MARK}{i}" for i in range(1, len(sources) + 1)]
        flat.update(zip(groups[name], sources))
    clash = sorted(set(models).difference(groups) & {m for members in groups.values() for m in members})
    if clash:
        raise ValueError(f"model name {clash[0]!r} is also the name of a seed of another model; rename it")
    return flat, groups


def combine_seeds(name: str, members: Mapping[str, Any]) -> Any:
    """One :class:`~analysis.results.AnalysisResult` named ``name`` for the seeds ``members`` (module
    docstring): mean and 95% interval across seeds of every tidy value; mean of the
    :data:`AVERAGED_ARRAYS`, the first seed's other arrays. The seeds must have made the same analyses
    on the same geometry and number of images (a one-line ValueError otherwise)."""
    import dataclasses

    import pandas as pd

    from .results import TABLE_COLUMNS, records_to_frame

    results = list(members.values())
    if len(results) < 2:
        raise ValueError(f"model {name}: a mean over seeds needs at least 2 results, got {len(results)}")
    first = results[0]
    for member, r in members.items():
        for what, mine, theirs in (("analyses", r.analyses, first.analyses), ("images", r.images, first.images),
                                   ("geometry", _geometry(r), _geometry(first))):
            if mine != theirs:
                raise ValueError(f"model {name}: its seeds differ in {what} ({next(iter(members))}: {theirs!r}, "
                                 f"{member}: {mine!r}); seeds are compared on the same images and analyses")
    keys = ["layer", "head", "column", "metric"]
    tables = [r.table.set_index(keys)["value"] for r in results]
    common = tables[0].index
    for t in tables[1:]:
        common = common.intersection(t.index, sort=False)
    values = np.stack([t.loc[common].to_numpy(dtype=np.float64) for t in tables])  # (seeds, rows)
    moments = Moments()
    moments.add(values)
    low, high = moments.interval()
    counts = first.table.set_index(keys)["n_images"].loc[common].to_numpy()
    rows = pd.DataFrame(list(common), columns=keys).assign(model=name, value=moments.mean, ci_low=low, ci_high=high,
                                                           n_images=counts)
    table = records_to_frame(rows[list(TABLE_COLUMNS)].to_dict(orient="records"))
    arrays = dict(first.arrays)
    for key in AVERAGED_ARRAYS:
        found = [r.arrays.get(key) for r in results]
        if all(a is not None and np.shape(a) == np.shape(found[0]) for a in found):
            arrays[key] = np.mean([np.asarray(a, dtype=np.float64) for a in found], axis=0)
    for key in ("cross_features", "cross_files"):  # cross-model measures compare the seeds themselves
        arrays.pop(key, None)
    provenance = {**first.provenance, "seeds": {m: r.provenance.get("sha256") for m, r in members.items()}}
    return dataclasses.replace(first, model_name=name, table=table, arrays=arrays, provenance=provenance,
                               options={**first.options, "seeds": list(members)})


def _geometry(result: Any) -> Any:
    g = result.geometry
    return g.to_dict() if hasattr(g, "to_dict") else g


def shown_results(results: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """What the figures and the report show: each seed group as one :func:`combine_seeds` result, in
    the place of its first seed; the other models as they are."""
    member_of = {m: g for g, members in groups.items() for m in members}
    shown: dict[str, Any] = {}
    for name, result in results.items():
        group = member_of.get(name)
        if group is None:
            shown[name] = result
        elif group not in shown:
            shown[group] = combine_seeds(group, {m: results[m] for m in groups[group] if m in results})
    return shown
