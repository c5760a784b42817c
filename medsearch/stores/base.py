"""What every vector store shares: the manifest, its atomic JSON writes, and the store protocol.

A store holds the vectors of one (model, space) with catalog row ids as its ids. Its manifest
``HOME/indexes/<model>/<space>.json`` records which store it is (``store``: faiss or milvus),
what it was built from (model id, weights hash, dim, metric, count, kind, generation) and how it
is searched (``params``); loading refuses a mismatch. ``medsearch.stores.open_store`` reads the
manifest and returns the store it names, so every reader uses the store the last ``index`` built.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medsearch.errors import IndexInconsistent

FORMAT_VERSION = 1
STORES = ("faiss", "milvus")


class VectorStore(Protocol):
    """The search contract of a (model, space) store (FAISS ``VectorIndex``, ``MilvusStore``).

    ``search`` returns FAISS's ``(D, I)``: D (nq, k) float32 scores, I (nq, k) int64 catalog ids
    with -1 for none. ``allowed`` restricts to those ids; ``filters`` (a dict of filter name ->
    value(s)) is answered inside the engine by stores with ``engine_filters = True``.
    """

    manifest: Manifest
    engine_filters: bool

    @property
    def ntotal(self) -> int: ...

    def search(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None, filters: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


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
    checksum: str = ""  # faiss: sha256 of the .faiss file; milvus: checksum of ids and vectors
    format_version: int = FORMAT_VERSION
    built_at: str = ""
    store: str = "faiss"  # faiss (the .faiss file beside it) or milvus (params name the uri and collection)



def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(Path(path).read_text())
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as e:
        raise IndexInconsistent(f"unreadable index manifest {path}: {e}", hint="run `medsearch check --repair`") from e


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON via an fsynced temp file; drops temps a killed writer left."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        try:  # older than 10 s: not another writer's file in flight (a JSON write takes milliseconds)
            if time.time() - stale.stat().st_mtime > 10:
                stale.unlink()
        except FileNotFoundError:
            pass
    tmp = _write_json_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json_tmp(path: Path, data: dict[str, Any]) -> str:
    """Write ``data`` to an fsynced temp file beside ``path``; returns its name (removed on failure)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


@contextmanager
def save_lock(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``directory/.lock`` (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_iso() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def manifest_path(directory: Path, space: str) -> Path:
    return Path(directory) / f"{space}.json"


def values_of(value: str | Sequence[str] | None) -> list[str]:
    """A filter value (one string or several) as a list of lower-cased strings (empty: no filter)."""
    if value is None or value == "":
        return []
    return [str(v).lower() for v in ([value] if isinstance(value, str) else value) if v not in (None, "")]


RECALL_KEYS = ("tuned_recall_at_10", "target_recall", "target_met")


def recall_summary(params: dict[str, Any]) -> dict[str, Any]:
    """The tuned recall an ANN build measured (manifest params), for an index summary; empty when exact."""
    return {k: params[k] for k in RECALL_KEYS if k in params}
