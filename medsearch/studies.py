"""Studies and series: slice geometry, slice selection, and the whole-study similarity rule.

Pure functions (numpy only) shared by the DICOM reader (``indexer.sources.series``), the searcher
and the API, so that ordering, selection and scoring follow one rule everywhere.

Slice order. A slice's position is its ImagePositionPatient projected on the series normal,
``n = row x col`` of ImageOrientationPatient: ``position = n . IPP`` (mm). Slices are ordered by
that position, never by file name. When a series lacks usable geometry (a slice without IPP/IOP,
orientations that differ between slices, two slices at the same position), it falls back to
InstanceNumber order (then reading order) and says why (``SliceOrder.note``).

Slice selection (``--slices N``). A series of more than N slices embeds N of them spread over its
extent: the slices nearest to N evenly spaced positions from the first to the last slice (by index
when there are no positions). The others are catalogued but not embedded.

Whole-study score. For a query study Q (slices q) and a prior study P (its embedded slices p):

    score(Q, P) = mean over q in Q of  max over p in P of  cos(q, p)

so every query slice must find a good match somewhere in the prior study; a prior that matches one
query slice very well and the rest badly scores lower than one that matches all of them. The hit's
image is the prior slice with the highest similarity to any query slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GEOMETRY_TOLERANCE = 1e-3  # direction-cosine difference / mm between positions treated as equal
DEFAULT_SLICES = 8


@dataclass(frozen=True)
class SliceRef:
    """One slice of a series as the reader ordered it: the image key, its place and whether to embed it."""

    key: str
    index: int  # 0 .. slice_count-1 in slice order
    position: float | None  # mm along the series normal, None when the series fell back to InstanceNumber
    embed: bool


@dataclass(frozen=True)
class SeriesRecord:
    """One series of a study (no identifiers: keys are pseudonyms, no descriptions or dates)."""

    source: str
    key: str  # pseudonym of SeriesInstanceUID
    case_key: str  # the study's case key (pseudonym of StudyInstanceUID)
    number: int | None = None  # SeriesNumber
    modality: str | None = None
    body_part: str | None = None
    body_region: str | None = None
    plane: str | None = None
    orientation: tuple[float, ...] | None = None
    slice_count: int = 0
    thickness: float | None = None  # SliceThickness (mm)
    spacing: float | None = None  # median distance between neighbouring positions (mm)
    position_range: tuple[float, float] | None = None
    ordered_by: str = "position"  # "position" or "instance_number"
    order_note: str | None = None  # why the series fell back to InstanceNumber order
    window: tuple[float, float] | None = None  # the series' own window (center, width)
    preset: str | None = None  # CT preset by body part, used when the files carry no window
    slices: tuple[SliceRef, ...] = ()

    @property
    def embedded(self) -> int:
        return sum(1 for s in self.slices if s.embed)


@dataclass(frozen=True)
class SliceOrder:
    order: list[int]  # input indices in slice order
    positions: list[float] | None  # positions in slice order (None: InstanceNumber fallback)
    ordered_by: str
    note: str | None


def slice_normal(orientation: Sequence[float]) -> np.ndarray | None:
    """Unit normal of a slice from its 6 direction cosines (row, column), or None when degenerate."""
    o = np.asarray(orientation, dtype=np.float64)
    if o.shape != (6,) or not np.all(np.isfinite(o)):
        return None
    n = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(n))
    return None if norm < 0.5 else n / norm


def order_slices(
    orientations: Sequence[Sequence[float] | None],
    positions: Sequence[Sequence[float] | None],
    numbers: Sequence[int | None],
) -> SliceOrder:
    """Order the slices of one series by position along its normal (see the module docstring).

    Inputs are per slice in reading order: ImageOrientationPatient (6), ImagePositionPatient (3),
    InstanceNumber. Returns the order and, when geometry was usable, the sorted positions.
    """
    n = len(numbers)
    note = _geometry_problem(orientations, positions)
    if note is None:
        normal = slice_normal(orientations[0])  # type: ignore[arg-type]
        pos = [float(np.dot(normal, np.asarray(p, dtype=np.float64))) for p in positions]  # type: ignore[arg-type]
        order = sorted(range(n), key=lambda i: pos[i])
        sorted_pos = [pos[i] for i in order]
        if n > 1 and min(np.diff(sorted_pos)) < GEOMETRY_TOLERANCE:
            same = int(np.sum(np.diff(sorted_pos) < GEOMETRY_TOLERANCE)) + 1
            note = f"{same} slices share a position"
        else:
            return SliceOrder(order, sorted_pos, "position", None)
    order = sorted(range(n), key=lambda i: (numbers[i] is None, numbers[i] if numbers[i] is not None else 0, i))
    missing = sum(1 for x in numbers if x is None)
    if missing:
        note += f"; {missing} without InstanceNumber kept in reading order"
    return SliceOrder(order, None, "instance_number", note)


def _geometry_problem(
    orientations: Sequence[Sequence[float] | None], positions: Sequence[Sequence[float] | None]
) -> str | None:
    no_pos = sum(1 for p in positions if p is None or len(p) != 3)
    no_iop = sum(1 for o in orientations if o is None or len(o) != 6)
    if no_pos or no_iop:
        parts = [f"{no_pos} without ImagePositionPatient"] if no_pos else []
        parts += [f"{no_iop} without ImageOrientationPatient"] if no_iop else []
        return "missing geometry: " + ", ".join(parts)
    first = np.asarray(orientations[0], dtype=np.float64)
    if slice_normal(first) is None:
        return "ImageOrientationPatient is degenerate (row and column directions are parallel)"
    differ = sum(1 for o in orientations if np.max(np.abs(np.asarray(o, dtype=np.float64) - first)) > GEOMETRY_TOLERANCE)
    if differ:
        return f"inconsistent geometry: {differ} slices have another ImageOrientationPatient"
    return None


def spread(count: int, n: int | None, positions: Sequence[float] | None = None) -> list[int]:
    """Indices (ascending) of ``n`` slices spread over a series of ``count``; all when ``n`` is None or >= count.

    With ``positions`` (sorted), the slices nearest to ``n`` evenly spaced positions from the first to
    the last; otherwise evenly spaced indices. One slice -> the middle one.
    """
    if n is None or n >= count:
        return list(range(count))
    if n <= 0:
        return []
    if n == 1:
        return [count // 2]
    if positions is None or len(positions) != count or positions[-1] - positions[0] <= 0:
        return sorted({round(i * (count - 1) / (n - 1)) for i in range(n)})
    pos = np.asarray(positions, dtype=np.float64)
    chosen: set[int] = set()
    for target in np.linspace(pos[0], pos[-1], n):
        order = np.argsort(np.abs(pos - target), kind="stable")
        chosen.add(int(next(i for i in order if int(i) not in chosen)))
    return sorted(chosen)


def dicom_study_key(study_uid: str, salt: str) -> str:
    """The catalog's key for a study: the keyed pseudonym of its StudyInstanceUID (as the DICOM reader makes it)."""
    from .deid import pseudonym

    return pseudonym(study_uid, salt, "StudyInstanceUID")


