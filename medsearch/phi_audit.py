"""PHI audit of a catalog: what of the stored text still looks like an identifier.

``audit_phi(catalog)`` scans case titles, diagnoses and report sections, image captions, file
keys and paths, the metadata JSON of cases and images, and the labels, and counts PHI-like spans
per kind: the kinds of ``deid.find_phi`` (name after a title, date, phone, email, id - labelled
or MRN-like digit runs -, age over 89) plus ``dicom_phi_key`` (a metadata key that names a
PS3.15 Annex E attribute, e.g. ``patient_name``) and ``dicom_uid`` (a raw DICOM UID outside the
standard's own ``1.2.840.10008`` root; stored keys are HMAC pseudonyms, never UIDs).

Examples are redacted to their shape ("Dr. Xxxx Xxxxx", "99/99/9999") and located by row id,
so the report itself carries no PHI. Regex-based: it finds what looks like PHI, which includes
false positives (a contributor credited as "Dr. ...", a measurement that looks like a date).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from .catalog import Catalog
from .deid import DATE_MODES, PHI_TAGS, deid_method, find_phi

KINDS = ("name", "date", "phone", "email", "id", "address", "age_over_89", "dicom_phi_key", "dicom_uid")
_PHI_KEYS = {k.lower() for k in PHI_TAGS}
_UID = re.compile(r"(?<![\w.])[12](?:\.(?:0|[1-9]\d{0,38})){3,}(?![\w.])")
_MASKED = re.compile(r"[\sX\-.,:]*X{2,}[\sX\-.,:]*")  # XXXX: already de-identified by the data set
_DATE_SEPS = re.compile(r"(?<=\d)[-/.](?=\d)")
_URL = re.compile(r"\b(?:https?|ftp)://\S+")
_STANDARD_UID_ROOT = "1.2.840.10008."  # transfer syntaxes, SOP classes: not about a patient
_CONTEXT = 24
_METHODS = {deid_method(m) for m in DATE_MODES}


def scan_text(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of PHI-like spans in one string: ``find_phi`` plus raw DICOM UIDs.

    Not counted: digit runs inside a URL (``https://...?id=...``) or a UID as ids, dates or phones;
    spans a data set already masked (``Dr. XXXX``); numeric "dates" whose separators differ
    (``12.3/38``, lab shorthand).
    """
    uids = [m for m in _UID.finditer(text) if len(m.group()) >= 10]
    inside = [(m.start(), m.end()) for m in _URL.finditer(text)] + [(m.start(), m.end()) for m in uids]
    spans = [
        sp
        for sp in find_phi(text)
        if (sp[0] in ("name", "email") or not any(a <= sp[1] and sp[2] <= b for a, b in inside))
        and not _MASKED.fullmatch(text[sp[1] : sp[2]])
        and not (sp[0] == "date" and len(set(_DATE_SEPS.findall(text[sp[1] : sp[2]]))) > 1)
    ]
    for m in uids:  # a digit run inside a UID is not a date or an MRN; the UID itself may be PHI
        if not m.group().startswith(_STANDARD_UID_ROOT) and not any(s < m.end() and m.start() < e for _, s, e in spans):
            spans.append(("dicom_uid", m.start(), m.end()))
    return sorted(spans, key=lambda s: s[1])


def shape(s: str) -> str:
    """A string's shape: letters to x/X, digits to 9, everything else kept ("Dr. Xxxx", "999-9999")."""
    return "".join("9" if c.isdigit() else ("X" if c.isupper() else "x") if c.isalpha() else c for c in s)


def redact(text: str, spans: list[tuple[str, int, int]], target: tuple[str, int, int]) -> str:
    """A short window around ``target`` with every PHI-like span in it replaced by its kind (and shape)."""
    _, t0, t1 = target
    lo, hi = max(0, t0 - _CONTEXT), min(len(text), t1 + _CONTEXT)
    out, pos = [], lo
    for kind, s, e in spans:
        if e <= lo or s >= hi:
            continue
        out.append(text[pos : max(pos, s)])
        out.append(f"[{kind.upper()} {shape(text[s:e])}]" if (s, e) == (t0, t1) else f"[{kind.upper()}]")
        pos = max(pos, e)
    out.append(text[pos:hi])
    snippet = " ".join("".join(out).split())
    return ("…" if lo else "") + snippet + ("…" if hi < len(text) else "")


