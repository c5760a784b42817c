"""``medsearch eval drafts``: draft every image of a split and compare to its own findings.

Per query image (evidence comes from ``pool_split`` only, the query's own case excluded):

    BLEU-4        sacrebleu corpus BLEU (13a), from per-image n-gram statistics
    ROUGE-L       rouge-score F1 with stemming
    cosine        the fixed judge: cosine between the draft's findings and the reference findings in the
                  frozen all-MiniLM-L6-v2 text tower (the registry's "towers" text side), whatever model drafts
    modality / region / category agreement
                  the score-weighted majority label of the cases the draft cites (for a
                  baseline: the label of the case whose text it copies) equals the query's
    dx hit        the query case's diagnosis is among the diagnoses of the cases cited by IMPRESSION +
                  DIFFERENTIAL (for the nearest-case baseline: that case's diagnosis alone)
    supported     share of draft sentences with a valid citation and support >= threshold
    cit. valid    valid citations / citations written

Baselines in the same run: a random pool case's findings, two fixed texts drafted for every image,
both chosen on the pool split only ("fixed text": the pool findings with the highest mean ROUGE-L
against the other pool findings, the hardest single text for ROUGE-L; "medoid text": the findings
closest to the mean pool findings embedding), and the nearest pool case's findings copied verbatim.
95% intervals: percentile bootstrap resampling *cases* (all images of a drawn case together).
A draft that fails (GenerationError) counts as an empty draft and is counted in ``failed``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.errors import InvalidInput, MedsearchError, ModelNotAvailable, NotFound
from medsearch.metrics import lcs_f1, lcs_length, token_masks
from medsearch.search import Filters
from medsearch.text import words

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.encoders.base import Encoder
    from medsearch.rag.drafter import Drafter
    from medsearch.rag.records import Draft
    from medsearch.search import ImageQuery, Searcher

LABELS = ("modality_type", "body_region", "category")
METRICS = (
    "bleu4", "rougeL", "cosine", "agree_modality", "agree_region", "agree_category", "dx_hit", "supported", "cit_valid",
)  # fmt: skip
JUDGE = "towers"  # the frozen all-MiniLM-L6-v2 text tower: one cosine judge for every system and model
HEADERS = {
    "bleu4": "BLEU-4", "rougeL": "ROUGE-L", "cosine": "cosine", "agree_modality": "modality",
    "agree_region": "region", "agree_category": "category", "dx_hit": "dx hit", "supported": "supported", "cit_valid": "cit.valid",
}  # fmt: skip


@dataclass
class _System:
    name: str
    hyps: list[str] = field(default_factory=list)
    labels: list[dict[str, str | None]] = field(default_factory=list)
    supported: list[float] = field(default_factory=list)
    cit_valid: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    failed: int = 0
    fallbacks: int = 0
    sentences: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def _metric_libs() -> tuple[Any, Any]:
    try:
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU
    except ImportError as e:
        raise ModelNotAvailable(
            f"`eval drafts` needs sacrebleu and rouge-score ({e.name} is missing)", hint='pip install "medsearch[eval]"'
        ) from e
    return BLEU(), rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _findings(sections: dict[str, str]) -> str:
    return " ".join((sections.get("findings") or "").split())


@dataclass(frozen=True)
class _PoolCase:
    """A case evidence may come from: its findings and the labels of its first image (for the baselines)."""

    case_id: int
    case_key: str
    findings: str
    modality_type: str | None
    body_region: str | None
    category: str | None
    diagnosis: str | None = None

    def label(self, name: str) -> str | None:
        return (getattr(self, name) or "").lower() or None


def _pool_cases(searcher: Searcher, source: str | None, split: str) -> list[_PoolCase]:
    """Pool cases with findings, in id order."""
    cat = searcher.catalog
    cases = [c for c in cat.cases_where(split=split, source=source) if _findings(c.sections)]
    imgs = cat.case_images([c.case_id for c in cases])
    irows = cat.image_rows([v[0] for v in imgs.values() if v])
    out = []
    for c in cases:
        first = imgs.get(c.case_id)
        row = irows.get(first[0]) if first else None
        out.append(_PoolCase(
            case_id=c.case_id, case_key=c.case_key, findings=_findings(c.sections), category=c.category, diagnosis=c.diagnosis,
            modality_type=row.modality_type if row else None, body_region=row.body_region if row else None,
        ))  # fmt: skip
    return out


def _medoid_findings(searcher: Searcher, pool: list[_PoolCase]) -> _PoolCase:
    """The pool case whose findings are closest to the mean pool findings embedding."""
    texts = searcher.catalog.case_texts([c.case_id for c in pool], kind="section", sections=["findings"])
    ids = {c: rows[0].text_id for c, rows in texts.items() if rows}
    stored = searcher.catalog.get_vectors(searcher.model_id, "text", list(ids.values()))
    vecs = []
    for c in pool:
        v = stored.get(ids.get(c.case_id, -1))
        if v is None:
            v = searcher.encoder.encode_texts([c.findings])[0]
        vecs.append(v / max(float(np.linalg.norm(v)), 1e-12))
    V = np.stack(vecs)  # (n, d)
    mean = V.mean(axis=0)
    return pool[int(np.argmax(V @ mean))]


def _central_findings(pool: list[_PoolCase], tokenize: Callable[[str], list[str]], max_refs: int = 300,
                      seed: int = 0) -> _PoolCase:
    """The pool case whose findings score the highest mean ROUGE-L F1 against the other pool findings
    (a seeded sample of at most ``max_refs`` of them): the one text that does best on ROUGE-L for every query."""
    toks = [tokenize(c.findings) for c in pool]
    refs = np.arange(len(pool))
    if len(refs) > max_refs:
        refs = np.sort(np.random.default_rng(seed).choice(len(pool), size=max_refs, replace=False))
    ref_masks = [(int(j), token_masks(toks[j]), len(toks[j])) for j in refs if toks[j]]
    best, best_i = -1.0, 0
    for i, a in enumerate(toks):
        if not a:
            continue
        f = [lcs_f1(lcs_length(a, m, n), len(a), n) for j, m, n in ref_masks if j != i]
        mean = sum(f) / max(len(f), 1)
        if mean > best:
            best, best_i = mean, i
    return pool[best_i]


def _vote(draft: Draft) -> dict[str, str | None]:
    """Score-weighted majority label over the cases the draft cites (weight: citing sentences x score)."""
    by_n = {e.n: e for e in draft.evidence}
    weight: Counter[int] = Counter()
    for s in draft.sentences:
        for c in s.citations:
            weight[c.n] += max(by_n[c.n].score, 1e-3)
    out: dict[str, str | None] = {}
    for lab in LABELS:
        votes: Counter[str] = Counter()
        for n, w in weight.items():
            v = getattr(by_n[n], lab)
            if v:
                votes[v.lower()] += w
        out[lab] = votes.most_common(1)[0][0] if votes else None
    return out


def norm_dx(text: str | None) -> str:
    """A diagnosis for matching: lower case, words only, in order ("Glioblastoma (GBM)" -> "glioblastoma gbm")."""
    return " ".join(words(text))


def dx_match(truth: str | None, candidates: list[str | None]) -> float:
    """1.0 when a candidate diagnosis names the true one (equal words, or one's words contain the other's), else 0.0;
    NaN without a true diagnosis."""
    t = norm_dx(truth)
    if not t:
        return float("nan")
    tw = set(t.split())
    for c in candidates:
        cw = set(norm_dx(c).split())
        if cw and (cw == tw or (len(tw) >= 2 and tw <= cw) or (len(cw) >= 2 and cw <= tw)):
            return 1.0
    return 0.0


def _draft_dx(draft: Draft) -> list[str | None]:
    """Diagnoses of the cases cited by the IMPRESSION and DIFFERENTIAL sentences."""
    by_n = {e.n: e for e in draft.evidence}
    return [by_n[c.n].diagnosis for s in draft.sentences if s.section in ("impression", "differential") for c in s.citations]


def _case_bootstrap(
    per_item: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float, float]:
    """(mean, lo, hi) of per-item values (NaN ignored), resampling groups (cases) with replacement."""
    ok = ~np.isnan(per_item)
    if not ok.any():
        return (float("nan"),) * 3  # type: ignore[return-value]
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=np.where(ok, per_item, 0.0), minlength=len(uniq))  # (C,)
    cnts = np.bincount(inv, weights=ok.astype(float), minlength=len(uniq))  # (C,)
    sums, cnts = sums[cnts > 0], cnts[cnts > 0]  # a case with no defined value is not drawn
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))  # (B, C)
    boots = sums[idx].sum(axis=1) / np.maximum(cnts[idx].sum(axis=1), 1e-12)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(sums.sum() / cnts.sum()), float(lo), float(hi)


def _bleu_bootstrap(bleu: Any, stats: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Corpus BLEU-4 and its case-bootstrap interval from per-item sacrebleu statistics (n, 10)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    per_case = np.zeros((len(uniq), stats.shape[1]), dtype=np.int64)
    np.add.at(per_case, inv, stats)
    point = bleu._compute_score_from_stats(stats.sum(axis=0).tolist()).score
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    boots = [bleu._compute_score_from_stats(per_case[row].sum(axis=0).tolist()).score for row in idx]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return point / 100.0, float(lo) / 100.0, float(hi) / 100.0


def evaluate_drafts(
    searcher: Searcher,
    drafters: dict[str, Drafter],
    *,
    source: str | None,
    split: str = "dev",
    pool_split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    progress: Callable[[int, int], None] | None = None,
    judge: Encoder | None = None,
) -> dict[str, Any]:
    """Draft each image of ``split`` with every drafter; score against the case's findings (module docstring)."""
    bleu, rouge = _metric_libs()
    f = {"split": split, **({"source": source} if source else {})}
    ids = searcher.catalog.image_ids_where(f)
    if ids is None or len(ids) == 0:
        raise NotFound(
            f"no images of split {split!r}" + (f" in source {source!r}" if source else "") + " in the catalog",
            hint="ingest the dataset with that split first (`medsearch ingest DATASET`), or check --split",
        )
    rows = searcher.catalog.image_rows(sorted(int(i) for i in ids))
    queries = [r for r in rows.values() if _findings(r.sections)]
    skipped_no_findings = len(rows) - len(queries)
    if limit:
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(queries), size=min(limit, len(queries)), replace=False).tolist())
        queries = [queries[i] for i in pick]
    pool = _pool_cases(searcher, source, pool_split)
    if not pool:
        raise NotFound(f"no {pool_split!r} cases with findings to draw evidence from", hint="ingest the training split")
    pool_filters = Filters(split=pool_split, source=source)
    fixed = _central_findings(pool, rouge._tokenizer.tokenize, seed=seed)
    medoid = _medoid_findings(searcher, pool)
    rng = np.random.default_rng(seed + 1)

    systems = {name: _System(name) for name in drafters}
    base = {n: _System(n) for n in ("random case", "fixed text", "medoid text", "nearest case")}
    refs: list[str] = []
    truths: list[dict[str, str | None]] = []
    dx_hits: dict[str, list[float]] = {n: [] for n in [*drafters, *base]}
    groups: list[int] = []
    for qi, q in enumerate(queries):
        refs.append(_findings(q.sections))
        truths.append({"modality_type": q.modality_type, "body_region": q.body_region, "category": q.category})
        groups.append(q.case_id)
        query = searcher.image_query(q.image_id)  # resolved once for the baseline and every drafter
        # baselines
        others = [c for c in pool if c.case_id != q.case_id]
        rnd = others[int(rng.integers(len(others)))]
        nearest = _nearest(searcher, query, pool_filters)
        for sysname, c in (("random case", rnd), ("fixed text", fixed), ("medoid text", medoid), ("nearest case", nearest)):
            s = base[sysname]
            s.hyps.append(c.findings if c else "")
            s.labels.append({lab: c.label(lab) for lab in LABELS} if c else dict.fromkeys(LABELS))
            s.supported.append(np.nan)
            s.cit_valid.append(np.nan)
            dx_hits[sysname].append(dx_match(q.diagnosis, [c.diagnosis]) if (c and sysname == "nearest case") else np.nan)
        # drafters
        for name, drafter in drafters.items():
            s = systems[name]
            t0 = time.perf_counter()
            try:
                d = drafter.draft(query, filters=pool_filters)
            except MedsearchError as e:
                s.latency.append(time.perf_counter() - t0)
                s.failed += 1
                s.errors[type(e).__name__] += 1
                s.hyps.append("")
                s.labels.append(dict.fromkeys(LABELS))
                s.supported.append(0.0)
                s.cit_valid.append(np.nan)
                s.sentences.append(0)
                dx_hits[name].append(dx_match(q.diagnosis, []))
                continue
            s.latency.append(time.perf_counter() - t0)
            s.fallbacks += d.fallback_from is not None
            s.hyps.append(d.text("findings") or d.text())
            s.labels.append(_vote(d))
            s.supported.append(sum(x.supported for x in d.sentences) / max(len(d.sentences), 1))
            s.cit_valid.append(1.0 - d.invalid_citations_removed / d.citations_total if d.citations_total else np.nan)
            s.sentences.append(len(d.sentences))
            dx_hits[name].append(dx_match(q.diagnosis, _draft_dx(d)))
        if progress:
            progress(qi + 1, len(queries))

    # --- scoring
    if judge is None:
        from medsearch.encoders.registry import load_encoder

        judge = load_encoder(JUDGE, device="auto")
    enc = judge
    ref_vecs = enc.encode_texts(refs)  # (n, d)
    g = np.array(groups)
    table: dict[str, dict[str, Any]] = {}
    for s in [*systems.values(), *base.values()]:
        n = len(s.hyps)
        stats = np.array(bleu._extract_corpus_statistics(s.hyps, [refs]), dtype=np.int64)  # (n, 10)
        rl = np.array([rouge.score(r, h)["rougeL"].fmeasure if h else 0.0 for r, h in zip(refs, s.hyps, strict=True)])
        nonempty = [i for i, h in enumerate(s.hyps) if h.strip()]
        cos = np.zeros(n)
        if nonempty:
            hv = enc.encode_texts([s.hyps[i] for i in nonempty])
            cos[nonempty] = (hv * ref_vecs[nonempty]).sum(axis=1)
        agree = {}
        for lab, key in zip(LABELS, ("agree_modality", "agree_region", "agree_category"), strict=True):
            vals = []
            for pred, truth in zip(s.labels, truths, strict=True):
                t = (truth.get(lab) or "").lower()
                vals.append(np.nan if not t else float(bool(pred.get(lab)) and pred.get(lab) == t))
            agree[key] = np.array(vals)
        per_item = {
            "rougeL": rl, "cosine": cos, **agree,
            "dx_hit": np.array(dx_hits[s.name], dtype=float),
            "supported": np.array(s.supported, dtype=float), "cit_valid": np.array(s.cit_valid, dtype=float),
        }  # fmt: skip
        row: dict[str, Any] = {}
        b = _bleu_bootstrap(bleu, stats, g, n_boot, seed)
        row["bleu4"] = {"value": b[0], "ci95": [b[1], b[2]]}
        for key, vals in per_item.items():
            m, lo, hi = _case_bootstrap(vals, g, n_boot, seed)
            row[key] = {"value": None if np.isnan(m) else m, "ci95": [None, None] if np.isnan(m) else [lo, hi]}
        if s.latency:
            lat = np.array(s.latency)
            row["latency_s"] = {"mean": float(lat.mean()), "median": float(np.median(lat)), "p95": float(np.quantile(lat, 0.95))}
            row["failed"] = s.failed
            row["fallbacks"] = s.fallbacks
            row["errors"] = dict(s.errors)
            row["sentences_mean"] = float(np.mean(s.sentences)) if s.sentences else 0.0
        table[s.name] = row
    return {
        "source": source,
        "split": split,
        "pool_split": pool_split,
        "images": len(queries),
        "cases": len(set(groups)),
        "skipped_no_findings": skipped_no_findings,
        "pool_cases": len(pool),
        "fixed_text_case": fixed.case_key,
        "medoid_text_case": medoid.case_key,
        "model": searcher.model_id,
        "judge": "all-MiniLM-L6-v2 (frozen towers text side)",
        "n_boot": n_boot,
        "seed": seed,
        "systems": table,
        "generators": {name: {"generator": d.generator.name, "model": d.generator.model} for name, d in drafters.items()},
    }


