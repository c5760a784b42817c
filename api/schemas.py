"""Public request/response schemas. Nothing leaves the API unless a schema here names it.

Stored records (``medsearch.records``) carry more than a client should see (file paths,
pseudonymous patient keys); these models list the fields that are public.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FilterValue = list[str] | str | None  # one value or several; a single string is read as a list of one


class Filters(BaseModel):
    """Metadata filters; each is a list of accepted values (case-insensitive). Empty = no filter."""

    model_config = ConfigDict(extra="forbid")

    modality: FilterValue = Field(None, description="Coarse modality, e.g. CT, MR, X-ray.", examples=[["CT"]])
    body_region: FilterValue = Field(None, description="Body region, e.g. Head, Thorax.", examples=[["Head"]])
    split: FilterValue = None
    source: FilterValue = None
    plane: FilterValue = None

    @field_validator("*", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v] if v.strip() else None
        if isinstance(v, list):
            vals = [x for x in v if isinstance(x, str) and x.strip()]
            if len(vals) > 50:
                raise ValueError("at most 50 values per filter")
            return vals or None
        return v


class TextSearchRequest(BaseModel):
    """Text -> images/cases."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, max_length=2000, examples=["ring-enhancing lesion with surrounding edema"])
    k: int = Field(10, ge=1, le=100, description="How many hits.")
    filters: Filters = Field(default_factory=Filters)
    mode: Literal["auto", "hybrid", "image", "text", "bm25"] = Field(
        "auto",
        description="auto/hybrid: every space the model has, fused by RRF; image: cross-modal only; "
        "text: report/caption vectors; bm25: report/caption words.",
    )
    per_case: bool = Field(True, description="One hit per case (its best image).")
    target: Literal["images", "reports"] = Field(
        "images", description="images: hits are images; reports: cases by report text."
    )
    understand: bool = Field(
        True, description="Read modality, plane, body region, contrast from the query and rank images whose "
        "metadata matches higher (a soft boost, never a filter); false turns it off.",
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the query is blank")
        return v


class Hit(BaseModel):
    """One search result."""

    rank: int
    score: float
    case_id: int
    case_key: str
    image_id: int | None
    image_key: str | None
    source: str
    modality_type: str | None
    modality: str | None
    body_region: str | None
    plane: str | None
    split: str | None
    diagnosis: str | None
    title: str | None
    excerpt: str | None
    matched: str = Field(description="Which space produced it: image, text, caption, fused.")
    image_url: str | None = None
    thumbnail_url: str | None = None
    case_url: str


class QueryImage(BaseModel):
    """What the image query was, without the image: a catalog id, or the upload's hash and size."""

    image_id: int | None = None
    case_id: int | None = None
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None


class UnderstoodConstraint(BaseModel):
    field: str = Field(description="modality_type, sequence, contrast, plane, body_region or laterality.")
    label: str
    values: list[str] = Field(description="Catalog values an image must carry to get the boost.")
    confidence: float
    span: list[int] | None = Field(None, description="[start, end) characters of the query (null: the model).")
    source: Literal["rule", "model"]


class Understood(BaseModel):
    enabled: bool
    summary: str = Field(examples=["CT, axial, abdomen"])
    constraints: list[UnderstoodConstraint]


class SearchResponse(BaseModel):
    hits: list[Hit]
    count: int
    model: str
    generation: dict[str, int] = Field(description="Index generation per space that answered.")
    took_ms: float
    query_image: QueryImage | None = None
    understood: Understood | None = Field(None, description="What the text query was read to say (text search).")


class ImageInfo(BaseModel):
    image_id: int
    key: str
    modality_type: str | None = None
    modality: str | None = None
    plane: str | None = None
    body_region: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    status: str = "ok"
    image_url: str
    thumbnail_url: str


class SliceOut(BaseModel):
    """One slice of a series in slice order; `status` deferred = catalogued, not embedded (--slices)."""

    image_id: int
    slice_index: int | None
    position: float | None = None  # mm along the series normal
    status: str
    embedded: bool | None = None
    thumbnail_url: str


class SeriesOut(BaseModel):
    """One series of a study (no identifiers, no descriptions)."""

    series_id: int
    number: int | None = None
    modality: str | None = None
    body_part: str | None = None
    plane: str | None = None
    slice_count: int
    thickness: float | None = None
    spacing: float | None = None
    position_min: float | None = None
    position_max: float | None = None
    ordered_by: str
    order_note: str | None = None
    window_center: float | None = None
    window_width: float | None = None
    preset: str | None = None
    slices: list[SliceOut]


class CaseOut(BaseModel):
    """A whole case: report sections, labels and all its images; a DICOM study also lists its series."""

    case_id: int
    case_key: str
    source: str
    split: str | None
    title: str | None
    diagnosis: str | None
    category: str | None
    sections: dict[str, str]
    labels: dict[str, Any]
    images: list[ImageInfo]
    series: list[SeriesOut] = []
    viewer_url: str | None = Field(None, description="Admin keys only, when the server has --viewer-url and the home a link back: the study in the hospital viewer.")


class IndexInfo(BaseModel):
    count: int
    generation: int
    kind: str
    dim: int
    built_at: str
    behind: int = Field(0, description="Vectors the catalog stores that this generation lacks (an index run in flight).")


class HealthOut(BaseModel):
    status: Literal["ok", "no_index", "degraded"]
    version: str
    model: str | None
    shared_space: bool | None
    indexes: dict[str, IndexInfo]
    catalog: dict[str, int]
    auth_required: bool
    drafts_available: bool
    loaded_at: str | None
    last_reload_error: str | None = None


class FacetValue(BaseModel):
    value: str
    count: int


class FacetsOut(BaseModel):
    """Values the filters accept, with image counts (for the web page's selects)."""

    modality: list[FacetValue]
    body_region: list[FacetValue]
    split: list[FacetValue]
    source: list[FacetValue]
    plane: list[FacetValue]


class ReloadOut(BaseModel):
    swapped: bool
    model: str
    generation: dict[str, int]
    indexes: dict[str, int]
    took_ms: float


# ---- drafts: these mirror medsearch.rag.render.draft_to_dict field by field (plus URLs and took_ms)
class Citation(BaseModel):
    """A citation ``[C<n>]`` of a draft sentence: the evidence case and its best supporting sentence."""

    cite: str = Field(description="The marker, e.g. C2 (n-th evidence case).")
    n: int
    case_id: int
    case_key: str
    similarity: float = Field(description="Cosine between the draft sentence and `evidence`, in [0, 1].")
    evidence: str
    case_url: str


class DraftSentence(BaseModel):
    section: str = Field(description="findings or impression")
    text: str = Field(description="The sentence without citation markers.")
    cites: list[str] = Field(description="Its citation markers, e.g. [\"C1\", \"C3\"].")
    case_ids: list[int]
    case_keys: list[str]
    support: float = Field(description="Best cosine to the cited evidence, in [0, 1]; 0 when uncited.")
    supported: bool
    flags: list[str] = Field(description="uncited, low_support, invalid_citation")
    citations: list[Citation]


class EvidenceSentence(BaseModel):
    section: str
    text: str


class Evidence(BaseModel):
    """A prior case the draft may cite, with the report sentences the generator was shown."""

    n: int
    case_id: int
    case_key: str
    source: str
    score: float = Field(description="Image-image cosine to the query (image-text for a case found by text).")
    image_id: int | None
    image_key: str | None
    matched: str
    modality_type: str | None
    body_region: str | None
    category: str | None
    diagnosis: str | None
    split: str | None
    neutralised: int = Field(description="Instruction-like sentences dropped from this case.")
    cite: str
    sentences: list[EvidenceSentence]
    thumbnail_url: str | None
    case_url: str


class DraftOut(BaseModel):
    """A draft report: sentences, each citing the evidence cases it comes from.

    The same JSON as `medsearch draft --json` (``medsearch.rag.render.draft_to_dict``), plus the
    URL fields, ``took_ms`` and ``query_image``."""

    query: str = Field(description="What was drafted for, e.g. `image 12` or `the query image` (never a path).")
    generator: str
    model: str
    fallback_from: str | None = None
    fallback_reason: str | None = None
    sentences: list[DraftSentence]
    findings: str
    impression: str
    unsupported_sentences: int
    invalid_citations_removed: int = 0
    citations_total: int = 0
    evidence: list[Evidence]
    timings: dict[str, float] = {}
    took_ms: float = 0.0
    query_image: QueryImage | None = None


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code, the same in the CLI's --json errors: see the API "
                      "description for the list (e.g. not_found, invalid_input, unauthorized, rate_limited).")
    message: str
    hint: str | None = None
    request_id: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
