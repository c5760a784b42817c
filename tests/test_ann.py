"""Index selection, IVF-PQ + refine, recall tuning, filtered search and incremental sync,
each checked against a brute-force numpy oracle on seeded clustered data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsearch.catalog import Catalog
from medsearch.config import IndexConfig, Paths
from medsearch.errors import IndexMismatch
from medsearch.stores import ann
from medsearch.stores.faiss import VectorIndex


def _clustered(n, d=32, seed=0, n_clusters=20, intrinsic=8):
    """Low-intrinsic-dimension clustered unit vectors (like real embeddings), float16-rounded."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, intrinsic))
    proj = rng.standard_normal((intrinsic, d)) / np.sqrt(intrinsic)
    z = centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, intrinsic))
    x = z @ proj + 0.3 / np.sqrt(d) * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    return x


def _blocks(ids, x, step=700):
    return [(ids[i : i + step], x[i : i + step]) for i in range(0, len(ids), step)]


def _build(ids, x, config):
    return VectorIndex.from_blocks(
        _blocks(ids, x), model_id="m", weights_hash="w", space="image", dim=x.shape[1], count=len(ids), config=config
    )


def _oracle(q, x, ids, k, allowed=None):
    mask = np.ones(len(ids), bool) if allowed is None else np.isin(ids, allowed)
    sims = q @ x[mask].T
    order = np.argsort(-sims, axis=1)[:, :k]
    return ids[mask][order]


def _recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def test_choose_kind_by_size_and_override():
    cfg = IndexConfig(flat_max=1000)
    assert ann.choose_kind(1000, cfg) == "flat"
    assert ann.choose_kind(1001, cfg) == "ivfpq"
    assert ann.choose_kind(1001, IndexConfig(flat_max=1000, large_kind="hnsw")) == "hnsw"
    assert ann.choose_kind(10, IndexConfig(kind="hnsw")) == "hnsw"
    with pytest.raises(IndexMismatch, match="auto, flat, hnsw, ivfpq"):
        ann.choose_kind(10, IndexConfig(kind="annoy"))


def test_ivf_shape_divides_dim():
    assert ann.ivf_shape(1_000_000, 384, IndexConfig()) == (2048, 48)
    assert ann.ivf_shape(100_000, 1280, IndexConfig()) == (512, 160)
    nlist, m = ann.ivf_shape(5000, 30, IndexConfig())
    assert 30 % m == 0 and nlist <= 5000 // 39


def test_ivfpq_auto_build_tunes_to_target_and_roundtrips(tmp_path):
    n, d = 6000, 32
    x, q = np.split(_clustered(n + 200, d), [n])  # q: fresh queries from the same distribution
    ids = np.arange(10, 10 + n, dtype=np.int64) * 3
    cfg = IndexConfig(flat_max=1000, target_recall=0.9)
    idx = _build(ids, x, cfg)
    p = idx.manifest.params
    assert idx.manifest.kind == "ivfpq" and idx.ntotal == n
    assert {"nlist", "pq_m", "nprobe", "k_factor", "tuned_recall_at_10"} <= set(p)
    assert p["tuned_recall_at_10"] >= 0.9 and p["target_met"]
    _, I = idx.search(q, 10)
    assert _recall(I, _oracle(q, x, ids, 10)) >= 0.88
    idx.save(tmp_path)
    saved = json.loads((tmp_path / "image.json").read_text())
    assert saved["params"]["nprobe"] == p["nprobe"]
    back = VectorIndex.load(tmp_path, "image", model_id="m")
    assert ann.ivf_of(back.index).nprobe == p["nprobe"]
    np.testing.assert_array_equal(back.search(q, 10)[1], I)
    np.testing.assert_allclose(back.reconstruct(int(ids[5])), x[5])


