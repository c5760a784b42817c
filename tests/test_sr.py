"""indexer.sources.sr: Basic, Enhanced and Comprehensive SR documents (written here with highdicom and
pydicom, and pydicom's own bundled SR files) become report sections; identifiers do not survive scrubbing."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import sr_fixtures as F
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from indexer.sources.sr import TEXT_SR_CLASSES, heading_slug, is_sr, section_key, sr_report
from medsearch.errors import InvalidInput

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STUDY = "1.2.826.0.1.3680043.8.498.10001"
PRIOR = "1.2.826.0.1.3680043.8.498.10002"
BUILDERS = {"basic": F.basic_text_sr, "enhanced": F.enhanced_sr, "comprehensive": F.comprehensive_sr}


def _pydicom_file(name: str) -> Path:
    base = get_testdata_file("CT_small.dcm", download=False)
    assert base is not None
    return Path(base).parent / name


@pytest.fixture(params=list(BUILDERS))
def sr_file(request, tmp_path):
    """(kind, path) of an SR document of each kind, written to disk and read back by the tests."""
    ds = BUILDERS[request.param](STUDY)
    return request.param, F.save(ds, tmp_path / f"{request.param}.dcm")


def test_every_kind_gives_its_sections(sr_file):
    kind, path = sr_file
    ds = pydicom.dcmread(path)
    assert is_sr(ds)
    rep = sr_report(ds)
    assert rep.study_uid == STUDY and STUDY in rep.referenced_study_uids
    assert (
        rep.sop_class
        == {"basic": "Basic Text SR", "enhanced": "Enhanced SR", "comprehensive": "Comprehensive SR"}[kind]
    )
    assert rep.title == "Diagnostic imaging report"
    s = rep.sections
    assert F.FINDING in s["findings"] and F.LUNG_FINDING in s["findings"]
    assert s["impression"] == F.IMPRESSION  # kept verbatim, line break included
    if kind == "basic":  # LOINC headings; the Impression TEXT item inside the Findings container has its own section
        assert list(s) == ["indication", "findings", "impression", "comment"]
        assert s["indication"] == F.HISTORY
        assert s["findings"] == f"{F.FINDING}\n{F.LUNG_FINDING}"  # CR LF -> LF
        assert (rep.complete, rep.verified) == (False, False)
    else:
        assert list(s) == ["history", "findings", "comparison", "impression", "quality_note"]
        assert s["history"] == F.HISTORY
        assert s["comparison"] == F.COMPARISON  # a known heading nested in Findings starts its own section
        assert s["quality_note"] == F.NOTE  # a private heading -> its own name; "Comment" is a generic item name
        assert f"Lung: {F.LUNG_FINDING}" in s["findings"]  # an unknown subheading prefixes its text
        assert (rep.complete, rep.verified) == (True, True)
    if kind == "comprehensive":
        assert s["findings"].endswith("Emphysema in both apices. Diameter: 35.0 mm; Mass")  # NUM and CODE items


def test_context_items_never_reach_the_sections(sr_file):
    """Observer names (PNAME, HAS OBS CONTEXT), dates, language codes and header attributes stay out."""
    kind, path = sr_file
    rep = sr_report(pydicom.dcmread(path))
    text = json.dumps(rep.sections)
    for raw in ("PID7734521", "19400101", "Secretpriv", "Evergreen Terrace, ", "English", "20240105", "ST88123"):
        assert raw not in text, raw
    if kind != "basic":  # the basic SR's signature line names the observer in its text (scrubbed below)
        assert "Lindqvist" not in text
    # the header's identifiers are known to the report (for the scrubber) but never shown
    assert F.PATIENT_NAME in rep.names and F.PLANTED["referring"] in rep.names and F.PLANTED["observer"] in rep.names
    assert F.PATIENT_ID in rep.ids and F.ACCESSION in rep.ids
    for raw in ("Smithers", F.PATIENT_ID, STUDY, "Dr."):  # a repr in a log shows no text, names or UIDs
        assert raw not in repr(rep), raw
    assert "findings: " in repr(rep)


def test_scrubbed_sections_carry_no_planted_identifier(sr_file):
    _, path = sr_file
    rep = sr_report(pydicom.dcmread(path))
    sections, n = rep.scrubbed()
    assert set(sections) == set(rep.sections)
    text = json.dumps(sections)
    for raw in F.PLANTED_WORDS:
        assert raw not in text, raw
    for keep in F.CLINICAL:
        if keep in json.dumps(rep.sections):
            assert keep in text, keep
    assert n >= 9 and text.count("[NAME]") >= 3 and "[DATE]" in text and "[PHONE]" in text and "[ID]" in text
    assert "Dr. [NAME]" in text and "MRN [ID]" in text


def test_sr_referencing_another_study(tmp_path):
    """The SR's own study and the studies of its evidence are both listed (the caller reports a missing one)."""
    rep = sr_report(pydicom.dcmread(F.save(F.enhanced_sr(STUDY, other_study_uids=(PRIOR,)), tmp_path / "sr.dcm")))
    assert rep.study_uid == STUDY and rep.referenced_study_uids == (STUDY, PRIOR)
    basic = F.basic_text_sr(STUDY)
    basic.ReferencedRequestSequence[0].StudyInstanceUID = PRIOR
    assert sr_report(basic).referenced_study_uids == (PRIOR,)


