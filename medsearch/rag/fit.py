"""Evidence that fits the query image: its metadata, and sentences that speak of its modality and view.

    target = query_target(row, neighbours, weights)   # modality, region, plane: the query's own, else voted
    fit = metadata_fit(target, case_labels)          # 0..3 per evidence case (modality, region, plane agree)
    foreign = foreign_terms(sentence, target)        # {"radiograph"} in a CT draft, {"coronal"} when axial

A sentence that names another modality or view is dropped unless every evidence case says it
(``allowed``): "T2 hyperintense" is evidence about an MR image, not about a CT.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# modality words a report sentence may name; keys are the catalog's modality_type values
MODALITY_TERMS: dict[str, re.Pattern[str]] = {
    "ct": re.compile(r"\b(ct|cta|cect|nect|computed tomograph\w*|hounsfield|hu)\b", re.IGNORECASE),
    "mr": re.compile(
        r"\b(mri?|mra|mrv|magnetic resonance|t1\w*|t2\w*|flair|dwi|adc|diffusion[- ]weighted|gadolinium|gd|stir|swi|"
        r"gre|gradient[- ]echo|susceptibility[- ]weighted)\b",
        re.IGNORECASE,
    ),
    "xr": re.compile(r"\b(radiograph\w*|x-?rays?|plain films?|chest films?|cxr)\b", re.IGNORECASE),
    "us": re.compile(r"\b(ultrasound\w*|sonograph\w*|sonogram|doppler|us)\b", re.IGNORECASE),
    "nm": re.compile(r"\b(pet|spect|scintigra\w*|bone scan|nuclear medicine|fdg)\b", re.IGNORECASE),
}
PLANE_TERMS: dict[str, re.Pattern[str]] = {
    "axial": re.compile(r"\b(axial|transverse)\b", re.IGNORECASE),
    "coronal": re.compile(r"\bcoronal\b", re.IGNORECASE),
    "sagittal": re.compile(r"\bsagittal\b", re.IGNORECASE),
}
_MODALITY_ALIASES = {"mri": "mr", "cr": "xr", "dx": "xr", "xray": "xr", "x-ray": "xr", "pt": "nm", "pet": "nm"}


def norm_modality(value: str | None) -> str | None:
    """'CT' -> 'ct', 'MRI' -> 'mr', 'CR'/'DX' -> 'xr'; None for empty or unknown words."""
    v = (value or "").strip().lower()
    v = _MODALITY_ALIASES.get(v, v)
    return v if v in MODALITY_TERMS else None


def norm_plane(value: str | None) -> str | None:
    """'Axial'/'Transverse' -> 'axial', 'Coronal', 'Sagittal'; None for any other view."""
    v = (value or "").strip().lower()
    for plane, pat in PLANE_TERMS.items():
        if pat.fullmatch(v):
            return plane
    return None


@dataclass(frozen=True)
class Target:
    """The labels the evidence should agree with; ``*_own`` says whether it is the query's own or voted."""

    modality: str | None  # normalised: ct, mr, xr, us, nm
    region: str | None  # lower case body region
    plane: str | None  # axial, coronal, sagittal
    modality_own: bool = False
    region_own: bool = False
    plane_own: bool = False


def _vote(values: Iterable[str | None], weights: Iterable[float]) -> str | None:
    c: Counter[str] = Counter()
    for v, w in zip(values, weights, strict=True):
        if v:
            c[v] += w
    return c.most_common(1)[0][0] if c else None


def query_target(
    own: tuple[str | None, str | None, str | None] | None,
    neighbours: Sequence[tuple[str | None, str | None, str | None]],
    weights: Sequence[float],
) -> Target:
    """The query's (modality_type, body_region, plane) from its own row, each missing one by the weighted neighbour vote."""
    m, r, p = own if own else (None, None, None)
    m, r, p = norm_modality(m), (r or "").strip().lower() or None, norm_plane(p)
    vm = _vote([norm_modality(n[0]) for n in neighbours], weights) if m is None else m
    vr = _vote([(n[1] or "").lower() or None for n in neighbours], weights) if r is None else r
    # a view is never voted: neighbours of an axial slice are often coronal reformats
    return Target(vm, vr, p, modality_own=m is not None, region_own=r is not None, plane_own=p is not None)


def metadata_fit(target: Target, labels: tuple[str | None, str | None, str | None]) -> float:
    """How many of modality, region (1 each) and plane (0.5) of an evidence image agree with the target."""
    m, r, p = norm_modality(labels[0]), (labels[1] or "").lower() or None, norm_plane(labels[2])
    fit = 0.0
    fit += float(target.modality is not None and m == target.modality)
    fit += float(target.region is not None and r == target.region)
    fit += 0.5 * float(target.plane is not None and p == target.plane)
    return fit


def named_terms(text: str) -> set[str]:
    """Modalities and planes a sentence names: {'ct', 'coronal'}."""
    out = {k for k, pat in MODALITY_TERMS.items() if pat.search(text)}
    out |= {k for k, pat in PLANE_TERMS.items() if pat.search(text)}
    return out


def foreign_terms(text: str, target: Target) -> set[str]:
    """The modalities and planes ``text`` names that are not the target's ('radiograph' in a CT draft)."""
    names = named_terms(text)
    out: set[str] = set()
    if target.modality is not None:
        out |= {k for k in names if k in MODALITY_TERMS and k != target.modality}
    if target.plane is not None:
        out |= {k for k in names if k in PLANE_TERMS and k != target.plane}
    return out


def allowed_terms(case_texts: Sequence[Sequence[str]]) -> set[str]:
    """Terms every evidence case names somewhere in its sentences (those stay allowed)."""
    sets = [set().union(*(named_terms(t) for t in texts)) if texts else set() for texts in case_texts]
    return set.intersection(*sets) if sets else set()
