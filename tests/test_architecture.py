"""The layout docs/architecture.md describes: stage packages over core/, imports only downward, no cycle.

Every import counts, function-level ones included (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "prefcache"

# Lower layers first; a module may import its own package and any package of a lower layer.
# reference/ and training/ share a layer and may not import each other: they meet only in cache/.
LAYERS = [
    {"core"},
    {"data"},
    {"model"},
    {"cache"},
    {"losses"},
    {"reference", "training"},
    {"evaluation", "analysis"},
    {"export"},
    {"cli"},
]
LAYER = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}


def _stage(module: str) -> str | None:
    """'prefcache.cache.store' -> 'cache'; None for the package root (__init__, __main__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else None


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def _edges():
    modules = dict(_modules())
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target, names in _imports(module, path):
            for t in [target, *names]:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != module and t.startswith("prefcache.") and not module.startswith(t + "."):
                    edges[module].add(t)
    return edges


def test_the_top_level_is_the_stage_packages():
    entries = sorted(p.name for p in PKG.iterdir() if not p.name.startswith((".", "__pycache__")))
    assert len(entries) <= 15, entries
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYER) - {"export"}


def test_imports_go_only_downward():
    wrong = []
    for module, targets in _edges().items():
        here = _stage(module)
        for target in targets:
            there = _stage(target)
            if here is None or there is None or here == there:
                continue
            if LAYER[there] >= LAYER[here]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = _edges()
    seen, on_path, cycles = set(), [], []

    def visit(m):
        seen.add(m)
        on_path.append(m)
        for t in edges[m]:
            if t in on_path:
                cycles.append(on_path[on_path.index(t):] + [t])
            elif t not in seen:
                visit(t)
        on_path.pop()

    for m in edges:
        if m not in seen:
            visit(m)
    assert not cycles, cycles


@pytest.mark.parametrize("limit", [300])
def test_modules_stay_small(limit):
    """One purpose per module: a few hundred lines at most (STYLE.md 7)."""
    big = {m: n for m, p in _modules() if (n := len(p.read_text().splitlines())) > limit}
    assert not big, big


def _prefcache_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("prefcache"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("prefcache"):
                    yield node.lineno, a.name, []


@pytest.mark.parametrize("folder", ["benchmarks", "examples", "tests"])
def test_every_prefcache_import_outside_the_package_resolves(folder):
    """Scripts import the package's modules by path (often inside functions, so nothing runs them here):
    each name they import must exist where they look for it."""
    import importlib

    broken = []
    for path in sorted((PKG.parent / folder).rglob("*.py")):
        for line, module, names in _prefcache_imports(path):
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                broken.append(f"{path.name}:{line}: {module} ({e})")
                continue
            for name in names:
                if not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ImportError:
                        broken.append(f"{path.name}:{line}: {module}.{name}")
    assert not broken, "\n".join(broken)
