"""DICOM Structured Reports -> report sections.

``is_sr(ds)`` tells a text SR (Basic Text, Enhanced, Comprehensive, Comprehensive 3D or Extensible
SR storage, or any object with Modality ``SR``) from an image; ``sr_report(ds)`` reads its content
tree into an ``SRReport``: ``sections`` (canonical lower-case keys -> free text), the SR's own
StudyInstanceUID and the studies it references. SR objects are not images: they get no vector.

Mapping (``section_key``): a CONTAINER's concept name is a section heading. Known codes map first
(DCM 121070 Findings -> ``findings``, 121072 Impressions / 121076 Conclusions -> ``impression``,
121060 History -> ``history``, 121109 Indications for Procedure -> ``indication``, LOINC
18782-3, 19005-8, 18834-2, ...), then the code meaning by keyword ("... findings", "clinical
history", "comparison", "technique", ...). A heading we do not know becomes its own name as a key
(``"addendum_2"`` from "Addendum 2", at most 32 characters of ``[a-z0-9_]``), or ``"other"`` when it
has no usable name. A top-level TEXT item is a section by its concept name. Inside a section, a
TEXT item whose concept name is another known heading goes to that section (Basic Text SRs often
put "Impression" TEXT items under one container) - except "Finding", the generic item name; a
nested container with a known heading starts its own section; one with an unknown heading
("Lungs") stays in its parent section and prefixes its text ("Lungs: Clear."). CODE and NUM items
inside a section are kept as "Name: meaning" / "Name: 35 mm" (without a generic name). TEXT items are kept verbatim
(line breaks kept, runs of spaces collapsed); several items of one section are joined by
newlines, in document order. Context items (HAS OBS CONTEXT, HAS CONCEPT MOD, HAS ACQ CONTEXT:
observer names, subject, language) and PNAME/DATE/TIME/UIDREF/IMAGE/SCOORD items are never read
into sections.

Text is returned as written: run it through ``medsearch.deid.scrub_sections`` (``SRReport.scrubbed()``
does, with the names and ids of the SR's own header as known identifiers) before storing it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import Any

from medsearch.errors import InvalidInput

# SOP Class UIDs of the SR documents whose content tree is a report (PS3.4 B.5).
TEXT_SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR",
}

# SR classes that hold measurements or machine output, not a report: no sections (still not images).
NON_REPORT_SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.40": "Procedure Log", "1.2.840.10008.5.1.4.1.1.88.50": "Mammography CAD SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection", "1.2.840.10008.5.1.4.1.1.88.65": "Chest CAD SR",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR", "1.2.840.10008.5.1.4.1.1.88.68": "Radiopharmaceutical Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.69": "Colon CAD SR", "1.2.840.10008.5.1.4.1.1.88.70": "Implantation Plan SR",
    "1.2.840.10008.5.1.4.1.1.88.71": "Acquisition Context SR", "1.2.840.10008.5.1.4.1.1.88.72": "Simplified Adult Echo SR",
    "1.2.840.10008.5.1.4.1.1.88.73": "Patient Radiation Dose SR", "1.2.840.10008.5.1.4.1.1.88.74": "Planned Imaging Agent Administration SR",
    "1.2.840.10008.5.1.4.1.1.88.75": "Performed Imaging Agent Administration SR", "1.2.840.10008.5.1.4.1.1.88.76": "Enhanced X-Ray Radiation Dose SR",
}  # fmt: skip

# Coded headings (CID 7001 "Diagnostic Imaging Report Headings", CID 7002 report elements, and the
# LOINC report section codes) -> section key.
CODED_SECTIONS = {
    ("DCM", "121060"): "history", ("DCM", "121062"): "indication", ("DCM", "121109"): "indication",
    ("DCM", "121110"): "history", ("DCM", "121064"): "exam", ("DCM", "121065"): "exam",
    ("DCM", "121066"): "comparison", ("DCM", "121068"): "comparison", ("DCM", "121069"): "comparison",
    ("DCM", "121070"): "findings", ("DCM", "121071"): "findings", ("DCM", "121072"): "impression",
    ("DCM", "121073"): "impression", ("DCM", "121076"): "impression", ("DCM", "121077"): "impression",
    ("DCM", "121111"): "impression", ("DCM", "121074"): "recommendation", ("DCM", "121075"): "recommendation",
    ("DCM", "121078"): "addendum",
    ("LN", "11329-0"): "history", ("LN", "55752-0"): "history", ("LN", "18785-6"): "indication",
    ("LN", "55115-0"): "indication", ("LN", "55111-9"): "exam", ("LN", "18834-2"): "comparison",
    ("LN", "18782-3"): "findings", ("LN", "59776-5"): "findings", ("LN", "19005-8"): "impression",
    ("LN", "55110-1"): "impression", ("LN", "18783-1"): "recommendation",
}  # fmt: skip

# Heading words -> section key, tried in order on the heading lower-cased and stripped of accents
# (first match wins); a few German, French and Spanish headings too ("Befund", "Beurteilung", "Conclusión").
_HEADING_WORDS: tuple[tuple[str, str], ...] = (
    (
        r"\bprevious finding|\bprior (?:finding|procedure|stud|exam)|\bcompar(?:ison|ed\b|acion)|\bvergleich",
        "comparison",
    ),
    (r"\bfinding|\bobservation|\bbefund|\bhallazgo|\bconstatation|\bbevinding", "findings"),
    (r"\bimpression|\bconclus|\bsummary|\bopinion|\bdiagnos|\bbeurteilung|\bimpresion", "impression"),
    (r"\bindica(?:tion|cion)|\breason for|\brequest|\bclinical question|\bfragestellung", "indication"),
    (r"\bhistory|\bclinical (?:information|details|data)|\bpresentation|\banamnes|\bhistoria|\bantecedent", "history"),
    (r"\btechni(?:que|k)|\btecnica|\bprotocol\b", "technique"),
    (r"\bexam(?:ination)?\b|\bprocedure", "exam"),
    (r"\brecommend", "recommendation"),
    (r"\baddend", "addendum"),
)
_HEADING_RES = tuple((re.compile(p), k) for p, k in _HEADING_WORDS)
KNOWN_KEYS = frozenset(CODED_SECTIONS.values()) | {k for _, k in _HEADING_WORDS}

# Relationships that carry context about the document, not report content.
_CONTEXT_RELATIONSHIPS = {"HAS OBS CONTEXT", "HAS CONCEPT MOD", "HAS ACQ CONTEXT"}
MAX_DEPTH = 64  # nesting levels of the content tree (real reports use 2-4)
MAX_ITEMS = 100_000  # content items in one SR
MAX_CHARS = 2_000_000  # characters of text in one SR

# Header attributes whose values are used only as known identifiers for the text scrubber.
_NAME_ATTRS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
               "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
               "PhysiciansOfRecord", "RequestingPhysician", "OperatorsName", "VerifyingObserverName",
               "PersonName", "InstitutionName", "InstitutionalDepartmentName", "VerifyingOrganization")  # fmt: skip
_ID_ATTRS = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "MedicalRecordLocator",
    "RequestedProcedureID",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
)


@dataclass(frozen=True)
class SRReport:
    """The report in one SR object. ``names``/``ids`` are the header's identifiers (for the scrubber only).

    ``sections``: section key -> text, in document order. ``study_uid``: the SR's own
    StudyInstanceUID. ``referenced_study_uids``: StudyInstanceUIDs of the evidence and requests it
    references (current and other evidence, referenced requests), in order, without repeats.
    ``complete``/``verified``: CompletionFlag COMPLETE / VerificationFlag VERIFIED (None if absent).
    ``repr`` shows no text, names or UIDs, only section names and lengths.
    """

    sections: dict[str, str]
    study_uid: str | None
    referenced_study_uids: tuple[str, ...] = ()
    title: str | None = None  # the document title's concept name, e.g. "Imaging Report"
    sop_class: str | None = None  # e.g. "Enhanced SR"
    complete: bool | None = None
    verified: bool | None = None
    names: tuple[str, ...] = field(default=(), repr=False, compare=False)
    ids: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __repr__(self) -> str:  # report text and UIDs are identifiers: a repr in a log shows only their shape
        shape = ", ".join(f"{k}: {len(v)} chars" for k, v in self.sections.items())
        return (
            f"SRReport({self.sop_class or 'SR'}, sections={{{shape}}}, study_uid={'set' if self.study_uid else None}, "
            f"referenced_studies={len(self.referenced_study_uids)}, complete={self.complete}, verified={self.verified})"
        )

    def scrubbed(self) -> tuple[dict[str, str], int]:
        """``sections`` through ``medsearch.deid.scrub_sections`` with this SR's names and ids; (sections, n)."""
        from medsearch.deid import scrub_sections

        return scrub_sections(self.sections, known_names=self.names, known_ids=self.ids)


