"""Builders of DICOM Structured Reports and RIS exports for tests (nothing here is a test itself).

``enhanced_sr`` / ``comprehensive_sr`` are written with highdicom, ``basic_text_sr`` with pydicom
(older reporting systems write Basic Text SR with LOINC headings and TEXT items at the root).
Every object carries the identifiers in ``PLANTED`` in its patient, physician, institution,
description, comment, private and nested-sequence attributes and in its report text, so tests
can assert that none of them comes out.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    NumContentItem,
    PnameContentItem,
    TextContentItem,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# Identifiers planted in headers and text. No test output may contain any of them.
PATIENT_NAME = "Smithers^Jonathan^Q"
PATIENT_ID = "PID7734521"
ACCESSION = "ACC20230042"
PLANTED = {
    "patient_name": PATIENT_NAME,
    "patient_id": PATIENT_ID,
    "accession": ACCESSION,
    "birth_date": "19400101",
    "referring": "Okonkwo^Adaeze",
    "observer": "Lindqvist^Petra",
    "institution": "Springfield General Hospital",
    "address": "742 Evergreen Terrace",
    "description": "CT chest for Jonathan Smithers",
    "private": "Secretpriv^Value",
}
# Substrings of the planted identifiers that must not survive (names by component).
PLANTED_WORDS = ("Smithers", "Jonathan", "PID7734521", "ACC20230042", "19400101", "Okonkwo", "Adaeze",
                 "Lindqvist", "Petra", "Springfield General", "Evergreen", "Secretpriv", "12345678",
                 "555", "4567", "6543", "03/14/2023", "2024-01-05", "March 3", "Garcia")  # fmt: skip

# Report text as the reporting system wrote it: clinical content plus planted identifiers.
HISTORY = "Cough for 3 weeks. Referred by Dr. Adaeze Okonkwo, MRN 12345678, phone (555) 123-4567."
FINDING = "3.5 cm spiculated mass in the right upper lobe, abutting the pleura."
LUNG_FINDING = "No pleural effusion. Emphysema in both apices."
COMPARISON = "Compared with CT of 03/14/2023: the mass has grown."
IMPRESSION = (
    "Suspicious for primary lung carcinoma. Discussed with Dr. Maria Garcia on 2024-01-05, pager 555-987-6543.\n"
    "Smithers was informed at Springfield General Hospital, 742 Evergreen Terrace."
)
NOTE = "Report reviewed on March 3 for Jonathan Smithers, accession ACC20230042."
CLINICAL = ("3.5 cm spiculated mass", "right upper lobe", "No pleural effusion", "Emphysema", "Cough for 3 weeks",
            "the mass has grown", "Suspicious for primary lung carcinoma")  # fmt: skip


def _patient(ds: Dataset, study_uid: str) -> None:
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PLANTED["birth_date"]
    ds.PatientSex = "M"
    ds.PatientAddress = PLANTED["address"]
    ds.PatientTelephoneNumbers = "555-222-3333"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240105"
    ds.StudyTime = "101500"
    ds.StudyID = "ST88123"
    ds.AccessionNumber = ACCESSION
    ds.ReferringPhysicianName = PLANTED["referring"]
    ds.InstitutionName = PLANTED["institution"]
    ds.InstitutionAddress = PLANTED["address"]
    ds.StudyDescription = PLANTED["description"]
    ds.PatientComments = "Jonathan Smithers prefers morning appointments"
    ds.add_new(0x00090010, "LO", "PLANTED_PRIVATE")  # private creator
    ds.add_new(0x00091001, "LO", PLANTED["private"])
    nested = Dataset()
    nested.PatientName = PATIENT_NAME
    nested.OtherPatientIDs = PATIENT_ID
    ds.OtherPatientIDsSequence = [nested]


def evidence_image(study_uid: str | None = None) -> Dataset:
    """The header of a CT image (no pixels) in ``study_uid``: the evidence an SR refers to."""
    ds = Dataset()
    _patient(ds, study_uid or generate_uid())
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Test"
    return ds


def _text(code: Code, value: str) -> TextContentItem:
    return TextContentItem(name=code, value=value, relationship_type="CONTAINS")


def _container(code: Code, items: list[Any], relationship: str | None = "CONTAINS") -> ContainerContentItem:
    c = ContainerContentItem(name=code, relationship_type=relationship)
    c.ContentSequence = items
    return c


FINDINGS = Code("121070", "DCM", "Findings")
FINDING_ITEM = Code("121071", "DCM", "Finding")
IMPRESSIONS = Code("121072", "DCM", "Impressions")
IMPRESSION_ITEM = Code("121073", "DCM", "Impression")
HISTORY_CODE = Code("121060", "DCM", "History")
COMPARISON_CODE = Code("18834-2", "LN", "Radiology Comparison study (narrative)")
LUNG = Code("39607008", "SCT", "Lung")
NOTE_CODE = Code("N0001", "99MEDSEARCH", "Quality note")
REPORT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")


def report_tree(measurement: bool = False) -> ContainerContentItem:
    """A TID 2000-like report: context items, History, Findings (a nested "Lungs" subheading and a nested
    Comparison section), Impressions, and a section with a private heading ("Quality note")."""
    lungs: list[Any] = [_text(FINDING_ITEM, LUNG_FINDING)]
    if measurement:
        lungs.append(
            NumContentItem(
                name=Code("81827009", "SCT", "Diameter"),
                value=35,
                unit=Code("mm", "UCUM", "millimeter"),
                relationship_type="CONTAINS",
            )  # fmt: skip
        )
        lungs.append(
            CodeContentItem(
                name=Code("121071", "DCM", "Finding"),
                value=Code("4147007", "SCT", "Mass"),
                relationship_type="CONTAINS",
            )
        )
    root = ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = [
        CodeContentItem(
            name=Code("121049", "DCM", "Language of Content Item and Descendants"),
            value=Code("en-US", "RFC5646", "English (United States)"),
            relationship_type="HAS CONCEPT MOD",
        ),
        PnameContentItem(
            name=Code("121008", "DCM", "Person Observer Name"),
            value=PLANTED["observer"],
            relationship_type="HAS OBS CONTEXT",
        ),
        _container(HISTORY_CODE, [_text(HISTORY_CODE, HISTORY)]),
        _container(
            FINDINGS,
            [
                _text(FINDING_ITEM, FINDING),
                _container(LUNG, lungs),
                _container(COMPARISON_CODE, [_text(FINDING_ITEM, COMPARISON)]),
            ],
        ),
        _container(IMPRESSIONS, [_text(IMPRESSION_ITEM, IMPRESSION)]),
        _container(NOTE_CODE, [_text(Code("121106", "DCM", "Comment"), NOTE)]),
    ]
    return root


def _sr_kwargs(evidence: list[Dataset]) -> dict[str, Any]:
    return dict(
        evidence=evidence,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Test",
        is_complete=True,
        is_verified=True,
        institution_name=PLANTED["institution"],
        verifying_observer_name=PLANTED["observer"],
        verifying_organization=PLANTED["institution"],
    )


def _plant_sr_header(ds: Dataset) -> Dataset:
    ds.InstitutionAddress = PLANTED["address"]
    ds.PatientComments = "Jonathan Smithers prefers morning appointments"
    ds.add_new(0x00090010, "LO", "PLANTED_PRIVATE")
    ds.add_new(0x00091001, "LO", PLANTED["private"])
    return ds


def enhanced_sr(study_uid: str | None = None, other_study_uids: tuple[str, ...] = ()) -> Dataset:
    """An Enhanced SR (highdicom) in ``study_uid`` about one image of it and one of each of ``other_study_uids``."""
    evidence = [evidence_image(study_uid)] + [evidence_image(u) for u in other_study_uids]
    return _plant_sr_header(hd.sr.EnhancedSR(content=report_tree(), **_sr_kwargs(evidence)))


def comprehensive_sr(study_uid: str | None = None, other_study_uids: tuple[str, ...] = ()) -> Dataset:
    """A Comprehensive SR (highdicom): the same report plus a NUM measurement and a CODE finding."""
    evidence = [evidence_image(study_uid)] + [evidence_image(u) for u in other_study_uids]
    return _plant_sr_header(hd.sr.ComprehensiveSR(content=report_tree(measurement=True), **_sr_kwargs(evidence)))


def _code_seq(value: str, scheme: str, meaning: str) -> list[Dataset]:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return [c]


def _item(vt: str, rel: str | None, code: tuple[str, str, str] | None, **attrs: Any) -> Dataset:
    d = Dataset()
    if rel is not None:
        d.RelationshipType = rel
    d.ValueType = vt
    if code is not None:
        d.ConceptNameCodeSequence = _code_seq(*code)
    for k, v in attrs.items():
        setattr(d, k, v)
    return d


def basic_text_sr(study_uid: str | None = None, content: list[Dataset] | None = None) -> Dataset:
    """A Basic Text SR (pydicom) with LOINC headings: Indication as a root TEXT item, a Findings container
    holding an "Impression" TEXT item, and a signature line; ``content`` replaces the root's items."""
    ds = Dataset()
    _patient(ds, study_uid or generate_uid())
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ContentDate, ds.ContentTime = "20240105", "120000"
    ds.CompletionFlag, ds.VerificationFlag = "PARTIAL", "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = _code_seq("18748-4", "LN", "Diagnostic imaging report")
    req = Dataset()
    req.StudyInstanceUID = ds.StudyInstanceUID
    req.AccessionNumber = ACCESSION
    req.RequestedProcedureID = "RP55123"
    ds.ReferencedRequestSequence = [req]
    if content is None:
        content = [
            _item(
                "PNAME", "HAS OBS CONTEXT", ("121008", "DCM", "Person Observer Name"), PersonName=PLANTED["observer"]
            ),
            _item("TEXT", "CONTAINS", ("18785-6", "LN", "Indications for procedure"), TextValue=HISTORY),
            _item(
                "CONTAINER",
                "CONTAINS",
                ("18782-3", "LN", "Radiology Study observation (narrative)"),
                ContinuityOfContent="SEPARATE",
                ContentSequence=[
                    _item("TEXT", "CONTAINS", ("121071", "DCM", "Finding"), TextValue=f"{FINDING}\r\n{LUNG_FINDING}"),
                    _item("TEXT", "CONTAINS", ("121073", "DCM", "Impression"), TextValue=IMPRESSION),
                ],
            ),  # fmt: skip
            _item("DATE", "CONTAINS", ("111536", "DCM", "Date of Report"), Date="20240105"),
            _item(
                "TEXT",
                "CONTAINS",
                ("121106", "DCM", "Comment"),
                TextValue="Electronically signed by: Petra Lindqvist, MD",
            ),
        ]
    ds.ContentSequence = content
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (preamble + meta) and return the path; read back with pydicom.dcmread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


