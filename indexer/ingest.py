"""Ingest: reader items -> validated catalog rows, idempotent and resumable.

Each chunk of ``chunk`` items is one transaction, so a crash loses at most the chunk in
flight and a rerun redoes it without duplicates (rows are keyed by (source, key) and
compared by content hash). A DICOM study is never split across transactions: it goes in
whole or not at all, so an ingest that fails leaves every study stored before as it was.
Bad items are reported by name, counted and skipped; nothing already stored is touched by a
failed item.

DICOM studies: ``slices`` (default 8) embeds at most that many slices per series, spread over
its extent; the other slices are catalogued with status ``deferred`` (no vector, not searched)
until an ingest with more slices (or ``None``: all) selects them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from medsearch.catalog import Catalog, now
from medsearch.config import ImagingConfig
from medsearch.errors import InvalidImage, InvalidInput, MedsearchError
from medsearch.records import CaseRecord, ImageRecord, Skipped
from medsearch.studies import DEFAULT_SLICES, SeriesRecord, SliceRef

from .sources.common import Item, Note, RecentKeys, StudyDone
from .sources.layout import detect_layout, read_path


@dataclass
class IngestSummary:
    path: str
    layout: str
    cases_added: int = 0
    cases_updated: int = 0
    images_added: int = 0
    images_updated: int = 0
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    filtered: int = 0  # left out by --split
    seconds: float = 0.0
    series_added: int = 0
    series_updated: int = 0
    slices_selected: int = 0  # slices of the series read now that will be embedded
    slices_deferred: int = 0  # slices of the series read now catalogued without a vector
    notes: list[Note] = field(default_factory=list)  # e.g. a series ordered by InstanceNumber
    reports_unmatched: list[str] = field(default_factory=list)  # RIS rows that matched no study ("row 17")
    reports: dict[str, int] = field(default_factory=dict)  # cases whose report came from "sr"/"ris"; "scrubbed"

    @property
    def counts(self) -> dict[str, int]:
        return {
            "cases_added": self.cases_added,
            "cases_updated": self.cases_updated,
            "images_added": self.images_added,
            "images_updated": self.images_updated,
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "series_added": self.series_added,
            "series_updated": self.series_updated,
            "slices_selected": self.slices_selected,
            "slices_deferred": self.slices_deferred,
        }

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "layout": self.layout,
            **self.counts,
            "filtered_by_split": self.filtered,
            "seconds": round(self.seconds, 2),
            "skipped_items": [{"item": s.item, "reason": s.reason} for s in self.skipped],
            "notes": [{"item": n.item, "message": n.message} for n in self.notes],
            "reports": self.reports,
            "reports_unmatched": self.reports_unmatched,
        }


def file_sha256(path: str, max_bytes: int) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed; refuses files over ``max_bytes``."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
            if n > max_bytes:
                raise InvalidImage(f"{path}: file larger than {max_bytes} bytes", hint="raise ImagingConfig.max_file_bytes")
            h.update(chunk)
    return h.hexdigest(), n


def ingest_path(
    catalog: Catalog,
    path: str | Path,
    *,
    source: str | None = None,
    splits: Sequence[str] | None = None,
    sidecar: Path | None = None,
    imaging: ImagingConfig = ImagingConfig(),
    chunk: int = 256,
    deid_text: bool = False,
    progress: Callable[[Item], None] | None = None,
    slices: int | None = DEFAULT_SLICES,
    reports: Path | None = None,
    deid_reports: bool = True,
) -> IngestSummary:
    """Ingest one dataset folder, image folder, DICOM tree or file into the catalog.

    ``slices``: per DICOM series, how many slices to embed (None: all). ``reports``: a RIS export
    (CSV/JSONL) joined to the DICOM studies in memory by accession number or StudyInstanceUID.
    ``deid_reports``: report text from DICOM SR and the RIS export goes through the text scrubber
    (``medsearch.deid.scrub_sections``) unless False.
    """
    p = Path(path)
    try:
        layout = detect_layout(p)
    except FileNotFoundError:
        raise InvalidInput(f"{p} does not exist", hint="give a dataset folder, image folder, DICOM tree or file") from None
    ris = _load_reports(reports) if reports is not None else None
    lookup = None
    if ris is not None:
        def lookup(accession: str | None, study_uid: str) -> dict[str, str] | None:
            return ris.lookup(accession_number=accession, study_instance_uid=study_uid)

    items = read_path(p, source=source, salt=catalog.salt, sidecar=sidecar, slices=slices, reports=lookup, config=imaging,
                      deid_reports=deid_reports)
    summary = ingest_items(
        catalog, items, path=str(p.resolve()), layout=layout, splits=splits, imaging=imaging, chunk=chunk,
        deid_text=deid_text, progress=progress,
    )  # fmt: skip
    if ris is not None:
        summary.reports_unmatched = list(ris.unmatched())
    return summary


def _load_reports(path: Path):  # -> indexer.sources.ris.RisReports
    try:
        from .sources.ris import RisReports  # the RIS export reader (issue 11 item 6)
    except ImportError:
        raise InvalidInput(
            f"cannot read the RIS export {path}: the RIS report reader is not installed in this build",
            hint="ingest without --reports",
        ) from None
    return RisReports.load(path)


def ingest_items(
    catalog: Catalog,
    items: Iterable[Item],
    *,
    path: str,
    layout: str,
    splits: Sequence[str] | None = None,
    imaging: ImagingConfig = ImagingConfig(),
    chunk: int = 256,
    deid_text: bool = False,
    progress: Callable[[Item], None] | None = None,
) -> IngestSummary:
    from medsearch.imaging import ImageInfo, probe_image
    from medsearch.text import split_sentences

    scrub = None
    if deid_text:
        from medsearch.deid import scrub_text as scrub

    t0 = time.perf_counter()
    summary = IngestSummary(path=path, layout=layout)
    wanted = {s.lower() for s in splits} if splits else None
    log_id = catalog.log_ingest({"path": printable(path), "reader": layout, "started_at": now()})
    case_ids = RecentKeys()  # (source, key) -> case id; a forgotten one is looked up in the catalog
    dropped_cases: set[tuple[str, str]] = set()
    series = _SeriesLinks(catalog, summary)
    in_study = False  # inside a DICOM study: no commit until its StudyDone
    status = "failed"
    try:
        pending = 0
        tx = catalog.db.atomic()
        tx.__enter__()
        try:
            for item in items:
                if progress:
                    progress(item)
                if isinstance(item, Skipped):
                    summary.skipped.append(Skipped(printable(item.item), printable(item.reason)))
                    continue
                if isinstance(item, Note):
                    summary.notes.append(Note(printable(item.item), printable(item.message)))
                    continue
                if isinstance(item, StudyDone | SeriesRecord):
                    series.finish()
                    in_study = isinstance(item, SeriesRecord)
                    ck = (item.source, item.case_key) if isinstance(item, SeriesRecord) else None
                    if ck is not None and ck not in dropped_cases:
                        cid = case_ids.get(ck) or catalog.case_id_for_key(item.case_key, item.source)
                        if cid is not None:
                            series.start(item, cid)
                    if not in_study and pending >= chunk:
                        tx = _commit(catalog, tx)
                        pending = 0
                    continue
                if (bad := _not_text(item)) is not None:  # e.g. a file name with bytes that are not UTF-8
                    name = item.path if isinstance(item, ImageRecord) else f"{item.source}:{item.key}"
                    summary.skipped.append(Skipped(printable(name), bad))
                    continue
                if isinstance(item, CaseRecord):
                    in_study = in_study or item.meta.get("format") == "dicom"
                    if wanted is not None and (item.split or "").lower() not in wanted:
                        dropped_cases.add((item.source, item.key))
                        summary.filtered += 1
                        continue
                    rec = item
                    if origin := item.meta.get("report_source"):
                        for o in str(origin).split("+"):
                            summary.reports[o] = summary.reports.get(o, 0) + 1
                        if item.meta.get("report_scrubbed"):
                            summary.reports["scrubbed"] = summary.reports.get("scrubbed", 0) + 1
                    if scrub is not None:
                        rec = replace(rec, sections={k: scrub(v) for k, v in rec.sections.items()})
                    sentences = [
                        (sec, i, s) for sec, text in rec.sections.items() for i, s in enumerate(split_sentences(text))
                    ]
                    cid, st = catalog.upsert_case(rec, sentences=sentences)
                    case_ids[(rec.source, rec.key)] = cid
                    if st == "added":
                        summary.cases_added += 1
                    elif st == "updated":
                        summary.cases_updated += 1
                    else:
                        summary.unchanged += 1
                elif isinstance(item, ImageRecord):
                    ck = (item.source, item.case_key)
                    if ck in dropped_cases or (wanted is not None and (item.split or "").lower() not in wanted):
                        summary.filtered += 1
                        continue
                    cid = case_ids.get(ck)
                    if cid is None:
                        cid = catalog.case_id_for_key(item.case_key, item.source)
                        if cid is None:
                            summary.skipped.append(Skipped(item.path, f"its case {item.case_key!r} was not ingested"))
                            continue
                        case_ids[ck] = cid
                    try:
                        if not Path(item.path).is_file():
                            raise InvalidImage(f"{item.path}: referenced image file is missing or not a regular file")
                        if series.has(item.key):  # a slice the series reader checked (header, decoder, length)
                            info = ImageInfo("DICOM", int(item.meta.get("columns") or 0), int(item.meta.get("rows") or 0),
                                             int(item.meta.get("frames") or 1), str(item.meta.get("photometric") or ""),
                                             True)  # fmt: skip
                        else:
                            info = probe_image(item.path, config=imaging)
                        sha, nbytes = file_sha256(item.path, imaging.max_file_bytes)
                    except (MedsearchError, OSError) as e:
                        summary.skipped.append(Skipped(item.path, _reason(e)))
                        continue
                    rec = item
                    if scrub is not None and rec.caption:
                        rec = replace(rec, caption=scrub(rec.caption))
                    image_id, st = catalog.upsert_image(
                        rec, cid, sha256=sha if rec.frame is None else f"{sha}#{rec.frame}", nbytes=nbytes,
                        width=info.width, height=info.height,
                    )  # fmt: skip
                    series.add(rec.key, image_id)
                    if st == "added":
                        summary.images_added += 1
                    elif st == "updated":
                        summary.images_updated += 1
                    else:
                        summary.unchanged += 1
                pending += 1
                if pending >= chunk and not in_study:
                    tx = _commit(catalog, tx)
                    pending = 0
            series.finish()
        except BaseException as e:
            tx.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            tx.__exit__(None, None, None)
        status = "ok"
    finally:
        summary.seconds = time.perf_counter() - t0
        catalog.finish_ingest(
            log_id, status, summary.counts, [{"item": s.item, "reason": s.reason} for s in summary.skipped]
        )
    return summary


def _commit(catalog: Catalog, tx):
    """Commit the transaction ``tx`` and open the next one."""
    tx.__exit__(None, None, None)
    tx = catalog.db.atomic()
    tx.__enter__()
    return tx


class _SeriesLinks:
    """The series being ingested: its row, and the slices to link to it once their images are stored."""

    def __init__(self, catalog: Catalog, summary: IngestSummary) -> None:
        self.catalog, self.summary = catalog, summary
        self.series_id: int | None = None
        self.refs: dict[str, SliceRef] = {}
        self.before: dict[str, str] = {}
        self.rows: list[tuple[int, SliceRef, str | None]] = []

    def start(self, rec: SeriesRecord, case_id: int) -> None:
        self.series_id, st = self.catalog.upsert_series(rec, case_id)
        if st == "added":
            self.summary.series_added += 1
        elif st == "updated":
            self.summary.series_updated += 1
        else:
            self.summary.unchanged += 1
        self.refs = {r.key: r for r in rec.slices}
        self.before = self.catalog.image_statuses(rec.source, list(self.refs))

    def has(self, key: str) -> bool:
        return self.series_id is not None and key in self.refs

    def add(self, key: str, image_id: int) -> None:
        ref = self.refs.get(key)
        if self.series_id is not None and ref is not None:
            self.rows.append((image_id, ref, self.before.get(key)))

    def finish(self) -> None:
        if self.series_id is not None and self.rows:
            deferred = self.catalog.link_slices(self.series_id, self.rows)
            self.summary.slices_deferred += deferred
            self.summary.slices_selected += len(self.rows) - deferred
        self.series_id, self.refs, self.before, self.rows = None, {}, {}, []


def printable(s: str) -> str:
    """``s`` with undecodable bytes of a file name (lone surrogates) spelled as ``\\udcxx`` escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_text(rec: CaseRecord | ImageRecord) -> str | None:
    """Why a record cannot be stored (a string that is not valid Unicode), or None."""
    try:
        json.dumps(asdict(rec), ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        what = "file name" if isinstance(rec, ImageRecord) else "key or text"
        return f"the {what} is not valid UTF-8 text; rename the file or fix the record"
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, MedsearchError):
        return e.message
    if isinstance(e, OSError):
        return f"cannot read file: {e.strerror or e}"
    return str(e)
