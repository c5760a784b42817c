"""Windowing: values in modality units (CT: Hounsfield units) -> 8-bit display values.

``window`` is the PS3.3 C.11.2.1.2 VOI function; ``robust_scale`` the percentile stretch used when a
file gives no window; ``PRESETS`` the CT windows by body part (see ``preset_for``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.config import ImagingConfig

from ._guards import _to_uint8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_PERCENTILE_SAMPLE = 1 << 22  # robust_scale estimates percentiles on at most ~4M samples

# CT windows (center, width) in Hounsfield units, as radiology viewers ship them.
PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}

# BodyPartExamined words (spaces/underscores removed, upper case) -> preset. Coarse regions too.
_PRESET_BY_PART = {
    **dict.fromkeys(("HEAD", "BRAIN", "SKULL", "IAC", "PITUITARY", "ORBIT", "SINUS"), "brain"),
    **dict.fromkeys(("CHEST", "THORAX", "LUNG"), "lung"),
    **dict.fromkeys(("ABDOMEN", "PELVIS", "ABDOMENPELVIS", "ABDPELVIS", "LIVER", "KIDNEY", "PANCREAS", "NECK",
                     "HEADNECK", "CHESTABDOMEN", "CHESTABDPELVIS", "WHOLEBODY"), "soft_tissue"),  # fmt: skip
    **dict.fromkeys(("SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "HIP", "KNEE", "ANKLE", "FOOT", "HAND",
                     "WRIST", "ELBOW", "SHOULDER", "EXTREMITY", "FEMUR", "HUMERUS"), "bone"),  # fmt: skip
}


def preset_for(body_part: str | None) -> str | None:
    """The CT preset for a BodyPartExamined value (or a coarse region such as "Thorax"), or None.

    Head/brain -> brain; chest/thorax/lung -> lung; abdomen, pelvis, neck -> soft_tissue;
    spine and extremities -> bone; anything else -> None (the caller keeps its own fallback).
    """
    if not body_part:
        return None
    return _PRESET_BY_PART.get(str(body_part).upper().replace(" ", "").replace("_", ""))


def resolve_window(spec: str | tuple[float, float]) -> tuple[float, float]:
    """A preset name or an explicit (center, width) -> (center, width); raises InvalidInput for others."""
    from medsearch.errors import InvalidInput

    if isinstance(spec, tuple):
        return float(spec[0]), float(spec[1])
    if spec not in PRESETS:
        raise InvalidInput(f"unknown window preset {spec!r}", hint=f"use one of: {', '.join(PRESETS)}")
    return PRESETS[spec]


def multi_window(hu: np.ndarray, presets: tuple[str, ...] = ("brain", "soft_tissue", "bone")) -> np.ndarray:
    """(rows, cols) modality values -> (rows, cols, len(presets)) uint8, one window per channel.

    Three presets make an RGB image, so an image encoder sees three windows of one slice in one pass.
    """
    return np.stack([window(hu, *PRESETS[p]) for p in presets], axis=-1)


def window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map values through a window (PS3.3 C.11.2.1.2) to uint8; ``function`` LINEAR, LINEAR_EXACT or SIGMOID."""
    x = np.asarray(arr, dtype=np.float64)
    fn = function.upper()
    if fn == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / max(width, 1e-6), -500, 500)))
    elif fn == "LINEAR_EXACT":
        y = (x - center) / max(width, 1e-6) + 0.5
    elif width <= 1:  # LINEAR with width 1: a threshold at center - 0.5
        y = (x > center - 0.5).astype(np.float64)
    else:
        y = x - (center - 0.5)
        y /= width - 1
        y += 0.5
    # in place, the same operations as _to_uint8(clip(y, 0, 1) * 255): one (rows, cols) buffer, not five
    y = np.asarray(y, dtype=np.float64)
    np.clip(y, 0.0, 1.0, out=y)
    y *= 255.0
    np.rint(y, out=y)
    return y.astype(np.uint8)


def robust_scale(arr: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Stretch the ``low``..``high`` percentiles to 0..255 (uint8); falls back to min-max, constant -> 0."""
    a = np.asarray(arr, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    sample = finite if finite.size <= _PERCENTILE_SAMPLE else finite[:: finite.size // _PERCENTILE_SAMPLE + 1]
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return _to_uint8((np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo)))


def _functional(ds: Dataset, index: int, macro: str, keyword: str) -> Any:
    """A value from the enhanced multi-frame functional groups (per-frame first, then shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and i < len(seq):
            item = seq[i].get(macro)
            if item is not None and len(item) and keyword in item[0]:
                return item[0].get(keyword)
    return None


def _first(value: Any) -> float | None:
    """First number of a (possibly multi-valued) DS element."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes | int | float):  # MultiValue: take the first
        try:
            value = value[0]
        except (TypeError, IndexError):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _voi(
    arr: np.ndarray, ds: Dataset, index: int, config: ImagingConfig, override: str | tuple[float, float] | None = None
) -> np.ndarray:
    """Modality values (rows, cols) -> uint8.

    Order: ``override`` (a preset name or (center, width)), the VOI LUT, the file's window,
    ``config.default_window``, for CT the preset of its body part (``preset_for``), percentiles.
    """
    if override is None and "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        try:
            out = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return _to_uint8(np.asarray(out, dtype=np.float64) * (255.0 / (2.0 ** max(bits, 1) - 1)))
        except Exception:  # a malformed LUT: fall through to the window / percentiles
            pass
    w = voi_window(ds, index, config, override, lut=False)
    return window(arr, *w) if w is not None else robust_scale(arr)


def voi_window(
    ds: Dataset, index: int, config: ImagingConfig, override: str | tuple[float, float] | None = None, *,
    lut: bool = True,
) -> tuple[float, float, str] | None:
    """The (center, width, function) window ``_voi`` applies, or None when it applies something else: the
    percentile stretch, or (with ``lut``) the data set's VOI LUT. A window is a pointwise map of modality
    values, so it can be tabulated over the stored values (``dicom.dicom_to_uint8``)."""
    if override is not None:
        return (*resolve_window(override), "LINEAR")
    if lut and "VOILUTSequence" in ds:
        return None
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction") or "LINEAR")
    if center is None or width is None:
        center = _first(_functional(ds, index, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_functional(ds, index, "FrameVOILUTSequence", "WindowWidth"))
        function = str(_functional(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or function)
    if (center is None or width is None or width <= 0) and config.default_window is not None:
        center, width = config.default_window
        function = "LINEAR"
    if center is not None and width is not None and width > 0:
        return center, width, function
    if str(ds.get("Modality") or "").upper() == "CT" and (preset := preset_for(ds.get("BodyPartExamined"))):
        return (*PRESETS[preset], "LINEAR")
    return None
