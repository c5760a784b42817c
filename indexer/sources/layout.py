"""Which reader reads a path: ``detect_layout`` and ``read_path``.

Layouts: ``jsonl`` (``indexer.sources.jsonl``), ``folder`` (images + sidecar, with any DICOM in it,
``indexer.sources.folders``), ``dicom`` (one DICOM file) and ``image`` (one image file).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsearch.imaging import is_dicom_file

from .common import Item


def detect_layout(path: Path) -> str:
    """'jsonl', 'folder', 'dicom' or 'image' for a path, or raise FileNotFoundError."""
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_dir():
        if (path / "images.jsonl").exists() or (path / "reports.jsonl").exists() and (path / "images").is_dir():
            return "jsonl"
        return "folder"
    if is_dicom_file(path):
        return "dicom"
    return "image"


def read_path(
    path: Path, *, source: str | None = None, salt: str = "", sidecar: Path | None = None, **dicom: Any
) -> Iterator[Item]:
    """Pick the reader for ``path`` and stream its items. ``dicom`` options (slices, reports, ...) go to
    ``indexer.sources.series.iter_dicom``."""
    path = path.resolve()
    layout = detect_layout(path)
    if layout == "jsonl":
        from .jsonl import read_jsonl_dataset

        yield from read_jsonl_dataset(path, source=source)
    elif layout == "dicom":
        from .series import iter_dicom

        yield from iter_dicom(path, source=source or "dicom", salt=salt, **dicom)
    else:
        from .folders import read_image_folder

        yield from read_image_folder(path, source=source, salt=salt, sidecar=sidecar, **dicom)