@pytest.mark.parametrize("name", ["reportsi.dcm", "test-SR.dcm"])
def test_pydicom_bundled_sr_files(name):
    """Real SR files from other toolkits (DCMTK-made samples in the pydicom wheel)."""
    ds = pydicom.dcmread(_pydicom_file(name))
    assert is_sr(ds)
    rep = sr_report(ds)
    assert rep.study_uid and rep.study_uid == str(ds.StudyInstanceUID)
    if name == "reportsi.dcm":  # Basic Text SR: one "Section Heading" container holding one TEXT item
        assert rep.sections == {"section_heading": "Enter text"} and rep.sop_class == "Basic Text SR"
        assert "Last Name^First Name" in rep.names
    else:  # Comprehensive SR: an unnamed container, NUM items, a TEXT item with an inferred-from child,
        assert rep.sop_class == "Comprehensive SR"  # CR / CR LF / LF line ends, a by-reference item
        assert rep.sections["other"].startswith("Text Code: A mass of\nDiameter: 3 cm\nText Code: was detected.")
        assert rep.sections["code"] == 'Sample Text\nA\nB\nC\nCode: Inferred Sample Text\nNew line.\n&%$§"!()<>{}/;'


def test_is_sr():
    assert not is_sr(pydicom.dcmread(_pydicom_file("CT_small.dcm"), stop_before_pixels=True))
    ds = Dataset()
    ds.Modality = "SR"
    assert is_sr(ds)  # no SOP class, modality SR
    for uid in TEXT_SR_CLASSES:
        ds = Dataset()
        ds.SOPClassUID = uid
        assert is_sr(ds)
    ko = Dataset()
    ko.SOPClassUID, ko.Modality = "1.2.840.10008.5.1.4.1.1.88.59", "KO"  # key object selection: not a report
    assert not is_sr(ko)


def test_section_key_and_slug():
    assert section_key("Findings", "DCM", "121070") == "findings"
    assert section_key("whatever", "DCM", "121072") == "impression"  # the code decides first
    assert section_key("Radiology Comparison study (narrative)", "LN", "18834-2") == "comparison"
    assert section_key("History", "DCM", "121060") == "history"
    assert section_key("Indications for Procedure", "DCM", "121109") == "indication"
    assert section_key("CLINICAL HISTORY") == "history" and section_key("Reason for study") == "indication"
    assert section_key("Conclusions") == "impression" and section_key("Prior findings") == "comparison"
    assert section_key("Technique") == "technique" and section_key("Recommendations") == "recommendation"
    assert section_key("Befund") == "findings" and section_key("Beurteilung") == "impression"
    assert section_key("Conclusión") == "impression" and section_key("Fragestellung") == "indication"
    assert section_key("Lung") is None and section_key("") is None and section_key(None) is None
    assert heading_slug("Addendum #2 (late)") == "addendum_2_late" and heading_slug("") == "other"
    assert heading_slug("12") == "other" and heading_slug("Ärztlicher Bericht") == "arztlicher_bericht"
    assert len(heading_slug("x" * 100)) == 32


