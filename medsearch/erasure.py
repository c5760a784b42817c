"""Erasure of a case, a patient or a source: catalog rows, stored vectors, texts, FAISS or Milvus
entries, BM25 terms, spool files and cached features, in an order a kill cannot undo halfway.

    1. record a pending erasure: the row ids, the home files, and per Milvus store the checksum
       terms of the vectors that go (one transaction)
    2. delete the catalog rows (one transaction, ``secure_delete``): from here on no search,
       draft or count can return them (an index that still holds their ids is refused or, for
       hits, finds no row)
    3. purge the derived stores: FAISS ``remove_ids`` (or a rebuild from stored vectors for
       kinds that cannot remove), Milvus ``delete``; BM25 rebuilt from the catalog's texts;
       spool files inside the home, leftover Ray shards and the tower-feature cache deleted
    4. mark the erasure done (its id lists dropped) and truncate the WAL

Every step is idempotent, and every ``remove`` (and ``medsearch check --repair``) first finishes
the erasures a kill left unfinished. The ``erasures`` table is the audit log: when, who, what
kind, counts, and a keyed digest of the key instead of the key itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .catalog import erasure as db
from .config import Paths
from .deid import pseudonym
from .errors import InvalidInput, MedsearchError, NotFound, StorageError

SPACES = ("image", "text")


def _target(case: str | None, patient: str | None, source: str | None) -> tuple[str, str]:
    named = [(k, v) for k, v in (("case", case), ("patient", patient), ("source", source)) if v not in (None, "")]
    if len(named) != 1:
        raise InvalidInput(
            "name exactly one of a case, a patient or a source to remove",
            hint="use --case KEY, --patient KEY or --source NAME (one of them)",
        )
    return named[0][0], str(named[0][1]).strip()


def digest_of(catalog: Catalog, kind: str, key: str) -> str:
    """The audit log's keyed digest of what an erasure named (HMAC with the home's salt)."""
    return pseudonym(f"{kind}:{key}", catalog.salt, "Erasure")


def plan_removal(catalog: Catalog, paths: Paths, kind: str, key: str) -> dict[str, Any]:
    """The row ids and home files a removal of ``kind`` ``key`` covers (reads only)."""
    pseud = pseudonym(key, catalog.salt, "PatientID") if kind == "patient" and catalog.salt else None
    case_ids = db.case_ids_for(catalog, kind, key, patient_pseudonym=pseud)
    plan = db.plan_for(catalog, case_ids)
    home = paths.home.resolve()
    plan["paths"] = sorted({p for p in plan["paths"] if _inside(Path(p), home)})  # spool files; sources stay
    return plan


def remove(
    catalog: Catalog, paths: Paths, *, case: str | None = None, patient: str | None = None, source: str | None = None,
    dry_run: bool = False, actor: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Erase what ``case``, ``patient`` or ``source`` names (exactly one); returns counts.

    ``dry_run`` reports what would go and changes nothing. Unfinished erasures are finished
    first; NotFound when nothing matches and nothing was left to finish.
    """
    kind, key = _target(case, patient, source)
    db.ensure_table(catalog)
    resumed = 0 if dry_run else finish_pending(catalog, paths)
    plan = plan_removal(catalog, paths, kind, key)
    counts = {"cases": len(plan["cases"]), "images": len(plan["images"]), "texts": len(plan["texts"]),
              "files": len(plan["paths"])}  # fmt: skip
    out = {"kind": kind, "dry_run": dry_run, "resumed": resumed, **counts}
    if not plan["cases"]:
        if resumed:
            return out
        raise NotFound(f"no {kind} {key!r} in the catalog", hint="use a key shown by `medsearch search` or `medsearch case`")
    if dry_run:
        return out
    plan["stores"] = _store_terms(catalog, paths, plan)
    plan["in_sync"] = _in_sync(catalog, paths, plan)
    eid = db.begin(catalog, kind=kind, digest=digest_of(catalog, kind, key), actor=actor, plan=plan)
    out.update(_run(catalog, paths, eid, "pending", plan))
    out["erasure_id"] = eid
    return out


