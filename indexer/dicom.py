"""DICOM reader: a file or a folder tree -> CaseRecord (one per study) / ImageRecord / Skipped.

Only headers are read here (``stop_before_pixels=True``); pixels are decoded later by
``medsearch.imaging.load_image``. Everything stored comes from ``medsearch.deid.safe_metadata``
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

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsearch.config import ImagingConfig
from medsearch.deid import DATE_MODES, deid_method, safe_metadata
from medsearch.errors import InvalidInput, MedsearchError, NotFound
from medsearch.imaging import is_dicom_file, require_dicom_decoder, validate_dicom_header
from medsearch.records import CaseRecord, ImageRecord, Skipped

Item = CaseRecord | ImageRecord | Skipped

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


def iter_dicom(
    root: Path,
    source: str,
    salt: str,
    frames: str = "middle",
    *,
    dates: str = "remove",
    allow_burned_in: bool = False,
    config: ImagingConfig = ImagingConfig(),
) -> Iterator[Item]:
    """Stream a DICOM file or folder tree as cases (one per study, before its images), images and skips.

    ``frames``: ``"middle"`` (one record per file, the middle frame of a multi-frame file),
    ``"first"``, or ``"all"`` (one record per frame, keys ``{instance_key}#f{n}``).
    ``salt`` keys the pseudonyms and must not be empty. Unreadable files become ``Skipped``.
    """
    root = Path(root)
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
    return _iter(root, source, salt, frames, dates, allow_burned_in, config)


def _iter(
    root: Path, source: str, salt: str, frames: str, dates: str, allow_burned_in: bool, config: ImagingConfig
) -> Iterator[Item]:
    method = deid_method(dates)
    seen_studies: set[str] = set()
    seen_instances: set[str] = set()
    files = iter([root]) if root.is_file() else _walk(root)
    for f in files:
        if isinstance(f, Skipped):
            yield f
            continue
        if f != root and not is_dicom_file(f):
            continue  # not DICOM: other readers handle PNG/JPEG/...
        yield from _read_one(f, source, salt, frames, dates, allow_burned_in, config, method,
                             seen_studies, seen_instances)  # fmt: skip


def _read_one(
    path: Path,
    source: str,
    salt: str,
    frames: str,
    dates: str,
    allow_burned_in: bool,
    config: ImagingConfig,
    method: str,
    seen_studies: set[str],
    seen_instances: set[str],
) -> Iterator[Item]:
    import pydicom

    name = str(path)
    if path.name.upper() == "DICOMDIR":
        yield Skipped(name, "DICOMDIR: a directory index, not an image")
        return
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types on broken files; one bad file must not stop a tree
        yield Skipped(name, f"unreadable DICOM header ({type(e).__name__}: {_gist(e)})")
        return
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        yield Skipped(name, f"Modality {modality} is not a viewable image")
        return
    try:
        n_frames = validate_dicom_header(ds, name, config, require_pixels=False)
        require_dicom_decoder(ds, name)
    except MedsearchError as e:
        yield Skipped(name, _reason(e, name))
        return
    if not allow_burned_in and str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        yield Skipped(name, "BurnedInAnnotation is YES: the pixels may show patient details")
        return
    try:
        meta = safe_metadata(ds, salt, dates=dates)
    except Exception as e:  # a malformed header value
        yield Skipped(name, f"unreadable DICOM header value ({type(e).__name__}: {_gist(e)})")
        return
    study_key, instance_key = meta.get("study_key"), meta.get("instance_key")
    if not study_key:
        yield Skipped(name, "no StudyInstanceUID in the header")
        return
    if not instance_key:
        yield Skipped(name, "no SOPInstanceUID in the header")
        return
    if instance_key in seen_instances:
        yield Skipped(name, "same SOPInstanceUID as a file already read (a copy)")
        return
    seen_instances.add(instance_key)

    modality_type = MODALITY_TYPES.get(modality, modality or None)
    body_part = meta.get("body_part")
    body_region = _body_region(body_part)
    if study_key not in seen_studies:
        seen_studies.add(study_key)
        labels = {k: v for k, v in (("modality_type", modality_type), ("body_region", body_region)) if v}
        yield CaseRecord(
            source=source,
            key=study_key,
            patient_key=meta.get("patient_key"),
            labels=labels,
            meta={"format": "dicom", "deid": method},
        )

    common: dict[str, Any] = {
        "source": source,
        "case_key": study_key,
        "path": str(path.absolute()),
        "modality_type": modality_type,
        "modality": modality or None,
        "plane": _plane(meta),
        "body_region": body_region,
        "location": body_part.title() if body_part else None,
        "laterality": LATERALITY.get(meta.get("laterality", "")),
        "study_date": _study_date(meta),
        "meta": meta,
    }
    if n_frames == 1:
        yield ImageRecord(key=instance_key, frame=None, **common)
    elif frames == "all":
        for n in range(n_frames):
            yield ImageRecord(key=f"{instance_key}#f{n}", frame=n, **common)
    else:
        yield ImageRecord(key=instance_key, frame=n_frames // 2 if frames == "middle" else 0, **common)


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
