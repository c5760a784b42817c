"""DICOM instances held in memory (pulled over DICOMweb, pushed over C-STORE) -> catalog items.

A PACS instance never touches the disk as it arrived. Its header goes through the same
whitelist as a DICOM tree (``medsearch.deid.safe_metadata``: pseudonymous study/series/instance
keys, no names, IDs or descriptions), and its pixels are rendered once, in memory, into a
de-identified 8-bit display image (VOI LUT / window, MONOCHROME1 inverted) that the home keeps
under ``HOME/images/<source>/<study_key>/<instance_key>.png``. That PNG is what the embedding
stage reads and what the API serves; the original file and its header are gone with the process.

    Dataset ─► safe_metadata ─► CaseRecord (one per study) + ImageRecord(path = display PNG)
            └► dicom_to_uint8 ─► PNG bytes ─► temp file + rename; fsynced per study (StudyItems.sync_files)

The C-STORE receiver splits the last step off (``render=False``): it keeps ``pixel_payload`` (the
pixel module and LUTs only) in its spool and renders in its ingest round (``render_payload``), where
``received_series`` also gives pushed slices their series record.

SR documents are not images: they yield report sections for their study (``indexer.sources.sr``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.config import ImagingConfig
from medsearch.deid import deid_method, safe_metadata
from medsearch.errors import InvalidInput, MedsearchError
from medsearch.imaging.png import encode_png
from medsearch.records import CaseRecord, ImageRecord, Skipped
from medsearch.studies import SeriesRecord

from .dicom import _int, _window  # the DICOM reader's tolerant integer parse and window

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

@dataclass
class StudyItems:
    """What one study contributes: its case, its images and the inputs that were refused."""

    case: CaseRecord | None = None
    series: list[SeriesRecord] = field(default_factory=list)  # the study's series (DICOMweb sync); their slices
    images: list[ImageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)  # display PNGs renamed into place, not yet fsynced

    def sync_files(self) -> None:
        """fsync the display PNGs written for this study (and their folders), all at once: call before the
        transaction that references them. Concurrent fsyncs share the file system's journal commits, so
        300 cost about what a few do (one at a time they were ~14 ms each here, a quarter of a sync)."""
        if not self.written:
            return
        from concurrent.futures import ThreadPoolExecutor

        from medsearch.fileio import fsync_path

        targets = [*self.written, *{p.parent for p in self.written}]
        with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
            list(pool.map(fsync_path, targets))
        self.written = []

    def items(self) -> list[Any]:
        """``ingest_items`` order: the case (with its report sections), each series record followed by the
        images of that series, the images of no recorded series, the skips, and the end of the study."""
        from indexer.sources.common import StudyDone

        out: list[Any] = []
        if self.case is not None:
            case = self.case
            if self.sections:
                from dataclasses import replace

                case = replace(case, sections={**case.sections, **self.sections})
            out.append(case)
        by_series: dict[str | None, list[ImageRecord]] = {}
        for im in self.images:
            by_series.setdefault(im.meta.get("series_key"), []).append(im)
        for rec in self.series:
            out.append(rec)
            out.extend(by_series.pop(rec.key, []))
        for rest in by_series.values():
            out.extend(rest)
        out.extend(self.skipped)
        if self.case is not None:
            out.append(StudyDone(self.case.key))
        return out


def display_dir(home: Path, source: str) -> Path:
    """Where the de-identified display images of a PACS source live in the home."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source) or "_"
    return Path(home) / "images" / safe


def is_sr(ds: Dataset) -> bool:
    """True for a text SR document (by SOP Class UID, or Modality SR)."""
    from indexer.sources.sr import is_sr as _is_sr

    return _is_sr(ds)


def study_key_of(ds: Dataset, salt: str) -> str | None:
    """The pseudonymous study key a DICOM tree ingest would give this instance's study."""
    return safe_metadata(ds, salt).get("study_key")


