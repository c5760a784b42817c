"""Query understanding over image metadata: what a text query says that a DICOM header carries.

``understand(query, vocab, model)`` reads modality ("CT", "T2-weighted", "FLAIR", "radiograph"),
the MR sequence / CT contrast phase, plane ("axial", "AP"), body region (named directly or
through an organ: "liver" -> the abdomen values of the catalog), contrast and laterality into
a frozen :class:`Understood`. Rules come first (synonyms mapped onto the catalog's own values,
read with ``Catalog.distinct``); a small bag-of-words softmax model trained on the catalog's
captions and their images' labels (:class:`QueryModel`, numpy only, no external weights) fills
modality_type and body_region only when the rules are silent on that field and the model is
confident.

``boost`` turns what was understood into a soft constraint: each candidate image gets the
confidence-weighted fraction of the constraints its metadata satisfies, added to its fused
(RRF) score as ``weight * match / (rrf_k + 1)`` (a full match is worth a first place in one more
ranking). Nothing is ever filtered out here; hard filters stay the user's ``--modality`` etc.
Laterality is understood and shown, but the catalog has no laterality column, so it boosts nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalog import Catalog, ImageRow

# ---------------------------------------------------------------------------------------- rules
# (pattern, canonical) per field; patterns are matched case-insensitively on word boundaries
# unless marked case-sensitive ("AP"/"PA" only in capitals: "pa" and "ap" are common syllables).
_MODALITY = [
    (r"computed tomograph\w*|\bcta\b|\bct\b|\bcat scan", "CT"),
    (r"magnetic resonance|\bmri?\b|\bmra\b|\bmrv\b|t[12][ -]?weighted|\bt[12]w?i?\b|\bflair\b|\bdwi\b|"
     r"diffusion[ -]weighted|\badc\b|\bstir\b|gadolinium|\bswi\b|\bfiesta\b", "MR"),
    (r"radiograph\w*|x-?rays?|plain films?|\bcxr\b|\bkub\b", "X-ray"),
    (r"ultrasound|sonograph\w*|\bdoppler\b|\bechocardiogra\w*", "US"),
    (r"mammogra\w*", "Mammography"),
    (r"\bpet\b|positron emission", "PET"),
]
# modality_type canonical -> words a catalog value may use for it
_MODALITY_VALUES = {
    "CT": ("ct", "computed tomography"), "MR": ("mr", "mri", "magnetic resonance"),
    "X-ray": ("x-ray", "xray", "cr", "dx", "radiograph"), "US": ("us", "ultrasound"),
    "Mammography": ("mammography", "mg"), "PET": ("pet", "pt"),
}  # fmt: skip
# MR sequence / detail: (pattern, label, words the catalog's detailed modality text contains)
_SEQUENCE = [
    (r"\bt2\*|gradient echo|\bgre\b|\bswi\b|susceptibility", "T2*/GRE", ("t2*", "gre", "swi")),
    (r"\bflair\b", "FLAIR", ("flair",)),
    (r"\bdwi\b|diffusion[ -]weighted|\bdiffusion\b", "DWI", ("dwi", "diffusion")),
    (r"\badc\b", "ADC", ("adc",)),
    (r"\bt2[ -]?weighted|\bt2w?i?\b", "T2-weighted", ("t2 weighted", "t2w")),
    (r"\bt1[ -]?weighted|\bt1w?i?\b", "T1-weighted", ("t1",)),
    (r"\bstir\b", "STIR", ("stir",)),
    (r"angiogra\w*|\bcta\b|\bmra\b|\bmrv\b|venogra\w*", "angiography", ("angiography", "cta", "mra")),
    (r"proton density|\bpd\b", "proton density", ("proton density", "pdw")),
]
_CONTRAST = [
    (r"non-?contrast|without contrast|unenhanced|non-?enhanced|\bplain ct\b", "non-contrast"),
    (r"with contrast|contrast[- ]enhanced|post-?contrast|\bgadolinium\b|\bgd\b|enhanced|\biv contrast\b|"
     r"\bw/ ?contrast|arterial phase|portal venous", "with contrast"),
]
_PLANE = [
    (r"\baxial\b|\btransverse\b|\btransaxial\b", "Axial", False),
    (r"\bcoronal\b", "Coronal", False),
    (r"\bsagittal\b", "Sagittal", False),
    (r"\bAP\b|antero-?posterior", "AP", True),
    (r"\bPA\b|postero-?anterior", "PA", True),
    (r"\blateral (?:view|projection|radiograph|film)\b", "Lateral", False),
    (r"\bfrontal (?:view|projection|radiograph|film)\b", "Frontal", False),
]
_LATERALITY = [(r"\bbilateral\b|\bboth\b", "bilateral"), (r"\bleft\b", "left"), (r"\bright\b", "right")]
# body-region groups: (words naming the region or an organ in it, words a catalog region value uses)
_REGIONS = {
    "head": (r"\bhead\b|brain|cerebr\w*|cerebell\w*|\b(?:temporal|frontal|parietal|occipital) lobe|skull|cranial|"
             r"intracranial|pituitary|sella|ventric\w*|orbit\w*|\beye\b|sinus\w*|\bneck\b|thyroid|larynx|pharynx|"
             r"basal ganglia|thalam\w*|pons|midbrain|medulla|meningi\w*|subdural|epidural|temporal bone|mastoid|"
             r"\bneuro\w*|glioma|glioblastoma|\bstroke\b",
             ("head", "brain", "neuro", "skull", "neck")),
    "thorax": (r"thora\w*|chest|\blungs?\b|pulmonar\w*|pleura\w*|mediastin\w*|\bheart\b|cardiac|pericard\w*|"
               r"\baort\w*|bronch\w*|trachea|\bbreast\b|pneumo\w*|esophag\w*",
               ("thorax", "chest", "lung", "cardiac", "heart", "breast")),
    "abdomen": (r"abdom\w*|\bliver\b|hepat\w*|spleen|splenic|pancrea\w*|gallbladder|biliar\w*|\bbowel\b|colon\w*|"
                r"\bstomach\b|gastr\w*|duoden\w*|jejun\w*|ile\w*|append\w*|mesenter\w*|peritone\w*|adrenal|"
                r"\bgi\b|rectum|rectal",
                ("abdomen", "gastro", "liver", "abdominal")),
    "pelvis": (r"pelvi\w*|\bkidneys?\b|\brenal\b|bladder|prostat\w*|uter\w*|ovar\w*|testi\w*|scrot\w*|ureter\w*|"
               r"urethr\w*|cervix|\bgenitourinary\b|\burinary\b",
               ("pelvis", "urinary", "reproductive", "genitourinary", "kidney")),
    "spine": (r"spin\w*|vertebra\w*|\bdisc\b|cervical spine|lumbar|thoracic spine|sacr\w*|\bcord\b",
              ("spine", "spinal")),
    "musculoskeletal": (r"\bknee\b|shoulder|\bhip\b|femur|femoral|tibia\w*|fibula|humer\w*|\bwrist\b|\bhand\b|"
                        r"\bankle\b|\bfoot\b|\belbow\b|\bbones?\b|muscl\w*|tendon|ligament|menisc\w*|osse\w*|"
                        r"\bjoint\b|musculoskeletal",
                        ("muscle", "musculoskeletal", "extremit", "bone", "knee", "shoulder")),
}  # fmt: skip
# a spine region value in medpix is "Spine and Muscles": musculoskeletal words also reach it

_FIELDS = ("modality_type", "sequence", "contrast", "plane", "body_region", "laterality")
_TOKEN = re.compile(r"[a-z][a-z0-9*]+")


@dataclass(frozen=True)
class Constraint:
    """One thing understood: a field, what to show, the catalog values it matches, why."""

    field: str  # modality_type | sequence | contrast | plane | body_region | laterality
    label: str  # shown to the user: "CT", "T2-weighted", "axial", "abdomen"
    values: tuple[str, ...]  # catalog values (lower case) an image's metadata must carry to match
    confidence: float  # 1.0 for a rule; the model's probability otherwise
    span: tuple[int, int] | None  # characters of the query the rule matched (None: the model)
    source: str  # "rule" | "model"

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "label": self.label, "values": list(self.values),
                "confidence": round(self.confidence, 3), "span": list(self.span) if self.span else None,
                "source": self.source}  # fmt: skip


@dataclass(frozen=True)
class Understood:
    """What a text query said about image metadata (empty when nothing was understood or it was off)."""

    query: str
    constraints: tuple[Constraint, ...] = ()
    enabled: bool = True

    @property
    def empty(self) -> bool:
        return not self.constraints

    def get(self, name: str) -> Constraint | None:
        return next((c for c in self.constraints if c.field == name), None)

    def summary(self) -> str:
        """``CT, axial, abdomen`` (fields in a fixed order)."""
        return ", ".join(c.label for f in _FIELDS for c in self.constraints if c.field == f)

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "summary": self.summary(),
                "constraints": [c.to_dict() for c in self.constraints]}  # fmt: skip


@dataclass(frozen=True)
class Vocabulary:
    """The catalog's own metadata values (lower case), which the rules' canonical names map onto."""

    modality_type: tuple[str, ...] = ()
    plane: tuple[str, ...] = ()
    body_region: tuple[str, ...] = ()

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Vocabulary:
        def vals(col: str) -> tuple[str, ...]:
            return tuple(sorted({str(v).lower() for v, _ in catalog.distinct(col) if v}))

        return cls(vals("modality"), vals("plane"), vals("body_region"))

    def modality_values(self, canonical: str) -> tuple[str, ...]:
        words = _MODALITY_VALUES.get(canonical, (canonical.lower(),))
        return tuple(v for v in self.modality_type if v in words) or (canonical.lower(),)

    def region_values(self, group: str) -> tuple[str, ...]:
        words = _REGIONS[group][1]
        out = tuple(v for v in self.body_region if any(w in v for w in words))
        if group == "musculoskeletal":  # "Spine and Muscles" style values
            out = out or tuple(v for v in self.body_region if "spine" in v)
        return out or (group,)

    def region_group(self, value: str) -> str | None:
        v = value.lower()
        return next((g for g, (_, words) in _REGIONS.items() if any(w in v for w in words)), None)


# ---------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class _Head:
    classes: tuple[str, ...]
    W: np.ndarray  # (n_words + 1, n_classes) float32, last row the bias


@dataclass(frozen=True)
class QueryModel:
    """Bag-of-words softmax heads (modality_type, body_region) trained on the catalog's captions."""

    words: dict[str, int]
    heads: dict[str, _Head] = field(default_factory=dict)
    n_train: int = 0

    @classmethod
    def train(cls, texts: Sequence[str], labels: dict[str, Sequence[str | None]], *, min_df: int = 2,
              l2: float = 1e-3, steps: int = 300, lr: float = 4.0) -> QueryModel:  # fmt: skip
        """Fit one multinomial logistic regression per label (full-batch gradient descent, numpy)."""
        df: dict[str, int] = {}
        for t in texts:
            for w in set(_tokens(t)):
                df[w] = df.get(w, 0) + 1
        words = {w: i for i, w in enumerate(sorted(w for w, n in df.items() if n >= min_df))}
        model = cls(words, {}, len(texts))
        X = model._features(texts)  # (n, V+1)
        heads: dict[str, _Head] = {}
        for name, ys in labels.items():
            keep = [i for i, y in enumerate(ys) if y]
            classes = tuple(sorted({str(ys[i]).lower() for i in keep}))
            if len(classes) < 2:
                continue
            cidx = {c: j for j, c in enumerate(classes)}
            Xk = X[keep]
            Y = np.zeros((len(keep), len(classes)), np.float32)
            Y[np.arange(len(keep)), [cidx[str(ys[i]).lower()] for i in keep]] = 1.0
            W = np.zeros((X.shape[1], len(classes)), np.float32)
            for _ in range(steps):
                P = _softmax(Xk @ W)
                W -= lr * (Xk.T @ (P - Y) / len(keep) + l2 * W)
            heads[name] = _Head(classes, W)
        return cls(words, heads, len(texts))

    @classmethod
    def from_catalog(cls, catalog: Catalog, image_ids: Iterable[int]) -> QueryModel | None:
        """Train on the captions of these catalog images (None when there are too few to learn from)."""
        rows = [r for r in catalog.image_rows(list(image_ids)).values() if r.caption and r.caption.strip()]
        if len(rows) < 20:
            return None
        return cls.train([r.caption or "" for r in rows],
                         {"modality_type": [r.modality_type for r in rows],
                          "body_region": [r.body_region for r in rows]})  # fmt: skip

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        X = np.zeros((len(texts), len(self.words) + 1), np.float32)
        for i, t in enumerate(texts):
            for w in _tokens(t):
                j = self.words.get(w)
                if j is not None:
                    X[i, j] = 1.0
            n = np.linalg.norm(X[i, :-1])
            if n > 0:
                X[i, :-1] /= n
        X[:, -1] = 1.0
        return X

    def predict(self, text: str) -> dict[str, tuple[str, float]]:
        """label name -> (class, probability); nothing for a text with no known word."""
        X = self._features([text])
        if not X[0, :-1].any():
            return {}
        out = {}
        for name, h in self.heads.items():
            p = _softmax(X @ h.W)[0]
            j = int(p.argmax())
            out[name] = (h.classes[j], float(p[j]))
        return out


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------- parse
def understand(query: str, vocab: Vocabulary, model: QueryModel | None = None, *,
               min_confidence: float = 0.7) -> Understood:  # fmt: skip
    """Parse a text query (rules first; the model only for fields the rules left silent)."""
    found: list[Constraint] = []

    def first(patterns: Sequence[tuple[str, ...]], *, flags: int = re.IGNORECASE) -> tuple[Any, re.Match[str]] | None:
        best = None
        for p in patterns:
            m = re.search(p[0], query, 0 if (len(p) > 2 and p[2] is True) else flags)
            if m and (best is None or m.start() < best[1].start()):
                best = (p, m)
        return best

    hit = first(_MODALITY)
    if hit:
        (_, canon), m = hit
        found.append(Constraint("modality_type", canon, vocab.modality_values(canon), 1.0, m.span(), "rule"))
    hit = first(_SEQUENCE)
    if hit:
        (_, label, words), m = hit
        found.append(Constraint("sequence", label, words, 1.0, m.span(), "rule"))
    hit = first(_CONTRAST)
    if hit:
        (_, label), m = hit
        found.append(Constraint("contrast", label, (label,), 1.0, m.span(), "rule"))
    hit = first([p for p in _PLANE])
    if hit:
        (_, label, _cs), m = hit
        vals = tuple(v for v in vocab.plane if v == label.lower()) or (label.lower(),)
        if label == "Axial":
            vals = tuple(v for v in vocab.plane if v in ("axial", "transverse")) or ("axial",)
        found.append(Constraint("plane", label.lower() if label not in ("AP", "PA") else label, vals, 1.0,
                                m.span(), "rule"))  # fmt: skip
    hit = first([(pat, g) for g, (pat, _) in _REGIONS.items()])
    if hit:
        (_, group), m = hit
        found.append(Constraint("body_region", group, vocab.region_values(group), 1.0, m.span(), "rule"))
    hit = first(_LATERALITY)
    if hit:
        (_, label), m = hit
        found.append(Constraint("laterality", label, (), 1.0, m.span(), "rule"))
    if model is not None:
        silent = {f for f in ("modality_type", "body_region") if not any(c.field == f for c in found)}
        if silent:
            for name, (cls, p) in model.predict(query).items():
                if name not in silent or p < min_confidence:
                    continue
                if name == "modality_type":
                    canon = next((k for k, ws in _MODALITY_VALUES.items() if cls in ws), cls.upper())
                    found.append(Constraint(name, canon, (cls,), p, None, "model"))
                else:
                    group = vocab.region_group(cls) or cls
                    found.append(Constraint(name, group, (cls,), p, None, "model"))
    return Understood(query, tuple(found))


