"""DICOM headers: one file -> an ``Instance`` (what the series builder needs), an SR ``Report``, or a skip.

``indexer.sources.series`` groups instances into studies and series. Only headers are read here
(``stop_before_pixels=True``); pixels are decoded later by ``medsearch.imaging.load_image``. Everything stored comes from ``medsearch.deid.safe_metadata``
(a PS3.15 basic-profile whitelist): cases and images are keyed by HMAC pseudonyms of the
Study/SOP Instance UIDs, patients by a pseudonym of PatientID; names, IDs and descriptions never
leave this module.

Dates (``dates=``): ``"remove"`` (default) stores none; ``"year"`` stores the study year in
``ImageRecord.study_date`` ("2004"); ``"shift"`` stores an ISO date moved back by a per-patient
number of days (see ``medsearch.deid``).

Files: ``.dcm``/``.dicom`` names, or any file with ``DICM`` at offset 128; hidden files and
folders (``.name``) are ignored; folders are walked in sorted order with ``os.scandir``, following
directory symlinks once (loops are cut). Images that declare burned-in annotation are skipped
unless ``allow_burned_in=True``: the pixels themselves may show names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsearch.config import ImagingConfig
from medsearch.deid import DATE_MODES, deid_method, safe_metadata
from medsearch.errors import InvalidInput, MedsearchError, NotFound
from medsearch.imaging.dicom import check_dicom_pixels
from medsearch.records import CaseRecord, ImageRecord, Skipped

_DEFER_BYTES = 64 * 1024  # values above this size (the pixel data) are not read

FRAME_MODES = ("middle", "first", "all")

# Modality code -> coarse modality_type (the vocabulary of the JSONL datasets: CT, MR, X-ray, ...).
MODALITY_TYPES = {
    "CT": "CT", "MR": "MR", "CR": "X-ray", "DX": "X-ray", "DR": "X-ray", "RG": "X-ray", "PX": "X-ray",
    "IO": "X-ray", "US": "US", "PT": "PET", "NM": "NM", "MG": "Mammography", "XA": "XA", "RF": "Fluoroscopy",
}  # fmt: skip

# Objects that carry pixel data but are not pictures anyone searches for.
NON_IMAGE_MODALITIES = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "SR", "KO", "PR", "DOC"}

# BodyPartExamined (CID 4031 codes, spaces/underscores removed) -> coarse body_region.
BODY_REGIONS = {
    **dict.fromkeys(
        [
            "HEAD",
            "BRAIN",
            "SKULL",
            "HEADNECK",
            "NECK",
            "FACE",
            "ORBIT",
            "EYE",
            "SINUS",
            "IAC",
            "EAR",
            "JAW",
            "MANDIBLE",
            "TMJ",
            "PITUITARY",
        ],
        "Head",
    ),  # fmt: skip
    **dict.fromkeys(
        [
            "CHEST",
            "THORAX",
            "LUNG",
            "HEART",
            "BREAST",
            "RIB",
            "STERNUM",
            "CLAVICLE",
            "MEDIASTINUM",
            "CHESTABDOMEN",
            "CHESTABDPELVIS",
        ],
        "Thorax",
    ),  # fmt: skip
    **dict.fromkeys(
        [
            "ABDOMEN",
            "LIVER",
            "PANCREAS",
            "SPLEEN",
            "GALLBLADDER",
            "STOMACH",
            "BOWEL",
            "COLON",
            "ABDOMENPELVIS",
            "ABDPELVIS",
        ],
        "Abdomen",
    ),  # fmt: skip
    **dict.fromkeys(
        ["KIDNEY", "BLADDER", "PROSTATE", "UTERUS", "OVARY", "TESTIS", "SCROTUM", "URETER", "ADRENAL"],
        "Reproductive and Urinary System",
    ),  # fmt: skip
    **dict.fromkeys(
        [
            "SPINE",
            "CSPINE",
            "TSPINE",
            "LSPINE",
            "SSPINE",
            "TLSPINE",
            "LSSPINE",
            "COCCYX",
            "SACRUM",
            "SHOULDER",
            "ARM",
            "ELBOW",
            "FOREARM",
            "WRIST",
            "HAND",
            "FINGER",
            "HIP",
            "FEMUR",
            "THIGH",
            "KNEE",
            "LEG",
            "ANKLE",
            "FOOT",
            "TOE",
            "EXTREMITY",
            "HUMERUS",
            "PELVIS",
        ],
        "Spine and Muscles",
    ),  # fmt: skip
    "WHOLEBODY": "Whole Body",
}

# ViewPosition (projection radiography / mammography) -> plane.
VIEW_PLANES = {
    "AP": "AP", "PA": "PA", "LL": "Lateral", "RL": "Lateral", "LAT": "Lateral", "LATERAL": "Lateral",
    "LLD": "Decubitus", "RLD": "Decubitus", "CC": "CC", "MLO": "MLO", "ML": "Lateral", "LM": "Lateral",
}  # fmt: skip

LATERALITY = {"R": "Right", "L": "Left", "B": "Bilateral"}


@dataclass(frozen=True)
class Instance:
    """One DICOM file's header as the series builder needs it. In memory only: ``study_uid`` and
    ``accession`` exist to join a RIS export and are never yielded or stored."""

    path: Path
    meta: dict[str, Any]  # safe_metadata: whitelisted, pseudonymous
    study_key: str
    series_key: str
    instance_key: str
    modality: str
    n_frames: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    instance_number: int | None
    series_number: int | None
    window: tuple[float, float] | None
    study_uid: str
    accession: str | None
    names: tuple[str, ...] = ()  # PatientName and physicians' names, to scrub from report text


@dataclass(frozen=True)
class Report:
    """Report sections found in a DICOM SR object of a study (``indexer.sources.sr``)."""

    path: Path
    study_key: str
    sections: dict[str, str]


def check_options(frames: str, dates: str, salt: str, root: Path) -> None:
    """Raise a typed error for a bad frame mode, date mode, empty salt or missing path."""
    if frames not in FRAME_MODES:
        raise InvalidInput(f"frames={frames!r} is not a frame mode", hint=f"use one of: {', '.join(FRAME_MODES)}")
    if dates not in DATE_MODES:
        raise InvalidInput(f"dates={dates!r} is not a date mode", hint=f"use one of: {', '.join(DATE_MODES)}")
    if not salt:
        raise InvalidInput(
            "salt for pseudonymous DICOM ids is empty",
            hint="pass the catalog's secret salt; without one, patient IDs could be recovered from their keys",
        )
    if not root.exists():
        raise NotFound(f"{root}: no such file or folder", hint="check the path")


def read_instance(
    path: Path, salt: str, *, dates: str, allow_burned_in: bool, config: ImagingConfig
) -> Instance | Report | Skipped:
    """Read one file's header (no pixels) into an ``Instance``, an SR ``Report``, or the reason to skip it."""
    import pydicom

    name = str(path)
    if path.name.upper() == "DICOMDIR":
        return Skipped(name, "DICOMDIR: a directory index, not an image")
    try:  # pixel data is not read: deferred (its offset and length are kept for the checks below)
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
        size = path.stat().st_size
    except Exception as e:  # pydicom raises many types on broken files; one bad file must not stop a tree
        return Skipped(name, f"unreadable DICOM header ({type(e).__name__}: {_gist(e)})")
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality == "SR":
        return _report(ds, path, salt)
    if modality in NON_IMAGE_MODALITIES:
        return Skipped(name, f"Modality {modality} is not a viewable image")
    try:  # the checks of medsearch.imaging.probe_image, so the ingest need not read the file again
        n_frames = check_dicom_pixels(ds, name, size, config)
    except MedsearchError as e:
        return Skipped(name, _reason(e, name))
    if not allow_burned_in and str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        return Skipped(name, "BurnedInAnnotation is YES: the pixels may show patient details")
    try:
        meta = safe_metadata(ds, salt, dates=dates)
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        position = _floats(ds.get("ImagePositionPatient"), 3)
        window = _window(ds)
    except Exception as e:  # a malformed header value
        return Skipped(name, f"unreadable DICOM header value ({type(e).__name__}: {_gist(e)})")
    study_key, instance_key = meta.get("study_key"), meta.get("instance_key")
    if not study_key:
        return Skipped(name, "no StudyInstanceUID in the header")
    if not instance_key:
        return Skipped(name, "no SOPInstanceUID in the header")
    series_key = meta.get("series_key") or f"{study_key}-noseries"
    accession = str(ds.get("AccessionNumber") or "").strip() or None
    return Instance(
        path=path, meta=meta, study_key=study_key, series_key=series_key, instance_key=instance_key,
        modality=modality, n_frames=n_frames, orientation=orientation, position=position,
        instance_number=_int(ds.get("InstanceNumber")), series_number=_int(ds.get("SeriesNumber")), window=window,
        study_uid=str(ds.get("StudyInstanceUID")).strip(), accession=accession, names=_names(ds),
    )  # fmt: skip


