"""Search on a real indexed home (medpix slice + covid-chestxray, frozen towers)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from rag_helpers import CountingEncoder

from medsearch.catalog import Catalog
from medsearch.errors import IndexInconsistent, IndexMismatch, InvalidInput, NotFound
from medsearch.search import Filters, ImageQuery, Searcher, rrf


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


def test_catalog_image_and_byte_identical_file_use_the_stored_vector(indexed_home, towers, tmp_path):
    from PIL import Image

    enc = CountingEncoder(towers)
    s = Searcher(indexed_home, encoder=enc)
    image_id, path, _, case_id = _images(s, "source = 'medpix-2.0'")[2]
    stored = s.catalog.get_vectors(s.model_id, "image", [image_id])[image_id]
    by_id, by_key, by_file = s.image_query(image_id), s.image_query(s.catalog.find_image(image_id).image_key), s.image_query(path)
    for q in (by_id, by_key, by_file):
        assert q.stored and q.row.image_id == image_id and q.row.case_id == case_id
        np.testing.assert_array_equal(q.vector[0], stored)
    assert enc.images_encoded == 0  # nothing decoded or encoded
    assert [h.score for h in s.similar(path, k=5)] == [h.score for h in s.similar(image_id, k=5)]
    assert s.similar(by_file, k=5) == s.similar(path, k=5) and enc.images_encoded == 0
    # the same pixels in other bytes are a new image: decoded and encoded once, no catalog row
    with Image.open(path) as im:
        im.load()
        im.save(tmp_path / "copy.png", compress_level=1)
    q = s.image_query(tmp_path / "copy.png")
    assert not q.stored and q.row is None and q.name == "copy.png" and enc.images_encoded == 1
    assert float(q.vector[0] @ stored) > 0.99  # float16 storage vs float32: same image
    hits = s.similar(q, k=3, exclude_same_case=True)
    assert enc.images_encoded == 1 and hits[0].case_id == case_id  # not the catalog image: nothing excluded
    # a PIL image with the sha256 of a catalog file (an upload) is that image, like the file
    with Image.open(path) as im:
        up = s.image_query(im.copy(), sha256=by_file.row.sha256)
    assert up.stored and up.row == by_file.row and enc.images_encoded == 1
    assert isinstance(up, ImageQuery) and s.image_query(up) is up


def test_mistyped_path_names_the_path_and_keys_fall_through(searcher, tmp_path):
    missing = tmp_path / "scans" / "brain_axial.png"
    for ref in (str(missing), "brain_axial.png", "./scan", "~/scan"):
        with pytest.raises(NotFound, match="no file") as e:
            searcher.similar(ref, k=3)
        assert ref in e.value.message and "path" in e.value.hint
    with pytest.raises(NotFound, match="no image 'MPX0000_nope' in the catalog"):
        searcher.similar("MPX0000_nope", k=3)
    with pytest.raises(NotFound, match="no image '999999' in the catalog"):
        searcher.similar("999999", k=3)
    image_id, _, _, _ = _images(searcher)[0]
    row = searcher.catalog.find_image(image_id)
    assert searcher.similar(f"{row.source}:{row.image_key}", k=1)[0].image_id == image_id


def test_similar_same_scores_from_cli_and_api(indexed_home, towers, tmp_path):
    """A catalog image scores the same through both shells: its id, its file (CLI) and its upload (API)."""
    import json

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from api.app import create_app
    from api.settings import ApiSettings
    from cli.main import app as cli

    cat = Catalog.open(indexed_home / "catalog.db", create=False)
    image_id, path = cat.db.execute(
        "SELECT id, path FROM images WHERE source = 'medpix-2.0' AND frame IS NULL ORDER BY id LIMIT 1"
    ).fetchone()
    cat.close()

    def cli_hits(ref):
        r = CliRunner().invoke(cli, ["similar", str(ref), "--home", str(indexed_home), "-k", "8", "--json"])
        assert r.exit_code == 0, r.output
        return [(h["image_id"], h["score"]) for h in json.loads(r.stdout)]

    settings = ApiSettings(home=indexed_home, audit_log=tmp_path / "audit.log", watch_seconds=0)
    with TestClient(create_app(settings, encoder=towers)) as client:
        def api_hits(**kw):
            r = client.post("/v1/search/image", data={"k": "8", **kw.pop("data", {})}, **kw)
            assert r.status_code == 200, r.text
            return [(h["image_id"], h["score"]) for h in r.json()["hits"]]

        with open(path, "rb") as f:
            upload = api_hits(files={"file": ("q.png", f, "image/png")})
        by_id = api_hits(data={"image_id": str(image_id)})
    from_file, from_id = cli_hits(path), cli_hits(image_id)
    assert from_file[0] == (image_id, pytest.approx(1.0, abs=1e-3))
    assert from_file == from_id == upload == by_id
