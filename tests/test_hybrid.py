"""Hybrid text search: RRF fusion, the BM25 index over report/caption text, and the search modes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from medsearch.bm25 import BM25, build_bm25_index, catalog_docs, read_manifest
from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.errors import IndexInconsistent, IndexNotBuilt
from medsearch.eval.retrieval import _rrf_scores
from medsearch.search import Filters, Searcher, rrf

# ---------------------------------------------------------------------------- RRF


def test_rrf_hand_computed():
    fused = dict(rrf([["a", "b", "c"], ["b", "c"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 62)
    assert [x for x, _ in rrf([["a", "b", "c"], ["b", "c"]], k=60)] == ["b", "c", "a"]


def test_rrf_edge_cases():
    assert rrf([]) == []
    assert rrf([[], []]) == []
    # one ranking: order is kept
    assert [x for x, _ in rrf([[3, 1, 2]])] == [3, 1, 2]
    # an item ranked first everywhere wins; small k sharpens the top
    assert rrf([[1, 2], [1, 2], [2, 1]], k=1)[0][0] == 1
    # an item only in one list can beat one that is low in both
    out = dict(rrf([["x", "y", "z"], ["w", "v", "z"]], k=0))
    assert out["x"] == pytest.approx(1.0) and out["z"] == pytest.approx(2 / 3)


def test_matrix_rrf_equals_list_rrf():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(3, 12)) for _ in range(3)]
    mats[2][:, 5:] = -np.inf  # a mode that reaches only some items
    fused = _rrf_scores(mats, depth=7, k=60)
    for q in range(3):
        rankings = []
        for m in mats:
            order = sorted(range(12), key=lambda j: (-m[q, j], j))[:7]
            rankings.append([j for j in order if np.isfinite(m[q, j])])
        want = dict(rrf(rankings, k=60))
        for j in range(12):
            assert fused[q, j] == pytest.approx(want.get(j, 0.0))


# ---------------------------------------------------------------------------- BM25


DOCS = [
    "Axial CT shows a ring enhancing lesion in the left frontal lobe.",
    "Chest radiograph: consolidation of the left lower lobe.",
    "Sagittal MRI of the lumbar spine with a compression fracture of L1.",
    "Normal study.",
]


def test_bm25_ranks_by_shared_terms_and_stems():
    bm = BM25.build(DOCS, ids=[10, 11, 12, 13])
    ids, scores = bm.search("consolidated lobes", k=3)  # stems: consolid, lobe
    assert ids[0] == 11 and scores[0] > 0
    assert set(ids) <= {10, 11}  # only documents sharing a term
    assert bm.search("fractures of the spine", k=5)[0].tolist() == [12]
    assert bm.search("the of and", k=5)[0].size == 0  # stop words only
    ids, _ = bm.search("lobe", k=5, allowed=np.array([10]))
    assert ids.tolist() == [10]


def test_bm25_save_load_roundtrip(tmp_path):
    bm = BM25.build(DOCS, ids=[10, 11, 12, 13])
    bm.save(tmp_path, {"fingerprint": "x"})
    bm.save(tmp_path, {"fingerprint": "y"})  # a second generation replaces the first
    assert [p.name for p in tmp_path.glob("bm25-*")] == ["bm25-2"]
    loaded, man = BM25.load(tmp_path)
    assert man["generation"] == 2 and man["fingerprint"] == "y" and man["count"] == 4
    np.testing.assert_allclose(loaded.scores("left lobe lesion"), bm.scores("left lobe lesion"))
    with pytest.raises(IndexNotBuilt):
        BM25.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------- search modes


@pytest.fixture(scope="module")
def searcher(indexed_home, towers):
    return Searcher(indexed_home, encoder=towers)


def test_index_step_built_bm25_over_captions_and_sections(searcher):
    man = read_manifest(Paths(searcher.paths.home).index_dir(searcher.model_id))
    ids, _, fp = catalog_docs(searcher.catalog)
    assert man["count"] == len(ids) > 0 and man["fingerprint"] == fp


def test_unchanged_bm25_rebuild_clears_a_killed_writers_temp_manifest(searcher, tmp_path):
    """Found by tests/crash_harness.py: a kill while the BM25 manifest was written left its temp file,
    and the next `medsearch index` (texts unchanged: nothing to write) kept it for good."""
    import shutil

    src = Paths(searcher.paths.home).index_dir(searcher.model_id)
    d = tmp_path / "idx"
    shutil.copytree(src, d)
    stale = d / ".bm25.json.k1ll3d.tmp"
    stale.write_text('{"half": ')
    out = build_bm25_index(searcher.catalog, d)
    assert out["rebuilt"] is False and not stale.exists()
    assert read_manifest(d)["fingerprint"] == catalog_docs(searcher.catalog)[2]


def test_bm25_mode_returns_images_whose_text_matches(searcher):
    hits = searcher.search_text("pneumonia", k=5, mode="bm25", per_case=False)
    assert hits and all(h.matched == "bm25" for h in hits)
    assert all("pneumon" in (h.excerpt or "").lower() for h in hits)


def test_bm25_mode_respects_filters(searcher):
    hits = searcher.search_text("lesion", k=10, mode="bm25", filters=Filters(modality="MR"))
    assert hits and all(h.modality_type == "MR" for h in hits)


def test_hybrid_fuses_text_and_bm25(searcher):
    # the towers have no shared space: hybrid = text vectors + BM25
    q = "consolidation in the lung"
    # understanding off: the check is the fusion itself ("lung" would add a soft Thorax boost, test_understand)
    hybrid = searcher.search_text(q, k=10, mode="hybrid", per_case=False, understand=False)
    text = searcher.search_text(q, k=80, mode="text", per_case=False, understand=False)
    bm = searcher.search_text(q, k=80, mode="bm25", per_case=False, understand=False)
    assert hybrid and all(h.matched == "fused" for h in hybrid)
    want = [i for i, _ in rrf([[h.image_id for h in text], [h.image_id for h in bm]], k=searcher.config.rrf_k)][:10]
    assert [h.image_id for h in hybrid] == want


def test_stale_bm25_index_is_refused(indexed_home, towers, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(indexed_home, home)
    cat = Catalog.open(home / "catalog.db")
    cat.db.execute(
        "UPDATE texts SET text = text || ' changed' WHERE id = (SELECT min(id) FROM texts WHERE kind = 'caption')"
    )
    cat.db.conn.commit()
    s = Searcher(home, encoder=towers, catalog=cat)
    with pytest.raises(IndexInconsistent, match="BM25"):
        s.search_text("pneumonia", mode="bm25")
    info = build_bm25_index(cat, Paths(home).index_dir(towers.model_id))
    assert info["rebuilt"] and info["generation"] == 2
    s.reload()
    assert s.search_text("pneumonia", mode="bm25")
