"""Incremental index update vs full rebuild, through the product path (catalog -> build_indexes).

    .venv/bin/python benchmarks/incremental_bench.py --n 100000 --dim 384 --kinds hnsw,ivfpq --add 100

A temporary catalog stores N synthetic vectors (benchmarks/synth.py, float16 like real ones);
``indexer.embed.build_indexes`` builds the index; then ``--add`` more vectors are stored and
``build_indexes`` runs again (it adds only the new vectors: ``VectorIndex.sync``), and, the
baseline in the same run, ``build_indexes(force=True)`` rebuilds from scratch. Printed: seconds
of each, the ratio, and recall@10 of the updated index on fresh queries vs exact search.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
from common import load_avg  # noqa: E402
from synth import Synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--kinds", default="hnsw,ivfpq")
    ap.add_argument("--add", type=int, default=100)
    args = ap.parse_args()
    import faiss

    from indexer.embed import build_indexes
    from medsearch.catalog import Catalog
    from medsearch.config import IndexConfig, Paths
    from medsearch.stores.faiss import VectorIndex

    print(f"# incremental_bench  n {args.n:,}  dim {args.dim}  add {args.add}  load at start {load_avg()}", flush=True)
    synth = Synth(args.dim)
    rows = []
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory(prefix="incr-") as tmp:
            paths = Paths(Path(tmp))
            cat = Catalog.open(paths.catalog)
            for ids, x in synth.blocks(args.n):
                cat.put_vectors("bench", "image", ids.tolist(), x)
            cfg = IndexConfig(kind=kind)
            build = dict(model_id="bench", weights_hash="w", dims={"image": args.dim}, config=cfg)
            t = time.perf_counter()
            first = build_indexes(cat, paths, **build)["image"]
            t_first = time.perf_counter() - t
            extra = synth.sample(args.add, seed=424242).astype(np.float16).astype(np.float32)
            cat.put_vectors("bench", "image", list(range(args.n + 1, args.n + args.add + 1)), extra)
            t = time.perf_counter()
            upd = build_indexes(cat, paths, **build)["image"]
            t_upd = time.perf_counter() - t
            idx = VectorIndex.load(paths.index_dir("bench"), "image", model_id="bench")
            xq = synth.queries(300)
            xb = np.concatenate([x for _, x in cat.iter_vectors("bench", "image")])
            _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
            _, I = idx.search(xq, 10)
            rec = float(np.mean([len(set(a - 1) & set(b)) / 10 for a, b in zip(I, gt, strict=True)]))
            found_new = float(np.mean(idx.search(extra, 1)[1][:, 0] == np.arange(args.n + 1, args.n + args.add + 1)))
            del xb
            t = time.perf_counter()
            full = build_indexes(cat, paths, force=True, **build)["image"]
            t_full = time.perf_counter() - t
            cat.close()
            r = dict(kind=kind, first_build_s=t_first, update_s=t_upd, rebuild_s=t_full, update=upd, full=full,
                     recall=rec, new_found=found_new, load=load_avg())  # fmt: skip
            rows.append(r)
            print(f"   {kind}: first build {t_first:.1f}s ({first}); +{args.add}: update {t_upd:.1f}s ({upd}); "
                  f"full rebuild {t_full:.1f}s; recall@10 after update {rec:.4f}; new vectors find themselves "
                  f"{found_new:.2f}  load {load_avg()}", flush=True)  # fmt: skip
    print()
    print(f"| index ({args.n:,} x {args.dim}) | first build s | add {args.add}: update s | add {args.add}: full rebuild s "
          "| rebuild / update | recall@10 after update | update result |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['first_build_s']:.1f} | {r['update_s']:.1f} | {r['rebuild_s']:.1f} | "
              f"{r['rebuild_s'] / r['update_s']:.1f}x | {r['recall']:.4f} | rebuilt={r['update']['rebuilt']}, "
              f"added={r['update'].get('added')} |")  # fmt: skip
    print(f"\nload at end {load_avg()}")


if __name__ == "__main__":
    main()