def add_instance(
    study: StudyItems,
    ds: Dataset,
    *,
    source: str,
    salt: str,
    out_dir: Path,
    name: str,
    dates: str = "remove",
    allow_burned_in: bool = False,
    deid_text: bool = True,
    config: ImagingConfig = ImagingConfig(),
    render: bool = True,
    on_image: Callable[[ImageRecord, np.ndarray], None] | None = None,
) -> None:
    """Turn one in-memory instance into items of ``study`` (rendering and storing its display PNG).

    ``name`` labels the instance in skip reasons (a pseudonymous key or a position, never a UID).
    A refused instance becomes a ``Skipped``; nothing is raised for bad input. SR text goes through
    the report scrubber (``medsearch.deid.scrub_sections``) unless ``deid_text`` is False.
    ``render=False`` checks the header only (within limits, a decoder, native pixel data of the
    right length) and leaves the PNG at the image's ``path`` to ``render_pixels`` later (the
    C-STORE receiver renders in its ingest round, not while the sender waits).
    ``on_image(record, pixels)`` receives each rendered image with its display pixels (the PNG's, bit for
    bit), so a caller can embed them without reading the PNG back (the DICOMweb sync does).
    """
    from indexer.sources.dicom import (
        LATERALITY,
        MODALITY_TYPES,
        NON_IMAGE_MODALITIES,
        _body_region,
        _plane,
        _study_date,
    )

    try:
        meta = safe_metadata(ds, salt, dates=dates)
    except Exception as e:  # a malformed header value
        study.skipped.append(Skipped(name, f"unreadable DICOM header value ({type(e).__name__})"))
        return
    study_key, instance_key = meta.get("study_key"), meta.get("instance_key")
    if not study_key or not instance_key:
        study.skipped.append(Skipped(name, "no StudyInstanceUID or SOPInstanceUID in the header"))
        return
    modality = str(ds.get("Modality") or "").strip().upper()
    modality_type = MODALITY_TYPES.get(modality, modality or None)
    body_region = _body_region(meta.get("body_part"))
    if study.case is None:
        labels = {k: v for k, v in (("modality_type", modality_type), ("body_region", body_region)) if v}
        study.case = CaseRecord(source=source, key=study_key, patient_key=meta.get("patient_key"), labels=labels,
                                meta={"format": "dicom", "deid": deid_method(dates), "origin": "pacs"})  # fmt: skip
    elif not study.case.labels.get("modality_type") and modality_type and modality not in NON_IMAGE_MODALITIES:
        from dataclasses import replace

        study.case = replace(study.case, labels={**study.case.labels, "modality_type": modality_type})
    if is_sr(ds):
        _add_sr(study, ds, name, deid_text)
        return
    if modality in NON_IMAGE_MODALITIES:
        study.skipped.append(Skipped(name, f"Modality {modality} is not a viewable image"))
        return
    if not allow_burned_in and str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        study.skipped.append(Skipped(name, "BurnedInAnnotation is YES: the pixels may show patient details"))
        return
    path = out_dir / study_key / f"{instance_key}.png"
    try:
        if render:
            arr, frame = render_array(ds, name, config)
            png = encode_png(arr)
        else:
            frame = check_pixels(ds, name, config)
    except MedsearchError as e:
        study.skipped.append(Skipped(name, e.message.removeprefix(f"{name}: ")))
        return
    if render:
        write_png(path, png)
        study.written.append(path)
    if (pos := _position(ds)) is not None:
        meta["position"] = pos
    if (n := _int(ds.get("InstanceNumber"))) is not None:
        meta["instance_number"] = n
    if (n := _int(ds.get("SeriesNumber"))) is not None:
        meta["series_number"] = n
    if (w := _window(ds)) is not None:
        meta["window"] = list(w)
    meta["rendered"] = {"frame": frame, "format": "png"}
    rec = ImageRecord(
        source=source, key=instance_key, case_key=study_key, path=str(path), frame=None,
        modality_type=modality_type, modality=modality or None, plane=_plane(meta), body_region=body_region,
        location=meta["body_part"].title() if meta.get("body_part") else None,
        laterality=LATERALITY.get(meta.get("laterality", "")), study_date=_study_date(meta), meta=meta,
    )  # fmt: skip
    study.images.append(rec)
    if render and on_image is not None:
        on_image(rec, arr)


def write_png(path: Path, png: bytes) -> None:
    """Put a display PNG in place atomically (temp file, rename); durable only after ``StudyItems.sync_files``."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_png(ds: Dataset, name: str, config: ImagingConfig = ImagingConfig()) -> tuple[bytes, int | None]:
    """The display image of one instance (middle frame of a multi-frame one) as PNG bytes, and that frame."""
    arr, frame = render_array(ds, name, config)
    return encode_png(arr), frame


def render_array(ds: Dataset, name: str, config: ImagingConfig = ImagingConfig()) -> tuple[np.ndarray, int | None]:
    """The display image of one instance as ``(rows, cols)`` or ``(rows, cols, 3)`` uint8, and its frame."""
    from medsearch.imaging import dicom_to_uint8, require_dicom_decoder, validate_dicom_header

    n_frames = validate_dicom_header(ds, name, config)
    require_dicom_decoder(ds, name)
    frame = n_frames // 2 if n_frames > 1 else None
    try:
        arr = dicom_to_uint8(ds, frame, config, name=name)
    except MedsearchError:
        raise
    except Exception as e:  # pixel data that does not decode
        raise InvalidInput(f"{name}: pixel data does not decode ({type(e).__name__})", hint="check the sender") from e
    return arr, frame


def check_pixels(ds: Dataset, name: str, config: ImagingConfig = ImagingConfig()) -> int | None:
    """What rendering would refuse that a header shows: an image within limits, a decoder for its
    transfer syntax, native pixel data as long as the header says. Returns the frame to render."""
    from medsearch.imaging import require_dicom_decoder, validate_dicom_header

    n_frames = validate_dicom_header(ds, name, config)
    require_dicom_decoder(ds, name)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in ds and (ts is None or not ts.is_compressed):
        rows, cols = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
        spp, bits = _int(ds.get("SamplesPerPixel")) or 1, _int(ds.get("BitsAllocated")) or 8
        want = (rows * cols * spp * n_frames * bits + 7) // 8
        have = len(ds.PixelData or b"")
        if have < want:
            raise InvalidInput(f"{name}: pixel data is {have} bytes; the header describes {want}",
                               hint="the sender cut the pixel data short; send the instance again")  # fmt: skip
    return n_frames // 2 if n_frames > 1 else None


# What rendering reads of a data set (pixel module, modality and VOI LUTs, palettes): nothing that
# names or dates a patient. Modality and BodyPartExamined pick a CT window preset.
PIXEL_KEYWORDS = (
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelPaddingValue",
    "PixelPaddingRangeLimit", "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "Modality", "BodyPartExamined",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
)  # fmt: skip


def pixel_payload(ds: Dataset) -> tuple[str, bytes]:
    """(transfer syntax UID, bytes) of a data set holding only ``PIXEL_KEYWORDS``: what a spool keeps
    of a received image until it is rendered (no UID, name, date or description)."""
    import pydicom
    from pydicom.dataset import Dataset as _Dataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ts = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ExplicitVRLittleEndian))
    out = _Dataset()
    for kw in PIXEL_KEYWORDS:
        if kw in ds:
            out[kw] = ds[kw]
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, out, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
    return str(ts), buf.getvalue()


def render_payload(ts: str, data: bytes, path: Path, name: str, config: ImagingConfig = ImagingConfig()) -> None:
    """Render a ``pixel_payload`` to its display PNG at ``path`` (raises ``MedsearchError`` for bad pixels)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    png, _ = render_png(ds, name, config)
    write_png(path, png)


