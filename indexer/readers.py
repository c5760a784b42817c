"""Readers turn a path into a stream of CaseRecord / ImageRecord / Skipped.

Layouts:
  * JSONL dataset (medsearch's import format, as in ../shared/datasets):
        DIR/reports.jsonl   one case per line  {id, split, title, history, findings, ..., labels, images}
        DIR/images.jsonl    one image per line {image_id, case_id, split, file, modality_type, ...}
        DIR/images/...      the files named by ``file``
  * Image folder: PNG/JPEG/... files in a tree, with an optional sidecar ``reports.csv`` /
    ``reports.jsonl`` / ``metadata.csv`` / ``metadata.jsonl`` whose rows name a ``file``
    (relative path) and may give case_id, findings, impression, diagnosis, caption, modality,
    body_region, plane, split. An image with no sidecar row becomes a case of its own.
  * DICOM files and trees (``indexer.dicom``), also when mixed into an image folder.

A case is always yielded before its images. Nothing is loaded whole: every file streams.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsearch.records import REPORT_SECTIONS, CaseRecord, ImageRecord, Skipped

Item = CaseRecord | ImageRecord | Skipped


class RecentKeys(OrderedDict):
    """A dict that keeps only the ``cap`` most recently used keys, so per-archive bookkeeping
    (case ids, cases already yielded) stays flat in the number of items
    (benchmarks/memory_bench.py). Callers must tolerate a forgotten key: look it up again."""

    def __init__(self, cap: int = 10_000) -> None:
        super().__init__()
        self.cap = cap

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.cap:
            self.popitem(last=False)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SIDECARS = ("reports.jsonl", "reports.csv", "metadata.jsonl", "metadata.csv")


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


def read_path(path: Path, *, source: str | None = None, salt: str = "", sidecar: Path | None = None) -> Iterator[Item]:
    """Pick the reader for ``path`` and stream its items."""
    path = path.resolve()
    layout = detect_layout(path)
    if layout == "jsonl":
        yield from read_jsonl_dataset(path, source=source)
    elif layout == "dicom":
        from .dicom import iter_dicom

        yield from iter_dicom(path, source=source or "dicom", salt=salt)
    else:
        yield from read_image_folder(path, source=source, salt=salt, sidecar=sidecar)


# ---------------------------------------------------------------------------- JSONL layout
def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record or None, error or None) for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # a BOM may start a file
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 ({e.reason} at byte {e.start})"
                continue
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            except RecursionError:
                yield lineno, None, "JSON nested too deeply to read"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"expected a JSON object, got {type(rec).__name__}"
                continue
            if (bad := _not_unicode(rec)) is not None:
                yield lineno, None, bad
                continue
            yield lineno, rec, None


def _not_unicode(rec: dict[str, Any]) -> str | None:
    """Why a decoded record cannot be stored as text (JSON escapes can spell lone surrogates), or None."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode (a lone UTF-16 surrogate {e.object[e.start:e.end]!a} in a string)"
    except (ValueError, RecursionError):  # a structure json.dumps cannot walk back
        return "JSON nested too deeply to read"
    return None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _case_from_report(rec: dict[str, Any], source: str) -> CaseRecord:
    labels = dict(rec.get("labels") or {})
    sections = {s: t for s in REPORT_SECTIONS if (t := _text(rec.get(s)))}
    meta = {k: rec[k] for k in ("train_half", "views", "age", "sex", "credit", "doi", "licenses") if rec.get(k) is not None}
    topic = rec.get("topic") or {}
    if isinstance(topic, dict) and topic.get("keywords"):
        meta["keywords"] = topic["keywords"]
    return CaseRecord(
        source=source,
        key=str(rec["id"]),
        split=_text(rec.get("split")),
        patient_key=_text(rec.get("patient_id")),
        title=_text(rec.get("title")),
        diagnosis=_text(rec.get("diagnosis")),
        category=_text(labels.get("category")) or _text(labels.get("finding")),
        sections=sections,
        labels=labels,
        meta=meta,
    )


