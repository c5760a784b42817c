"""DICOM studies for the PACS tests, built from the real pixels of medpix-2.0 CT images.

Each study is a CT series with proper geometry (axial ImageOrientationPatient, ImagePositionPatient
stepping along z, SliceThickness, PixelSpacing), rescale slope/intercept to Hounsfield units, a
window, and identifiers planted in patient, physician, institution, description, comment, private
and nested-sequence attributes, so a test can assert that none of them reach the home.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MEDPIX = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medpix-2.0"

PLANTED = {
    "PatientName": "Doe^Janet^Q",
    "PatientID": "MRN-88412731",
    "OtherPatientIDs": "ALT-5550123",
    "PatientBirthDate": "19510317",
    "PatientAddress": "12 Elm Street, Springfield",
    "ReferringPhysicianName": "Strange^Stephen",
    "PerformingPhysicianName": "House^Gregory",
    "InstitutionName": "Saint Elsewhere Hospital",
    "InstitutionAddress": "1 Hospital Road, Metropolis",
    "StudyDescription": "CT CHEST for Janet Doe",
    "SeriesDescription": "AXIAL lung Doe",
    "ImageComments": "patient Janet Doe MRN-88412731 called 555-0142",
    "AccessionNumber": "ACC20240117001",
    "StudyID": "STUDY-4471",
    "OperatorsName": "Tech^Terry",
}
PRIVATE_TEXT = "PRIVATE-Janet-Doe-88412731"
NESTED_NAME = "Nested^Nora"


def ct_pixels(n: int, size: int = 128) -> list[np.ndarray]:
    """``n`` real CT images from medpix-2.0 as 2-D uint8 arrays (cycled when there are fewer)."""
    from PIL import Image

    files = []
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("modality_type") == "CT":
                files.append(MEDPIX / rec["file"])
            if len(files) >= min(n, 40):
                break
    return [np.asarray(Image.open(files[i % len(files)]).convert("L").resize((size, size))) for i in range(n)]


def ct_series(
    n_slices: int,
    *,
    study_uid: str,
    series_uid: str,
    series_number: int = 1,
    patient: dict[str, str] | None = None,
    study_date: str = "20240117",
    body_part: str = "CHEST",
    z0: float = -100.0,
    spacing: float = 2.5,
    shuffle_numbers: bool = True,
    size: int = 128,
) -> list:
    """A CT series of ``n_slices`` pydicom Datasets with geometry, rescale, window and planted PHI.

    InstanceNumber is deliberately not in z order (``shuffle_numbers``) so a test can tell slice
    ordering by position from ordering by number.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    planted = {**PLANTED, **(patient or {})}
    rng = np.random.default_rng(series_number)
    numbers = rng.permutation(n_slices) + 1 if shuffle_numbers else np.arange(n_slices) + 1
    out = []
    for i, px in enumerate(ct_pixels(n_slices, size)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.BodyPartExamined = "CT", body_part
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = "101500"
        ds.SeriesNumber, ds.InstanceNumber = series_number, int(numbers[i])
        for k, v in planted.items():
            setattr(ds, k, v)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-160.0, -160.0, z0 + i * spacing]
        ds.SliceThickness, ds.PixelSpacing = spacing, [2.5, 2.5]
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        hu = px.astype(np.int32) * 8  # 0..2040 stored -> -1024..1016 HU
        ds.PixelData = hu.astype(np.uint16).tobytes()
        block = ds.private_block(0x0011, "MEDSEARCH TEST", create=True)
        block.add_new(0x01, "LO", PRIVATE_TEXT)
        item = Dataset()
        item.PatientName = NESTED_NAME
        item.CodeMeaning = "referral from Dr. Nora Nested"
        ds.RequestAttributesSequence = Sequence([item])
        out.append(ds)
    return out


def write_series(datasets: list, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"slice{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def planted_strings() -> list[str]:
    """Every planted identifier, as it could appear in text."""
    vals = [v for v in PLANTED.values()] + [PRIVATE_TEXT, NESTED_NAME, "Janet", "88412731"]
    return [v.replace("^", " ") for v in vals] + [v for v in vals if "^" in v]
