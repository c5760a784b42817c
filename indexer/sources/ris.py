"""Reports from a RIS export (CSV or JSONL), joined to studies in memory at ingest.

``RisReports.load(path)`` reads the whole export into memory once: per row, its report sections
and its join key(s). ``lookup(accession_number=..., study_instance_uid=...)`` returns the sections
of the row with that key and marks the row matched; ``unmatched()`` lists the rows no study matched
by label ("row 17": the 17th data record - after the CSV header, or the 17th non-blank JSONL line),
never by key. The join keys live only in this object: nothing here writes them anywhere, and
neither labels, ``stats``, errors nor ``repr`` show them.

Columns (header names matched case-insensitively; spaces and dashes count as underscores):

* join key, at least one: ``accession_number`` (or ``accession``, ``accession_no``, ``acc_no``) and/or
  ``study_instance_uid`` (or ``study_uid``, ``studyinstanceuid``). A row with both can be found by either.
* text, at least one: ``findings``, ``impression`` (``impressions``, ``conclusion``), ``history``,
  ``indication``, ``comparison``, ``technique``, ``exam``, ``recommendation``, ``addendum``, or a single
  ``report`` (``report_text``, ``text``, ``narrative``) column. A ``report`` is split into sections at
  headings (``FINDINGS:``, ``IMPRESSION:``, ``CLINICAL HISTORY:``, ... - upper case anywhere, Title
  Case at the start of a line; names mapped as for SR headings); text before the first heading goes to
  ``other``, and a report without headings is all ``findings``. Section columns win over the same
  section of a ``report``.
* identifiers, optional: ``patient_name``, ``patient_id``, ``mrn``, ``referring_physician``,
  ``radiologist``, ... Their values are never returned; ``RisEntry.scrubbed()`` replaces them in the
  row's text, as it does the row's own join keys.

Other columns are ignored. Key matching: a UID as written (spaces and NUL padding stripped), an
accession number stripped and case-insensitive (leading zeros are significant: a spreadsheet that
drops them breaks the join, it does not make a wrong one). When two rows share a key, the first is
used and the other counted under ``duplicates``.

Encoding: UTF-8 by default (a BOM is allowed; a UTF-16 BOM is recognised), else ``encoding=``
(e.g. ``"cp1252"``). CSV delimiter: ``,``, ``;``, tab or ``|``, sniffed from the header line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsearch.errors import InvalidInput, NotFound

from .sr import section_key

KEY_COLUMNS = {
    "accession_number": ("accession_number", "accessionnumber", "accession", "accession_no", "accession_num",
                         "acc_no", "acc_num"),
    "study_instance_uid": ("study_instance_uid", "studyinstanceuid", "study_uid", "studyuid", "study_instance_uids"),
}  # fmt: skip
SECTION_COLUMNS = {
    "findings": "findings", "finding": "findings", "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression", "history": "history", "clinical_history": "history",
    "indication": "indication", "indications": "indication", "reason_for_study": "indication",
    "comparison": "comparison", "technique": "technique", "exam": "exam", "examination": "exam",
    "procedure": "exam", "recommendation": "recommendation", "recommendations": "recommendation",
    "addendum": "addendum",
}  # fmt: skip
REPORT_COLUMNS = ("report", "report_text", "text", "narrative", "report_body", "full_report")
NAME_COLUMNS = ("patient_name", "patient", "name", "first_name", "last_name", "given_name", "family_name",
                "referring_physician", "referring_physician_name", "ordering_physician", "radiologist",
                "reading_radiologist", "physician", "author", "signed_by", "reported_by", "dictated_by",
                "attending", "resident", "technologist")  # fmt: skip
ID_COLUMNS = ("patient_id", "mrn", "medical_record_number", "patient_mrn", "other_patient_ids", "order_number",
              "order_id", "visit_number", "encounter_id", "requested_procedure_id", "study_id")  # fmt: skip
FORMATS = ("csv", "jsonl")

_HEADING = re.compile(
    r"(?:(?<=\n)|^)[ \t]*(?P<title>[A-Z][A-Za-z]*(?:[ /&]+[A-Z][A-Za-z]*){0,4})[ \t]*:"  # "Clinical History:" at a line start
    r"|\b(?P<upper>[A-Z]{2,}(?:[ /&]+[A-Z]{2,}){0,4})[ \t]*:"  # "FINDINGS:" anywhere
)


@dataclass(frozen=True)
class RisEntry:
    """One usable row: its label ("row 3") and sections; ``names``/``ids`` only feed the scrubber."""

    label: str
    sections: dict[str, str]
    names: tuple[str, ...] = field(default=(), repr=False, compare=False)
    ids: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __repr__(self) -> str:  # report text is PHI until scrubbed: show only its shape
        return f"RisEntry({self.label}, sections={{{', '.join(f'{k}: {len(v)} chars' for k, v in self.sections.items())}}})"

    def scrubbed(self) -> tuple[dict[str, str], int]:
        """``sections`` through ``medsearch.deid.scrub_sections`` with this row's names and ids; (sections, n)."""
        from medsearch.deid import scrub_sections

        return scrub_sections(self.sections, known_names=self.names, known_ids=self.ids)


