"""Index selection, construction, recall tuning and incremental updates for the FAISS store (``medsearch.stores.faiss``).

Kinds (every index is an ``IndexIDMap2`` over inner product, FAISS ids = catalog row ids):

    flat    IndexFlatIP                              exact; the default up to ``flat_max`` vectors
    hnsw    IndexHNSWFlat(M)                         graph; fast queries, slow to build on few cores
    ivfpq   IndexRefineFlat(IndexIVFPQ(nlist, m))    coarse lists + PQ codes, then an exact re-rank
                                                     of ``k_factor * k`` candidates; fast to build

``auto`` is flat up to ``flat_max`` and ``ivfpq`` above (``config.large_kind``). After a build
the search knob (HNSW ``efSearch``, IVF ``nprobe``) is tuned on a sample of stored vectors used
as queries (each query's own id left out), against exact top-k computed from the index's own
exact vector storage, to the smallest value reaching ``target_recall`` (+ ``tune_margin``).
The chosen values and the measured recall go into the manifest ``params``.

An index is *synced* rather than rebuilt when it already holds a prefix-consistent subset of
the stored vectors: every indexed id still stored with bit-identical vector, no id removed.
Only the new vectors are then added, so adding 100 images to a 1M-vector HNSW index costs a
read of the stored vectors, not a graph build.

The GPU is used when ``faiss.get_num_gpus() > 0`` (faiss-gpu installed) and
``config.use_gpu``: the IVF coarse k-means runs on it; the index saved is always a CPU index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from medsearch.config import IndexConfig
from medsearch.errors import IndexMismatch

KINDS = ("flat", "hnsw", "ivfpq")
TUNE_K = 10
HNSW_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
IVF_NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)

Blocks = Iterable[tuple[np.ndarray, np.ndarray]]
BlockSource = Blocks | Callable[[], Blocks]


def _faiss():
    import faiss

    return faiss


def gpu_count() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def choose_kind(n: int, config: IndexConfig) -> str:
    """The index kind for ``n`` vectors: the configured kind, or flat up to ``flat_max`` and
    ``large_kind`` above."""
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n <= config.flat_max else config.large_kind
    if kind not in KINDS:
        raise IndexMismatch(f"unknown index kind {kind!r}", hint="use one of: auto, " + ", ".join(KINDS))
    return kind


def ivf_shape(n: int, dim: int, config: IndexConfig) -> tuple[int, int]:
    """(nlist, pq_m) for an IVF-PQ index over ``n`` vectors of ``dim``.

    nlist: the configured value, else a power of two near 2*sqrt(n) (at least 16, at most n/39
    so k-means has ~39 points per list); pq_m: the configured value, else the largest divisor of
    ``dim`` up to dim/8 (8 dims per 8-bit sub-quantizer; the refine step recovers the rest).
    """
    nlist = config.ivf_nlist
    if nlist <= 0:
        target = 2.0 * np.sqrt(max(n, 1))
        nlist = int(2 ** round(np.log2(max(target, 16))))
        nlist = max(1, min(nlist, max(1, n // 39)))
    m = config.pq_m
    if m <= 0:
        m = next(c for c in range(max(1, dim // 8), 0, -1) if dim % c == 0)
    if dim % m:
        raise IndexMismatch(f"pq_m={m} does not divide dim {dim}", hint="choose pq_m among the divisors of dim")
    return int(nlist), int(m)


def new_index(dim: int, kind: str, config: IndexConfig, n: int = 0) -> Any:
    """An empty ``IndexIDMap2`` of ``kind`` (IVF-PQ still needs ``train``)."""
    faiss = _faiss()
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.hnsw_ef_construction
        base.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivfpq":
        nlist, m = ivf_shape(n, dim, config)
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()
        ivf.nprobe = min(nlist, config.ivf_nprobe)
        base = faiss.IndexRefineFlat(ivf)
        base.own_fields = True
        ivf.this.disown()
        base.k_factor = float(config.refine_k_factor)
    else:
        raise IndexMismatch(f"unknown index kind {kind!r}", hint="use one of: auto, " + ", ".join(KINDS))
    idx = faiss.IndexIDMap2(base)
    idx.own_fields = True
    base.this.disown()
    return idx


def ivf_of(index: Any) -> Any | None:
    """The IndexIVF inside an ivfpq index (None for other kinds)."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(faiss.extract_index_ivf(inner.base_index))
    return None