# ---------------------------------------------------------------------------- RIS exports
RIS_ROWS: list[dict[str, str]] = [
    {  # matched by accession number
        "Accession_Number": "A1001", "Study_Instance_UID": "", "Patient_Name": "Smithers^Jonathan",
        "MRN": "12345678", "Findings": "Right lower lobe consolidation. Seen by Dr. Maria Garcia on 03/14/2023.",
        "Impression": "Pneumonia. Call (555) 123-4567 with questions.",
    },
    {  # matched by study instance uid, one "report" column with headings
        "Accession_Number": "", "Study_Instance_UID": "1.2.826.0.1.3680043.8.498.1", "Patient_Name": "Okonkwo^Adaeze",
        "MRN": "87654321", "Findings": "", "Impression": "",
        "Report": "HISTORY: Fall. Patient Okonkwo.\nFINDINGS: Nondisplaced fracture of the left fifth rib.\n"
                  "IMPRESSION: Rib fracture. Signed by Petra Lindqvist, MD on 2024-01-05.",
    },
    {  # matches no study
        "Accession_Number": "A9999", "Study_Instance_UID": "", "Patient_Name": "Nobody^Here", "MRN": "55554444",
        "Findings": "Normal study.", "Impression": "No acute findings.",
    },
]  # fmt: skip


def write_ris_csv(path: Path, rows: list[dict[str, str]] = RIS_ROWS, encoding: str = "utf-8") -> Path:
    """A RIS export as CSV (header row, mixed-case column names, one multi-line quoted report)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def write_ris_jsonl(path: Path, rows: list[dict[str, str]] = RIS_ROWS) -> Path:
    """The same export as JSONL (lower-case keys, empty values left out, a blank line in between)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k.lower(): v for k, v in r.items() if v}) + "\n\n")
    return path
