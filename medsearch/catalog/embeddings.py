"""Stored vectors: (model, space, item_id) -> float16 blob, what is still to embed, and the dirty-index marker.

Spaces: ``image`` (item ids are image ids) and ``text`` (item ids are text ids). The FAISS indexes
are rebuilt from these rows; the marker ``dirty:{model}:{space}`` in ``meta`` says an index may be
behind its stored vectors (set in the same transaction that writes vectors, cleared after a save).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from medsearch.errors import NotFound

from .base import CatalogBase
from .util import chunks

SPACES = {"image": "images", "text": "texts"}  # space -> the table its item ids point into


def blobs_to_matrix(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Join float16 blobs into one (n, dim) float32 matrix without a per-row numpy call."""
    buf = b"".join(blobs)
    return np.frombuffer(buf, dtype=np.float16).reshape(len(blobs), dim).astype(np.float32)


def _table(space: str) -> str:
    try:
        return SPACES[space]
    except KeyError:
        raise ValueError(f"unknown vector space {space!r}; valid: {', '.join(SPACES)}") from None


class EmbeddingQueries(CatalogBase):
    """Vector storage and embedding bookkeeping of :class:`~medsearch.catalog.Catalog`."""

    # ------------------------------------------------------------------ the dirty-index marker
    def mark_dirty(self, model: str, space: str) -> None:
        """Record that the (model, space) index may no longer match the stored vectors."""
        self.set_meta(f"dirty:{model}:{space}", "1")

    def mark_clean(self, model: str, space: str) -> None:
        """Record that the (model, space) index was saved from the stored vectors as they are now."""
        self.set_meta(f"dirty:{model}:{space}", "0")

    def is_dirty(self, model: str, space: str) -> bool:
        """True when vectors changed since the (model, space) index was last saved (or a save did not finish)."""
        return self.get_meta(f"dirty:{model}:{space}") == "1"

    # ------------------------------------------------------------------ write
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
            self.mark_dirty(model, space)

    def drop_model_vectors(self, model: str) -> None:
        """Delete every stored vector of ``model`` (its weights changed: they are all stale)."""
        self.db.execute("DELETE FROM vectors WHERE model = ?", [model])

    def count_orphan_vectors(self, model: str, space: str) -> int:
        """Stored vectors of (model, space) whose catalog row no longer exists."""
        table = _table(space)
        return self.db.execute(
            f"SELECT count(*) FROM vectors v WHERE v.model = ? AND v.space = ? AND NOT EXISTS "
            f"(SELECT 1 FROM {table} t WHERE t.id = v.item_id)",
            [model, space],
        ).fetchone()[0]

    def drop_orphan_vectors(self, model: str, space: str) -> int:
        """Delete the orphan vectors of (model, space) in one transaction; returns how many went."""
        table = _table(space)
        with self.atomic():
            cur = self.db.execute(
                f"DELETE FROM vectors WHERE model = ? AND space = ? AND NOT EXISTS "
                f"(SELECT 1 FROM {table} t WHERE t.id = vectors.item_id)",
                [model, space],
            )
        return int(cur.rowcount)

    # ------------------------------------------------------------------ read
    def iter_vectors(self, model: str, space: str, block: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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
        """Stored vectors of ``ids`` as (d,) float32 arrays, keyed by id (ids without one are absent)."""
        out: dict[int, np.ndarray] = {}
        for chunk in chunks([int(i) for i in ids], 900):
            qs = ",".join("?" * len(chunk))
            for item_id, _dim, vec in self.db.execute(
                f"SELECT item_id, dim, vec FROM vectors WHERE model = ? AND space = ? AND item_id IN ({qs})",
                [model, space, *chunk],
            ):
                out[item_id] = np.frombuffer(vec, dtype=np.float16).astype(np.float32)
        return out

    def vector_ids(self, model: str, space: str) -> np.ndarray:
        """Item ids with a stored (model, space) vector, as (n,) int64 (no blobs are read)."""
        cur = self.db.execute("SELECT item_id FROM vectors WHERE model = ? AND space = ?", [model, space])
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def vector_dim(self, model: str, space: str) -> int | None:
        """Dimension of the stored (model, space) vectors, None when there are none."""
        row = self.db.execute("SELECT dim FROM vectors WHERE model = ? AND space = ? LIMIT 1", [model, space]).fetchone()
        return None if row is None else int(row[0])

    def count_vectors(self, model: str, space: str) -> int:
        return self.db.execute(
            "SELECT count(*) FROM vectors WHERE model = ? AND space = ?", [model, space]
        ).fetchone()[0]

    def vector_models(self) -> list[tuple[str, str, int]]:
        """(model, space, count) of every stored vector group."""
        return [tuple(r) for r in self.db.execute("SELECT model, space, count(*) FROM vectors GROUP BY model, space")]

    # ------------------------------------------------------------------ what is left to embed
    def count_unembedded(self, model: str | None, space: str) -> int:
        """Rows of ``space`` with no stored vector: ok images, or texts. ``model=None``: no vector of any model."""
        model_sql, params = ("v.model = ? AND ", [model]) if model is not None else ("", [])
        if space == "image":
            sql = (
                "SELECT count(*) FROM images i WHERE i.status = 'ok' AND NOT EXISTS (SELECT 1 FROM vectors v "
                f"WHERE {model_sql}v.space = 'image' AND v.item_id = i.id)"
            )
        else:
            _table(space)
            sql = (
                "SELECT count(*) FROM texts t WHERE NOT EXISTS (SELECT 1 FROM vectors v "
                f"WHERE {model_sql}v.space = 'text' AND v.item_id = t.id)"
            )
        return self.db.execute(sql, params).fetchone()[0]

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
