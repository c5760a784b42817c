"""DICOM trees -> studies and series: one case per study, a series level, slices in position order.

``iter_dicom`` streams, per study: the ``CaseRecord`` (key: pseudonym of StudyInstanceUID, report
sections from the study's SR objects or a RIS export), then per series a ``SeriesRecord`` followed by
its ``ImageRecord``s in slice order, then ``StudyDone``. Problems are reported by name: ``Skipped``
for files that are not stored, ``Note`` for what was stored with a caveat (a series ordered by
InstanceNumber because its geometry is missing or inconsistent, a folder mixing several studies).

Memory stays flat in the number of studies: a first pass reads the headers to learn where each
study's last file is (keeping the last ``HEADER_CACHE`` of them, so a tree of up to that many files is
read once); the second pass holds only the studies whose files it has not finished (one at a time for
the usual one-folder-per-study export).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medsearch.config import ImagingConfig
from medsearch.errors import InvalidInput
from medsearch.imaging import is_dicom_file, preset_for
from medsearch.records import ImageRecord, Skipped
from medsearch.studies import DEFAULT_SLICES, SeriesRecord, SliceRef, median_spacing, order_slices, spread

from .common import Item, Note, StudyDone
from .dicom import (
    Instance,
    Report,
    _body_region,
    _plane,
    _walk,
    case_record,
    check_options,
    image_records,
    read_instance,
)

HEADER_CACHE = 1024  # headers kept from the first pass (a few KB each)

# (accession_number, study_instance_uid) -> report sections, or None: a RIS export's lookup
ReportLookup = Callable[[str | None, str], dict[str, str] | None]


def iter_dicom(
    root: Path,
    source: str,
    salt: str,
    frames: str = "middle",
    *,
    dates: str = "remove",
    allow_burned_in: bool = False,
    config: ImagingConfig = ImagingConfig(),
    slices: int | None = DEFAULT_SLICES,
    reports: ReportLookup | None = None,
    deid_reports: bool = True,
) -> Iterator[Item]:
    """Stream a DICOM file or folder tree as studies (see the module docstring).

    ``slices``: embed at most this many slices per series, spread over its extent (None: all).
    ``frames``: ``"middle"`` (one record per file), ``"first"``, or ``"all"`` (one per frame, keys
    ``{instance_key}#f{n}``). ``salt`` keys the pseudonyms and must not be empty. ``reports`` looks a
    study's report up in a RIS export by accession number / StudyInstanceUID (in memory only).
    Report text from SR objects and the RIS export goes through ``medsearch.deid.scrub_text`` unless
    ``deid_reports=False``.
    """
    root = Path(root)
    check_options(frames, dates, salt, root)
    if slices is not None and (type(slices) is not int or slices < 1):
        raise InvalidInput(f"slices={slices!r} is not a slice count", hint="use a whole number from 1, or all")
    return _iter(root, source, salt, frames, dates, allow_burned_in, config, slices, reports, deid_reports)


class _Study:
    """The instances (and SR reports) of one study read so far."""

    def __init__(self) -> None:
        self.instances: list[Instance] = []
        self.reports: list[Report] = []
        self.first_file: dict[str, Path] = {}  # instance key -> file, to name duplicates


def _files(root: Path) -> Iterator[Path | Skipped]:
    if root.is_file():
        yield root
        return
    for f in _walk(root):
        if isinstance(f, Skipped) or is_dicom_file(f):
            yield f


def _iter(
    root: Path, source: str, salt: str, frames: str, dates: str, allow_burned_in: bool, config: ImagingConfig,
    slices: int | None, reports: ReportLookup | None, deid_reports: bool,
) -> Iterator[Item]:  # fmt: skip
    # pass 1: where does each study end, and which folders mix studies? The headers of the last
    # HEADER_CACHE files are kept, so a tree of that size is read once (memory stays bounded).
    read = functools.partial(read_instance, salt=salt, dates=dates, allow_burned_in=allow_burned_in, config=config)
    cache: OrderedDict[Path, Instance | Report | Skipped] = OrderedDict()
    last: dict[str, int] = {}
    folder_study: dict[str, str] = {}
    mixed: dict[str, set[str]] = {}
    for ordinal, f in enumerate(_files(root)):
        if isinstance(f, Skipped):
            continue
        r = read(f)
        cache[f] = r
        if len(cache) > HEADER_CACHE:
            cache.popitem(last=False)
        if isinstance(r, Skipped):
            continue
        key = r.study_key
        last[key] = ordinal
        folder = str(f.parent)
        first = folder_study.setdefault(folder, key)
        if first != key:
            mixed.setdefault(folder, {first}).add(key)
    flush_at: dict[int, list[str]] = {}
    for key, ordinal in last.items():
        flush_at.setdefault(ordinal, []).append(key)
    del last, folder_study

    # pass 2: a study is emitted right after its last file
    open_studies: dict[str, _Study] = {}
    for ordinal, f in enumerate(_files(root)):
        if isinstance(f, Skipped):
            yield f
        else:
            r = cache.pop(f, None) or read(f)
            if isinstance(r, Skipped):
                yield r
            else:
                st = open_studies.setdefault(r.study_key, _Study())
                if isinstance(r, Report):
                    st.reports.append(r)
                elif r.instance_key in st.first_file:
                    yield Skipped(str(f), f"same SOPInstanceUID as {st.first_file[r.instance_key]} (a copy); kept that one")
                else:
                    st.first_file[r.instance_key] = f
                    st.instances.append(r)
        for key in flush_at.pop(ordinal, ()):
            if key in open_studies:
                yield from _emit(open_studies.pop(key), source, frames, dates, slices, reports, deid_reports)
    for st in open_studies.values():  # files that changed between the passes
        yield from _emit(st, source, frames, dates, slices, reports, deid_reports)
    for folder, keys in sorted(mixed.items()):
        yield Note(folder, f"holds files of {len(keys)} studies; each was stored as its own case")


def _emit(
    st: _Study, source: str, frames: str, dates: str, slices: int | None, reports: ReportLookup | None,
    deid_reports: bool,
) -> Iterator[Item]:  # fmt: skip
    if not st.instances:
        for rep in st.reports:
            yield Skipped(str(rep.path), "SR report of a study with no images in this tree: nothing to attach it to")
        return
    first = st.instances[0]
    sections: dict[str, str] = {}
    origin: list[str] = []
    for rep in st.reports:
        for name, text in rep.sections.items():
            sections[name] = f"{sections[name]}\n\n{text}" if name in sections else text
    if sections:
        origin.append("sr")
    if reports is not None:
        ris = reports(first.accession, first.study_uid)
        if ris and any(name not in sections for name in ris):
            origin.append("ris")
        for name, text in (ris or {}).items():
            sections.setdefault(name, text)  # an SR in the study wins over the RIS row
    redactions = 0
    if sections and deid_reports:
        from medsearch.deid import scrub_sections

        names = {n for inst in st.instances for n in inst.names}
        sections, redactions = scrub_sections(sections, known_names=names)
    case = case_record(first, source, dates, sections)
    if origin:  # where the report text came from, for the ingest summary and `medsearch audit-phi`
        from dataclasses import replace

        case = replace(case, meta={**case.meta, "report_source": "+".join(origin), "report_scrubbed": deid_reports,
                                   "report_redactions": redactions})  # fmt: skip
    yield case
    by_series: dict[str, list[Instance]] = {}
    for inst in st.instances:
        by_series.setdefault(inst.series_key, []).append(inst)
    ordered = sorted(by_series.values(), key=lambda s: (s[0].series_number is None, s[0].series_number or 0,
                                                        s[0].series_key))  # fmt: skip
    for insts in ordered:
        yield from _series(insts, source, frames, dates, slices)
    yield StudyDone(first.study_key)


def _series(insts: list[Instance], source: str, frames: str, dates: str, slices: int | None) -> Iterator[Item]:
    so = order_slices([i.orientation for i in insts], [i.position for i in insts], [i.instance_number for i in insts])
    images: list[ImageRecord] = []
    positions: list[float | None] = []
    for rank, idx in enumerate(so.order):
        recs = image_records(insts[idx], source, frames, dates)
        images.extend(recs)
        positions.extend([so.positions[rank] if so.positions else None] * len(recs))
    sorted_pos = [p for p in positions if p is not None] if so.positions else None
    chosen = set(spread(len(images), slices, sorted_pos))
    refs = tuple(SliceRef(im.key, n, positions[n], n in chosen) for n, im in enumerate(images))
    head = insts[so.order[0]]
    meta: dict[str, Any] = head.meta
    body_part = meta.get("body_part")
    window = head.window
    rec = SeriesRecord(
        source=source, key=head.series_key, case_key=head.study_key, number=head.series_number,
        modality=head.modality or None, body_part=body_part, body_region=_body_region(body_part), plane=_plane(meta),
        orientation=head.orientation if so.positions else None, slice_count=len(images),
        thickness=meta.get("slice_thickness"), spacing=median_spacing(sorted_pos),
        position_range=(sorted_pos[0], sorted_pos[-1]) if sorted_pos else None, ordered_by=so.ordered_by,
        order_note=so.note, window=window,
        preset=preset_for(body_part) if head.modality == "CT" and window is None else None, slices=refs,
    )  # fmt: skip
    if so.note:
        where = f"series {head.series_number if head.series_number is not None else '?'} in {head.path.parent}"
        yield Note(where, f"{len(insts)} files ordered by InstanceNumber, not by position ({so.note})")
    yield rec
    yield from images

