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
MONOCHROME1 is inverted last. A CT file without a window gets the preset of its body part
(``windows.PRESETS``: brain, lung, soft_tissue, bone) before the percentile stretch. Colour (RGB, YBR_*) comes out as RGB, PALETTE COLOR through its LUT.
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
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medsearch.config import ImagingConfig
from medsearch.errors import ImageTooLarge, InvalidImage

from ._guards import (
    _REEXPORT,
    _check_file,
    _check_pixels,
    _check_size,
    _first_line,
    _has_dicom_preamble,
    _is_dicom_bytes,
)
from .dicom import (
    _pick_frame,
    _read_dicom,
    _verify_dicom_length,
    dicom_array,
    dicom_to_uint8,
    require_dicom_decoder,
    validate_dicom_header,
)
from .windows import PRESETS, preset_for, robust_scale, window

__all__ = [
    "PRESETS", "SUPPORTED_FORMATS", "ImageInfo", "dicom_array", "dicom_to_uint8", "image_from_bytes", "is_dicom_file",
    "load_image", "preset_for", "probe_image", "require_dicom_decoder", "robust_scale", "validate_dicom_header", "window",
]  # fmt: skip

# Formats Pillow may try. Deliberately short: no EPS (runs Ghostscript), no exotic parsers.
SUPPORTED_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "DIB", "GIF", "WEBP", "PPM", "TGA")


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
def load_image(
    path: str | Path,
    frame: int | None = None,
    config: ImagingConfig = ImagingConfig(),
    window: str | tuple[float, float] | None = None,
) -> Image.Image:
    """Decode an image file (PNG, JPEG, TIFF, ... or DICOM) into an 8-bit ``L`` or ``RGB`` image.

    ``frame`` picks one frame of a multi-frame file; default: the middle frame for DICOM, the
    first for other formats. ``window`` (DICOM grayscale only) forces a preset name or (center, width).
    Raises ``InvalidImage``/``ImageTooLarge`` (``NotFound`` for a
    missing path) with the file named in the message.
    """
    p = Path(path)
    name = str(p)
    _check_file(p, config)
    if _has_dicom_preamble(p) or p.suffix.lower() in (".dcm", ".dicom"):
        ds = _read_dicom(name, name)
        return Image.fromarray(dicom_to_uint8(ds, frame=frame, config=config, name=name, window=window))
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