def test_headings_without_names_and_unknown_top_level_text():
    text = F._item("TEXT", "CONTAINS", ("T1", "99X", "Scanner note"), TextValue="Motion artefact.")
    bare = F._item(
        "CONTAINER", "CONTAINS", None, ContentSequence=[F._item("TEXT", "CONTAINS", None, TextValue="Loose text.")]
    )
    rep = sr_report(F.basic_text_sr(STUDY, content=[text, bare]))
    assert rep.sections == {"scanner_note": "Motion artefact.", "other": "Loose text."}
    assert sr_report(F.basic_text_sr(STUDY, content=[])).sections == {}  # an empty report is not an error


def test_non_latin_text_and_measurement_srs(tmp_path):
    """UTF-8 text (ISO_IR 192) survives a file round trip; a dose SR is an SR but holds no report."""
    text = F._item(
        "TEXT", "CONTAINS", ("121073", "DCM", "Impression"), TextValue="Kein Erguss; Ödem – Grad 2. 肺野清明。"
    )
    rep = sr_report(pydicom.dcmread(F.save(F.basic_text_sr(STUDY, content=[text]), tmp_path / "de.dcm")))
    assert rep.sections == {"impression": "Kein Erguss; Ödem – Grad 2. 肺野清明。"}
    dose = F.basic_text_sr(STUDY)
    dose.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    assert is_sr(dose)
    rep = sr_report(dose)
    assert rep.sections == {} and rep.sop_class == "X-Ray Radiation Dose SR" and rep.study_uid == STUDY
    big = F._item("TEXT", "CONTAINS", ("121071", "DCM", "Finding"), TextValue="x" * 1_000_001)
    with pytest.raises(InvalidInput, match="more than 2000000 characters"):
        sr_report(F.basic_text_sr(STUDY, content=[big, big]), name="big.dcm")


def _malformed(ds: Dataset, tmp_path: Path, match: str) -> None:
    path = F.save(ds, tmp_path / "broken-report.dcm")
    with pytest.raises(InvalidInput, match=match) as err:
        sr_report(pydicom.dcmread(path))
    assert "broken-report.dcm" in err.value.message and err.value.hint


def test_malformed_srs_raise_a_typed_error_naming_the_file(tmp_path):
    ds = F.basic_text_sr(STUDY)
    ds.ValueType = "TEXT"
    _malformed(ds, tmp_path, "root content item has value type TEXT")
    ds = F.basic_text_sr(STUDY)
    del ds.ContentSequence[1].ValueType
    _malformed(ds, tmp_path, "content item 2 at depth 1 has no ValueType")
    ds = F.basic_text_sr(STUDY)
    del ds.ContentSequence[2].ContentSequence[0].TextValue
    _malformed(ds, tmp_path, "TEXT item 1 at depth 2 has no TextValue")
    deep = F._item("TEXT", "CONTAINS", ("121071", "DCM", "Finding"), TextValue="x")
    for _ in range(70):
        deep = F._item("CONTAINER", "CONTAINS", ("121070", "DCM", "Findings"), ContentSequence=[deep])
    _malformed(F.basic_text_sr(STUDY, content=[deep]), tmp_path, "nested deeper than 64")
    ct = pydicom.dcmread(_pydicom_file("CT_small.dcm"))
    with pytest.raises(InvalidInput, match="CT_small.dcm is not a text SR"):
        sr_report(ct)
    with pytest.raises(InvalidInput, match="^upload 3 is not a text SR"):
        sr_report(ct, name="upload 3")
