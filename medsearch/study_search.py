"""Whole-study queries: several query slices -> one hit per prior study (``Searcher.similar_study``).

The rule is ``medsearch.studies.study_scores``: mean over the query slices of the best cosine
similarity to any embedded slice of the prior study.

Up to ``EXHAUSTIVE_MAX`` indexed slices, every prior study is scored exactly: one (m, n) product of
the query slices with the vectors the FAISS index keeps in memory, grouped by study (the slice ->
study map is cached per index generation). Above that (or for a store without exact vectors),
candidates come from the index (the ``fetch`` nearest slices of each query slice) and each candidate
study is scored exactly from its stored slice vectors. A study outside all candidate lists scores at
most the mean over query slices of their ``fetch``-th similarity, so while the k-th score is below
that bound ``fetch`` grows (x4), up to ``MAX_FETCH`` per query slice.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInput
from .records import Hit, report_opening
from .studies import scores_from_sims, study_scores

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

MAX_QUERY_SLICES = 256
EXHAUSTIVE_MAX = 250_000  # indexed slices scored exhaustively (an (m, n) float32 product)
MAX_FETCH = 8192  # nearest slices per query slice on the candidate path

_owners: weakref.WeakKeyDictionary[Any, tuple[np.ndarray, np.ndarray]] = weakref.WeakKeyDictionary()


def similar_study(
    searcher: Any,
    images: Sequence[str | Path | int | Image.Image],
    *,
    k: int | None = None,
    filters: Any = None,
    own_study_key: str | None = None,
    exclude_same_patient: bool = False,
) -> list[Hit]:
    """Query slices (files, PIL images or catalog image ids/keys) of one study -> one hit per prior study.

    ``searcher`` is a ``medsearch.search.Searcher``; ``own_study_key`` the query's study key (pseudonym of
    its StudyInstanceUID, see ``medsearch.studies.dicom_study_key``): that study is left out, as is the study
    of any query slice that is byte-identical to (or is) a catalog image.
    """
    if not images:
        raise InvalidInput("the study query has no slices", hint="give a study folder or several image files")
    if len(images) > MAX_QUERY_SLICES:
        raise InvalidInput(
            f"the study query has {len(images)} slices, more than {MAX_QUERY_SLICES}",
            hint="select fewer slices (a study folder query embeds --slices per series)",
        )
    cat = searcher.catalog
    k = k or searcher.config.k
    q, own_cases = _query_vectors(searcher, images)  # (m, d)
    if own_study_key:
        cid = cat.case_id_for_key(own_study_key)
        if cid is not None:
            own_cases.add(cid)
    own_patients: set[str] = set()
    if exclude_same_patient and own_cases:
        rows = cat.slice_hit_rows([i for c in own_cases for i in cat.case_images([c]).get(c, [])[:1]])
        own_patients = {r["patient_key"] for r in rows.values() if r.get("patient_key")}

    idx = searcher.index("image")
    searcher._check_encoder()
    allowed = cat.image_ids_where(filters.as_dict()) if filters is not None else None
    exhaustive = _exhaustive(cat, idx, q, allowed, own_cases, own_patients)
    if exhaustive is not None:
        ids, studies, scores, best = exhaustive
    else:
        ids, studies, scores, best = _candidates(searcher, idx, q, k, allowed, own_cases, own_patients)
    rows = cat.slice_hit_rows([int(ids[b]) for b in best[:k]])
    hits = []
    for cid, score, b in zip(studies[:k], scores[:k], best[:k], strict=True):
        r = rows[int(ids[b])]
        hits.append(Hit(
            score=round(float(score), 6), case_id=int(cid), case_key=r["case_key"], image_id=r["image_id"],
            image_key=r["image_key"], source=r["source"], modality_type=r["modality_type"], modality=r["modality"],
            body_region=r["body_region"], plane=r["plane"], split=r["split"], diagnosis=r["diagnosis"],
            title=r["title"], excerpt=r["caption"] or report_opening(r["sections"]), matched="study",
        ))  # fmt: skip
    return hits


def _exhaustive(
    cat: Any, idx: Any, q: np.ndarray, allowed: np.ndarray | None, own_cases: set[int], own_patients: set[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Every prior study scored from the vectors the index keeps in memory; None when it keeps none."""
    from .stores.ann import exact_storage, ids_of

    if idx.ntotal > EXHAUSTIVE_MAX or not hasattr(idx, "index"):
        return None
    xb = exact_storage(idx.index)  # (n, d) float32 view, internal order
    if xb is None:
        return None
    cached = _owners.get(idx)
    if cached is None:
        ids = ids_of(idx.index)  # (n,) catalog image ids, internal order
        case_of = cat.image_case_ids(ids.tolist())
        owners = np.fromiter((case_of.get(int(i), -1) for i in ids), dtype=np.int64, count=len(ids))
        cached = _owners[idx] = (ids, owners)
    ids, owners = cached
    keep = owners >= 0
    if own_cases:
        keep &= ~np.isin(owners, np.fromiter(own_cases, dtype=np.int64))
    if allowed is not None:
        keep &= np.isin(ids, allowed)
    if own_patients:
        rows = cat.slice_hit_rows(ids[keep].tolist())
        pk = np.array([rows[int(i)].get("patient_key") not in own_patients for i in ids[keep]], dtype=bool)
        keep[np.flatnonzero(keep)[~pk]] = False
    pos = np.flatnonzero(keep)
    sims = q @ xb.T  # (m, n)
    studies, scores, best = scores_from_sims(sims[:, pos], owners[pos])
    return ids[pos], studies, scores, best