def _image_from_row(rec: dict[str, Any], source: str, base: Path, case_key: str) -> ImageRecord:
    file = str(rec.get("file") or rec.get("path") or "")
    labels = {
        k: rec[k]
        for k in ("category", "finding", "finding_path", "acr_codes", "case_diagnosis")
        if rec.get(k) not in (None, "", [])
    }
    meta = {
        k: rec[k]
        for k in ("figure_part", "age", "sex", "view", "license", "credit", "doi", "source_page_url", "offset_days")
        if rec.get(k) not in (None, "")
    }
    return ImageRecord(
        source=source,
        key=str(rec.get("image_id") or Path(file).stem),
        case_key=case_key,
        path=str((base / file).resolve()),
        frame=rec.get("frame"),
        split=_text(rec.get("split")),
        modality_type=_text(rec.get("modality_type")),
        modality=_text(rec.get("modality")),
        plane=_text(rec.get("plane")) or _text(rec.get("view")),
        body_region=_text(rec.get("location_category")) or _text(rec.get("body_region")),
        location=_text(rec.get("location")),
        laterality=_text(rec.get("laterality")),
        caption=_text(rec.get("caption")) or _text(rec.get("clinical_notes")),
        labels=labels,
        meta=meta,
    )


def read_jsonl_dataset(root: Path, *, source: str | None = None) -> Iterator[Item]:
    """Stream a JSONL-layout dataset folder: every case of reports.jsonl, then the images."""
    source = source or root.name
    reports, images = root / "reports.jsonl", root / "images.jsonl"
    known_cases: set[str] = set()
    if reports.exists():
        for lineno, rec, err in _iter_jsonl(reports):
            where = f"{reports}:{lineno}"
            if err or rec is None:
                yield Skipped(where, err or "empty")
                continue
            if not rec.get("id"):
                yield Skipped(where, "report has no 'id'")
                continue
            if rec.get("labels") is not None and not isinstance(rec["labels"], dict):
                yield Skipped(where, f"'labels' must be a JSON object, got {type(rec['labels']).__name__}")
                continue
            try:
                case = _case_from_report(rec, source)
            except (TypeError, ValueError) as e:  # a field of an unexpected type
                yield Skipped(where, f"invalid report record ({e})")
                continue
            known_cases.add(case.key)
            yield case
    if not images.exists():
        return
    for lineno, rec, err in _iter_jsonl(images):
        where = f"{images}:{lineno}"
        if err or rec is None:
            yield Skipped(where, err or "empty")
            continue
        file = rec.get("file") or rec.get("path")
        if not file:
            yield Skipped(where, "image has no 'file'")
            continue
        if not _safe_relative(str(file)):
            yield Skipped(where, f"file {file!r} points outside the dataset folder")
            continue
        frame = rec.get("frame")
        if frame is not None and (type(frame) is not int or not 0 <= frame < 2**31):
            yield Skipped(where, f"'frame' must be a whole number from 0, got {str(frame)[:40]!r}")
            continue
        case_key = str(rec.get("case_id") or rec.get("image_id") or Path(str(file)).stem)
        if case_key not in known_cases:
            # An image whose case has no report: make a minimal case from the image's fields.
            known_cases.add(case_key)
            yield CaseRecord(
                source=source,
                key=case_key,
                split=_text(rec.get("split")),
                patient_key=_text(rec.get("patient_id")),
                title=_text(rec.get("case_title")),
                diagnosis=_text(rec.get("case_diagnosis")) or _text(rec.get("finding")),
                category=_text(rec.get("category")),
            )
        yield _image_from_row(rec, source, root, case_key)


def _safe_relative(file: str) -> bool:
    p = Path(file)
    return not p.is_absolute() and ".." not in p.parts and "\x00" not in file


# ---------------------------------------------------------------------------- image folders
def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


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
    root: Path, *, source: str | None = None, salt: str = "", sidecar: Path | None = None
) -> Iterator[Item]:
    """Stream a folder (or one file) of PNG/JPEG images with an optional report sidecar."""
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
        from .dicom import iter_dicom

        yield from iter_dicom(root, source=source, salt=salt)
