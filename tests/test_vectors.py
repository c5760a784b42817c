"""FAISS wrapper: equals a brute-force numpy oracle; filters; atomic save and manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsearch.config import IndexConfig
from medsearch.errors import IndexInconsistent, IndexMismatch, IndexNotBuilt, StorageError
from medsearch.stores.faiss import VectorIndex


def _data(n=500, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    return ids, x


def _build(ids, x, **kw):
    blocks = [(ids[i : i + 100], x[i : i + 100]) for i in range(0, len(ids), 100)]
    return VectorIndex.from_blocks(blocks, model_id="m", weights_hash="w", space="image", dim=x.shape[1], count=len(ids), **kw)


def test_flat_equals_numpy_oracle():
    ids, x = _data()
    idx = _build(ids, x)
    q = x[:7] + 0.01
    D, I = idx.search(q, 10)
    sims = q @ x.T  # (7, n)
    order = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(I, ids[order])
    np.testing.assert_allclose(D, np.take_along_axis(sims, order, 1), rtol=1e-5, atol=1e-5)


def test_filter_selector_equals_masked_oracle():
    ids, x = _data(seed=1)
    idx = _build(ids, x)
    allowed = ids[::3]
    q = x[5:6]
    D, I = idx.search(q, 8, allowed=allowed)
    mask = np.isin(ids, allowed)
    sims = (q @ x[mask].T)[0]
    order = np.argsort(-sims)[:8]
    np.testing.assert_array_equal(I[0], ids[mask][order])
    assert set(I[0].tolist()) <= set(allowed.tolist())


def test_hnsw_recall_against_flat():
    ids, x = _data(n=2000, d=16, seed=2)
    flat = _build(ids, x)
    hnsw = _build(ids, x, config=IndexConfig(kind="hnsw"))
    assert hnsw.manifest.kind == "hnsw"
    q = x[:50]
    _, If = flat.search(q, 10)
    _, Ih = hnsw.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(If, Ih, strict=True)])
    assert recall >= 0.9


def test_save_load_roundtrip_and_manifest_checks(tmp_path):
    ids, x = _data()
    idx = _build(ids, x)
    idx.save(tmp_path)
    man = json.loads((tmp_path / "image.json").read_text())
    assert man["count"] == len(ids) and man["dim"] == 32 and man["checksum"]
    back = VectorIndex.load(tmp_path, "image", model_id="m", weights_hash="w")
    D1, I1 = idx.search(x[:3], 5)
    D2, I2 = back.search(x[:3], 5)
    np.testing.assert_array_equal(I1, I2)
    with pytest.raises(IndexMismatch, match="built with model"):
        VectorIndex.load(tmp_path, "image", model_id="other")
    with pytest.raises(IndexMismatch, match="other weights"):
        VectorIndex.load(tmp_path, "image", model_id="m", weights_hash="zzz")
    with pytest.raises(IndexNotBuilt):
        VectorIndex.load(tmp_path, "text")
    with pytest.raises(IndexMismatch, match="dim"):
        back.search(np.zeros((1, 5), np.float32), 3)


def test_corrupt_file_is_refused_and_old_file_survives_failed_save(tmp_path, monkeypatch):
    ids, x = _data()
    idx = _build(ids, x)
    idx.save(tmp_path)
    good = (tmp_path / "image.faiss").read_bytes()
    import faiss

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(StorageError, match="No space left on device"):  # a named error, the old index kept
        _build(ids[:10], x[:10]).save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "image.faiss").read_bytes() == good
    assert VectorIndex.load(tmp_path, "image").ntotal == len(ids)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "image.faiss").write_bytes(good[: len(good) // 2])
    with pytest.raises(IndexInconsistent, match="checksum"):
        VectorIndex.load(tmp_path, "image")
