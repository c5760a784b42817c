"""Vector stores side by side: FAISS flat / ivfpq and Milvus Lite (each index type), same vectors.

    .venv/bin/python benchmarks/store_bench.py --n 100000 --dim 256 --work /tmp/store-bench

A real catalog (cases of 10 images, one patient per 2 cases, 1% of images of modality "PET" for
the selective filter) with ``benchmarks/synth.py`` clustered vectors stored in it; every store
is built through the product path (``VectorIndex.from_blocks`` / ``build_indexes`` for FAISS,
``medsearch.stores.milvus_sync.sync_store`` for Milvus: insert, index, recall tuning on held-out
vectors). Queries are fresh draws from the same distribution. Recall@10 is against exact top-10
(over the filtered subset for the filtered rows). Per store: build seconds, single-query latency
p50/p95 (one query per call, after warm-up), batched queries/s (``--batch`` per call), recall@10,
unfiltered and with the 1% filter. FAISS's filter is the catalog's id list (its lookup time is
reported apart); Milvus's is a boolean expression evaluated inside Milvus. Then ``remove`` of
one patient (``medsearch.erasure.remove``) on the Milvus home and on a FAISS flat home.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
from common import load_avg  # noqa: E402
from synth import Synth  # noqa: E402

PER_CASE = 10
SIMILAR_FETCH = 88  # what `medsearch similar -k 10` asks the store for: (k + 1) * oversample 8
CHUNK = 500  # cases per catalog transaction
FILTER = {"modality": "pet"}


def make_home(home: Path, n: int, dim: int, seed: int) -> None:
    """Catalog rows + stored vectors for ``n`` images (reused when the home already holds them)."""
    from medsearch.catalog import Catalog
    from medsearch.records import CaseRecord, ImageRecord

    cat = Catalog.open(home / "catalog.db")
    done = f"{n}:{dim}:{seed}"
    if cat.get_meta("bench_home") == done or cat.count_vectors("bench", "image") == n:  # (later runs erased patients)
        cat.close()
        return
    synth = Synth(dim, seed=seed)
    ids: list[int] = []
    t0 = time.perf_counter()
    cases = n // PER_CASE
    for start in range(0, cases, CHUNK):  # one transaction per chunk of cases (a commit per row: hours at 1M)
        with cat.atomic():
            for c in range(start, min(cases, start + CHUNK)):
                cid, _ = cat.upsert_case(CaseRecord(source="bench", key=f"case{c:07d}", split="train",
                                                    patient_key=f"pt{c // 2:07d}"))  # fmt: skip
                for j in range(PER_CASE):
                    g = c * PER_CASE + j
                    iid, _ = cat.upsert_image(
                        ImageRecord(source="bench", key=f"img{g:08d}", case_key=f"case{c:07d}", path=f"/archive/{g}.dcm",
                                    modality_type="PET" if g % 100 == 7 else ("CT", "MR", "XR")[g % 3],
                                    body_region=("Head", "Thorax", "Abdomen")[c % 3], split="train"),
                        cid, sha256=f"{g}", nbytes=1, width=512, height=512,
                    )  # fmt: skip
                    ids.append(iid)
    arr = np.array(ids, dtype=np.int64)
    for (_, x), s in zip(synth.blocks(n, 16384), range(0, n, 16384), strict=True):
        cat.put_vectors("bench", "image", arr[s : s + len(x)].tolist(), x)
    with cat.atomic():
        cat.set_meta("bench_home", done)
    print(f"catalog: {n} images in {time.perf_counter() - t0:.0f} s", flush=True)
    cat.close()


def a_patient(cat, paths, start: int) -> str:
    """The first patient key from ``start`` on that is still in the catalog (earlier runs erased some)."""
    from medsearch.erasure import remove
    from medsearch.errors import NotFound

    for i in range(start, start + 1000):
        try:
            remove(cat, paths, patient=f"pt{i:07d}", dry_run=True)
            return f"pt{i:07d}"
        except NotFound:
            continue
    raise SystemExit("no patient left to erase")


def pct(a, q) -> float:
    return float(np.percentile(np.asarray(a) * 1e3, q))


def single(search, xq1, k) -> list[float]:
    """Seconds per call, one query per call, after two warm-up calls."""
    search(xq1[:1], k)
    search(xq1[1:2], k)
    lat = []
    for i in range(len(xq1)):
        t = time.perf_counter()
        search(xq1[i : i + 1], k)
        lat.append(time.perf_counter() - t)
    return lat


def measure(search, xq1, xqb, batch, truth, k=10):
    lat = single(search, xq1, k)
    lat_similar = single(search, xq1, SIMILAR_FETCH)
    t = time.perf_counter()
    parts = [search(xqb[s : s + batch], k)[1] for s in range(0, len(xqb), batch)]
    qps = len(xqb) / (time.perf_counter() - t)
    I = np.concatenate(parts)
    recall = float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, len(b[b >= 0])) for a, b in zip(I, truth, strict=True)]))
    return {"p50_ms": round(pct(lat, 50), 2), "p95_ms": round(pct(lat, 95), 2), "batch_qps": round(qps, 1),
            "recall_at_10": round(recall, 4), "similar_p50_ms": round(pct(lat_similar, 50), 2),
            "similar_p95_ms": round(pct(lat_similar, 95), 2), "load_avg": load_avg()}  # fmt: skip


class StoredOnly:
    """BENCHMARK-ONLY encoder identity for the ``Searcher``: the bench home's model ("bench", weights
    "w") has no weights; every query is a catalog image, answered from its stored vector as
    ``medsearch similar IMAGE_ID`` does, so nothing is ever encoded."""

    model_id = "bench"
    weights_hash = "w"
    shared_space = False
    device = "cpu"

    def __init__(self, dim: int) -> None:
        self.image_dim = self.text_dim = dim

    def encode_image_batch(self, batch):
        raise RuntimeError("the store benchmark only queries catalog images (stored vectors)")

    preprocess = encode_texts = encode_image_batch


def similar_truth(xq, xb, ids, case_of, k=10, fetch=SIMILAR_FETCH, mask=None) -> list[set[int]]:
    """What ``Searcher.similar(k)`` returns over an exact store: of the exact top-``fetch`` image ids,
    the first of each case, ``k`` of them."""
    out = []
    for row in exact(xq, xb, ids, fetch, mask):
        seen: set[int] = set()
        hits: set[int] = set()
        for i in row.tolist():
            if i >= 0 and case_of[i] not in seen:
                seen.add(case_of[i])
                hits.add(i)
                if len(hits) == k:
                    break
        out.append(hits)
    return out


def measure_similar(searcher, query_ids, filters, truth, search, xq1) -> dict:
    """``Searcher.similar`` (the path of ``medsearch similar IMAGE_ID -k 10``) per query: p50/p95 ms
    after two warm-up calls, and recall@10 of its hits against ``similar_truth``. Each call is paired
    with a bare store call for the same fetch (``search(xq1[i], SIMILAR_FETCH)``), so that the two
    are compared within the same seconds of a shared host's load."""
    searcher.similar(int(query_ids[0]), k=10, filters=filters)
    searcher.similar(int(query_ids[1]), k=10, filters=filters)
    lat, bare, recall = [], [], []
    for i, (qid, t) in enumerate(zip(query_ids.tolist(), truth, strict=True)):
        t0 = time.perf_counter()
        search(xq1[i % len(xq1)][None], SIMILAR_FETCH)
        t1 = time.perf_counter()
        hits = searcher.similar(int(qid), k=10, filters=filters)
        lat.append(time.perf_counter() - t1)
        bare.append(t1 - t0)
        recall.append(len({h.image_id for h in hits} & t) / max(1, len(t)))
    return {"searcher_p50_ms": round(pct(lat, 50), 2), "searcher_p95_ms": round(pct(lat, 95), 2),
            "paired_store_p50_ms": round(pct(bare, 50), 2), "paired_store_p95_ms": round(pct(bare, 95), 2),
            "searcher_recall_at_10": round(float(np.mean(recall)), 4), "searcher_load_avg": load_avg()}  # fmt: skip


