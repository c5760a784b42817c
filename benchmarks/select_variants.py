"""Variants of the lite recipe chosen on train folds, then reported on dev once (issue 13).

    python benchmarks/select_variants.py --home HOME [--variants base,no_ii,...] [--seeds 0,1,2]

For every variant: ``medsearch train --select cv`` with seed 0 (K case-grouped folds of train pick
the step), then refits with the other seeds at the step that cv chose (``select=none, stop_at``),
then ``medsearch eval retrieval`` on dev for each seed. Dev is read only by the evaluation, after
every choice is made. Writes HOME/select_variants.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import load_avg

from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.eval.retrieval import EvalConfig, evaluate_dataset
from medsearch.train import TrainConfig, train

VARIANTS: dict[str, dict] = {
    "base": {"hidden": 512, "dropout": 0.7, "weight_decay": 0.1},  # the earlier recipe (crops 0: dropout views)
    "no_ii": {
        "hidden": 512,
        "dropout": 0.7,
        "weight_decay": 0.1,
        "image_image": 0.0,
    },  # base without the image-image term
    "wide": {},  # the default now: hidden 1024, dropout 0.8, weight decay 0.3 (best cv score)
    "ii2": {"image_image": 2.0},  # a stronger image-image (metadata) term
}
METRICS = {  # report path -> column
    "caption->image R@10": ("cross-modal", "caption->image", "R@10"),
    "caption->same-case R@10": ("cross-modal", "caption->same-case", "R@10"),
    "caption->case R@10": ("cross-modal", "caption->case", "R@10"),
    "modality vote": ("classification", "model", "modality_type", "kNN vote"),
    "region vote": ("classification", "model", "body_region", "kNN vote"),
}


def _get(report: dict, path: tuple[str, ...]) -> dict:
    for p in path:
        report = report[p]
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dataset", default="medpix-2.0")
    args = ap.parse_args()
    paths = Paths(args.home)
    seeds = [int(s) for s in args.seeds.split(",")]
    out_file = args.home / "select_variants.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    print(f"load {load_avg()}", file=sys.stderr)
    for name in args.variants.split(","):
        if name in results and len(results[name]["dev"]) == len(seeds):
            continue
        base = replace(TrainConfig(), **VARIANTS[name])
        cat = Catalog.open(paths.catalog, readonly=True)
        t0 = time.perf_counter()
        runs = {}
        res = train(cat, paths, replace(base, seed=seeds[0], name=f"{name}-s{seeds[0]}"), device="cpu",
                    log=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr, flush=True))  # fmt: skip
        sel = res.config["selection"]
        runs[seeds[0]] = res.model_id
        for s in seeds[1:]:
            r = train(cat, paths, replace(base, seed=s, name=f"{name}-s{s}", select="none", stop_at=sel["chosen"]["step"]),
                      device="cpu")  # fmt: skip
            runs[s] = r.model_id
        cat.close()
        train_s = time.perf_counter() - t0
        dev = {}
        for s, model in runs.items():
            rep = evaluate_dataset(paths, args.dataset, EvalConfig(split="dev"), model=model, device="cpu")
            dev[s] = {k: _get(rep, p) for k, p in METRICS.items()}
        results[name] = {"params": VARIANTS[name], "selection": {k: sel[k] for k in ("folds", "fold_sizes", "chosen",
                         "grid", "seconds")}, "models": runs, "dev": dev, "train_seconds": round(train_s, 1)}  # fmt: skip
        out_file.write_text(json.dumps(results, indent=1))
        print(f"[{name}] cv {sel['chosen']['cv_score']:.3f} @ {sel['chosen']['step']}; dev "
              + ", ".join(f"{k} {np.mean([d[k]['value'] for d in dev.values()]):.3f}" for k in METRICS),
              file=sys.stderr, flush=True)  # fmt: skip
    print(table(results))


def table(results: dict) -> str:
    cols = list(METRICS)
    lines = ["| variant | cv score (+- sd over folds) | chosen step | " + " | ".join(f"dev {c}" for c in cols) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]  # fmt: skip
    for name, r in results.items():
        c = r["selection"]["chosen"]
        cells = []
        for k in cols:
            vals = [d[k]["value"] for d in r["dev"].values()]
            lo = min(d[k]["ci95"][0] for d in r["dev"].values())
            hi = max(d[k]["ci95"][1] for d in r["dev"].values())
            cells.append(f"{np.mean(vals):.3f} ({' / '.join(f'{v:.3f}' for v in vals)}) [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {name} {r['params'] or ''} | {c['cv_score']:.3f} +- {c['cv_std']:.3f} | {c['step']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
