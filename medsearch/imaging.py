"""Pixel handling: decode PNG/JPEG/... and DICOM files into 8-bit ``L`` or ``RGB`` PIL images.

Pure functions: Pillow's globals (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) are left
alone; only the warnings filter is touched, briefly, while a header is opened. Every failure is an ``InvalidImage`` (or its subclass
``ImageTooLarge``) whose message names the file and the reason and whose ``hint`` says what to do.

Guards, in order: the file exists and is a file, is not empty, is not larger than
``ImagingConfig.max_file_bytes``; its *declared* size (PNG/JPEG header, DICOM Rows x Columns) is
not above ``max_pixels`` - checked before any pixel is decoded; then the full decode, where a
truncated or corrupt file becomes ``InvalidImage`` instead of an ``OSError``.

DICOM display pipeline (PS3.3 C.11 / PS3.4 N.2): stored values -> Modality LUT or
RescaleSlope/Intercept (CT: Hounsfield units) -> VOI LUT, or the first WindowCenter/Width,
or ``config.default_window``, or a robust 0.5-99.5 percentile stretch -> 8 bit;
MONOCHROME1 is inverted last. Colour (RGB, YBR_*) comes out as RGB, PALETTE COLOR through its LUT.
Multi-frame files give one frame: ``frame`` or, by default, the middle one (``n_frames // 2``).

Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is left as it is; an image
above twice that limit is refused by Pillow while opening and reported here as ``ImageTooLarge``.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ImagingConfig
from .errors import ImageTooLarge, InvalidImage, InvalidInput, NotFound

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Formats Pillow may try. Deliberately short: no EPS (runs Ghostscript), no exotic parsers.
SUPPORTED_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "DIB", "GIF", "WEBP", "PPM", "TGA")

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_BYTES = 64 * 1024  # DICOM values above this size are read lazily (pixel data, big private blobs)
_PERCENTILE_SAMPLE = 1 << 22  # robust_scale estimates percentiles on at most ~4M samples

# Which pip packages decode which compressed transfer syntaxes (pydicom's plugins).
_JPEG_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # fmt: skip
_J2K_TS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
           "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
           "1.2.840.10008.1.2.4.203"}  # fmt: skip
_RLE_TS = {"1.2.840.10008.1.2.5"}


@dataclass(frozen=True)
class ImageInfo:
    """What a cheap header read tells about an image file (no full pixel decode)."""

    format: str  # PIL format name ("PNG", "JPEG", ...) or "DICOM"
    width: int
    height: int
    n_frames: int
    mode: str  # PIL mode, or the DICOM PhotometricInterpretation
    is_dicom: bool


# ---------------------------------------------------------------------------- public API
def load_image(path: str | Path, frame: int | None = None, config: ImagingConfig = ImagingConfig()) -> Image.Image:
    """Decode an image file (PNG, JPEG, TIFF, ... or DICOM) into an 8-bit ``L`` or ``RGB`` image.

    ``frame`` picks one frame of a multi-frame file; default: the middle frame for DICOM, the
    first for other formats. Raises ``InvalidImage``/``ImageTooLarge`` (``NotFound`` for a
    missing path) with the file named in the message.
    """
    p = Path(path)
    name = str(p)
    _check_file(p, config)
    if _has_dicom_preamble(p) or p.suffix.lower() in (".dcm", ".dicom"):
        ds = _read_dicom(name, name)
        return Image.fromarray(dicom_to_uint8(ds, frame=frame, config=config, name=name))
    with open(p, "rb") as f:
        return _load_pil(f, name, frame, config)


def image_from_bytes(
    data: bytes, name: str = "upload", frame: int | None = None, config: ImagingConfig = ImagingConfig()
) -> Image.Image:
    """Decode an uploaded image (bytes) with the same guards as ``load_image``; ``name`` is used in messages."""
    _check_size(len(data), name, config)
    if _is_dicom_bytes(data) or name.lower().endswith((".dcm", ".dicom")):
        ds = _read_dicom(io.BytesIO(data), name)
        return Image.fromarray(dicom_to_uint8(ds, frame=frame, config=config, name=name))
    return _load_pil(io.BytesIO(data), name, frame, config)


def probe_image(path: str | Path, config: ImagingConfig = ImagingConfig(), *, verify: bool = True) -> ImageInfo:
    """Validate an image file without a full decode: size limits, format, frames, DICOM decoder.

    With ``verify`` (default) it also catches truncated/corrupt files cheaply: PNG chunks are
    CRC-checked without inflating, JPEG is decoded at 1/8 scale, native DICOM pixel data is
    checked against the file size; other formats are decoded. ``verify=False`` reads headers only.
    """
    p = Path(path)
    name = str(p)
    size = _check_file(p, config)
    if _has_dicom_preamble(p) or p.suffix.lower() in (".dcm", ".dicom"):
        ds = _read_dicom(name, name)
        n_frames = validate_dicom_header(ds, name, config)
        require_dicom_decoder(ds, name)
        if verify:
            _verify_dicom_length(ds, name, size)
        pi = str(ds.get("PhotometricInterpretation") or "")
        return ImageInfo("DICOM", int(ds.Columns), int(ds.Rows), n_frames, pi, True)
    with open(p, "rb") as f:
        im = _open_pil(f, name, config)
        with im:
            info = ImageInfo(str(im.format), im.width, im.height, int(getattr(im, "n_frames", 1)), im.mode, False)
            if verify:
                _verify_pil(im, name)
    return info


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with the ``DICM`` marker at offset 128 or a ``.dcm``/``.dicom`` name."""
    p = Path(path)
    return p.suffix.lower() in (".dcm", ".dicom") or _has_dicom_preamble(p)


