"""Retrieval evaluation: the pool of a split, its embeddings, and the ``eval retrieval`` report.

    evaluate_dataset(paths, dataset)       what `medsearch eval retrieval DATASET` runs: finds the source
      -> load_eval_set(catalog, config)    pool images + their captions, findings and report sections (the
                                           evaluated split's own texts hidden from the text modes)
      -> embed_eval_set(es, encoder)       vectors (the towers' cached features when the towers are frozen)
      -> evaluate_retrieval(es, emb, ...)  cross-modal at image and case level, findings->case, image->image,
                                           kNN label vote; chance and 95% CIs by case (eval.bycase)
    eval.report: headline / markdown / plot_recall_curves render a report.

The metrics are ``medsearch.metrics`` (pure numpy; re-exported here). Conventions:

    scores   (nq, n) float   similarity of each query to each pool item, higher = better
    relevant (nq, n) bool    which pool items count as correct for the query
    exclude  (nq, n) bool    items removed from the pool for that query (e.g. its own case)

Ranking is by descending score with ties broken by pool index (stable and deterministic).
Excluded items are taken out of the ranking, not just pushed down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.catalog.train_queries import has_source, pool_images, source_splits
from medsearch.config import Paths, SearchConfig
from medsearch.errors import InvalidInput, NotFound
from medsearch.eval.bycase import summarize_by_case
from medsearch.metrics import (  # noqa: F401  (re-exported: the metrics of this report)
    _num,
    average_precision,
    bootstrap_ci,
    chance_recall_at_k,
    first_relevant_rank,
    knn_vote,
    precision_at_k,
    ranked_relevance,
    recall_at_k,
    reciprocal_rank,
    summarize,
)

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.catalog import Catalog
    from medsearch.encoders.base import Encoder

Progress = Callable[[str, int, int], None]


# =========================================================================== the retrieval report

# Zero-shot prompt words for label values seen in the shared datasets; other values use their name.
LABEL_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "modality_type": {
        "CT": ("CT", "computed tomography", "CT scan"),
        "MR": ("MR", "MRI", "magnetic resonance imaging", "MRI scan"),
        "X-ray": ("X-ray", "radiograph", "chest X-ray"),
    },
    "body_region": {
        "Head": ("head", "brain", "skull"),
        "Thorax": ("chest", "thorax", "lungs"),
        "Abdomen": ("abdomen", "liver", "abdominal organs"),
        "Spine and Muscles": ("spine", "spinal cord", "vertebrae", "musculoskeletal system"),
        "Reproductive and Urinary System": ("pelvis", "kidney", "bladder", "uterus"),
    },
}
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "modality_type": ("{w} image", "a {w} of the patient", "{w} shows"),
    "body_region": ("image of the {w}", "{w} imaging", "scan of the {w}"),
}
LABELS = ("modality_type", "body_region", "category")


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate_retrieval`` measures and how."""

    split: str = "dev"
    pool: str = "split"  # split: the split's images; all: every image of the source
    source: str | None = None  # catalog source (None: all)
    ks: tuple[int, ...] = (1, 5, 10)
    curve_k: int = 50  # Recall@K curves for the plot go up to this K
    knn_k: int = 10
    fuse_depth: int = SearchConfig().k * SearchConfig().oversample  # each mode's depth fed to RRF, as the searcher
    rrf_k: int = SearchConfig().rrf_k
    n_boot: int = 1000
    seed: int = 0
    # the evaluated split's own captions and report sections stay out of the text/BM25 modes, as for a
    # new image that arrives with its DICOM header only: no mode finds an image through its own text
    hide_split_text: bool = True