def test_hnsw_tuning_reaches_target_on_fresh_queries():
    n, d = 5000, 32
    x, q = np.split(_clustered(n + 200, d, seed=3), [n])
    ids = np.arange(n, dtype=np.int64)
    idx = _build(ids, x, IndexConfig(kind="hnsw", target_recall=0.95))
    assert idx.manifest.params["ef_search"] in ann.HNSW_EF
    assert _recall(idx.search(q, 10)[1], _oracle(q, x, ids, 10)) >= 0.93


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_filtered_search_stays_inside_the_filter(kind, monkeypatch):
    import medsearch.stores.faiss as vectors

    n, d = 4000, 32
    x, q = np.split(_clustered(n + 20, d, seed=4), [n])
    ids = np.arange(n, dtype=np.int64) + 1
    idx = _build(ids, x, IndexConfig(kind=kind, flat_max=100, target_recall=0.9))
    allowed = ids[::2]
    for subset_max in (vectors.EXACT_SUBSET_MAX, 100):  # exact gather path, then the index's own filter
        monkeypatch.setattr(vectors, "EXACT_SUBSET_MAX", subset_max)
        D, I = idx.search(q, 10, allowed=allowed)
        assert np.isin(I, allowed).all()
        truth = _oracle(q, x, ids, 10, allowed)
        r = _recall(I, truth)
        assert r == 1.0 if subset_max > 100 or kind == "flat" else r >= 0.85
    D, I = idx.search(q, 5, allowed=np.array([ids[3], 10**9]))  # one real id and one unknown
    assert (I[:, 0] == ids[3]).all() and (I[:, 1:] == -1).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_sync_adds_only_new_vectors_and_refuses_changes(kind):
    n, d = 3000, 32
    x = _clustered(n + 50, d, seed=5)
    ids = np.arange(n + 50, dtype=np.int64) * 2 + 1
    cfg = IndexConfig(kind=kind, target_recall=0.9)
    idx = _build(ids[:n], x[:n], cfg)
    gen = idx.manifest.generation
    assert idx.sync(_blocks(ids, x), max_new_fraction=0.5) == 50
    assert idx.ntotal == n + 50 and idx.manifest.count == n + 50 and idx.manifest.generation == gen + 1
    _, I = idx.search(x[n:], 1)  # each new vector finds itself
    assert (I[:, 0] == ids[n:]).all()
    assert idx.sync(_blocks(ids, x)) == 0  # nothing new
    changed = x.copy()
    changed[7] = changed[8]
    assert idx.sync(_blocks(ids, changed)) is None  # a replaced vector needs a rebuild
    assert idx.sync(_blocks(ids[1:], x[1:])) is None  # so does a removed one
    assert idx.ntotal == n + 50  # and a refused sync changes nothing
    more = np.r_[ids, 10**6 + np.arange(4000)], np.r_[x, _clustered(4000, d, 6)]
    assert idx.sync(_blocks(*more), max_new_fraction=1.0) is None  # more than doubling: rebuild


def test_build_indexes_adds_new_vectors_without_rebuilding(tmp_path):
    from indexer.embed import build_indexes

    cat = Catalog.open(None)
    x = _clustered(2600, 32, seed=11)
    cfg = IndexConfig(kind="hnsw", target_recall=0.9)
    paths = Paths(tmp_path)
    cat.put_vectors("m", "image", list(range(1, 2501)), x[:2500])
    first = build_indexes(cat, paths, model_id="m", weights_hash="w", dims={"image": 32}, config=cfg)["image"]
    assert first["rebuilt"] and first["count"] == 2500
    cat.put_vectors("m", "image", list(range(2501, 2601)), x[2500:])
    second = build_indexes(cat, paths, model_id="m", weights_hash="w", dims={"image": 32}, config=cfg)["image"]
    assert second == {"count": 2600, "kind": "hnsw", "generation": 2, "rebuilt": False, "added": 100}
    idx = VectorIndex.load(paths.index_dir("m"), "image", model_id="m")
    assert idx.manifest.params["incremental_adds"] == 100
    assert (idx.search(x[2500:], 1)[1][:, 0] == np.arange(2501, 2601)).all()
    cat.put_vectors("m", "image", [5], x[6:7])  # a replaced vector: rebuild
    third = build_indexes(cat, paths, model_id="m", weights_hash="w", dims={"image": 32}, config=cfg)["image"]
    assert third["rebuilt"] and third["generation"] == 3


def test_ivfpq_tuning_reads_deeper_when_no_nprobe_reaches_the_target(tmp_path):
    # coarse codes and no re-rank depth: every nprobe falls short at k_factor 1, so the tuner must
    # widen the exact re-rank (what ivfpq at 1M needed: 0.949 at k_factor 8 with every list probed)
    n, d = 6000, 32
    x, q = np.split(_clustered(n + 200, d, seed=5), [n])
    ids = np.arange(n, dtype=np.int64)
    shallow = IndexConfig(kind="ivfpq", pq_m=2, refine_k_factor=1.0, target_recall=0.95, tune=False)
    idx0 = _build(ids, x, shallow)
    ann.ivf_of(idx0.index).nprobe = ann.ivf_of(idx0.index).nlist  # every list: only the codes limit it
    assert _recall(idx0.search(q, 10)[1], _oracle(q, x, ids, 10)) < 0.9
    idx = _build(ids, x, IndexConfig(kind="ivfpq", pq_m=2, refine_k_factor=1.0, target_recall=0.95))
    p = idx.manifest.params
    assert p["target_met"] and p["k_factor"] > 1.0
    assert _recall(idx.search(q, 10)[1], _oracle(q, x, ids, 10)) >= 0.93
    idx.save(tmp_path)
    back = VectorIndex.load(tmp_path, "image", model_id="m")
    assert ann.search_params(back.index)["k_factor"] == p["k_factor"]
    np.testing.assert_array_equal(back.search(q, 10)[1], idx.search(q, 10)[1])
