"""Writing a Milvus store: sync a collection with the catalog's stored vectors, choose and tune
its index, purge erased ids, and check it (``medsearch check``). See ``milvus.py`` for the layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.catalog import Catalog
from medsearch.catalog.scalars import SCALAR_FIELDS, not_embedded, scalars
from medsearch.config import IndexConfig
from medsearch.errors import IndexInconsistent, MedsearchError

from .base import Manifest, manifest_path, now_iso, read_manifest, recall_summary, write_json_atomic
from .milvus import (
    BATCH,
    CONSISTENCY,
    FIELD_LEN,
    HNSW_EF,
    IVF_NPROBE,
    KINDS,
    TUNE_K,
    _add,
    _knob,
    _sums,
    build_params,
    checksum,
    choose_kind,
    collection_name,
    connect,
    count_rows,
    default_search_params,
    encode_field,
    engine_kinds,
    engine_tunes,
    home_of,
    is_server_uri,
    milvus_ids,
    resolve_uri,
    vector_hashes,
)


def _create(client: Any, coll: str, dim: int) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=int(dim))
    schema.add_field("vhash", DataType.INT64)
    schema.add_field("case_id", DataType.INT64)
    for f in SCALAR_FIELDS:
        schema.add_field(f, DataType.VARCHAR, max_length=FIELD_LEN)
    client.create_collection(coll, schema=schema, consistency_level=CONSISTENCY)


def _dim_of(client: Any, coll: str) -> int | None:
    for f in client.describe_collection(coll).get("fields", []):
        if f.get("name") == "vec":
            return int(f.get("params", {}).get("dim", 0))
    return None


def _rows(catalog: Catalog, space: str, ids: np.ndarray, vecs: np.ndarray, hashes: np.ndarray) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(ids), BATCH):
        sl = slice(start, start + BATCH)
        meta = scalars(catalog, space, ids[sl])
        rows = []
        for i, v, h in zip(ids[sl].tolist(), vecs[sl], hashes[sl].tolist(), strict=True):
            case_id, vals = meta.get(i, (-1, {}))
            rows.append({"id": i, "vec": v, "vhash": h, "case_id": int(case_id),
                         **{f: encode_field(vals.get(f)) for f in SCALAR_FIELDS}})  # fmt: skip
        yield rows


def _apply_diff(client: Any, coll: str, catalog: Catalog, model_id: str, space: str,
                skip: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Make the collection hold exactly the catalog's stored vectors (but ``skip``, inserted later by
    the caller); returns counts and the checksum sums over all stored vectors."""
    mids, mh = milvus_ids(client, coll)
    uniq, counts = np.unique(mids, return_counts=True)
    dup = uniq[counts > 1]  # a killed insert retried: delete every copy, insert once
    if len(dup):
        for start in range(0, len(dup), BATCH):
            client.delete(coll, ids=dup[start : start + BATCH].tolist())
        keep = ~np.isin(mids, dup)
        mids, mh = mids[keep], mh[keep]
    # Milvus 2.x (and Lite 2.x) dedups query results by primary key but counts every copy: more
    # rows than ids means hidden duplicates, which an upsert of every row removes (delete + insert)
    hidden = not len(dup) and count_rows(client, coll) > len(mids)
    seen = np.zeros(len(mids), bool)
    sums = (0, 0)
    n = added = updated = 0
    for ids, vecs in catalog.iter_vectors(model_id, space, block=16384):
        h = vector_hashes(vecs)
        sums = _add(sums, _sums(ids, h))
        n += len(ids)
        present = np.zeros(len(ids), bool)
        same = np.zeros(len(ids), bool)
        if len(mids):
            at = np.minimum(np.searchsorted(mids, ids), len(mids) - 1)
            present = mids[at] == ids
            seen[at[present]] = True
            same[present] = mh[at[present]] == h[present]
        new, changed = ~present, (present if hidden else present & ~same)
        if skip is not None and len(skip):
            new &= ~np.isin(ids, skip)
        if new.any():
            for rows in _rows(catalog, space, ids[new], vecs[new], h[new]):
                client.insert(coll, rows)
            added += int(new.sum())
        if changed.any():
            for rows in _rows(catalog, space, ids[changed], vecs[changed], h[changed]):
                client.upsert(coll, rows)
            updated += int(changed.sum())
    gone = mids[~seen]
    for start in range(0, len(gone), BATCH):
        client.delete(coll, ids=gone[start : start + BATCH].tolist())
    return {"n": n, "added": added + int(len(dup)), "updated": updated, "removed": int(len(gone)), "sums": sums}


