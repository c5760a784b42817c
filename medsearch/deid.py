"""De-identification of DICOM headers and report text.

Method (recorded in the catalog by ``deid_method()``):

* **Headers: whitelist, not blacklist.** ``safe_metadata`` copies out only attributes that
  DICOM PS3.15 Annex E (Table E.1-1, Basic Application Level Confidentiality Profile) does not
  list for removal - modality, body part, view, laterality, image geometry, encoding, device
  model - and checks code-string values against the CS character set, so free text cannot ride
  along. Everything else (names, IDs, addresses, institution, physicians, descriptions,
  comments, private tags) is never read into the result. ``PHI_TAGS`` lists the profile's
  keywords; ``assert_no_phi`` checks a result against it.
* **Identifiers: keyed pseudonyms.** Study/Series/SOP Instance UIDs and PatientID become
  ``HMAC-SHA256(salt, kind + value)`` (hex, 32 chars). The salt is a secret kept with the
  catalog; the same salt gives the same keys across runs (idempotent ingest), another salt
  gives unrelated keys. Without the salt, low-entropy IDs such as MRNs cannot be brute-forced
  back from their keys, which a plain hash would allow - so an empty salt is refused.
* **Dates** (``dates=``): ``"remove"`` (default, as the basic profile) drops them;
  ``"year"`` keeps only the study year (``study_year``, allowed by HIPAA Safe Harbor);
  ``"shift"`` keeps a full date moved back by a per-patient number of days
  (``study_date_shifted``), derived from HMAC(salt, PatientID) so intervals between one
  patient's studies survive (PS3.15 "Retain Longitudinal Temporal Information with Modified
  Dates" option). ``date_shift_days=`` overrides the derived shift with a fixed one.
* **Pixels are not cleaned.** Burned-in annotations are not removed; ``burned_in_annotation``
  is reported so callers can skip such images.
* **Report text:** ``scrub_text`` / ``scrub_sections`` are a regex-based scrubber (names after
  titles, before credentials, after labels and in PN form; labelled and MRN-like ids; dates; phones;
  emails; addresses; ages over 89; plus the names and ids the caller knows from the header or the
  RIS row). Report text from DICOM SR and RIS exports goes through it by default; sidecar text when
  asked. It reduces, but cannot guarantee the absence of, PHI in free text.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Iterator, Mapping, MutableSequence
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DATE_MODES = ("remove", "year", "shift")

# Keywords of the attributes PS3.15 Table E.1-1 (Basic Profile) removes, empties or replaces.
PHI_TAGS: tuple[str, ...] = (
    "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
    "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription", "AcquisitionTime",
    "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID", "AdmittingDate",
    "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "AdmittingTime", "Allergies",
    "AuthorObserverSequence", "BranchOfService", "CassetteID", "CommentsOnThePerformedProcedureStep",
    "ConfidentialityConstraintOnPatientDataDescription", "ConsultingPhysicianName", "ContentCreatorName",
    "ContentCreatorIdentificationCodeSequence", "ContentDate", "ContentSequence", "ContentTime",
    "ContrastBolusAgent", "CountryOfResidence", "CurrentPatientLocation", "CurveDate", "CurveTime",
    "CustodialOrganizationSequence", "DataSetTrailingPadding", "DerivationDescription", "DetectorID",
    "DeviceSerialNumber", "DeviceUID", "DigitalSignaturesSequence", "DischargeDiagnosisDescription",
    "DistributionAddress", "DistributionName", "EthnicGroup", "FrameComments", "FrameOfReferenceUID",
    "GantryID", "GeneratorID", "GraphicAnnotationSequence", "HumanPerformerName", "HumanPerformerOrganization",
    "IconImageSequence", "IdentifyingComments", "ImageComments", "ImagePresentationComments",
    "ImagingServiceRequestComments", "Impressions", "InstanceCreatorUID", "InstitutionAddress",
    "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
    "InterpretationAuthor", "InterpretationDiagnosisDescription", "InterpretationIDIssuer",
    "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber", "IrradiationEventUID",
    "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "LastMenstrualDate", "MAC",
    "MediaStorageSOPInstanceUID", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
    "ModifiedAttributesSequence", "ModifiedImageDescription", "ModifyingDeviceID",
    "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults", "Occupation",
    "OperatorIdentificationSequence", "OperatorsName", "OrderCallbackPhoneNumber", "OrderEnteredBy",
    "OrderEntererLocation", "OriginalAttributesSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "OverlayDate", "OverlayTime", "ParticipantSequence", "PatientAddress", "PatientAge",
    "PatientBirthDate", "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientID",
    "PatientInstitutionResidence", "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientName",
    "PatientPrimaryLanguageCodeSequence", "PatientReligiousPreference", "PatientSex", "PatientSexNeutered",
    "PatientSize", "PatientState", "PatientTelephoneNumbers", "PatientTransportArrangements", "PatientWeight",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedStationAETitle", "PerformedStationName",
    "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName", "PersonAddress",
    "PersonIdentificationCodeSequence", "PersonName", "PersonTelephoneNumbers",
    "PhysicianApprovingInterpretation", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "PlateID", "PreMedication", "PregnancyStatus",
    "ProtocolName", "ReasonForStudy", "ReasonForTheImagingServiceRequest", "ReferencedFrameOfReferenceUID",
    "ReferencedPatientAliasSequence", "ReferencedPatientSequence", "ReferencedSOPInstanceUID",
    "ReferencedStudySequence", "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianName", "ReferringPhysicianTelephoneNumbers", "RegionOfResidence",
    "RelatedFrameOfReferenceUID", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestedProcedureLocation", "RequestedSOPInstanceUID", "RequestingPhysician", "RequestingService",
    "ResponsibleOrganization", "ResponsiblePerson", "ResultsComments", "ResultsDistributionListSequence",
    "ResultsIDIssuer", "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime",
    "ScheduledProcedureStepLocation", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
    "ScheduledStationNameCodeSequence", "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "SeriesDate",
    "SeriesDescription", "SeriesInstanceUID", "SeriesTime", "ServiceEpisodeDescription", "ServiceEpisodeID",
    "SOPInstanceUID", "SourceImageSequence", "SpecialNeeds", "StationName", "StorageMediaFileSetUID",
    "StudyComments", "StudyDate", "StudyDescription", "StudyID", "StudyIDIssuer", "StudyInstanceUID",
    "StudyTime", "SynchronizationFrameOfReferenceUID", "TextComments", "TextString", "TimezoneOffsetFromUTC",
    "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle", "UID",
    "VerifyingObserverIdentificationCodeSequence", "VerifyingObserverName", "VerifyingObserverSequence",
    "VerifyingOrganization", "VisitComments",
)  # fmt: skip

# The directly identifying ones: their raw values must never appear anywhere in stored metadata.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
    "MedicalRecordLocator", "AccessionNumber", "StudyID", "AdmissionID", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician", "StationName",
    "DeviceSerialNumber",
)  # fmt: skip

_PHI_NORMALISED = {k.lower() for k in PHI_TAGS}
_CS = re.compile(r"[A-Z0-9 _]{1,16}")  # DICOM Code String: what a CS value may contain


# ---------------------------------------------------------------------------- pseudonyms and dates
def pseudonym(value: str, salt: str, kind: str) -> str:
    """Keyed pseudonym of an identifier: hex HMAC-SHA256(salt, kind NUL value), 32 characters."""
    _require_salt(salt)
    msg = f"{kind}\x00{value.strip()}".encode()
    return hmac.new(salt.encode(), msg, hashlib.sha256).hexdigest()[:32]


def patient_date_shift(patient_id: str, salt: str, max_days: int = 365) -> int:
    """Days (from -max_days to -1) that all of one patient's dates move by; stable for a salt."""
    _require_salt(salt)
    digest = hmac.new(salt.encode(), f"date-shift\x00{patient_id.strip()}".encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % max_days)