def _nearest(searcher: Searcher, query: ImageQuery, filters: Filters) -> _PoolCase | None:
    """The nearest pool case (with findings) to a query image, own case and patient excluded."""
    hits = searcher.similar(query, k=5, filters=filters, exclude_same_case=True, exclude_same_patient=True)
    rows = searcher.catalog.image_rows([h.image_id for h in hits if h.image_id is not None])
    for h in hits:
        r = rows.get(h.image_id)
        if r and _findings(r.sections):
            return _PoolCase(case_id=r.case_id, case_key=r.case_key, findings=_findings(r.sections),
                             modality_type=r.modality_type, body_region=r.body_region, category=r.category,
                             diagnosis=r.diagnosis)  # fmt: skip
    return None


def format_table(result: dict[str, Any]) -> str:
    """The result as a fixed-width table: one row per system, value [95% CI] per metric."""
    if not result.get("systems"):
        raise InvalidInput("empty evaluation result", hint="evaluate at least one image")
    cols = METRICS
    head = f"{'system':<26}" + "".join(f"{HEADERS[c]:>21}" for c in cols)
    lines = [
        f"eval drafts: {result['source'] or 'all sources'} {result['split']} ({result['images']} images, "
        f"{result['cases']} cases) vs {result['pool_split']} pool ({result['pool_cases']} cases), model {result['model']}, "
        f"cosine judge {result.get('judge', '-')}, "
        f"95% CI by case bootstrap (n={result['n_boot']})",
        head,
        "-" * len(head),
    ]
    for name, row in result["systems"].items():
        label = name
        if name in result.get("generators", {}):
            label = f"{name} [{result['generators'][name]['model']}]"[:25]
        cells = []
        for c in cols:
            v = row[c]["value"]
            if v is None:
                cells.append(f"{'-':>21}")
            else:
                lo, hi = row[c]["ci95"]
                cells.append(f"{v:>7.3f} [{lo:.3f},{hi:.3f}]")
        lines.append(f"{label:<26}" + "".join(f"{x:>21}" for x in cells))
    lines.append("")
    for name, row in result["systems"].items():
        if "latency_s" in row:
            lat = row["latency_s"]
            lines.append(
                f"{name}: latency per image mean {lat['mean']:.3f}s, median {lat['median']:.3f}s, p95 {lat['p95']:.3f}s; "
                f"{row['sentences_mean']:.1f} sentences/draft; failed {row['failed']}, fallbacks {row['fallbacks']}"
                + (f" {row['errors']}" if row["errors"] else "")
            )
    lines.append(
        f"fixed text = findings of pool case {result['fixed_text_case']} (best mean ROUGE-L against the pool); "
        f"medoid text = findings of pool case {result.get('medoid_text_case', '-')} (pool embedding medoid)"
    )
    return "\n".join(lines)