# ---------------------------------------------------------------------------- DICOM
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
    ds: Dataset, frame: int | None = None, config: ImagingConfig = ImagingConfig(), name: str = "dataset"
) -> np.ndarray:
    """One DICOM frame as display-ready uint8: ``(rows, cols)`` grayscale or ``(rows, cols, 3)`` RGB."""
    n_frames = validate_dicom_header(ds, name, config)
    index = _pick_frame(frame, n_frames, name)
    arr = _dicom_array(ds, index, n_frames, name)
    pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if arr.ndim == 3:  # colour (rows, cols, 3): scale the stored range to 8 bit
        bits = _palette_bits(ds) if pi == "PALETTE COLOR" else int(ds.get("BitsStored") or 8)
        if arr.dtype == np.uint8 and bits <= 8:
            return np.ascontiguousarray(arr)
        return _to_uint8(arr.astype(np.float64) * (255.0 / (2.0**bits - 1)))
    out = _voi(arr, ds, index, config)  # (rows, cols) uint8
    if pi == "MONOCHROME1":  # 0 means white: invert after the VOI transform
        out = 255 - out
    return out


def window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map values through a window (PS3.3 C.11.2.1.2) to uint8; ``function`` LINEAR, LINEAR_EXACT or SIGMOID."""
    x = np.asarray(arr, dtype=np.float64)
    fn = function.upper()
    if fn == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / max(width, 1e-6), -500, 500)))
    elif fn == "LINEAR_EXACT":
        y = (x - center) / max(width, 1e-6) + 0.5
    elif width <= 1:  # LINEAR with width 1: a threshold at center - 0.5
        y = (x > center - 0.5).astype(np.float64)
    else:
        y = (x - (center - 0.5)) / (width - 1) + 0.5
    return _to_uint8(np.clip(y, 0.0, 1.0) * 255.0)


def robust_scale(arr: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Stretch the ``low``..``high`` percentiles to 0..255 (uint8); falls back to min-max, constant -> 0."""
    a = np.asarray(arr, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    sample = finite if finite.size <= _PERCENTILE_SAMPLE else finite[:: finite.size // _PERCENTILE_SAMPLE + 1]
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return _to_uint8((np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo)))


# ---------------------------------------------------------------------------- guards
_REEXPORT = "the file is corrupt or incomplete; copy or export it again"


def _check_file(p: Path, config: ImagingConfig) -> int:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise NotFound(f"{p}: no such file", hint="check the path")
    except OSError as e:
        raise InvalidImage(f"{p}: cannot read file ({e.strerror})", hint="check the file's permissions")
    if p.is_dir():
        raise InvalidImage(f"{p}: is a folder, not an image file", hint="give the path of one image file")
    _check_size(st.st_size, str(p), config)
    return st.st_size


def _check_size(nbytes: int, name: str, config: ImagingConfig) -> None:
    if nbytes == 0:
        raise InvalidImage(f"{name}: file is empty (0 bytes)", hint=_REEXPORT)
    if nbytes > config.max_file_bytes:
        raise ImageTooLarge(
            f"{name}: file is {nbytes:,} bytes, above the limit of {config.max_file_bytes:,}",
            hint="downscale or crop the image, or raise ImagingConfig.max_file_bytes",
        )


def _check_pixels(width: int, height: int, name: str, config: ImagingConfig) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{name}: declares an empty image ({width}x{height})", hint=_REEXPORT)
    if width * height > config.max_pixels:
        raise ImageTooLarge(
            f"{name}: declares {width}x{height} = {width * height:,} pixels, above the limit of {config.max_pixels:,}",
            hint="downscale the image before ingesting it, or raise ImagingConfig.max_pixels",
        )


def _has_dicom_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return _is_dicom_bytes(f.read(132))
    except OSError:
        return False


def _is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


# ---------------------------------------------------------------------------- PIL formats
def _pil_formats() -> tuple[str, ...]:
    """SUPPORTED_FORMATS that this Pillow build can open (JPEG2000/WEBP depend on its codecs)."""
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


def _open_pil(fp: BinaryIO, name: str, config: ImagingConfig) -> Image.Image:
    """Open lazily (header only) and check the declared size before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            im = Image.open(fp, formats=_pil_formats())
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(
            f"{name}: declared size is too large to decode safely ({e})",
            hint="downscale the image before ingesting it (Pillow refuses more than 2x Image.MAX_IMAGE_PIXELS)",
        )
    except UnidentifiedImageError:
        raise InvalidImage(
            f"{name}: not a recognised image file",
            hint=f"supported: DICOM and {', '.join(SUPPORTED_FORMATS)}; check the file is not a text or HTML page",
        )
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidImage(f"{name}: unreadable image header ({_first_line(e)})", hint=_REEXPORT)
    try:
        _check_pixels(im.width, im.height, name, config)
    except InvalidImage:
        im.close()
        raise
    return im


def _load_pil(fp: BinaryIO, name: str, frame: int | None, config: ImagingConfig) -> Image.Image:
    im = _open_pil(fp, name, config)
    with im:
        n_frames = int(getattr(im, "n_frames", 1))
        index = 0 if frame is None else _pick_frame(frame, n_frames, name)
        try:
            if index:
                im.seek(index)
            im.load()  # force the decode: truncated data fails here, not later
            out = _pil_to_8bit(ImageOps.exif_transpose(im) if im.getexif() else im)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"{name}: too large to decode safely ({e})", hint="downscale the image")
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InvalidImage(f"{name}: truncated or corrupt {im.format} data ({_first_line(e)})", hint=_REEXPORT)
        return out if out is not im else im.copy()


def _verify_pil(im: Image.Image, name: str) -> None:
    """Read all of the file's data without a full-size decode; raise InvalidImage if it is cut short."""
    fmt = im.format
    try:
        if fmt == "PNG":
            im.verify()  # walks every chunk and checks its CRC; no inflate
        elif fmt == "JPEG":
            im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))  # DCT-scaled decode reads all scans
            im.load()
        else:
            im.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: too large to decode safely ({e})", hint="downscale the image")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise InvalidImage(f"{name}: truncated or corrupt {fmt} data ({_first_line(e)})", hint=_REEXPORT)


