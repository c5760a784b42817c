"""The default generator: no LLM, sentences chosen from the evidence by consensus.

For every candidate sentence i of evidence case c(i) (findings sentences for FINDINGS,
impression/diagnosis sentences for IMPRESSION), with case weights w = exp((score - best) / T):

    agreement(i) = sum_{c != c(i)} w_c * max_{j in c} cos(i, j) / sum_{c != c(i)} w_c
                   (is it said by the other retrieved cases too?)
    centroid(i)  = cos(i, weighted mean of all candidate vectors)   (is it typical of the set?)
    case(i)      = w_{c(i)} / max w                                 (how close is its case?)
    image(i)     = cos(query image, i), min-max scaled              (shared space only)
    typical(i)   = mean share of the pool's findings holding each word of i   (rag.wording)
    score(i)     = a * agreement + b * centroid + c * case + d * image + wording * typical

Sentences are then taken greedily by score, skipping near-duplicates (cosine >= duplicate)
and contradictions (a negation mismatch, "no effusion" vs "small effusion", between
sentences on the same topic, cosine >= contradiction), and written in report order. Each
sentence cites its own case plus every other case that says nearly the same (corroborate).
"""

from __future__ import annotations

import re

import numpy as np

from medsearch.errors import GenerationError
from medsearch.rag.config import ExtractiveConfig
from medsearch.rag.evidence import EvidencePack
from medsearch.rag.generators.base import Generation, OnToken
from medsearch.rag.grounding import Proposed
from medsearch.text import words

_NEGATION = re.compile(
    r"\b(no|not|without|absent|absence|negative|free of|unremarkable|normal|resolved|ruled out|none)\b", re.IGNORECASE
)


def is_negated(text: str) -> bool:
    """True when a sentence denies a finding ("No pleural effusion.", "Unremarkable liver.")."""
    return bool(_NEGATION.search(text))


def consensus_scores(pack: EvidencePack, cand: np.ndarray, cfg: ExtractiveConfig) -> np.ndarray:
    """(c,) scores of candidate sentence indices ``cand`` (see the module docstring)."""
    scores = np.array([c.score for c in pack.cases], dtype=np.float32)  # (k,)
    w = np.exp((scores - scores.max()) / max(cfg.temperature, 1e-6))  # (k,)
    V = pack.sent_vecs[cand]  # (c, d)
    S = V @ V.T  # (c, c)
    owner = pack.sent_case[cand]  # (c,)
    cases = np.unique(owner)
    # best match of each candidate inside each case: (c, n_cases)
    best = np.stack([S[:, owner == k].max(axis=1) for k in cases], axis=1)
    wk = w[cases]  # (n_cases,)
    other = owner[:, None] != cases[None, :]  # (c, n_cases)
    denom = (other * wk).sum(axis=1)
    agreement = np.where(denom > 0, (best * other * wk).sum(axis=1) / np.maximum(denom, 1e-12), 0.0)
    per_sent = w[owner] / np.bincount(owner, minlength=len(scores))[owner]  # each case weighs w_c in total
    cen = (V * per_sent[:, None]).sum(axis=0)
    cen /= max(float(np.linalg.norm(cen)), 1e-12)
    centroid = V @ cen
    case_rel = w[owner] / w.max()
    a, b, c, d = cfg.weights
    out = a * agreement + b * centroid + c * case_rel
    if pack.image_text is not None:
        it = pack.image_text[cand]
        span = float(it.max() - it.min())
        out = out + d * ((it - it.min()) / span if span > 0 else np.zeros_like(it))
    if pack.sent_typical is not None and cfg.wording:
        out = out + cfg.wording * pack.sent_typical[cand]
    return out.astype(np.float32)


def _candidates(pack: EvidencePack, sections: tuple[str, ...], cfg: ExtractiveConfig) -> np.ndarray:
    keep = [
        i for i, (sec, t) in enumerate(zip(pack.sent_section, pack.sent_text, strict=True))
        if sec in sections and cfg.min_words <= len(t.split()) <= cfg.max_words
    ]  # fmt: skip
    return np.array(keep, dtype=np.int64)


