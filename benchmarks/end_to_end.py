"""End to end: ingest + index of medpix-2.0 (items/s) and the time to first query of a cold process.

    .venv/bin/python benchmarks/end_to_end.py

1. ``ingest``: ``indexer.ingest.ingest_path`` of ../shared/datasets/medpix-2.0 (JSONL layout: cases,
   report sentences, 1,850 images) into a fresh home; items = cases + images.
2. ``index``: ``indexer.embed.run_index`` with the towers model (images, then texts, then FAISS
   + BM25), with the tuned defaults, and - the baseline, same run, same data, a second home -
   with the settings before issue 7 (``BASELINE``: batch 32, 2 decode workers feeding the
   encoder in the main process with torch's default threads, float32 hand-over, no bf16 on CPU
   i.e. ``amp=False``). Each in a child process (the same way `medsearch index` runs). Text
   embedding (MiniLM, ~11k report sections/sentences/captions) is the same code in both.
3. time to first query: a cold ``python`` child that imports medsearch, opens the catalog, loads the
   encoder and the indexes and answers one query (text, then image, separate children); the
   floor (same run) is a child that only imports torch + faiss; the warm latency of the
   next query is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"
from common import load_avg  # noqa: E402


def child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. Adds the wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


INDEX_CODE = """
import json, time
from medsearch.catalog import Catalog
from medsearch.config import EmbedConfig, Paths
from medsearch.encoders.registry import load_encoder
from indexer.embed import run_index
home = {home!r}
enc = load_encoder("towers", device="cpu")
enc.amp = {amp}
cat = Catalog.open(home + "/catalog.db")
t = time.perf_counter()
s = run_index(cat, enc, Paths(__import__("pathlib").Path(home)), config=EmbedConfig({cfg}), progress=False)
wall = time.perf_counter() - t
print(json.dumps({{"wall_s": wall, **s.to_dict()}}, default=str))
"""

QUERY_CODE = """
import time
t0 = time.perf_counter()
import json
from medsearch.search import Searcher
t_import = time.perf_counter()
s = Searcher({home!r}, device="cpu")
t_open = time.perf_counter()
enc = s.encoder
t_enc = time.perf_counter()
s.warm()
t_idx = time.perf_counter()
hits = {query}
t_first = time.perf_counter()
hits2 = {query2}
t_second = time.perf_counter()
print(json.dumps({{"import_s": t_import - t0, "open_s": t_open - t_import, "encoder_s": t_enc - t_open,
                  "indexes_s": t_idx - t_enc, "first_query_s": t_first - t_idx, "to_first_result_s": t_first - t0,
                  "second_query_s": t_second - t_first, "hits": len(hits), "top": hits[0].case_key if hits else None}}))
