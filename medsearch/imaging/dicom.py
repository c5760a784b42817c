"""DICOM decoding: header checks, decoder availability, pixel data -> modality units -> 8 bit."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from medsearch.config import ImagingConfig
from medsearch.errors import InvalidImage, InvalidInput

from ._guards import _REEXPORT, _check_pixels, _first_line, _to_uint8
from .windows import _functional, _voi, voi_window
from .windows import window as _window

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_BYTES = 64 * 1024  # DICOM values above this size are read lazily (pixel data, big private blobs)

# Which pip packages decode which compressed transfer syntaxes (pydicom's plugins).
_JPEG_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # fmt: skip
_J2K_TS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
           "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
           "1.2.840.10008.1.2.4.203"}  # fmt: skip
_RLE_TS = {"1.2.840.10008.1.2.5"}


def validate_dicom_header(
    ds: Dataset, name: str = "dataset", config: ImagingConfig = ImagingConfig(), *, require_pixels: bool = True
) -> int:
    """Check a DICOM header describes a decodable image within limits; return its number of frames.

    ``require_pixels=False`` for headers read with ``stop_before_pixels=True`` (pixel data unseen).
    """
    if require_pixels and not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = f" (Modality {ds.get('Modality')})" if ds.get("Modality") else ""
        raise InvalidImage(
            f"{name}: DICOM file has no pixel data{kind}",
            hint="only image objects (CT, MR, CR/DX, US, ...) can be shown or searched; reports, RT plans "
            "and other non-image objects are skipped",
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise InvalidImage(
            f"{name}: DICOM header has no Rows/Columns, so it does not describe an image",
            hint="check the file is an image object and not a report or a DICOMDIR",
        )
    _check_pixels(int(cols), int(rows), name, config)
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise InvalidImage(
            f"{name}: invalid NumberOfFrames {ds.get('NumberOfFrames')!r} in the DICOM header",
            hint="the header is corrupt; re-export the series from the PACS",
        )
    return max(1, n_frames)


def require_dicom_decoder(ds: Dataset, name: str = "dataset") -> None:
    """Raise ``InvalidImage`` naming the package to install when the transfer syntax cannot be decoded here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = _transfer_syntax(ds)
    if ts is None:
        return  # no file meta: native encoding inferred when decoding
    uid = UID(ts)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InvalidImage(
            f"{name}: pixel data uses transfer syntax {uid.name} ({uid}), which pydicom cannot decode",
            hint="convert the file to an uncompressed or JPEG/JPEG 2000 syntax first (e.g. `gdcmconv --raw`)",
        )
    if not decoder.is_available:
        if uid in _J2K_TS:
            pkgs = "pylibjpeg pylibjpeg-openjpeg"
        elif uid in _JPEG_TS:
            pkgs = "pylibjpeg pylibjpeg-libjpeg"
        elif uid in _RLE_TS:
            pkgs = "pylibjpeg pylibjpeg-rle"
        else:
            pkgs = "python-gdcm"
        raise InvalidImage(
            f"{name}: pixel data is compressed with {uid.name} ({uid}) and no decoder for it is installed",
            hint=f"pip install {pkgs} (or python-gdcm); pydicom lists: {'; '.join(decoder.missing_dependencies)}",
        )


def dicom_array(
    ds: Dataset, frame: int | None = None, config: ImagingConfig = ImagingConfig(), name: str = "dataset"
) -> np.ndarray:
    """Decode one frame and apply the Modality LUT / rescale.

    Returns ``(rows, cols)`` float64 in modality units (Hounsfield units for CT) for grayscale
    data, or ``(rows, cols, 3)`` RGB in stored units for colour (PALETTE COLOR already mapped).
    ``frame`` defaults to the middle frame. No VOI/windowing is applied here.
    """
    n_frames = validate_dicom_header(ds, name, config)
    return _dicom_array(ds, _pick_frame(frame, n_frames, name), n_frames, name)