def deid_method(dates: str = "remove") -> str:
    """One line describing the de-identification applied, stored with each case."""
    _check_dates(dates)
    how = {
        "remove": "removed",
        "year": "year only",
        "shift": "shifted per patient by HMAC(salt, PatientID) days",
    }[dates]
    return (
        "DICOM PS3.15 E.1.1 basic profile, whitelist of non-identifying attributes; "
        f"uids/patient id: HMAC-SHA256 with secret salt; dates: {how}; pixels not cleaned"
    )


# ---------------------------------------------------------------------------- headers
def safe_metadata(
    ds: Dataset, salt: str, *, dates: str = "remove", date_shift_days: int | None = None
) -> dict[str, Any]:
    """The non-identifying, filterable fields of a DICOM header plus pseudonymous keys.

    Keys (present only when the header has a usable value): modality, sop_class, body_part, view,
    laterality, rows, columns, frames, samples_per_pixel, bits_stored, photometric, transfer_syntax,
    manufacturer, model, slice_thickness, pixel_spacing, orientation, contrast,
    burned_in_annotation, study_key, series_key, instance_key, patient_key, and study_year
    (``dates="year"``) or study_date_shifted (``dates="shift"``, ISO date).
    """
    _require_salt(salt)
    _check_dates(dates)
    meta: dict[str, Any] = {}
    for key, kw in (("modality", "Modality"), ("body_part", "BodyPartExamined"), ("view", "ViewPosition"),
                    ("photometric", "PhotometricInterpretation"), ("burned_in_annotation", "BurnedInAnnotation")):  # fmt: skip
        if (v := _code(ds.get(kw))) is not None:
            meta[key] = v
    lat = _code(ds.get("Laterality")) or _code(ds.get("ImageLaterality"))
    if lat is not None:
        meta["laterality"] = lat
    for key, kw in (("rows", "Rows"), ("columns", "Columns"), ("frames", "NumberOfFrames"),
                    ("samples_per_pixel", "SamplesPerPixel"), ("bits_stored", "BitsStored")):  # fmt: skip
        if (n := _int(ds.get(kw))) is not None:
            meta[key] = n
    if "frames" not in meta and "rows" in meta:
        meta["frames"] = 1
    sop_class = ds.get("SOPClassUID")
    if sop_class:
        meta["sop_class"] = str(getattr(sop_class, "name", sop_class))
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        meta["transfer_syntax"] = str(ts)
    for key, kw in (("manufacturer", "Manufacturer"), ("model", "ManufacturerModelName")):
        if (s := _text(ds.get(kw), 64)) is not None:
            meta[key] = s
    if (t := _float(ds.get("SliceThickness"))) is not None:
        meta["slice_thickness"] = t
    if (sp := _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)) is not None:
        meta["pixel_spacing"] = sp
    if (o := _floats(ds.get("ImageOrientationPatient"), 6)) is not None:
        meta["orientation"] = [round(x, 4) for x in o]
    if "ContrastBolusAgent" in ds:  # presence only: the agent's text is a descriptor to clean
        meta["contrast"] = bool(str(ds.get("ContrastBolusAgent") or "").strip())

    for key, kw in (("study_key", "StudyInstanceUID"), ("series_key", "SeriesInstanceUID"),
                    ("instance_key", "SOPInstanceUID")):  # fmt: skip
        uid = str(ds.get(kw) or "").strip()
        if not uid and kw == "SOPInstanceUID" and file_meta is not None:
            uid = str(file_meta.get("MediaStorageSOPInstanceUID") or "").strip()
        if uid:
            meta[key] = pseudonym(uid, salt, kw)
    patient_id = str(ds.get("PatientID") or "").strip()
    if patient_id:
        meta["patient_key"] = pseudonym(patient_id, salt, "PatientID")

    if dates != "remove":
        day = _study_day(ds)
        if day is not None and dates == "year":
            meta["study_year"] = day.year
        elif day is not None and dates == "shift":
            shift = date_shift_days if date_shift_days is not None else (
                patient_date_shift(patient_id, salt) if patient_id else None
            )  # fmt: skip
            if shift is not None:  # no PatientID, no consistent shift: leave the date out
                meta["study_date_shifted"] = (day + _dt.timedelta(days=shift)).isoformat()
    return meta