"""

FLOOR_CODE = """
import time
t0 = time.perf_counter()
import torch, faiss, json
print(json.dumps({"import_s": time.perf_counter() - t0}))
"""


# the EmbedConfig before issue 7 (decode workers feed a 2-thread encoder in the main process, float32
# tensors between processes, no memory trimming) and amp=False (no bf16 on CPU)
BASELINE = "batch_size=32, workers=2, encode_in_workers=False, uint8_transfer=False, trim_memory=False"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=MEDPIX)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog

    print(f"# end_to_end  data {args.data}  load at start {load_avg()}", flush=True)
    out: dict = {"load_start": load_avg()}
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        homes = {"tuned": Path(tmp) / "tuned", "baseline": Path(tmp) / "baseline"}
        for name, home in homes.items():
            if name == "baseline" and args.skip_baseline:
                continue
            cat = Catalog.open(home / "catalog.db")
            t = time.perf_counter()
            s = ingest_path(cat, args.data)
            wall = time.perf_counter() - t
            items = s.cases_added + s.images_added
            cat.close()
            out[f"ingest_{name}"] = {"wall_s": wall, "cases": s.cases_added, "images": s.images_added,
                                     "items_per_s": items / wall, "skipped": len(s.skipped)}  # fmt: skip
            print(f"   ingest ({name} home): {s.cases_added} cases + {s.images_added} images in {wall:.1f}s = "
                  f"{items / wall:.1f} items/s  load {load_avg()}", flush=True)  # fmt: skip
        runs = [("baseline", BASELINE, False), ("tuned", "", True)]
        for name, cfg, amp in runs:
            if name == "baseline" and args.skip_baseline:
                continue
            r = child(INDEX_CODE.format(home=str(homes[name]), cfg=cfg, amp=amp))
            ing = out[f"ingest_{name}"]
            items = ing["cases"] + ing["images"]
            r["items_per_s_ingest_plus_index"] = items / (ing["wall_s"] + r["wall_s"])
            out[f"index_{name}"] = r
            print(f"   index ({name}: EmbedConfig({cfg}), amp={amp}): {r['wall_s']:.1f}s; images "
                  f"{r['images_embedded']} at {r['images_per_s']}/s, texts {r['texts_embedded']}; stages {r['seconds']}; "
                  f"ingest+index {r['items_per_s_ingest_plus_index']:.1f} items/s  load {load_avg()}", flush=True)  # fmt: skip
        home = str(homes["tuned"])
        img = Catalog.open(homes["tuned"] / "catalog.db").find_image(1).path
        out["floor"] = child(FLOOR_CODE)
        out["ttfq_text"] = child(QUERY_CODE.format(
            home=home, query="s.search_text('ring enhancing lesion in the brain', k=10)",
            query2="s.search_text('left lower lobe consolidation', k=10)"))  # fmt: skip
        out["ttfq_image"] = child(QUERY_CODE.format(home=home, query=f"s.similar({img!r}, k=10)",
                                                    query2=f"s.similar({img!r}, k=10)"))  # fmt: skip
    out["load_end"] = load_avg()
    print()
    print("| stage | tuned | baseline (pre-issue-7 settings) | ratio |")
    print("|---|---|---|---|")
    it, ib = out.get("index_tuned"), out.get("index_baseline")
    gt, gb = out["ingest_tuned"], out.get("ingest_baseline")
    print(f"| ingest medpix-2.0 (items/s) | {gt['items_per_s']:.1f} | {gb['items_per_s']:.1f} | "
          f"{gt['items_per_s'] / gb['items_per_s']:.2f} |" if gb else f"| ingest (items/s) | {gt['items_per_s']:.1f} | - | - |")
    if it and ib:
        print(f"| index: image embedding (images/s) | {it['images_per_s']} | {ib['images_per_s']} | "
              f"{it['images_per_s'] / ib['images_per_s']:.2f} |")
        print(f"| index: whole step (s) | {it['wall_s']:.1f} | {ib['wall_s']:.1f} | {ib['wall_s'] / it['wall_s']:.2f} |")
        print(f"| ingest + index (items/s) | {it['items_per_s_ingest_plus_index']:.1f} | "
              f"{ib['items_per_s_ingest_plus_index']:.1f} | "
              f"{it['items_per_s_ingest_plus_index'] / ib['items_per_s_ingest_plus_index']:.2f} |")
    print()
    print("| cold process | to first result s | import | open catalog | load encoder | load indexes | first query | "
          "next query (warm) | x floor (import torch+faiss) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    floor = out["floor"]["import_s"]
    for name in ("ttfq_text", "ttfq_image"):
        r = out[name]
        print(f"| {name[5:]} query | {r['to_first_result_s']:.2f} | {r['import_s']:.2f} | {r['open_s']:.2f} | "
              f"{r['encoder_s']:.2f} | {r['indexes_s']:.2f} | {r['first_query_s']:.3f} | {r['second_query_s']:.3f} | "
              f"{r['to_first_result_s'] / floor:.1f} |")  # fmt: skip
    print(f"| floor: python -c 'import torch, faiss' | {floor:.2f} | | | | | | | 1.0 |")
    print(f"\nload at end {out['load_end']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
