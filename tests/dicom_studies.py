"""Test data for DICOM studies, made here from real pixels.

* ``ct_series``: a CT series built from a real medpix-2.0 PNG (grey values -> Hounsfield units through
  RescaleSlope/Intercept), with proper geometry (ImageOrientationPatient, ImagePositionPatient along
  the normal, SliceThickness, PixelSpacing), a window, shuffled file names and InstanceNumbers that do
  NOT follow the position order (so only position ordering gets it right). Each slice is the source
  image shifted a little, so neighbouring slices differ like a real volume's.
* ``pydicom_mr``: copies of pydicom's own ``dicomdirtests`` MR/CT series (real multi-slice data).
* Every file carries planted identifiers (``PLANTED``) in patient, physician, institution,
  description, comment, private and nested-sequence attributes; ``plant`` adds them to any dataset.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"

# Values planted in every file; none may reach the catalog (tests dump every table and look).
PLANTED = {
    "PatientName": "Plantedname^Jane",
    "PatientID": "MRN7731234",
    "OtherPatientIDs": "OTHERID5566",
    "PatientBirthDate": "19470203",
    "PatientAddress": "12 Plantedstreet, Springfield",
    "ReferringPhysicianName": "Drhouse^Gregory",
    "PerformingPhysicianName": "Drwho^Planted",
    "InstitutionName": "Saint Planted Hospital",
    "InstitutionAddress": "1 Hospital Plantedroad",
    "StationName": "PLANTEDSTATION",
    "AccessionNumber": "ACC99887766",
    "StudyID": "STUDYID4242",
    "StudyDescription": "CT for Jane Plantedname MRN7731234",
    "SeriesDescription": "series of Plantedname",
    "ImageComments": "call Jane Plantedname at 555-0199",
}
PLANTED_PRIVATE = "private Plantedname secret"
PLANTED_NESTED = "nested Plantedname request"


def medpix_pngs(modality: str = "CT", n: int = 4, region: str | None = None) -> list[Path]:
    """Paths of ``n`` medpix PNGs of one modality (different cases), in file order."""
    import json

    out: list[Path] = []
    seen: set[str] = set()
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["modality_type"] != modality or r["case_id"] in seen:
                continue
            if region and r.get("location_category") != region:
                continue
            seen.add(r["case_id"])
            out.append(MEDPIX / r["file"])
            if len(out) >= n:
                break
    return out


def uid(prefix: str = "1.2.826.0.1.3680043.10.999") -> str:
    """A fresh DICOM UID (pydicom's generator under a test root)."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix=prefix + ".")


def plant(ds) -> None:
    """Add the planted identifiers to a dataset: standard, private and nested attributes."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    for kw, value in PLANTED.items():
        setattr(ds, kw, value)
    block = ds.private_block(0x0011, "PLANTED CREATOR", create=True)
    block.add_new(0x01, "LO", PLANTED_PRIVATE)
    item = Dataset()
    item.RequestedProcedureDescription = PLANTED_NESTED
    item.AccessionNumber = PLANTED["AccessionNumber"]
    ds.RequestAttributesSequence = Sequence([item])


def ct_series(
    dst: Path,
    png: Path,
    *,
    n_slices: int = 12,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    body_part: str = "CHEST",
    spacing: float = 2.5,
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    window: tuple[float, float] | None = (40.0, 400.0),
    size: int | None = None,
    shift: int = 0,
    geometry: str = "ok",
    seed: int = 0,
) -> dict:
    """Write a CT series into ``dst`` (created); returns its uids and files in true slice order.

    ``geometry``: "ok"; "missing" (two slices lose ImagePositionPatient); "tilted" (one slice gets
    another ImageOrientationPatient). ``shift`` offsets every slice's pixels (another "acquisition").
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    rng = random.Random(seed)
    dst.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or uid()
    series_uid = series_uid or uid()
    grey = Image.open(png).convert("L")
    if size:
        grey = grey.resize((size, size))
    base = np.asarray(grey, dtype=np.int32)  # (rows, cols) 0..255
    rows, cols = base.shape
    o = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(o[:3], o[3:])
    origin = np.array([-cols / 2.0, -rows / 2.0, -100.0])
    numbers = list(range(1, n_slices + 1))
    rng.shuffle(numbers)  # InstanceNumber does not follow the position order
    files: list[Path] = []
    sop_uids: list[str] = []
    for i in range(n_slices):
        hu = np.roll(base, shift + (i - n_slices // 2), axis=0) * 8 - 1024  # (rows, cols) HU, -1024..1016
        stored = (hu + 1024).astype(np.uint16)  # RescaleIntercept -1024, slope 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = dst / f"{rng.getrandbits(40):010x}.dcm"  # file names in no particular order
        ds = FileDataset(str(name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.BodyPartExamined = "CT", body_part
        ds.SeriesNumber, ds.InstanceNumber = series_number, numbers[i]
        ds.FrameOfReferenceUID = uid()
        iop = list(orientation)
        if geometry == "tilted" and i == n_slices // 2:
            iop = [1.0, 0.0, 0.0, 0.0, 0.9, 0.43589]  # about 26 degrees off
        ds.ImageOrientationPatient = iop
        if not (geometry == "missing" and i in (1, 2)):
            ds.ImagePositionPatient = [float(x) for x in origin + i * spacing * normal]
        ds.SliceThickness, ds.PixelSpacing = spacing, [1.0, 1.0]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = stored.tobytes()
        plant(ds)
        ds.save_as(name, enforce_file_format=True)
        files.append(name)
        sop_uids.append(sop)
    return {"study_uid": study_uid, "series_uid": series_uid, "files": files, "sop_uids": sop_uids,
            "numbers": numbers}  # fmt: skip


def pydicom_series(dst: Path, rel: str) -> list[Path]:
    """Copy one of pydicom's bundled ``dicomdirtests`` folders (real multi-slice series), identifiers planted."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm", download=False)).parent / "dicomdirtests" / rel
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        plant(ds)
        target = dst / f"{f.name}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