class RisReports:
    """A RIS export held in memory for the ingest's join; see the module docstring."""

    def __init__(self, path: Path, fmt: str, keys: tuple[str, ...]) -> None:
        self.path = path
        self.format = fmt
        self.keys = keys  # which key columns the file has
        self._entries: list[RisEntry] = []
        self._by_accession: dict[str, int] = {}
        self._by_uid: dict[str, int] = {}
        self._matched: set[int] = set()
        self._rows = 0
        self._skipped: dict[str, list[str]] = {"no_key": [], "no_text": [], "duplicates": []}

    # ------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, *, encoding: str = "utf-8", fmt: str | None = None) -> RisReports:
        """Read a CSV or JSONL RIS export (format from the suffix, else sniffed; ``fmt`` forces one).

        ``InvalidInput`` names the file and the fix for: bad encoding, bad JSON, no key column, no
        text column, an unreadable CSV. ``NotFound`` for a missing file.
        """
        p = Path(path)
        if not p.is_file():
            raise NotFound(f"RIS export {p} does not exist", hint="pass the CSV or JSONL file the RIS exported")
        text = _decode(p, encoding)
        kind = _format(p, text, fmt)
        records = _jsonl_records(p, text) if kind == "jsonl" else _csv_records(p, text)
        columns = _columns(p, records)
        keys = tuple(k for k, aliases in KEY_COLUMNS.items() if any(a in columns for a in aliases))
        if not keys:
            raise InvalidInput(
                f"RIS export {p} has no join key column (columns: {', '.join(sorted(columns)) or 'none'})",
                hint="add an accession_number or study_instance_uid column: the join to studies needs one",
            )
        if not any(c in columns for c in (*SECTION_COLUMNS, *REPORT_COLUMNS)):
            raise InvalidInput(
                f"RIS export {p} has no report text column (columns: {', '.join(sorted(columns))})",
                hint="name the text columns findings and impression, or put the whole report in a report column",
            )
        out = cls(p, kind, keys)
        for n, row in records:
            out._add(n, row)
        return out

    def _add(self, n: int, row: dict[str, str]) -> None:
        self._rows += 1
        label = f"row {n}"
        accession = _accession(_first(row, KEY_COLUMNS["accession_number"]))
        uid = _study_uid(_first(row, KEY_COLUMNS["study_instance_uid"]))
        if not accession and not uid:
            self._skipped["no_key"].append(label)
            return
        sections = _sections(row)
        if not sections:
            self._skipped["no_text"].append(label)
            return
        if (uid and uid in self._by_uid) or (accession and accession in self._by_accession):
            self._skipped["duplicates"].append(label)
            return
        names = [w for c in NAME_COLUMNS for v in (row.get(c),) if v for w in _name_parts(v)]
        ids = [v for c in ID_COLUMNS if (v := (row.get(c) or "").strip())] + [k for k in (accession, uid) if k]
        i = len(self._entries)
        self._entries.append(RisEntry(label, sections, tuple(dict.fromkeys(names)), tuple(dict.fromkeys(ids))))
        if uid:
            self._by_uid[uid] = i
        if accession:
            self._by_accession[accession] = i

    # ------------------------------------------------------------------------ the join
    def lookup_entry(
        self, accession_number: str | None = None, study_instance_uid: str | None = None
    ) -> RisEntry | None:
        """The row for a study (by StudyInstanceUID first, then accession number), marked matched; None if none."""
        i = None
        if (uid := _study_uid(study_instance_uid)) and uid in self._by_uid:
            i = self._by_uid[uid]
        elif (acc := _accession(accession_number)) and acc in self._by_accession:
            i = self._by_accession[acc]
        if i is None:
            return None
        self._matched.add(i)
        return self._entries[i]

    def lookup(
        self, accession_number: str | None = None, study_instance_uid: str | None = None
    ) -> dict[str, str] | None:
        """The report sections for a study (unscrubbed; see ``RisEntry.scrubbed``), marking its row matched."""
        entry = self.lookup_entry(accession_number, study_instance_uid)
        return dict(entry.sections) if entry is not None else None

    def unmatched(self) -> list[str]:
        """Labels ("row 17") of the usable rows that no lookup has matched, in file order."""
        return [e.label for i, e in enumerate(self._entries) if i not in self._matched]

    def skipped(self) -> dict[str, list[str]]:
        """Labels of rows left out at load: ``no_key``, ``no_text`` and ``duplicates`` (a key seen in an earlier row)."""
        return {k: list(v) for k, v in self._skipped.items()}

    @property
    def stats(self) -> dict[str, int]:
        """Counts: rows (data records read), reports (usable rows), matched, unmatched, no_key, no_text, duplicates."""
        return {
            "rows": self._rows,
            "reports": len(self._entries),
            "matched": len(self._matched),
            "unmatched": len(self._entries) - len(self._matched),
            **{k: len(v) for k, v in self._skipped.items()},
        }

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"RisReports({self.path.name}, {self.format}, keys={list(self.keys)}, {self.stats})"