def _ensure_index(client: Any, coll: str, kind: str, params: dict[str, Any]) -> bool:
    """Index ``vec`` with ``kind`` and load the collection; True when the index was (re)built."""
    want = KINDS[kind]
    if client.list_indexes(coll, field_name="vec"):
        if client.describe_index(coll, "vec").get("index_type") == want:
            client.load_collection(coll)
            return False
        client.release_collection(coll)
        client.drop_index(coll, "vec")
    ip = client.prepare_index_params()
    ip.add_index(field_name="vec", index_name="vec", index_type=want, metric_type="IP", params=params)
    try:
        client.create_index(coll, ip)
    except Exception as e:  # a build longer than gRPC's keepalive: pymilvus retries a call that succeeded
        if "already exists" not in str(e):
            raise
    client.load_collection(coll)
    return True


def _exact_topk(catalog: Catalog, model_id: str, space: str, xq: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """Exact top-k catalog ids of each query over the stored vectors but ``exclude``, streamed: (nq, k) int64."""
    best_s = np.full((len(xq), 0), -np.inf, np.float32)
    best_i = np.full((len(xq), 0), -1, np.int64)
    for ids, vecs in catalog.iter_vectors(model_id, space, block=16384):
        keep = ~np.isin(ids, exclude)
        ids, vecs = ids[keep], vecs[keep]
        s = np.concatenate([best_s, xq @ vecs.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(xq), len(ids)))], axis=1)
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
        best_s, best_i = s, i
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def holdout_ids(catalog: Catalog, model_id: str, space: str, n: int, kind: str, config: IndexConfig) -> np.ndarray:
    """Every stride-th stored id, up to ``tune_queries`` of them: kept out of the collection until
    the index is built and tuned on them (new points for it, like real queries)."""
    nq = min(config.tune_queries, n // 10)
    if _knob(kind) is None or not config.tune or nq < 10:
        return np.zeros(0, np.int64)
    stride = max(1, n // nq)
    out, seen = [], 0
    for ids, _ in catalog.iter_vectors(model_id, space, block=16384):
        out.append(ids[(np.arange(seen, seen + len(ids)) % stride) == stride // 2])
        seen += len(ids)
    return np.concatenate(out)[:nq] if out else np.zeros(0, np.int64)


def _recall(client: Any, coll: str, xq: np.ndarray, truth: list[set[int]], k: int, params: dict[str, Any]) -> float:
    res = client.search(coll, data=xq, limit=k, anns_field="vec", output_fields=[],
                        search_params={"metric_type": "IP", "params": params}, consistency_level=CONSISTENCY)  # fmt: skip
    return float(np.mean([len(t & {int(h["id"]) for h in hits}) / max(1, len(t)) for t, hits in zip(truth, res, strict=True)]))


def tune(client: Any, coll: str, kind: str, catalog: Catalog, model_id: str, space: str, config: IndexConfig,
         n: int, held: np.ndarray, *, k: int = TUNE_K, tunes: bool = True) -> dict[str, Any]:  # fmt: skip
    """Smallest ef / nprobe whose recall@k on the held-out stored vectors (not in the collection
    yet) reaches the target, against their exact top-k over the vectors that are. An engine that
    ignores the knob (``tunes`` False: Milvus Lite 2.x) is measured once, as it searches."""
    knob = _knob(kind)
    if knob is None or len(held) == 0:
        return {"search_params": default_search_params(kind, config) if tunes else {}}
    got = catalog.get_vectors(model_id, space, held.tolist())
    xq = np.ascontiguousarray(np.stack([got[int(i)] for i in held]), dtype=np.float32)
    truth = [set(r.tolist()) for r in _exact_topk(catalog, model_id, space, xq, k, held)]
    target = min(1.0, config.target_recall + config.tune_margin)
    if not tunes:
        recall = _recall(client, coll, xq, truth, k, {})
        return {"search_params": {}, "search_knob": "engine", "tuned_recall_at_10": round(recall, 4),
                "target_recall": config.target_recall, "target_met": bool(recall >= config.target_recall),
                "tune_queries": int(len(held)), "tuned_at_count": int(n)}  # fmt: skip
    if knob == "ef":
        candidates = [c for c in HNSW_EF if c >= k]
    else:
        nlist = int(build_params(kind, n, xq.shape[1], config)["nlist"])
        candidates = sorted({min(p, nlist) for p in IVF_NPROBE})
    best, recall = candidates[-1], 0.0
    for value in candidates:
        recall = _recall(client, coll, xq, truth, k, {knob: value})
        if recall >= target:
            best = value
            break
    return {"search_params": {knob: best}, "tuned_recall_at_10": round(recall, 4), "target_recall": config.target_recall,
            "target_met": bool(recall >= config.target_recall), "tune_queries": int(len(held)), "tuned_at_count": int(n)}  # fmt: skip


_TUNED = ("search_params", "search_knob", "tuned_recall_at_10", "target_recall", "target_met", "tune_queries",
          "tuned_at_count")


def sync_store(
    catalog: Catalog, directory: Path, *, model_id: str, weights_hash: str, space: str, dim: int,
    config: IndexConfig = IndexConfig(), uri: str | None = None, token: str | None = None, force: bool = False,
    dirty: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Bring the (model, space) collection in line with the catalog's stored vectors, then write the manifest.

    ``uri`` None keeps the server the manifest records (default: HOME/milvus.db). Only differences
    are written, unless ``force``, another dim, another index kind (the collection crossed
    ``flat_max``, or ``config.kind`` changed) or a collection that more than doubled since its
    index was tuned: those rebuild the collection, holding tuning queries out until the index is
    built. ``dirty`` False (the catalog's marker says nothing changed) with a matching manifest
    returns at once.
    """
    directory = Path(directory)
    mpath = manifest_path(directory, space)
    prev = None
    if mpath.exists():
        try:
            prev = read_manifest(mpath)
        except MedsearchError:
            prev = None
    generation = prev.generation + 1 if prev else 1
    if prev is not None and prev.store != "milvus":
        prev = None
    if uri is None and prev is not None:
        uri = prev.params.get("uri")
    client = connect(resolve_uri(home_of(directory), uri), token)
    coll = collection_name(model_id, space, catalog.salt)
    count = catalog.count_vectors(model_id, space)
    tunes = engine_tunes(uri)
    kind = choose_kind(count, config, engine_kinds(uri), tunes)
    exists = client.has_collection(coll)
    if (not force and not dirty and prev is not None and exists and prev.params.get("collection") == coll
            and prev.params.get("uri") == uri and prev.weights_hash == weights_hash and prev.count == count
            and prev.kind == kind):
        return {"count": prev.count, "kind": f"milvus {prev.kind}", "generation": prev.generation, "rebuilt": False,
                "added": 0, "store": "milvus"}  # fmt: skip
    if exists and not force:
        indexed = client.describe_index(coll, "vec").get("index_type") if client.list_indexes(coll, field_name="vec") else None
        tuned_at = int((prev.params.get("tuned_at_count") or 0) if prev else 0)
        untuned = prev is None or prev.kind != kind or "search_params" not in prev.params  # e.g. a killed first build
        force = (_dim_of(client, coll) != dim or (indexed is not None and indexed != KINDS[kind])
                 or (kind != "flat" and (untuned or count > 2 * tuned_at)))  # fmt: skip
    if exists and force:
        client.drop_collection(coll)
        exists = False
    fresh = not exists
    if fresh:
        lite = resolve_uri(home_of(directory), uri)
        orphan = None if is_server_uri(lite) else Path(lite) / "collections" / coll
        if orphan is not None and orphan.is_dir():  # Milvus Lite killed inside create_collection: its folder
            import shutil  # exists but the collection was never registered, and every create would fail

            shutil.rmtree(orphan)
        _create(client, coll, dim)
    held = holdout_ids(catalog, model_id, space, count, kind, config) if fresh else np.zeros(0, np.int64)
    diff = _apply_diff(client, coll, catalog, model_id, space, skip=held)
    client.flush(coll)
    bparams = build_params(kind, diff["n"], dim, config)
    _ensure_index(client, coll, kind, bparams)
    params: dict[str, Any] = {"uri": uri, "collection": coll, "index_type": KINDS[kind], "build_params": bparams}
    if fresh or prev is None or "search_params" not in prev.params:
        params.update(tune(client, coll, kind, catalog, model_id, space, config, diff["n"], held, tunes=tunes))
    else:
        params.update({k: v for k, v in prev.params.items() if k in _TUNED})
    if len(held):
        got = catalog.get_vectors(model_id, space, held.tolist())
        vecs = np.stack([got[int(i)] for i in held])
        for rows in _rows(catalog, space, held, vecs, vector_hashes(vecs)):
            client.insert(coll, rows)
        client.flush(coll)
    n = count_rows(client, coll)
    if n != diff["n"]:
        raise IndexInconsistent(f"the Milvus collection {coll} holds {n} vectors after a sync, the catalog stores {diff['n']}",
                                hint="run `medsearch index` again (another writer may be running)")  # fmt: skip
    params.update(id_sum=diff["sums"][0], vec_sum=diff["sums"][1])
    man = Manifest(model_id=model_id, weights_hash=weights_hash, space=space, dim=dim, metric="ip", count=n, kind=kind,
                   params=params, generation=generation, checksum=checksum(n, diff["sums"]), built_at=now_iso(),
                   store="milvus")  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mpath, asdict(man))
    from .faiss import delete_files

    delete_files(directory, space, manifest=False)  # a FAISS index of the store this one replaced
    return {"count": n, "kind": f"milvus {kind}", "generation": generation, "rebuilt": fresh,
            "added": diff["added"] + diff["updated"] + int(len(held)), "removed": diff["removed"], "store": "milvus",
            **recall_summary(man.params)}  # fmt: skip


def index_space(
    catalog: Catalog, directory: Path, *, model_id: str, weights_hash: str, space: str, dim: int,
    config: IndexConfig = IndexConfig(), force: bool = False,
) -> dict[str, Any] | None:  # fmt: skip
    """The ``medsearch index`` step for one space on Milvus (URI and token as the catalog records
    them); None when nothing is stored and nothing was built. Clears the space's dirty marker."""
    if catalog.count_vectors(model_id, space) == 0 and not manifest_path(directory, space).exists():
        return None
    marker = f"dirty:{model_id}:{space}"
    out = sync_store(catalog, directory, model_id=model_id, weights_hash=weights_hash, space=space, dim=dim,
                     config=config, uri=catalog.get_meta("milvus_uri") or None, token=catalog.get_meta("milvus_token"),
                     force=force, dirty=catalog.get_meta(marker) != "0")  # fmt: skip
    with catalog.atomic():
        catalog.set_meta(marker, "0")
    return out


# ---------------------------------------------------------------------------- erasure
def removal_terms(catalog: Catalog, manifest: Manifest, ids: list[int]) -> dict[str, Any]:
    """Before an erasure deletes catalog rows: the manifest's checksum sums and count now, and
    the terms of the stored vectors of ``ids`` (what the checksum loses with them)."""
    vecs = catalog.get_vectors(manifest.model_id, manifest.space, ids)
    got = np.array(sorted(vecs), dtype=np.int64)
    terms = _sums(got, vector_hashes(np.stack([vecs[i] for i in got.tolist()]))) if len(got) else (0, 0)
    p = manifest.params
    return {"before": [int(p.get("id_sum", 0)), int(p.get("vec_sum", 0))], "generation": manifest.generation,
            "minus": [int(terms[0]), int(terms[1])], "n": int(len(got))}  # fmt: skip


def purge(catalog: Catalog, directory: Path, space: str, ids: list[int], terms: dict[str, Any] | None) -> int:
    """Delete ``ids`` from the collection and write the manifest's new count and checksum.

    Idempotent: the checksum comes from the sums recorded before the erasure (``terms``), so a
    rerun after a kill writes the same manifest. Without terms the sums are recomputed from the
    catalog (a full read). Returns how many ids the collection lost.
    """
    man = read_manifest(manifest_path(directory, space))
    client = connect(resolve_uri(home_of(directory), man.params.get("uri")), catalog.get_meta("milvus_token"))
    coll = str(man.params["collection"])
    if not client.has_collection(coll):
        return 0
    before = count_rows(client, coll)
    arr = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)
    for start in range(0, len(arr), BATCH):
        client.delete(coll, ids=arr[start : start + BATCH].tolist())
    client.flush(coll)
    n = count_rows(client, coll)
    if terms is not None and terms.get("generation") == man.generation:
        sums = _add(tuple(terms["before"]), tuple(terms["minus"]), -1)  # type: ignore[arg-type]
        generation = man.generation + 1
    elif terms is not None and terms.get("generation") == man.generation - 1:
        return before - n  # a rerun after the manifest was written: nothing left to record
    else:
        sums = (0, 0)
        for b_ids, vecs in catalog.iter_vectors(man.model_id, space, block=16384):
            sums = _add(sums, _sums(b_ids, vector_hashes(vecs)))
        generation = man.generation + 1
    params = {**man.params, "id_sum": sums[0], "vec_sum": sums[1]}
    new = Manifest(**{**asdict(man), "count": n, "params": params, "checksum": checksum(n, sums),
                      "generation": generation, "built_at": now_iso()})  # fmt: skip
    write_json_atomic(manifest_path(directory, space), asdict(new))
    return before - n


# ---------------------------------------------------------------------------- consistency
def check_store(catalog: Catalog, directory: Path, space: str, entry: dict[str, Any], problems: list[str],
                repaired: list[str], *, repair: bool = False) -> dict[str, Any]:  # fmt: skip
    """Counts, the (id, vector hash) checksum and the manifest of a Milvus store against the catalog.

    With ``repair`` a broken store is synced from the catalog (only the differences are written).
    Fills and returns ``entry`` (the consistency report's row for this index).
    """
    model, stored = entry["model"], int(entry["stored_vectors"])
    token = catalog.get_meta("milvus_token")
    broken = None
    man = None
    try:
        man = read_manifest(manifest_path(directory, space))
        client = connect(resolve_uri(home_of(directory), man.params.get("uri")), token)
        coll = str(man.params.get("collection", ""))
        exists = client.has_collection(coll)
        if exists:  # a collection is released when Milvus (Lite) starts: queries need it loaded
            client.load_collection(coll)
        n = count_rows(client, coll) if exists else 0
        entry.update(count=n, kind=f"milvus {man.kind}", generation=man.generation, store="milvus")
        if not exists:
            broken = f"the Milvus collection {coll} of the {space} index of {model} is missing"
        elif n != stored or man.count != stored:
            broken = f"the Milvus {space} index of {model} holds {n} vectors (manifest: {man.count}), the catalog stores {stored}"
        else:
            mids, mh = milvus_ids(client, coll)
            sums = (0, 0)
            for ids, vecs in catalog.iter_vectors(model, space, block=16384):
                sums = _add(sums, _sums(ids, vector_hashes(vecs)))
            if len(np.unique(mids)) != len(mids):
                broken = f"the Milvus {space} index of {model} holds duplicate ids"
            elif checksum(len(mids), _sums(mids, mh)) != checksum(stored, sums):
                broken = f"ids or vectors of the Milvus {space} index of {model} differ from the catalog's stored vectors"
            elif man.checksum != checksum(stored, sums):
                broken = f"the manifest of the Milvus {space} index of {model} has a stale checksum"
    except MedsearchError as e:
        broken = e.message
    except Exception as e:  # noqa: BLE001 - a Milvus error is a finding of the check, not a crash
        broken = f"the Milvus {space} index of {model} cannot be read: {str(e)[:200]}"
    if broken:
        problems.append(broken)
        if repair:
            weights = catalog.get_meta(f"weights:{model}") or (man.weights_hash if man else "")
            dim = man.dim if man else int(entry.get("dim", 0))
            out = sync_store(catalog, directory, model_id=model, weights_hash=weights, space=space, dim=dim,
                             config=IndexConfig(kind=man.kind if man and man.kind in KINDS else "auto"),
                             uri=man.params.get("uri") if man else None, token=token)  # fmt: skip
            with catalog.atomic():
                catalog.set_meta(f"dirty:{model}:{space}", "0")
            repaired.append(f"synced the Milvus {space} index of {model} with {stored} stored vectors "
                            f"(+{out['added']}, -{out.get('removed', 0)})")  # fmt: skip
            entry.update(count=out["count"], kind=out["kind"], generation=out["generation"])
    entry["not_embedded"] = not_embedded(catalog, model, space)
    return entry
