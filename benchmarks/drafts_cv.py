"""Choose drafting settings on case-grouped folds of ``train``, never on ``dev``.

    .venv/bin/python benchmarks/drafts_cv.py --work /tmp/drafts-cv [--folds 3] [--queries 200] \\
        [--cache-from HOME] [--grid "default/wording=0/max_findings=5;wording=4"]

For each fold f: a copy of medpix-2.0 whose fold-f train cases are relabelled split ``cvq`` (images are
symlinked, nothing is copied), ingested into its own home; the lite model trained there with the
default recipe (so it never sees fold f) and indexed; then up to ``--queries`` fold-f images are
drafted with evidence from the other train cases only. A model trained on the queries' own cases
would make image-text similarity point at their own findings (the leak of eval_drafts_dev.md round 3).

Every grid point (``/``-separated; ``ExtractiveConfig`` overrides ``field=json``, ``;``-joined inside a point) drafts the same evidence
packs. Scores: ROUGE-L F1 (rouge-score, stemmed) and cosine under the frozen all-MiniLM-L6-v2 judge,
against each image's own case findings, mean and 95% CI by case bootstrap; the hardest fixed text
(best mean ROUGE-L against each fold's pool) and the oracle (sentences chosen knowing the reference)
are printed as bounds. ``--cache-from`` copies a home's cached tower features so no tower runs twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medpix-2.0"


def fold_dataset(src: Path, dst: Path, fold: int, k: int, seed: int) -> set[str]:
    """A copy of the JSONL dataset with fold ``fold`` of the train cases relabelled ``cvq``."""
    reports = [json.loads(line) for line in open(src / "reports.jsonl")]
    train = sorted(r["id"] for r in reports if r["split"] == "train")
    perm = np.random.default_rng(seed).permutation(len(train))
    held = {train[i] for i in perm[fold::k]}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "images").mkdir(exist_ok=True)
    with open(dst / "reports.jsonl", "w") as out:
        for r in reports:
            out.write(json.dumps({**r, "split": "cvq"} if r["id"] in held else r) + "\n")
    with open(src / "images.jsonl") as f, open(dst / "images.jsonl", "w") as out:
        for line in f:
            r = json.loads(line)
            out.write(json.dumps({**r, "split": "cvq"} if r["case_id"] in held else r) + "\n")
            link = dst / r["file"]
            if not link.exists():
                link.symlink_to(src / r["file"])
    return held


def build_fold(work: Path, fold: int, k: int, seed: int, cache_from: Path | None) -> Path:
    home = work / f"fold{fold}" / "home"
    if (home / "indexes" / "lite").exists():
        return home  # resumable: a fold already built is reused
    fold_dataset(DATA, work / f"fold{fold}" / "medpix-2.0", fold, k, seed)
    if cache_from is not None and (cache_from / "models" / "cache").exists() and not (home / "models" / "cache").exists():
        shutil.copytree(cache_from / "models" / "cache", home / "models" / "cache")
    exe = str(Path(sys.executable).with_name("medsearch"))
    for args in (["ingest", str(work / f"fold{fold}" / "medpix-2.0")], ["train"], ["index", "--model", "lite"]):
        t = time.perf_counter()
        subprocess.run([exe, *args, "--home", str(home)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"  fold {fold}: {args[0]} {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return home


def parse_point(spec: str):
    from medsearch.rag.config import ExtractiveConfig

    cfg = ExtractiveConfig()
    if spec == "default":
        return cfg
    for kv in spec.split(";"):
        key, value = kv.split("=")
        cur = getattr(cfg, key)
        cfg = replace(cfg, **{key: type(cur)(json.loads(value)) if not isinstance(cur, tuple) else tuple(json.loads(value))})
    return cfg


def oracle(pack, ref_tokens, tokenize, cfg) -> str:
    """Greedy evidence sentences maximising ROUGE-L against the reference itself (an upper bound)."""
    from medsearch.metrics import lcs_f1, lcs_length, token_masks
    from medsearch.rag.generators.extractive import _candidates

    cand = [int(i) for i in _candidates(pack, cfg.findings_sections, cfg)]
    toks = {i: tokenize(pack.sent_text[i]) for i in cand}
    masks, n = token_masks(ref_tokens), len(ref_tokens)
    chosen, best = [], 0.0
    while True:
        step = None
        for i in cand:
            if i in chosen:
                continue
            a = [t for j in sorted([*chosen, i], key=lambda j: pack.sent_seq[j]) for t in toks[j]]
            v = lcs_f1(lcs_length(a, masks, n), len(a), n)
            if v > best:
                best, step = v, i
        if step is None:
            break
        chosen.append(step)
    return " ".join(pack.sent_text[i] for i in sorted(chosen, key=lambda j: pack.sent_seq[j]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=200, help="fold images drafted per fold (seeded sample)")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--cache-from", type=Path, default=None)
    ap.add_argument("--grid", default="default/wording=0/wording=4/wording=12/max_findings=3/max_findings=5")
    args = ap.parse_args()

    from rouge_score import rouge_scorer

    from medsearch.encoders.registry import load_encoder
    from medsearch.eval.drafts import _case_bootstrap as boot
    from medsearch.eval.drafts import _central_findings, _findings, _pool_cases
    from medsearch.rag import Drafter
    from medsearch.rag.generators.extractive import ExtractiveGenerator
    from medsearch.search import Filters, Searcher

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    tokenize = rouge._tokenizer.tokenize
    points = [(p, parse_point(p)) for p in args.grid.split("/")]
    hyps: dict[str, list[str]] = {p: [] for p, _ in [*points, ("fixed text", None), ("oracle", None)]}
    refs, groups = [], []
    for f in range(args.folds):
        home = build_fold(args.work, f, args.folds, args.seed, args.cache_from)
        s = Searcher(home, model="lite", device="cpu")
        d = Drafter(s)
        pool_filters = Filters(split="train", source="medpix-2.0")
        fixed = _central_findings(_pool_cases(s, "medpix-2.0", "train"), tokenize).findings
        ids = sorted(int(i) for i in s.catalog.image_ids_where({"split": "cvq", "source": "medpix-2.0"}))
        rows = s.catalog.image_rows(ids)
        qs = [rows[i] for i in ids if _findings(rows[i].sections)]
        if len(qs) > args.queries:
            qs = [qs[i] for i in sorted(np.random.default_rng(0).choice(len(qs), args.queries, replace=False))]
        t = time.perf_counter()
        for q in qs:
            pack = d.evidence(s.image_query(q.image_id), pool_filters)
            ref = _findings(q.sections)
            refs.append(ref)
            groups.append(q.case_id)
            for name, cfg in points:
                out = ExtractiveGenerator(cfg).generate(pack).sentences
                hyps[name].append(" ".join(p.text for p in out if p.section == "findings"))
            hyps["fixed text"].append(fixed)
            hyps["oracle"].append(oracle(pack, tokenize(ref), tokenize, points[0][1]))
        print(f"  fold {f}: {len(qs)} queries drafted in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

    judge = load_encoder("towers", device="cpu")
    ref_vecs = judge.encode_texts(refs)
    g = np.array(groups)
    print(f"drafts on {args.folds} case-grouped folds of medpix-2.0 train: {len(refs)} queries, {len(set(groups))} cases; "
          "mean [95% CI by case]")  # fmt: skip
    print(f"{'setting':<40} {'ROUGE-L':>22} {'MiniLM cosine':>22} {'words':>6}")
    for name, hs in hyps.items():
        rl = np.array([rouge.score(r, h)["rougeL"].fmeasure if h else 0.0 for r, h in zip(refs, hs, strict=True)])
        ok = [i for i, h in enumerate(hs) if h.strip()]  # an empty draft scores cosine 0, as in `eval drafts`
        cos = np.zeros(len(hs))
        if ok:
            cos[ok] = (judge.encode_texts([hs[i] for i in ok]) * ref_vecs[ok]).sum(axis=1)
        cells = []
        for vals in (rl, cos):
            m, lo, hi = boot(vals, g, 1000, 0)
            cells.append(f"{m:.4f} [{lo:.3f},{hi:.3f}]")
        words = np.mean([len(h.split()) for h in hs])
        print(f"{name:<40} {cells[0]:>22} {cells[1]:>22} {words:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