def select(pack: EvidencePack, cand: np.ndarray, limit: int, cfg: ExtractiveConfig, section: str) -> list[Proposed]:
    """Greedy consensus selection of up to ``limit`` sentences among ``cand``, in report order."""
    if len(cand) == 0 or limit <= 0:
        return []
    score = consensus_scores(pack, cand, cfg)
    V = pack.sent_vecs[cand]
    S = V @ V.T  # (c, c)
    neg = np.array([is_negated(pack.sent_text[i]) for i in cand])
    chosen: list[int] = []  # positions in cand
    for p in np.argsort(-score, kind="stable"):
        if len(chosen) >= limit:
            break
        if any(S[p, q] >= cfg.duplicate for q in chosen):
            continue
        if any(neg[p] != neg[q] and S[p, q] >= cfg.contradiction for q in chosen):
            continue
        chosen.append(int(p))
    owner = pack.sent_case[cand]
    out: list[tuple[float, float, Proposed]] = []
    for p in chosen:
        i = int(cand[p])
        own_n = int(pack.sent_case[i]) + 1
        cites = [own_n]
        for k in np.unique(owner):
            n = int(k) + 1
            if n != own_n and S[p, owner == k].max() >= cfg.corroborate:
                cites.append(n)
        out.append((float(pack.sent_seq[i]), -float(score[p]), Proposed(section, pack.sent_text[i], sorted(cites))))
    out.sort(key=lambda t: (t[0], t[1]))
    return [p for *_, p in out]


def case_weights(pack: EvidencePack, cfg: ExtractiveConfig) -> np.ndarray:
    """(k,) weights of the evidence cases: exp((score - best) / temperature)."""
    scores = np.array([c.score for c in pack.cases], dtype=np.float32)
    return np.exp((scores - scores.max()) / max(cfg.temperature, 1e-6))


def consensus_findings(pack: EvidencePack, cand: np.ndarray, cfg: ExtractiveConfig) -> list[Proposed]:
    """FINDINGS by consensus: cluster candidates by meaning, one representative per supported cluster.

    Clusters: greedy by consensus score, a sentence joins the first cluster whose seed it matches
    with cosine >= ``cluster``. Inside a cluster, a negation conflict ("no effusion" vs "effusion")
    is settled by the summed weights of the cases on each side; the cluster's score is the summed
    weight of the distinct cases on the winning side. Clusters scoring >= ``keep_share`` of the best
    one are kept (at most ``max_findings``), each written once, in report order.
    """
    if len(cand) == 0:
        return []
    w = case_weights(pack, cfg)
    score = consensus_scores(pack, cand, cfg)
    V = pack.sent_vecs[cand]
    S = V @ V.T
    owner = pack.sent_case[cand]
    neg = np.array([is_negated(pack.sent_text[i]) for i in cand])
    seeds: list[int] = []
    members: list[list[int]] = []
    for p in np.argsort(-score, kind="stable"):
        for ci, seed in enumerate(seeds):
            if S[p, seed] >= cfg.cluster:
                members[ci].append(int(p))
                break
        else:
            seeds.append(int(p))
            members.append([int(p)])
    clusters: list[tuple[float, int, list[int]]] = []  # (score, representative, supporting members)
    for mem in members:
        sides = {}
        for polarity in (False, True):
            side = [p for p in mem if neg[p] == polarity]
            if side:
                sides[polarity] = (float(w[np.unique(owner[side])].sum()), side)
        win = max(sides.values(), key=lambda t: t[0])
        rep = max(win[1], key=lambda p: score[p])
        clusters.append((win[0], rep, win[1]))
    clusters.sort(key=lambda t: -t[0])
    top = clusters[0][0]
    kept = [c for c in clusters if c[0] >= cfg.keep_share * top][: cfg.max_findings]
    kept = kept[: max(cfg.min_findings, 1)] if len(kept) < cfg.min_findings else kept
    out: list[tuple[float, float, Proposed]] = []
    for _, rep, mem in kept:
        i = int(cand[rep])
        cites = sorted({int(owner[p]) + 1 for p in mem if p == rep or S[rep, p] >= cfg.corroborate})
        out.append((float(pack.sent_seq[i]), -float(score[rep]), Proposed("findings", pack.sent_text[i], cites)))
    out.sort(key=lambda t: (t[0], t[1]))
    return [p for *_, p in out]


def _norm_dx(text: str | None) -> str:
    return " ".join(words(text))


def _case_texts(pack: EvidencePack, k: int) -> list[tuple[str, str, int]]:
    return [(pack.sent_section[i], pack.sent_text[i], k) for i in pack.case_sentences(k)]


def same_diagnosis(a: str, b: str) -> bool:
    """True when two normalised diagnoses name the same thing: equal words, or one's words (>= 2) inside the other's
    ("glioblastoma multiforme" and "glioblastoma multiforme gbm"; never "cyst" inside "colloid cyst")."""
    wa, wb = set(a.split()), set(b.split())
    return bool(wa and wb) and (wa == wb or (len(wa) >= 2 and wa <= wb) or (len(wb) >= 2 and wb <= wa))


