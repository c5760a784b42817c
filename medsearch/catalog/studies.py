"""The catalog's study and series queries (the SQL of ``medsearch.studies``), mixed into ``Catalog``.

A study is a case (key: pseudonym of StudyInstanceUID). Its series live in ``series``; each slice is
an ``images`` row linked by ``series_id`` with its ``slice_index`` (slice order) and ``position``
(mm along the series normal). Slices left out by ``--slices N`` have status ``deferred``: catalogued,
never embedded, not searched. Selection only grows: a slice once ``ok`` stays ``ok``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.studies import SeriesRecord, SliceRef

if TYPE_CHECKING:
    import sqlite_utils

SERIES_FIELDS = (
    "id", "case_id", "source", "key", "number", "modality", "body_part", "body_region", "plane", "orientation",
    "slice_count", "thickness", "spacing", "position_min", "position_max", "ordered_by", "order_note",
    "window_center", "window_width", "preset",
)  # fmt: skip


def _chunks(seq: list[Any], n: int = 900) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class StudiesMixin:
    """Series rows, slice links and the vectors of whole studies. Needs ``self.db`` and ``self.atomic``."""

    db: sqlite_utils.Database

    # ------------------------------------------------------------------ writes
    def upsert_series(self, rec: SeriesRecord, case_id: int) -> tuple[int, str]:
        """Insert or update one series row. Returns (series_id, 'added'|'updated'|'unchanged')."""
        h = hashlib.sha256(json.dumps([case_id, asdict(rec)], sort_keys=True, default=str).encode()).hexdigest()
        lo, hi = rec.position_range or (None, None)
        wc, ww = rec.window or (None, None)
        values = {
            "case_id": case_id, "source": rec.source, "key": rec.key, "number": rec.number, "modality": rec.modality,
            "body_part": rec.body_part, "body_region": rec.body_region, "plane": rec.plane,
            "orientation": json.dumps(list(rec.orientation)) if rec.orientation else None,
            "slice_count": rec.slice_count, "thickness": rec.thickness, "spacing": rec.spacing,
            "position_min": lo, "position_max": hi, "ordered_by": rec.ordered_by, "order_note": rec.order_note,
            "window_center": wc, "window_width": ww, "preset": rec.preset, "content_hash": h,
            "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }  # fmt: skip
        row = self.db.execute(
            "SELECT id, content_hash FROM series WHERE source = ? AND key = ?", [rec.source, rec.key]
        ).fetchone()
        if row and row[1] == h:
            return int(row[0]), "unchanged"
        with self.atomic():  # type: ignore[attr-defined]
            if row:
                sets = ", ".join(f"{k} = ?" for k in values)
                self.db.execute(f"UPDATE series SET {sets} WHERE id = ?", [*values.values(), row[0]])
                return int(row[0]), "updated"
            cols, qs = ", ".join(values), ", ".join("?" * len(values))
            cur = self.db.execute(f"INSERT INTO series ({cols}) VALUES ({qs})", list(values.values()))
            return int(cur.lastrowid), "added"

    def image_statuses(self, source: str, keys: Sequence[str]) -> dict[str, str]:
        """key -> status of the images of ``source`` that exist already (before an upsert changes them)."""
        out: dict[str, str] = {}
        for chunk in _chunks(list(keys)):
            qs = ",".join("?" * len(chunk))
            for key, status in self.db.execute(
                f"SELECT key, status FROM images WHERE source = ? AND key IN ({qs})", [source, *chunk]
            ):
                out[key] = status
        return out

    def link_slices(self, series_id: int, rows: Sequence[tuple[int, SliceRef, str | None]]) -> int:
        """Attach images to their series: (image_id, slice ref, status before this ingest) per slice.

        A selected slice becomes ``ok`` (when it was ``deferred``); an unselected one is ``deferred`` when it
        is new or was deferred before, else it keeps its status (selection only grows). Returns how many
        slices are deferred now.
        """
        params = []
        for image_id, ref, before in rows:
            if ref.embed:
                status = "ok" if before in (None, "deferred", "ok") else before
            else:
                status = "deferred" if before in (None, "deferred") else before
            params.append((series_id, ref.index, ref.position, status, image_id))
        with self.atomic():  # type: ignore[attr-defined]
            self.db.conn.executemany(
                "UPDATE images SET series_id = ?, slice_index = ?, position = ?, status = ? WHERE id = ?", params
            )
        return sum(1 for p in params if p[3] == "deferred")

    # ------------------------------------------------------------------ reads
    def case_id_for_key(self, key: str, source: str | None = None) -> int | None:
        """The id of the case (study) with this key, in ``source`` when given."""
        if source is None:
            row = self.db.execute("SELECT id FROM cases WHERE key = ? ORDER BY id LIMIT 1", [key]).fetchone()
        else:
            row = self.db.execute("SELECT id FROM cases WHERE source = ? AND key = ?", [source, key]).fetchone()
        return int(row[0]) if row else None

    def image_case_ids(self, image_ids: Sequence[int]) -> dict[int, int]:
        """image id -> case id."""
        out: dict[int, int] = {}
        for chunk in _chunks([int(i) for i in image_ids]):
            qs = ",".join("?" * len(chunk))
            out.update((int(i), int(c)) for i, c in self.db.execute(
                f"SELECT id, case_id FROM images WHERE id IN ({qs})", chunk))  # fmt: skip
        return out

    def study_vectors(
        self, model: str, case_ids: Sequence[int], allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored image vectors of whole studies: (image ids (n,), case ids (n,), vectors (n, d) float32).

        Only searchable slices (status ok, with a vector of ``model``), and only ``allowed`` image ids when given.
        """
        ids: list[int] = []
        owners: list[int] = []
        blobs: list[bytes] = []
        dim = 0
        for chunk in _chunks(sorted({int(c) for c in case_ids})):
            qs = ",".join("?" * len(chunk))
            for iid, cid, d, vec in self.db.execute(
                "SELECT i.id, i.case_id, v.dim, v.vec FROM images i JOIN vectors v ON v.model = ? AND "
                f"v.space = 'image' AND v.item_id = i.id WHERE i.status = 'ok' AND i.case_id IN ({qs}) ORDER BY i.id",
                [model, *chunk],
            ):
                ids.append(iid)
                owners.append(cid)
                blobs.append(vec)
                dim = d
        id_arr = np.asarray(ids, dtype=np.int64)
        own_arr = np.asarray(owners, dtype=np.int64)
        vecs = (np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), dim).astype(np.float32)
                if blobs else np.empty((0, 0), np.float32))  # fmt: skip
        if allowed is not None and len(id_arr):
            keep = np.isin(id_arr, allowed)
            id_arr, own_arr, vecs = id_arr[keep], own_arr[keep], vecs[keep]
        return id_arr, own_arr, vecs

    def case_series(self, case_id: int, model: str | None = None) -> list[dict[str, Any]]:
        """The series of one study, in SeriesNumber order, each with its slices in slice order.

        A slice: image_id, key, slice_index, position, status and (given ``model``) whether it has a vector.
        """
        series = []
        for r in self.db.execute(
            f"SELECT {', '.join(SERIES_FIELDS)} FROM series WHERE case_id = ? ORDER BY number IS NULL, number, id",
            [int(case_id)],
        ):
            s = dict(zip(SERIES_FIELDS, r, strict=True))
            s["series_id"] = s.pop("id")
            s["orientation"] = json.loads(s["orientation"]) if s["orientation"] else None
            series.append(s)
        if not series:
            return []
        by_id = {s["series_id"]: s for s in series}
        for s in series:
            s["slices"] = []
        vec_sql = ("EXISTS (SELECT 1 FROM vectors v WHERE v.model = ? AND v.space = 'image' AND v.item_id = i.id)"
                   if model else "NULL")  # fmt: skip
        params: list[Any] = [model] if model else []
        for iid, key, idx, pos, status, sid, has in self.db.execute(
            f"SELECT i.id, i.key, i.slice_index, i.position, i.status, i.series_id, {vec_sql} FROM images i "
            "WHERE i.case_id = ? AND i.series_id IS NOT NULL ORDER BY i.series_id, i.slice_index, i.id",
            [*params, int(case_id)],
        ):
            by_id[sid]["slices"].append(dict(image_id=iid, key=key, slice_index=idx, position=pos, status=status,
                                             embedded=None if has is None else bool(has)))  # fmt: skip
        return series

    def slice_hit_rows(self, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """What a study hit shows of its best slice: image, case and series fields, keyed by image id."""
        out: dict[int, dict[str, Any]] = {}
        for chunk in _chunks([int(i) for i in image_ids]):
            qs = ",".join("?" * len(chunk))
            for r in self.db.execute(
                "SELECT i.id, i.key, i.case_id, c.key, c.source, i.modality_type, i.modality, i.body_region, i.plane, "
                "i.split, c.diagnosis, c.title, c.patient_key, c.sections, i.caption, i.series_id, i.slice_index "
                f"FROM images i JOIN cases c ON c.id = i.case_id WHERE i.id IN ({qs})",
                chunk,
            ):
                out[r[0]] = dict(
                    image_id=r[0], image_key=r[1], case_id=r[2], case_key=r[3], source=r[4], modality_type=r[5],
                    modality=r[6], body_region=r[7], plane=r[8], split=r[9], diagnosis=r[10], title=r[11],
                    patient_key=r[12], sections=json.loads(r[13]), caption=r[14], series_id=r[15], slice_index=r[16],
                )  # fmt: skip
        return out

    def study_counts(self) -> dict[str, int]:
        """Series, slices linked to a series, and deferred (catalogued, not embedded) slices."""
        one = lambda sql: int(self.db.execute(sql).fetchone()[0])  # noqa: E731
        return {
            "series": one("SELECT count(*) FROM series"),
            "slices": one("SELECT count(*) FROM images WHERE series_id IS NOT NULL"),
            "deferred_images": one("SELECT count(*) FROM images WHERE status = 'deferred'"),
        }
