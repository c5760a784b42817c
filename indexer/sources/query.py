"""A study folder as a query: the slices ``medsearch similar STUDY_FOLDER`` embeds, and the study's key."""

from __future__ import annotations

from pathlib import Path

from medsearch.config import ImagingConfig
from medsearch.errors import InvalidInput
from medsearch.records import ImageRecord, Skipped
from medsearch.studies import DEFAULT_SLICES, SeriesRecord, SliceRef, spread

from .common import Note, StudyDone
from .folders import IMAGE_SUFFIXES, walk_files
from .series import iter_dicom


def query_study(
    folder: Path, salt: str, *, slices: int | None = DEFAULT_SLICES, config: ImagingConfig = ImagingConfig()
) -> tuple[str | None, list[tuple[str, int | None]], list[Skipped | Note]]:
    """A study folder as a query: (study key, [(path, frame)] of the selected slices, problems).

    DICOM files: their one study (``InvalidInput`` when the folder mixes studies), ``slices`` per series
    chosen as at ingest. A folder without DICOM: its image files in name order (no study key).
    """
    folder = Path(folder)
    keys: list[str] = []
    chosen: list[tuple[str, int | None]] = []
    problems: list[Skipped | Note] = []
    refs: dict[str, SliceRef] = {}
    for item in iter_dicom(folder, source="query", salt=salt, slices=slices, config=config):
        if isinstance(item, Skipped | Note):
            problems.append(item)
        elif isinstance(item, SeriesRecord):
            refs = {r.key: r for r in item.slices}
        elif isinstance(item, StudyDone):
            keys.append(item.key)
        elif isinstance(item, ImageRecord) and refs.get(item.key) and refs[item.key].embed:
            chosen.append((item.path, item.frame))
    if len(keys) > 1:
        raise InvalidInput(
            f"{folder} holds {len(keys)} studies; a study query takes one",
            hint="give the folder of one study (or query one image file at a time)",
        )
    if not keys and folder.is_dir():
        files = [f for f in walk_files(folder) if isinstance(f, Path) and f.suffix.lower() in IMAGE_SUFFIXES]
        picked = spread(len(files), slices)
        chosen = [(str(files[i]), None) for i in picked]
    if not chosen:
        raise InvalidInput(f"{folder} holds no image this medsearch can read", hint="give a folder of DICOM or PNG/JPEG slices")
    return (keys[0] if keys else None), chosen, problems