def is_sr(ds: Any) -> bool:
    """True for a text SR document: a Basic/Enhanced/Comprehensive(3D)/Extensible SR class, or Modality SR."""
    if _sop_class(ds) in TEXT_SR_CLASSES:
        return True
    return str(ds.get("Modality") or "").strip().upper() == "SR"


def section_key(name: str | None, scheme: str | None = None, code: str | None = None) -> str | None:
    """The canonical section key of a heading (see the module docstring), or None if it is not a known heading."""
    if scheme and code:
        key = CODED_SECTIONS.get((scheme.strip().upper(), code.strip()))
        if key is not None:
            return key
    text = " ".join(_ascii(name).lower().split())
    if not text:
        return None
    for pattern, key in _HEADING_RES:
        if pattern.search(text):
            return key
    return None


def heading_slug(name: str | None) -> str:
    """A key for an unknown heading: its name in ``[a-z0-9_]`` (32 characters at most), or ``"other"``."""
    slug = re.sub(r"[^a-z0-9]+", "_", _ascii(name).lower()).strip("_")[:32].strip("_")
    return slug if slug and not slug.isdigit() else "other"


def _ascii(name: str | None) -> str:
    """``name`` with accents taken off ("Conclusión" -> "Conclusion"); other non-ASCII letters dropped."""
    return unicodedata.normalize("NFKD", str(name or "")).encode("ascii", "ignore").decode()


