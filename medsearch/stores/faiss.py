"""FAISS indexes derived from the catalog's stored vectors: the embedded default store.

One index per (model, space) under ``HOME/indexes/<model>/<space>.faiss`` with a manifest
``<space>.json`` beside it. FAISS ids are catalog row ids (``IndexIDMap2``). Saves are atomic:
write a temp file, fsync, ``os.replace``, then the manifest (written the same way) whose
checksum must match the file before FAISS reads it. A flat index larger than one segment
(64 MiB) is saved as segment files the manifest lists (``medsearch.stores.segments``), so a
``remove`` rewrites only the segments that held the removed ids.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.config import IndexConfig
from medsearch.errors import IndexInconsistent, IndexMismatch, IndexNotBuilt, MedsearchError, StorageError
from medsearch.fileio import sha256_file

from . import ann, segments
from .base import (  # noqa: F401  (read_manifest, write_json_atomic, save_lock: re-exported for callers)
    FORMAT_VERSION,
    Manifest,
    _write_json_tmp,
    fsync_path,
    now_iso,
    read_manifest,
    save_lock,
    write_json_atomic,
)


def _faiss():
    import faiss

    return faiss


def choose_kind(n: int, config: IndexConfig) -> str:
    """Exact search up to ``flat_max`` vectors, ``large_kind`` above (unless the config names a kind)."""
    return ann.choose_kind(n, config)


def build_index(dim: int, kind: str, config: IndexConfig = IndexConfig(), n: int = 0):
    """An empty ``IndexIDMap2`` of the given kind over inner product (ivfpq still needs training)."""
    return ann.new_index(dim, kind, config, n=n)


def saved_files(directory: Path, space: str) -> list[Path]:
    """The index files the FAISS manifest of ``space`` names (one ``.faiss`` or its segments);
    empty without a readable FAISS manifest."""
    mpath = Path(directory) / f"{space}.json"
    try:
        man = read_manifest(mpath) if mpath.exists() else None
    except MedsearchError:
        man = None
    return [] if man is None or man.store != "faiss" else segments.data_files(Path(directory), space, man.params)


def delete_files(directory: Path, space: str, *, manifest: bool = True) -> None:
    """Delete the FAISS index of ``space``: the manifest first (so no reader finds half an index),
    then every index file of it there (named or left by a kill). ``manifest=False`` keeps the
    manifest (another store's, which replaced this index)."""
    directory = Path(directory)
    if manifest:
        (directory / f"{space}.json").unlink(missing_ok=True)
    for p in segments.data_files(directory, space):
        p.unlink(missing_ok=True)


# Filters that leave at most this many ids are answered exactly from the stored vectors
# (a gather + matmul), which beats graph/list traversal with a sparse selector.
EXACT_SUBSET_MAX = 32_768


class VectorIndex:
    """A loaded FAISS index with its manifest. ``search`` returns (D, I) like FAISS."""

    engine_filters = False  # filters arrive as ``allowed`` catalog ids

    def __init__(self, index: Any, manifest: Manifest) -> None:
        self.index = index
        self.manifest = manifest
        # segmented saves: the folder and segment entries this index was read from, and how many
        # leading rows are still those files' rows (a save rewrites only what follows them)
        self._disk: tuple[Path, list[dict[str, Any]]] | None = None
        self._clean_rows = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def from_blocks(
        cls,
        blocks: Iterable[tuple[np.ndarray, np.ndarray]] | Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
        *,
        model_id: str,
        weights_hash: str,
        space: str,
        dim: int,
        count: int,
        config: IndexConfig = IndexConfig(),
        generation: int = 1,
    ) -> VectorIndex:
        """Build from streamed (ids (n,) int64, vecs (n, dim) float32) blocks.

        ``blocks`` may be a zero-argument callable returning a fresh stream: an ivfpq build then
        draws its training sample evenly over a first pass (see ``medsearch.stores.ann.build``).
        """
        index, kind, params = ann.build(blocks, dim=dim, count=count, space=space, config=config)
        man = Manifest(
            model_id=model_id, weights_hash=weights_hash, space=space, dim=dim, metric=config.metric,
            count=int(index.ntotal), kind=kind, params=params, generation=generation,
        )  # fmt: skip
        return cls(index, man)

    def sync(
        self,
        blocks: Iterable[tuple[np.ndarray, np.ndarray]] | Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
        *,
        generation: int | None = None,
        max_new_fraction: float = 1.0,
    ) -> int | None:
        """Add the stored vectors this index lacks, when nothing else changed (no rebuild).

        Returns how many were added, or None when only a rebuild can bring the index in line
        (a vector was removed or replaced, or too many are new); the index is then unchanged.
        """
        added = ann.sync(self.index, blocks, dim=self.manifest.dim, space=self.manifest.space,
                         max_new_fraction=max_new_fraction)  # fmt: skip
        if added is None:
            return None
        self._ids = None
        params = {**self.manifest.params, "incremental_adds": int(self.manifest.params.get("incremental_adds", 0)) + added}
        self.manifest = Manifest(**{
            **asdict(self.manifest), "count": self.ntotal, "params": params,
            "generation": generation if generation is not None else self.manifest.generation + 1,
        })  # fmt: skip
        return added

    def _id_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(catalog ids in internal order, argsort of them), cached until the index changes."""
        if getattr(self, "_ids", None) is None or len(self._ids[0]) != self.ntotal:
            ids = ann.ids_of(self.index)
            self._ids = (ids, np.argsort(ids, kind="stable"))
        return self._ids

    def item_ids(self) -> np.ndarray:
        """The catalog ids the index holds, (ntotal,) int64."""
        return self._id_lookup()[0]

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Internal positions of those catalog ids that are in the index, (m,) int64."""
        ids, order = self._id_lookup()
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(ids) == 0 or len(item_ids) == 0:
            return np.zeros(0, np.int64)
        srt = ids[order]
        at = np.minimum(np.searchsorted(srt, item_ids), len(ids) - 1)
        return order[at[srt[at] == item_ids]]

    def search(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None, filters: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. ``allowed`` restricts results to those catalog ids (``filters``
        is not read: the catalog turns filters into ``allowed``).

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
            gpu = getattr(self, "_gpu", None)
            if gpu is not None and gpu.ntotal == self.ntotal:
                return gpu.search(xq, k)
            return self.index.search(xq, k)
        if len(allowed) == 0:
            return np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        kind = self.manifest.kind
        if len(allowed) <= EXACT_SUBSET_MAX or kind == "ivfpq":
            xb = ann.exact_storage(self.index)
            pos = self.positions(allowed)
            if len(pos) == 0:
                return np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
            if xb is not None and len(pos) <= EXACT_SUBSET_MAX:
                return ann.exact_subset_search(xq, xb, pos, self._id_lookup()[0], k)
        if kind == "ivfpq":
            # IndexRefine does not pass the IDMap's translated selector to its base index: select
            # internal positions on the IVF directly, with nprobe widened by the filter's sparsity.
            ivf = ann.ivf_of(self.index)
            frac = len(pos) / max(1, self.ntotal)
            nprobe = int(min(ivf.nlist, np.ceil(ivf.nprobe / max(frac, 1e-6))))
            bitmap = np.zeros((self.ntotal + 7) // 8, np.uint8)
            np.bitwise_or.at(bitmap, pos >> 3, (1 << (pos & 7)).astype(np.uint8))
            sel = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
            inner = faiss.downcast_index(self.index.index)
            params = faiss.IndexRefineSearchParameters(
                k_factor=float(inner.k_factor), base_index_params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
            )
            D, P = inner.search(xq, k, params=params)
            ids = self._id_lookup()[0]
            return D, np.where(P >= 0, ids[np.maximum(P, 0)], -1)
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        if kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(self.manifest.params.get("ef_search", 128)), k))
        else:
            params = faiss.SearchParameters(sel=sel)
        return self.index.search(xq, k, params=params)

    def to_gpu(self, device: int = 0) -> bool:
        """Answer unfiltered searches from a faiss-gpu copy of a flat index (filtered ones, and
        saving, keep using the CPU index). False, changing nothing, without faiss-gpu and a
        GPU, or for other kinds (HNSW has no faiss-gpu version; IVF-PQ's refine step is CPU)."""
        if self.manifest.kind != "flat" or ann.gpu_count() == 0:
            return False
        faiss = _faiss()
        try:
            self._gpu_res = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, device, self.index)
        except (RuntimeError, AttributeError):
            self._gpu = None
            return False
        return True

    def remove(self, item_ids: np.ndarray) -> int | None:
        """Drop those catalog ids in place; returns how many went, or None when the kind cannot
        remove (HNSW graphs, IVF-PQ's refine wrapper): the caller rebuilds from stored vectors."""
        faiss = _faiss()
        ids = np.ascontiguousarray(np.asarray(item_ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        if self.manifest.kind != "flat":
            return None
        pos = self.positions(ids)
        if len(pos):  # rows before the first removed one keep their place (and their segment files)
            self._clean_rows = min(self._clean_rows, int(pos.min()))
        try:
            n = int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        except RuntimeError:
            return None
        self._ids = None
        self.manifest = Manifest(**{**asdict(self.manifest), "count": self.ntotal, "generation": self.manifest.generation + 1})
        return n

    def reconstruct(self, item_id: int) -> np.ndarray:
        return self.index.reconstruct(int(item_id))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> Path:
        """Write ``<space>.faiss`` and its manifest ``<space>.json`` into ``directory``.

        Both go to fsynced temp files first and are renamed into place only when both are
        complete, so a full disk or an I/O error leaves the previous index loadable. A flat index
        over more than one segment is written as segment files instead (only those after the rows
        still on disk from the load), the manifest naming them last; files it no longer names go.
        """
        directory.mkdir(parents=True, exist_ok=True)
        with save_lock(directory):  # one saver per folder: concurrent saves could pair a file with another's manifest
            for stale in directory.glob(f".{self.manifest.space}.*.tmp"):  # left by a killed save
                stale.unlink(missing_ok=True)
            try:
                return self._save_locked(directory)
            except (OSError, RuntimeError) as e:  # faiss reports a full disk as RuntimeError
                reason = str(e).strip().splitlines()[-1][-200:] if str(e).strip() else type(e).__name__
                raise StorageError(
                    f"could not write the {self.manifest.space} index into {directory}: {reason}",
                    hint="free disk space (or fix the disk) and rerun `medsearch index`; the previous index is kept",
                ) from e

    def _save_locked(self, directory: Path) -> Path:
        if self.manifest.kind == "flat" and self.ntotal > segments.segment_rows(self.manifest.dim):
            return self._save_segments(directory)
        faiss = _faiss()
        space = self.manifest.space
        target, mtarget = directory / f"{space}.faiss", directory / f"{space}.json"
        tmps: list[str] = []
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{space}.", suffix=".tmp", dir=directory)
            os.close(fd)
            tmps.append(tmp)
            faiss.write_index(self.index, tmp)
            checksum = sha256_file(tmp)
            fsync_path(tmp)
            params = {k: v for k, v in self.manifest.params.items() if k != "segments"}
            man = Manifest(**{**asdict(self.manifest), "params": params, "checksum": checksum, "built_at": now_iso()})
            tmps.append(_write_json_tmp(mtarget, asdict(man)))
            os.replace(tmp, target)  # the two renames are the only steps left: no writes in between
            os.replace(tmps[1], mtarget)
        except BaseException:
            for t in tmps:
                if os.path.exists(t):
                    os.unlink(t)
            raise
        fsync_path(str(directory))
        self.manifest = man
        self._disk = None
        segments.collect(directory, space, [target])  # segments of an earlier, larger generation
        return target

    def _save_segments(self, directory: Path) -> Path:
        space, dim, n = self.manifest.space, self.manifest.dim, self.ntotal
        mtarget = directory / f"{space}.json"
        keep: list[dict[str, Any]] = []
        start = 0
        if self._disk is not None and self._disk[0] == directory.resolve():
            try:  # reuse only files the manifest on disk still names (another save may have replaced them)
                now = read_manifest(mtarget).params.get("segments") or []
            except MedsearchError:
                now = []
            named = {(e["file"], e["sha256"]) for e in now}
            for e in self._disk[1]:
                if start + int(e["count"]) > self._clean_rows or (e["file"], e["sha256"]) not in named:
                    break
                keep.append(e)
                start += int(e["count"])
        xb = ann.exact_storage(self.index)  # (n, dim) float32 view
        new: list[dict[str, Any]] = []
        committed = False
        try:
            new = segments.write_rows(directory, space, ann.ids_of(self.index)[start:], xb[start:], dim)
            entries = keep + new
            params = {**self.manifest.params, "segments": entries}
            man = Manifest(**{**asdict(self.manifest), "params": params, "checksum": segments.checksum_of(entries),
                              "built_at": now_iso()})  # fmt: skip
            tmp = _write_json_tmp(mtarget, asdict(man))
            try:
                os.replace(tmp, mtarget)  # the commit: readers see the new segments from here on
            except BaseException:
                os.unlink(tmp)
                raise
            committed = True
        finally:
            if not committed:
                for e in new:
                    (directory / e["file"]).unlink(missing_ok=True)
        fsync_path(str(directory))
        self.manifest = man
        self._disk, self._clean_rows = (directory.resolve(), entries), n
        segments.collect(directory, space, [directory / e["file"] for e in entries])
        return mtarget

    @staticmethod
    def remove_saved(directory: Path, space: str, item_ids: np.ndarray) -> int | None:
        """Drop catalog ids from the saved segmented flat index in ``directory`` without loading it
        whole: only segments whose id range may hold them are read, only those that held any are
        rewritten, then the manifest (the next generation) and the files it no longer names.

        Returns how many went; None when the saved index is not segmented (load, ``remove`` and
        ``save`` instead) or would be left empty. IndexInconsistent when a segment it must read is
        missing or damaged (rebuild from stored vectors), StorageError on a write error.
        """
        mpath = directory / f"{space}.json"
        ids = np.asarray(item_ids, dtype=np.int64)
        with save_lock(directory):
            man = read_manifest(mpath)
            if man.store != "faiss" or man.kind != "flat" or not segments.is_segmented(man.params):
                return None
            try:
                entries, n = segments.remove_ids(directory, space, man.params["segments"], ids, man.dim)
                if n and not entries:
                    return None
                if n:
                    man = Manifest(**{
                        **asdict(man), "count": sum(int(e["count"]) for e in entries), "generation": man.generation + 1,
                        "params": {**man.params, "segments": entries}, "checksum": segments.checksum_of(entries),
                        "built_at": now_iso(),
                    })  # fmt: skip
                    tmp = _write_json_tmp(mpath, asdict(man))
                    os.replace(tmp, mpath)
                    fsync_path(str(directory))
                segments.collect(directory, space, segments.data_files(directory, space, man.params))
            except FileNotFoundError as e:
                raise IndexInconsistent(f"{e.filename} is named by the {space} manifest in {directory} but missing",
                                        hint="run `medsearch check --repair` to rebuild it from stored vectors") from e
            except (OSError, RuntimeError) as e:
                raise StorageError(f"could not rewrite the {space} index segments in {directory}: {e}",
                                   hint="free disk space (or fix the disk) and rerun `medsearch remove`") from e
        return n

    @classmethod
    def load(
        cls, directory: Path, space: str, *, model_id: str | None = None, weights_hash: str | None = None,
        verify: bool = True, mmap: bool = False,
    ) -> VectorIndex:  # fmt: skip
        """Load and check against the manifest (and the expected model when given).

        ``mmap``: map the file read-only instead of reading it (flat and IVF data stay on disk
        until touched; for index shards larger than RAM). A segmented flat index is read whole;
        when a save replaced its segments while they were read, the new generation is read.
        """
        for attempt in range(3):
            man = read_manifest(directory / f"{space}.json") if (directory / f"{space}.json").exists() else None
            try:
                return cls._load(directory, space, man, model_id=model_id, weights_hash=weights_hash,
                                 verify=verify, mmap=mmap)  # fmt: skip
            except (FileNotFoundError, IndexInconsistent) as e:
                # a save or remove replaced the files while this read them: read the new generation
                mpath = directory / f"{space}.json"
                if attempt < 2 and man is not None and mpath.exists() and read_manifest(mpath) != man:
                    continue
                if isinstance(e, FileNotFoundError):
                    raise IndexInconsistent(
                        f"{e.filename} is named by the {space} manifest in {directory} but missing",
                        hint="run `medsearch check --repair` to rebuild it from stored vectors",
                    ) from e
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _load(
        cls, directory: Path, space: str, man: Manifest | None, *, model_id: str | None, weights_hash: str | None,
        verify: bool, mmap: bool,
    ) -> VectorIndex:  # fmt: skip
        faiss = _faiss()
        path = directory / f"{space}.faiss"
        if man is None or (not segments.is_segmented(man.params) and not path.exists()):
            raise IndexNotBuilt(
                f"no {space} index in {directory}", hint="run `medsearch index` to build it"
            )
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
        if segments.is_segmented(man.params):  # read whole (mmap does not apply), each file checked first
            entries = list(man.params["segments"])
            index = segments.read_all(directory, entries, man.dim, verify=verify)
            if index.ntotal != man.count:
                raise IndexInconsistent(f"the {space} segments in {directory} hold {index.ntotal} vectors, "
                                        f"the manifest says {man.count}", hint="run `medsearch check --repair`")  # fmt: skip
            out = cls(index, man)
            out._disk, out._clean_rows = (directory.resolve(), entries), man.count
            return out
        if verify and sha256_file(str(path)) != man.checksum:
            raise IndexInconsistent(
                f"{path} does not match its manifest checksum (partial write or tampering)",
                hint="run `medsearch check --repair` to rebuild it from stored vectors",
            )
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else faiss.read_index(str(path))
        if index.ntotal != man.count or index.d != man.dim:
            raise IndexInconsistent(
                f"{path} holds {index.ntotal} vectors of dim {index.d}, manifest says {man.count} of dim {man.dim}",
                hint="run `medsearch check --repair`",
            )
        ann.apply_params(index, man.kind, man.params)
        return cls(index, man)


