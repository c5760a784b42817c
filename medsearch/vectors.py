"""FAISS indexes derived from the catalog's stored vectors.

One index per (model, space) under ``HOME/indexes/<model>/<space>.faiss`` with a manifest
``<space>.json`` beside it. FAISS ids are catalog row ids (``IndexIDMap2``). Saves are atomic:
write a temp file, fsync, ``os.replace``, then the manifest (written the same way) whose
checksum must match the file before FAISS reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import IndexConfig
from .errors import IndexInconsistent, IndexMismatch, IndexNotBuilt

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What an index file was built from; loading refuses any mismatch."""

    model_id: str
    weights_hash: str
    space: str
    dim: int
    metric: str
    count: int
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    generation: int = 1
    checksum: str = ""  # sha256 of the .faiss file
    format_version: int = FORMAT_VERSION
    built_at: str = ""


def _faiss():
    import faiss

    return faiss


def choose_kind(n: int, config: IndexConfig) -> str:
    """Exact search below ``flat_max`` vectors, HNSW above (unless the config names a kind)."""
    if config.kind != "auto":
        return config.kind
    return "flat" if n <= config.flat_max else "hnsw"


def build_index(dim: int, kind: str, config: IndexConfig = IndexConfig()):
    """An empty ``IndexIDMap2`` of the given kind over inner product."""
    faiss = _faiss()
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = 80
        base.hnsw.efSearch = config.hnsw_ef_search
    else:
        raise IndexMismatch(f"unknown index kind {kind!r}", hint="use one of: auto, flat, hnsw")
    return faiss.IndexIDMap2(base)


class VectorIndex:
    """A loaded FAISS index with its manifest. ``search`` returns (D, I) like FAISS."""

    def __init__(self, index: Any, manifest: Manifest) -> None:
        self.index = index
        self.manifest = manifest

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def from_blocks(
        cls,
        blocks: Iterable[tuple[np.ndarray, np.ndarray]],
        *,
        model_id: str,
        weights_hash: str,
        space: str,
        dim: int,
        count: int,
        config: IndexConfig = IndexConfig(),
        generation: int = 1,
    ) -> VectorIndex:
        """Build from streamed (ids (n,) int64, vecs (n, dim) float32) blocks."""
        kind = choose_kind(count, config)
        index = build_index(dim, kind, config)
        for ids, vecs in blocks:
            if vecs.shape[1] != dim:
                raise IndexMismatch(f"stored {space} vectors have dim {vecs.shape[1]}, expected {dim}")
            index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        params = {"hnsw_m": config.hnsw_m, "ef_search": config.hnsw_ef_search} if kind == "hnsw" else {}
        man = Manifest(
            model_id=model_id, weights_hash=weights_hash, space=space, dim=dim, metric=config.metric,
            count=int(index.ntotal), kind=kind, params=params, generation=generation,
        )  # fmt: skip
        return cls(index, man)

    def search(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. ``allowed`` restricts results to those catalog ids.

        xq: (nq, dim) float32 -> D (nq, k) float32 scores, I (nq, k) int64 ids (-1 = none).
        """
        faiss = _faiss()
        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        if xq.shape[1] != self.manifest.dim:
            raise IndexMismatch(
                f"query has dim {xq.shape[1]} but the {self.manifest.space} index of {self.manifest.model_id} "
                f"has dim {self.manifest.dim}",
                hint="query with the model the index was built with",
            )
        k = max(1, min(int(k), max(self.ntotal, 1)))
        if allowed is None:
            return self.index.search(xq, k)
        if len(allowed) == 0:
            return np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        if self.manifest.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.manifest.params.get("ef_search", 128), k))
        else:
            params = faiss.SearchParameters(sel=sel)
        return self.index.search(xq, k, params=params)

    def reconstruct(self, item_id: int) -> np.ndarray:
        return self.index.reconstruct(int(item_id))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> Path:
        """Atomically write ``<space>.faiss`` then ``<space>.json`` into ``directory``."""
        faiss = _faiss()
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{self.manifest.space}.faiss"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.manifest.space}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            checksum = _sha256_file(tmp)
            _fsync_path(tmp)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        man = Manifest(**{**asdict(self.manifest), "checksum": checksum, "built_at": _now()})
        write_json_atomic(directory / f"{self.manifest.space}.json", asdict(man))
        _fsync_path(str(directory))
        self.manifest = man
        return target

    @classmethod
    def load(
        cls, directory: Path, space: str, *, model_id: str | None = None, weights_hash: str | None = None,
        verify: bool = True,
    ) -> VectorIndex:  # fmt: skip
        """Load and check against the manifest (and the expected model when given)."""
        faiss = _faiss()
        path, mpath = directory / f"{space}.faiss", directory / f"{space}.json"
        if not path.exists() or not mpath.exists():
            raise IndexNotBuilt(
                f"no {space} index in {directory}", hint="run `medsearch index` to build it"
            )
        man = read_manifest(mpath)
        if man.format_version != FORMAT_VERSION:
            raise IndexMismatch(
                f"{path} has index format {man.format_version}, this medsearch reads {FORMAT_VERSION}",
                hint="rebuild with `medsearch index --rebuild`",
            )
        if model_id is not None and man.model_id != model_id:
            raise IndexMismatch(
                f"the {space} index in {directory} was built with model {man.model_id!r}, not {model_id!r}",
                hint=f"query with --model {man.model_id}, or run `medsearch index --model {model_id}`",
            )
        if weights_hash is not None and man.weights_hash != weights_hash:
            raise IndexMismatch(
                f"the {space} index was built with other weights of {man.model_id} "
                f"({man.weights_hash} != {weights_hash})",
                hint="run `medsearch index --rebuild` to re-embed with the current weights",
            )
        if verify and _sha256_file(str(path)) != man.checksum:
            raise IndexInconsistent(
                f"{path} does not match its manifest checksum (partial write or tampering)",
                hint="run `medsearch check --repair` to rebuild it from stored vectors",
            )
        index = faiss.read_index(str(path))
        if index.ntotal != man.count or index.d != man.dim:
            raise IndexInconsistent(
                f"{path} holds {index.ntotal} vectors of dim {index.d}, manifest says {man.count} of dim {man.dim}",
                hint="run `medsearch check --repair`",
            )
        if man.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = int(man.params.get("ef_search", 128))
        return cls(index, man)


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(Path(path).read_text())
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as e:
        raise IndexInconsistent(f"unreadable index manifest {path}: {e}", hint="run `medsearch check --repair`") from e


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