def _names(ds: Any) -> tuple[str, ...]:
    out = []
    for kw in ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy"):
        v = ds.get(kw)
        for one in (v if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue" else [v]):
            if one:
                out.append(str(one))
    return tuple(out)


def _report(ds: Any, path: Path, salt: str) -> Report | Skipped:
    """An SR object -> its report sections, through ``indexer.sources.sr`` when that reader is installed."""
    from medsearch.deid import pseudonym

    name = str(path)
    try:
        from . import sr  # the SR reader (issue 11 items 5-6); absent until that branch is merged
    except ImportError:
        return Skipped(name, "Modality SR is not a viewable image (the SR report reader is not installed)")
    if not sr.is_sr(ds):
        return Skipped(name, "Modality SR, but not a Basic, Enhanced or Comprehensive text SR")
    try:
        rep = sr.sr_report(ds)
    except MedsearchError as e:
        return Skipped(name, _reason(e, name))
    uid = rep.study_uid or str(ds.get("StudyInstanceUID") or "").strip()
    if not uid:
        return Skipped(name, "SR without a StudyInstanceUID: it cannot be joined to a study")
    return Report(path, pseudonym(uid, salt, "StudyInstanceUID"), dict(rep.sections))


def image_records(inst: Instance, source: str, frames: str, dates: str) -> list[ImageRecord]:
    """The image row(s) of one instance: one per file, or one per frame with ``frames='all'``."""
    meta = inst.meta
    modality_type = MODALITY_TYPES.get(inst.modality, inst.modality or None)
    body_part = meta.get("body_part")
    common: dict[str, Any] = {
        "source": source,
        "case_key": inst.study_key,
        "path": str(inst.path.absolute()),
        "modality_type": modality_type,
        "modality": inst.modality or None,
        "plane": _plane(meta),
        "body_region": _body_region(body_part),
        "location": body_part.title() if body_part else None,
        "laterality": LATERALITY.get(meta.get("laterality", "")),
        "study_date": _study_date(meta),
        "meta": meta,
    }
    n = inst.n_frames
    if n == 1:
        return [ImageRecord(key=inst.instance_key, frame=None, **common)]
    if frames == "all":
        return [ImageRecord(key=f"{inst.instance_key}#f{i}", frame=i, **common) for i in range(n)]
    return [ImageRecord(key=inst.instance_key, frame=n // 2 if frames == "middle" else 0, **common)]


def case_record(inst: Instance, source: str, dates: str, sections: dict[str, str] | None = None) -> CaseRecord:
    """The case of a study, from the header of one of its instances."""
    modality_type = MODALITY_TYPES.get(inst.modality, inst.modality or None)
    body_region = _body_region(inst.meta.get("body_part"))
    labels = {k: v for k, v in (("modality_type", modality_type), ("body_region", body_region)) if v}
    return CaseRecord(
        source=source, key=inst.study_key, patient_key=inst.meta.get("patient_key"), labels=labels,
        sections=sections or {}, meta={"format": "dicom", "deid": deid_method(dates)},
    )  # fmt: skip


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _window(ds: Any) -> tuple[float, float] | None:
    def first(v: Any) -> float | None:
        if v is None or v == "":
            return None
        if not isinstance(v, str | bytes | int | float):
            v = v[0] if len(v) else None
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    c, w = first(ds.get("WindowCenter")), first(ds.get("WindowWidth"))
    return (c, w) if c is not None and w is not None and w > 0 else None


def _walk(root: Path) -> Iterator[Path | Skipped]:
    """Files under ``root`` in sorted, depth-first order; directory symlinks followed once (no loops)."""
    seen: set[tuple[int, int]] = set()
    stack: list[Iterator[os.DirEntry[str]]] = []

    def enter(path: str) -> Skipped | None:
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return None  # a symlink back into the tree: already walked
            seen.add(key)
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)  # one folder's listing, not the tree
        except OSError as e:
            return Skipped(path, f"cannot list folder ({e.strerror})")
        stack.append(iter(entries))
        return None

    if (skip := enter(str(root))) is not None:
        yield skip
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():  # follows symlinks; loops are cut by ``seen``
                if (skip := enter(entry.path)) is not None:
                    yield skip
            elif entry.is_file():
                yield Path(entry.path)
        except OSError as e:
            yield Skipped(entry.path, f"cannot read ({e.strerror})")


def _body_region(body_part: str | None) -> str | None:
    if not body_part:
        return None
    code = body_part.replace(" ", "").replace("_", "")
    return BODY_REGIONS.get(code, body_part.title())


def _plane(meta: dict[str, Any]) -> str | None:
    """Projection from ViewPosition, else axial/coronal/sagittal from ImageOrientationPatient."""
    view = meta.get("view")
    if view:
        return VIEW_PLANES.get(view, view)
    o = meta.get("orientation")
    if not o:
        return None
    r, c = o[:3], o[3:]  # row and column direction cosines
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])  # slice normal
    axis = max(range(3), key=lambda i: abs(n[i]))
    if abs(n[axis]) < 0.8:  # more than ~37 degrees off every main plane
        return "Oblique"
    return ("Sagittal", "Coronal", "Axial")[axis]  # normal along x (L-R), y (A-P), z (S-I)


def _study_date(meta: dict[str, Any]) -> str | None:
    if "study_year" in meta:
        return str(meta["study_year"])
    return meta.get("study_date_shifted")


def _reason(e: MedsearchError, name: str) -> str:
    """An error's message without the leading file name (Skipped.item already names the file)."""
    msg = e.message.removeprefix(f"{name}: ")
    return f"{msg} ({e.hint})" if e.hint else msg


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""
