"""medsearch.deid: header whitelist, pseudonyms, dates and the report-text scrubber."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword

from medsearch.deid import (
    IDENTIFYING_TAGS,
    PHI_TAGS,
    assert_no_phi,
    deid_method,
    patient_date_shift,
    pseudonym,
    safe_metadata,
    scrub_text,
)
from medsearch.errors import InvalidInput

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SALT = "test-salt-1"
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm",
           "SC_rgb_rle.dcm", "examples_palette.dcm", "dicomdirtests/77654033/CR1/6154",
           "dicomdirtests/98892001/CT2N/6293", "dicomdirtests/98892003/MR1/4919"]  # fmt: skip


def sample(name: str) -> str:
    """A DICOM file that ships inside the pydicom wheel (never downloaded)."""
    base = get_testdata_file("CT_small.dcm", download=False)
    assert base is not None
    path = Path(base).parent / name
    assert path.is_file(), f"pydicom sample {name} is not bundled"
    return str(path)


def header(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(sample(name), stop_before_pixels=True)


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("dates", ["remove", "year", "shift"])
def test_safe_metadata_has_no_phi(name, dates):
    ds = header(name)
    meta = safe_metadata(ds, SALT, dates=dates)
    assert_no_phi(meta, ds)
    text = json.dumps(meta)
    # (InstitutionName is checked by assert_no_phi as a whole token: MR_small's is "TOSHIBA", its maker "TOSHIBA_MEC")
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
               "ReferringPhysicianName", "AccessionNumber", "PatientBirthDate"):  # fmt: skip
        value = str(ds.get(kw) or "").strip()
        if len(value) >= 3:
            assert value not in text, kw
    for part in str(ds.get("PatientName") or "").split("^"):
        if len(part) >= 3:
            assert part not in text


def test_whitelisted_fields_and_keys():
    ds = header("CT_small.dcm")
    meta = safe_metadata(ds, SALT)
    assert meta["modality"] == "CT" and meta["rows"] == 128 and meta["columns"] == 128 and meta["frames"] == 1
    assert meta["sop_class"] == "CT Image Storage" and meta["photometric"] == "MONOCHROME2"
    assert meta["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    for key in ("study_key", "series_key", "instance_key", "patient_key"):
        assert len(meta[key]) == 32 and int(meta[key], 16) >= 0
    assert not {"study_year", "study_date_shifted"} & meta.keys()  # dates removed by default
    cr = safe_metadata(header("dicomdirtests/77654033/CR1/6154"), SALT)
    assert (cr["body_part"], cr["view"]) == ("CSPINE", "LL")


def test_free_text_and_descriptions_are_never_copied():
    ds = header("CT_small.dcm")
    ds.SeriesDescription = "Series of Mr Secretname"
    ds.StudyDescription = "Secretname follow-up"
    ds.InstitutionName = "Secret General Hospital"
    ds.BodyPartExamined = "Secretname's chest"  # not a code string: dropped, not copied
    ds.OperatorsName = "Operator^Secret"
    meta = safe_metadata(ds, SALT)
    assert "Secret" not in json.dumps(meta)
    assert "body_part" not in meta
    assert_no_phi(meta, ds)


def test_pseudonyms_are_stable_per_salt():
    ds = header("MR_small.dcm")
    a, b = safe_metadata(ds, SALT), safe_metadata(header("MR_small.dcm"), SALT)
    other = safe_metadata(ds, "another-salt")
    for key in ("study_key", "series_key", "instance_key", "patient_key"):
        assert a[key] == b[key]
        assert a[key] != other[key]
    assert a["study_key"] == pseudonym(str(ds.StudyInstanceUID), SALT, "StudyInstanceUID")
    # the kind is part of the key: the same string as a PatientID and as a UID gives different keys
    assert pseudonym("12345", SALT, "PatientID") != pseudonym("12345", SALT, "StudyInstanceUID")


def test_empty_salt_and_bad_date_mode_are_refused():
    ds = header("CT_small.dcm")
    with pytest.raises(InvalidInput, match="salt") as err:
        safe_metadata(ds, "")
    assert err.value.hint
    with pytest.raises(InvalidInput, match="remove, year, shift"):
        safe_metadata(ds, SALT, dates="keep")
    with pytest.raises(InvalidInput):
        deid_method("keep")


def test_dates_year_and_per_patient_shift():
    ct = header("dicomdirtests/98892001/CT2N/6293")  # Doe^Peter, 2001-01-01
    mr = header("dicomdirtests/98892003/MR1/4919")  # Doe^Peter, 2003-05-05, another study
    assert ct.PatientID == mr.PatientID
    assert safe_metadata(ct, SALT, dates="year")["study_year"] == 2001
    shifted_ct = dt.date.fromisoformat(safe_metadata(ct, SALT, dates="shift")["study_date_shifted"])
    shifted_mr = dt.date.fromisoformat(safe_metadata(mr, SALT, dates="shift")["study_date_shifted"])
    assert shifted_ct != dt.date(2001, 1, 1)
    assert shifted_mr - shifted_ct == dt.date(2003, 5, 5) - dt.date(2001, 1, 1)  # intervals survive
    shift = patient_date_shift(str(ct.PatientID), SALT)
    assert -365 <= shift <= -1 and shifted_ct == dt.date(2001, 1, 1) + dt.timedelta(days=shift)
    assert patient_date_shift(str(ct.PatientID), SALT) == shift
    fixed = safe_metadata(ct, SALT, dates="shift", date_shift_days=-10)
    assert fixed["study_date_shifted"] == "2000-12-22"
    old = header("ExplVR_BigEnd.dcm")  # old-style "1997.04.24" date
    assert safe_metadata(old, SALT, dates="year")["study_year"] == 1997
    assert "study_date_shifted" not in safe_metadata(old, SALT, dates="shift")  # no PatientID: no shift


def test_deid_method_describes_the_mode():
    assert "PS3.15" in deid_method() and "removed" in deid_method()
    assert "year" in deid_method("year") and "shifted" in deid_method("shift")


def test_assert_no_phi_catches_keys_and_values():
    ds = header("CT_small.dcm")
    with pytest.raises(AssertionError, match="PatientName"):
        assert_no_phi({"modality": "CT", "PatientName": "x"})
    with pytest.raises(AssertionError, match="study_date"):
        assert_no_phi({"nested": {"study_date": "20040119"}})
    with pytest.raises(AssertionError, match="PatientID"):
        assert_no_phi({"note": f"id {ds.PatientID}"}, ds)
    with pytest.raises(AssertionError, match="PatientName"):
        assert_no_phi({"note": "CompressedSamples"}, ds)  # one component of the name is enough
    assert_no_phi({"study_year": 2004, "modality": "CT"}, ds)


def test_phi_tags_are_real_keywords():
    assert all(tag_for_keyword(k) is not None for k in PHI_TAGS)
    assert set(IDENTIFYING_TAGS) <= set(PHI_TAGS)
    for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "AccessionNumber",
              "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "OtherPatientIDs",
              "StudyID", "OperatorsName", "PerformingPhysicianName"):  # fmt: skip
        assert k in PHI_TAGS


# ---------------------------------------------------------------------------- report text
REPORT = (
    "Seen by Dr. John Smith on 03/14/2023 and again on Jan 5, 2024. MRN: 12345678. "
    "Call (555) 123-4567 or write to jane.doe@hospital.org. Name: Mary Jane Watson, a 92-year-old woman. "
    "Accession # A123456. SSN 123-45-6789. Mrs. O'Neil reviewed it on 2023-11-02 (ref 98765432). "
    "Phone +44 20 7946 0958. Follow-up 15 March 2021.\n"
    "Findings: 3.5 cm mass at C5-6, T2 hyperintense, BP 120/80, stable since 2019. MS plaques. 45-year-old."
)


def test_scrub_text_removes_synthetic_phi():
    out = scrub_text(REPORT)
    for phi in ("John", "Smith", "03/14/2023", "Jan 5, 2024", "12345678", "555", "jane.doe", "Mary", "Watson",
                "92", "A123456", "123-45-6789", "O'Neil", "2023-11-02", "98765432", "7946", "15 March 2021"):  # fmt: skip
        assert phi not in out, phi
    for token in ("[NAME]", "[DATE]", "[ID]", "[PHONE]", "[EMAIL]", "[AGE 90+]"):
        assert token in out
    assert "Dr. [NAME]" in out and "MRN: [ID]" in out
    # clinical content survives
    for keep in ("3.5 cm", "C5-6", "T2 hyperintense", "120/80", "2019", "MS plaques", "45-year-old", "Findings:"):
        assert keep in out, keep


def test_scrub_text_known_names_and_plain_text():
    out = scrub_text("Patient WATSON seen; watson agreed.", known_names=["Watson^Mary"])
    assert "atson" not in out.lower() and out.count("[NAME]") == 2
    clean = "No acute intracranial abnormality. Mild mucosal thickening in the maxillary sinuses."
    assert scrub_text(clean) == clean
