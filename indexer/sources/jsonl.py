"""JSONL dataset layout (medsearch's import format, as in ../shared/datasets).

    DIR/reports.jsonl   one case per line  {id, split, title, history, findings, ..., labels, images}
    DIR/images.jsonl    one image per line {image_id, case_id, split, file, modality_type, ...}
    DIR/images/...      the files named by ``file``

Every case of reports.jsonl first, then the images; an image whose case has no report becomes a
minimal case of its own. Both files stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsearch.records import REPORT_SECTIONS, CaseRecord, ImageRecord, Skipped

from .common import Item, _iter_jsonl, _text


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

