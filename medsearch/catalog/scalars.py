"""Named queries for the vector stores: stored-vector ids and the scalar fields a store filters on.

A Milvus row carries the filter fields of its catalog row so that filters run inside the engine:
an image row its own values; a text row the values of every image of its case (the catalog's
``text_ids_where`` keeps the texts whose case has a matching image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .core import Catalog
from .schema import FILTER_COLUMNS
from .util import chunks as _chunks

# filter name -> images column, in a fixed order
SCALAR_FIELDS = tuple(FILTER_COLUMNS)
_COLS = ", ".join(FILTER_COLUMNS[f] for f in SCALAR_FIELDS)


def stored_ids(catalog: Catalog, model: str, space: str) -> np.ndarray:
    """Ids with a stored vector of (model, space), ascending, (n,) int64."""
    rows = catalog.db.execute(
        "SELECT item_id FROM vectors WHERE model = ? AND space = ? ORDER BY item_id", [model, space]
    )
    return np.fromiter((r[0] for r in rows), dtype=np.int64)


def scalars(catalog: Catalog, space: str, ids: Sequence[int]) -> dict[int, tuple[int, dict[str, set[str]]]]:
    """id -> (case_id, {filter name: lower-cased values}) for image or text rows (missing rows left out)."""
    out: dict[int, tuple[int, dict[str, set[str]]]] = {}
    ids = [int(i) for i in ids]
    if space == "image":
        for chunk in _chunks(ids, 900):
            qs = ",".join("?" * len(chunk))
            for r in catalog.db.execute(f"SELECT id, case_id, {_COLS} FROM images WHERE id IN ({qs})", chunk):
                out[r[0]] = (r[1], {f: ({str(v).lower()} if v not in (None, "") else set()) for f, v in zip(SCALAR_FIELDS, r[2:], strict=True)})
        return out
    case_of: dict[int, int] = {}
    for chunk in _chunks(ids, 900):
        qs = ",".join("?" * len(chunk))
        case_of.update(catalog.db.execute(f"SELECT id, case_id FROM texts WHERE id IN ({qs})", chunk).fetchall())
    per_case: dict[int, dict[str, set[str]]] = {}
    for chunk in _chunks(sorted(set(case_of.values())), 900):
        qs = ",".join("?" * len(chunk))
        for r in catalog.db.execute(f"SELECT case_id, {_COLS} FROM images WHERE case_id IN ({qs})", chunk):
            vals = per_case.setdefault(r[0], {f: set() for f in SCALAR_FIELDS})
            for f, v in zip(SCALAR_FIELDS, r[1:], strict=True):
                if v not in (None, ""):
                    vals[f].add(str(v).lower())
    for tid, cid in case_of.items():
        out[tid] = (cid, per_case.get(cid, {f: set() for f in SCALAR_FIELDS}))
    return out


def not_embedded(catalog: Catalog, model: str, space: str) -> int:
    """Rows of ``space`` (ok images, or texts) that have no stored vector of ``model``."""
    if space == "image":
        sql = ("SELECT count(*) FROM images i WHERE i.status = 'ok' AND NOT EXISTS (SELECT 1 FROM vectors v "
               "WHERE v.model = ? AND v.space = 'image' AND v.item_id = i.id)")  # fmt: skip
    else:
        sql = ("SELECT count(*) FROM texts t WHERE NOT EXISTS (SELECT 1 FROM vectors v "
               "WHERE v.model = ? AND v.space = 'text' AND v.item_id = t.id)")  # fmt: skip
    return int(catalog.db.execute(sql, [model]).fetchone()[0])
