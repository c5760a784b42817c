"""The catalog reads of training and evaluation: named queries returning frozen rows.

``medsearch.train`` builds its (image, text) pairs and ``medsearch.eval.retrieval`` its pools from these;
neither writes SQL. Every query reads ok images only and orders by image id, so a pool or a pair
list is the same on every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .core import Catalog

LABEL_FIELDS = ("modality_type", "body_region", "plane")  # image metadata training may use as labels
_CHUNK = 900  # ids per IN (...) list, under SQLite's default 999 host parameters


@dataclass(frozen=True)
class TrainImage:
    """One ok image of a split, as training reads it."""

    id: int
    sha256: str
    path: str
    frame: int | None
    case_id: int
    caption: str | None
    modality_type: str | None
    body_region: str | None
    plane: str | None

    def label(self, name: str) -> str | None:
        """The value of one of ``LABEL_FIELDS`` (None when unknown or empty)."""
        return getattr(self, name) or None


@dataclass(frozen=True)
class PoolImage:
    """One ok image of an evaluation pool, with what evaluation needs of its case."""

    id: int
    sha256: str
    frame: int | None
    path: str
    case_id: int
    split: str | None
    modality_type: str | None
    body_region: str | None
    category: str | None  # the case's
    caption: str | None
    sections: dict[str, str]  # the case's report sections (name -> text)


def split_counts(catalog: Catalog) -> dict[str, int]:
    """Ok images per split; ``""`` counts the images with no split."""
    rows = catalog.db.execute("SELECT coalesce(split, ''), count(*) FROM images WHERE status = 'ok' GROUP BY 1")
    return {r[0]: int(r[1]) for r in rows}


def split_images(catalog: Catalog, split: str, sources: Sequence[str] = ()) -> list[TrainImage]:
    """The ok images of ``split`` (of ``sources`` only, when given), by id."""
    sql = (
        "SELECT id, sha256, path, frame, case_id, caption, modality_type, body_region, plane "
        "FROM images WHERE status = 'ok' AND split = ?"
    )
    params: list[Any] = [split]
    if sources:
        sql += f" AND source IN ({','.join('?' * len(sources))})"
        params += list(sources)
    return [TrainImage(*r) for r in catalog.db.execute(sql + " ORDER BY id", params).fetchall()]


def case_sections(catalog: Catalog, case_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """Report sections (name -> text) of the given cases; cases that do not exist are left out."""
    out: dict[int, dict[str, str]] = {}
    ids = list(case_ids)
    for chunk in _chunks(ids, _CHUNK):
        q = f"SELECT id, sections FROM cases WHERE id IN ({','.join('?' * len(chunk))})"
        for cid, sections in catalog.db.execute(q, chunk):
            out[int(cid)] = json.loads(sections or "{}")
    return out


def source_splits(catalog: Catalog, source: str | None = None) -> set[str | None]:
    """The splits of the ok images (of ``source`` when given); None stands for images with no split."""
    where, params = _pool_where(source, None)
    return {r[0] for r in catalog.db.execute(f"SELECT DISTINCT i.split FROM images i WHERE {where}", params)}


def has_source(catalog: Catalog, source: str) -> bool:
    """Does the catalog hold at least one image of ``source`` (any status)?"""
    return catalog.db.execute("SELECT 1 FROM images WHERE source = ? LIMIT 1", [source]).fetchone() is not None


def pool_images(catalog: Catalog, *, source: str | None = None, split: str | None = None) -> list[PoolImage]:
    """The ok images of ``source`` (None: all) and ``split`` (None: every split), by id, with their case."""
    where, params = _pool_where(source, split)
    rows = catalog.db.execute(
        "SELECT i.id, i.sha256, i.frame, i.path, i.case_id, i.split, i.modality_type, i.body_region, c.category, "
        f"i.caption, c.sections FROM images i JOIN cases c ON c.id = i.case_id WHERE {where} ORDER BY i.id",
        params,
    ).fetchall()
    return [PoolImage(*r[:10], sections=json.loads(r[10] or "{}")) for r in rows]


def _pool_where(source: str | None, split: str | None) -> tuple[str, list[Any]]:
    where, params = "i.status = 'ok'", []
    if source:
        where += " AND i.source = ?"
        params.append(source)
    if split is not None:
        where += " AND i.split = ?"
        params.append(split)
    return where, params


def _chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