@dataclass
class EvalSet:
    """The pool images of one evaluation and the texts attached to them."""

    split: str
    pool: str
    image_ids: np.ndarray  # (n,) catalog ids
    keys: list[str]  # content keys (sha256:frame)
    paths: list[str]
    frames: list[int | None]
    case: np.ndarray  # (n,) int64
    is_query: np.ndarray  # (n,) bool: image of the evaluated split
    labels: dict[str, np.ndarray]  # name -> (n,) object
    caption: np.ndarray  # (n,) object: whitespace-normalised caption or None
    findings: dict[int, str]  # case id -> findings text (query cases only)
    docs: list[str]  # texts of the text/BM25 modes: captions of pool images + report sections of pool cases
    doc_case: np.ndarray  # (n_docs,) int64
    doc_image: np.ndarray  # (n_docs,) int64 pool position, -1 for a case-level text
    meta: dict[str, Any] = field(default_factory=dict)


def load_eval_set(catalog: Catalog, config: EvalConfig = EvalConfig()) -> EvalSet:
    """Read the pool of an evaluation from the catalog (ok images only)."""
    if config.pool not in ("split", "all"):
        raise InvalidInput(f"unknown pool {config.pool!r}", hint="use --pool split or --pool all")
    splits = source_splits(catalog, config.source)
    if config.split not in splits:
        have = ", ".join(sorted(str(s) for s in splits)) or "none"
        raise NotFound(
            f"split {config.split!r} has no images" + (f" in source {config.source!r}" if config.source else ""),
            hint=f"splits present: {have}",
        )
    rows = pool_images(catalog, source=config.source, split=config.split if config.pool == "split" else None)
    caption = np.array([(" ".join(r.caption.split()) if r.caption and r.caption.strip() else None) for r in rows],
                       dtype=object)  # fmt: skip
    case = np.array([r.case_id for r in rows], dtype=np.int64)
    is_query = np.array([r.split == config.split for r in rows], dtype=bool)
    findings: dict[int, str] = {}
    sections_of: dict[int, dict[str, str]] = {}
    for r in rows:
        if r.case_id not in sections_of:
            sections_of[r.case_id] = r.sections
            f = " ".join((r.sections.get("findings") or "").split())
            if f and r.split == config.split:
                findings[r.case_id] = f
    docs: list[str] = []
    doc_case: list[int] = []
    doc_image: list[int] = []
    hidden = set()  # cases whose texts the text modes must not see
    if config.hide_split_text:
        hidden = {r.case_id for r in rows if r.split == config.split}
    for j, c in enumerate(caption):
        if c and not (config.hide_split_text and is_query[j]):
            docs.append(c)
            doc_case.append(int(case[j]))
            doc_image.append(j)
    for cid, secs in sections_of.items():
        if cid in hidden:
            continue
        for text in secs.values():
            t = " ".join((text or "").split())
            if t:
                docs.append(t)
                doc_case.append(cid)
                doc_image.append(-1)
    return EvalSet(
        split=config.split, pool=config.pool,
        image_ids=np.array([r.id for r in rows], dtype=np.int64),
        keys=[f"{r.sha256}:{r.frame if r.frame is not None else ''}" for r in rows],
        paths=[r.path for r in rows], frames=[r.frame for r in rows], case=case, is_query=is_query,
        labels={
            "modality_type": np.array([r.modality_type for r in rows], dtype=object),
            "body_region": np.array([r.body_region for r in rows], dtype=object),
            "category": np.array([r.category for r in rows], dtype=object),
        },
        caption=caption, findings=findings, docs=docs,
        doc_case=np.array(doc_case, dtype=np.int64), doc_image=np.array(doc_image, dtype=np.int64),
        meta={"source": config.source, "hidden_text_cases": len(hidden)},
    )  # fmt: skip


@dataclass
class Embeddings:
    """Vectors of one model for an EvalSet (rows L2-normalised)."""

    model_id: str
    shared: bool
    images: np.ndarray  # (n, d)
    docs: np.ndarray  # (n_docs, d_text)
    findings: dict[int, np.ndarray]  # case id -> (d_text,)
    captions: dict[str, np.ndarray]  # caption text -> (d_text,)
    encode_texts: Callable[[list[str]], np.ndarray]  # for prompts


