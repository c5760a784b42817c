"""Evidence selection: the prior cases a draft may cite, and their report sentences.

    image ─► Searcher.image_query (resolved once: a catalog image's stored vector, else encoded once)
          ├► Searcher.similar (image->image; own case and patient excluded)
          └► Searcher.search_reports with the image vector (image->text, only in a shared space)
       ─► fused ranking ─► rerank by similarity + metadata fit (the query's modality, region, plane;
          voted by the neighbours when the query has none) ─► adaptive k (stop at a sharp drop)
       ─► sentences (findings, impression, diagnosis, matched caption), guarded, off-target ones
          (another modality or view, unless every evidence case names it) dropped, with vectors
          (and, given a wording prior, how typical each sentence's wording is of the pool's findings)

Without a shared space (the frozen towers) the report text of the image->image neighbours is
the evidence; with one (the trained lite model, CLIP) image->text hits join the ranking and
every sentence also gets its image-text similarity, which the extractive generator uses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.catalog import CaseRow, ImageRow
from medsearch.errors import NotFound
from medsearch.rag.config import EvidenceConfig
from medsearch.rag.fit import Target, allowed_terms, foreign_terms, metadata_fit, norm_modality, query_target
from medsearch.rag.guard import neutralise
from medsearch.rag.records import EvidenceCase, EvidenceSentence
from medsearch.rag.wording import WordingPrior
from medsearch.search import Filters, ImageQuery, rrf

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from medsearch.search import Searcher


@dataclass
class EvidencePack:
    """Evidence cases plus the flat arrays generators and grounding work on."""

    cases: list[EvidenceCase]
    sent_case: np.ndarray  # (m,) int: index into ``cases`` of each sentence
    sent_section: list[str]  # (m,)
    sent_text: list[str]  # (m,)
    sent_seq: np.ndarray  # (m,) float: relative position in its section, 0..1
    sent_vecs: np.ndarray  # (m, d) float32, unit norm, text space of the encoder
    image_text: np.ndarray | None  # (m,) float32 cosine(query image, sentence) in a shared space
    own: ImageRow | None  # catalog row of the query image when it is in the catalog
    query: str
    target: Target | None = None  # the modality, region and plane the evidence was fitted to
    off_target: int = 0  # sentences dropped for naming another modality or view
    sent_typical: np.ndarray | None = None  # (m,) float32 wording typicality of each sentence (rag.wording)

    def case_sentences(self, i: int) -> np.ndarray:
        """Indices of the sentences of case ``i``."""
        return np.flatnonzero(self.sent_case == i)


def adaptive_cut(scores: list[float], k_min: int, drop: float, below_top: float) -> int:
    """How many of ``scores`` (best first) to keep: stop before a sharp drop.

    Keeps at least ``k_min``; after that, stops at the first score that is more than ``drop``
    below the previous one or more than ``below_top`` below the best one.
    """
    n = len(scores)
    if n <= k_min:
        return n
    for i in range(max(k_min, 1), n):
        if scores[i - 1] - scores[i] > drop or scores[0] - scores[i] > below_top:
            return i
    return n


def _weighted_majority(values: list[str | None], weights: list[float]) -> str | None:
    c: Counter[str] = Counter()
    for v, w in zip(values, weights, strict=True):
        if v:
            c[v.lower()] += w
    return c.most_common(1)[0][0] if c else None


def select_evidence(
    searcher: Searcher,
    image: str | Path | int | Image.Image | ImageQuery,
    config: EvidenceConfig = EvidenceConfig(),
    filters: Filters = Filters(),
    prior: WordingPrior | None = None,
) -> EvidencePack:
    """Retrieve, cut and load the evidence for one query image (see the module docstring); with a wording
    ``prior`` every sentence also gets its typicality (``EvidencePack.sent_typical``)."""
    q = searcher.image_query(image)  # resolved once: decoded and encoded at most once
    shared = bool(searcher.encoder.shared_space)
    exclude = {"exclude_same_case": config.exclude_same_case, "exclude_same_patient": config.exclude_same_patient}
    fetch = config.k_max * (3 if config.metadata_weight > 0 else 1)  # a wider pool to rerank by metadata
    hits = searcher.similar(q, k=fetch, filters=filters, per_case=True, **exclude)
    # image->image: adaptive cut on the cosine scores
    keep = adaptive_cut([h.score for h in hits][: config.k_max], config.k_min, config.drop, config.below_top)
    if config.metadata_weight <= 0:
        hits = hits[:keep]
    by_case: dict[int, dict[str, Any]] = {
        h.case_id: {"hit": h, "score": h.score, "matched": "image", "text_score": None} for h in hits
    }
    if shared and searcher.has_index("text"):
        # image->text: cases ranked by their best report sentence (or caption) for the image vector
        text_hits = searcher.search_reports(
            q, k=config.k_max, filters=filters, sections=(*config.sections, "caption"), fetch=config.k_max * 20,
            **exclude,
        )  # fmt: skip
        ranking = rrf([[h.case_id for h in hits], [h.case_id for h in text_hits]])
        text_by_case = {h.case_id: h for h in text_hits}
        order = [c for c, _ in ranking][: fetch if config.metadata_weight > 0 else max(keep, config.k_min)]
        for c in order:
            th = text_by_case.get(c)
            if c not in by_case:
                by_case[c] = {"hit": th, "score": th.score, "matched": "text", "text_score": th.score}
            else:
                by_case[c]["text_score"] = th.score if th else None
                if th is not None:
                    by_case[c]["matched"] = "fused"
        case_order = order
    else:
        case_order = [h.case_id for h in hits]
    if not case_order:
        raise NotFound(
            f"no similar cases to draft from for {q.name}" + (f" with filters {_fmt(filters)}" if not filters.empty() else ""),
            hint="ingest and index more cases (`medsearch ingest`, `medsearch index`), or loosen the filters",
        )
    rows = _case_rows(searcher, case_order, by_case)
    weights = [max(by_case[c]["score"], 1e-3) for c in case_order]
    labels = {c: (_image_field(rows[c], "modality_type"), _image_field(rows[c], "body_region"),
                  _image_field(rows[c], "plane")) for c in case_order}  # fmt: skip
    own = (q.row.modality_type, q.row.body_region, q.row.plane) if q.row is not None else None
    target = query_target(own, [labels[c] for c in case_order], weights)
    if config.metadata_weight > 0:
        # image similarity plus agreement with the query's own (or voted) modality, region and plane
        fit = {c: metadata_fit(target, labels[c]) for c in case_order}
        case_order = sorted(case_order, key=lambda c: -(by_case[c]["score"] + config.metadata_weight * fit[c]))
        # keep the cases agreeing on the query's OWN modality and region (voted labels only rerank)
        strict = [
            c for c in case_order
            if (not target.modality_own or norm_modality(labels[c][0]) == target.modality)
            and (not target.region_own or (labels[c][1] or "").lower() == target.region)
        ]  # fmt: skip
        if len(strict) >= config.k_min:
            case_order = strict
        case_order = sorted(case_order[: max(keep, config.k_min)], key=lambda c: -by_case[c]["score"])  # C1 = closest
    elif config.coherent_labels and len(case_order) > config.k_min:
        mod = _weighted_majority([labels[c][0] for c in case_order], weights)
        reg = _weighted_majority([labels[c][1] for c in case_order], weights)
        agree = [
            c for c in case_order
            if (mod is None or (labels[c][0] or "").lower() in (mod, ""))
            and (reg is None or (labels[c][1] or "").lower() in (reg, ""))
        ]  # fmt: skip
        if len(agree) >= config.k_min:
            case_order = agree
    pack = _load_sentences(searcher, case_order, by_case, rows, q.vector if shared else None, q, config, target)
    if prior is not None:
        pack.sent_typical = prior.typicality(pack.sent_text)
    return pack


def _fmt(filters: Filters) -> str:
    return ", ".join(f"{k}={v}" for k, v in filters.as_dict().items() if v)


def _image_field(row: ImageRow | CaseRow, name: str) -> str | None:
    """An image-level field of an evidence row (None for a case without images)."""
    return getattr(row, name) if isinstance(row, ImageRow) else None


def _case_rows(
    searcher: Searcher, case_order: list[int], by_case: dict[int, dict[str, Any]]
) -> dict[int, ImageRow | CaseRow]:
    """The matched image's row for each case (a report hit's image is its case's first image), else the case row."""
    cat = searcher.catalog
    image_of = {c: by_case[c]["hit"].image_id for c in case_order}
    irows = cat.image_rows([i for i in image_of.values() if i is not None])
    no_image = cat.case_rows([c for c in case_order if image_of[c] not in irows])
    return {c: irows.get(image_of[c]) or no_image[c] for c in case_order}


