"""Segmented files of a large flat FAISS index: an erasure rewrites only the segments it touches.

A flat index over more than ``segment_rows(dim)`` vectors (64 MiB of float32 each) is saved as
segment files ``<space>.seg-<token>.vecs`` (the ids and float32 rows of consecutive rows of the
index, see ``MAGIC``) instead of one ``<space>.faiss``; loading assembles the same
``IndexIDMap2(IndexFlatIP)`` a single file gives. The manifest's ``params["segments"]`` lists
them in row order with their row count, id range and sha256; the manifest is the commit point:

    1. new segments are written under fresh names (temp file, fsync, rename): no reader sees them
    2. the manifest naming them replaces the old one (temp file, fsync, rename, fsync the folder)
    3. files no manifest names any more are deleted (``collect``)

A kill before 2 leaves the previous generation whole (plus unnamed files that step 3 of the next
save or remove deletes); a kill before 3 leaves the replaced files, which the next save or remove
deletes (an interrupted erasure is rerun by the next ``remove`` or ``check --repair``). Removing one patient among 1M x 256-d vectors rewrites one or two
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

from .base import fsync_path

SEGMENT_BYTES = 64 << 20  # float32 payload per segment file
MAGIC = b"MSSEG\x00\x01\x00"  # medsearch segment, format 1: then (n, d) int64, n int64 ids, n x d float32


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
    return sorted(Path(directory).glob(f"{space}.seg-*.vecs"))


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
    """Write rows (ids (n,) int64, xb (n, d) float32) as a new segment file; returns its manifest entry.

    The file is ``MAGIC``, (n, d) as int64, the ids, the vectors: written straight from the arrays
    (no serialised copy) while they are hashed, fsynced, renamed to a fresh name no manifest names yet.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    name = f"{space}.seg-{secrets.token_hex(8)}.vecs"
    tmp = Path(directory) / f".{name}.{os.getpid()}.tmp"  # `.<space>.*.tmp`: dropped by the next save if killed
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for part in (MAGIC, np.array(xb.shape, np.int64).tobytes(), memoryview(ids).cast("B"), memoryview(xb).cast("B")):
                h.update(part)
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(directory) / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": name, "count": int(len(ids)), "sha256": h.hexdigest(),
            "min_id": int(ids.min()) if len(ids) else 0, "max_id": int(ids.max()) if len(ids) else -1}  # fmt: skip


def read_segment(
    directory: Path, entry: dict[str, Any], dim: int, *, verify: bool = True,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The segment's (ids (n,) int64, xb (n, dim) float32), read into ``out`` when given (slices of
    the whole index's storage: one copy from the file, none after). The header must agree with the
    manifest entry before anything is read, and the bytes with its sha256 before anything is used.

    FileNotFoundError when the file is gone (a newer generation replaced it); IndexInconsistent
    when its header, size or bytes do not match.
    """
    path = Path(directory) / entry["file"]
    n, dim = int(entry["count"]), int(dim)

    def bad(why: str) -> IndexInconsistent:
        return IndexInconsistent(f"{path} {why} (partial write or tampering)",
                                 hint="run `medsearch check --repair` to rebuild it from stored vectors")  # fmt: skip

    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 16)
        if head[: len(MAGIC)] != MAGIC or np.frombuffer(head[len(MAGIC) :], np.int64).tolist() != [n, dim]:
            raise bad(f"is not a segment of {n} x {dim} vectors")
        ids, xb = out if out is not None else (np.empty(n, np.int64), np.empty((n, dim), np.float32))
        for arr in (ids, xb):
            view = memoryview(arr).cast("B")
            if f.readinto(view) != len(view):
                raise bad("is shorter than its header says")
        if f.read(1):
            raise bad("is longer than its header says")
    if verify:
        h = hashlib.sha256(head)
        h.update(memoryview(ids).cast("B"))
        h.update(memoryview(xb).cast("B"))
        if h.hexdigest() != entry["sha256"]:
            raise bad("does not match its manifest checksum")
    return ids, xb


def write_rows(directory: Path, space: str, ids: np.ndarray, xb: np.ndarray, dim: int) -> list[dict[str, Any]]:
    """Write consecutive rows as segments of ``segment_rows(dim)``; their manifest entries in order."""
    step = segment_rows(dim)
    return [write_segment(directory, space, ids[s : s + step], xb[s : s + step]) for s in range(0, len(ids), step)]


def read_all(directory: Path, entries: list[dict[str, Any]], dim: int, *, verify: bool = True) -> Any:
    """One ``IndexIDMap2(IndexFlatIP)`` holding every segment's rows in order (as if saved as one file).

    The flat storage is sized once from the manifest's counts and each segment is read straight
    into its slice; the id map's reverse map is built once at the end.
    """
    faiss = _faiss()
    total, dim = sum(int(e["count"]) for e in entries), int(dim)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if total == 0:
        return index
    flat = faiss.downcast_index(index.index)
    flat.codes.resize(total * dim * 4)
    flat.ntotal = total
    xb = faiss.rev_swig_ptr(flat.get_xb(), total * dim).reshape(total, dim)  # (total, dim) float32 view
    ids = np.empty(total, np.int64)
    at = 0
    for e in entries:
        m = int(e["count"])
        read_segment(directory, e, dim, verify=verify, out=(ids[at : at + m], xb[at : at + m]))
        at += m
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = total
    index.construct_rev_map()
    return index


def remove_ids(
    directory: Path, space: str, entries: list[dict[str, Any]], ids: np.ndarray, dim: int
) -> tuple[list[dict[str, Any]], int]:
    """Drop ``ids`` from the segments whose id range may hold them, rewriting only those that held
    any (under new names). Returns the new entry list (row order kept) and how many rows went."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    out: list[dict[str, Any]] = []
    removed = 0
    for e in entries:
        lo, hi = np.searchsorted(ids, e["min_id"], "left"), np.searchsorted(ids, e["max_id"], "right")
        if lo == hi:  # no id of the erasure in this segment's range: not read, not written
            out.append(e)
            continue
        seg_ids, seg_xb = read_segment(directory, e, dim)
        keep = ~np.isin(seg_ids, ids[lo:hi])
        n = int(len(keep) - keep.sum())
        if n == 0:
            out.append(e)
            continue
        removed += n
        if keep.any():
            out.append(write_segment(directory, space, seg_ids[keep], seg_xb[keep]))
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
