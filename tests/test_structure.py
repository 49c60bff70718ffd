"""The package's shape: no import circle (function-level imports included), families that add in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "d2build"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the d2build modules it imports anywhere in its body (module level or inside functions).

    `from pkg import sub` counts as an import of pkg.sub alone when sub is a module (Python runs pkg's
    __init__ first, but that is no dependency on what pkg's __init__ defines)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.startswith("d2build") else None
                if r and r != m:
                    edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    edges = import_graph()
    assert len(edges) > 60 and "d2build.stages.verify" in edges["d2build.pipeline"]  # the walk sees function imports
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_recipe_is_a_leaf_and_stages_never_import_the_schema_or_composition():
    edges = import_graph()
    assert edges["d2build.recipe"] == set()
    for m, targets in edges.items():
        if m.startswith("d2build.stages"):
            assert not targets & {"d2build.schema", "d2build.cli", "d2build.runner"}, (m, targets)
        if m.startswith("d2build.families") or m.startswith("d2build.backends"):
            assert not any(t.startswith(("d2build.stages", "d2build.commands")) for t in targets), (m, targets)


def test_every_family_is_one_package_of_a_runtime_and_a_build_half():
    from d2build.families import FAMILIES, builder, family, runtime_modules

    for name, package in FAMILIES.items():
        folder = REPO / package.replace(".", "/")
        assert (folder / "__init__.py").is_file() and (folder / "build.py").is_file(), folder
        assert builder(name).family.name == family(name).name == name
    listed = runtime_modules()
    assert all((PACKAGE / rel).is_file() for rel in listed) and len(listed) == len(FAMILIES) + 2
    # the runtime halves import numpy and d2build's runtime modules only: no torch, Detectron2, ONNX tooling
    code = ("import sys\nfrom d2build.families import FAMILIES, family\n[family(n) for n in FAMILIES]\n"
            "heavy = sorted(m for m in ('torch', 'detectron2', 'onnx', 'onnx_graphsurgeon', 'hydra') if m in sys.modules)\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_folder_of_python_files_is_a_package():
    """setup.py finds packages by their __init__.py: a folder without one would be left out of the wheel."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert [f for f in folders if not (f / "__init__.py").is_file()] == []
