"""How long the catalog takes to answer a search filter (the ids FAISS is then restricted to).

    python benchmarks/filter_lookup.py --n 1000000

Builds a catalog of N image rows (modality CT/MR/XR in 60/30/9.x %, 1% US: the selective filter) in a
temporary folder and times ``Catalog.image_ids_where`` for the 1% filter and a 30% one, with the filter
columns' expression indexes (the schema) and, as the baseline in the same run, with them dropped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from medsearch.catalog import Catalog  # noqa: E402

INDEXES = ("images_f_modality", "images_f_region", "images_f_split", "images_f_source", "images_f_plane")


def build(path: Path, n: int, seed: int) -> Catalog:
    rng = np.random.default_rng(seed)
    mods = rng.choice(["CT", "MR", "XR", "US"], size=n, p=[0.60, 0.30, 0.09, 0.01])
    cat = Catalog.open(path)
    db = cat.db.conn
    db.execute("INSERT INTO cases (id, source, key, content_hash, ingested_at) VALUES (1, 'bench', 'c1', 'x', 'now')")
    rows = ((i + 1, 1, "bench", f"i{i}", f"/x/{i}.png", f"{i:064x}", str(m), "now") for i, m in enumerate(mods))
    db.executemany("INSERT INTO images (id, case_id, source, key, path, sha256, modality_type, ingested_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)  # fmt: skip
    db.commit()
    return cat


def timed(cat: Catalog, filters: dict, reps: int) -> tuple[float, int]:
    out, ms = None, []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = cat.image_ids_where(filters)
        ms.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ms), len(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cat = build(Path(d) / "catalog.db", args.n, args.seed)
        print(f"{args.n:,} image rows in {time.perf_counter() - t0:.1f} s (with the filter indexes)")
        cases = {"1% (modality US)": {"modality": "us"}, "30% (modality MR)": {"modality": "MR"}}
        res = {name: timed(cat, f, args.reps) for name, f in cases.items()}
        for ix in INDEXES:
            cat.db.conn.execute(f"DROP INDEX {ix}")
        base = {name: timed(cat, f, args.reps) for name, f in cases.items()}
        cat.close()
    print("\n| filter | ids | baseline: no filter index, median ms | with the expression index, median ms |")
    print("| --- | ---: | ---: | ---: |")
    for name in cases:
        print(f"| {name} | {res[name][1]:,} | {base[name][0]:.1f} | {res[name][0]:.1f} |")


if __name__ == "__main__":
    main()
