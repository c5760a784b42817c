"""Frozen records that cross module boundaries.

Readers produce ``CaseRecord``/``ImageRecord`` (what to store); the catalog and the searcher
return ``Hit``/``CaseView`` (what was found). Shells turn these into their own public schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Report sections we index as text, in reading order.
REPORT_SECTIONS = ("history", "exam", "findings", "impression", "diagnosis", "differential_diagnosis")


@dataclass(frozen=True)
class CaseRecord:
    """One case/study as a reader found it. ``key`` is unique within its source."""

    source: str
    key: str
    split: str | None = None
    patient_key: str | None = None  # pseudonymous grouping id, never a real patient ID
    title: str | None = None
    diagnosis: str | None = None
    category: str | None = None
    sections: dict[str, str] = field(default_factory=dict)  # section name -> text
    labels: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    """One image (or one frame of a multi-frame file) as a reader found it."""

    source: str
    key: str
    case_key: str
    path: str  # absolute path of the file on disk
    frame: int | None = None  # frame index for multi-frame DICOM, else None
    split: str | None = None
    modality_type: str | None = None  # coarse: CT, MR, X-ray, US, ...
    modality: str | None = None  # fine: "MR - FLAIR", "CT w/contrast (IV)", ...
    plane: str | None = None  # Axial, Coronal, PA, Lateral, ...
    body_region: str | None = None  # coarse location: Head, Thorax, Abdomen, ...
    location: str | None = None  # finer location text
    laterality: str | None = None
    study_date: str | None = None
    caption: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """An input that was not stored, with the reason (shown by name in the ingest summary)."""

    item: str
    reason: str


@dataclass(frozen=True)
class Hit:
    """One search result: an image (and its case), or a report text when ``image_id`` is None."""

    score: float
    case_id: int
    case_key: str
    image_id: int | None
    image_key: str | None
    source: str
    modality_type: str | None
    modality: str | None
    body_region: str | None
    plane: str | None
    split: str | None
    diagnosis: str | None
    title: str | None
    excerpt: str | None  # the caption or report sentence that matched, or the findings opening
    matched: str = "image"  # which space produced it: image, text, caption, bm25, fused

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CaseView:
    """A whole case for display: report sections, labels and its images' ids."""

    case_id: int
    case_key: str
    source: str
    split: str | None
    title: str | None
    diagnosis: str | None
    category: str | None
    sections: dict[str, str]
    labels: dict[str, Any]
    images: list[dict[str, Any]]


def report_opening(sections: dict[str, str], n: int = 200) -> str | None:
    """The first ``n`` characters of a report's findings (else impression, else history), whitespace folded."""
    for s in ("findings", "impression", "history"):
        if sections.get(s):
            t = " ".join(sections[s].split())
            return t if len(t) <= n else t[: n - 1] + "…"
    return None
