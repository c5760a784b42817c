"""Search on a real indexed home (medpix slice + covid-chestxray, frozen towers)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from medsearch.catalog import Catalog
from medsearch.errors import IndexInconsistent, IndexMismatch, InvalidInput
from medsearch.search import Filters, Searcher, rrf


@pytest.fixture(scope="module")
def searcher(indexed_home, towers):
    return Searcher(indexed_home, encoder=towers)


def _images(searcher, where="1=1", params=()):
    return searcher.catalog.db.execute(f"SELECT id, path, modality_type, case_id FROM images WHERE {where}", params).fetchall()


def test_image_query_finds_itself_first(searcher):
    for image_id, path, _, _ in _images(searcher)[::9][:6]:
        hits = searcher.similar(path, k=3)
        assert hits[0].image_id == image_id
        assert hits[0].score == pytest.approx(1.0, abs=0.01)


def test_ct_queries_return_mostly_ct(searcher):
    cts = _images(searcher, "modality_type = 'CT' AND source = 'medpix-2.0'")
    fractions = []
    for image_id, _, _, _ in cts[:: max(1, len(cts) // 12)]:
        hits = searcher.similar(image_id, k=10, per_case=False)
        fractions.append(np.mean([h.modality_type == "CT" for h in hits]))
    mean = float(np.mean(fractions))
    print(f"CT fraction in top-10 of {len(fractions)} CT queries: {mean:.2f}")
    assert mean >= 0.7


def test_faiss_equals_numpy_oracle_on_stored_vectors(searcher):
    ids, vecs = zip(*searcher.catalog.iter_vectors(searcher.model_id, "image"), strict=True)
    ids, vecs = np.concatenate(ids), np.concatenate(vecs)  # (n,), (n, 1280)
    q = vecs[[3, 17]]
    D, I = searcher.index("image").search(q, 10)
    sims = q @ vecs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(D, np.take_along_axis(sims, order, 1), rtol=1e-4, atol=1e-4)
    # ids can only differ where two scores tie
    assert (I == ids[order]).mean() >= 0.95


def test_filters_restrict_results(searcher):
    _, path, _, _ = _images(searcher, "modality_type = 'CT'")[0]
    hits = searcher.similar(path, k=10, filters=Filters(modality="MR"))
    assert hits and all(h.modality_type == "MR" for h in hits)
    hits = searcher.similar(path, k=10, filters=Filters(body_region="head", split="dev"))
    assert hits and all(h.body_region == "Head" and h.split == "dev" for h in hits)
    hits = searcher.search_text("fracture", k=5, filters=Filters(modality="CT"))
    assert all(h.modality_type == "CT" for h in hits)


def test_one_hit_per_case_and_exclusions(searcher):
    image_id, path, _, case_id = _images(searcher, "source = 'medpix-2.0'")[0]
    hits = searcher.similar(path, k=10)
    assert len({h.case_id for h in hits}) == len(hits)
    hits = searcher.similar(path, k=10, exclude_same_case=True)
    assert case_id not in {h.case_id for h in hits}


def test_text_search_finds_covid_chest_xrays(searcher):
    hits = searcher.search_text("bilateral patchy opacities in both lungs, viral pneumonia", k=5)
    assert any(h.source == "covid-chestxray" for h in hits)
    assert all(h.excerpt for h in hits)
    reports = searcher.search_reports("bilateral ground glass opacities", k=5)
    assert reports and len({h.case_id for h in reports}) == len(reports)


def test_bad_queries(searcher):
    with pytest.raises(InvalidInput, match="empty"):
        searcher.search_text("  ")
    with pytest.raises(InvalidInput, match="shared image-text space"):
        searcher.search_text("mass", mode="image")


def test_inconsistent_index_refused(indexed_home, towers, tmp_path):
    home = tmp_path / "copy"
    shutil.copytree(indexed_home, home)
    cat = Catalog.open(home / "catalog.db")
    with cat.atomic():
        first = cat.db.execute("SELECT item_id FROM vectors WHERE space = 'image' ORDER BY item_id LIMIT 1").fetchone()[0]
        cat.db.execute("DELETE FROM vectors WHERE space = 'image' AND item_id = ?", [first])
    s = Searcher(home, encoder=towers, catalog=cat)
    with pytest.raises(IndexInconsistent, match="medsearch check --repair"):
        s.index("image")
    # An index directory holding another model's index is refused by its manifest.
    shutil.copytree(home / "indexes" / "towers", home / "indexes" / "lite")
    with pytest.raises(IndexMismatch, match="built with model 'towers'"):
        Searcher(home, model="lite", encoder=towers, catalog=cat).index("text")


def test_rrf_orders_by_summed_reciprocal_ranks():
    fused = rrf([["a", "b", "c"], ["b", "c", "d"]], k=60)
    assert [x for x, _ in fused][:2] == ["b", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