# ---------------------------------------------------------------------------- reading
def _decode(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    shown = encoding
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16"
    elif encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except LookupError:
        raise InvalidInput(
            f"encoding {encoding!r} for {path} is not a known codec", hint="use e.g. utf-8, cp1252, latin-1"
        )
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidInput(
            f"RIS export {path} is not valid {shown} text (line {line}, byte {e.start})",
            hint="re-export it as UTF-8, or pass its encoding (e.g. encoding='cp1252' for a Windows export)",
        )


def _format(path: Path, text: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InvalidInput(f"RIS format {fmt!r} for {path} is not known", hint=f"use one of: {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    return "jsonl" if text.lstrip()[:1] in ("{", "[") else "csv"


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of objects
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InvalidInput(
                f"RIS export {path} is not valid JSON (line {e.lineno})", hint="fix the JSON or export JSONL"
            )
        return [(n, _record(path, obj, f"item {n}")) for n, obj in enumerate(items, 1)]
    out: list[tuple[int, dict[str, str]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(
                f"RIS export {path} line {lineno} is not valid JSON ({e.msg})",
                hint="write one JSON object per line (JSONL), or export the RIS report list as CSV",
            )
        out.append((len(out) + 1, _record(path, obj, f"line {lineno}")))
    return out


def _record(path: Path, obj: Any, where: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise InvalidInput(
            f"RIS export {path} {where} is a JSON {type(obj).__name__}, not an object",
            hint='each record must be an object such as {"accession_number": ..., "findings": ...}',
        )
    return {_column(k): _value(v) for k, v in obj.items()}


def _csv_records(path: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    head = text.split("\n", 1)[0]
    try:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise InvalidInput(
                f"RIS export {path} is empty or has no header row", hint="the first line must name the columns"
            )
        columns = [_column(h) for h in header]
        out: list[tuple[int, dict[str, str]]] = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            row = {c: v for c, v in zip(columns, values, strict=False) if c}
            out.append((len(out) + 1, row))
    except csv.Error as e:
        raise InvalidInput(
            f"RIS export {path} cannot be read as CSV near line {reader.line_num} ({e})",
            hint="check the quoting of multi-line report text, or export the report list as JSONL",
        )
    return out


def _columns(path: Path, records: list[tuple[int, dict[str, str]]]) -> set[str]:
    cols: set[str] = set()
    for _, row in records:
        cols.update(row)
    if not records:
        raise InvalidInput(f"RIS export {path} has no records", hint="export at least one report")
    return cols


def _column(name: Any) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def _value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


def _first(row: dict[str, str], columns: tuple[str, ...]) -> str:
    return next((row[c] for c in columns if (row.get(c) or "").strip()), "")


def _accession(value: str | None) -> str:
    return str(value or "").strip().upper()


def _study_uid(value: str | None) -> str:
    return str(value or "").strip().rstrip("\x00").strip()


def _name_parts(value: str) -> Iterator[str]:
    """A person-name cell as parts for the scrubber: the whole value and its words (``^``/``,``/spaces)."""
    yield value.strip()
    yield from (w for w in re.split(r"[\s\^,]+", value) if len(w.strip(".")) >= 2)


# ---------------------------------------------------------------------------- sections
def _clean(text: str) -> str:
    lines = [" ".join(ln.split()) for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(ln for ln in lines if ln)


def _sections(row: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for col, key in SECTION_COLUMNS.items():
        if (text := _clean(row.get(col) or "")) and key not in out:
            out[key] = text
        elif text:
            out[key] += "\n" + text
    report = _clean(_first(row, REPORT_COLUMNS))
    if report:
        for key, text in split_report(report).items():
            out.setdefault(key, text)
    return out


def split_report(text: str) -> dict[str, str]:
    """Split a whole report at its headings ("FINDINGS:" anywhere, "Clinical History:" at a line start).

    Headings are mapped like SR headings (``indexer.sources.sr.section_key``); a heading-like phrase
    that is not a known heading stays in the text. Text before the first heading is ``other``; a
    report with no heading is all ``findings``. A section that appears twice is joined by a newline.
    """
    cuts: list[tuple[int, int, str]] = []  # (start of heading, start of its text, key)
    for m in _HEADING.finditer(text):
        key = section_key(m.group("title") or m.group("upper"))
        if key is not None:
            cuts.append((m.start(), m.end(), key))
    if not cuts:
        return {"findings": text.strip()} if text.strip() else {}
    out: dict[str, str] = {}

    def put(key: str, part: str) -> None:
        part = part.strip()
        if part:
            out[key] = f"{out[key]}\n{part}" if key in out else part

    put("other", text[: cuts[0][0]])
    for i, (_, body, key) in enumerate(cuts):
        put(key, text[body : cuts[i + 1][0] if i + 1 < len(cuts) else len(text)])
    return out
