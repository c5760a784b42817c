"""The catalog: one SQLite file (via sqlite-utils) that is the source of truth.

Tables
    meta        key/value: schema_version, salt for pseudonymous ids, created
    cases       one row per case/study; UNIQUE(source, key); content_hash for idempotent upserts
    images      one row per image (or DICOM frame); UNIQUE(source, key); sha256 of the file
    texts       report sections, their sentences, and image captions, each embeddable
    labels      (case_id, image_id, name, value) rows for filtering and evaluation
    vectors     (model, space, item_id) -> float16 blob; FAISS indexes are rebuilt from these
    ingest_log  one row per ingest run with counts and the skipped items

The package: ``core`` (open, migrate, writes), ``reads`` (typed rows by id/key/hash, filters, cases),
``embeddings`` (stored vectors, what is left to embed, the dirty-index marker), ``rows`` (the frozen
row records), ``schema``, ``base`` (connection, transactions, meta) and ``util``.

Every write that must be atomic runs inside ``Catalog.atomic()``. Upserts are keyed by
(source, key) and compare content hashes, so ingesting the same folder twice adds nothing,
and a changed file replaces its row and drops its now-stale vectors.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medsearch.errors import CatalogError, NotFound
from medsearch.records import REPORT_SECTIONS, CaseRecord, ImageRecord

from ._sqlite import sqlite_utils
from .embeddings import EmbeddingQueries
from .reads import ReadQueries
from .schema import SCHEMA_VERSION, migrate
from .studies import StudiesMixin
from .util import chunks, now, to_json


def content_hash(record: CaseRecord) -> str:
    """Stable hash of everything stored for a case; unchanged hash = nothing to do."""
    return hashlib.sha256(to_json(asdict(record)).encode()).hexdigest()


class Catalog(ReadQueries, EmbeddingQueries, StudiesMixin):
    """The SQLite catalog of one medsearch home. Open with ``Catalog.open(path)``.

    Reads (typed rows) live in :class:`ReadQueries`, vectors and the dirty-index marker in
    :class:`EmbeddingQueries`; this class opens and migrates the file and holds the writes.
    """

    # ------------------------------------------------------------------ open / schema
    @classmethod
    def open(cls, path: str | Path | None, *, create: bool = True, readonly: bool = False) -> Catalog:
        """Open (and migrate) the catalog at ``path``; ``None`` gives an in-memory catalog."""
        if path is None:
            db = sqlite_utils.Database(memory=True)
            cat = cls(db, None)
        else:
            p = Path(path)
            if not p.exists() and not create:
                raise NotFound(
                    f"no catalog at {p}",
                    hint="run `medsearch ingest PATH` first, or point --home at an existing home",
                )
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                if readonly:
                    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, check_same_thread=False)
                else:
                    conn = sqlite3.connect(str(p), check_same_thread=False, timeout=30)
                db = sqlite_utils.Database(conn)
                if not readonly:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.DatabaseError as e:
                raise CatalogError(f"cannot open catalog {p}: {e}", hint="check the file or use another --home") from e
            cat = cls(db, p)
        if not readonly:
            cat._migrate()
        return cat

    def _migrate(self) -> None:
        try:
            migrate(self.db.conn)
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"catalog {self.path} is not a medsearch catalog: {e}") from e
        version = self.get_meta("schema_version")
        if version is None:
            with self.atomic():
                self.set_meta("schema_version", str(SCHEMA_VERSION))
                self.set_meta("created_at", now())
                self.set_meta("salt", secrets.token_hex(16))
        elif int(version) > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} has schema version {version}, newer than this medsearch ({SCHEMA_VERSION})",
                hint="upgrade medsearch",
            )

    # ------------------------------------------------------------------ writes
    def upsert_case(self, rec: CaseRecord, *, sentences: Iterable[tuple[str, int, str]] = ()) -> tuple[int, str]:
        """Insert or update one case. Returns (case_id, 'added'|'updated'|'unchanged').

        ``sentences`` are (section, seq, sentence) rows stored as kind='sentence' texts; whole
        sections are stored as kind='section'. A changed case replaces its texts, labels and
        the vectors of those texts.
        """
        h = content_hash(rec)
        row = self.db.execute(
            "SELECT id, content_hash FROM cases WHERE source = ? AND key = ?", [rec.source, rec.key]
        ).fetchone()
        values = {
            "source": rec.source,
            "key": rec.key,
            "split": rec.split,
            "patient_key": rec.patient_key,
            "title": rec.title,
            "diagnosis": rec.diagnosis,
            "category": rec.category,
            "sections": to_json(rec.sections),
            "labels": to_json(rec.labels),
            "meta": to_json(rec.meta),
            "content_hash": h,
            "ingested_at": now(),
        }
        if row and row[1] == h:
            return row[0], "unchanged"
        with self.atomic():
            if row:
                case_id = row[0]
                sets = ", ".join(f"{k} = ?" for k in values)
                self.db.execute(f"UPDATE cases SET {sets} WHERE id = ?", [*values.values(), case_id])
                self._drop_case_texts(case_id)
                self.db.execute("DELETE FROM labels WHERE case_id = ? AND image_id IS NULL", [case_id])
                status = "updated"
            else:
                cols = ", ".join(values)
                qs = ", ".join("?" for _ in values)
                cur = self.db.execute(f"INSERT INTO cases ({cols}) VALUES ({qs})", list(values.values()))
                case_id = int(cur.lastrowid)
                status = "added"
            rows = []
            for section in _ordered_sections(rec.sections):
                text = rec.sections[section]
                if text and text.strip():
                    rows.append((case_id, None, section, "section", 0, text.strip()))
            rows.extend((case_id, None, s, "sentence", i, t) for s, i, t in sentences)
            self.db.conn.executemany(
                "INSERT INTO texts (case_id, image_id, section, kind, seq, text) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            self._insert_labels(case_id, None, rec.labels)
        return case_id, status

    def upsert_image(
        self, rec: ImageRecord, case_id: int, *, sha256: str, nbytes: int, width: int | None, height: int | None
    ) -> tuple[int, str]:
        """Insert or update one image row. Returns (image_id, 'added'|'updated'|'unchanged')."""
        row = self.db.execute(
            "SELECT id, sha256, case_id, caption, modality_type, body_region, split, path FROM images "
            "WHERE source = ? AND key = ?",
            [rec.source, rec.key],
        ).fetchone()
        values = {
            "case_id": case_id,
            "source": rec.source,
            "key": rec.key,
            "path": rec.path,
            "frame": rec.frame,
            "sha256": sha256,
            "bytes": nbytes,
            "width": width,
            "height": height,
            "split": rec.split,
            "modality_type": rec.modality_type,
            "modality": rec.modality,
            "plane": rec.plane,
            "body_region": rec.body_region,
            "location": rec.location,
            "laterality": rec.laterality,
            "study_date": rec.study_date,
            "caption": rec.caption,
            "labels": to_json(rec.labels),
            "meta": to_json(rec.meta),
            "status": "ok",
            "error": None,
            "ingested_at": now(),
        }
        if row and (row[1], row[2], row[3], row[4], row[5], row[6], row[7]) == (
            sha256,
            case_id,
            rec.caption,
            rec.modality_type,
            rec.body_region,
            rec.split,
            rec.path,
        ):
            return row[0], "unchanged"
        with self.atomic():
            if row:
                image_id = row[0]
                sets = ", ".join(f"{k} = ?" for k in values)
                self.db.execute(f"UPDATE images SET {sets} WHERE id = ?", [*values.values(), image_id])
                if row[1] != sha256:  # pixels changed: the image vector is stale
                    self.db.execute("DELETE FROM vectors WHERE space = 'image' AND item_id = ?", [image_id])
                old = [r[0] for r in self.db.execute("SELECT id FROM texts WHERE image_id = ?", [image_id])]
                self._drop_texts(old)
                self.db.execute("DELETE FROM labels WHERE image_id = ?", [image_id])
                status = "updated"
            else:
                cols = ", ".join(values)
                qs = ", ".join("?" for _ in values)
                cur = self.db.execute(f"INSERT INTO images ({cols}) VALUES ({qs})", list(values.values()))
                image_id = int(cur.lastrowid)
                status = "added"
            if rec.caption and rec.caption.strip():
                self.db.execute(
                    "INSERT INTO texts (case_id, image_id, section, kind, seq, text) VALUES (?, ?, 'caption', 'caption', 0, ?)",
                    [case_id, image_id, rec.caption.strip()],
                )
            self._insert_labels(case_id, image_id, rec.labels)
        return image_id, status

    def _insert_labels(self, case_id: int, image_id: int | None, labels: dict[str, Any]) -> None:
        rows = []
        for name, value in labels.items():
            values = value if isinstance(value, list) else [value]
            rows.extend((case_id, image_id, name, str(v)) for v in values if v is not None and v != "")
        self.db.conn.executemany("INSERT INTO labels (case_id, image_id, name, value) VALUES (?, ?, ?, ?)", rows)

    def _drop_case_texts(self, case_id: int) -> None:
        ids = [r[0] for r in self.db.execute("SELECT id FROM texts WHERE case_id = ? AND image_id IS NULL", [case_id])]
        self._drop_texts(ids)

    def _drop_texts(self, ids: list[int]) -> None:
        if not ids:
            return
        for chunk in chunks(ids, 900):
            qs = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM vectors WHERE space = 'text' AND item_id IN ({qs})", chunk)
            self.db.execute(f"DELETE FROM texts WHERE id IN ({qs})", chunk)

    def mark_image_failed(self, image_id: int, reason: str) -> None:
        with self.atomic():
            self.db.execute("UPDATE images SET status = 'failed', error = ? WHERE id = ?", [reason, image_id])

    def log_ingest(self, entry: dict[str, Any]) -> int:
        with self.atomic():
            cur = self.db.execute(
                "INSERT INTO ingest_log (started_at, path, reader, status) VALUES (?, ?, ?, 'running')",
                [entry.get("started_at", now()), entry["path"], entry["reader"]],
            )
        return int(cur.lastrowid)

    def finish_ingest(self, log_id: int, status: str, counts: dict[str, int], skipped: list[dict[str, str]]) -> None:
        with self.atomic():
            self.db.execute(
                "UPDATE ingest_log SET finished_at = ?, status = ?, cases_added = ?, cases_updated = ?, "
                "images_added = ?, images_updated = ?, unchanged = ?, skipped = ?, skipped_items = ? WHERE id = ?",
                [
                    now(),
                    status,
                    counts.get("cases_added", 0),
                    counts.get("cases_updated", 0),
                    counts.get("images_added", 0),
                    counts.get("images_updated", 0),
                    counts.get("unchanged", 0),
                    counts.get("skipped", 0),
                    to_json(skipped[:1000]),
                    log_id,
                ],
            )

    def retry_failed_images(self) -> None:
        """Mark every image that failed to decode as ok again, so the next embedding run retries it."""
        with self.atomic():
            self.db.execute("UPDATE images SET status = 'ok', error = NULL WHERE status = 'failed'")


def _ordered_sections(sections: dict[str, str]) -> list[str]:
    known = [s for s in REPORT_SECTIONS if s in sections]
    return known + sorted(s for s in sections if s not in REPORT_SECTIONS)
