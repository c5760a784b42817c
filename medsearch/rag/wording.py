"""A wording prior for the extractive drafter: how common a sentence's words are in the archive's findings.

Evidence sentences differ in how they are written as much as in what they say: "There is a
well-circumscribed mass in the left lobe of the liver." next to "24 Jan: Brain MRI (from emergency
dept) -axial DWI--increased signal ...". A draft reads better, and matches what the radiologist
writes more often, when it is made of sentences in the archive's usual wording. The prior is the
share of (a seeded sample of) the pool's FINDINGS sections that contain each word; a sentence's
typicality is the mean share of its words (0..1). Only the pool is read (the split and source the
evidence comes from), never the query's own report.

Measured on case-grouped folds of medpix-2.0 ``train`` (models refitted without the fold, 600
queries; ``benchmarks/results/eval_drafts_dev.md``, round 4): adding ``ExtractiveConfig.wording`` x
typicality to the consensus score raised ROUGE-L 0.132 -> 0.149 and MiniLM cosine 0.469 -> 0.473.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medsearch.text import words

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.catalog import Catalog
    from medsearch.search import Filters

@dataclass(frozen=True)
class WordingPrior:
    """Share of the sampled findings texts that contain each word."""

    shares: dict[str, float]
    n_texts: int

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordingPrior:
        df: Counter[str] = Counter()
        n = 0
        for t in texts:
            ws = set(words(t))
            if ws:
                df.update(ws)
                n += 1
        return cls({w: c / n for w, c in df.items()} if n else {}, n)

    def typicality(self, texts: Sequence[str]) -> np.ndarray:
        """(m,) float32: mean share of each text's words (0 for a text without words, or an empty prior)."""
        get = self.shares.get
        out = np.zeros(len(texts), dtype=np.float32)
        for i, t in enumerate(texts):
            ws = words(t)
            if ws:
                out[i] = sum(get(w, 0.0) for w in ws) / len(ws)
        return out


_CACHE: dict[tuple[str, str, str, int, int], tuple[float, tuple[int, ...] | None, WordingPrior]] = {}
_LOCK = threading.Lock()
MIN_AGE_S = 5.0  # while the catalog is being written, re-read a prior at most this often


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:  # no write-ahead log (yet)
        return 0


def _stamp(catalog: Catalog) -> tuple[int, ...] | None:
    """Modification times of the catalog file and its write-ahead log: any ingest or erasure changes them."""
    try:
        return (_mtime_ns(f"{catalog.path}"), _mtime_ns(f"{catalog.path}-wal"))
    except OSError:
        return None


def pool_prior(catalog: Catalog, filters: Filters, *, limit: int = 2000, seed: int = 0) -> WordingPrior:
    """The prior of the pool the evidence comes from: FINDINGS sections of the filters' split and source.

    Cached per process by (catalog file, split, source): every ``Drafter`` (one per API request) shares it.
    It is read again once the catalog has changed (an ingest, or an erasure: no erased report's words stay
    in it for more than ``MIN_AGE_S``), at most every ``MIN_AGE_S`` seconds while writes go on."""
    key = (str(catalog.path), repr(filters.split), repr(filters.source), limit, seed)
    now, stamp = time.monotonic(), _stamp(catalog)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None and (hit[1] == stamp or now - hit[0] < MIN_AGE_S):
        return hit[2]
    pool = {"split": filters.split, "source": filters.source}
    prior = WordingPrior.from_texts(catalog.section_sample("findings", pool, limit=limit, seed=seed))
    with _LOCK:
        if len(_CACHE) > 64:  # many homes or pools in one process: start again rather than grow
            _CACHE.clear()
        _CACHE[key] = (now, stamp, prior)
    return prior
