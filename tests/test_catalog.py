"""Catalog: schema, idempotent upserts, changed content, vectors round trip, filters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsearch.catalog import SCHEMA_VERSION, Catalog
from medsearch.errors import CatalogError, NotFound
from medsearch.records import CaseRecord, ImageRecord


def _case(key="C1", findings="A mass in the left lung.", **kw):
    return CaseRecord(source="s", key=key, split="dev", title="t", diagnosis="dx", sections={"findings": findings}, **kw)


def _img(key="I1", case_key="C1", **kw):
    base = dict(source="s", key=key, case_key=case_key, path="/x.png", modality_type="CT", body_region="Thorax", split="dev")
    base.update(kw)
    return ImageRecord(**base)


def test_schema_versioned_and_salted(tmp_path):
    cat = Catalog.open(tmp_path / "c.db")
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert len(cat.salt) == 32
    salt = cat.salt
    cat.close()
    assert Catalog.open(tmp_path / "c.db").salt == salt


def test_newer_schema_refused(tmp_path):
    cat = Catalog.open(tmp_path / "c.db")
    cat.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    cat.db.conn.commit()
    cat.close()
    with pytest.raises(CatalogError, match="newer"):
        Catalog.open(tmp_path / "c.db")


def test_missing_catalog_not_created_when_asked(tmp_path):
    with pytest.raises(NotFound, match="medsearch ingest"):
        Catalog.open(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


def test_upsert_is_idempotent_and_updates_on_change():
    cat = Catalog.open(None)
    cid, st1 = cat.upsert_case(_case(), sentences=[("findings", 0, "A mass in the left lung.")])
    assert st1 == "added"
    assert cat.upsert_case(_case())[1] == "unchanged"
    iid, s = cat.upsert_image(_img(caption="cap"), cid, sha256="a", nbytes=1, width=2, height=2)
    assert s == "added"
    assert cat.upsert_image(_img(caption="cap"), cid, sha256="a", nbytes=1, width=2, height=2) == (iid, "unchanged")
    cat.put_vectors("m", "image", [iid], np.ones((1, 4), np.float32))
    # Same key, new pixels: the row is updated in place and its stale vector dropped.
    assert cat.upsert_image(_img(caption="cap"), cid, sha256="b", nbytes=1, width=2, height=2) == (iid, "updated")
    assert cat.count_vectors("m", "image") == 0
    texts_before = cat.counts()["texts"]
    new = _case(findings="Changed text. Two sentences.")
    assert cat.upsert_case(new, sentences=[("findings", 0, "Changed text.")])[1] == "updated"
    assert cat.counts()["cases"] == 1 and cat.counts()["images"] == 1
    assert cat.counts()["texts"] == texts_before  # section + sentence replaced, caption kept
    assert "Changed text. Two sentences." in cat.get_case(cid).sections["findings"]


def test_vectors_roundtrip_float16_and_stream_order():
    cat = Catalog.open(None)
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, 8)).astype(np.float32)
    ids = list(range(1000, 1300))
    cat.put_vectors("m", "text", ids, v)
    got_ids, got = zip(*cat.iter_vectors("m", "text", block=64), strict=True)
    all_ids = np.concatenate(got_ids)
    assert all_ids.tolist() == ids
    np.testing.assert_allclose(np.concatenate(got), v, atol=2e-3)
    assert cat.count_vectors("m", "text") == 300


def test_filters_case_insensitive():
    cat = Catalog.open(None)
    cid, _ = cat.upsert_case(_case())
    a, _ = cat.upsert_image(_img("A"), cid, sha256="1", nbytes=1, width=1, height=1)
    b, _ = cat.upsert_image(_img("B", modality_type="MR", body_region="Head"), cid, sha256="2", nbytes=1, width=1, height=1)
    assert cat.image_ids_where({"modality": "ct"}).tolist() == [a]
    assert cat.image_ids_where({"modality": ["CT", "mr"], "body_region": "head"}).tolist() == [b]
    assert cat.image_ids_where({}) is None
    with pytest.raises(ValueError, match="unknown filter"):
        cat.image_ids_where({"colour": "red"})


@settings(max_examples=40, deadline=None)
@given(
    key=st.text(min_size=1, max_size=30),
    sections=st.dictionaries(st.sampled_from(["findings", "history", "impression", "other"]), st.text(max_size=200)),
    labels=st.dictionaries(st.text(min_size=1, max_size=10), st.one_of(st.text(max_size=10), st.lists(st.text(max_size=5), max_size=3))),
)
def test_case_roundtrip_property(key, sections, labels):
    cat = Catalog.open(None)
    rec = CaseRecord(source="src", key=key, sections=sections, labels=labels)
    cid, status = cat.upsert_case(rec)
    assert status == "added"
    view = cat.get_case(cid)
    assert view.case_key == key and view.sections == sections and view.labels == labels
    assert cat.upsert_case(rec) == (cid, "unchanged")


def test_named_queries_return_typed_frozen_rows():
    import dataclasses

    from medsearch.catalog import CaseRow, ImageRow, TextRow

    cat = Catalog.open(None)
    cid, _ = cat.upsert_case(_case(patient_key="p-1", category="Neoplasm"), sentences=[("findings", 0, "A mass.")])
    iid, _ = cat.upsert_image(_img(caption=" A caption. ", frame=2, plane="Axial"), cid, sha256="ab", nbytes=9,
                              width=5, height=7)  # fmt: skip
    row = cat.image_rows([iid, 999])[iid]
    assert isinstance(row, ImageRow) and set(cat.image_rows([iid, 999])) == {iid}
    assert (row.image_id, row.image_key, row.case_id, row.case_key, row.source, row.path, row.frame, row.sha256) == (
        iid, "I1", cid, "C1", "s", "/x.png", 2, "ab",
    )  # fmt: skip
    assert (row.width, row.height, row.split, row.modality_type, row.plane, row.body_region) == (5, 7, "dev", "CT", "Axial", "Thorax")
    assert (row.caption, row.patient_key, row.title, row.diagnosis, row.category) == (" A caption. ", "p-1", "t", "dx", "Neoplasm")
    assert row.sections == {"findings": "A mass in the left lung."}
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.case_id = 3  # type: ignore[misc]
    # the same row by id, key, source:key and content hash; None / NotFound when nothing matches
    assert cat.find_image(iid) == cat.find_image(str(iid)) == cat.find_image("I1") == cat.find_image("s:I1") == row
    assert cat.image_by_sha("ab") == row and cat.image_by_sha("zz") is None and cat.image_by_ref("nope") is None
    with pytest.raises(NotFound, match="no image 'nope'"):
        cat.find_image("nope")
    case = cat.case_rows([cid])[cid]
    assert isinstance(case, CaseRow) and (case.case_key, case.patient_key, case.category) == ("C1", "p-1", "Neoplasm")
    assert cat.cases_where(split="dev", source="s") == [case] and cat.cases_where(split="train") == []
    texts = cat.text_rows(range(1, 10))
    assert all(isinstance(t, TextRow) for t in texts.values())
    assert sorted((t.kind, t.section, t.image_id, t.text) for t in texts.values()) == [
        ("caption", "caption", iid, "A caption."), ("section", "findings", None, "A mass in the left lung."),
        ("sentence", "findings", None, "A mass."),
    ]  # fmt: skip
    (sent,) = cat.case_texts([cid])[cid]
    assert (sent.kind, sent.seq, sent.text) == ("sentence", 0, "A mass.")
    cap = next(t for t in texts.values() if t.kind == "caption")
    assert cat.caption_ids([iid]) == {iid: cap.text_id}
    assert cat.texts_of_kinds(["caption"]) == ([cap.text_id], ["A caption."])


def test_dirty_marker_and_vector_bookkeeping():
    cat = Catalog.open(None)
    cid, _ = cat.upsert_case(_case(), sentences=[("findings", 0, "A mass.")])
    a, _ = cat.upsert_image(_img("A"), cid, sha256="1", nbytes=1, width=1, height=1)
    b, _ = cat.upsert_image(_img("B"), cid, sha256="2", nbytes=1, width=1, height=1)
    assert not cat.is_dirty("m", "image")
    assert cat.count_unembedded("m", "image") == 2 and cat.count_unembedded(None, "image") == 2
    cat.put_vectors("m", "image", [a], np.ones((1, 4), np.float32))
    assert cat.is_dirty("m", "image") and not cat.is_dirty("m", "text") and not cat.is_dirty("other", "image")
    cat.mark_clean("m", "image")
    assert not cat.is_dirty("m", "image")
    cat.mark_dirty("m", "image")
    assert cat.is_dirty("m", "image")
    assert cat.count_unembedded("m", "image") == 1 and cat.count_unembedded("x", "image") == 2
    assert cat.count_unembedded(None, "image") == 1 and cat.count_unembedded("m", "text") == cat.count_texts()
    assert cat.vector_dim("m", "image") == 4 and cat.vector_dim("m", "text") is None
    # vectors of rows that are gone are orphans: counted, then dropped in one transaction
    cat.put_vectors("m", "image", [b, 777], np.zeros((2, 4), np.float32))
    assert sorted(cat.vector_ids("m", "image").tolist()) == [a, b, 777]
    assert cat.count_orphan_vectors("m", "image") == 1 and cat.count_orphan_vectors("m", "text") == 0
    assert cat.drop_orphan_vectors("m", "image") == 1 and cat.count_orphan_vectors("m", "image") == 0
    assert cat.count_vectors("m", "image") == 2
    with pytest.raises(ValueError, match="unknown vector space"):
        cat.count_orphan_vectors("m", "audio")
    cat.drop_model_vectors("m")
    assert cat.vector_models() == []
    cat.mark_image_failed(a, "broken")
    assert cat.count_unembedded("m", "image") == 1
    cat.retry_failed_images()
    assert cat.count_unembedded("m", "image") == 2