def sr_report(ds: Any, name: str | None = None) -> SRReport:
    """Read a text SR's content tree into an ``SRReport``; ``InvalidInput`` naming the file if it is malformed.

    ``name`` labels the object in errors (default: the file it was read from). The text is not
    scrubbed here: use ``SRReport.scrubbed()`` or ``medsearch.deid.scrub_sections``. Dose, CAD,
    key-object and other measurement SRs (``NON_REPORT_SR_CLASSES``) give no sections.
    """
    label = name or str(getattr(ds, "filename", None) or "the SR object")
    if not is_sr(ds):
        raise InvalidInput(
            f"{label} is not a text SR (SOP class {_sop_class(ds) or 'missing'}, modality {ds.get('Modality') or 'missing'})",
            hint="pass a Basic Text, Enhanced or Comprehensive SR; check is_sr(ds) first",
        )
    vt = str(ds.get("ValueType") or "").strip().upper()
    if vt != "CONTAINER":
        raise InvalidInput(
            f"{label} is a malformed SR: its root content item has value type {vt or 'missing'}, not CONTAINER",
            hint="re-export the report from the reporting system; an SR document's root must be a CONTAINER",
        )
    walker = _Walker(label)
    sop_class = _sop_class(ds) or ""
    if sop_class not in NON_REPORT_SR_CLASSES:  # a dose or CAD SR has no report text: no sections
        walker.walk(_sequence(ds, "ContentSequence", label), None, None, 1)
    return SRReport(
        sections=walker.sections(),
        study_uid=_uid(ds.get("StudyInstanceUID")),
        referenced_study_uids=_referenced_studies(ds),
        title=_concept(ds)[0] or None,
        sop_class=TEXT_SR_CLASSES.get(sop_class) or NON_REPORT_SR_CLASSES.get(sop_class),
        complete=_flag(ds.get("CompletionFlag"), "COMPLETE"),
        verified=_flag(ds.get("VerificationFlag"), "VERIFIED"),
        names=tuple(dict.fromkeys(_header_values(ds, _NAME_ATTRS) + walker.names)),
        ids=tuple(dict.fromkeys(_header_values(ds, _ID_ATTRS))),
    )