def dicom_to_uint8(
    ds: Dataset,
    frame: int | None = None,
    config: ImagingConfig = ImagingConfig(),
    name: str = "dataset",
    window: str | tuple[float, float] | None = None,
) -> np.ndarray:
    """One DICOM frame as display-ready uint8: ``(rows, cols)`` grayscale or ``(rows, cols, 3)`` RGB.

    ``window``: a preset name (``PRESETS``) or (center, width) that replaces the file's own window
    for grayscale data; ``None`` keeps the order described in ``windows._voi``.
    """
    n_frames = validate_dicom_header(ds, name, config)
    index = _pick_frame(frame, n_frames, name)
    pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    w = None if pi == "PALETTE COLOR" or "ModalityLUTSequence" in ds else voi_window(ds, index, config, window)
    if w is not None:  # a window over rescaled values: a table over the stored values
        require_dicom_decoder(ds, name)
        raw = _decode(ds, index if n_frames > 1 else None, name)  # (rows, cols) or (rows, cols, 3)
        out = _windowed(raw, ds, index, name, w) if raw.ndim == 2 else None
        if out is not None:
            return 255 - out if pi == "MONOCHROME1" else out
        arr = raw if raw.ndim == 3 else _modality(raw, ds, index, name)
    else:
        arr = _dicom_array(ds, index, n_frames, name)
    if arr.ndim == 3:  # colour (rows, cols, 3): scale the stored range to 8 bit
        bits = _palette_bits(ds) if pi == "PALETTE COLOR" else int(ds.get("BitsStored") or 8)
        if arr.dtype == np.uint8 and bits <= 8:
            return np.ascontiguousarray(arr)
        return _to_uint8(arr.astype(np.float64) * (255.0 / (2.0**bits - 1)))
    out = _voi(arr, ds, index, config, window)  # (rows, cols) uint8
    if pi == "MONOCHROME1":  # 0 means white: invert after the VOI transform
        out = 255 - out
    return out


def _read_dicom(src: str | BinaryIO, name: str) -> Dataset:
    """Read a DICOM dataset; large values (the pixel data) are read only when decoded."""
    import pydicom

    try:
        ds = pydicom.dcmread(src, defer_size=_DEFER_BYTES, force=True)
    except Exception as e:  # pydicom raises many types (InvalidDicomError, EOFError, ValueError, ...)
        raise InvalidImage(f"{name}: not a readable DICOM file ({_first_line(e)})", hint=_REEXPORT)
    if len(ds) == 0:
        if _transfer_syntax(ds) is not None:  # a file meta header, then nothing pydicom could parse
            raise InvalidImage(f"{name}: DICOM data set is truncated or corrupt (no readable elements)", hint=_REEXPORT)
        raise InvalidImage(f"{name}: not a DICOM file (no data elements)", hint="check the file type")
    if _transfer_syntax(ds) is None and any(k in ds for k in _PIXEL_KEYWORDS):
        _infer_transfer_syntax(ds)
    return ds


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else None


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (old ACR-NEMA style): record the encoding the reader found."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts


def check_dicom_pixels(ds: Dataset, name: str, file_size: int, config: ImagingConfig = ImagingConfig()) -> int:
    """What ``probe_image`` checks, on a dataset read with deferred pixel data: an image header within
    limits, a decoder for its transfer syntax, pixel data that fits in the file and is encapsulated iff
    compressed. Returns the number of frames; raises ``InvalidImage`` naming ``name``."""
    n_frames = validate_dicom_header(ds, name, config, require_pixels=False)  # Rows/Columns first
    validate_dicom_header(ds, name, config)  # then: is there pixel data at all
    require_dicom_decoder(ds, name)
    _verify_dicom_length(ds, name, file_size)
    return n_frames


def _verify_dicom_length(ds: Dataset, name: str, file_size: int) -> None:
    """Native (defined-length) pixel data must fit in the file; encapsulated data is checked on decode."""
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):  # PixelData, FloatPixelData, DoubleFloatPixelData
        if tag not in ds:
            continue
        elem = ds.get_item(tag, keep_deferred=True)
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        _check_encapsulation(ds, name, tag, length)
        if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > file_size:
            raise InvalidImage(
                f"{name}: DICOM pixel data truncated ({file_size - tell:,} of {length:,} bytes present)",
                hint=_REEXPORT,
            )


