"""Guards shared by the decoders: file and declared sizes, the DICOM preamble, short error texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsearch.config import ImagingConfig
from medsearch.errors import ImageTooLarge, InvalidImage, NotFound

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



def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)



def _first_line(e: BaseException) -> str:
    """The gist of an exception: its first line, plus the next one when the first ends in ':'."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return text[:300]