def _candidates(
    searcher: Any, idx: Any, q: np.ndarray, k: int, allowed: np.ndarray | None, own_cases: set[int],
    own_patients: set[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Candidate studies from the index, scored exactly; grows until the bound holds (see the module docstring)."""
    cat = searcher.catalog
    total = idx.ntotal if allowed is None else len(allowed)
    fetch = min(max(k * searcher.config.oversample, 64), total)
    while True:
        D, I = idx.search(q, max(fetch, 1), allowed=allowed)  # (m, fetch) each
        cand = {c for c in cat.image_case_ids(I[I >= 0].tolist()).values() if c not in own_cases}
        ids, owners, vecs = cat.study_vectors(searcher.model_id, sorted(cand), allowed)
        if own_patients and len(ids):
            rows = cat.slice_hit_rows(ids.tolist())
            keep = np.array([rows[int(i)].get("patient_key") not in own_patients for i in ids], dtype=bool)
            ids, owners, vecs = ids[keep], owners[keep], vecs[keep]
        studies, scores, best = study_scores(q, vecs, owners)
        tail = np.where(I[:, -1] >= 0, D[:, -1], -np.inf)  # each query slice's fetch-th similarity
        bound = float(np.mean(tail)) if fetch < total else -np.inf
        if fetch >= min(total, MAX_FETCH) or (len(scores) >= k and float(scores[k - 1]) >= bound):
            return ids, studies, scores, best
        fetch = min(fetch * 4, total, MAX_FETCH)


def _query_vectors(searcher: Any, images: Sequence[Any]) -> tuple[np.ndarray, set[int]]:
    """(m, d) L2-normalised query vectors and the catalog cases the query slices come from.

    Each slice is resolved by ``Searcher.image_query``, the one rule every query follows: a catalog
    image (by id/key, or a byte-identical file) uses its stored vector; anything else is encoded once.
    """
    own: set[int] = set()
    vecs: list[np.ndarray] = []
    for im in images:
        q = searcher.image_query(im)
        if q.row is not None:
            own.add(int(q.row.case_id))
        vecs.append(np.asarray(q.vector, dtype=np.float32).reshape(-1))
    out = np.stack(vecs)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out, own