def train(index: Any, sample: np.ndarray, config: IndexConfig) -> dict[str, Any]:
    """Train an ivfpq index on ``sample`` (n, d) float32; the coarse k-means on a GPU when available."""
    faiss = _faiss()
    ivf = ivf_of(index)
    if ivf is None or ivf.is_trained:
        return {}
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    used_gpu = False
    if config.use_gpu and gpu_count() > 0:
        km = faiss.Kmeans(ivf.d, ivf.nlist, niter=config.ivf_niter, gpu=True, seed=1234, verbose=False,
                          spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        km.train(sample)
        ivf.quantizer.add(km.centroids)  # a trained quantizer with nlist entries: IVF skips its own k-means
        used_gpu = True
    else:
        ivf.cp.niter = config.ivf_niter
        ivf.cp.seed = 1234
    # trains the coarse quantizer (unless done above), then PQ on the residuals; through the
    # IDMap2 so every wrapper's is_trained flag is set
    index.train(sample)
    return {"train_size": int(len(sample)), "kmeans_on_gpu": used_gpu}


def exact_storage(index: Any) -> np.ndarray | None:
    """A read-only (ntotal, d) float32 view of the exact vectors an index keeps, in internal order.

    flat: the flat codes; hnsw: its flat storage; ivfpq: the refine index. None otherwise.
    The view is valid until the index is modified or freed.
    """
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        flat = faiss.downcast_index(inner.storage)
    elif isinstance(inner, faiss.IndexRefine):
        flat = faiss.downcast_index(inner.refine_index)
    else:
        flat = inner
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
        return None if not isinstance(flat, faiss.IndexFlat) else np.zeros((0, inner.d), np.float32)
    n, d = int(flat.ntotal), int(flat.d)
    view = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    view.flags.writeable = False
    return view


def ids_of(index: Any) -> np.ndarray:
    """Catalog ids in internal order (a copy), (ntotal,) int64."""
    return _faiss().vector_to_array(index.id_map).astype(np.int64, copy=False)


# ---------------------------------------------------------------------------- search knobs
def search_params(index: Any) -> dict[str, Any]:
    """The current search knobs of an index, for the manifest."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"ef_search": int(inner.hnsw.efSearch)}
    if isinstance(inner, faiss.IndexRefine):
        return {"nprobe": int(ivf_of(index).nprobe), "k_factor": float(inner.k_factor)}
    return {}


def apply_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Set the search knobs recorded in a manifest on a freshly read index."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index)
    if kind == "hnsw" and "ef_search" in params:
        inner.hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivfpq":
        if "nprobe" in params:
            ivf_of(index).nprobe = int(params["nprobe"])
        if "k_factor" in params:
            inner.k_factor = float(params["k_factor"])


def _set_knob(index: Any, kind: str, value: int) -> None:
    if kind == "hnsw":
        _faiss().downcast_index(index.index).hnsw.efSearch = int(value)
    else:
        ivf_of(index).nprobe = int(value)


def tune(index: Any, kind: str, config: IndexConfig, queries: np.ndarray, *, k: int = TUNE_K) -> dict[str, Any]:
    """Smallest efSearch / nprobe whose recall@k on ``queries`` reaches the target.

    ``queries`` (nq, d) are stored vectors held out of the index while it is tuned (``build``
    adds them afterwards): new points from the data's own distribution, like real queries.
    Stored points still in the index would be optimistic (a graph index finds a point it
    holds far more easily: 0.99 vs 0.90 recall at the same efSearch on our synthetic set).
    Exact top-k comes from the index's own exact vector storage.
    """
    faiss = _faiss()
    if kind == "flat" or not config.tune or len(queries) == 0:
        return {}
    xb = exact_storage(index)
    if xb is None or index.ntotal <= k:
        return {}
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    _, gt = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)  # (nq, k) internal positions
    truth = [set(row.tolist()) for row in gt]
    nq = len(xq)
    inner = faiss.downcast_index(index.index)
    target = min(1.0, config.target_recall + config.tune_margin)
    if kind == "hnsw":
        candidates = [(e, 0.0) for e in HNSW_EF if e >= k]
    else:
        # nprobe first at the configured re-rank depth; when every nprobe falls short (at ~1M the PQ
        # codes' ranking, not the lists probed, is the limit: 0.949 at k_factor 8), the exact re-rank
        # reads deeper (k_factor x2, x4, x8) with nprobe swept again at each depth.
        nlist = ivf_of(index).nlist
        probes = sorted({min(p, nlist) for p in IVF_NPROBE})
        factors = [inner.k_factor * f for f in (1, 2, 4, 8)]
        candidates = [(p, f) for f in factors for p in probes]
    best, recall = candidates[-1], -1.0  # the setting kept and its recall: the first to reach the target, else the best
    for value, factor in candidates:
        _set_knob(index, kind, value)
        if factor:
            inner.k_factor = float(factor)
        _, found = inner.search(xq, k)  # internal positions
        got = float(np.mean([len(t & set(row.tolist())) / max(1, len(t)) for t, row in zip(truth, found, strict=True)]))
        if got > recall:
            best, recall = (value, factor), got
        if got >= target:
            break
    _set_knob(index, kind, best[0])
    if best[1]:
        inner.k_factor = float(best[1])
    out = {"tuned_recall_at_10": round(recall, 4), "target_recall": config.target_recall, "tune_queries": int(nq)}
    out["target_met"] = bool(recall >= config.target_recall)
    return out


# ---------------------------------------------------------------------------- building
def _iter(source: BlockSource) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return iter(source() if callable(source) else source)


def _replayable(source: BlockSource) -> bool:
    return callable(source) or isinstance(source, (list, tuple))


def _check(vecs: np.ndarray, dim: int, space: str) -> np.ndarray:
    if vecs.ndim != 2 or vecs.shape[1] != dim:
        raise IndexMismatch(f"stored {space} vectors have dim {vecs.shape[-1]}, expected {dim}")
    return np.ascontiguousarray(vecs, dtype=np.float32)


def _strided_sample(source: BlockSource, count: int, want: int) -> np.ndarray:
    """About ``want`` rows spread evenly over the stream (one pass; O(want) memory)."""
    stride = max(1, count // max(1, want))
    parts, seen = [], 0
    for _, vecs in _iter(source):
        offs = (-seen) % stride
        parts.append(np.asarray(vecs[offs::stride], dtype=np.float32))
        seen += len(vecs)
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return sample[:want]


def build(source: BlockSource, *, dim: int, count: int, space: str, config: IndexConfig) -> tuple[Any, str, dict[str, Any]]:
    """Build an index from (ids (n,) int64, vecs (n, dim) float32) blocks -> (index, kind, params).

    ``source`` is an iterable of blocks or a zero-argument callable returning a fresh one. IVF
    training needs a sample first: from a callable (or list) it is drawn evenly over a first
    pass; from a one-shot iterator it is the first ``train_size`` rows (buffered, then added).
    """
    kind = choose_kind(count, config)
    index = new_index(dim, kind, config, n=count)
    params: dict[str, Any] = {}
    blocks: Iterable[tuple[np.ndarray, np.ndarray]]
    if kind == "ivfpq":
        ivf = ivf_of(index)
        want = min(count, config.ivf_train_per_list * ivf.nlist)
        if _replayable(source):
            sample = _strided_sample(source, count, want)
            blocks = _iter(source)
        else:
            it = _iter(source)
            head: list[tuple[np.ndarray, np.ndarray]] = []
            got = 0
            for ids, vecs in it:
                head.append((ids, vecs))
                got += len(ids)
                if got >= want:
                    break
            sample = np.concatenate([v for _, v in head])[:want] if head else np.zeros((0, dim), np.float32)
            blocks = _chain(head, it)
        if len(sample) < ivf.nlist:
            raise IndexMismatch(
                f"an ivfpq index with {ivf.nlist} lists needs at least that many vectors to train, got {len(sample)}",
                hint="use --kind flat or hnsw for small collections",
            )
        params.update(train(index, _check(sample, dim, space), config))
        params.update(nlist=int(ivf.nlist), pq_m=int(ivf.pq.M), pq_bits=8, refine="flat")
        del sample
    else:
        blocks = _iter(source)
    # every stride-th row is held out of the index while tuning, then added
    nq = min(config.tune_queries, count // 10) if (kind != "flat" and config.tune) else 0
    stride = max(1, count // nq) if nq else 0
    held_ids: list[np.ndarray] = []
    held_vecs: list[np.ndarray] = []
    seen = held = 0
    for ids, vecs in blocks:
        vecs = _check(vecs, dim, space)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        m = len(ids)
        if stride and held < nq:
            take = (np.arange(seen, seen + m) % stride) == stride // 2
            take &= np.cumsum(take) <= nq - held
            if take.any():
                held_ids.append(ids[take])
                held_vecs.append(vecs[take])
                held += int(take.sum())
                ids, vecs = ids[~take], np.ascontiguousarray(vecs[~take])
        seen += m
        if len(ids):
            index.add_with_ids(vecs, ids)
    if kind == "hnsw":
        params.update(hnsw_m=config.hnsw_m, ef_construction=config.hnsw_ef_construction)
    if held_ids:
        queries = np.concatenate(held_vecs)
        params.update(tune(index, kind, config, queries))
        index.add_with_ids(queries, np.concatenate(held_ids))
    params.update(search_params(index))
    return index, kind, params


def _chain(head: list[tuple[np.ndarray, np.ndarray]], rest: Iterator[tuple[np.ndarray, np.ndarray]]):
    yield from head
    yield from rest


def sync(index: Any, source: BlockSource, *, dim: int, space: str, max_new_fraction: float = 1.0) -> int | None:
    """Add to ``index`` the stored vectors it lacks, if that is all that changed.

    Returns the number of vectors added, or None when a rebuild is needed: an indexed id is no
    longer stored, a stored vector differs from the indexed one, the index keeps no exact
    vectors to compare with, or there are more new vectors than ``max_new_fraction`` of the
    index (IVF lists trained on the old data would be a poor fit). Nothing is modified unless
    the whole check passes. Memory: O(new vectors).
    """
    xb = exact_storage(index)
    n = int(index.ntotal)
    if xb is None:
        return None
    internal_ids = ids_of(index)
    order = np.argsort(internal_ids, kind="stable")
    sorted_ids = internal_ids[order]
    seen = 0
    new_ids: list[np.ndarray] = []
    new_vecs: list[np.ndarray] = []
    n_new = 0
    for ids, vecs in _iter(source):
        ids = np.asarray(ids, dtype=np.int64)
        vecs = _check(vecs, dim, space)
        if n:
            at = np.searchsorted(sorted_ids, ids)
            at_c = np.minimum(at, n - 1)
            present = sorted_ids[at_c] == ids
        else:
            at_c = np.zeros(len(ids), np.int64)
            present = np.zeros(len(ids), bool)
        if present.any():
            seen += int(present.sum())
            if not np.array_equal(xb[order[at_c[present]]], vecs[present]):
                return None
        if not present.all():
            n_new += int((~present).sum())
            if n and n_new > max_new_fraction * n:
                return None
            new_ids.append(ids[~present])
            new_vecs.append(vecs[~present])
    if seen != n:
        return None
    if new_ids:
        index.add_with_ids(np.concatenate(new_vecs), np.concatenate(new_ids))
    return n_new


# ---------------------------------------------------------------------------- filtered search
def exact_subset_search(
    xq: np.ndarray, xb: np.ndarray, positions: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``xq`` (nq, d) over the rows ``positions`` of ``xb``; returns catalog ids."""
    sub = xb[positions]  # (m, d)
    scores = xq @ sub.T  # (nq, m)
    m = scores.shape[1]
    kk = min(k, m)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < m else np.tile(np.arange(m), (len(xq), 1))
    top = np.take_along_axis(scores, part, 1)
    o = np.argsort(-top, axis=1, kind="stable")
    part = np.take_along_axis(part, o, 1)
    D = np.full((len(xq), k), -np.inf, np.float32)
    I = np.full((len(xq), k), -1, np.int64)
    D[:, :kk] = np.take_along_axis(top, o, 1)
    I[:, :kk] = ids[positions[part]]
    return D, I