def _check_encapsulation(ds: Dataset, name: str, tag: int, length: int | None) -> None:
    """A compressed transfer syntax needs encapsulated (undefined-length) pixel data, a native one must not have it."""
    ts = _transfer_syntax(ds)
    if tag != 0x7FE00010 or ts is None or length is None:
        return
    from pydicom.uid import UID

    uid = UID(ts)
    if not uid.is_transfer_syntax:
        return  # unknown syntax: require_dicom_decoder names it
    encapsulated = length == 0xFFFFFFFF
    if uid.is_compressed and not encapsulated:
        raise InvalidImage(
            f"{name}: pixel data is not encapsulated although the transfer syntax {uid.name} is compressed",
            hint="the file meta header names the wrong transfer syntax; re-export the file",
        )
    if not uid.is_compressed and encapsulated:
        raise InvalidImage(
            f"{name}: pixel data is encapsulated (compressed) although the transfer syntax {uid.name} is native",
            hint="the file meta header names the wrong transfer syntax; re-export the file",
        )


def _pick_frame(frame: int | None, n_frames: int, name: str) -> int:
    if frame is None:
        return n_frames // 2
    if not 0 <= frame < n_frames:
        raise InvalidInput(
            f"{name}: frame {frame} does not exist (the file has {n_frames} frame{'s' if n_frames != 1 else ''})",
            hint=f"use a frame index from 0 to {n_frames - 1}",
        )
    return frame


def _decode(ds: Dataset, index: int | None, name: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)  # decodes only frame ``index`` of a multi-frame file
    except Exception as e:  # decoder plugins raise ValueError/RuntimeError/AttributeError/...
        msg = _first_line(e)
        what = "truncated" if "less than expected" in msg or "reshape" in msg else "could not be decoded"
        raise InvalidImage(f"{name}: DICOM pixel data {what} ({msg})", hint=_REEXPORT)


def _dicom_array(ds: Dataset, index: int, n_frames: int, name: str) -> np.ndarray:
    require_dicom_decoder(ds, name)
    raw = _decode(ds, index if n_frames > 1 else None, name)  # (rows, cols) or (rows, cols, 3)
    pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            return apply_color_lut(raw, ds)  # (rows, cols, 3) uint8 or uint16
        except Exception as e:  # pydicom raises assorted types for malformed LUTs
            raise InvalidImage(f"{name}: invalid palette colour LUT ({_first_line(e)})", hint=_REEXPORT)
    if raw.ndim == 3:
        return raw  # RGB: pydicom converts YBR_FULL(_422) to RGB, J2K decoders output RGB
    return _modality(raw, ds, index, name)


def _modality(raw: np.ndarray, ds: Dataset, index: int, name: str) -> np.ndarray:
    """Stored values -> modality units, (rows, cols) float64."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        except Exception as e:
            raise InvalidImage(f"{name}: invalid Modality LUT ({_first_line(e)})", hint=_REEXPORT)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        slope = _functional(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    out = raw.astype(np.float64)
    try:
        s = float(slope) if slope not in (None, "") else 1.0
        b = float(intercept) if intercept not in (None, "") else 0.0
    except (TypeError, ValueError):
        raise InvalidImage(f"{name}: invalid RescaleSlope/Intercept {slope!r}/{intercept!r}", hint=_REEXPORT)
    if s != 1.0:
        out *= s
    if b != 0.0:
        out += b
    return out


_TABLE_MAX = 1 << 16  # stored values a window table may cover (16-bit data: all of them)


def _windowed(raw: np.ndarray, ds: Dataset, index: int, name: str, w: tuple[float, float, str]) -> np.ndarray | None:
    """``window(_modality(raw))`` for integer stored values, computed once per distinct value and looked up:
    the same float64 operations on the same values, so the same bytes (tests/test_imaging.py compares), in
    ~0.5 ms instead of ~4.5 ms for a 512 px CT slice. None when ``raw`` is not 8/16-bit integers."""
    if raw.dtype not in (np.uint8, np.uint16, np.int16) or raw.size == 0:
        return None
    lo, hi = int(raw.min()), int(raw.max())
    values = np.arange(lo, hi + 1, dtype=raw.dtype)  # every stored value in the slice, (hi - lo + 1,)
    lut = _window(_modality(values, ds, index, name), *w)  # (hi - lo + 1,) uint8
    if raw.dtype == np.int16:  # index by the bit pattern: -1 is 65535
        table = np.zeros(_TABLE_MAX, dtype=np.uint8)
        table[values.view(np.uint16)] = lut
        return table[raw.view(np.uint16)]
    table = np.zeros(hi + 1, dtype=np.uint8)
    table[lo:] = lut
    return table[raw]


def _palette_bits(ds: Dataset) -> int:
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    try:
        return int(desc[2]) if desc is not None else 8
    except (TypeError, ValueError, IndexError):
        return 8


