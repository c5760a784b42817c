"""Dependency rules: importing the core loads no shell, no pipeline and no heavy ML module; the import
graph of medsearch, indexer, api and cli has no cycle (function-level imports included); no SQL runs
outside medsearch/catalog/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_core_imports_no_shells():
    code = (
        "import sys, medsearch, medsearch.catalog, medsearch.search, medsearch.stores.faiss, medsearch.errors;"
        "bad = [m for m in ('fastapi', 'typer', 'uvicorn', 'api', 'cli', 'indexer', 'torch', 'open_clip') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout}"


def test_core_sources_do_not_read_environment_or_print():
    root = Path(__file__).resolve().parents[1] / "medsearch"
    offenders = []
    for p in root.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{p.relative_to(root)}:{node.lineno} print()")
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and getattr(node.value, "id", "") == "os":
                offenders.append(f"{p.relative_to(root)}:{node.lineno} os.{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    if n.split(".")[0] in ("typer", "fastapi", "uvicorn", "indexer", "cli", "api"):
                        offenders.append(f"{p.relative_to(root)}:{node.lineno} import {n}")
    assert not offenders, offenders


# ------------------------------------------------------------------ the import graph and the SQL rule
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medsearch", "indexer", "api", "cli")
SQL_CALLS = ("execute", "executemany", "executescript")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every source module of the four packages."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The project modules one import statement loads (relative imports resolved against ``name``)."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # `from pkg import sub` loads pkg.sub when sub is a module, else only pkg
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for w in wanted:
        while w and w not in mods:  # `import medsearch.rag.render` -> the deepest module that exists
            w = w.rpartition(".")[0]
        if w:
            out.append(w)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its file (top level, in functions, under TYPE_CHECKING).

    A module importing its own package (``medsearch.catalog.core`` -> ``medsearch.catalog``) is no edge:
    Python has already started that package before the module runs.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, path, node, mods):
                    if t != name and not name.startswith(t + "."):
                        graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_cycles_and_resolves_relative_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
    mods = {"medsearch": Path("medsearch/__init__.py"), "medsearch.rag": Path("medsearch/rag/__init__.py"),
            "medsearch.rag.render": Path("medsearch/rag/render.py"), "medsearch.search": Path("medsearch/search.py")}  # fmt: skip
    rel = ast.parse("from ..search import Searcher\nfrom . import render\nfrom .render import x").body
    assert [_targets("medsearch.rag.drafter", Path("medsearch/rag/drafter.py"), n, mods) for n in rel] == [
        ["medsearch.search"], ["medsearch.rag.render"], ["medsearch.rag.render"],
    ]  # fmt: skip
    init = ast.parse("from .render import x").body[0]
    assert _targets("medsearch.rag", Path("medsearch/rag/__init__.py"), init, mods) == ["medsearch.rag.render"]


def test_no_import_cycles_in_medsearch_indexer_api_cli():
    graph = import_graph()
    assert len(graph) > 50 and "medsearch.search" in graph["medsearch.rag.evidence"]  # the graph is real
    found = cycles(graph)
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_sql_outside_the_catalog_package():
    offenders = []
    for name, path in _modules().items():
        if name == "medsearch.catalog" or name.startswith("medsearch.catalog."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.func.attr}()")
    assert not offenders, "raw SQL outside medsearch/catalog/ (add a named Catalog method):\n" + "\n".join(offenders)
