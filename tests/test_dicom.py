"""indexer.sources (DICOM): a DICOM tree built from pydicom's bundled samples -> cases, images, skips."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from indexer.sources.dicom import _plane
from indexer.sources.series import iter_dicom
from medsearch.deid import safe_metadata
from medsearch.errors import InvalidInput, NotFound
from medsearch.imaging import load_image
from medsearch.records import CaseRecord, ImageRecord, Skipped

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SALT = "tree-salt"


def sample(name: str) -> Path:
    """A DICOM file that ships inside the pydicom wheel (never downloaded)."""
    base = get_testdata_file("CT_small.dcm", download=False)
    assert base is not None
    path = Path(base).parent / name
    assert path.is_file(), f"pydicom sample {name} is not bundled"
    return path


# neutral file names, so that nothing in a path can carry a sample's patient name or ID
LAYOUT = {
    "a/ct_small.dcm": "CT_small.dcm",
    "a/x1": "dicomdirtests/77654033/CR1/6154",  # no extension: found by the DICM preamble
    "b/mr.dcm": "MR_small.dcm",
    "c/x2": "dicomdirtests/77654033/CT2/17106",  # same patient, another study
    "c/deep/er/x3": "dicomdirtests/77654033/CR2/6247",  # same study as a/x1, in another folder
    "d/us_multi.dcm": "examples_ybr_color.dcm",  # 30 frames
    "d/ct_peter.dcm": "dicomdirtests/98892001/CT2N/6293",
    "d/mr_peter.dcm": "dicomdirtests/98892003/MR1/4919",
    "e/report.dcm": "reportsi.dcm",  # SR: no pixels
    "e/dose.dcm": "rtdose.dcm",  # RTDOSE: pixels, but not an image
    "e/dup.dcm": "MR_small_RLE.dcm",  # same SOPInstanceUID as b/mr.dcm
    ".hidden/ct.dcm": "CT_small.dcm",  # hidden folders are ignored
}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    for rel, src in LAYOUT.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample(src), dst)
    (root / "e" / "notes.txt").write_text("not DICOM, ignored")
    (root / "e" / "fake.dcm").write_text("this is text, named .dcm")
    os.symlink(root, root / "a" / "loop")  # a symlink loop back to the top
    return root


def run(root: Path, **kw) -> list[CaseRecord | ImageRecord | Skipped]:
    """Cases, images and skips (series records and study ends are tested in test_studies.py)."""
    items = iter_dicom(root, source="pacs", salt=kw.pop("salt", SALT), **kw)
    return [i for i in items if isinstance(i, CaseRecord | ImageRecord | Skipped)]


def by_name(items, root: Path) -> dict[str, ImageRecord]:
    return {str(Path(i.path).relative_to(root)): i for i in items if isinstance(i, ImageRecord)}


def test_cases_come_once_and_before_their_images(tree):
    items = run(tree)
    cases: list[str] = []
    for it in items:
        if isinstance(it, CaseRecord):
            assert it.key not in cases, "a study was yielded twice"
            cases.append(it.key)
            assert it.sections == {} and it.meta["format"] == "dicom" and "PS3.15" in it.meta["deid"]
        elif isinstance(it, ImageRecord):
            assert it.case_key in cases, "an image came before its case"
    images = by_name(items, tree)
    assert set(images) == {"a/ct_small.dcm", "a/x1", "b/mr.dcm", "c/x2", "c/deep/er/x3", "d/us_multi.dcm",
                           "d/ct_peter.dcm", "d/mr_peter.dcm"}  # fmt: skip
    assert len(cases) == 7  # x1 and x3 share one study
    assert images["a/x1"].case_key == images["c/deep/er/x3"].case_key
    assert images["a/x1"].case_key != images["c/x2"].case_key
    assert all(i.source == "pacs" and Path(i.path).is_absolute() for i in images.values())


def test_skips_carry_reasons(tree):
    skipped = {str(Path(s.item).relative_to(tree)): s.reason for s in run(tree) if isinstance(s, Skipped)}
    assert set(skipped) == {"e/report.dcm", "e/dose.dcm", "e/dup.dcm", "e/fake.dcm"}
    assert "SR" in skipped["e/report.dcm"]
    assert "RTDOSE" in skipped["e/dose.dcm"]
    assert "SOPInstanceUID" in skipped["e/dup.dcm"]
    assert "Rows/Columns" in skipped["e/fake.dcm"] or "unreadable" in skipped["e/fake.dcm"]


def test_fields_mapped_from_the_header(tree):
    images = by_name(run(tree), tree)
    cr = images["a/x1"]
    assert (cr.modality_type, cr.modality, cr.body_region, cr.location, cr.plane) == (
        "X-ray", "CR", "Spine and Muscles", "Cspine", "Lateral")  # fmt: skip
    assert images["c/deep/er/x3"].plane == "AP"
    ct = images["c/x2"]
    assert (ct.modality_type, ct.body_region, ct.plane) == ("CT", "Head", "Axial")
    assert images["d/ct_peter.dcm"].plane == "Sagittal"  # from ImageOrientationPatient
    assert images["d/mr_peter.dcm"].plane == "Sagittal"
    assert images["a/ct_small.dcm"].plane == "Axial"
    assert images["d/us_multi.dcm"].modality_type == "US"
    assert all(i.study_date is None for i in images.values())  # dates removed by default
    assert images["a/x1"].meta["view"] == "LL" and "patient_key" in images["a/x1"].meta


def test_frames_middle_first_all(tree):
    images = by_name(run(tree), tree)
    us = images["d/us_multi.dcm"]
    assert us.frame == 15 and "#" not in us.key  # middle of 30 frames
    assert images["b/mr.dcm"].frame is None  # single frame
    assert by_name(run(tree, frames="first"), tree)["d/us_multi.dcm"].frame == 0
    all_frames = [i for i in run(tree, frames="all") if isinstance(i, ImageRecord) and i.path.endswith("us_multi.dcm")]
    assert [i.frame for i in all_frames] == list(range(30))
    assert [i.key for i in all_frames] == [f"{us.key}#f{n}" for n in range(30)]
    # the records point at decodable pixels
    im = load_image(us.path, frame=us.frame)
    assert im.mode == "RGB" and im.size == (320, 240)
    assert np.asarray(load_image(images["a/x1"].path)).shape == (16, 16)


def test_no_phi_in_any_record(tree):
    items = run(tree, dates="shift")
    text = json.dumps([dataclasses.asdict(i) for i in items], default=str)
    for src in LAYOUT.values():
        ds = pydicom.dcmread(sample(src), stop_before_pixels=True)
        values = [str(ds.get(k) or "").strip() for k in ("PatientName", "PatientID", "StudyInstanceUID",
                                                         "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber")]  # fmt: skip
        values += str(ds.get("PatientName") or "").split("^")
        for v in values:  # as a whole token: a 3-digit AccessionNumber may occur inside a hex key
            if len(v) >= 6:
                assert v not in text, f"{v!r} from {src} leaked"
            if len(v) >= 3:
                assert not re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w.-])", text), f"{v!r} from {src} leaked"


def test_keys_are_pseudonyms_stable_per_salt(tree):
    images = by_name(run(tree), tree)
    again = by_name(run(tree), tree)
    other = by_name(run(tree, salt="other-salt"), tree)
    for rel, rec in images.items():
        assert again[rel].key == rec.key and again[rel].case_key == rec.case_key
        assert other[rel].key != rec.key and other[rel].case_key != rec.case_key
    ds = pydicom.dcmread(tree / "b" / "mr.dcm", stop_before_pixels=True)
    meta = safe_metadata(ds, SALT)
    assert images["b/mr.dcm"].key == meta["instance_key"] and images["b/mr.dcm"].case_key == meta["study_key"]
    cases = {c.key: c for c in run(tree) if isinstance(c, CaseRecord)}
    x1, x2 = images["a/x1"], images["c/x2"]
    assert cases[x1.case_key].patient_key == cases[x2.case_key].patient_key  # same patient, two studies
    assert cases[x1.case_key].labels == {"modality_type": "X-ray", "body_region": "Spine and Muscles"}


def test_date_modes(tree):
    year = by_name(run(tree, dates="year"), tree)
    assert year["a/ct_small.dcm"].study_date == "2004"
    shifted = by_name(run(tree, dates="shift"), tree)
    d = shifted["d/ct_peter.dcm"].study_date
    assert d and d != "2001-01-01" and len(d) == 10


def test_single_file_and_argument_errors(tree, tmp_path):
    items = run(tree / "b" / "mr.dcm")
    assert [type(i) for i in items] == [CaseRecord, ImageRecord]
    with pytest.raises(InvalidInput, match="middle, first, all"):
        run(tree, frames="some")
    with pytest.raises(InvalidInput, match="salt"):
        run(tree, salt="")
    with pytest.raises(NotFound):
        run(tmp_path / "missing")


def test_burned_in_annotation_is_skipped_unless_allowed(tmp_path):
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    [skip] = run(tmp_path)
    assert isinstance(skip, Skipped) and "BurnedInAnnotation" in skip.reason
    assert [type(i) for i in run(tmp_path, allow_burned_in=True)] == [CaseRecord, ImageRecord]


def test_undecodable_transfer_syntax_is_skipped(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\0" * 16])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    [skip] = run(tmp_path)
    assert isinstance(skip, Skipped) and "MPEG2" in skip.reason


def test_plane_from_orientation():
    assert _plane({"orientation": [1, 0, 0, 0, 1, 0]}) == "Axial"
    assert _plane({"orientation": [1, 0, 0, 0, 0, -1]}) == "Coronal"
    assert _plane({"orientation": [0, 1, 0, 0, 0, -1]}) == "Sagittal"
    assert _plane({"orientation": [1, 0, 0, 0, 0.7071, 0.7071]}) == "Oblique"  # 45 degrees
    assert _plane({"view": "PA", "orientation": [1, 0, 0, 0, 1, 0]}) == "PA"
    assert _plane({}) is None