def diagnosis_votes(pack: EvidencePack, cfg: ExtractiveConfig) -> list[tuple[str, float, list[int]]]:
    """[(diagnosis, share of the case weight, citing case numbers)] best first, from the evidence cases' diagnoses.

    Cases vote closest first; a diagnosis naming the same thing as an earlier one (``same_diagnosis``) adds
    its weight to that vote, whose wording is the closest case's."""
    w = case_weights(pack, cfg)
    votes: list[list] = []  # [text, weight, case numbers, normalised key]
    voters: list[int] = []
    for k in sorted(range(len(pack.cases)), key=lambda j: -float(w[j])):
        case = pack.cases[k]
        # only the guarded diagnosis sentences (never the raw catalog field: it may carry instructions)
        dx = [t for sec, t, _ in _case_texts(pack, k) if sec == "diagnosis"]
        key = _norm_dx(" ".join(dx))
        if not key:
            continue
        voters.append(k)
        v = next((v for v in votes if same_diagnosis(v[3], key)), None) if cfg.merge_diagnoses else None
        v = v or next((v for v in votes if v[3] == key), None)
        if v is None:
            v = [dx[0] if len(dx) == 1 else " ".join(dx), 0.0, [], key]
            votes.append(v)
        v[1] += float(w[k])
        v[2].append(case.n)
    total = float(w[voters].sum()) if voters else 0.0
    ranked = sorted(votes, key=lambda v: -v[1])
    return [(v[0], v[1] / total, sorted(v[2])) for v in ranked] if total > 0 else []


def impression_and_differential(pack: EvidencePack, cfg: ExtractiveConfig) -> list[Proposed]:
    """IMPRESSION: the diagnosis the evidence agrees on (share >= ``consensus``), else "no consensus";
    DIFFERENTIAL: the next diagnoses (share >= ``differential_share``, at most ``max_differential``)."""
    votes = diagnosis_votes(pack, cfg)
    if not votes:
        return []
    out: list[Proposed] = []
    dx, share, cites = votes[0]
    rest = votes[1:]
    if share >= cfg.consensus and (len(cites) >= 2 or len(pack.cases) == 1):
        out.append(Proposed("impression", dx, cites))
    else:
        out.append(Proposed(
            "impression", f"No consensus diagnosis; most supported: {dx.rstrip('. ')} ({share:.0%} of the evidence).",
            cites,
        ))  # fmt: skip
    for dx2, share2, cites2 in rest[: cfg.max_differential]:
        if share2 < cfg.differential_share:
            break
        out.append(Proposed("differential", f"{dx2.rstrip('. ')} ({share2:.0%} of the evidence).", cites2))
    return out


class ExtractiveGenerator:
    """Consensus extraction from the evidence (no LLM). ``model`` is 'extractive'."""

    name = "extractive"

    def __init__(self, config: ExtractiveConfig = ExtractiveConfig()) -> None:
        self.config = config

    @property
    def model(self) -> str:
        return "extractive-consensus"

    def generate(self, pack: EvidencePack, on_token: OnToken | None = None) -> Generation:
        """FINDINGS and IMPRESSION sentences chosen from the evidence; ``on_token`` is not used."""
        cfg = self.config
        cand = _candidates(pack, cfg.findings_sections, cfg)
        if len(cand) == 0:  # no findings text in the evidence: fall back to image captions
            cand = _candidates(pack, ("caption",), cfg)
        if cfg.cluster_findings:
            findings = consensus_findings(pack, cand, cfg)
        else:
            findings = select(pack, cand, cfg.max_findings, cfg, "findings")
        if cfg.voted_impression:
            impression = impression_and_differential(pack, cfg)
            if not impression:  # no evidence case has a diagnosis: its impression sentences
                impression = select(pack, _impression_candidates(pack, cfg), cfg.max_impression, cfg, "impression")
        else:
            impression = select(pack, _impression_candidates(pack, cfg), cfg.max_impression, cfg, "impression")
        if not findings and not impression:
            raise GenerationError(
                f"the {len(pack.cases)} evidence cases for {pack.query} have no report sentences to draft from",
                hint="ingest cases with findings text, or use an LLM generator",
            )
        return Generation(model=self.model, sentences=findings + impression)


def _impression_candidates(pack: EvidencePack, cfg: ExtractiveConfig) -> np.ndarray:
    """Impression/diagnosis sentences; short diagnoses ("Bladder diverticulum") are allowed."""
    keep = [
        i for i, (sec, t) in enumerate(zip(pack.sent_section, pack.sent_text, strict=True))
        if sec in cfg.impression_sections and 1 <= len(t.split()) <= cfg.max_words
    ]  # fmt: skip
    return np.array(keep, dtype=np.int64)
