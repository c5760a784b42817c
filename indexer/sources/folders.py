"""Image folders: PNG/JPEG/... files in a tree with an optional report sidecar.

A sidecar ``reports.csv`` / ``reports.jsonl`` / ``metadata.csv`` / ``metadata.jsonl`` has rows that
name a ``file`` (relative path) and may give case_id, findings, impression, diagnosis, caption,
modality, body_region, plane, split. An image with no sidecar row becomes a case of its own.
DICOM files in the folder are read by ``indexer.sources.series`` after the other images.
"""

from __future__ import annotations

import csv
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsearch.imaging import is_dicom_file
from medsearch.records import REPORT_SECTIONS, CaseRecord, ImageRecord, Skipped

from .common import Item, RecentKeys, _iter_jsonl, _text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SIDECARS = ("reports.jsonl", "reports.csv", "metadata.jsonl", "metadata.csv")


def walk_files(root: Path) -> Iterator[Path | Skipped]:
    """Files under ``root`` in sorted order, following directory symlinks once (no loops)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError as e:
            yield Skipped(str(d), f"cannot read folder: {e.strerror}")
            continue
        if (st.st_dev, st.st_ino) in seen:
            yield Skipped(str(d), "symlink loop: folder already visited")
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            yield Skipped(str(d), f"cannot list folder: {e.strerror}")
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subdirs.append(Path(e.path))
                elif e.is_file():
                    yield Path(e.path)
                elif e.is_symlink():
                    yield Skipped(e.path, "broken symlink: its target does not exist")
                else:
                    yield Skipped(e.path, "not a regular file (a FIFO, socket or device)")
            except OSError as err:
                why = "symlink loop" if err.errno == errno.ELOOP else err.strerror
                yield Skipped(e.path, f"cannot stat: {why}")
        stack.extend(reversed(subdirs))


def _load_sidecar(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a sidecar keyed by their relative ``file``. Sidecars are small next to the images."""
    rows: dict[str, dict[str, Any]] = {}
    if path.suffix == ".jsonl":
        for _, rec, err in _iter_jsonl(path):
            if rec and not err:
                f = rec.get("file") or rec.get("image") or rec.get("path")
                if f:
                    rows[str(Path(str(f)))] = rec
    else:
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                for rec in csv.DictReader(fh):
                    f = rec.get("file") or rec.get("image") or rec.get("path")
                    if f:
                        rows[str(Path(f))] = {k: v for k, v in rec.items() if k}
        except (UnicodeDecodeError, csv.Error) as e:  # before any image of the folder is stored
            from medsearch.errors import InvalidInput

            raise InvalidInput(
                f"sidecar {path} cannot be read as UTF-8 CSV ({e})",
                hint="save it as UTF-8 CSV without NUL bytes, or move it out of the folder",
            ) from None
    return rows


def read_image_folder(
    root: Path, *, source: str | None = None, salt: str = "", sidecar: Path | None = None, **dicom: Any
) -> Iterator[Item]:
    """Stream a folder (or one file) of PNG/JPEG images with an optional report sidecar.

    DICOM files found in the tree are then read as studies (``dicom`` options go to ``iter_dicom``).
    """
    base = root if root.is_dir() else root.parent
    source = source or base.name
    side: dict[str, dict[str, Any]] = {}
    if sidecar is None and root.is_dir():
        sidecar = next((root / n for n in SIDECARS if (root / n).exists()), None)
    if sidecar is not None:
        side = _load_sidecar(sidecar)
    files = walk_files(root) if root.is_dir() else iter([root])
    has_dicom = False
    seen_cases = RecentKeys()  # a forgotten case is yielded again: an "unchanged" upsert, no duplicate
    for f in files:
        if isinstance(f, Skipped):
            yield f
            continue
        suffix = f.suffix.lower()
        if f.name in SIDECARS or suffix in {".csv", ".jsonl", ".json", ".txt", ".md"}:
            continue
        if suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and is_dicom_file(f)):
            has_dicom = True
            continue
        if suffix not in IMAGE_SUFFIXES:
            yield Skipped(str(f), f"not an image file type ({suffix or 'no extension'})")
            continue
        rel = str(f.relative_to(base))
        row = side.get(rel, {})
        case_key = str(row.get("case_id") or row.get("study_id") or rel)
        if seen_cases.get(case_key) is None:
            seen_cases[case_key] = True
            sections = {s: t for s in REPORT_SECTIONS if (t := _text(row.get(s)))}
            if not sections and _text(row.get("report")):
                sections["findings"] = _text(row.get("report")) or ""
            yield CaseRecord(
                source=source,
                key=case_key,
                split=_text(row.get("split")),
                patient_key=_text(row.get("patient_id")),
                title=_text(row.get("title")),
                diagnosis=_text(row.get("diagnosis")),
                category=_text(row.get("category")),
                sections=sections,
            )
        yield ImageRecord(
            source=source,
            key=rel,
            case_key=case_key,
            path=str(f.resolve()),
            split=_text(row.get("split")),
            modality_type=_text(row.get("modality_type")) or _text(row.get("modality")),
            modality=_text(row.get("modality")),
            plane=_text(row.get("plane")) or _text(row.get("view")),
            body_region=_text(row.get("body_region")) or _text(row.get("location_category")),
            location=_text(row.get("location")),
            caption=_text(row.get("caption")),
        )
    if has_dicom and root.is_dir():
        from .series import iter_dicom

        yield from iter_dicom(root, source=source, salt=salt, **dicom)

