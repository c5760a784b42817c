"""Uploaded query images: type allow-list, size cap, magic-byte check, guarded decode.

Only PNG, JPEG and DICOM are accepted. The declared content type must be one of those (or a
generic ``application/octet-stream``/empty one, as browsers send for ``.dcm`` files), and the
bytes must start like the type they claim. Decoding goes through ``medsearch.imaging.image_from_bytes``,
which refuses a declared size above the pixel limit before decoding a single pixel (the
decompression-bomb guard).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import UploadFile

from medsearch.config import ImagingConfig
from medsearch.errors import ImageTooLarge, InvalidImage

if TYPE_CHECKING:
    from PIL import Image

ALLOWED_TYPES = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",  # not registered, but sent by some clients
    "image/pjpeg": "jpeg",
    "application/dicom": "dicom",
    "image/dicom": "dicom",
}
GENERIC_TYPES = {"", "application/octet-stream"}
_TYPE_HINT = "upload a PNG, JPEG or DICOM (Part 10, with the DICM preamble) file"


def sniff(data: bytes) -> str | None:
    """The format the bytes start like: png, jpeg, dicom or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


@dataclass(frozen=True)
class Upload:
    image: Image.Image
    sha256: str
    nbytes: int
    kind: str


def read_upload(file: UploadFile, config: ImagingConfig) -> Upload:
    """Validate and decode one uploaded image. Raises InvalidImage (415) / ImageTooLarge (413)."""
    declared = (file.content_type or "").split(";")[0].strip().lower()
    if declared not in ALLOWED_TYPES and declared not in GENERIC_TYPES:
        raise InvalidImage(f"uploads of type {declared!r} are not accepted", hint=_TYPE_HINT)
    data = file.file.read(config.max_file_bytes + 1)
    if len(data) > config.max_file_bytes:
        raise ImageTooLarge(
            f"the uploaded file is larger than the limit of {config.max_file_bytes:,} bytes",
            hint="downscale or crop the image before uploading it",
        )
    if not data:
        raise InvalidImage("the uploaded file is empty", hint=_TYPE_HINT)
    kind = sniff(data)
    if kind is None:
        raise InvalidImage("the uploaded file is not a PNG, JPEG or DICOM image", hint=_TYPE_HINT)
    if declared in ALLOWED_TYPES and ALLOWED_TYPES[declared] != kind:
        raise InvalidImage(
            f"the upload is declared as {declared} but its bytes are {kind.upper()}",
            hint="send the file with its real content type",
        )
    from medsearch.imaging import image_from_bytes

    name = "upload.dcm" if kind == "dicom" else "upload"  # never echo the client's file name
    image = image_from_bytes(data, name=name, config=config)
    return Upload(image=image, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), kind=kind)
