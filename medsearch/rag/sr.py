"""A draft as a DICOM Basic Text SR that goes back to the PACS beside the study it describes.

    medsearch draft FILE_OR_FOLDER --sr draft.dcm [--stow URL]

The document references the query study with the real UIDs read from the query files (in memory;
the catalog never holds them) and copies the patient and study identification from them, so the
PACS files it with that study. It carries FINDINGS and IMPRESSION as TEXT items, each sentence
followed by its citations, a CITATIONS container naming each cited prior case by its catalog key
with its similarity, and a note on how it was made. CompletionFlag is PARTIAL and VerificationFlag
UNVERIFIED: a radiologist must read and sign it.

Content tree (PS3.16 TID 2000-like, Basic Text SR value types only):

    CONTAINER (18748-4, LN, "Diagnostic imaging report")
      ├ CONTAINS CONTAINER (121070, DCM, "Findings")     └ CONTAINS TEXT (121071 "Finding") ...
      ├ CONTAINS CONTAINER (121072, DCM, "Impressions")  └ CONTAINS TEXT (121073 "Impression") ...
      ├ CONTAINS CONTAINER (CITATIONS, 99MEDSEARCH)      └ CONTAINS TEXT (CITATION: "C1: case ... similarity ...")
      └ CONTAINS TEXT (121106, DCM, "Comment"): generator, model, unverified draft
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from medsearch.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from medsearch.rag.records import Draft

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
_COPY_PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_COPY_STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    from pydicom import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(value_type: str, concept: Dataset, *, text: str | None = None, children: list | None = None) -> Dataset:
    from pydicom import Dataset
    from pydicom.sequence import Sequence as Seq

    it = Dataset()
    it.RelationshipType = "CONTAINS"
    it.ValueType = value_type
    it.ConceptNameCodeSequence = Seq([concept])
    if value_type == "TEXT":
        it.TextValue = (text or "")[:1024 * 64]
    if value_type == "CONTAINER":
        it.ContinuityOfContent = "SEPARATE"
        it.ContentSequence = Seq(children or [])
    return it


def draft_to_sr(draft: Draft, query: Sequence[Dataset], *, now: datetime | None = None) -> Dataset:
    """The draft as a Basic Text SR data set referencing the study of ``query`` (headers are enough).

    All query data sets must belong to one study. Raises ``InvalidInput`` when there is none,
    or when they name several studies or have no StudyInstanceUID.
    """
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if not query:
        raise InvalidInput("no query DICOM file to reference", hint="--sr needs a DICOM file or study folder as the query")
    studies = {str(ds.get("StudyInstanceUID") or "") for ds in query}
    if "" in studies or len(studies) != 1:
        raise InvalidInput("the query files name no single StudyInstanceUID",
                           hint="give the files of one study (a DICOM file or one study folder)")  # fmt: skip
    first = query[0]
    now = now or datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for kw in _COPY_PATIENT + _COPY_STUDY:
        if kw in first:
            setattr(ds, kw, first.get(kw))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # type 2: present, maybe empty
        if kw not in ds:
            setattr(ds, kw, "")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 990
    ds.SeriesDescription = "medsearch draft (unverified)"
    ds.InstanceNumber = 1
    ds.Manufacturer = "medsearch"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.CurrentRequestedProcedureEvidenceSequence = Seq([_evidence(query)])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Seq([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.ContinuityOfContent = "SEPARATE"
    sections = []
    for name, code, meaning, item_code, item_meaning in (
        ("findings", "121070", "Findings", "121071", "Finding"),
        ("impression", "121072", "Impressions", "121073", "Impression"),
    ):
        lines = [_cited(s.text, [c.n for c in s.citations]) for s in draft.section(name)]
        if lines:
            children = [_item("TEXT", _code(item_code, "DCM", item_meaning), text=t) for t in lines]
            sections.append(_item("CONTAINER", _code(code, "DCM", meaning), children=children))
    cited = {c.n: c for s in draft.sentences for c in s.citations}
    evidence = {e.n: e for e in draft.evidence}
    refs = []
    for n in sorted(cited):
        e = evidence.get(n)
        label = f"C{n}: case {e.source}:{e.case_key}" if e else f"C{n}: case {cited[n].case_key}"
        dx = f"; diagnosis {e.diagnosis}" if e is not None and e.diagnosis else ""
        refs.append(_item("TEXT", _code("CITATION", "99MEDSEARCH", "Cited prior case"),
                          text=f"{label}; image similarity {e.score:.3f}{dx}" if e else label))  # fmt: skip
    if refs:
        sections.append(_item("CONTAINER", _code("CITATIONS", "99MEDSEARCH", "Citations"), children=refs))
    note = (f"Draft written by medsearch ({draft.generator}, model {draft.model}) from {len(draft.evidence)} similar "
            "prior cases; every sentence cites the cases that support it. UNVERIFIED: not a signed report.")
    sections.append(_item("TEXT", _code("121106", "DCM", "Comment"), text=note))
    ds.ContentSequence = Seq(sections)
    return ds


def _cited(text: str, ns: list[int]) -> str:
    return f"{text} [{', '.join(f'C{n}' for n in ns)}]" if ns else text


def _evidence(query: Sequence[Dataset]) -> Dataset:
    """CurrentRequestedProcedureEvidenceSequence item: the query study, its series and instances."""
    from pydicom import Dataset
    from pydicom.sequence import Sequence as Seq

    by_series: dict[str, list[Dataset]] = {}
    for q in query:
        by_series.setdefault(str(q.get("SeriesInstanceUID") or ""), []).append(q)
    study = Dataset()
    study.StudyInstanceUID = query[0].StudyInstanceUID
    series_items = []
    for series_uid, items in by_series.items():
        se = Dataset()
        if series_uid:
            se.SeriesInstanceUID = series_uid
        refs = []
        for q in items:
            if "SOPInstanceUID" in q and "SOPClassUID" in q:
                r = Dataset()
                r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = q.SOPClassUID, q.SOPInstanceUID
                refs.append(r)
        se.ReferencedSOPSequence = Seq(refs)
        series_items.append(se)
    study.ReferencedSeriesSequence = Seq(series_items)
    return study


def write_sr(ds: Dataset, path: str) -> None:
    """Write the SR as a DICOM Part 10 file (atomically)."""
    import io
    from pathlib import Path

    from medsearch.fileio import write_atomic

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, lambda f: f.write(data))
