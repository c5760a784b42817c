"""Sharded FAISS serving: an index split by catalog id into parts that are built, saved and
loaded independently, and searched as one through ``faiss.IndexShards``.

    build_shards(blocks, n_shards, directory, ...)   # HOME/indexes/<model>/<space>.shards/00, 01, ...
    idx = ShardedIndex.load(directory, "image")       # or ShardedIndex.load_parts([dir0, dir3], ...)
    D, I = idx.search(xq, k, allowed=None)            # same contract as VectorIndex.search

Each part is an ordinary ``VectorIndex`` (its own manifest, checksum, kind, tuned knobs) over the
ids with ``id % n_shards == shard``. Unfiltered queries run on every part in parallel threads
inside ``faiss.IndexShards`` and are merged there; filtered queries run the part's own
filtered search and are merged here. A part can be memory-mapped (``mmap=True``) when it does
not fit in RAM, and a serving process can load any subset of the parts (``load_parts``): run
one process (or machine) per group of parts and merge their top-k the same way
(``merge_topk``) - that is the step before a replicated vector database (README: Milvus/Qdrant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import IndexConfig
from .errors import IndexMismatch, IndexNotBuilt
from .vectors import Manifest, VectorIndex

Blocks = Iterable[tuple[np.ndarray, np.ndarray]]


def _faiss():
    import faiss

    return faiss


def shard_dir(directory: Path, space: str, shard: int) -> Path:
    return Path(directory) / f"{space}.shards" / f"{shard:02d}"


def _part_blocks(source: Callable[[], Blocks], shard: int, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for ids, vecs in source():
        keep = (np.asarray(ids) % n) == shard
        if keep.any():
            yield np.asarray(ids)[keep], np.asarray(vecs)[keep]


def build_shards(
    source: Callable[[], Blocks], n_shards: int, directory: Path, *, model_id: str, weights_hash: str, space: str,
    dim: int, count: int, config: IndexConfig = IndexConfig(), generation: int = 1,
) -> list[VectorIndex]:  # fmt: skip
    """Build and save ``n_shards`` parts (``id % n_shards``), one stream pass per part."""
    if n_shards < 1:
        raise IndexMismatch(f"n_shards must be >= 1, got {n_shards}")
    parts = []
    for s in range(n_shards):
        part_count = sum(int(((np.asarray(ids) % n_shards) == s).sum()) for ids, _ in source())
        idx = VectorIndex.from_blocks(
            lambda s=s: _part_blocks(source, s, n_shards), model_id=model_id, weights_hash=weights_hash,
            space=space, dim=dim, count=part_count, config=config, generation=generation,
        )  # fmt: skip
        idx.manifest = Manifest(**{**asdict(idx.manifest), "params": {**idx.manifest.params, "shard": s,
                                                                       "n_shards": n_shards}})  # fmt: skip
        idx.save(shard_dir(directory, space, s))
        parts.append(idx)
    return parts


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part (D, I) of the same queries into the global top-k (higher score first)."""
    D = np.concatenate([d for d, _ in results], axis=1)  # (nq, parts*k)
    I = np.concatenate([i for _, i in results], axis=1)
    D = np.where(I < 0, -np.inf, D)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1).astype(np.float32), np.take_along_axis(I, order, 1)


class ShardedIndex:
    """Parts of one (model, space) index searched as one; ``search``/``ntotal``/``manifest`` like VectorIndex."""

    def __init__(self, parts: list[VectorIndex]) -> None:
        if not parts:
            raise IndexNotBuilt("no index shards to serve", hint="build them with medsearch.shards.build_shards")
        first = parts[0].manifest
        for p in parts[1:]:
            m = p.manifest
            if (m.model_id, m.weights_hash, m.space, m.dim, m.metric) != (
                first.model_id, first.weights_hash, first.space, first.dim, first.metric,
            ):  # fmt: skip
                raise IndexMismatch(f"index shards disagree: {m.model_id}/{m.space}/{m.dim} vs "
                                    f"{first.model_id}/{first.space}/{first.dim}")  # fmt: skip
        faiss = _faiss()
        self.parts = parts  # keeps the sub-indexes alive: IndexShards does not own them
        self.index = faiss.IndexShards(first.dim, True, False)  # threaded, keep each part's ids
        for p in parts:
            self.index.add_shard(p.index)
        kinds = sorted({p.manifest.kind for p in parts})
        self.manifest = Manifest(
            model_id=first.model_id, weights_hash=first.weights_hash, space=first.space, dim=first.dim,
            metric=first.metric, count=sum(p.ntotal for p in parts), kind="sharded:" + "+".join(kinds),
            params={"parts": len(parts)}, generation=max(p.manifest.generation for p in parts),
        )  # fmt: skip

    @property
    def ntotal(self) -> int:
        return int(sum(p.ntotal for p in self.parts))

    @classmethod
    def load_parts(cls, directories: list[Path], space: str, *, model_id: str | None = None,
                   weights_hash: str | None = None, mmap: bool = False) -> ShardedIndex:  # fmt: skip
        """Load the given part folders (each a saved VectorIndex)."""
        parts = [VectorIndex.load(Path(d), space, model_id=model_id, weights_hash=weights_hash, mmap=mmap)
                 for d in directories]  # fmt: skip
        return cls(parts)

    @classmethod
    def load(cls, directory: Path, space: str, **kw) -> ShardedIndex:
        """Load every part under ``directory/<space>.shards/``."""
        root = Path(directory) / f"{space}.shards"
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not dirs:
            raise IndexNotBuilt(f"no {space} index shards in {directory}", hint="build them with build_shards")
        return cls.load_parts(dirs, space, **kw)

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all parts: xq (nq, dim) -> D (nq, k) float32, I (nq, k) int64 catalog ids."""
        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        if xq.shape[1] != self.manifest.dim:
            raise IndexMismatch(f"query has dim {xq.shape[1]}, the sharded index has dim {self.manifest.dim}")
        k = max(1, min(int(k), max(self.ntotal, 1)))
        if allowed is None:
            return self.index.search(xq, k)
        return merge_topk([p.search(xq, k, allowed=allowed) for p in self.parts], k)

    def reconstruct(self, item_id: int) -> np.ndarray:
        for p in self.parts:
            if len(p.positions(np.array([item_id]))):
                return p.reconstruct(item_id)
        raise KeyError(item_id)