def dicom_study_uid(data: bytes) -> str | None:
    """The StudyInstanceUID in the header of DICOM bytes (an upload), or None. In memory only."""
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=["StudyInstanceUID"])
    except Exception:  # not readable as DICOM: the decoder already reported what it could
        return None
    return str(ds.get("StudyInstanceUID") or "").strip() or None


def median_spacing(positions: Sequence[float] | None) -> float | None:
    if not positions or len(positions) < 2:
        return None
    return round(float(np.median(np.diff(np.asarray(positions, dtype=np.float64)))), 4)


def study_scores(
    q: np.ndarray, vecs: np.ndarray, owners: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score prior studies against a query study by the rule of the module docstring.

    ``q`` (m, d) query slice vectors, ``vecs`` (n, d) prior slice vectors, ``owners`` (n,) the study
    (case) id of each prior slice; all vectors L2-normalised. Returns (study ids (s,), scores (s,),
    best slice positions into ``vecs`` (s,)), best study first.
    """
    if len(vecs) == 0 or len(q) == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
    return scores_from_sims(q.astype(np.float32) @ vecs.astype(np.float32).T, owners)


def scores_from_sims(sims: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``study_scores`` from the (m, n) query-slice x prior-slice similarities."""
    if sims.shape[1] == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
    order = np.argsort(owners, kind="stable")
    owners_s = owners[order]
    sims = sims[:, order]  # (m, n) columns grouped by study
    starts = np.flatnonzero(np.r_[True, owners_s[1:] != owners_s[:-1]])
    per_study = np.maximum.reduceat(sims, starts, axis=1)  # (m, s): best prior slice per query slice
    scores = per_study.mean(axis=0)  # (s,)
    col_best = sims.max(axis=0)  # (n,): each prior slice's best match to any query slice
    seg_max = np.maximum.reduceat(col_best, starts)  # (s,)
    is_max = col_best == np.repeat(seg_max, np.diff(np.r_[starts, len(owners_s)]))
    first_max = np.flatnonzero(is_max)  # positions of segment maxima; keep the first per segment
    seg_of = np.searchsorted(starts, first_max, side="right") - 1
    keep = np.r_[True, seg_of[1:] != seg_of[:-1]]
    best = order[first_max[keep]]  # (s,) positions into the caller's arrays
    rank = np.argsort(-scores, kind="stable")
    return owners_s[starts][rank], scores[rank], best[rank]
