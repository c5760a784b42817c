"""Confidence intervals by case: the images of one case are not independent queries.

A case contributes several images and captions that look alike, so a bootstrap over queries
understates the uncertainty. ``summarize_by_case`` resamples cases (with replacement) and
takes every query of each drawn case: a cluster (case) bootstrap. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsearch.metrics import _num


def bootstrap_ci_by_case(
    values: np.ndarray, cases: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
    stat: str = "mean",
) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of the mean (or median) of ``values`` (nq,) when whole cases (nq,) are resampled."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(cases)
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    if len(v) == 0:
        return (float("nan"), float("nan"))
    uniq, inv = np.unique(g, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))  # (n_boot, n_cases)
    if stat == "mean":
        sums = np.bincount(inv, weights=v, minlength=len(uniq))
        counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
        boots = sums[draws].sum(1) / counts[draws].sum(1)
    else:
        members = [v[inv == j] for j in range(len(uniq))]
        boots = np.array([np.median(np.concatenate([members[j] for j in row])) for row in draws])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize_by_case(
    values: np.ndarray, cases: np.ndarray, *, n_boot: int = 1000, seed: int = 0, stat: str = "mean"
) -> dict[str, Any]:
    """{'value', 'ci95': [lo, hi], 'n', 'n_cases'} of per-query values with a by-case bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(cases)
    keep = ~np.isnan(v)
    if not keep.any():
        return {"value": None, "ci95": [None, None], "n": 0, "n_cases": 0}
    value = float(np.mean(v[keep]) if stat == "mean" else np.median(v[keep]))
    lo, hi = bootstrap_ci_by_case(v, g, n_boot=n_boot, seed=seed, stat=stat)
    return {"value": _num(value), "ci95": [_num(lo), _num(hi)], "n": int(keep.sum()),
            "n_cases": int(len(np.unique(g[keep])))}  # fmt: skip