def received_series(source: str, case_key: str, series_key: str, slices: list[tuple[str, dict[str, Any]]]) -> SeriesRecord:
    """The series record of pushed slices, (image key, image meta) each: ordered as the DICOM tree reader
    orders a series (position along its normal, else InstanceNumber), every slice embedded."""
    from indexer.sources.dicom import _body_region, _plane
    from medsearch.imaging.windows import preset_for
    from medsearch.studies import SliceRef, median_spacing, order_slices

    def floats(m: dict[str, Any], k: str, n: int) -> tuple[float, ...] | None:
        v = m.get(k)
        return tuple(float(x) for x in v) if isinstance(v, list) and len(v) == n else None

    metas = [m for _, m in slices]
    so = order_slices([floats(m, "orientation", 6) for m in metas], [floats(m, "position", 3) for m in metas],
                      [m.get("instance_number") for m in metas])  # fmt: skip
    refs = tuple(SliceRef(slices[idx][0], rank, so.positions[rank] if so.positions else None, True)
                 for rank, idx in enumerate(so.order))  # fmt: skip
    head = metas[so.order[0]]
    modality = head.get("modality")
    body_part = head.get("body_part")
    window = tuple(head["window"]) if isinstance(head.get("window"), list) and len(head["window"]) == 2 else None
    pos = so.positions
    return SeriesRecord(
        source=source, key=series_key, case_key=case_key, number=head.get("series_number"), modality=modality,
        body_part=body_part, body_region=_body_region(body_part), plane=_plane(head),
        orientation=floats(head, "orientation", 6) if pos else None, slice_count=len(refs),
        thickness=head.get("slice_thickness"), spacing=median_spacing(pos),
        position_range=(pos[0], pos[-1]) if pos else None, ordered_by=so.ordered_by, order_note=so.note,
        window=window, preset=preset_for(body_part) if modality == "CT" and window is None else None, slices=refs,
    )  # fmt: skip


def _add_sr(study: StudyItems, ds: Dataset, name: str, deid_text: bool) -> None:
    from dataclasses import replace

    from indexer.sources.sr import sr_report

    try:
        report = sr_report(ds, name=name)
        sections, redactions = report.scrubbed() if deid_text else (report.sections, 0)
    except MedsearchError as e:
        study.skipped.append(Skipped(name, f"SR document not understood ({e.message.removeprefix(name + ': ')})"))
        return
    if study.case is not None and sections:
        meta = {**study.case.meta, "report_source": "sr", "report_scrubbed": bool(deid_text)}
        if redactions:
            meta["report_redactions"] = int(meta.get("report_redactions", 0)) + redactions
        study.case = replace(study.case, meta=meta)
    for section, text in sections.items():
        if text.strip():
            prev = study.sections.get(section)
            study.sections[section] = f"{prev}\n{text}" if prev else text


def _position(ds: Dataset) -> list[float] | None:
    v = ds.get("ImagePositionPatient")
    try:
        return [round(float(x), 3) for x in v] if v is not None and len(v) == 3 else None
    except (TypeError, ValueError):
        return None



def iter_items(studies: Iterable[StudyItems]) -> Iterable[CaseRecord | ImageRecord | Skipped]:
    for s in studies:
        yield from s.items()
