"""Query understanding on medpix-2.0 with the evaluated split's own text invisible to the search.

Build the home once (the evaluated split ingested WITHOUT captions/reports, so a caption reaches
its image only through the model; header-like metadata stays):

    python benchmarks/understand_eval.py prepare /tmp/understand/data      # writes the text-less copy
    medsearch ingest /tmp/understand/data/medpix --home H
    medsearch train --home H --seed 0 --dev-split none && medsearch index --home H --model lite

Then:

    python benchmarks/understand_eval.py parse --home H [--split dev]     # part A: needs only the catalog
    python benchmarks/understand_eval.py retrieval --home H [--split dev] # part B: needs the index

Part A: each caption of the split (from the original dataset) as a query; what understanding
reads is compared with its own image's metadata: coverage (share of queries with the field
understood) and precision (share of those that match the image). Rules only vs rules + model.
Part B: caption -> image R@10 (images ranked individually; identical captions count) and
caption -> same-case R@10 (any image of the case in the top 10), pool = the split's images,
with understanding off / rules only / rules + model, with 95% bootstrap CIs over queries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsearch.catalog import Catalog  # noqa: E402
from medsearch.understand import QueryModel, Vocabulary, matches, off, understand  # noqa: E402

MEDPIX = ROOT.parent / "shared" / "datasets" / "medpix-2.0"
_TEXT = ("title", "history", "exam", "findings", "impression", "differential_diagnosis", "diagnosis", "diagnosis_by",
         "treatment_follow_up", "case_discussion")  # fmt: skip


def prepare(out: Path, split: str) -> None:
    """A JSONL copy of medpix where ``split`` has no caption, report text, title, diagnosis or topic."""
    dst = out / "medpix"
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / "images").exists():
        (dst / "images").symlink_to(MEDPIX / "images")
    with open(MEDPIX / "reports.jsonl") as f, open(dst / "reports.jsonl", "w") as o:
        for line in f:
            r = json.loads(line)
            if r["split"] == split:
                r.update(dict.fromkeys(_TEXT), topic=None)
                r["labels"] = {k: v for k, v in (r.get("labels") or {}).items() if k in ("modality_types", "location_categories", "locations")}
                for im in r.get("images", []):
                    im.update(caption=None, acr_codes=None)
            o.write(json.dumps(r) + "\n")
    with open(MEDPIX / "images.jsonl") as f, open(dst / "images.jsonl", "w") as o:
        for line in f:
            r = json.loads(line)
            if r["split"] == split:
                r.update(caption=None, case_title=None, case_diagnosis=None, category=None, acr_codes=None)
            o.write(json.dumps(r) + "\n")
    print(f"wrote {dst} ({split} text removed)")


def _queries(split: str) -> list[dict]:
    with open(MEDPIX / "images.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["split"] == split and r.get("caption") and r["caption"].strip()]


def _ci(x: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def parse_eval(home: Path, split: str) -> None:
    cat = Catalog.open(home / "catalog.db", create=False)
    vocab = Vocabulary.from_catalog(cat)
    imgs = cat.image_rows(range(1, cat.counts()["images"] + 1))
    assert not any(r.caption for r in imgs.values() if r.split == split), f"{split} captions are visible"
    t0 = time.perf_counter()
    model = QueryModel.from_catalog(cat, list(imgs))  # captions of the other splits only (split's are gone)
    fit_s = time.perf_counter() - t0
    by_key = {r.image_key: r for r in imgs.values()}
    qs = [q for q in _queries(split) if q["image_id"] in by_key]
    print(f"{len(qs)} {split} captions as queries; model fitted on {model.n_train if model else 0} captions "
          f"({len(model.words) if model else 0} words) in {fit_s:.1f}s")
    print("\n| field | variant | coverage | precision [95% CI] |\n| --- | --- | --- | --- |")
    for variant, m in (("rules", None), ("rules+model", model)):
        us = [understand(q["caption"], vocab, m) for q in qs]
        for f in ("modality_type", "sequence", "contrast", "plane", "body_region"):
            got = [(u.get(f), by_key[q["image_id"]]) for u, q in zip(us, qs, strict=True)]
            said = [(c, r) for c, r in got if c is not None and matches(c, r) is not None]
            ok = np.array([bool(matches(c, r)) for c, r in said], float)
            if not len(ok):
                print(f"| {f} | {variant} | 0 | - |")
                continue
            lo, hi = _ci(ok)
            print(f"| {f} | {variant} | {len(said) / len(qs):.3f} | {ok.mean():.3f} [{lo:.3f}, {hi:.3f}] |")
    lat = []
    for q in qs[:200]:
        t = time.perf_counter()
        understand(q["caption"], vocab, model)
        lat.append((time.perf_counter() - t) * 1000)
    print(f"\nunderstand() per query: median {np.median(lat):.2f} ms, p95 {np.percentile(lat, 95):.2f} ms")


def retrieval_eval(home: Path, split: str, weight: float) -> None:
    from medsearch.config import SearchConfig
    from medsearch.search import Filters, Searcher

    s = Searcher(home, config=SearchConfig(understand_weight=weight), device="cpu")
    s.understand("warm")  # fits the caption model once and reads the indexed images' metadata
    vocab, model = s._understanding.vocab, s._understanding.model
    imgs = s.catalog.image_rows(range(1, s.catalog.counts()["images"] + 1))
    if any(r.caption for r in imgs.values() if r.split == split):
        raise SystemExit(f"{split} captions are visible in {home}: ingest the `prepare` copy (a caption would find itself)")
    by_key = {r.image_key: r for r in imgs.values()}
    qs = [q for q in _queries(split) if q["image_id"] in by_key]
    cap_of = {q["image_id"]: " ".join(q["caption"].split()) for q in qs}
    variants = {"off": lambda q: off(q), "rules": lambda q: understand(q, vocab, None),
                "rules+model": lambda q: understand(q, vocab, model)}  # fmt: skip
    print(f"{len(qs)} {split} captions; pool: the {split} images; model {s.model_id}; weight {weight}")
    print("\n| understanding | caption->image R@10 [95% CI] | caption->same-case R@10 [95% CI] | median ms |")
    print("| --- | --- | --- | --- |")
    for name, fn in variants.items():
        img_hit, case_hit, lat = [], [], []
        for q in qs:
            own = by_key[q["image_id"]]
            text = q["caption"]
            t = time.perf_counter()
            u = fn(text)
            hits = s.search_text(text, k=10, per_case=False, filters=Filters(split=split), understand=u)
            lat.append((time.perf_counter() - t) * 1000)
            same_cap = {h.image_key for h in hits if cap_of.get(h.image_key) == cap_of[own.image_key]}
            img_hit.append(own.image_key in {h.image_key for h in hits} or bool(same_cap))
            case_hit.append(any(h.case_id == own.case_id for h in hits))
        a, b = np.array(img_hit, float), np.array(case_hit, float)
        (al, ah), (bl, bh) = _ci(a), _ci(b)
        print(f"| {name} | {a.mean():.3f} [{al:.3f}, {ah:.3f}] | {b.mean():.3f} [{bl:.3f}, {bh:.3f}] | "
              f"{np.median(lat):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("prepare", "parse", "retrieval"))
    ap.add_argument("path", nargs="?", type=Path, help="prepare: the output folder")
    ap.add_argument("--home", type=Path)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--weight", type=float, default=1.0, help="understand_weight (fixed a priori: 1.0)")
    a = ap.parse_args()
    if a.part == "prepare":
        prepare(a.path, a.split)
    elif a.part == "parse":
        parse_eval(a.home, a.split)
    else:
        retrieval_eval(a.home, a.split, a.weight)


if __name__ == "__main__":
    main()
