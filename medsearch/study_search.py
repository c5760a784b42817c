"""Whole-study queries: several query slices -> one hit per prior study (``Searcher.similar_study``).

The rule is ``medsearch.studies.study_scores``: mean over the query slices of the best cosine
similarity to any embedded slice of the prior study. Candidates come from the image index (the
``fetch`` nearest slices of each query slice); every candidate study is then scored exactly from its
stored slice vectors. A study outside all candidate lists scores at most the mean over query slices of
their ``fetch``-th similarity, so while the k-th score is below that bound ``fetch`` grows (x4) until
the answer is exact or the whole index has been fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import IndexNotBuilt, InvalidInput
from .records import Hit
from .studies import study_scores

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

MAX_QUERY_SLICES = 256


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
        # bound on any study not among the candidates: mean over query slices of their fetch-th score
        tail = np.where(I[:, -1] >= 0, D[:, -1], -np.inf)
        bound = float(np.mean(tail)) if fetch < total else -np.inf
        if fetch >= total or (len(scores) >= k and float(scores[k - 1]) >= bound):
            break
        fetch = min(fetch * 4, total)
    rows = cat.slice_hit_rows([int(ids[b]) for b in best[:k]])
    hits = []
    for cid, score, b in zip(studies[:k], scores[:k], best[:k], strict=True):
        r = rows[int(ids[b])]
        hits.append(Hit(
            score=round(float(score), 6), case_id=int(cid), case_key=r["case_key"], image_id=r["image_id"],
            image_key=r["image_key"], source=r["source"], modality_type=r["modality_type"], modality=r["modality"],
            body_region=r["body_region"], plane=r["plane"], split=r["split"], diagnosis=r["diagnosis"],
            title=r["title"], excerpt=r["caption"] or _opening(r["sections"]), matched="study",
        ))  # fmt: skip
    return hits


def _query_vectors(searcher: Any, images: Sequence[Any]) -> tuple[np.ndarray, set[int]]:
    """(m, d) L2-normalised query vectors and the catalog cases the query slices come from."""
    from .encoders.base import encode_images
    from .imaging import load_image

    cat = searcher.catalog
    own: set[int] = set()
    vecs: list[np.ndarray | None] = []
    pils: list[Any] = []
    slots: list[int] = []
    for im in images:
        if isinstance(im, int) or (isinstance(im, str) and not Path(im).exists()):
            row = cat.find_image(im)
            v = cat.get_vectors(searcher.model_id, "image", [row["image_id"]]).get(row["image_id"])
            if v is None:
                raise IndexNotBuilt(f"image {im!r} has no vector yet", hint="run `medsearch index`")
            own.add(int(row["case_id"]))
            vecs.append(v.astype(np.float32))
            continue
        if isinstance(im, str | Path):
            mine = searcher._own_by_hash(Path(im))
            if mine is not None:
                own.add(int(mine["case_id"]))
            im = load_image(Path(im), config=searcher.imaging)
        slots.append(len(vecs))
        vecs.append(None)
        pils.append(im)
    if pils:
        enc = np.asarray(encode_images(searcher.encoder, pils), dtype=np.float32)  # (len(pils), d)
        for slot, v in zip(slots, enc, strict=True):
            vecs[slot] = v
    q = np.stack([v for v in vecs if v is not None])
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q, own


def _opening(sections: dict[str, str], n: int = 200) -> str | None:
    for s in ("findings", "impression", "history"):
        if sections.get(s):
            t = " ".join(sections[s].split())
            return t if len(t) <= n else t[: n - 1] + "…"
    return None
