"""A consistent copy of a live catalog file through SQLite's online backup API.

The copy is taken in one backup step, i.e. inside one read transaction: with the catalog in WAL
mode, writers in other processes go on committing while it runs, and the copy holds exactly the
transactions committed before it began (no half of an ingest chunk). The copy is switched to a
rollback journal so that it is one self-contained file, then integrity-checked.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from medsearch.errors import CatalogError, NotFound, StorageError

_FULL = ("database or disk is full", "disk i/o error", "no space")


def snapshot(src: Path, dest: Path) -> dict[str, Any]:
    """Copy the catalog ``src`` into the new file ``dest``; returns {bytes, pages, seconds, integrity}.

    Raises StorageError when ``dest`` cannot be written (full disk; ``dest`` is removed),
    CatalogError when ``src`` is not a readable SQLite catalog.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise NotFound(f"no catalog at {src}", hint="point --home at a medsearch home")
    t0 = time.perf_counter()
    source = sqlite3.connect(str(src), timeout=30)  # read only in practice; ro mode cannot open a closed WAL file
    target = None
    try:
        target = sqlite3.connect(str(dest))
        source.backup(target, pages=-1)  # one step = one read transaction = one point in time
        target.execute("PRAGMA journal_mode=DELETE")
        pages = target.execute("PRAGMA page_count").fetchone()[0]
        integrity = target.execute("PRAGMA quick_check").fetchone()[0]
        target.commit()
    except sqlite3.Error as e:
        if target is not None:
            target.close()
            target = None
        for p in (dest, dest.with_name(dest.name + "-journal")):
            p.unlink(missing_ok=True)
        text = str(e).lower()
        if any(s in text for s in _FULL):
            raise StorageError(f"could not write the catalog copy {dest.name}: {e}",
                               hint="free disk space at the destination and run the backup again") from e
        raise CatalogError(f"cannot copy the catalog {src.name}: {e}",
                           hint="run `medsearch check`; the catalog may be damaged") from e
    finally:
        source.close()
        if target is not None:
            target.close()
    if integrity != "ok":
        raise CatalogError(f"the copy of {src.name} fails SQLite's integrity check: {integrity}",
                           hint="the live catalog may be damaged: run `medsearch check`")
    return {"bytes": dest.stat().st_size, "pages": int(pages), "seconds": round(time.perf_counter() - t0, 3),
            "integrity": integrity}


def integrity(path: Path) -> str:
    """SQLite's quick_check of a catalog file: ``"ok"`` or the first problem it names."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return str(conn.execute("PRAGMA quick_check").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as e:
        return f"unreadable: {e}"