def finish_pending(catalog: Catalog, paths: Paths) -> int:
    """Finish every erasure a kill left unfinished; returns how many."""
    todo = db.unfinished(catalog)
    for e in todo:
        _run(catalog, paths, e["id"], e["state"], e["plan"])
    return len(todo)


def _run(catalog: Catalog, paths: Paths, eid: int, state: str, plan: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    if state == "pending":
        counts.update(db.delete_rows(catalog, eid, plan))
    counts["stores"] = _purge_stores(catalog, paths, plan)
    counts["files"] = _purge_files(paths, plan)
    _redact_logs(paths, plan.get("keys", []))
    db.finish(catalog, eid, {k: counts.get(k, len(plan.get(k, []))) for k in ("cases", "images", "texts", "vectors", "files")}
              | {"stores": counts["stores"]})  # fmt: skip
    return counts


def _model_dirs(paths: Paths) -> list[Path]:
    return sorted(p for p in paths.indexes.iterdir() if p.is_dir()) if paths.indexes.is_dir() else []


def _store_terms(catalog: Catalog, paths: Paths, plan: dict[str, Any]) -> dict[str, Any]:
    """Per Milvus store: its manifest's checksum sums now and the terms of the vectors that go,
    so a purge (or its rerun after a kill) can set the checksum without reading the collection."""
    from .stores.base import manifest_path, read_manifest

    out: dict[str, Any] = {}
    for directory in _model_dirs(paths):
        for space in SPACES:
            mpath = manifest_path(directory, space)
            if not mpath.exists():
                continue
            try:
                man = read_manifest(mpath)
            except MedsearchError:
                continue
            if man.store != "milvus":
                continue
            from .stores.milvus_sync import removal_terms

            ids = plan["images"] if space == "image" else plan["texts"]
            out[f"{directory.name}/{space}"] = removal_terms(catalog, man, ids)
    return out


def _in_sync(catalog: Catalog, paths: Paths, plan: dict[str, Any]) -> dict[str, int]:
    """Per FAISS store whose index equals the stored vectors now (not marked dirty): how many of
    the plan's ids have a stored vector there. After the purge the index is in sync again exactly
    when it dropped that many, which spares counting 1M stored vectors (~1 s) to find out."""
    from .stores.base import manifest_path, read_manifest

    out: dict[str, int] = {}
    for directory in _model_dirs(paths):
        for space in SPACES:
            ids = plan["images"] if space == "image" else plan["texts"]
            mpath = manifest_path(directory, space)
            if not ids or not mpath.exists():
                continue
            try:
                man = read_manifest(mpath)
            except MedsearchError:
                continue
            if man.store == "faiss" and catalog.get_meta(f"dirty:{man.model_id}:{space}") == "0":
                out[f"{directory.name}/{space}"] = len(catalog.get_vectors(man.model_id, space, ids))
    return out


def _purge_stores(catalog: Catalog, paths: Paths, plan: dict[str, Any]) -> dict[str, int]:
    from .stores.base import manifest_path, read_manifest

    removed: dict[str, int] = {}
    for directory in _model_dirs(paths):
        for space in SPACES:
            mpath = manifest_path(directory, space)
            ids = plan["images"] if space == "image" else plan["texts"]
            if not mpath.exists() or not ids:
                continue
            man = read_manifest(mpath)
            if man.store == "milvus":
                from .stores.milvus_sync import purge

                n = purge(catalog, directory, space, ids, plan.get("stores", {}).get(f"{directory.name}/{space}"))
            else:
                n = _purge_faiss(catalog, directory, space, man, ids)
            removed[f"{man.model_id}/{space}"] = n
            expect = plan.get("in_sync", {}).get(f"{directory.name}/{space}")  # None: resumed, or was behind
            if (expect is not None and n == expect) or catalog.count_vectors(man.model_id, space) == (
                read_manifest(mpath).count if mpath.exists() else 0
            ):
                with catalog.atomic():
                    catalog.set_meta(f"dirty:{man.model_id}:{space}", "0")
        if (directory / "bm25.json").exists():  # BM25 terms: rebuilt from the catalog's remaining texts
            from .bm25 import build_bm25_index

            build_bm25_index(catalog, directory, force=True)
    return removed


def _purge_faiss(catalog: Catalog, directory: Path, space: str, man: Any, ids: list[int]) -> int:
    """Drop ids from a FAISS index: a segmented flat index rewrites only the segments that held
    them; a single file is loaded, ``remove_ids``-ed and saved; kinds that cannot remove (and a
    damaged index) are rebuilt from the (already purged) stored vectors."""
    import functools

    import numpy as np

    from .config import IndexConfig
    from .stores.faiss import VectorIndex, delete_files

    try:
        n = VectorIndex.remove_saved(directory, space, np.asarray(ids, dtype=np.int64))
    except StorageError:  # a full disk: the rerun finishes it (a rebuild would not fit either)
        raise
    except MedsearchError:
        n = None  # a missing or damaged segment: rebuilt below from the catalog
    if n is not None:
        return int(n)
    idx = None
    try:
        idx = VectorIndex.load(directory, space)
    except MedsearchError:
        pass  # unreadable or half-written: rebuilt below from the catalog
    n = idx.remove(np.asarray(ids, dtype=np.int64)) if idx is not None else None
    if n is None:
        stored = catalog.count_vectors(man.model_id, space)
        if stored == 0:
            delete_files(directory, space)
            return int(man.count)
        before = idx.ntotal if idx is not None else man.count
        idx = VectorIndex.from_blocks(
            functools.partial(catalog.iter_vectors, man.model_id, space), model_id=man.model_id,
            weights_hash=man.weights_hash, space=space, dim=man.dim, count=stored,
            config=IndexConfig(kind=man.kind if man.kind in ("flat", "hnsw", "ivfpq") else "auto"),
            generation=man.generation + 1,
        )  # fmt: skip
        n = int(before) - idx.ntotal
    idx.save(directory)
    return int(n)


def _purge_files(paths: Paths, plan: dict[str, Any]) -> int:
    """Spool files of the removed images inside the home, leftover Ray shards, the feature cache."""
    n = 0
    home = paths.home.resolve()
    for p in plan.get("paths", []):
        path = Path(p)
        if _inside(path, home) and path.is_file():
            path.unlink()
            n += 1
    shards = paths.home / "shards"  # vectors Ray actors wrote and the writer has not merged: re-embedded later
    if shards.is_dir():
        for f in shards.rglob("*"):
            if f.is_file() and (f.name.startswith("shard-") or f.name.startswith(".shard-")):
                f.unlink(missing_ok=True)
                n += 1
    cache = paths.models / "cache"  # tower features keyed by image/text content: rebuilt by the next train
    if cache.is_dir():
        shutil.rmtree(cache, ignore_errors=True)
        n += 1
    return n


def _redact_logs(paths: Paths, keys: list[str]) -> None:
    """Overwrite the removed case and patient keys in the home's audit logs with '#' (same length,
    in place: a server appending to the log keeps its file and offsets; the entries stay)."""
    needles = [k.encode() for k in keys if len(k) >= 4]
    if not needles:
        return
    for log in sorted(paths.home.glob("audit.log*")):
        if not log.is_file():
            continue
        with open(log, "r+b") as f:
            data = f.read()
            new = data
            for n in needles:
                new = new.replace(n, b"#" * len(n))
            if new != data:
                f.seek(0)
                f.write(new)
                f.flush()


def _inside(path: Path, home: Path) -> bool:
    try:
        return path.resolve().is_relative_to(home) and path.resolve() != home
    except (OSError, ValueError):
        return False


def audit_log(catalog: Catalog, limit: int = 100) -> list[dict[str, Any]]:
    """The erasure audit log, newest first (no keys: a keyed digest of each)."""
    return db.log(catalog, limit)


def check_erasures(catalog: Catalog, paths: Paths, problems: list[str], repaired: list[str], *, repair: bool) -> None:
    """For ``medsearch check``: report erasures a kill left unfinished; with ``repair`` finish them."""
    todo = db.unfinished(catalog)
    if not todo:
        return
    problems.append(f"{len(todo)} erasure(s) were interrupted before they finished")
    if repair:
        finish_pending(catalog, paths)
        repaired.append(f"finished {len(todo)} interrupted erasure(s)")
