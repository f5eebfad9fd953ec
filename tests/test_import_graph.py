"""The dependency direction of kamim/ and analysis/, read from the source with ``ast`` (every import,
including those inside functions and ``TYPE_CHECKING`` blocks).

    rank  layer        modules (prefix match)
    ----  -----------  ------------------------------------------------------------------
     0    backbone     kamim.backbone          (geometry, layers, features, to_hw: torch and timm only)
     1    method       kamim.keypoints, kamim.weights, kamim.loss, kamim.masking
     2    models       kamim.models, kamim.checkpoints, kamim.convert
     3    data         kamim.data
     4    runtime      kamim.runtime
     5    engine       kamim.engine            (training; never imports eval)
     5    eval         kamim.eval              (evaluation; never imports engine)
     6    experiments  kamim.experiments       (the sweep; may import engine and eval)
     7    facade       kamim (the package __init__: the public surface)
     8    cli          kamim.cli, analysis.cli
     -    support      kamim.errors, serialization, outputs, distributed, interrupt, precision,
                       metrics_log, config, optim, doctor, inputs, progress, lazy: importable from every layer below the
                       CLIs; they import only other support modules (and ``kamim.__version__``).

A kamim module imports only modules of its own rank or lower (same-rank siblings not at all), and
never ``analysis``. The analysis core (every analysis module but the recipes) imports from kamim only
the method (keypoint figures), ``kamim.backbone`` and the support modules ``kamim.serialization``
(atomic CSV/JSON/figure writes) and ``kamim.precision`` (the one autocast);
the recipes (analysis.pipeline, paper, demo, cli, settings) only the public surface ``from kamim import NAME``
(NAME in ``kamim.__all__``), kamim.backbone and support modules. SHIMS are pure re-export modules
left at an old path until the lead repoints their importers; they are checked to hold no code.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # prefix -> (rank, layer)
    "kamim.backbone": (0, "backbone"), "kamim.keypoints": (1, "method"), "kamim.weights": (1, "method"),
    "kamim.loss": (1, "method"), "kamim.masking": (1, "method"), "kamim.models": (2, "models"),
    "kamim.checkpoints": (2, "models"), "kamim.convert": (2, "models"), "kamim.data": (3, "data"),
    "kamim.runtime": (4, "runtime"), "kamim.engine": (5, "engine"), "kamim.eval": (5, "eval"),
    "kamim.experiments": (6, "experiments"), "kamim.cli": (8, "cli"),
}
FACADE = "kamim"
SUPPORT = {f"kamim.{m}" for m in ("errors", "serialization", "outputs", "distributed", "interrupt", "precision",
                                  "metrics_log", "config", "optim", "doctor", "inputs", "progress", "lazy")}
ANALYSIS_RECIPES = {"analysis.pipeline", "analysis.paper", "analysis.demo", "analysis.cli", "analysis.settings"}
ANALYSIS_CORE_ALLOWED = {"kamim.keypoints", "kamim.weights", "kamim.backbone", "kamim.serialization",
                         "kamim.precision", "kamim.progress", "kamim.lazy"}
SHIMS = {"kamim.engine.sweep", "kamim.engine.sweep_grid", "kamim.engine.sampler"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("kamim", "analysis"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every kamim/analysis import; ``from X import Y`` is X.Y when
    that is a module, the root package with the name (``kamim:NAME``) when X is ``kamim``."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, node.lineno) if sub in MODULES else
                             (f"{base}:{a.name}" if base == FACADE else base, node.lineno))
    return [(t, ln) for t, ln in found if t.split(".")[0].split(":")[0] in ("kamim", "analysis")]


def _layer(mod: str) -> tuple[int, str] | None:
    if mod in SUPPORT:
        return None
    if mod == FACADE:
        return 7, "facade"
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{mod} is in no layer of the table in {__file__}: add it")


def _facade_all() -> set[str]:
    for node in ast.parse((ROOT / "kamim/__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _violations() -> list[str]:
    public, bad = _facade_all(), []
    for mod, path in MODULES.items():
        where = f"{path.relative_to(ROOT)}"
        for target, line in _imports(mod, path):
            name = target.partition(":")[2]
            target = target.partition(":")[0]
            if target == mod or target.startswith(mod + ".") and path.name == "__init__.py":
                continue
            if name == "__version__":
                continue
            msg = f"{where}:{line}: {mod} -> {target}{':' + name if name else ''}"
            if mod.startswith("analysis"):
                if target.startswith("analysis"):
                    if mod not in ANALYSIS_RECIPES and target in ANALYSIS_RECIPES:
                        bad.append(f"{msg} (analysis core imports a recipe)")
                    continue
                if mod in ANALYSIS_RECIPES:
                    ok = target in SUPPORT or target == "kamim.backbone" or (target == FACADE and name in public)
                    if not ok:
                        bad.append(f"{msg} (analysis recipes use only kamim's public surface)")
                elif target not in ANALYSIS_CORE_ALLOWED:
                    bad.append(f"{msg} (analysis core imports from kamim only {sorted(ANALYSIS_CORE_ALLOWED)})")
                continue
            if target.startswith("analysis"):
                bad.append(f"{msg} (kamim never imports analysis)")
                continue
            if mod in SHIMS or target in SUPPORT:
                continue
            src, dst = _layer(mod), _layer(target)
            if src is None:
                bad.append(f"{msg} (support module imports layer '{dst[1]}')")
            elif dst[0] > src[0] or (dst[0] == src[0] and dst[1] != src[1]):
                bad.append(f"{msg} ('{src[1]}' may not import '{dst[1]}')")
    return list(dict.fromkeys(bad))


def test_table_covers_every_kamim_module():
    for mod in MODULES:
        if mod.startswith("kamim"):
            _layer(mod)  # raises for an unclassified module


def test_shims_hold_only_re_exports():
    for mod in SHIMS:
        tree = ast.parse(MODULES[mod].read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert all(isinstance(n, (ast.Import, ast.ImportFrom)) or
                   (isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__") for n in body), mod


def test_no_cycle_between_kamim_subpackages():
    units: dict[str, set[str]] = {}
    unit = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    for mod, path in MODULES.items():
        if mod.startswith("kamim.") and mod not in SHIMS:
            for target, _ in _imports(mod, path):
                t = target.partition(":")[0]
                if t.startswith("kamim.") and unit(t) != unit(mod):
                    units.setdefault(unit(mod), set()).add(unit(t))
    seen, stack, cycles = set(), [], []

    def visit(u: str) -> None:
        if u in stack:
            cycles.append(" -> ".join(stack[stack.index(u):] + [u]))
            return
        if u in seen:
            return
        seen.add(u)
        stack.append(u)
        for v in sorted(units.get(u, ())):
            visit(v)
        stack.pop()

    for u in sorted(units):
        visit(u)
    assert not cycles, "\n".join(cycles)


def test_every_import_respects_the_layer_order():
    bad = _violations()
    assert not bad, f"{len(bad)} import(s) against the dependency rule:\n" + "\n".join(bad)


def test_rule_detects_an_upward_import(monkeypatch):
    fake = ROOT / "kamim/runtime/amp.py"
    real = _imports
    monkeypatch.setitem(globals(), "_imports",
                        lambda m, p: real(m, p) + ([("kamim.eval.knn", 1)] if p == fake else []))
    assert any("kamim.runtime.amp -> kamim.eval.knn ('runtime' may not import 'eval')" in v for v in _violations())


def test_facade_all_lists_exactly_the_lazy_names():
    import sys

    import kamim

    assert set(kamim.__all__) == set(kamim._WHERE) | {"__version__"}
    assert _facade_all() == set(kamim.__all__)
    for name in kamim.__all__:
        assert getattr(kamim, name) is not None, name
    assert all(getattr(sys.modules[kamim._WHERE[n]], n) is getattr(kamim, n) for n in kamim._WHERE)


def test_import_kamim_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, kamim; from kamim import __version__; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_analysis_public_surface_resolves_without_torch_and_users_import_from_it():
    """``import kamim, analysis`` imports no torch; every name of both ``__all__`` resolves; the README's
    Python blocks and the notebooks import kamim and analysis names from the top level only."""
    import json
    import re
    import subprocess
    import sys

    code = ("import sys, kamim, analysis; assert 'torch' not in sys.modules; "
            "[getattr(m, n) for m in (kamim, analysis) for n in m.__all__]; print(len(analysis.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    texts = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        texts += ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    deep = sorted({m for t in texts for m in re.findall(r"^\s*from ((?:kamim|analysis)\.[\w.]+) import", t, re.M)})
    assert not deep, f"import these from the top level (kamim / analysis) instead: {deep}"


def test_readme_api_table_names_only_public_names():
    import re

    import analysis
    import kamim

    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(kamim|analysis)` \([^)]*\) \| (.*) \|$", section, re.M)
    assert len(rows) == 5
    for package, names in rows:
        public = {"kamim": kamim, "analysis": analysis}[package].__all__
        listed = [n for n in re.findall(r"`(\w+)`", names)]
        assert listed and not [n for n in listed if n not in public], (package, listed)
