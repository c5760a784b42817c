"""Drafting latency per query image, by stage, with retrieval alone as the baseline (same run).

    .venv/bin/python benchmarks/draft_latency.py --home /tmp/ms-rag-home --n 30 [-g extractive -g llama-cpp]

Queries are image FILES of ``--split`` (decoded and encoded like `medsearch draft FILE`); the
evidence comes from ``--pool-split``. Rows: ``similar`` (Searcher.similar alone: decode + encode
+ search), then each generator's whole draft (evidence + generation + grounding) with its stage
means. The first query of each row is a warm-up and not timed (model loading is reported apart).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--pool-split", default="train")
    ap.add_argument("-g", "--generator", action="append", default=None)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from medsearch.rag import DraftConfig, Drafter, LLMConfig
    from medsearch.search import Filters, Searcher

    t = time.perf_counter()
    s = Searcher(args.home, device="cpu")
    _ = s.encoder
    load_s = time.perf_counter() - t
    ids = s.catalog.image_ids_where({"split": args.split})
    rows = s.catalog.image_rows(sorted(int(i) for i in ids))
    rng = np.random.default_rng(args.seed)
    paths = [rows[i].path for i in sorted(rng.choice(sorted(rows), size=min(args.n + 1, len(rows)), replace=False))]
    pool = Filters(split=args.pool_split)
    print(f"home {args.home}, model {s.model_id}, {len(paths) - 1} timed {args.split} image files (+1 warm-up), "
          f"pool {args.pool_split}; load avg {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"searcher+encoder load {load_s:.1f}s")  # fmt: skip
    table = []

    from medsearch.errors import MedsearchError

    def timed(name: str, fn, stages=None) -> None:
        try:
            fn(paths[0])  # warm-up (loads indexes / the LLM)
        except MedsearchError:
            pass
        lat, st, failed = [], {}, 0
        for p in paths[1:]:
            t0 = time.perf_counter()
            try:
                out = fn(p)
            except MedsearchError:  # e.g. an LLM draft without a valid citation: timed, counted
                out, failed = None, failed + 1
            lat.append(time.perf_counter() - t0)
            for k, v in (stages(out) if stages and out is not None else {}).items():
                st.setdefault(k, []).append(v)
        a = np.array(lat)
        st_mean = {k: float(np.mean(v)) for k, v in st.items()}
        table.append((name, a.mean(), np.median(a), np.quantile(a, 0.95), st_mean, failed))

    timed("similar (retrieval only)", lambda p: s.similar(p, k=8, filters=pool, exclude_same_case=True, exclude_same_patient=True))
    for g in args.generator or ["extractive"]:
        d = Drafter(s, config=DraftConfig(generator=g, llm=LLMConfig(max_tokens=args.max_tokens)))
        timed(f"draft {g}", lambda p, d=d: d.draft(p, filters=pool), stages=lambda dr: dr.timings)
    print(f"{'row':<28}{'mean s':>9}{'median s':>10}{'p95 s':>9}{'failed':>8}  stages of successful drafts (mean s)")
    for name, mean, med, p95, st, failed in table:
        stages = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in st.items() if k != "total_s")
        print(f"{name:<28}{mean:>9.3f}{med:>10.3f}{p95:>9.3f}{failed:>8}  {stages}")


if __name__ == "__main__":
    main()