def _pil_to_8bit(im: Image.Image) -> Image.Image:
    """Any PIL mode -> ``L`` or ``RGB``: alpha composited on black, 16-bit/float stretched robustly."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return im.copy()
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA"):
        base = "L" if im.mode == "LA" else "RGB"
        out = Image.new(base, im.size, 0)
        out.paste(im.convert(base), mask=im.getchannel("A"))
        return out
    if im.mode.startswith("I") or im.mode == "F":  # I;16, I;16B, I (32-bit), F
        arr = np.asarray(im)  # (h, w) uint16 / int32 / float32
        return Image.fromarray(robust_scale(arr), "L")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


# ---------------------------------------------------------------------------- DICOM internals
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


def _functional(ds: Dataset, index: int, macro: str, keyword: str) -> Any:
    """A value from the enhanced multi-frame functional groups (per-frame first, then shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and i < len(seq):
            item = seq[i].get(macro)
            if item is not None and len(item) and keyword in item[0]:
                return item[0].get(keyword)
    return None


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


def _first(value: Any) -> float | None:
    """First number of a (possibly multi-valued) DS element."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes | int | float):  # MultiValue: take the first
        try:
            value = value[0]
        except (TypeError, IndexError):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _voi(arr: np.ndarray, ds: Dataset, index: int, config: ImagingConfig) -> np.ndarray:
    """Modality values (rows, cols) -> uint8 via VOI LUT, header window, default window or percentiles."""
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        try:
            out = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return _to_uint8(np.asarray(out, dtype=np.float64) * (255.0 / (2.0 ** max(bits, 1) - 1)))
        except Exception:  # a malformed LUT: fall through to the window / percentiles
            pass
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction") or "LINEAR")
    if center is None or width is None:
        center = _first(_functional(ds, index, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_functional(ds, index, "FrameVOILUTSequence", "WindowWidth"))
        function = str(_functional(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or function)
    if (center is None or width is None or width <= 0) and config.default_window is not None:
        center, width = config.default_window
        function = "LINEAR"
    if center is not None and width is not None and width > 0:
        return window(arr, center, width, function)
    return robust_scale(arr)


def _palette_bits(ds: Dataset) -> int:
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    try:
        return int(desc[2]) if desc is not None else 8
    except (TypeError, ValueError, IndexError):
        return 8


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _first_line(e: BaseException) -> str:
    """The gist of an exception: its first line, plus the next one when the first ends in ':'."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return text[:300]
