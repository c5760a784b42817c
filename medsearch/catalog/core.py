"""The catalog: one SQLite file (via sqlite-utils) that is the source of truth.

Tables
    meta        key/value: schema_version, salt for pseudonymous ids, created
    cases       one row per case/study; UNIQUE(source, key); content_hash for idempotent upserts
    images      one row per image (or DICOM frame); UNIQUE(source, key); sha256 of the file
    texts       report sections, their sentences, and image captions, each embeddable
    labels      (case_id, image_id, name, value) rows for filtering and evaluation
    vectors     (model, space, item_id) -> float16 blob; FAISS indexes are rebuilt from these
    ingest_log  one row per ingest run with counts and the skipped items

Every write that must be atomic runs inside ``Catalog.atomic()``. Upserts are keyed by
(source, key) and compare content hashes, so ingesting the same folder twice adds nothing,
and a changed file replaces its row and drops its now-stale vectors.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from ..errors import CatalogError, NotFound
from ..records import REPORT_SECTIONS, CaseRecord, CaseView, ImageRecord
from .schema import FILTER_COLUMNS, SCHEMA_VERSION, migrate
from .studies import StudiesMixin

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def content_hash(record: CaseRecord) -> str:
    """Stable hash of everything stored for a case; unchanged hash = nothing to do."""
    return hashlib.sha256(_json(asdict(record)).encode()).hexdigest()


def vec_to_blob(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype=np.float16).tobytes()


def blobs_to_matrix(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Join float16 blobs into one (n, dim) float32 matrix without a per-row numpy call."""
    buf = b"".join(blobs)
    return np.frombuffer(buf, dtype=np.float16).reshape(len(blobs), dim).astype(np.float32)


