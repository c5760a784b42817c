"""Erasure's catalog side: what a removal names, the pending-erasure record, and the row deletes.

An ``erasures`` row is written first (state ``pending``, with the row ids to remove and the home
files to delete), in one transaction; the catalog rows go in a second one (state ``purging``);
the caller then purges the derived stores and files and marks it ``done``, which also clears the
id lists. A kill at any point leaves a row that is not ``done``, and the next run finishes it.
The row keeps no key or name: only a keyed digest of what was named (HMAC with the home's salt:
someone who knows the key can verify the erasure, nobody can read the key from the log).

Deletes run with ``secure_delete`` on (SQLite overwrites the freed content with zeros), and the
WAL is checkpointed and truncated afterwards, so no page of the file keeps the removed text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .core import Catalog
from .util import chunks as _chunks
from .util import now

TABLE = """
CREATE TABLE IF NOT EXISTS erasures (
    id INTEGER PRIMARY KEY,
    requested_at TEXT NOT NULL,
    finished_at TEXT,
    actor TEXT,
    target_kind TEXT NOT NULL,
    target_digest TEXT NOT NULL,
    state TEXT NOT NULL,
    plan TEXT NOT NULL DEFAULT '{}',
    counts TEXT NOT NULL DEFAULT '{}'
);
"""
KINDS = ("case", "patient", "source")


def ensure_table(catalog: Catalog) -> None:
    catalog.db.conn.executescript(TABLE)


def case_ids_for(catalog: Catalog, kind: str, key: str, *, patient_pseudonym: str | None = None) -> list[int]:
    """Case row ids that ``kind`` (case, patient, source) and ``key`` name; empty when none.

    case: id, key or ``source:key``; patient: the stored patient key, or its keyed pseudonym
    (DICOM ingest stores pseudonyms); source: every case of that source.
    """
    if kind == "case":
        rows = []
        if key.isdigit():
            rows = catalog.db.execute("SELECT id FROM cases WHERE id = ?", [int(key)]).fetchall()
        if not rows:
            rows = catalog.db.execute("SELECT id FROM cases WHERE key = ?", [key]).fetchall()
        if not rows and ":" in key:
            src, k = key.split(":", 1)
            rows = catalog.db.execute("SELECT id FROM cases WHERE source = ? AND key = ?", [src, k]).fetchall()
    elif kind == "patient":
        keys = [key] + ([patient_pseudonym] if patient_pseudonym else [])
        rows = catalog.db.execute(
            f"SELECT id FROM cases WHERE patient_key IN ({','.join('?' * len(keys))})", keys
        ).fetchall()
    elif kind == "source":
        rows = catalog.db.execute("SELECT id FROM cases WHERE source = ?", [key]).fetchall()
    else:
        raise ValueError(kind)
    return sorted({int(r[0]) for r in rows})


def plan_for(catalog: Catalog, case_ids: list[int]) -> dict[str, Any]:
    """{'cases', 'images', 'texts': row ids, 'paths': image file paths, 'keys': case and patient keys}."""
    images: list[int] = []
    texts: list[int] = []
    paths: list[str] = []
    keys: set[str] = set()
    for chunk in _chunks(case_ids, 900):
        qs = ",".join("?" * len(chunk))
        for key, patient in catalog.db.execute(f"SELECT key, patient_key FROM cases WHERE id IN ({qs})", chunk):
            keys.update(k for k in (key, patient) if k)
        for iid, path in catalog.db.execute(f"SELECT id, path FROM images WHERE case_id IN ({qs})", chunk):
            images.append(int(iid))
            paths.append(str(path))
        texts.extend(int(r[0]) for r in catalog.db.execute(f"SELECT id FROM texts WHERE case_id IN ({qs})", chunk))
    return {"cases": case_ids, "images": sorted(images), "texts": sorted(texts), "paths": paths, "keys": sorted(keys)}


def begin(catalog: Catalog, *, kind: str, digest: str, actor: str | None, plan: dict[str, Any]) -> int:
    """Record a pending erasure (one transaction) and return its id."""
    ensure_table(catalog)
    catalog.db.execute("PRAGMA secure_delete = ON")  # the plan (ids, keys, paths) is overwritten when done
    with catalog.atomic():
        cur = catalog.db.execute(
            "INSERT INTO erasures (requested_at, actor, target_kind, target_digest, state, plan) "
            "VALUES (?, ?, ?, ?, 'pending', ?)",
            [now(), actor, kind, digest, json.dumps(plan)],
        )
    return int(cur.lastrowid)


def unfinished(catalog: Catalog) -> list[dict[str, Any]]:
    """Erasures not yet ``done``, oldest first, with their plans."""
    if not catalog.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'erasures'").fetchone():
        return []
    rows = catalog.db.execute(
        "SELECT id, target_kind, target_digest, state, plan FROM erasures WHERE state != 'done' ORDER BY id"
    ).fetchall()
    return [dict(id=r[0], kind=r[1], digest=r[2], state=r[3], plan=json.loads(r[4])) for r in rows]


def _remove_links(catalog: Catalog, keys: list[tuple[str, str]]) -> None:
    """Drop the link-back entries (pseudonym -> Study Instance UID) of erased studies, if the home keeps any."""
    if catalog.path is None or not keys:
        return
    from .links import LinkStore

    store = LinkStore.open(Path(catalog.path).parent)
    if store is None:
        return
    try:
        by_source: dict[str, list[str]] = {}
        for source, key in keys:
            by_source.setdefault(source, []).append(key)
        for source, ks in by_source.items():
            store.remove(source, ks)
    finally:
        store.close()


# The distinct models of the vectors table by a skip-scan of its primary key: one index probe per
# model (DISTINCT read every row of the table: ~1 s at 1M vectors).
_MODELS = (
    "WITH RECURSIVE m(model) AS (SELECT (SELECT min(model) FROM vectors) UNION ALL "
    "SELECT (SELECT min(model) FROM vectors WHERE model > m.model) FROM m WHERE m.model IS NOT NULL) "
    "SELECT model FROM m WHERE model IS NOT NULL"
)


def delete_rows(catalog: Catalog, erasure_id: int, plan: dict[str, Any]) -> dict[str, int]:
    """Delete the plan's vectors (every model), labels, texts, images and cases in one transaction,
    mark the vector stores dirty and the erasure ``purging``; idempotent. Returns row counts."""
    counts = {"cases": 0, "images": 0, "texts": 0, "vectors": 0, "labels": 0}
    catalog.db.execute("PRAGMA secure_delete = ON")
    models = [r[0] for r in catalog.db.execute(_MODELS)]
    with catalog.atomic():
        for space, ids in (("image", plan["images"]), ("text", plan["texts"])):
            for chunk in _chunks(list(ids), 900):
                qs = ",".join("?" * len(chunk))
                counts["vectors"] += catalog.db.execute(
                    f"DELETE FROM vectors WHERE space = ? AND item_id IN ({qs})", [space, *chunk]
                ).rowcount
        has_sync = catalog.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sync_state'").fetchone()
        for chunk in _chunks(list(plan["cases"]), 900):
            qs = ",".join("?" * len(chunk))
            keys = catalog.db.execute(f"SELECT source, key FROM cases WHERE id IN ({qs})", chunk).fetchall()
            if has_sync:  # a PACS study's sync record: a later sync may bring the study back, by design
                catalog.db.executemany("DELETE FROM sync_state WHERE source = ? AND study_key = ?", keys)
            _remove_links(catalog, keys)
            catalog.db.execute(f"DELETE FROM series WHERE case_id IN ({qs})", chunk)
            counts["labels"] += catalog.db.execute(f"DELETE FROM labels WHERE case_id IN ({qs})", chunk).rowcount
            counts["texts"] += catalog.db.execute(f"DELETE FROM texts WHERE case_id IN ({qs})", chunk).rowcount
            counts["images"] += catalog.db.execute(f"DELETE FROM images WHERE case_id IN ({qs})", chunk).rowcount
            counts["cases"] += catalog.db.execute(f"DELETE FROM cases WHERE id IN ({qs})", chunk).rowcount
        for model in models:
            for space in ("image", "text"):
                catalog.set_meta(f"dirty:{model}:{space}", "1")
        catalog.db.execute("UPDATE erasures SET state = 'purging' WHERE id = ?", [erasure_id])
    return counts


def finish(catalog: Catalog, erasure_id: int, counts: dict[str, Any]) -> None:
    """Mark the erasure ``done`` and drop its plan (the row ids and paths), then scrub the files."""
    catalog.db.execute("PRAGMA secure_delete = ON")
    with catalog.atomic():
        catalog.db.execute(
            "UPDATE erasures SET state = 'done', finished_at = ?, plan = '{}', counts = ? WHERE id = ?",
            [now(), json.dumps(counts, sort_keys=True), erasure_id],
        )
    scrub(catalog)


def scrub(catalog: Catalog) -> None:
    """Checkpoint and truncate the WAL so deleted pages leave the -wal file too."""
    if catalog.path is not None:
        catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def log(catalog: Catalog, limit: int = 100) -> list[dict[str, Any]]:
    """The erasure audit log, newest first: when, who, what kind, the digest, state and counts."""
    ensure_table(catalog)
    rows = catalog.db.execute(
        "SELECT id, requested_at, finished_at, actor, target_kind, target_digest, state, counts FROM erasures "
        "ORDER BY id DESC LIMIT ?",
        [int(limit)],
    ).fetchall()
    return [dict(id=r[0], requested_at=r[1], finished_at=r[2], actor=r[3], kind=r[4], digest=r[5], state=r[6],
                 counts=json.loads(r[7])) for r in rows]  # fmt: skip