def off(query: str) -> Understood:
    """Understanding turned off (``--no-understand``, ``understand: false``)."""
    return Understood(query, (), enabled=False)


# ---------------------------------------------------------------------------------------- boost
def matches(c: Constraint, row: ImageRow) -> bool | None:
    """Whether an image's metadata satisfies a constraint (None: the catalog cannot say)."""
    detail = (row.modality or "").lower()
    if c.field == "modality_type":
        return (row.modality_type or "").lower() in c.values if row.modality_type else None
    if c.field == "plane":
        return (row.plane or "").lower() in c.values if row.plane else None
    if c.field == "body_region":
        return (row.body_region or "").lower() in c.values if row.body_region else None
    if c.field == "sequence":
        return any(w in detail for w in c.values) if detail else None
    if c.field == "contrast":
        if not detail:
            return None
        plain = "noncontrast" in detail or "non-contrast" in detail or "without" in detail
        given = not plain and any(w in detail for w in ("contrast", "gad", " gd", "w/"))
        return plain if c.label == "non-contrast" else given
    return None  # laterality: no catalog column


def boost(ordered: Sequence[tuple[int, float]], rows: dict[int, ImageRow], u: Understood, *, rrf_k: int,
          weight: float = 1.0) -> list[tuple[int, float]]:  # fmt: skip
    """Re-rank fused candidates: score + weight * (confidence-weighted share of constraints met) / (rrf_k + 1)."""
    cons = [c for c in u.constraints if c.field != "laterality"]
    if not cons or weight <= 0:
        return list(ordered)
    total = sum(c.confidence for c in cons)
    out = []
    for i, s in ordered:
        row = rows.get(i)
        met = 0.0 if row is None else sum(c.confidence for c in cons if matches(c, row))
        out.append((i, s + weight * met / total / (rrf_k + 1)))
    return sorted(out, key=lambda kv: -kv[1])


