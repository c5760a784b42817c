"""Retrieval metrics and bootstrap intervals: pure numpy, no catalog, no model.

Conventions (every function takes per-query arrays; nothing is averaged inside):

    scores   (nq, n) float   similarity of each query to each pool item, higher = better
    relevant (nq, n) bool    which pool items count as correct for the query
    exclude  (nq, n) bool    items removed from the pool for that query (e.g. its own case)

Ranking is by descending score with ties broken by pool index (stable and deterministic).
Excluded items are taken out of the ranking, not just pushed down.

- ``recall_at_k``: 1 if at least one relevant item is in the top k, else 0 (the usual
  cross-modal "R@K"; with one relevant item it equals recall).
- ``precision_at_k``: relevant items in the top k divided by k.
- ``average_precision``: mean of precision@rank over the ranks of the relevant items (NaN for a
  query with no relevant item; such queries are left out of mAP).
- ``reciprocal_rank``: 1 / rank of the first relevant item (0 when none).
- ``first_relevant_rank``: rank (1-based) of the first relevant item (inf when none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InvalidInput


def _num(x: float | None, nd: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, float) and math.isinf(x):
        return x
    return round(float(x), nd)


def _check(scores: np.ndarray, relevant: np.ndarray, exclude: np.ndarray | None) -> None:
    if scores.ndim != 2 or relevant.shape != scores.shape:
        raise InvalidInput(
            f"scores {scores.shape} and relevant {relevant.shape} must both be (n_queries, n_items)",
            hint="pass one row per query and one column per pool item",
        )
    if exclude is not None and exclude.shape != scores.shape:
        raise InvalidInput(f"exclude has shape {exclude.shape}, expected {scores.shape}", hint="match scores")


def ranked_relevance(
    scores: np.ndarray, relevant: np.ndarray, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Relevance in rank order: ((nq, n) bool, (nq,) int pool size per query).

    Row q lists the relevance of q's ranked items; excluded items are dropped and the row is
    padded with False at the end, so column j is rank j + 1 for j < n_valid[q].
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    _check(scores, relevant, exclude)
    nq, n = scores.shape
    ex = np.zeros((nq, n), dtype=bool) if exclude is None else np.asarray(exclude, dtype=bool)
    idx = np.broadcast_to(np.arange(n), (nq, n))
    # lexsort: last key is primary -> (excluded last, higher score first, lower index first)
    order = np.lexsort((idx, -scores, ex), axis=1)  # (nq, n)
    rel = np.take_along_axis(relevant & ~ex, order, axis=1)
    return rel, (n - ex.sum(axis=1)).astype(np.int64)


def first_relevant_rank(rel: np.ndarray) -> np.ndarray:
    """(nq, n) ranked relevance -> (nq,) float rank of the first relevant item (inf when none)."""
    rel = np.asarray(rel, dtype=bool)
    has = rel.any(axis=1)
    first = rel.argmax(axis=1).astype(np.float64) + 1.0
    first[~has] = np.inf
    return first


def recall_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """(nq,) 1.0 where a relevant item is in the top ``k``, else 0.0."""
    return np.asarray(rel, dtype=bool)[:, :k].any(axis=1).astype(np.float64)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """(nq,) share of the top ``k`` that is relevant (denominator k)."""
    return np.asarray(rel, dtype=bool)[:, :k].sum(axis=1) / float(k)


def average_precision(rel: np.ndarray) -> np.ndarray:
    """(nq,) average precision over the whole ranking; NaN for queries with no relevant item."""
    rel = np.asarray(rel, dtype=bool)
    hits = np.cumsum(rel, axis=1)  # (nq, n)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = np.where(rel, hits / ranks, 0.0)
    n_rel = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, prec.sum(axis=1) / np.maximum(n_rel, 1), np.nan)


def reciprocal_rank(first_rank: np.ndarray) -> np.ndarray:
    """(nq,) 1 / first relevant rank, 0 where there is none."""
    fr = np.asarray(first_rank, dtype=np.float64)
    return np.where(np.isfinite(fr), 1.0 / fr, 0.0)


def chance_recall_at_k(n_relevant: np.ndarray, n_valid: np.ndarray, k: int) -> np.ndarray:
    """(nq,) expected R@k of a uniformly random ranking: 1 - C(n - m, k) / C(n, k)."""
    m = np.asarray(n_relevant, dtype=np.int64)
    n = np.asarray(n_valid, dtype=np.int64)
    out = np.empty(len(m), dtype=np.float64)
    for i, (mi, ni) in enumerate(zip(m, n, strict=True)):
        kk = min(k, int(ni))
        if mi <= 0:
            out[i] = 0.0
        elif ni - mi < kk:
            out[i] = 1.0
        else:  # product form avoids huge binomials
            out[i] = 1.0 - math.prod((ni - mi - j) / (ni - j) for j in range(kk))
    return out


def bootstrap_ci(
    values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of ``stat`` over queries (NaNs dropped first)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    if stat is np.mean:
        boots = v[idx].mean(axis=1)
    else:
        boots = np.array([stat(v[row]) for row in idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, stat: str = "mean") -> dict[str, Any]:
    """{'value', 'ci95': [lo, hi], 'n'} of per-query values (mean or median)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    fn: Callable[[np.ndarray], float] = np.mean if stat == "mean" else np.median  # type: ignore[assignment]
    if len(v) == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    value = float(fn(v))
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed, stat=fn)
    return {"value": _num(value), "ci95": [_num(lo), _num(hi)], "n": int(len(v))}