def embed_eval_set(
    es: EvalSet, encoder: Encoder, *, cache_dir: Path | None = None, progress: Progress | None = None, batch: int = 16,
) -> Embeddings:  # fmt: skip
    """Embed the pool images and texts with ``encoder``.

    The towers and a lite model with frozen towers reuse the training feature cache
    (``cache_dir``), so nothing already computed is computed again.
    """
    from medsearch.encoders.base import l2_normalize

    texts = sorted({*es.docs, *es.findings.values(), *(c for c in es.caption if c)})
    towers = getattr(encoder, "towers", None) if getattr(encoder, "frozen_towers", False) else None
    if towers is None and getattr(encoder, "model_id", "") == "towers":
        towers = encoder
    if towers is not None and cache_dir is not None:
        from medsearch.encoders.features import FeatureStore, ViewSpec, image_view_features, text_features

        store = FeatureStore.for_towers(cache_dir, towers)
        feats = image_view_features(
            store, towers, keys=es.keys, paths=es.paths, frames=es.frames, n_views=1, spec=ViewSpec(), progress=progress
        )[:, 0]  # (n, 1280)
        tfeats = text_features(store, towers, texts, progress=progress)  # (m, 384)
        if towers is encoder:
            img, tv = l2_normalize(feats), l2_normalize(tfeats)
        else:
            img, tv = encoder.project_image_features(feats), encoder.project_text_features(tfeats)  # type: ignore[attr-defined]
    else:
        img = _encode_images(encoder, es.paths, es.frames, batch, progress)
        tv = (
            np.concatenate([encoder.encode_texts(texts[s : s + 256]) for s in range(0, len(texts), 256)])
            if texts
            else None
        )
    vec = {t: tv[i] for i, t in enumerate(texts)} if tv is not None else {}
    dim = img.shape[1] if tv is None else tv.shape[1]
    docs = np.stack([vec[t] for t in es.docs]) if es.docs else np.zeros((0, dim), np.float32)
    return Embeddings(
        model_id=encoder.model_id, shared=bool(encoder.shared_space), images=img, docs=docs,
        findings={c: vec[t] for c, t in es.findings.items()}, captions={c: vec[c] for c in es.caption if c},
        encode_texts=encoder.encode_texts,
    )  # fmt: skip


def _encode_images(
    encoder: Encoder, paths: Sequence[str], frames: Sequence[int | None], batch: int, progress
) -> np.ndarray:
    import torch

    from medsearch.imaging import load_image

    out = []
    for s in range(0, len(paths), batch):
        xs = [
            encoder.preprocess(load_image(p, frame=f))
            for p, f in zip(paths[s : s + batch], frames[s : s + batch], strict=True)
        ]
        out.append(encoder.encode_image_batch(torch.stack(xs)))
        if progress:
            progress("image embeddings", min(s + batch, len(paths)), len(paths))
    return np.concatenate(out) if out else np.zeros((0, encoder.image_dim), np.float32)


# --------------------------------------------------------------------------- report pieces


def _summ(values: np.ndarray, cases: np.ndarray, cfg: EvalConfig, stat: str = "mean") -> dict[str, Any]:
    """Per-query values -> value + 95% CI from a bootstrap over cases (``eval.bycase``)."""
    return summarize_by_case(values, cases, n_boot=cfg.n_boot, seed=cfg.seed, stat=stat)


def _rank_summary(
    rel: np.ndarray, n_valid: np.ndarray, n_rel: np.ndarray, cfg: EvalConfig, cases: np.ndarray
) -> dict[str, Any]:
    """R@K, chance R@K, median rank, MRR and the Recall@K curve; ``cases`` (nq,) the query's case (CIs)."""
    fr = first_relevant_rank(rel)
    out: dict[str, Any] = {"n_queries": int(len(rel)), "pool": int(np.median(n_valid)) if len(n_valid) else 0}
    for k in cfg.ks:
        out[f"R@{k}"] = _summ(recall_at_k(rel, k), cases, cfg)
        out[f"chance R@{k}"] = _num(float(chance_recall_at_k(n_rel, n_valid, k).mean()))
    out["median rank"] = _summ(fr, cases, cfg, stat="median")
    out["MRR"] = _summ(reciprocal_rank(fr), cases, cfg)
    out["curve"] = [_num(float(recall_at_k(rel, k).mean())) for k in range(1, cfg.curve_k + 1)]
    out["chance curve"] = [_num(float(chance_recall_at_k(n_rel, n_valid, k).mean())) for k in range(1, cfg.curve_k + 1)]
    return out


