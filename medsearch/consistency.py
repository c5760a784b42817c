"""Consistency of a home: catalog rows, stored vectors, FAISS files and manifests agree.

``check_home(..., repair=True)`` fixes what can be fixed without re-embedding: orphan vectors
(rows deleted) are dropped, and every index that disagrees is rebuilt from stored vectors.
"""

from __future__ import annotations

from typing import Any

from .catalog import Catalog
from .config import IndexConfig, Paths
from .errors import MedsearchError
from .vectors import VectorIndex, read_manifest

_TABLE = {"image": "images", "text": "texts"}


def check_home(catalog: Catalog, paths: Paths, *, repair: bool = False) -> dict[str, Any]:
    """Return {'ok', 'problems', 'repaired', 'indexes'}; with ``repair`` rebuild what is broken."""
    problems: list[str] = []
    repaired: list[str] = []
    indexes: list[dict[str, Any]] = []
    for model, space, _n in catalog.vector_models():
        table = _TABLE.get(space)
        if table is None:
            problems.append(f"vectors of unknown space {space!r} for {model}")
            continue
        orphans = catalog.db.execute(
            f"SELECT count(*) FROM vectors v WHERE v.model = ? AND v.space = ? AND NOT EXISTS "
            f"(SELECT 1 FROM {table} t WHERE t.id = v.item_id)",
            [model, space],
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} {space} vectors of {model} point to rows that no longer exist")
            if repair:
                with catalog.atomic():
                    catalog.db.execute(
                        f"DELETE FROM vectors WHERE model = ? AND space = ? AND NOT EXISTS "
                        f"(SELECT 1 FROM {table} t WHERE t.id = vectors.item_id)",
                        [model, space],
                    )
                repaired.append(f"dropped {orphans} orphan {space} vectors of {model}")
        stored = catalog.count_vectors(model, space)
        directory = paths.index_dir(model)
        entry: dict[str, Any] = {"model": model, "space": space, "stored_vectors": stored}
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
        except MedsearchError as e:
            broken = e.message
        if broken:
            problems.append(broken)
            if repair and stored:
                weights = catalog.get_meta(f"weights:{model}") or ""
                try:
                    weights = read_manifest(directory / f"{space}.json").weights_hash or weights
                except MedsearchError:
                    pass
                dim = catalog.db.execute(
                    "SELECT dim FROM vectors WHERE model = ? AND space = ? LIMIT 1", [model, space]
                ).fetchone()[0]
                idx = VectorIndex.from_blocks(
                    catalog.iter_vectors(model, space), model_id=model, weights_hash=weights, space=space,
                    dim=dim, count=stored, config=IndexConfig(),
                    generation=_next_generation(directory / f"{space}.json"),
                )  # fmt: skip
                idx.save(directory)
                repaired.append(f"rebuilt the {space} index of {model} from {stored} stored vectors")
                entry.update(count=idx.ntotal, kind=idx.manifest.kind, generation=idx.manifest.generation)
        indexes.append(entry)
    unembedded = catalog.db.execute(
        "SELECT count(*) FROM images i WHERE i.status = 'ok' AND NOT EXISTS "
        "(SELECT 1 FROM vectors v WHERE v.space = 'image' AND v.item_id = i.id)"
    ).fetchone()[0]
    ok = not problems or (repair and len(repaired) >= 1 and _recheck(catalog, paths))
    return {
        "ok": bool(ok),
        "problems": problems,
        "repaired": repaired,
        "indexes": indexes,
        "images_not_embedded": unembedded,
    }


def _missing_ids(catalog: Catalog, model: str, space: str, ids) -> int:
    have = set()
    for block_ids, _ in catalog.iter_vectors(model, space):
        have.update(block_ids.tolist())
    return sum(1 for i in ids.tolist() if i not in have)


def _next_generation(mpath) -> int:
    try:
        return read_manifest(mpath).generation + 1
    except MedsearchError:
        return 1


def _recheck(catalog: Catalog, paths: Paths) -> bool:
    return not check_home(catalog, paths, repair=False)["problems"]