def as_rrf(ordered: Sequence[tuple[int, float]], rrf_k: int) -> list[tuple[int, float]]:
    """One raw-score ranking as RRF scores, so a boost weighs the same whatever the mode."""
    return [(i, 1.0 / (rrf_k + r)) for r, (i, _) in enumerate(ordered, 1)]


class Understanding:
    """What a :class:`~medsearch.search.Searcher` keeps for query understanding: the vocabulary, the
    caption model and the metadata of the indexed images (so a boost reads no catalog rows per query)."""

    def __init__(self, catalog: Catalog, image_ids: Iterable[int], *, use_model: bool = True) -> None:
        self.catalog = catalog
        self.vocab = Vocabulary.from_catalog(catalog)
        self.rows = catalog.image_rows(list(image_ids))
        self.model = QueryModel.from_catalog(catalog, list(self.rows)) if use_model else None

    def parse(self, query: str, *, min_confidence: float) -> Understood:
        return understand(query, self.vocab, self.model, min_confidence=min_confidence)

    def rerank(self, ordered: Sequence[tuple[int, float]], u: Understood, *, fused: bool, rrf_k: int,
               weight: float) -> list[tuple[int, float]]:  # fmt: skip
        """``boost`` of fused (or, ``fused=False``, one raw-score ranking's) candidates."""
        missing = [i for i, _ in ordered if i not in self.rows]
        rows = {**self.rows, **self.catalog.image_rows(missing)} if missing else self.rows
        return boost(ordered if fused else as_rrf(ordered, rrf_k), rows, u, rrf_k=rrf_k, weight=weight)