def assert_no_phi(meta: dict[str, Any], ds: Dataset | None = None) -> None:
    """Raise ``AssertionError`` if ``meta`` has a PHI attribute as a key or, given ``ds``, a raw identifier value.

    Keys are compared to ``PHI_TAGS`` ignoring case and underscores (``study_date`` is PHI,
    ``study_year`` is not). Values of ``IDENTIFYING_TAGS`` in ``ds`` (3+ characters, and each
    name component) must not occur as a whole token anywhere in ``json.dumps(meta)``.
    """
    for key in _keys(meta):
        if key.replace("_", "").lower() in _PHI_NORMALISED:
            raise AssertionError(f"metadata key {key!r} is a PHI attribute of the PS3.15 basic profile")
    if ds is None:
        return
    text = json.dumps(meta, default=str)
    for kw in IDENTIFYING_TAGS:
        for value in _raw_values(ds.get(kw)):
            if len(value) >= 3 and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.I):
                raise AssertionError(f"metadata contains the raw value of {kw}")


# ---------------------------------------------------------------------------- report text
# Each rule: (pattern, token, kind, need) - ``need``: what a text must contain for the rule to be tried
# ("digit", "@", "^" or "" for always). Where the pattern has a group named "phi", only that group is
# replaced (labels, titles and credentials around it are kept); otherwise the whole match is.
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_NAME_WORD = r"(?:(?<!\[)[A-Z][a-zA-Z'\u2019-]+|[A-Z]\.)"
_NAME = rf"{_NAME_WORD}(?:\s+{_NAME_WORD}){{0,2}}"  # rules start it after a non-word: a scan stays linear
_NOT_TITLE = r"(?!(?:Dr|Drs|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor|Professor|Nurse)\b)"
_ID_LABEL = (
    r"MRN|MR\s?#|MR no\.?|med(?:ical)? rec(?:ord)?(?: number| no\.?| #)?|accession(?: number| no\.?| #)?|"
    r"acc(?:\.|ession)?\s?(?:no\.?|#)|patient (?:id|no\.?|number|#)|pt\.? id|hospital (?:number|no\.?)|"
    r"NHS (?:number|no\.?)|SSN|encounter(?: number| no\.?| #| id)?|visit (?:number|no\.?|#|id)|"
    r"order (?:number|no\.?|#|id)|requisition(?: number| no\.?| #)?|FIN|CSN|chart (?:number|no\.?|#)|"
    r"study id|exam (?:number|no\.?|#)|unit (?:number|no\.?)|id(?=\s*[:#])"
)
_STREET = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Court|Ct|Place|Pl|Way|Terrace|Parkway|Pkwy|"
    r"Highway|Hwy|Square|Sq|Crescent|Close"
)
_SCRUB_RULES: tuple[tuple[re.Pattern[str], str, str, str], ...] = (
    (re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[EMAIL]", "email", "@"),  # from a token start: linear
    # labelled identifiers: keep the label, replace a value that holds a digit
    (
        re.compile(rf"(?i)\b(?:{_ID_LABEL})\s*[:#]?\s*(?P<phi>(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{{2,}})"),
        "[ID]",
        "id",
        "digit",
    ),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ID]", "id", "digit"),  # SSN
    # dates: ISO, numeric D/M/Y or M/D/Y, DICOM YYYYMMDD, and with month names (with or without a year)
    (re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"), "[DATE]", "date", "digit"),
    (re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.](?:\d{4}|\d{2})\b"), "[DATE]", "date", "digit"),
    (re.compile(r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"), "[DATE]", "date", "digit"),
    (re.compile(rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b"), "[DATE]", "date", "digit"),
    (re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\.?,?\s+\d{{4}}\b"), "[DATE]", "date", "digit"),
    (
        re.compile(rf"\b\d{{1,2}}[-/ ]{_MONTH}[-/ ]\d{{2,4}}\b|\b{_MONTH}[-/]\d{{1,2}}[-/]\d{{2,4}}\b"),
        "[DATE]",
        "date",
        "digit",
    ),
    (re.compile(rf"\b{_MONTH}\.?\s+\d{{4}}\b"), "[DATE]", "date", "digit"),
    (
        re.compile(rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?\b(?!\s*(?:mm|cm|%|x\b|-?year))"),
        "[DATE]",
        "date",
        "digit",
    ),
    (re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)\s+(?:of\s+)?{_MONTH}\b"), "[DATE]", "date", "digit"),
    # phone numbers: (555) 123-4567, 555-123-4567, +44 20 7946 0958, 123-4567, "pager 4-5678", "ext. 2345"
    (re.compile(r"(?<![\w+])(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b"), "[PHONE]", "phone", "digit"),
    (re.compile(r"(?<!\w)\+\d{1,3}(?:[\s.-]?\d{2,4}){2,4}\b"), "[PHONE]", "phone", "digit"),
    (re.compile(r"(?<![\w-])\d{3}-\d{4}\b(?!-)"), "[PHONE]", "phone", "digit"),
    (
        re.compile(
            r"(?i)\b(?:tel|telephone|phone|ph|fax|pager|pgr|beeper|bleep|ext|extension|cell|mobile)\.?\s*[:#]?\s*"
            r"(?P<phi>\d(?:[\s.-]?\d){3,})\b"
        ),
        "[PHONE]",
        "phone",
        "digit",
    ),  # fmt: skip
    # addresses: "12 Elm Street, Apt 4B", "Springfield, IL 62704", "PO Box 123", UK postcodes
    (
        re.compile(
            rf"\b\d{{1,5}}[A-Z]?\s+(?:[A-Z][a-z]+\.?\s+){{1,3}}(?:{_STREET})\b"
            r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Flat)\.?\s*#?\s*\w+)?"
        ),
        "[ADDRESS]",
        "address",
        "digit",
    ),  # fmt: skip
    (
        re.compile(r"\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)?,\s*(?:[A-Z]{2}|[A-Z][a-z]+)\s+\d{5}(?:-\d{4})?\b"),
        "[ADDRESS]",
        "address",
        "digit",
    ),
    (re.compile(r"(?i)\bP\.?\s?O\.?\s+Box\s+\d+\b"), "[ADDRESS]", "address", "digit"),
    (re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b"), "[ADDRESS]", "address", "digit"),
    # alphanumeric ids: "RAD20230042", "A123456", "RAD-2023-00042"; then MRN-like runs of 6+ digits
    (re.compile(r"(?<!\[)\b[A-Z]{1,5}(?:[-#]?\d){5,}[A-Z]?\b"), "[ID]", "id", "digit"),
    (re.compile(r"\b\d{6,}\b"), "[ID]", "id", "digit"),
    # ages over 89 (HIPAA Safe Harbor): "92-year-old", "95 yo", "aged 93"
    (
        re.compile(r"\b(?:9\d|1[0-4]\d)(?=[- ]?(?:years?|yrs?)[- ]old\b|\s*(?:yo|y/o|y\.o\.)(?!\w))"),
        "[AGE 90+]",
        "age_over_89",
        "digit",
    ),  # fmt: skip
    (re.compile(r"(?i)(?<!\[)\bage[d]?\s*:?\s*(?P<phi>9\d|1[0-4]\d)\b"), "[AGE 90+]", "age_over_89", "digit"),
    # names: after titles, in DICOM PN form (SMITH^JOHN), before credentials (John Smith, MD), after labels
    (
        re.compile(
            rf"\b(?:(?:Dr|Drs|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor|Professor|Nurse)\.?|DR\.|PROF\.)\s+(?P<phi>{_NAME})"
        ),
        "[NAME]",
        "name",
        "",
    ),  # fmt: skip
    (re.compile(r"(?<![\w'\u2019\[-])[A-Z][A-Za-z'\u2019-]+\^[A-Za-z'\u2019^ .-]*[A-Za-z.]"), "[NAME]", "name", "^"),
    (
        re.compile(
            rf"(?<![\w'\u2019\[-]){_NOT_TITLE}(?P<phi>{_NAME}),?\s+(?:(?:MD|DO|PhD|MBBS|FRCR|FRCPC?|RN|NP|PA-C)\b|M\.D\.|D\.O\.|Ph\.D\.)"
        ),
        "[NAME]",
        "name",
        "",
    ),  # fmt: skip
    (
        re.compile(
            r"(?i:\b(?:patient name|name|patient|pt|radiologist|attending|resident|fellow|technologist|"
            r"referring (?:physician|doctor)|ordering (?:physician|doctor)|physician|cc)\s*:\s*|"
            r"\b(?:(?:electronically )?signed|dictated|reported|read|reviewed|interpreted|transcribed|verified|"
            r"approved|discussed with|called to|communicated to)\s+by\s*:?\s*|\bdiscussed with\s+)"
            rf"{_NOT_TITLE}(?P<phi>[A-Z][a-zA-Z'\u2019-]+,\s+{_NAME_WORD}|{_NAME})"
        ),
        "[NAME]",
        "name",
        "",
    ),  # fmt: skip
)
_DIGIT = re.compile(r"\d")


def _rules(text: str) -> list[tuple[re.Pattern[str], str, str, str]]:
    """The rules that can match ``text`` (a cheap pre-check: most need a digit, e-mails an "@", PN names a "^")."""
    has = {"": True, "digit": _DIGIT.search(text) is not None, "@": "@" in text, "^": "^" in text}
    return [r for r in _SCRUB_RULES if has[r[3]]]


_TITLE_WORDS = {"dr", "drs", "mr", "mrs", "ms", "miss", "mx", "prof", "md", "phd", "do", "rn", "jr", "sr", "ii", "iii"}


def _span(m: re.Match[str]) -> tuple[int, int]:
    return m.span("phi") if "phi" in m.re.groupindex else m.span()


def _replace(pattern: re.Pattern[str], token: str, text: str) -> tuple[str, int]:
    def sub(m: re.Match[str]) -> str:
        s, e = _span(m)
        return m.string[m.start() : s] + token + m.string[e : m.end()]

    return pattern.subn(sub, text)


def _known_parts(names: Iterable[str]) -> list[str]:
    """Name components worth replacing: PN components (``^``, ``=``) and comma parts, titles left out, longest first."""
    parts: set[str] = set()
    for name in names:
        for part in re.split(r"[\^,=]", str(name)):
            p = " ".join(part.split())
            if len(p) >= 2 and p.lower().strip(".") not in _TITLE_WORDS:
                parts.add(p)
    return sorted(parts, key=lambda p: (-len(p), p))


def _scrub(text: str, known_names: Iterable[str] = (), known_ids: Iterable[str] = ()) -> tuple[str, int]:
    out, n = text, 0
    for value in sorted(
        {" ".join(str(v).split()) for v in known_ids if len(str(v).strip()) >= 3}, key=len, reverse=True
    ):
        out, k = re.subn(rf"(?<!\w){re.escape(value)}(?!\w)", "[ID]", out, flags=re.I)
        n += k
    for pattern, token, _, _ in _rules(out):
        out, k = _replace(pattern, token, out)
        n += k
    for part in _known_parts(known_names):
        out, k = re.subn(rf"(?<![\w\[]){re.escape(part)}(?![\w\]])", "[NAME]", out, flags=re.I)
        n += k
    return out, n


def scrub_text(text: str, known_names: Iterable[str] = (), *, known_ids: Iterable[str] = ()) -> str:
    """Replace likely PHI in report text with tokens: [NAME], [DATE], [PHONE], [EMAIL], [ID], [ADDRESS], [AGE 90+].

    Regex-based; ``known_names`` (e.g. the header's PatientName and physicians, ``^``-separated
    components allowed) are replaced by [NAME] and ``known_ids`` (PatientID, AccessionNumber) by
    [ID] wherever they occur. Bare years are kept. See ``scrub_sections`` for the list of rules.
    """
    return _scrub(text, known_names, known_ids)[0]


def scrub_sections(
    sections: Mapping[str, str], *, known_names: Iterable[str] = (), known_ids: Iterable[str] = ()
) -> tuple[dict[str, str], int]:
    """Scrub every section of a report; return (new sections, number of spans replaced).

    What it redacts (token in brackets; labels, titles and credentials around a value are kept):
    e-mail addresses [EMAIL]; labelled ids (MRN, medical record, accession/Acc #, patient/visit/
    encounter/order/requisition/chart/exam numbers, FIN, CSN, NHS, SSN, "ID:") and SSNs, alphanumeric
    ids with 5+ digits ("RAD20230042") and runs of 6+ digits [ID]; dates - ISO, D/M/Y and M/D/Y,
    YYYYMMDD, with month names with or without a year ("14-Mar-2023", "March 14th") [DATE]; phone,
    fax and pager numbers, 7-digit local numbers, extensions [PHONE]; street addresses, "City, ST
    ZIP", PO boxes, UK postcodes [ADDRESS]; ages over 89 [AGE 90+]; names after a title (Dr., Mrs.,
    Prof., ...), before a credential ("John Smith, MD"), in DICOM PN form ("SMITH^JOHN"), and after a
    label ("Radiologist:", "Patient:", "signed by", "dictated by", "discussed with") [NAME]; and the
    ``known_names`` [NAME] / ``known_ids`` [ID] wherever they occur. Bare years, measurements,
    vertebral levels and clinical text are kept. It reduces, but cannot guarantee the absence of,
    PHI in free text (a name with no title, label or header record gets through).
    """
    names, ids = list(known_names), list(known_ids)
    out: dict[str, str] = {}
    total = 0
    for key, text in sections.items():
        if not text:
            continue
        out[key], n = _scrub(text, names, ids)
        total += n
    return out, total


def find_phi(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each span ``scrub_text`` would replace (labels and titles kept out), in order.

    Kinds: email, id, date, phone, address, age_over_89, name. Overlaps go to the rule that ``scrub_text`` runs first.
    """
    spans: list[tuple[str, int, int]] = []
    for pattern, _, kind, _ in _rules(text):
        for m in pattern.finditer(text):
            start, end = _span(m)
            if start < end and not any(s < end and start < e for _, s, e in spans):
                spans.append((kind, start, end))
    return sorted(spans, key=lambda s: s[1])


# ---------------------------------------------------------------------------- helpers
def _require_salt(salt: str) -> None:
    if not isinstance(salt, str) or not salt:
        raise InvalidInput(
            "salt for pseudonymous ids is empty",
            hint="pass the catalog's secret salt (e.g. secrets.token_hex(16)); the same salt keeps keys stable",
        )


def _check_dates(dates: str) -> None:
    if dates not in DATE_MODES:
        raise InvalidInput(f"dates={dates!r} is not a date mode", hint=f"use one of: {', '.join(DATE_MODES)}")


def _code(value: Any) -> str | None:
    """A CS value (first of a multi-value) if it is a well-formed code string, else None."""
    if value is None:
        return None
    if isinstance(value, MutableSequence | list | tuple):
        if not value:
            return None
        value = value[0]
    s = str(value).strip().upper()
    return s if _CS.fullmatch(s) else None


def _text(value: Any, limit: int) -> str | None:
    s = " ".join(str(value or "").split())
    return s[:limit] if s else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _floats(value: Any, n: int) -> list[float] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _study_day(ds: Dataset) -> _dt.date | None:
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        digits = re.sub(r"\D", "", str(ds.get(kw) or ""))  # DA is YYYYMMDD; old files use YYYY.MM.DD
        if len(digits) == 8:
            try:
                return _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
            except ValueError:
                continue
    return None


def _keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _keys(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _keys(v)


def _raw_values(value: Any) -> Iterator[str]:
    """Strings of an element value: each item of a multi-value, and each component of a person name."""
    if value is None:
        return
    items = list(value) if isinstance(value, MutableSequence | list | tuple) else [value]  # MultiValue or one
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        yield s
        if "^" in s:
            yield from (p.strip() for p in s.split("^") if p.strip())