def _load_sentences(
    searcher: Searcher,
    case_order: list[int],
    by_case: dict[int, dict[str, Any]],
    rows: dict[int, ImageRow | CaseRow],
    q_img: np.ndarray | None,
    query: ImageQuery,
    config: EvidenceConfig,
    target: Target,
) -> EvidencePack:
    cat = searcher.catalog
    enc = searcher.encoder
    texts = cat.case_texts(case_order, kind="sentence", sections=config.sections)
    images = {c: r for c, r in rows.items() if isinstance(r, ImageRow)}
    cap_ids = cat.caption_ids([r.image_id for r in images.values()]) if config.captions else {}
    section_rank = {s: i for i, s in enumerate(config.sections)}
    cases: list[EvidenceCase] = []
    flat: list[tuple[int, str, str, float, int | None]] = []  # (case index, section, text, rel pos, text id)
    # a modality or view every evidence case names stays allowed; any other foreign one drops the sentence
    allowed = allowed_terms([[t.text for t in texts.get(c, [])] for c in case_order]) if config.fit_sentences else set()
    off_target = 0
    for n, c in enumerate(case_order, 1):
        row, img = rows[c], images.get(c)
        items = sorted(texts.get(c, []), key=lambda r: (section_rank.get(r.section, 99), r.seq))
        raw: list[tuple[str, str, int | None]] = [(r.section, r.text, r.text_id) for r in items]
        if config.captions and img is not None and img.caption:
            raw.append(("caption", img.caption, cap_ids.get(img.image_id)))
        # guard first, so dropped (instruction-like) sentences leave no trace in positions or caps
        guarded: list[tuple[str, str, int | None]] = []
        dropped = 0
        for section, text, tid in raw:
            clean, d = neutralise([text])
            dropped += d
            if clean and config.fit_sentences and section != "diagnosis" and foreign_terms(clean[0], target) - allowed:
                off_target += 1
                continue
            if clean:  # a sentence changed by scrubbing no longer matches its stored vector: re-encode it
                guarded.append((section, clean[0], tid if clean[0] == " ".join(text.split()) else None))
        seen: Counter[str] = Counter()
        capped = []
        for g in guarded:  # at most max_sentences per section
            seen[g[0]] += 1
            if seen[g[0]] <= config.max_sentences:
                capped.append(g)
        guarded = capped
        per_section: Counter[str] = Counter(s for s, _, _ in guarded)
        pos: Counter[str] = Counter()
        kept_sents: list[EvidenceSentence] = []
        for section, text, tid in guarded:
            i = pos[section]
            pos[section] += 1
            kept_sents.append(EvidenceSentence(text=text, section=section, text_id=tid))
            flat.append((n - 1, section, text, i / max(per_section[section] - 1, 1), tid))
        cases.append(
            EvidenceCase(
                n=n, case_id=c, case_key=row.case_key, source=row.source, score=round(float(by_case[c]["score"]), 6),
                image_id=img.image_id if img else None, image_key=img.image_key if img else None,
                matched=by_case[c]["matched"], modality_type=img.modality_type if img else None,
                body_region=img.body_region if img else None, category=row.category, diagnosis=row.diagnosis,
                split=row.split,
                sentences=tuple(kept_sents), neutralised=dropped,
            )  # fmt: skip
        )
    m = len(flat)
    vecs = np.zeros((m, int(enc.text_dim)), dtype=np.float32)  # (m, d)
    stored = cat.get_vectors(searcher.model_id, "text", [t for *_, t in flat if t is not None])
    missing = [j for j, f in enumerate(flat) if f[4] is None or f[4] not in stored]
    for j, f in enumerate(flat):
        if f[4] is not None and f[4] in stored:
            vecs[j] = stored[f[4]]
    if missing:
        vecs[missing] = enc.encode_texts([flat[j][2] for j in missing])
    if m:
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)  # float16 storage -> renormalise
    image_text = (vecs @ q_img[0]).astype(np.float32) if (q_img is not None and m) else None  # (m,)
    return EvidencePack(
        cases=cases,
        sent_case=np.array([f[0] for f in flat], dtype=np.int64),
        sent_section=[f[1] for f in flat],
        sent_text=[f[2] for f in flat],
        sent_seq=np.array([f[3] for f in flat], dtype=np.float32),
        sent_vecs=vecs,
        image_text=image_text,
        own=query.row,
        query=query.name,
        target=target,
        off_target=off_target,
    )
