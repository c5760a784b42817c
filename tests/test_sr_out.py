"""Drafts back to the PACS: a Basic Text SR that references the query study, sent over STOW-RS to Orthanc."""

from __future__ import annotations

import json
import urllib.request

import pydicom
import pytest
from pacs_data import ct_series, write_series
from pydicom.uid import generate_uid


@pytest.fixture(scope="module")
def query_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    return write_series(ct_series(3, study_uid=generate_uid(), series_uid=generate_uid()), folder)


def _draft(indexed_home, path):
    from medsearch.rag import Drafter
    from medsearch.search import Searcher

    return Drafter(Searcher(indexed_home, device="cpu")).draft(path)


def _texts(item, out):
    for it in item.get("ContentSequence", []):
        if it.ValueType == "TEXT":
            out.append((it.ConceptNameCodeSequence[0].CodeMeaning, it.TextValue))
        _texts(it, out)
    return out


def test_draft_as_basic_text_sr_references_the_query_study(indexed_home, query_study, tmp_path):
    from medsearch.rag.sr import BASIC_TEXT_SR, draft_to_sr, write_sr

    draft = _draft(indexed_home, query_study[1])
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in query_study]
    sr = draft_to_sr(draft, headers)
    out = tmp_path / "draft.dcm"
    write_sr(sr, str(out))
    back = pydicom.dcmread(out)
    assert back.SOPClassUID == BASIC_TEXT_SR and back.Modality == "SR"
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "PARTIAL"
    assert back.StudyInstanceUID == headers[0].StudyInstanceUID and back.PatientID == headers[0].PatientID
    assert back.SeriesInstanceUID != headers[0].SeriesInstanceUID
    ref = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert ref.StudyInstanceUID == headers[0].StudyInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedSeriesSequence[0].ReferencedSOPSequence} == {
        h.SOPInstanceUID for h in headers}
    texts = _texts(back, [])
    findings = [t for m, t in texts if m == "Finding"]
    assert findings and len(findings) == len(draft.section("findings"))
    for s, t in zip(draft.section("findings"), findings, strict=True):
        assert t.startswith(s.text) and all(f"C{c.n}" in t for c in s.citations)
    cites = [t for m, t in texts if m == "Cited prior case"]
    assert len(cites) == len({c.n for s in draft.sentences for c in s.citations})
    assert any("UNVERIFIED" in t for m, t in texts if m == "Comment")


def test_no_study_uid_is_a_clear_error(indexed_home, query_study):
    from medsearch.errors import InvalidInput
    from medsearch.rag.sr import draft_to_sr

    draft = _draft(indexed_home, query_study[0])
    with pytest.raises(InvalidInput, match="no query DICOM file"):
        draft_to_sr(draft, [])
    other = pydicom.dcmread(query_study[0], stop_before_pixels=True)
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(InvalidInput, match="single StudyInstanceUID"):
        draft_to_sr(draft, [pydicom.dcmread(query_study[1], stop_before_pixels=True), other])


@pytest.mark.pacs
@pytest.mark.slow
def test_stow_sends_the_sr_into_the_query_study(indexed_home, query_study, tmp_path):
    from orthanc import OrthancServer

    from indexer.sources.dicomweb import stow
    from medsearch.rag.sr import draft_to_sr

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in query_study]
    sr = draft_to_sr(_draft(indexed_home, query_study[0]), headers)
    with OrthancServer(tmp_path / "orthanc") as o:
        for p in query_study:
            o.upload(p.read_bytes())
        assert stow(f"dicomweb+{o.dicomweb}", [sr]) == 1
        uid = headers[0].StudyInstanceUID
        with urllib.request.urlopen(f"{o.dicomweb}/studies/{uid}/series?Modality=SR") as r:
            series = json.loads(r.read())
        assert len(series) == 1 and series[0]["0020000E"]["Value"][0] == sr.SeriesInstanceUID
