"""Consistency of a home: catalog rows, stored vectors, FAISS files and manifests agree.

``check_home(..., repair=True)`` fixes what can be fixed without re-embedding: orphan vectors
(rows deleted) are dropped, every index that disagrees is rebuilt from stored vectors, an index
whose vectors are all gone is removed, and temp files left by a killed save are deleted. Rows
with no stored vector are reported as ``not_embedded``: only an encoder can fix those
(``medsearch check --repair`` then runs the ``index`` step for them).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .catalog import SPACES, Catalog
from .config import IndexConfig, Paths
from .errors import IndexNotBuilt, MedsearchError
from .stores.faiss import VectorIndex, delete_files, read_manifest


def check_home(catalog: Catalog, paths: Paths, *, repair: bool = False) -> dict[str, Any]:
    """Return {'ok', 'problems', 'repaired', 'indexes'}; with ``repair`` rebuild what is broken."""
    problems: list[str] = []
    repaired: list[str] = []
    indexes: list[dict[str, Any]] = []
    from .erasure import check_erasures  # an erasure a kill interrupted: --repair finishes it first

    check_erasures(catalog, paths, problems, repaired, repair=repair)
    for model, space in _pairs(catalog, paths):
        if space not in SPACES:
            problems.append(f"vectors of unknown space {space!r} for {model}")
            continue
        orphans = catalog.count_orphan_vectors(model, space)
        if orphans:
            problems.append(f"{orphans} {space} vectors of {model} point to rows that no longer exist")
            if repair:
                catalog.drop_orphan_vectors(model, space)
                repaired.append(f"dropped {orphans} orphan {space} vectors of {model}")
        stored = catalog.count_vectors(model, space)
        directory = paths.index_dir(model)
        entry: dict[str, Any] = {"model": model, "space": space, "stored_vectors": stored}
        if _store_of(directory, space) == "milvus":  # counts, id/vector checksum, manifest; repair = a sync
            from .stores.milvus_sync import check_store

            indexes.append(check_store(catalog, directory, space, entry, problems, repaired, repair=repair))
            continue
        broken = None
        try:
            idx = VectorIndex.load(directory, space, model_id=model)
            entry.update(count=idx.ntotal, kind=idx.manifest.kind, generation=idx.manifest.generation)
            if idx.ntotal != stored:
                broken = f"{space} index of {model} holds {idx.ntotal} vectors, the catalog stores {stored}"
            else:
                ids = idx.index.id_map if hasattr(idx.index, "id_map") else None
                if ids is not None:
                    import faiss

                    id_arr = faiss.vector_to_array(ids)
                    missing = _missing_ids(catalog, model, space, id_arr)
                    if missing:
                        broken = f"{missing} ids in the {space} index of {model} have no stored vector"
                    elif len(np.unique(id_arr)) != len(id_arr):
                        broken = f"the {space} index of {model} holds {len(id_arr) - len(np.unique(id_arr))} duplicate ids"
        except IndexNotBuilt as e:
            broken = e.message if stored else None  # nothing stored, nothing to index
        except MedsearchError as e:
            broken = e.message
        if broken:
            problems.append(broken)
            if repair and not stored:  # nothing to rebuild from: a stale index must not be served
                delete_files(directory, space)
                repaired.append(f"removed the {space} index of {model}: the catalog stores no {space} vectors")
                entry.update(count=0)
            elif repair:
                # the catalog's record of the weights is the truth (a stale manifest may carry old ones)
                weights, kind = catalog.get_meta(f"weights:{model}") or "", "auto"
                try:
                    man = read_manifest(directory / f"{space}.json")
                    weights, kind = weights or man.weights_hash, man.kind
                except MedsearchError:
                    pass
                dim = catalog.vector_dim(model, space)
                idx = VectorIndex.from_blocks(
                    functools.partial(catalog.iter_vectors, model, space), model_id=model, weights_hash=weights, space=space,
                    dim=dim, count=stored,
                    config=IndexConfig(kind=kind if kind in ("flat", "hnsw", "ivfpq") else "auto"),
                    generation=_next_generation(directory / f"{space}.json"),
                )  # fmt: skip
                idx.save(directory)
                catalog.mark_clean(model, space)
                repaired.append(f"rebuilt the {space} index of {model} from {stored} stored vectors")
                entry.update(count=idx.ntotal, kind=idx.manifest.kind, generation=idx.manifest.generation)
        entry["not_embedded"] = catalog.count_unembedded(model, space)
        indexes.append(entry)
    for model in sorted({e["model"] for e in indexes}):
        _check_bm25(catalog, paths, model, repair, problems, repaired)
    stale = sorted(paths.indexes.glob("*/.*.tmp")) if paths.indexes.is_dir() else []
    if repair:  # left by a killed save: disk space only, never read
        for tmp in stale:
            tmp.unlink(missing_ok=True)
            repaired.append(f"removed the temp file {tmp.parent.name}/{tmp.name}")
    unembedded = catalog.count_unembedded(None, "image")
    ok = not problems or (repair and len(repaired) >= 1 and _recheck(catalog, paths))
    return {
        "ok": bool(ok),
        "problems": problems,
        "repaired": repaired,
        "indexes": indexes,
        "images_not_embedded": unembedded,
        "stale_files": [f"{t.parent.name}/{t.name}" for t in stale if t.exists()],
    }


def _check_bm25(catalog: Catalog, paths: Paths, model: str, repair: bool, problems: list[str],
                repaired: list[str]) -> None:  # fmt: skip
    """The BM25 index beside a model's vector indexes matches the catalog's texts (rebuilt from them)."""
    try:
        from .bm25 import BM25, build_bm25_index, catalog_docs
        from .bm25 import read_manifest as bm25_manifest
    except ImportError:  # a build without BM25
        return
    directory = paths.index_dir(model)
    broken = None
    try:
        man = bm25_manifest(directory)
        if not man:
            return  # never built: `medsearch index` builds it
        ids, _, fingerprint = catalog_docs(catalog)
        bm, _ = BM25.load(directory)
        if man.get("fingerprint") != fingerprint or len(bm) != len(ids):
            broken = f"the BM25 index of {model} holds {len(bm)} texts that do not match the catalog's {len(ids)}"
    except MedsearchError as e:
        broken = e.message
    if broken:
        problems.append(broken)
        if repair:
            out = build_bm25_index(catalog, directory, force=True)
            repaired.append(f"rebuilt the BM25 index of {model} from {out['count']} catalog texts")


def _store_of(directory, space: str) -> str:
    try:
        return read_manifest(directory / f"{space}.json").store
    except MedsearchError:
        return "faiss"


def _pairs(catalog: Catalog, paths: Paths) -> list[tuple[str, str]]:
    """Both spaces of every model with stored vectors or an index manifest on disk (its vectors may be gone)."""
    pairs = {(m, s) for m, s, _ in catalog.vector_models()}
    if paths.indexes.is_dir():
        for mpath in paths.indexes.glob("*/*.json"):
            if mpath.stem not in SPACES:
                continue
            try:
                model = read_manifest(mpath).model_id
            except MedsearchError:  # unreadable: the model is the one whose folder it is in
                model = next((m for m, _ in pairs if paths.index_dir(m) == mpath.parent), None)
            if model is not None and paths.index_dir(model) == mpath.parent:
                pairs.add((model, mpath.stem))
    return sorted({(m, space) for m, _ in pairs for space in SPACES})  # both spaces of every model


def _missing_ids(catalog: Catalog, model: str, space: str, ids: np.ndarray) -> int:
    """How many of ``ids`` have no stored vector (one id scan, no vector blobs read)."""
    return int((~np.isin(ids, catalog.vector_ids(model, space))).sum())


def _next_generation(mpath) -> int:
    try:
        return read_manifest(mpath).generation + 1
    except MedsearchError:
        return 1


def _recheck(catalog: Catalog, paths: Paths) -> bool:
    return not check_home(catalog, paths, repair=False)["problems"]
