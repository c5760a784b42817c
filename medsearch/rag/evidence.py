"""Evidence selection: the prior cases a draft may cite, and their report sentences.

    image ─► Searcher.similar (image->image; own case and patient excluded)
          └► text index searched with the image vector (image->text, only in a shared space)
       ─► fused ranking ─► adaptive k (stop at a sharp similarity drop) ─► label coherence
       ─► sentences (findings, impression, diagnosis, matched caption), guarded, with vectors

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

from medsearch.errors import NotFound
from medsearch.rag.config import EvidenceConfig
from medsearch.rag.guard import neutralise
from medsearch.rag.records import EvidenceCase, EvidenceSentence
from medsearch.search import Filters, rrf

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
    own: dict[str, Any] | None  # catalog row of the query image when it is in the catalog
    query: str

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
    image: str | Path | int | Image.Image,
    config: EvidenceConfig = EvidenceConfig(),
    filters: Filters = Filters(),
) -> EvidencePack:
    """Retrieve, cut and load the evidence for one query image (see the module docstring)."""
    enc = searcher.encoder
    shared = bool(enc.shared_space)
    hits = searcher.similar(
        image, k=config.k_max, filters=filters, per_case=True,
        exclude_same_case=config.exclude_same_case, exclude_same_patient=config.exclude_same_patient,
    )  # fmt: skip
    # the image vector again for image->text (a catalog image reuses its stored vector)
    q_img, own = searcher.image_query_vector(image) if shared else (None, None)
    # image->image: adaptive cut on the cosine scores
    keep = adaptive_cut([h.score for h in hits], config.k_min, config.drop, config.below_top)
    hits = hits[:keep]
    by_case: dict[int, dict[str, Any]] = {
        h.case_id: {"hit": h, "score": h.score, "matched": "image", "text_score": None} for h in hits
    }
    if shared and q_img is not None and searcher.has_index("text"):
        text_rank = _image_to_text_cases(searcher, q_img, own, config, filters)
        ranking = rrf([[h.case_id for h in hits], [c for c, _ in text_rank]])
        text_scores = dict(text_rank)
        order = [c for c, _ in ranking][: max(keep, config.k_min)]
        for c in order:
            if c not in by_case:
                by_case[c] = {"hit": None, "score": text_scores[c], "matched": "text", "text_score": text_scores[c]}
            else:
                by_case[c]["text_score"] = text_scores.get(c)
                if c in text_scores:
                    by_case[c]["matched"] = "fused"
        case_order = order
    else:
        case_order = [h.case_id for h in hits]
    if not case_order:
        raise NotFound(
            f"no similar cases to draft from for {_name(image)}" + (f" with filters {_fmt(filters)}" if not filters.empty() else ""),
            hint="ingest and index more cases (`medsearch ingest`, `medsearch index`), or loosen the filters",
        )
    rows = _case_rows(searcher, case_order, by_case)
    if config.coherent_labels and len(case_order) > config.k_min:
        weights = [max(by_case[c]["score"], 1e-3) for c in case_order]
        mod = _weighted_majority([rows[c].get("modality_type") for c in case_order], weights)
        reg = _weighted_majority([rows[c].get("body_region") for c in case_order], weights)
        agree = [
            c for c in case_order
            if (mod is None or (rows[c].get("modality_type") or "").lower() in (mod, ""))
            and (reg is None or (rows[c].get("body_region") or "").lower() in (reg, ""))
        ]  # fmt: skip
        if len(agree) >= config.k_min:
            case_order = agree
    return _load_sentences(searcher, case_order, by_case, rows, q_img, own, config, _name(image))


def _name(image: Any) -> str:
    if isinstance(image, Path) or (isinstance(image, str) and Path(image).exists()):
        return Path(image).name
    if isinstance(image, (str, int)):
        return f"image {image}"
    return "the query image"


def _fmt(filters: Filters) -> str:
    return ", ".join(f"{k}={v}" for k, v in filters.as_dict().items() if v)


def _image_to_text_cases(
    searcher: Searcher, q_img: np.ndarray, own: dict[str, Any] | None, config: EvidenceConfig, filters: Filters
) -> list[tuple[int, float]]:
    """Cases ranked by their best report sentence for the image vector (shared space only)."""
    idx = searcher.index("text")
    allowed = searcher.catalog.text_ids_where(filters.as_dict())
    fetch = config.k_max * 20
    fetch = min(fetch, idx.ntotal if allowed is None else len(allowed))
    if fetch <= 0:
        return []
    D, I = idx.search(q_img, fetch, allowed=allowed)  # (1, fetch)
    ids = [int(i) for i in I[0] if i >= 0]
    trows = searcher.catalog.text_rows(ids)
    cases = {r["case_id"] for r in trows.values()}
    patients = _patients(searcher, cases)
    best: dict[int, float] = {}
    for i, s in zip(I[0], D[0], strict=True):
        r = trows.get(int(i))
        if r is None or r["section"] not in (*config.sections, "caption"):
            continue
        c = r["case_id"]
        if own is not None and config.exclude_same_case and c == own["case_id"]:
            continue
        if own is not None and config.exclude_same_patient and own.get("patient_key") and patients.get(c) == own["patient_key"]:
            continue
        if c not in best:
            best[c] = float(s)
    return sorted(best.items(), key=lambda kv: -kv[1])[: config.k_max]


def _patients(searcher: Searcher, case_ids: set[int]) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for c in case_ids:
        out[c] = None
    if not case_ids:
        return out
    qs = ",".join("?" * len(case_ids))
    for cid, pk in searcher.catalog.db.execute(f"SELECT id, patient_key FROM cases WHERE id IN ({qs})", list(case_ids)):
        out[cid] = pk
    return out


def _case_rows(searcher: Searcher, case_order: list[int], by_case: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """An image row (the matched image, else the case's first image) for each case."""
    cat = searcher.catalog
    need = [c for c in case_order if by_case[c]["hit"] is None]
    first = {c: v[0] for c, v in cat.case_images(need).items() if v}
    image_ids = [by_case[c]["hit"].image_id for c in case_order if by_case[c]["hit"] is not None] + list(first.values())
    irows = cat.image_rows([i for i in image_ids if i is not None])
    out: dict[int, dict[str, Any]] = {}
    for c in case_order:
        h = by_case[c]["hit"]
        iid = h.image_id if h is not None else first.get(c)
        row = irows.get(iid) if iid is not None else None
        if row is None:
            cv = cat.get_case(c)
            row = dict(case_id=c, case_key=cv.case_key, source=cv.source, split=cv.split, diagnosis=cv.diagnosis,
                       category=cv.category, image_id=None, image_key=None, caption=None)  # fmt: skip
        out[c] = row
    return out


def _load_sentences(
    searcher: Searcher,
    case_order: list[int],
    by_case: dict[int, dict[str, Any]],
    rows: dict[int, dict[str, Any]],
    q_img: np.ndarray | None,
    own: dict[str, Any] | None,
    config: EvidenceConfig,
    query: str,
) -> EvidencePack:
    cat = searcher.catalog
    enc = searcher.encoder
    texts = cat.case_texts(case_order, kind="sentence", sections=config.sections)
    cap_ids = cat.caption_ids([r["image_id"] for r in rows.values() if r.get("image_id")]) if config.captions else {}
    section_rank = {s: i for i, s in enumerate(config.sections)}
    cases: list[EvidenceCase] = []
    flat: list[tuple[int, str, str, float, int | None]] = []  # (case index, section, text, rel pos, text id)
    for n, c in enumerate(case_order, 1):
        row = rows[c]
        items = sorted(texts.get(c, []), key=lambda r: (section_rank.get(r["section"], 99), r["seq"]))
        raw = [(r["section"], r["text"], r["id"]) for r in items]
        if config.captions and row.get("caption"):
            raw.append(("caption", row["caption"], cap_ids.get(row.get("image_id"))))
        # guard first, so dropped (instruction-like) sentences leave no trace in positions or caps
        guarded: list[tuple[str, str, int | None]] = []
        dropped = 0
        for section, text, tid in raw:
            clean, d = neutralise([text])
            dropped += d
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
                n=n, case_id=c, case_key=row["case_key"], source=row["source"], score=round(float(by_case[c]["score"]), 6),
                image_id=row.get("image_id"), image_key=row.get("image_key"), matched=by_case[c]["matched"],
                modality_type=row.get("modality_type"), body_region=row.get("body_region"),
                category=row.get("category"), diagnosis=row.get("diagnosis"), split=row.get("split"),
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
        own=own,
        query=query,
    )