class Catalog(StudiesMixin):
    """The SQLite catalog of one medsearch home. Open with ``Catalog.open(path)``."""

    def __init__(self, db: sqlite_utils.Database, path: Path | None) -> None:
        self.db = db
        self.path = path

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

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """One transaction (nested blocks become savepoints)."""
        with self.db.atomic():
            yield

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [key, value])

    @property
    def salt(self) -> str:
        """Per-home secret used to pseudonymise DICOM UIDs and patient ids."""
        return self.get_meta("salt") or ""

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
            "sections": _json(rec.sections),
            "labels": _json(rec.labels),
            "meta": _json(rec.meta),
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
            "labels": _json(rec.labels),
            "meta": _json(rec.meta),
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
        for chunk in _chunks(ids, 900):
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
                    _json(skipped[:1000]),
                    log_id,
                ],
            )

    # ------------------------------------------------------------------ vectors
    def put_vectors(self, model: str, space: str, ids: Sequence[int], vecs: np.ndarray) -> None:
        """Store (n, d) vectors for catalog rows ``ids`` in one transaction (replacing old ones).

        The same transaction marks the (model, space) index dirty, so a crash between this
        commit and the next index build can never leave an index that looks in sync but is not.
        """
        vecs = np.ascontiguousarray(vecs, dtype=np.float16)  # (n, d) float16
        dim = int(vecs.shape[1])
        rows = [(model, space, int(i), dim, vecs[j].tobytes()) for j, i in enumerate(ids)]
        with self.atomic():
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO vectors (model, space, item_id, dim, vec) VALUES (?, ?, ?, ?, ?)", rows
            )
            self.set_meta(f"dirty:{model}:{space}", "1")

    def iter_vectors(
        self, model: str, space: str, block: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream stored vectors in id order as (ids (n,) int64, vecs (n, d) float32) blocks."""
        last = -1
        while True:
            rows = self.db.execute(
                "SELECT item_id, dim, vec FROM vectors WHERE model = ? AND space = ? AND item_id > ? "
                "ORDER BY item_id LIMIT ?",
                [model, space, last, block],
            ).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, blobs_to_matrix([r[2] for r in rows], rows[0][1])
            last = int(ids[-1])

    def get_vectors(self, model: str, space: str, ids: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for chunk in _chunks(list(ids), 900):
            qs = ",".join("?" * len(chunk))
            for item_id, _dim, vec in self.db.execute(
                f"SELECT item_id, dim, vec FROM vectors WHERE model = ? AND space = ? AND item_id IN ({qs})",
                [model, space, *chunk],
            ):
                out[item_id] = np.frombuffer(vec, dtype=np.float16).astype(np.float32)
        return out

    def count_vectors(self, model: str, space: str) -> int:
        return self.db.execute(
            "SELECT count(*) FROM vectors WHERE model = ? AND space = ?", [model, space]
        ).fetchone()[0]

    def vector_models(self) -> list[tuple[str, str, int]]:
        return [tuple(r) for r in self.db.execute("SELECT model, space, count(*) FROM vectors GROUP BY model, space")]

    def images_to_embed(self, model: str, limit: int | None = None) -> list[tuple[int, str, int | None]]:
        """(image_id, path, frame) of ok images with no vector for ``model`` yet, in id order."""
        sql = (
            "SELECT i.id, i.path, i.frame FROM images i WHERE i.status = 'ok' AND NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.model = ? AND v.space = 'image' AND v.item_id = i.id) ORDER BY i.id"
        )
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [tuple(r) for r in self.db.execute(sql, [model])]

    def image_ids_to_embed(self, model: str, limit: int | None = None) -> np.ndarray:
        """Ids of ok images with no vector for ``model`` yet, in id order, as (n,) int64.

        8 bytes per image (the embedding pipeline looks paths up per item), so a million-image
        archive costs 8 MB here instead of a list of row tuples.
        """
        sql = (
            "SELECT i.id FROM images i WHERE i.status = 'ok' AND NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.model = ? AND v.space = 'image' AND v.item_id = i.id) ORDER BY i.id"
        )
        if limit:
            sql += f" LIMIT {int(limit)}"
        return np.fromiter((r[0] for r in self.db.execute(sql, [model])), dtype=np.int64)

    def image_source(self, image_id: int) -> tuple[str, int | None]:
        """(path, frame) of one image row (NotFound when there is none)."""
        row = self.db.execute("SELECT path, frame FROM images WHERE id = ?", [int(image_id)]).fetchone()
        if row is None:
            raise NotFound(f"no image {image_id} in the catalog")
        return row[0], row[1]

    def texts_to_embed(
        self, model: str, kinds: Sequence[str] = ("sentence", "caption", "section"), page: int = 4096
    ) -> Iterator[tuple[int, str]]:
        """(text_id, text) of texts with no vector for ``model`` yet, in id order, paged by id.

        Keyset pagination (id > last) keeps no cursor open across the caller's writes.
        """
        qs = ",".join("?" * len(kinds))
        last = -1
        while True:
            rows = self.db.execute(
                f"SELECT t.id, t.text FROM texts t WHERE t.id > ? AND t.kind IN ({qs}) AND NOT EXISTS "
                "(SELECT 1 FROM vectors v WHERE v.model = ? AND v.space = 'text' AND v.item_id = t.id) "
                "ORDER BY t.id LIMIT ?",
                [last, *kinds, model, page],
            ).fetchall()
            if not rows:
                return
            yield from ((r[0], r[1]) for r in rows)
            last = rows[-1][0]

    # ------------------------------------------------------------------ reads
    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("cases", "images", "texts"):
            out[table] = self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        out["failed_images"] = self.db.execute("SELECT count(*) FROM images WHERE status = 'failed'").fetchone()[0]
        return out

    def image_ids_where(self, filters: dict[str, str | Sequence[str] | None]) -> np.ndarray | None:
        """Image ids matching all filters (case-insensitive equality), or None when no filter is set."""
        where, params = _filter_sql(filters)
        if not where:
            return None
        rows = self.db.execute(f"SELECT id FROM images WHERE status = 'ok' AND {where}", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def text_ids_where(self, filters: dict[str, str | Sequence[str] | None]) -> np.ndarray | None:
        """Text ids whose case has at least one image matching the filters (None: no filter)."""
        where, params = _filter_sql(filters)
        if not where:
            return None
        rows = self.db.execute(
            f"SELECT t.id FROM texts t WHERE t.case_id IN (SELECT case_id FROM images WHERE {where})", params
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def image_rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Image rows joined with their case fields, keyed by image id."""
        out: dict[int, dict[str, Any]] = {}
        for chunk in _chunks([int(i) for i in ids], 900):
            qs = ",".join("?" * len(chunk))
            for r in self.db.execute(
                "SELECT i.id, i.case_id, i.key, i.source, i.path, i.frame, i.modality_type, i.modality, i.plane, "
                "i.body_region, i.split, i.caption, c.key, c.diagnosis, c.title, c.sections, c.patient_key, i.width, "
                f"i.height, c.category FROM images i JOIN cases c ON c.id = i.case_id WHERE i.id IN ({qs})",
                chunk,
            ):
                out[r[0]] = dict(
                    image_id=r[0], case_id=r[1], image_key=r[2], source=r[3], path=r[4], frame=r[5],
                    modality_type=r[6], modality=r[7], plane=r[8], body_region=r[9], split=r[10], caption=r[11],
                    case_key=r[12], diagnosis=r[13], title=r[14], sections=json.loads(r[15]), patient_key=r[16],
                    width=r[17], height=r[18], category=r[19],
                )  # fmt: skip
        return out

    def text_rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for chunk in _chunks([int(i) for i in ids], 900):
            qs = ",".join("?" * len(chunk))
            for r in self.db.execute(
                f"SELECT id, case_id, image_id, section, kind, seq, text FROM texts WHERE id IN ({qs})", chunk
            ):
                out[r[0]] = dict(id=r[0], case_id=r[1], image_id=r[2], section=r[3], kind=r[4], seq=r[5], text=r[6])
        return out

    def case_images(self, case_ids: Sequence[int]) -> dict[int, list[int]]:
        """Image ids (ok status, id order) of each case."""
        out: dict[int, list[int]] = {}
        for chunk in _chunks([int(i) for i in case_ids], 900):
            qs = ",".join("?" * len(chunk))
            for cid, iid in self.db.execute(
                f"SELECT case_id, id FROM images WHERE status = 'ok' AND case_id IN ({qs}) ORDER BY id", chunk
            ):
                out.setdefault(cid, []).append(iid)
        return out

    def case_texts(
        self, case_ids: Sequence[int], *, kind: str = "sentence", sections: Sequence[str] | None = None
    ) -> dict[int, list[dict[str, Any]]]:
        """Case-level text rows (no captions) of each case, in section/seq order; for drafting."""
        out: dict[int, list[dict[str, Any]]] = {}
        sec_sql, sec_params = "", []
        if sections:
            sec_sql = f" AND section IN ({','.join('?' * len(sections))})"
            sec_params = list(sections)
        for chunk in _chunks([int(i) for i in case_ids], 900):
            qs = ",".join("?" * len(chunk))
            for r in self.db.execute(
                f"SELECT id, case_id, section, seq, text FROM texts WHERE image_id IS NULL AND kind = ? "
                f"AND case_id IN ({qs}){sec_sql} ORDER BY case_id, id",
                [kind, *chunk, *sec_params],
            ):
                out.setdefault(r[1], []).append(dict(id=r[0], case_id=r[1], section=r[2], seq=r[3], text=r[4]))
        return out

    def caption_ids(self, image_ids: Sequence[int]) -> dict[int, int]:
        """image id -> text id of its caption row (so a caption's stored vector can be reused)."""
        out: dict[int, int] = {}
        for chunk in _chunks([int(i) for i in image_ids], 900):
            qs = ",".join("?" * len(chunk))
            for tid, iid in self.db.execute(
                f"SELECT id, image_id FROM texts WHERE kind = 'caption' AND image_id IN ({qs}) ORDER BY id", chunk
            ):
                out.setdefault(iid, tid)
        return out

    def find_image(self, ref: str | int) -> dict[str, Any]:
        """Image row by id, by key (e.g. ``MPX1007_synpic46719``) or by ``source:key``."""
        row = None
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            row = self.db.execute("SELECT id FROM images WHERE id = ?", [int(ref)]).fetchone()
        if row is None and isinstance(ref, str):
            row = self.db.execute("SELECT id FROM images WHERE key = ? ORDER BY id LIMIT 1", [ref]).fetchone()
            if row is None and ":" in ref:
                src, key = ref.split(":", 1)
                row = self.db.execute("SELECT id FROM images WHERE source = ? AND key = ?", [src, key]).fetchone()
        if row is None:
            raise NotFound(f"no image {ref!r} in the catalog", hint="use an image id or key from `medsearch search`")
        return self.image_rows([row[0]])[row[0]]

    def image_by_sha(self, sha256: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT id FROM images WHERE sha256 = ? ORDER BY id LIMIT 1", [sha256]).fetchone()
        return self.image_rows([row[0]])[row[0]] if row else None

    def get_case(self, ref: str | int) -> CaseView:
        """A whole case by id, key or ``source:key``."""
        row = None
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            row = self.db.execute("SELECT * FROM cases WHERE id = ?", [int(ref)]).fetchone()
        if row is None and isinstance(ref, str):
            row = self.db.execute("SELECT * FROM cases WHERE key = ? ORDER BY id LIMIT 1", [ref]).fetchone()
            if row is None and ":" in ref:
                src, key = ref.split(":", 1)
                row = self.db.execute("SELECT * FROM cases WHERE source = ? AND key = ?", [src, key]).fetchone()
        if row is None:
            raise NotFound(f"no case {ref!r} in the catalog", hint="use a case id or key from `medsearch search`")
        cols = [d[0] for d in self.db.execute("SELECT * FROM cases LIMIT 0").description]
        c = dict(zip(cols, row, strict=True))
        imgs = self.db.execute(
            "SELECT id, key, modality_type, modality, plane, body_region, caption, width, height, status "
            "FROM images WHERE case_id = ? ORDER BY id",
            [c["id"]],
        ).fetchall()
        icols = ["image_id", "key", "modality_type", "modality", "plane", "body_region", "caption", "width", "height", "status"]
        return CaseView(
            case_id=c["id"], case_key=c["key"], source=c["source"], split=c["split"], title=c["title"],
            diagnosis=c["diagnosis"], category=c["category"], sections=json.loads(c["sections"]),
            labels=json.loads(c["labels"]), images=[dict(zip(icols, r, strict=True)) for r in imgs],
        )  # fmt: skip

    def distinct(self, column: str) -> list[tuple[str, int]]:
        """Values of a filterable image column with their counts (for help text and the web page)."""
        col = FILTER_COLUMNS.get(column, column)
        if col not in FILTER_COLUMNS.values():
            raise ValueError(column)
        return [
            (r[0], r[1])
            for r in self.db.execute(
                f"SELECT {col}, count(*) FROM images WHERE {col} IS NOT NULL GROUP BY {col} ORDER BY count(*) DESC"
            )
        ]


def _ordered_sections(sections: dict[str, str]) -> list[str]:
    known = [s for s in REPORT_SECTIONS if s in sections]
    return known + sorted(s for s in sections if s not in REPORT_SECTIONS)


def _filter_sql(filters: dict[str, str | Sequence[str] | None]) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for name, value in filters.items():
        if value is None or value == "" or value == []:
            continue
        if name not in FILTER_COLUMNS:
            raise ValueError(f"unknown filter {name!r}; valid: {', '.join(FILTER_COLUMNS)}")
        col = FILTER_COLUMNS[name]
        values = [value] if isinstance(value, str) else list(value)
        clauses.append(f"lower({col}) IN ({','.join('?' * len(values))})")
        params.extend(v.lower() for v in values)
    return " AND ".join(clauses), params


def _chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