def _doc_to_image_scores(es: EvalSet, doc_scores: np.ndarray, exclude_case: np.ndarray | None) -> np.ndarray:
    """(nq, n_docs) text scores -> (nq, n) image scores: max over the docs attached to each image.

    A caption belongs to its image; a report section to every image of its case. Report
    sections of the query's own case (``exclude_case[q]``) are removed first.
    """
    nq = doc_scores.shape[0]
    n = len(es.image_ids)
    d = doc_scores.astype(np.float64).copy()
    if exclude_case is not None:
        own = (es.doc_image[None, :] < 0) & (es.doc_case[None, :] == exclude_case[:, None])
        d[own] = -np.inf
    out = np.full((nq, n), -np.inf)
    pos_of_case: dict[int, list[int]] = {}
    for j, c in enumerate(es.case):
        pos_of_case.setdefault(int(c), []).append(j)
    for t in range(len(es.docs)):
        targets = [int(es.doc_image[t])] if es.doc_image[t] >= 0 else pos_of_case.get(int(es.doc_case[t]), [])
        for j in targets:
            np.maximum(out[:, j], d[:, t], out=out[:, j])
    return out


def _rrf_scores(score_mats: Sequence[np.ndarray], depth: int, k: int) -> np.ndarray:
    """RRF of several (nq, n) score matrices, each cut at ``depth`` (as the searcher does)."""
    nq, n = score_mats[0].shape
    out = np.zeros((nq, n))
    idx = np.broadcast_to(np.arange(n), (nq, n))
    for s in score_mats:
        order = np.lexsort((idx, -s), axis=1)[:, :depth]
        valid = np.isfinite(np.take_along_axis(s, order, axis=1))
        contrib = np.where(valid, 1.0 / (k + np.arange(1, order.shape[1] + 1)), 0.0)
        np.put_along_axis(out, order, np.take_along_axis(out, order, axis=1) + contrib, axis=1)
    return out


def _bm25_doc_scores(es: EvalSet, queries: list[str]) -> np.ndarray:
    from medsearch.bm25 import BM25

    bm = BM25.build(es.docs)
    return np.stack([bm.scores(q) for q in queries]) if queries else np.zeros((0, len(es.docs)))


