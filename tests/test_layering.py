"""Dependency rules: importing the core loads no shell, no pipeline and no heavy ML module."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_shells():
    code = (
        "import sys, medsearch, medsearch.catalog, medsearch.search, medsearch.stores.faiss, medsearch.errors;"
        "bad = [m for m in ('fastapi', 'typer', 'uvicorn', 'api', 'cli', 'indexer', 'torch', 'open_clip') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout}"


def test_core_sources_do_not_read_environment_or_print():
    import ast
    from pathlib import Path

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