def exact(xq, xb, ids, k=10, mask=None):
    import faiss

    if mask is not None:
        xb, ids = xb[mask], ids[mask]
    _, P = faiss.knn(np.ascontiguousarray(xq), np.ascontiguousarray(xb), k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids[P]


def equal_to_rebuild(cat, directory: Path, dim: int, xq: np.ndarray) -> dict:
    """Search answers of the index a ``remove`` left vs an index rebuilt from the catalog's vectors."""
    from medsearch.config import IndexConfig
    from medsearch.stores.faiss import VectorIndex

    t = time.perf_counter()
    left = VectorIndex.load(directory, "image")
    load_s = time.perf_counter() - t
    rebuilt = VectorIndex.from_blocks(functools.partial(cat.iter_vectors, "bench", "image"), model_id="bench",
                                      weights_hash="w", space="image", dim=dim, count=cat.count_vectors("bench", "image"),
                                      config=IndexConfig(kind="flat"))  # fmt: skip
    out = {"index_load_s": round(load_s, 2), "ntotal": left.ntotal, "rebuilt_ntotal": rebuilt.ntotal}
    for k in (10, SIMILAR_FETCH):
        D, I = left.search(xq, k)
        D0, I0 = rebuilt.search(xq, k)
        out[f"same_ids_at_{k}"] = float(np.mean(I == I0))
        out[f"max_score_diff_at_{k}"] = float(np.abs(D - D0).max())
    return out


class StoredVectorsOnly:
    """The bench home's model: queries are catalog images (their stored vectors, as `medsearch
    similar ID` uses), so nothing is ever encoded; the Searcher only reads the weights hash."""

    model_id, weights_hash = "bench", "w"


def searcher_filtered(home: Path, cat, n: int) -> dict:
    """`similar` through the Searcher (the path every shell takes) at 1M: with the 1% filter the
    catalog's id lookup + the FAISS subset search, unfiltered the full flat scan; p50/p95 ms."""
    from medsearch.search import Filters, Searcher

    s = Searcher(home, model="bench", encoder=StoredVectorsOnly(), catalog=cat)
    t = time.perf_counter()
    s.index("image")
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    qids = [int(i) for i in rng.choice(cat.vector_ids("bench", "image"), size=n + 2, replace=False)]
    f = Filters(**FILTER)
    out = {"searcher_index_load_s": round(load_s, 2)}
    lookup = []
    for _ in range(7):
        t = time.perf_counter()
        cat.image_ids_where(f.as_dict())
        lookup.append(time.perf_counter() - t)
    out["filter_lookup_p50_ms"] = round(pct(lookup, 50), 1)
    for name, filters in (("filtered", f), ("unfiltered", Filters())):
        s.similar(qids[0], k=10, filters=filters)  # warm-up
        lat = []
        for q in qids[2 : 2 + (n if name == "filtered" else max(5, n // 5))]:
            t = time.perf_counter()
            hits = s.similar(q, k=10, filters=filters)
            lat.append(time.perf_counter() - t)
            assert name == "unfiltered" or all((h.modality_type or "").lower() == "pet" for h in hits), hits[:1]
        out[f"searcher_similar_{name}_p50_ms"] = round(pct(lat, 50), 1)
        out[f"searcher_similar_{name}_p95_ms"] = round(pct(lat, 95), 1)
    out["searcher_load_avg"] = load_avg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--faiss-kinds", default="flat,ivfpq")
    ap.add_argument("--milvus-kinds", default="flat,hnsw,ivf_flat,ivf_sq8")
    ap.add_argument("--work", type=Path, default=Path("/tmp/store-bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--milvus-uri", default=None, help="Milvus Lite file or server URI (default: HOME/milvus.db)")
    ap.add_argument("--no-remove", action="store_true", help="skip the `remove` of one patient (and what follows it: "
                    "the search answers after it vs a rebuilt index, the filtered `similar` through the Searcher)")
    args = ap.parse_args()

    from medsearch.catalog import Catalog
    from medsearch.catalog.scalars import scalars
    from medsearch.config import IndexConfig, Paths
    from medsearch.erasure import remove
    from medsearch.search import Filters, Searcher
    from medsearch.stores.faiss import VectorIndex
    from medsearch.stores.milvus import MilvusStore, close_clients, is_server_uri
    from medsearch.stores.milvus_sync import sync_store

    home = args.work / f"home-{args.n}-{args.dim}"
    home.mkdir(parents=True, exist_ok=True)
    make_home(home, args.n, args.dim, args.seed)
    cat = Catalog.open(home / "catalog.db")
    paths = Paths(home)
    synth = Synth(args.dim, seed=args.seed)
    xq = synth.queries(args.queries * 2)
    xq1, xqb = xq[: args.queries], xq[args.queries :]
    ids_l, vec_l = zip(*cat.iter_vectors("bench", "image"), strict=True)
    ids, xb = np.concatenate(ids_l), np.concatenate(vec_l)
    t = time.perf_counter()
    allowed = cat.image_ids_where(FILTER)
    lookup_ms = (time.perf_counter() - t) * 1e3
    mask = np.isin(ids, allowed)
    truth = {False: exact(xqb, xb, ids), True: exact(xqb, xb, ids, mask=mask)}
    rows: list[dict] = []
    blocks = functools.partial(cat.iter_vectors, "bench", "image")
    # `similar` through the Searcher: catalog images as queries (their stored vectors), the exact answer per case
    query_ids = np.random.default_rng(args.seed + 1).choice(ids, size=args.queries, replace=False)
    case_of: dict[int, int] = {}
    for s in range(0, len(ids), 4096):
        case_of.update((i, c) for i, (c, _) in scalars(cat, "image", ids[s : s + 4096]).items())
    xs = xb[np.searchsorted(ids, query_ids)]
    similar_truths = {False: similar_truth(xs, xb, ids, case_of), True: similar_truth(xs, xb, ids, case_of, mask=mask)}

    def record(store, kind, build_s, search_plain, search_filtered, extra=None, searcher=None):
        for filtered, fn in ((False, search_plain), (True, search_filtered)):
            r = {"store": store, "kind": kind, "filter": "1%" if filtered else "none", "build_s": round(build_s, 1),
                 **measure(fn, xq1, xqb, args.batch, truth[filtered]), **(extra or {})}  # fmt: skip
            if searcher is not None:
                r.update(measure_similar(searcher, query_ids, Filters(**FILTER) if filtered else Filters(),
                                         similar_truths[filtered], fn, xq1))  # fmt: skip
            rows.append(r)
            print(json.dumps(r), flush=True)

    for kind in [k for k in args.faiss_kinds.split(",") if k]:
        t = time.perf_counter()
        idx = VectorIndex.from_blocks(blocks, model_id="bench", weights_hash="w", space="image", dim=args.dim,
                                      count=len(ids), config=IndexConfig(kind=kind))  # fmt: skip
        build_s = time.perf_counter() - t
        idx.save(paths.index_dir("bench"))  # the Searcher opens it from the home (filter: the catalog's id lookup)
        searcher = Searcher(home, model="bench", encoder=StoredOnly(args.dim), catalog=cat)
        record("faiss", kind, build_s, idx.search, lambda q, k, idx=idx: idx.search(q, k, allowed=allowed),
               {"tuned": idx.manifest.params.get("tuned_recall_at_10")}, searcher=searcher)
        del idx, searcher

    directory = paths.index_dir("bench")
    last = None
    engine = "milvus" if args.milvus_uri and is_server_uri(args.milvus_uri) else f"milvus-lite {version('milvus-lite')}"
    for kind in [k for k in args.milvus_kinds.split(",") if k]:
        t = time.perf_counter()
        sync_store(cat, directory, model_id="bench", weights_hash="w", space="image", dim=args.dim,
                   config=IndexConfig(kind=kind), uri=args.milvus_uri)  # fmt: skip
        build = time.perf_counter() - t
        last = store = MilvusStore.load(directory, "image")
        p = store.manifest.params
        searcher = Searcher(home, model="bench", encoder=StoredOnly(args.dim), catalog=cat)  # the store from the manifest
        record(engine, kind, build, store.search, lambda q, k, s=store: s.search(q, k, filters=FILTER),
               {"tuned": p.get("tuned_recall_at_10"), "knob": p.get("search_params")}, searcher=searcher)
    if last is not None:
        with cat.atomic():
            cat.set_meta("store", "milvus")
    rm: dict[str, float] = {}
    out: dict = {}
    faiss_remove: dict = {}
    if not args.no_remove and last is not None:
        pt = a_patient(cat, paths, 123)
        t = time.perf_counter()
        out = remove(cat, paths, patient=pt)
        rm[engine] = round(time.perf_counter() - t, 2)
        print(f"remove one patient on {engine} {last.manifest.kind}: {rm[engine]:.2f} s {out} (load {load_avg()})", flush=True)
    close_clients()
    if not args.no_remove:
        from indexer.embed import build_indexes
        from medsearch.stores.faiss import saved_files

        t = time.perf_counter()
        build_indexes(cat, paths, model_id="bench", weights_hash="w", dims={"image": args.dim},
                      config=IndexConfig(kind="flat"), store="faiss")  # fmt: skip
        faiss_remove["index_s"] = round(time.perf_counter() - t, 1)
        before = saved_files(directory, "image")
        pt = a_patient(cat, paths, 456)
        t = time.perf_counter()
        out2 = remove(cat, paths, patient=pt)
        rm["faiss-flat"] = round(time.perf_counter() - t, 2)
        after = saved_files(directory, "image")
        faiss_remove.update(files=len(after), files_rewritten=len(set(before) - set(after)), load_avg=load_avg())
        print(f"remove one patient on FAISS flat: {rm['faiss-flat']:.2f} s {out2} (load {load_avg()}; "
              f"{faiss_remove['files_rewritten']} of {len(before)} index files rewritten)", flush=True)
        faiss_remove.update(equal_to_rebuild(cat, directory, args.dim, xqb))
        faiss_remove.update(searcher_filtered(home, cat, args.queries))
        print(json.dumps({"faiss_remove": faiss_remove}), flush=True)
    result = {"n": args.n, "dim": args.dim, "queries": args.queries, "batch": args.batch,
              "filter_fraction": round(float(mask.mean()), 4), "catalog_filter_lookup_ms": round(lookup_ms, 1),
              "rows": rows, "remove_patient_s": rm, "images_removed": out.get("images"), "load_avg": load_avg(),
              "cpus": os.cpu_count(), "milvus": engine, "stored_vectors": int(len(ids)),
              "faiss_remove": faiss_remove}  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    cat.close()
    if os.environ.get("STORE_BENCH_KEEP") != "1":
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
