"""Typed rows: what the catalog's named queries return (frozen, built by column name, never by position).

    ImageRow   an image joined with its case (what search hits, evidence and the API's image routes need)
    CaseRow    one case (no images)
    TextRow    one text row: a report section, a sentence of one, or an image caption
    LabelRow, StoredFields   label rows and the stored free text of a row (PHI audit scans)

Rows carry pseudonymous keys only (``patient_key`` is an HMAC pseudonym, never a patient ID) and stay
inside the core: shells turn them into their own public schemas.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CaseRow:
    """One case (study) row."""

    case_id: int
    case_key: str
    source: str
    split: str | None
    patient_key: str | None
    title: str | None
    diagnosis: str | None
    category: str | None
    sections: dict[str, str]  # section name -> text

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ImageRow:
    """One image row joined with the fields of its case."""

    image_id: int
    image_key: str
    case_id: int
    case_key: str
    source: str
    path: str
    frame: int | None
    sha256: str
    width: int | None
    height: int | None
    split: str | None
    modality_type: str | None
    modality: str | None
    plane: str | None
    body_region: str | None
    caption: str | None
    patient_key: str | None
    title: str | None
    diagnosis: str | None
    category: str | None
    sections: dict[str, str]  # the case's report sections

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TextRow:
    """One embeddable text: kind 'section' (a whole section), 'sentence' or 'caption' (``image_id`` set)."""

    text_id: int
    case_id: int
    image_id: int | None
    section: str
    kind: str
    seq: int
    text: str


@dataclass(frozen=True)
class LabelRow:
    """One (name, value) label of a case (``image_id`` None) or of one image."""

    case_id: int
    image_id: int | None
    name: str
    value: str


@dataclass(frozen=True)
class StoredFields:
    """The free-text fields stored for one case or image row, for scans such as the PHI audit."""

    kind: str  # "case" or "image"
    row_id: int
    texts: dict[str, str | None]  # column name -> value (key, title, diagnosis / key, path, caption)
    sections: dict[str, str]  # report sections (cases only)
    meta: dict[str, Any]  # the row's metadata JSON, parsed


# SELECT lists whose aliases are the field names: rows are built from the cursor's column names, so
# a SELECT list and its dataclass drifting apart fails loudly (unexpected/missing field), never shifts values.
CASE_COLUMNS = (
    "c.id AS case_id, c.key AS case_key, c.source AS source, c.split AS split, c.patient_key AS patient_key, "
    "c.title AS title, c.diagnosis AS diagnosis, c.category AS category, c.sections AS sections"
)
IMAGE_COLUMNS = (
    "i.id AS image_id, i.key AS image_key, i.case_id AS case_id, c.key AS case_key, i.source AS source, "
    "i.path AS path, i.frame AS frame, i.sha256 AS sha256, i.width AS width, i.height AS height, i.split AS split, "
    "i.modality_type AS modality_type, i.modality AS modality, i.plane AS plane, i.body_region AS body_region, "
    "i.caption AS caption, c.patient_key AS patient_key, c.title AS title, c.diagnosis AS diagnosis, "
    "c.category AS category, c.sections AS sections"
)
TEXT_COLUMNS = (
    "t.id AS text_id, t.case_id AS case_id, t.image_id AS image_id, t.section AS section, t.kind AS kind, "
    "t.seq AS seq, t.text AS text"
)


def _named(cur: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    names = [d[0] for d in cur.description or ()]
    for r in cur:
        yield dict(zip(names, r, strict=True))


def _with_sections(d: dict[str, Any]) -> dict[str, Any]:
    d["sections"] = json.loads(d["sections"] or "{}")
    return d


def case_rows(cur: sqlite3.Cursor) -> Iterator[CaseRow]:
    """CaseRow per row of a cursor that SELECTs ``CASE_COLUMNS``."""
    return (CaseRow(**_with_sections(d)) for d in _named(cur))


def image_rows(cur: sqlite3.Cursor) -> Iterator[ImageRow]:
    """ImageRow per row of a cursor that SELECTs ``IMAGE_COLUMNS``."""
    return (ImageRow(**_with_sections(d)) for d in _named(cur))


def text_rows(cur: sqlite3.Cursor) -> Iterator[TextRow]:
    """TextRow per row of a cursor that SELECTs ``TEXT_COLUMNS``."""
    return (TextRow(**d) for d in _named(cur))