def audit_phi(catalog: Catalog, *, examples: int = 3) -> dict[str, Any]:
    """Scan the catalog; return {'scanned', 'findings', 'kinds': {kind: {count, where, examples}}, 'report_sources'}.

    ``report_sources``: {"sr"|"ris": {"cases": n, "scrubbed": m}} - cases whose report text came from a
    DICOM SR or a RIS export, and how many of them went through the text scrubber (``--no-deid-text``
    leaves it out).
    """
    kinds: dict[str, dict[str, Any]] = {k: {"count": 0, "where": {}, "examples": []} for k in KINDS}
    scanned = {"cases": 0, "images": 0, "labels": 0, "chars": 0}
    report_sources: dict[str, dict[str, int]] = {}

    def hit(kind: str, field: str, where: str, example: str) -> None:
        k = kinds[kind]
        k["count"] += 1
        k["where"][field] = k["where"].get(field, 0) + 1
        if len(k["examples"]) < examples:
            k["examples"].append({"where": where, "field": field, "text": example})

    def text_field(value: Any, field: str, where: str) -> None:
        if value is None:
            return
        s = value if isinstance(value, str) else str(value)
        scanned["chars"] += len(s)
        spans = scan_text(s)
        for span in spans:
            hit(span[0], field, where, redact(s, spans, span))

    def json_field(raw: str | None, field: str, where: str) -> None:
        for path, key, value in _walk(json.loads(raw or "{}")):
            if key is not None and key.replace("_", "").lower() in _PHI_KEYS:
                hit("dicom_phi_key", f"{field}.{path}", where, f"key {key!r} (a PS3.15 PHI attribute)")
            if path == "deid" and value in _METHODS:  # medsearch's own description of the method applied
                continue
            if isinstance(value, str | int) and not isinstance(value, bool):
                text_field(value, f"{field}.{path}", where)

    db = catalog.db
    for cid, key, title, diagnosis, sections, meta in db.execute(
        "SELECT id, key, title, diagnosis, sections, meta FROM cases ORDER BY id"
    ):
        scanned["cases"] += 1
        where = f"case {cid}"
        text_field(key, "cases.key", where)
        text_field(title, "cases.title", where)
        text_field(diagnosis, "cases.diagnosis", where)
        for name, text in json.loads(sections or "{}").items():
            text_field(text, f"cases.sections.{name}", where)
        json_field(meta, "cases.meta", where)
        count_report_source(report_sources, json.loads(meta or "{}"))
    for iid, key, path, caption, meta in db.execute("SELECT id, key, path, caption, meta FROM images ORDER BY id"):
        scanned["images"] += 1
        where = f"image {iid}"
        text_field(key, "images.key", where)
        text_field(path, "images.path", where)
        text_field(caption, "images.caption", where)
        json_field(meta, "images.meta", where)
    for case_id, image_id, name, value in db.execute("SELECT case_id, image_id, name, value FROM labels"):
        scanned["labels"] += 1
        text_field(value, f"labels.{name}", f"image {image_id}" if image_id else f"case {case_id}")
    for k in kinds.values():  # fields by count, most first
        k["where"] = dict(sorted(k["where"].items(), key=lambda kv: (-kv[1], kv[0])))
    findings = sum(k["count"] for k in kinds.values())
    return {"scanned": scanned, "findings": findings, "kinds": kinds, "report_sources": report_sources}


def count_report_source(counts: dict[str, dict[str, int]], meta: dict[str, Any]) -> None:
    """Add a case to ``{source: {cases, scrubbed}}`` by its meta ``report_source`` ("sr", "ris") and ``report_scrubbed``.

    Cases whose report came from a sidecar or dataset carry no ``report_source`` and are not counted.
    """
    source = meta.get("report_source")
    if isinstance(source, str) and source:
        c = counts.setdefault(source, {"cases": 0, "scrubbed": 0})
        c["cases"] += 1
        c["scrubbed"] += meta.get("report_scrubbed") is True


def _walk(obj: Any, path: str = "") -> Iterator[tuple[str, str | None, Any]]:
    """(dotted path, key or None, value) of every value in a JSON structure, leaves and containers."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            yield p, str(k), v
            yield from _walk(v, p) if isinstance(v, dict | list) else ()
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict | list):
                yield from _walk(v, path)
            else:
                yield path, None, v
