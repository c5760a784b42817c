"""Query understanding over image metadata: rules on the catalog's values, the caption model, the soft boost."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medsearch.search import Filters, Searcher
from medsearch.understand import QueryModel, Vocabulary, boost, matches, understand


@pytest.fixture(scope="module")
def searcher(indexed_home, towers):
    return Searcher(indexed_home, encoder=towers)


@pytest.fixture(scope="module")
def vocab(searcher):
    return Vocabulary.from_catalog(searcher.catalog)


def test_vocabulary_is_the_catalogs_own_values(searcher, vocab):
    assert set(vocab.modality_type) == {v.lower() for v, _ in searcher.catalog.distinct("modality")}
    assert "ct" in vocab.modality_type and "mr" in vocab.modality_type
    # organs map onto the region values the catalog really holds
    assert vocab.region_values("abdomen") and all(v in vocab.body_region for v in vocab.region_values("abdomen"))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("axial CT of the liver with contrast", {"modality_type": "CT", "plane": "axial", "body_region": "abdomen",
                                                 "contrast": "with contrast"}),
        ("T2-weighted MRI of the temporal lobe", {"modality_type": "MR", "sequence": "T2-weighted", "body_region": "head"}),
        ("sagittal FLAIR", {"modality_type": "MR", "sequence": "FLAIR", "plane": "sagittal"}),
        ("non-contrast CT head", {"modality_type": "CT", "contrast": "non-contrast", "body_region": "head"}),
        ("PA chest radiograph, left lower lobe", {"modality_type": "X-ray", "plane": "PA", "body_region": "thorax",
                                                  "laterality": "left"}),
    ],
)
def test_rules_read_header_fields_with_spans(vocab, query, expected):
    u = understand(query, vocab)
    got = {c.field: c.label for c in u.constraints}
    assert got == expected
    for c in u.constraints:
        assert c.source == "rule" and c.confidence == 1.0
        start, end = c.span
        assert query[start:end]  # the span is a real piece of the query
    assert u.summary().split(", ")[0] == expected["modality_type"]


def test_lower_case_pa_and_bilateral_words_are_not_planes(vocab):
    u = understand("papillary lesion near the lateral ventricle", vocab)
    assert u.get("plane") is None
    assert u.get("body_region").label == "head"  # "ventricle"


def test_model_learns_from_captions_and_only_fills_silent_fields(searcher, vocab):
    rows = [r for r in searcher.catalog.image_rows(range(1, 400)).values() if r.caption and r.modality_type]
    model = QueryModel.train([r.caption for r in rows], {"modality_type": [r.modality_type for r in rows],
                                                         "body_region": [r.body_region for r in rows]})
    # fits its training captions far above the majority class
    acc = sum(model.predict(r.caption).get("modality_type", ("", 0))[0] == r.modality_type.lower() for r in rows) / len(rows)
    majority = max(sum(r.modality_type == m for r in rows) for m in {r.modality_type for r in rows}) / len(rows)
    assert acc > max(0.9, majority)
    # a query the rules say nothing about: the model may speak, marked as such, with its probability
    quiet = next(r.caption for r in rows if not understand(r.caption, vocab).get("modality_type")
                 and model.predict(r.caption)["modality_type"][1] >= 0.5)
    u = understand(quiet, vocab, model, min_confidence=0.5)
    c = u.get("modality_type")
    assert c is not None and c.source == "model" and c.span is None and 0.5 <= c.confidence < 1.0
    # the rules win where they speak: "CT" stays a rule even if the model would say otherwise
    u = understand("CT " + quiet, vocab, model, min_confidence=0.0)
    assert u.get("modality_type").source == "rule"
    assert understand("", vocab, model).empty


def test_boost_reranks_never_filters(searcher):
    q = "axial CT of the abdomen"
    u = searcher.understand(q)
    assert {c.field for c in u.constraints} >= {"modality_type", "plane", "body_region"}
    plain = searcher.search_text(q, k=200, per_case=False, understand=False)
    boosted = searcher.search_text(q, k=200, per_case=False)
    assert {h.image_id for h in plain} == {h.image_id for h in boosted}  # same images: a soft constraint

    rows = searcher.catalog.image_rows([h.image_id for h in plain])

    def share(hits):
        top = hits[:10]
        return sum(sum(bool(matches(c, rows[h.image_id])) for c in u.constraints) for h in top) / len(top)

    assert share(boosted) > share(plain)
    # full matches come before images that match nothing
    order = [sum(bool(matches(c, rows[h.image_id])) for c in u.constraints) for h in boosted]
    assert order[0] == max(order)


def test_boost_is_a_bounded_prior(searcher):
    u = searcher.understand("CT")
    rows = searcher.catalog.image_rows(range(1, 50))
    ordered = [(i, 1.0 / (10 + r)) for r, i in enumerate(sorted(rows), 1)]
    out = dict(boost(ordered, rows, u, rrf_k=10, weight=1.0))
    for i, s in ordered:
        assert out[i] - s == pytest.approx(1 / 11 if matches(u.constraints[0], rows[i]) else 0.0)
    assert boost(ordered, rows, u, rrf_k=10, weight=0.0) == ordered


def test_hard_filters_still_come_from_the_user_only(searcher):
    hits = searcher.search_text("MRI of the brain", k=20, per_case=False, filters=Filters(modality="CT"))
    assert hits and all(h.modality_type == "CT" for h in hits)


def test_cli_shows_what_was_understood_and_can_turn_it_off(indexed_home):
    from cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["search", "axial CT of the liver", "--home", str(indexed_home), "-k", "3"])
    assert r.exit_code == 0, r.output
    assert "understood: CT, axial, abdomen" in r.output
    r = runner.invoke(app, ["search", "axial CT of the liver", "--home", str(indexed_home), "-k", "3", "--no-understand"])
    assert r.exit_code == 0, r.output
    assert "understood" not in r.output


def test_api_understood_object_and_switch(indexed_home, towers, tmp_path):
    from api.app import create_app
    from api.settings import ApiSettings

    settings = ApiSettings(home=indexed_home, device="cpu", watch_seconds=0, rate_per_minute=0,
                           keys_file=tmp_path / "keys.json", audit_log=tmp_path / "audit.log")  # fmt: skip
    with TestClient(create_app(settings, encoder=towers)) as c:
        r = c.post("/v1/search/text", json={"query": "coronal MRI of the knee", "k": 3})
        assert r.status_code == 200, r.text
        u = r.json()["understood"]
        assert u["enabled"] and u["summary"] == "MR, coronal, musculoskeletal"
        assert {x["field"] for x in u["constraints"]} == {"modality_type", "plane", "body_region"}
        r = c.post("/v1/search/text", json={"query": "coronal MRI of the knee", "k": 3, "understand": False})
        assert r.status_code == 200 and r.json()["understood"] is None

