"""Search benchmark: exact flat vs the automatically chosen ANN index (and HNSW), same run.

    .venv/bin/python benchmarks/search_bench.py --sizes 100000,1000000 --dims 384,512

Data: ``benchmarks/synth.py`` "clustered low-rank" vectors (100 clusters in a 32-d latent space,
unit spread, mapped to DIM by a fixed Gaussian matrix, ambient noise 0.3, L2-normalised, then
rounded through float16 like the catalog stores them), seeded. Queries are fresh draws from the
same distribution, never database points. Recall@10 is against the exact flat index's answer.

Per index: build seconds (``VectorIndex.from_blocks``, i.e. the product path incl. IVF training
and recall tuning), single-query latency p50/p99 and queries/s (one query per call), batched
queries/s (``--batch`` queries per call) with per-batch p50/p99, recall@10, and the single-query
speed-up over exact flat measured in the same process. Threads: ``--threads`` for faiss (OpenMP).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared, oversubscribed hosts: no spinning
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
from common import load_avg  # noqa: E402
from synth import Synth  # noqa: E402


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def pct(a, q):
    return float(np.percentile(np.asarray(a) * 1e3, q))


def measure(idx, xq_single, xq_batch, batch, k=10):
    """(single latencies s, batched seconds per batch, I of the batched queries)."""
    idx.search(xq_single[:2], k)  # warm-up
    lat = []
    for i in range(len(xq_single)):
        t = time.perf_counter()
        idx.search(xq_single[i : i + 1], k)
        lat.append(time.perf_counter() - t)
    blat, parts = [], []
    for s in range(0, len(xq_batch), batch):
        t = time.perf_counter()
        _, I = idx.search(xq_batch[s : s + batch], k)
        blat.append(time.perf_counter() - t)
        parts.append(I)
    return lat, blat, np.concatenate(parts)


def recall(I, gt):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I, gt, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dims", default="384,512")
    ap.add_argument("--kinds", default="flat,auto,hnsw", help="comma list of flat, auto, hnsw, ivfpq")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="skip hnsw above this size (build time)")
    ap.add_argument("--single", type=int, default=100, help="single queries timed one by one")
    ap.add_argument("--queries", type=int, default=1000, help="queries for batched QPS and recall")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (medians reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import faiss

    from medsearch.config import IndexConfig
    from medsearch.stores.faiss import VectorIndex

    faiss.omp_set_num_threads(args.threads)
    print(f"# search_bench  faiss {faiss.__version__}  threads {args.threads}  OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}  load at start {load_avg()}", flush=True)  # fmt: skip
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for d in [int(s) for s in args.dims.split(",")]:
            synth = Synth(d)
            q = synth.queries(max(args.queries, args.single))
            xq_single, xq_batch = q[: args.single], q[: args.queries]
            print(f"## n={n:,} d={d}: data generated on the fly per build pass", flush=True)
            built: dict[str, object] = {}
            info: dict[str, dict] = {}
            for kind in args.kinds.split(","):
                if kind == "hnsw" and n > args.hnsw_max:
                    print(f"   skip hnsw at n={n:,} (> --hnsw-max {args.hnsw_max:,})", flush=True)
                    continue
                from medsearch.stores.ann import choose_kind

                resolved = choose_kind(n, IndexConfig(kind=kind))
                if kind == "auto" and resolved in built:
                    info[kind] = {**info[resolved], "kind": "auto", "same_as": resolved}
                    continue
                gc.collect()
                t = time.perf_counter()
                built[kind] = VectorIndex.from_blocks(
                    functools.partial(synth.blocks, n), model_id="bench", weights_hash="-", space="image", dim=d, count=n,
                    config=IndexConfig(kind=kind),
                )  # fmt: skip
                info[kind] = {"kind": kind, "build_s": time.perf_counter() - t, "built": built[kind].manifest.kind,
                              "params": built[kind].manifest.params, "build_load": load_avg()}  # fmt: skip
                print(f"   built {kind}: {info[kind]['build_s']:.1f}s {info[kind]['params']}  rss {rss_gb():.2f} GB",
                      flush=True)  # fmt: skip
            # measure in interleaved rounds, so every index sees the same load; report medians
            per: dict[str, list] = {k: [] for k in built}
            for _ in range(args.rounds):
                for kind, idx in built.items():
                    per[kind].append(measure(idx, xq_single, xq_batch, args.batch))
            gt = per["flat"][0][2] if "flat" in per else None
            def stats(runs, xq_batch=xq_batch, gt=gt):
                single_qps = float(np.median([len(r[0]) / sum(r[0]) for r in runs]))
                return dict(
                    single_p50_ms=round(float(np.median([pct(r[0], 50) for r in runs])), 3),
                    single_p99_ms=round(float(np.median([pct(r[0], 99) for r in runs])), 3),
                    single_qps=round(single_qps, 1), batch=args.batch,
                    batch_p50_ms=round(float(np.median([pct(r[1], 50) for r in runs])), 2),
                    batch_p99_ms=round(float(np.median([pct(r[1], 99) for r in runs])), 2),
                    batched_qps=round(float(np.median([len(xq_batch) / sum(r[1]) for r in runs])), 1),
                    recall_at_10=round(recall(runs[0][2], gt), 4) if gt is not None else None,
                )  # fmt: skip
            measured = {k: stats(per[k]) for k in built}
            flat_qps = measured["flat"]["single_qps"] if "flat" in measured else None
            for kind, meta in info.items():
                m = measured[meta.get("same_as", kind)]
                row = dict(n=n, dim=d, kind=kind, built=meta["built"], build_s=round(meta["build_s"], 1), **m,
                           speedup_single_vs_flat=round(m["single_qps"] / flat_qps, 1) if flat_qps else None,
                           params={k: v for k, v in meta["params"].items() if k != "target_recall"},
                           same_index_as=meta.get("same_as"), rss_gb=round(rss_gb(), 2), load=load_avg())  # fmt: skip
                rows.append(row)
                print("   " + json.dumps(row), flush=True)
            del built, per
            gc.collect()
    print()
    hdr = ("n", "dim", "index", "build s", "single p50 ms", "single p99 ms", "single q/s", "batched q/s",
           f"batch({args.batch}) p50 ms", "recall@10", "x flat (single)", "params")  # fmt: skip
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        name = r["kind"] if r["kind"] == r["built"] else f"{r['kind']}->{r['built']}"
        if r.get("same_index_as"):
            name += " (same index)"
        keep = ("nlist", "pq_m", "nprobe", "k_factor", "hnsw_m", "ef_search", "tuned_recall_at_10")
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k in keep)
        print(f"| {r['n']:,} | {r['dim']} | {name} | {r['build_s']} | {r['single_p50_ms']} | {r['single_p99_ms']} | "
              f"{r['single_qps']} | {r['batched_qps']} | {r['batch_p50_ms']} | {r['recall_at_10']} | "
              f"{r['speedup_single_vs_flat']} | {p} |")  # fmt: skip
    print(f"\nload at end {load_avg()}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