# ---------------------------------------------------------------------------- content tree
class _Walker:
    """Depth-first walk of a content tree that gathers (section, subheading, text) in document order."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.parts: list[tuple[str, str | None, str]] = []
        self.names: list[str] = []  # PNAME values in the tree (observers): known names for the scrubber
        self.items = 0
        self.chars = 0

    def walk(self, seq: list[Any], key: str | None, sub: str | None, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.error(f"its content tree is nested deeper than {MAX_DEPTH} levels")
        for i, item in enumerate(seq):
            self.items += 1
            if self.items > MAX_ITEMS:
                raise self.error(f"it has more than {MAX_ITEMS} content items")
            if "ReferencedContentItemIdentifier" in item:  # by-reference: points at an item read elsewhere
                continue
            vt = str(item.get("ValueType") or "").strip().upper()
            if not vt:
                raise self.error(f"content item {i + 1} at depth {depth} has no ValueType")
            rel = str(item.get("RelationshipType") or "CONTAINS").strip().upper()
            if vt == "PNAME":
                self.names.extend(_person_names(item.get("PersonName")))
            if rel in _CONTEXT_RELATIONSHIPS:
                continue
            cname, scheme, code = _concept(item)
            known = section_key(cname, scheme, code)
            children = _sequence(item, "ContentSequence", self.label)
            if vt == "CONTAINER":
                if known is not None:
                    self.walk(children, known, None, depth + 1)
                elif key is None:  # an unknown top-level heading is a section of its own
                    self.walk(children, heading_slug(cname), None, depth + 1)
                else:  # an unknown subheading ("Lungs") stays in its section
                    self.walk(children, key, _clean(cname) or sub, depth + 1)
                continue
            if vt == "TEXT":
                if "TextValue" not in item:
                    raise self.error(f"TEXT item {i + 1} at depth {depth} has no TextValue")
                text = _clean(item.get("TextValue"))
                if key is None:  # top-level TEXT: its name is its section (an unknown name a section of its own)
                    target, tsub = known or heading_slug(cname), None
                elif known is not None and known != key and known != "findings":
                    target, tsub = known, None  # an "Impression" item under Findings; "Finding" is generic
                else:
                    target, tsub = key, sub
                    if text and _specific(cname, key):
                        text = f"{_clean(cname)}: {text}"
                self.add(target, tsub, text)
            elif vt in ("CODE", "NUM") and key is not None:
                value = _code_text(item) if vt == "CODE" else _num_text(item)
                if value:
                    self.add(key, sub, f"{_clean(cname)}: {value}" if _specific(cname, key) else value)
                target, tsub = key, sub
            else:  # PNAME, DATE, TIME, DATETIME, UIDREF, IMAGE, COMPOSITE, SCOORD, ...: not report text
                continue
            if children:
                self.walk(children, target, tsub, depth + 1)

    def add(self, key: str, sub: str | None, text: str) -> None:
        if not text:
            return
        self.chars += len(text)
        if self.chars > MAX_CHARS:
            raise self.error(f"it holds more than {MAX_CHARS} characters of text")
        self.parts.append((key, sub, text))

    def sections(self) -> dict[str, str]:
        """Join the gathered parts: one line per item; consecutive items under one subheading share a line."""
        lines: dict[str, list[tuple[str | None, list[str]]]] = {}
        for key, sub, text in self.parts:
            group = lines.setdefault(key, [])
            if sub is not None and group and group[-1][0] == sub:
                group[-1][1].append(text)
            else:
                group.append((sub, [text]))
        return {
            key: "\n".join(f"{sub}: {_join(texts)}" if sub else _join(texts) for sub, texts in groups)
            for key, groups in lines.items()
        }

    def error(self, what: str) -> InvalidInput:
        return InvalidInput(
            f"{self.label} is a malformed SR: {what}",
            hint="re-export the report from the reporting system, or leave this file out of the ingest",
        )


def _sequence(ds: Any, keyword: str, label: str) -> list[Any]:
    seq = ds.get(keyword)
    if seq is None:
        return []
    if isinstance(seq, str | bytes) or not hasattr(seq, "__iter__"):
        raise InvalidInput(f"{label} is a malformed SR: {keyword} is not a sequence", hint="re-export the report")
    return list(seq)


def _concept(item: Any) -> tuple[str, str | None, str | None]:
    """(code meaning, coding scheme, code value) of an item's ConceptNameCodeSequence ("" if none)."""
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return "", None, None
    c = seq[0]
    code = c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue")
    meaning = _clean(c.get("CodeMeaning")) or ""
    return meaning, (str(c.get("CodingSchemeDesignator") or "") or None), (str(code) if code else None)