def case_scores(scores: np.ndarray, image_case: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nq, n) image scores -> ((nq, n_cases) case scores = max over the case's images, (n_cases,) case ids)."""
    cases, inv = np.unique(image_case, return_inverse=True)
    out = np.full((scores.shape[0], len(cases)), -np.inf)
    for j in range(scores.shape[1]):
        np.maximum(out[:, inv[j]], scores[:, j], out=out[:, inv[j]])
    return out, cases


def _cross_modal(es: EvalSet, emb: Embeddings, cfg: EvalConfig) -> dict[str, Any]:
    """caption->image (image level), caption->same-case and caption->case (case level), image->caption."""
    q = np.where(es.is_query & np.array([c is not None for c in es.caption]))[0]
    out: dict[str, Any] = {}
    if not len(q):
        return out
    qcap = es.caption[q]
    qcase = es.case[q]
    Q = np.stack([emb.captions[c] for c in qcap])  # (nq, d)
    s = Q @ emb.images.T  # (nq, n)
    rel_img = es.caption[None, :] == qcap[:, None]  # own image + identical captions
    rel_case = es.case[None, :] == qcase[:, None]
    n_valid = np.full(len(q), len(es.image_ids))
    out["caption->image"] = _rank_summary(ranked_relevance(s, rel_img)[0], n_valid, rel_img.sum(1), cfg, qcase)
    out["caption->same-case"] = _rank_summary(ranked_relevance(s, rel_case)[0], n_valid, rel_case.sum(1), cfg, qcase)
    cs, cases = case_scores(s, es.case)  # (nq, n_cases): one hit per case, as the searcher groups them
    rel_c = cases[None, :] == qcase[:, None]
    out["caption->case"] = _rank_summary(
        ranked_relevance(cs, rel_c)[0], np.full(len(q), len(cases)), rel_c.sum(1), cfg, qcase
    )
    uniq = sorted({c for c in es.caption if c})
    T = np.stack([emb.captions[c] for c in uniq])  # (m, d)
    s2 = emb.images[q] @ T.T  # (nq, m)
    rel_txt = np.array(uniq, dtype=object)[None, :] == qcap[:, None]
    out["image->caption"] = _rank_summary(
        ranked_relevance(s2, rel_txt)[0], np.full(len(q), len(uniq)), rel_txt.sum(1), cfg, qcase
    )
    out["levels"] = (
        "caption->image: the pool's images ranked individually, correct = the image carrying the caption; "
        "caption->same-case: the same ranking, correct = any image of the caption's case; caption->case: cases "
        "ranked by their best image (one hit per case), correct = the caption's case"
    )
    dup = int(sum(1 for c in qcap if (es.caption == c).sum() > 1))
    out["duplicates"] = (
        f"{dup} of {len(q)} query captions occur on more than one pool image; every image carrying the identical "
        f"caption text counts as correct (caption->image), and image->caption ranks the {len(uniq)} unique caption texts"
    )
    return out


def _findings_modes(es: EvalSet, emb: Embeddings, cfg: EvalConfig, towers_emb: Embeddings | None) -> dict[str, Any]:
    """Findings of each query case -> images of that case, per mode and fused (plus the towers' text mode)."""
    cases = sorted(c for c in es.findings if (es.case[es.is_query] == c).any())
    if not cases:
        return {}
    qc = np.array(cases, dtype=np.int64)
    rel = es.case[None, :] == qc[:, None]  # (nq, n)
    n_valid = np.full(len(qc), len(es.image_ids))
    mats: dict[str, np.ndarray] = {}
    F_ = np.stack([emb.findings[c] for c in cases])
    if emb.shared:
        mats["image"] = F_ @ emb.images.T
    if len(es.docs):  # the text modes see only texts outside the evaluated split (hide_split_text)
        mats["text"] = _doc_to_image_scores(es, F_ @ emb.docs.T, qc)
        mats["bm25"] = _doc_to_image_scores(es, _bm25_doc_scores(es, [es.findings[c] for c in cases]), qc)
    if len(mats) > 1:
        mats["hybrid"] = _rrf_scores([mats[m] for m in ("image", "text", "bm25") if m in mats], cfg.fuse_depth,
                                     cfg.rrf_k)  # fmt: skip
    out: dict[str, Any] = {
        m: _rank_summary(ranked_relevance(s, rel)[0], n_valid, rel.sum(1), cfg, qc) for m, s in mats.items()
    }
    if towers_emb is not None and len(es.docs):
        Ft = np.stack([towers_emb.findings[c] for c in cases])
        st = _doc_to_image_scores(es, Ft @ towers_emb.docs.T, qc)
        out["towers text"] = _rank_summary(ranked_relevance(st, rel)[0], n_valid, rel.sum(1), cfg, qc)
    hidden = es.meta.get("hidden_text_cases", 0)
    out["note"] = (
        "query = a case's findings; correct = any pool image of that case; text/bm25 rank the captions and report "
        "sections of the pool"
        + (
            f" outside split {es.split!r} (its {hidden} cases' own texts are hidden, so no mode reaches an image through "
            "its own text)"
            if hidden
            else ", minus the query case's own report"
        )
        + f"; hybrid = RRF (k={cfg.rrf_k}) of each mode's top {cfg.fuse_depth}"
        + ("" if len(es.docs) else "; no text is left to search, so only the image mode is scored")
    )
    return out


def _image_image(es: EvalSet, images: np.ndarray, cfg: EvalConfig) -> dict[str, Any]:
    """image->image P@10 and mAP by label, own case excluded."""
    q = np.where(es.is_query)[0]
    s = images[q] @ images.T  # (nq, n)
    exclude = es.case[None, :] == es.case[q][:, None]
    out: dict[str, Any] = {}
    for name in LABELS:
        lab = es.labels[name]
        ok = np.array([lab[i] is not None for i in q])
        if not ok.any():
            continue
        rel = (lab[None, :] == lab[q][:, None]) & np.array([x is not None for x in lab])[None, :]
        rr, n_valid = ranked_relevance(s[ok], rel[ok], exclude[ok])
        n_rel = (rel[ok] & ~exclude[ok]).sum(1)
        qcase = es.case[q][ok]
        out[name] = {
            "P@10": _summ(precision_at_k(rr, 10), qcase, cfg),
            "mAP": _summ(average_precision(rr), qcase, cfg),
            "chance P@10": _num(float((n_rel / np.maximum(n_valid, 1)).mean())),
            "n_classes": int(len({x for x in lab if x is not None})),
        }
    return out


def _classify(es: EvalSet, emb: Embeddings, cfg: EvalConfig, prompts: bool) -> dict[str, Any]:
    """Modality and body-region accuracy: kNN vote (own case excluded) and zero-shot prompts."""
    from medsearch.encoders.base import l2_normalize

    q = np.where(es.is_query)[0]
    s = emb.images[q] @ emb.images.T
    exclude = es.case[None, :] == es.case[q][:, None]
    out: dict[str, Any] = {}
    for name in ("modality_type", "body_region"):
        lab = es.labels[name]
        ok = np.array([lab[i] is not None for i in q])
        if not ok.any():
            continue
        truth = lab[q][ok]
        qcase = es.case[q][ok]
        pred = knn_vote(s[ok], lab, cfg.knn_k, exclude[ok])
        res: dict[str, Any] = {"kNN vote": _summ((pred == truth).astype(float), qcase, cfg)}
        classes = sorted({x for x in lab if x is not None})
        if prompts and emb.shared and len(classes) > 1:
            C = []
            for c in classes:
                words = LABEL_WORDS.get(name, {}).get(c, (c,))
                texts = [t.format(w=w) for t in PROMPT_TEMPLATES.get(name, ("{w}",)) for w in words]
                C.append(l2_normalize(emb.encode_texts(texts)).mean(0))
            Cm = l2_normalize(np.stack(C))  # (n_classes, d)
            zs = np.array(classes, dtype=object)[np.argmax(emb.images[q][ok] @ Cm.T, axis=1)]
            res["zero-shot"] = _summ((zs == truth).astype(float), qcase, cfg)
        vals, counts = np.unique(np.array([x for x in lab if x is not None], dtype=str), return_counts=True)
        majority = vals[np.argmax(counts)]
        res["chance (majority class)"] = _num(float((truth == majority).mean()))
        res["majority class"] = str(majority)
        out[name] = res
    return out


def evaluate_retrieval(
    es: EvalSet, emb: Embeddings, towers_emb: Embeddings | None = None, config: EvalConfig = EvalConfig()
) -> dict[str, Any]:
    """All retrieval metrics of one model on one EvalSet, with the frozen towers as baseline."""
    n_q = int(es.is_query.sum())
    report: dict[str, Any] = {
        "model": emb.model_id,
        "split": es.split,
        "pool": {
            "kind": es.pool,
            "images": int(len(es.image_ids)),
            "cases": int(len(set(es.case.tolist()))),
            "query images": n_q,
            "query cases with findings": len(es.findings),
        },  # fmt: skip
        "source": es.meta.get("source"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "conventions": (
            "R@K = share of queries with a correct item in the top K; P@10 = share of the 10 nearest pool images "
            f"(own case excluded) with the query's label; kNN vote = similarity-weighted vote of the {config.knn_k} "
            "nearest pool images of other cases; 95% CIs: percentile bootstrap over cases (all queries of a drawn "
            "case)"
            + (
                f"; the text modes never see the captions and reports of split {es.split!r}"
                if config.hide_split_text
                else ""
            )
        ),
    }
    if emb.shared:
        report["cross-modal"] = _cross_modal(es, emb, config)
    report["findings->same case R@10"] = _findings_modes(es, emb, config, towers_emb)
    report["image->image"] = {"model": _image_image(es, emb.images, config)}
    report["classification"] = {"model": _classify(es, emb, config, prompts=True)}
    if towers_emb is not None and towers_emb is not emb:
        report["image->image"]["towers"] = _image_image(es, towers_emb.images, config)
        report["classification"]["towers"] = _classify(es, towers_emb, config, prompts=False)
    return report


# =========================================================================== `medsearch eval retrieval`

Ingest = Callable[["Catalog", Path, str], object]  # (in-memory catalog, dataset folder, source name)


def open_eval_catalog(
    paths: Paths, dataset: str, *, ingest: Ingest | None = None, log: Callable[[str], None] | None = None
) -> tuple[Catalog, str]:
    """(catalog, source) that ``dataset`` names: a catalog source, or a dataset folder whose name is the source.

    The home's catalog when it holds images of that source (opened read-only); else, for a folder,
    an in-memory catalog that ``ingest(catalog, folder, source)`` fills (the shell passes the
    indexer's ingest: the core does not import the pipeline). The caller closes the catalog.
    """
    from medsearch.catalog import Catalog

    path = Path(dataset).expanduser()
    source = path.name if path.exists() else dataset
    if paths.catalog.exists():
        cat = Catalog.open(paths.catalog, readonly=True)
        if has_source(cat, source):
            return cat, source
        cat.close()
    if not path.is_dir() or ingest is None:
        raise NotFound(
            f"no source {dataset!r} in {paths.catalog} and no dataset folder at {path}",
            hint="pass a dataset folder, or `medsearch ingest DATASET` first",
        )
    if log:
        log(f"{source} is not in {paths.home}; reading {path} into memory")
    cat = Catalog.open(None)
    try:
        ingest(cat, path, source)
    except BaseException:
        cat.close()
        raise
    return cat, source


def evaluate_dataset(
    paths: Paths,
    dataset: str,
    config: EvalConfig = EvalConfig(),
    *,
    model: str | None = None,
    device: str = "auto",
    ingest: Ingest | None = None,
    plot: Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`medsearch eval retrieval DATASET`: the report of ``model`` (default: ``default_model(paths)``) on a split.

    ``dataset`` is resolved by ``open_eval_catalog`` (``config.source`` is set from it); the frozen
    towers are the baseline; vectors reuse the home's feature cache (``HOME/models/cache``).
    With ``plot``, a PNG of the Recall@K curves is written there and its path is ``report["plot"]``.
    """
    from medsearch.encoders.registry import default_model, load_encoder
    from medsearch.eval.report import plot_recall_curves

    cat, source = open_eval_catalog(paths, dataset, ingest=ingest, log=log)
    cfg = replace(config, source=source)
    cache = paths.models / "cache"
    try:
        es = load_eval_set(cat, cfg)
    finally:
        cat.close()
    enc = load_encoder(model or default_model(paths), device=device, models_dir=paths.models)
    towers = load_encoder("towers", device=device)
    emb = embed_eval_set(es, enc, cache_dir=cache, progress=progress)
    base = emb if enc is towers else embed_eval_set(es, towers, cache_dir=cache, progress=progress)
    report = evaluate_retrieval(es, emb, base, cfg)
    if plot is not None:
        report["plot"] = str(plot_recall_curves(report, plot))
    return report
