"""The package's shape, read from its source (issue 30): the layers of docs/explanation/architecture.md as an
import graph with no cycles and no upward arrows, and no function too long or with too many parameters.

The graph counts every ``import`` / ``from ... import`` of a fastsde module anywhere in a file (inside
functions too: an import moved into a function to dodge a cycle is still an arrow)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "fastsde"

#: rank of each part of the package, low to high; a module may import only modules of its rank or below
#: (longest matching prefix wins). The same order as the layer table of docs/explanation/architecture.md.
LAYERS: dict[str, int] = {
    # foundations
    "fastsde.sde": 0,
    "fastsde.noise": 0,
    "fastsde.brownian": 0,
    "fastsde.grids": 0,
    "fastsde.files": 0,
    "fastsde.identity": 0,
    "fastsde.plots": 0,
    "fastsde.data": 0,
    # scores: the contract, adapters, guidance, hierarchies
    "fastsde.score": 1,
    "fastsde.guidance": 1,
    "fastsde.levels": 2,  # hierarchies of models: Levels.from_models loads them
    # models, training, problems, metrics
    "fastsde.models": 2,
    "fastsde.training": 2,
    "fastsde.problems": 2,
    "fastsde.metrics": 2,
    # fitted data (below the solvers)
    "fastsde.artifacts": 3,
    # solvers: the core, the methods, the registry
    "fastsde.solvers.core": 4,
    "fastsde.solvers.": 5,
    "fastsde.solvers": 6,
    # the front door
    "fastsde.api": 7,
    # above the front door: fitting procedures, runs, likelihood
    "fastsde.fitting": 8,
    "fastsde.shards": 8,
    "fastsde.sharding": 8,
    "fastsde.likelihood": 8,
    # integrations and benchmarks
    "fastsde.integrations": 9,
    "fastsde.diffusers": 9,
    "fastsde.k_diffusion": 9,
    "fastsde.bench": 9,
    # the command line and the package's own namespace
    "fastsde.cli": 10,
    "fastsde.__main__": 10,
    "fastsde": 10,
}

#: functions longer than MAX_LINES that another open issue rebuilds
PENDING: dict[str, str] = {}
MAX_LINES = 120
MAX_PARAMS = 12
#: public entry points that may take more parameters, all but the first few keyword-only
PUBLIC_MANY = {
    "sample",
    "sample_pipeline",
    "__init__",  # a diffusers scheduler's config is its keyword-only constructor (FastSDEScheduler)
    "log_likelihood",
    "fit_iia",
    "fit_grid",
    "fit_mlem",
    "sample_to_dir",
    "likelihood_to_dir",
    "dataset_likelihood",
}
MAX_POSITIONAL = 7  # log_likelihood(score, sde, x, trace, seed, rtol, atol) as DESIGN.md writes it


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the fastsde modules it imports (packages count as their __init__)."""
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges[name].update(c for c in candidates if c in mods and c != name)
    return edges


def rank(module: str) -> int:
    best, best_len = None, -1
    for prefix, r in LAYERS.items():
        hit = module == prefix or (
            module.startswith(prefix) if prefix.endswith(".") else module.startswith(prefix + ".")
        )
        if hit and len(prefix) > best_len:
            best, best_len = r, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it (and to docs/explanation/architecture.md)")
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in _modules():
        rank(module)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_upward_imports():
    edges = import_graph()
    up = [f"{a} ({rank(a)}) -> {b} ({rank(b)})" for a in sorted(edges) for b in sorted(edges[a]) if rank(b) > rank(a)]
    assert not up, "imports of a higher layer:\n" + "\n".join(up)


def _functions():
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PKG), node


def test_no_long_functions():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in _functions()
        if node.end_lineno - node.lineno + 1 > MAX_LINES and node.name not in PENDING
    ]
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


def test_parameters():
    bad = []
    for path, node in _functions():
        a = node.args
        positional = [p.arg for p in a.posonlyargs + a.args if p.arg not in ("self", "cls")]
        total = len(positional) + len(a.kwonlyargs)
        if total <= MAX_PARAMS or node.name in PENDING:
            continue
        if node.name in PUBLIC_MANY and len(positional) <= MAX_POSITIONAL:
            continue
        bad.append(f"{path}:{node.lineno} {node.name} ({total} parameters, {len(positional)} positional)")
    assert not bad, f"functions over {MAX_PARAMS} parameters (take a settings object):\n" + "\n".join(bad)


def test_the_cycle_finder_on_a_known_graph():
    """The checker itself: a 3-cycle and a 2-cycle found, a chain and a self-free tree not."""
    mods = sorted(_modules())[:6]
    a, b, c, d, e, f = mods
    found = cycles({a: {b}, b: {c}, c: {a}, d: {e}, e: {d, f}, f: set()})
    assert sorted(map(sorted, found)) == sorted([sorted([a, b, c]), sorted([d, e])])
    assert cycles({a: {b}, b: {c}, c: set()}) == []
