"""Named read queries: typed rows by id, by key, by content hash; filters; whole cases; audit scans."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np

from medsearch.errors import NotFound
from medsearch.records import CaseView

from .base import CatalogBase
from .rows import (
    CASE_COLUMNS,
    IMAGE_COLUMNS,
    TEXT_COLUMNS,
    CaseRow,
    ImageRow,
    LabelRow,
    StoredFields,
    TextRow,
    case_rows,
    image_rows,
    text_rows,
)
from .schema import FILTER_COLUMNS
from .util import chunks, filter_sql

_IMAGE_JOIN = f"SELECT {IMAGE_COLUMNS} FROM images i JOIN cases c ON c.id = i.case_id"


class ReadQueries(CatalogBase):
    """What the searcher, the drafter, the evaluation and the shells read from the catalog."""

    # ------------------------------------------------------------------ counts and filters
    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("cases", "images", "texts"):
            out[table] = self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        out["failed_images"] = self.db.execute("SELECT count(*) FROM images WHERE status = 'failed'").fetchone()[0]
        return out

    def count_texts(self) -> int:
        """All text rows (sections, sentences, captions)."""
        return self.db.execute("SELECT count(*) FROM texts").fetchone()[0]

    def image_ids_where(self, filters: dict[str, str | Sequence[str] | None]) -> np.ndarray | None:
        """Image ids matching all filters (case-insensitive equality), or None when no filter is set."""
        where, params = filter_sql(filters)
        if not where:
            return None
        rows = self.db.execute(f"SELECT id FROM images WHERE status = 'ok' AND {where}", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def text_ids_where(self, filters: dict[str, str | Sequence[str] | None]) -> np.ndarray | None:
        """Text ids whose case has at least one image matching the filters (None: no filter)."""
        where, params = filter_sql(filters)
        if not where:
            return None
        rows = self.db.execute(
            f"SELECT t.id FROM texts t WHERE t.case_id IN (SELECT case_id FROM images WHERE {where})", params
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

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

    # ------------------------------------------------------------------ rows by id
    def image_rows(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        """Image rows joined with their case fields, keyed by image id (unknown ids are absent)."""
        out: dict[int, ImageRow] = {}
        for chunk in chunks([int(i) for i in ids], 900):
            qs = ",".join("?" * len(chunk))
            out.update((r.image_id, r) for r in image_rows(self.db.execute(f"{_IMAGE_JOIN} WHERE i.id IN ({qs})", chunk)))
        return out

    def case_rows(self, ids: Sequence[int]) -> dict[int, CaseRow]:
        """Case rows keyed by case id (unknown ids are absent)."""
        out: dict[int, CaseRow] = {}
        for chunk in chunks([int(i) for i in ids], 900):
            qs = ",".join("?" * len(chunk))
            cur = self.db.execute(f"SELECT {CASE_COLUMNS} FROM cases c WHERE c.id IN ({qs})", chunk)
            out.update((r.case_id, r) for r in case_rows(cur))
        return out

    def text_rows(self, ids: Sequence[int]) -> dict[int, TextRow]:
        """Text rows keyed by text id (unknown ids are absent)."""
        out: dict[int, TextRow] = {}
        for chunk in chunks([int(i) for i in ids], 900):
            qs = ",".join("?" * len(chunk))
            cur = self.db.execute(f"SELECT {TEXT_COLUMNS} FROM texts t WHERE t.id IN ({qs})", chunk)
            out.update((r.text_id, r) for r in text_rows(cur))
        return out

    def cases_where(self, *, split: str | None = None, source: str | None = None) -> list[CaseRow]:
        """Cases of a split and/or source, in id order."""
        where, params = ["1 = 1"], []
        if split is not None:
            where.append("c.split = ?")
            params.append(split)
        if source:
            where.append("c.source = ?")
            params.append(source)
        cur = self.db.execute(f"SELECT {CASE_COLUMNS} FROM cases c WHERE {' AND '.join(where)} ORDER BY c.id", params)
        return list(case_rows(cur))

    # ------------------------------------------------------------------ per case
    def case_images(self, case_ids: Sequence[int]) -> dict[int, list[int]]:
        """Image ids (ok status, id order) of each case."""
        out: dict[int, list[int]] = {}
        for chunk in chunks([int(i) for i in case_ids], 900):
            qs = ",".join("?" * len(chunk))
            for cid, iid in self.db.execute(
                f"SELECT case_id, id FROM images WHERE status = 'ok' AND case_id IN ({qs}) ORDER BY id", chunk
            ):
                out.setdefault(cid, []).append(iid)
        return out

    def case_texts(
        self, case_ids: Sequence[int], *, kind: str = "sentence", sections: Sequence[str] | None = None
    ) -> dict[int, list[TextRow]]:
        """Case-level text rows (no captions) of each case, in id order; for drafting."""
        out: dict[int, list[TextRow]] = {}
        sec_sql, sec_params = "", []
        if sections:
            sec_sql = f" AND t.section IN ({','.join('?' * len(sections))})"
            sec_params = list(sections)
        for chunk in chunks([int(i) for i in case_ids], 900):
            qs = ",".join("?" * len(chunk))
            cur = self.db.execute(
                f"SELECT {TEXT_COLUMNS} FROM texts t WHERE t.image_id IS NULL AND t.kind = ? "
                f"AND t.case_id IN ({qs}){sec_sql} ORDER BY t.case_id, t.id",
                [kind, *chunk, *sec_params],
            )
            for r in text_rows(cur):
                out.setdefault(r.case_id, []).append(r)
        return out

    def section_sample(
        self, section: str, filters: dict[str, str | Sequence[str] | None], *, limit: int, seed: int = 0
    ) -> list[str]:
        """Up to ``limit`` whole report sections named ``section`` (case-level texts), of cases with an image
        matching ``filters`` (every case when none is set): a seeded sample when there are more, in id order."""
        where, params = filter_sql(filters)
        sql = "SELECT t.id FROM texts t WHERE t.kind = 'section' AND t.image_id IS NULL AND t.section = ?"
        if where:
            sql += f" AND t.case_id IN (SELECT case_id FROM images WHERE {where})"
        ids = np.fromiter((r[0] for r in self.db.execute(sql, [section, *params])), dtype=np.int64)
        if len(ids) > limit:
            ids = np.sort(np.random.default_rng(seed).choice(ids, size=limit, replace=False))
        rows = self.text_rows(ids.tolist())
        return [rows[int(i)].text for i in ids if int(i) in rows]

    def caption_ids(self, image_ids: Sequence[int]) -> dict[int, int]:
        """image id -> text id of its caption row (so a caption's stored vector can be reused)."""
        out: dict[int, int] = {}
        for chunk in chunks([int(i) for i in image_ids], 900):
            qs = ",".join("?" * len(chunk))
            for tid, iid in self.db.execute(
                f"SELECT id, image_id FROM texts WHERE kind = 'caption' AND image_id IN ({qs}) ORDER BY id", chunk
            ):
                out.setdefault(iid, tid)
        return out

    def texts_of_kinds(self, kinds: Sequence[str]) -> tuple[list[int], list[str]]:
        """(text ids, texts) of every text of the given kinds, in id order (the BM25 documents)."""
        rows = self.db.execute(
            f"SELECT id, text FROM texts WHERE kind IN ({','.join('?' * len(kinds))}) ORDER BY id", list(kinds)
        ).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    # ------------------------------------------------------------------ by reference
    def _image_id(self, ref: str | int) -> int | None:
        row = None
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            row = self.db.execute("SELECT id FROM images WHERE id = ?", [int(ref)]).fetchone()
        if row is None and isinstance(ref, str):
            row = self.db.execute("SELECT id FROM images WHERE key = ? ORDER BY id LIMIT 1", [ref]).fetchone()
            if row is None and ":" in ref:
                src, key = ref.split(":", 1)
                row = self.db.execute("SELECT id FROM images WHERE source = ? AND key = ?", [src, key]).fetchone()
        return None if row is None else int(row[0])

    def image_by_ref(self, ref: str | int) -> ImageRow | None:
        """Image row by id, by key (e.g. ``MPX1007_synpic46719``) or by ``source:key``; None when none matches."""
        iid = self._image_id(ref)
        return None if iid is None else self.image_rows([iid]).get(iid)

    def find_image(self, ref: str | int) -> ImageRow:
        """Like :meth:`image_by_ref`, raising NotFound when no image matches."""
        row = self.image_by_ref(ref)
        if row is None:
            raise NotFound(f"no image {ref!r} in the catalog", hint="use an image id or key from `medsearch search`")
        return row

    def image_by_sha(self, sha256: str) -> ImageRow | None:
        """The first image (id order) whose file has this sha256, or None."""
        row = self.db.execute("SELECT id FROM images WHERE sha256 = ? ORDER BY id LIMIT 1", [sha256]).fetchone()
        return self.image_rows([row[0]])[row[0]] if row else None

    def get_case(self, ref: str | int) -> CaseView:
        """A whole case by id, key or ``source:key``."""
        base = f"SELECT {CASE_COLUMNS}, c.labels AS labels FROM cases c"
        row = None
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            row = self.db.execute(f"{base} WHERE c.id = ?", [int(ref)]).fetchone()
        if row is None and isinstance(ref, str):
            row = self.db.execute(f"{base} WHERE c.key = ? ORDER BY c.id LIMIT 1", [ref]).fetchone()
            if row is None and ":" in ref:
                src, key = ref.split(":", 1)
                row = self.db.execute(f"{base} WHERE c.source = ? AND c.key = ?", [src, key]).fetchone()
        if row is None:
            raise NotFound(f"no case {ref!r} in the catalog", hint="use a case id or key from `medsearch search`")
        names = [d[0] for d in self.db.execute(f"{base} LIMIT 0").description]
        c = dict(zip(names, row, strict=True))
        cur = self.db.execute(
            "SELECT id AS image_id, key, modality_type, modality, plane, body_region, caption, width, height, status "
            "FROM images WHERE case_id = ? ORDER BY id",
            [c["case_id"]],
        )
        inames = [d[0] for d in cur.description]
        return CaseView(
            case_id=c["case_id"], case_key=c["case_key"], source=c["source"], split=c["split"], title=c["title"],
            diagnosis=c["diagnosis"], category=c["category"], sections=json.loads(c["sections"]),
            labels=json.loads(c["labels"]), images=[dict(zip(inames, r, strict=True)) for r in cur],
        )  # fmt: skip

    # ------------------------------------------------------------------ audit scans (stream, id order)
    def iter_case_fields(self) -> Iterator[StoredFields]:
        """Every case's stored free text: key, title, diagnosis, sections, meta (for the PHI audit)."""
        for cid, key, title, diagnosis, sections, meta in self.db.execute(
            "SELECT id, key, title, diagnosis, sections, meta FROM cases ORDER BY id"
        ):
            yield StoredFields(
                kind="case", row_id=cid, texts={"key": key, "title": title, "diagnosis": diagnosis},
                sections=json.loads(sections or "{}"), meta=json.loads(meta or "{}"),
            )  # fmt: skip

    def iter_image_fields(self) -> Iterator[StoredFields]:
        """Every image's stored free text: key, path, caption, meta (for the PHI audit)."""
        for iid, key, path, caption, meta in self.db.execute("SELECT id, key, path, caption, meta FROM images ORDER BY id"):
            yield StoredFields(
                kind="image", row_id=iid, texts={"key": key, "path": path, "caption": caption}, sections={},
                meta=json.loads(meta or "{}"),
            )  # fmt: skip

    def iter_labels(self) -> Iterator[LabelRow]:
        """Every label row."""
        for case_id, image_id, name, value in self.db.execute("SELECT case_id, image_id, name, value FROM labels"):
            yield LabelRow(case_id=case_id, image_id=image_id, name=name, value=value)