def knn_vote(sims: np.ndarray, neighbour_labels: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Similarity-weighted vote of the top-k neighbours -> (nq,) predicted labels.

    sims (nq, n) float, neighbour_labels (n,) str/object; weight = max(similarity, 0) + 1e-6,
    so an all-negative neighbourhood still votes by rank order. Ties go to the label seen first.
    """
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbour_labels, dtype=object)
    nq, n = sims.shape
    ex = np.zeros((nq, n), dtype=bool) if exclude is None else np.asarray(exclude, dtype=bool)
    idx = np.broadcast_to(np.arange(n), (nq, n))
    order = np.lexsort((idx, -sims, ex), axis=1)[:, :k]
    out = np.empty(nq, dtype=object)
    for q in range(nq):
        votes: dict[Any, float] = {}
        for j in order[q]:
            if ex[q, j] or labels[j] is None:
                continue
            votes[labels[j]] = votes.get(labels[j], 0.0) + max(float(sims[q, j]), 0.0) + 1e-6
        out[q] = max(votes, key=lambda lab: votes[lab]) if votes else None
    return out


def token_masks(tokens: Sequence[str]) -> dict[str, int]:
    """Bit masks of a token sequence for ``lcs_length``: token -> the positions it holds (bit i = position i)."""
    masks: dict[str, int] = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def lcs_length(a: Sequence[str], b_masks: dict[str, int], n: int) -> int:
    """Length of the longest common subsequence of ``a`` and a sequence b of ``n`` tokens given as ``token_masks(b)``.

    Bit-parallel (one big-integer step per token of ``a``, Allison-Dix / Hyyro), so ROUGE-L against many
    references costs O(len(a)) integer operations per pair instead of a len(a) x n table."""
    if n == 0 or not a:
        return 0
    full = (1 << n) - 1
    v = full
    for t in a:
        m = b_masks.get(t)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def lcs_f1(lcs: int, n_hyp: int, n_ref: int) -> float:
    """ROUGE-L F1 from an LCS length and the two sequence lengths (0 when nothing matches)."""
    if lcs == 0:
        return 0.0
    p, r = lcs / n_hyp, lcs / n_ref
    return 2 * p * r / (p + r)
