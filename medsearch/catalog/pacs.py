"""Catalog queries for PACS sources: which instances a source already holds, per-study sync state.

``sync_state`` remembers, per source and pseudonymous study key, how many instances the PACS
reported for the study when it was last synced and with which slice setting, so a re-sync asks
nothing more of a study that has not changed and fetches only the new instances of one that has.
The table holds no identifier: study keys are the catalog's HMAC pseudonyms.
"""

from __future__ import annotations

from collections.abc import Iterable

from medsearch.catalog.core import Catalog

_SYNC_SCHEMA = """
CREATE TABLE IF NOT EXISTS sync_state (
    source TEXT NOT NULL,
    study_key TEXT NOT NULL,
    instances INTEGER NOT NULL,
    slices TEXT NOT NULL,
    synced_at TEXT NOT NULL,
    PRIMARY KEY (source, study_key)
) WITHOUT ROWID;
"""


def _ensure(catalog: Catalog) -> None:
    catalog.db.executescript(_SYNC_SCHEMA)


def existing_image_keys(catalog: Catalog, source: str, keys: Iterable[str]) -> set[str]:
    """The subset of ``keys`` that ``source`` already has as images in the catalog."""
    keys = list(keys)
    found: set[str] = set()
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        qs = ",".join("?" * len(chunk))
        found.update(r[0] for r in catalog.db.execute(
            f"SELECT key FROM images WHERE source = ? AND key IN ({qs})", [source, *chunk]))  # fmt: skip
    return found


def sync_state(catalog: Catalog, source: str, study_key: str) -> tuple[int, str] | None:
    """(instances, slices) recorded at the study's last sync, or None if never synced."""
    _ensure(catalog)
    row = catalog.db.execute(
        "SELECT instances, slices FROM sync_state WHERE source = ? AND study_key = ?", [source, study_key]
    ).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def set_sync_state(catalog: Catalog, source: str, study_key: str, instances: int, slices: str, when: str) -> None:
    """Record a finished study sync (call inside the transaction that stored the study)."""
    _ensure(catalog)
    catalog.db.execute(
        "INSERT INTO sync_state (source, study_key, instances, slices, synced_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (source, study_key) DO UPDATE SET instances = excluded.instances, slices = excluded.slices, "
        "synced_at = excluded.synced_at",
        [source, study_key, int(instances), slices, when],
    )


def synced_studies(catalog: Catalog, source: str) -> int:
    """How many studies of ``source`` have a sync record."""
    _ensure(catalog)
    return int(catalog.db.execute("SELECT count(*) FROM sync_state WHERE source = ?", [source]).fetchone()[0])


def series_slices(catalog: Catalog, source: str, case_key: str, series_key: str) -> list[tuple[int, str, dict, str]]:
    """The images a study of ``source`` holds of one series (by the ``series_key`` of their header
    metadata, linked to a series row or not): (image id, key, meta, status) each, in id order."""
    import json

    rows = catalog.db.execute(
        "SELECT i.id, i.key, i.meta, i.status FROM images i JOIN cases c ON c.id = i.case_id "
        "WHERE c.source = ? AND c.key = ? AND json_extract(i.meta, '$.series_key') = ? ORDER BY i.id",
        [source, case_key, series_key],
    ).fetchall()
    return [(int(i), str(k), json.loads(m), str(s)) for i, k, m, s in rows]