def _specific(cname: str, key: str) -> bool:
    """Whether an item's concept name says more than its section does (so it is worth a prefix)."""
    return bool(cname) and section_key(cname) not in (key, "findings") and cname.lower() not in _GENERIC_NAMES


_GENERIC_NAMES = {"text", "report text", "narrative", "comment", "note"}


def _code_text(item: Any) -> str:
    seq = item.get("ConceptCodeSequence")
    return _clean(seq[0].get("CodeMeaning")) if seq else ""


def _num_text(item: Any) -> str:
    seq = item.get("MeasuredValueSequence")
    if not seq:
        return ""
    mv = seq[0]
    value = str(mv.get("NumericValue") or "").strip()
    units = mv.get("MeasurementUnitsCodeSequence")
    unit = str(units[0].get("CodeValue") or "").strip() if units else ""
    return f"{value} {unit}".strip() if value and unit not in ("1", "{ratio}") else value


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _clean(value: Any) -> str:
    """Free text kept as written: CR/LF to LF, control characters dropped, spaces collapsed, lines stripped."""
    if value is None:
        return ""
    s = str(value).replace("\r\n", "\n").replace("\r", "\n")
    s = _CONTROL.sub(" ", s)
    lines = [_SPACES.sub(" ", ln).strip() for ln in s.split("\n")]
    return "\n".join(ln for ln in lines if ln)


# ---------------------------------------------------------------------------- header
def _sop_class(ds: Any) -> str | None:
    uid = ds.get("SOPClassUID")
    if not uid:
        fm = getattr(ds, "file_meta", None)
        uid = fm.get("MediaStorageSOPClassUID") if fm is not None else None
    return _uid(uid)


def _uid(value: Any) -> str | None:
    s = str(value or "").strip().rstrip("\x00").strip()
    return s or None


def _flag(value: Any, yes: str) -> bool | None:
    s = str(value or "").strip().upper()
    return None if not s else s == yes


def _referenced_studies(ds: Any) -> tuple[str, ...]:
    uids: list[str] = []
    for kw in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence",
               "ReferencedRequestSequence", "ReferencedStudySequence"):  # fmt: skip
        for item in ds.get(kw) or ():
            uid = _uid(item.get("StudyInstanceUID")) or _uid(
                item.get("ReferencedSOPInstanceUID") if kw == "ReferencedStudySequence" else None
            )
            if uid and uid not in uids:
                uids.append(uid)
    return tuple(uids)


def _person_names(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, MutableSequence | list | tuple) else [value]  # MultiValue or one value
    return [str(v).strip() for v in items if str(v).strip()]


def _header_values(ds: Any, keywords: tuple[str, ...]) -> list[str]:
    """Values of these attributes in the header and in its person/observer sequences (names and ids)."""
    out: list[str] = []
    datasets = [ds]
    for kw in ("VerifyingObserverSequence", "AuthorObserverSequence", "ParticipantSequence",
               "ReferencedRequestSequence"):  # fmt: skip
        datasets.extend(ds.get(kw) or ())
    for d in datasets:
        for kw in keywords:
            out.extend(_person_names(d.get(kw)))
    return out


def _join(texts: list[str]) -> str:
    """Items of one line: after a sentence end a space, else "; " ("Diameter: 35 mm; Mass")."""
    out = texts[0]
    for t in texts[1:]:
        out += (" " if out[-1] in ".!?:;" else "; ") + t
    return out
