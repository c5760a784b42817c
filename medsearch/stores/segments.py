"""Segmented files of a large flat FAISS index: an erasure rewrites only the segments it touches.

A flat index over more than ``segment_rows(dim)`` vectors (64 MiB of float32 each) is saved as
segment files ``<space>.seg-<token>.faiss`` (each an ``IndexIDMap2`` over ``IndexFlatIP`` of
consecutive rows) instead of one ``<space>.faiss``. The manifest's ``params["segments"]`` lists
them in row order with their row count, id range and sha256; the manifest is the commit point:

    1. new segments are written under fresh names (temp file, fsync, rename): no reader sees them
    2. the manifest naming them replaces the old one (temp file, fsync, rename, fsync the folder)
    3. files no manifest names any more are deleted (``collect``)

A kill before 2 leaves the previous generation whole (plus unnamed files that step 3 of the next
save deletes); a kill before 3 leaves old files that the next save, ``remove`` or
``check --repair`` deletes. Removing one patient among 1M x 256-d vectors rewrites one or two
64 MiB segments instead of a 1 GB file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.errors import IndexInconsistent
from medsearch.fileio import sha256_file

from . import ann
from .base import fsync_path

SEGMENT_BYTES = 64 << 20  # float32 payload per segment file
IO_BLOCK = 8 << 20  # bytes per read/write call while streaming a segment


def _faiss():
    import faiss

    return faiss


def segment_rows(dim: int) -> int:
    """Rows per segment for vectors of ``dim``: ~SEGMENT_BYTES of float32."""
    return max(1, SEGMENT_BYTES // (4 * int(dim)))


def is_segmented(params: dict[str, Any]) -> bool:
    return isinstance(params.get("segments"), list)


def single_file(directory: Path, space: str) -> Path:
    return Path(directory) / f"{space}.faiss"


def segment_files(directory: Path, space: str) -> list[Path]:
    """Every segment file of ``space`` in ``directory``, named by a manifest or not."""
    return sorted(Path(directory).glob(f"{space}.seg-*.faiss"))


def data_files(directory: Path, space: str, params: dict[str, Any] | None = None) -> list[Path]:
    """The index files of ``space``: those ``params`` (a manifest's) name, or with None every one there."""
    if params is None:
        single = single_file(directory, space)
        return ([single] if single.exists() else []) + segment_files(directory, space)
    if is_segmented(params):
        return [Path(directory) / e["file"] for e in params["segments"]]
    return [single_file(directory, space)]


def checksum_of(entries: list[dict[str, Any]]) -> str:
    """The manifest checksum of a segmented index: sha256 over the segments' sha256s in row order."""
    return hashlib.sha256("\n".join(e["sha256"] for e in entries).encode()).hexdigest()


def write_segment(directory: Path, space: str, ids: np.ndarray, xb: np.ndarray) -> dict[str, Any]:
    """Write rows (ids (n,) int64, xb (n, d) float32) as a new segment file; returns its manifest entry."""
    faiss = _faiss()
    part = faiss.IndexIDMap2(faiss.IndexFlatIP(int(xb.shape[1])))
    part.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return write_index(directory, space, part)


def write_index(directory: Path, space: str, part: Any) -> dict[str, Any]:
    """Write an ``IndexIDMap2(IndexFlat)`` as a new segment file; returns its manifest entry.

    FAISS streams into the file and the hash in one pass (no copy of the bytes in memory), then
    fsync and a rename to a fresh name no manifest names yet.
    """
    faiss = _faiss()
    name = f"{space}.seg-{secrets.token_hex(8)}.faiss"
    tmp = Path(directory) / f".{name}.{os.getpid()}.tmp"  # `.<space>.*.tmp`: dropped by the next save if killed
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:

            def sink(b: bytes) -> int:
                h.update(b)
                return f.write(b)

            writer = faiss.PyCallbackIOWriter(sink, IO_BLOCK)
            faiss.write_index(part, writer)
            del writer  # flushes its last block
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(directory) / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    ids = ann.ids_of(part)
    return {"file": name, "count": int(part.ntotal), "sha256": h.hexdigest(),
            "min_id": int(ids.min()) if len(ids) else 0, "max_id": int(ids.max()) if len(ids) else -1}  # fmt: skip


def read_segment(directory: Path, entry: dict[str, Any], *, verify: bool = True) -> Any:
    """The segment's ``IndexIDMap2``, its bytes checked against the manifest entry before FAISS
    parses them (a damaged header must not make FAISS allocate or crash).

    FileNotFoundError when the file is gone (a newer generation replaced it); IndexInconsistent
    when its bytes or count do not match.
    """
    faiss = _faiss()
    path = Path(directory) / entry["file"]
    if verify and sha256_file(path) != entry["sha256"]:
        raise IndexInconsistent(
            f"{path} does not match its manifest checksum (partial write or tampering)",
            hint="run `medsearch check --repair` to rebuild it from stored vectors",
        )
    if not path.exists():  # (verify=False) faiss would report it as a RuntimeError
        raise FileNotFoundError(2, "No such file or directory", str(path))
    part = faiss.read_index(str(path))
    if int(part.ntotal) != int(entry["count"]):
        raise IndexInconsistent(f"{path} holds {part.ntotal} vectors, its manifest entry says {entry['count']}",
                                hint="run `medsearch check --repair`")  # fmt: skip
    return part


def write_rows(directory: Path, space: str, ids: np.ndarray, xb: np.ndarray, dim: int) -> list[dict[str, Any]]:
    """Write consecutive rows as segments of ``segment_rows(dim)``; their manifest entries in order."""
    step = segment_rows(dim)
    return [write_segment(directory, space, ids[s : s + step], xb[s : s + step]) for s in range(0, len(ids), step)]


def read_all(directory: Path, entries: list[dict[str, Any]], dim: int, *, verify: bool = True) -> Any:
    """One ``IndexIDMap2(IndexFlatIP)`` holding every segment's rows in order (as if saved as one file)."""
    faiss = _faiss()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))
    for e in entries:
        part = read_segment(directory, e, verify=verify)
        xb = ann.exact_storage(part)
        if xb is not None and len(xb):
            index.add_with_ids(xb, ann.ids_of(part))
        del part
    return index


def remove_ids(directory: Path, space: str, entries: list[dict[str, Any]], ids: np.ndarray) -> tuple[list[dict[str, Any]], int]:
    """Drop ``ids`` from the segments whose id range may hold them, rewriting only those that held
    any (under new names). Returns the new entry list (row order kept) and how many rows went."""
    faiss = _faiss()
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    out: list[dict[str, Any]] = []
    removed = 0
    for e in entries:
        lo, hi = np.searchsorted(ids, e["min_id"], "left"), np.searchsorted(ids, e["max_id"], "right")
        if lo == hi:  # no id of the erasure in this segment's range: not read, not written
            out.append(e)
            continue
        part = read_segment(directory, e)
        n = int(part.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids[lo:hi]))))
        if n == 0:
            out.append(e)
            continue
        removed += n
        if part.ntotal:
            out.append(write_index(directory, space, part))
        del part
    return out, removed


def collect(directory: Path, space: str, keep: list[Path]) -> int:
    """Delete the index files of ``space`` the current manifest does not name (``keep``) and the temp
    files killed writers left; fsync the folder. Call with the folder's save lock held."""
    names = {p.name for p in keep}
    gone = 0
    for p in data_files(directory, space) + sorted(Path(directory).glob(f".{space}.*.tmp")):
        if p.name not in names:
            p.unlink(missing_ok=True)
            gone += 1
    if gone:
        fsync_path(str(directory))
    return gone
