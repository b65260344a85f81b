"""The house rules of the code: layers without cycles (function-level imports included), no module
over 800 lines. See docs/design-notes.md, "Layers"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gum_ray"
MAX_LINES = 800

#: layers from the bottom up; a module may import its own layer and the layers below, never above
#: (aoi, checkpoint_io/_convert, input_checks and viewer came with issues 13 and 15; quiet with 9)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("grid, bands, imagery", ("gum_ray.version", "gum_ray.quiet", "gum_ray.urls", "gum_ray.errors", "gum_ray.bands",
                              "gum_ray.grid", "gum_ray.aoi", "gum_ray.landmask", "gum_ray.imagery", "gum_ray.warp",
                              "gum_ray.configs", "gum_ray.tiling", "gum_ray.shuffled")),
    ("model, inference", ("gum_ray.network", "gum_ray.model", "gum_ray.gum2", "gum_ray.unet", "gum_ray.winograd",
                          "gum_ray.checkpoint_io",
                          "gum_ray.checkpoint_convert",
                          "gum_ray.input_checks",
                          "gum_ray.devices", "gum_ray.inference", "gum_ray.training")),
    ("sources, store", ("gum_ray.sources", "gum_ray.store", "gum_ray.export_io")),
    ("patches, finetune, demo model, viewer", ("gum_ray.patches", "gum_ray.finetune", "gum_ray.demo_model", "gum_ray.demo_gum2",
                                               "gum_ray.predict", "gum_ray.viewer")),
    ("mapping", ("gum_ray.mapping",)),
    ("commands", ("gum_ray.commands", "gum_ray.cli", "gum_ray")),
]


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the gum_ray modules its code imports, at any depth of the code (function-level
    imports included), plus the packages whose ``__init__`` such an import runs first."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("gum_ray"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.startswith("gum_ray"):
                    for a in node.names:
                        full = f"{base}.{a.name}"
                        targets.add(full if full in mods else base)
        edges: set[str] = set()
        own = set(_ancestors(name)) | ({name} if path.name == "__init__.py" else set())
        for t in targets:
            r = _resolve(t, mods)
            if r is None:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ first (unless already running: ours)
            edges.update(a for a in _ancestors(r) + [r] if a not in own and a != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer; add it to LAYERS (and to docs/design-notes.md)"
    return level


def test_the_graph_sees_function_level_imports_and_package_inits():
    g = import_graph()
    # a function-level import (runner imports the limiters inside a function)
    assert "gum_ray.mapping.limits" in g["gum_ray.mapping.runner"]
    # importing a submodule runs its package's __init__ first
    assert "gum_ray.sources" in g["gum_ray.mapping.limits"]
    # and a planted cycle is found
    planted = {k: set(v) for k, v in g.items()}
    planted["gum_ray.imagery"].add("gum_ray.mapping.runner")
    assert any("gum_ray.imagery" in c for c in cycles(planted))


def test_no_import_cycle_between_gum_ray_modules():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_every_import_goes_to_the_same_layer_or_below():
    bad = []
    for module, targets in import_graph().items():
        for t in targets:
            if layer_of(t) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not bad, "imports up the layers:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_over_800_lines(module):
    n = len(modules()[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it by responsibility"
