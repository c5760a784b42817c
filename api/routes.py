"""Routes under ``/v1``. Each one calls the library once and maps records to public schemas.

Sync ``def`` handlers run in the server's thread pool: the encoders and SQLite calls block, and
FAISS/torch release the GIL while they work.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import Response

import medsearch
from medsearch.errors import InvalidInput, MedsearchError
from medsearch.records import Hit as HitRecord
from medsearch.search import Filters as CoreFilters
from medsearch.search import Searcher

from . import schemas as S
from .deps import Admin, ApiError, Caller, State
from .uploads import read_upload

router = APIRouter(prefix="/v1")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorOut, "description": desc}
    for code, desc in {
        401: "No or invalid API key.",
        404: "No such case or image.",
        409: "The index is not built or does not match the catalog.",
        413: "Upload larger than the limit, or an image that declares too many pixels.",
        415: "Not a PNG, JPEG or DICOM image, or an image that cannot be decoded.",
        422: "Invalid request fields.",
        429: "Rate limit exceeded (see Retry-After).",
    }.items()
}


# ---------------------------------------------------------------------------- helpers
def _urls(image_id: int | None) -> tuple[str | None, str | None]:
    if image_id is None:
        return None, None
    return f"/v1/images/{image_id}", f"/v1/images/{image_id}/thumbnail"


def hit_out(rank: int, h: HitRecord) -> S.Hit:
    image_url, thumb = _urls(h.image_id)
    return S.Hit(
        rank=rank, score=h.score, case_id=h.case_id, case_key=h.case_key, image_id=h.image_id,
        image_key=h.image_key, source=h.source, modality_type=h.modality_type, modality=h.modality,
        body_region=h.body_region, plane=h.plane, split=h.split, diagnosis=h.diagnosis, title=h.title,
        excerpt=h.excerpt, matched=h.matched, image_url=image_url, thumbnail_url=thumb,
        case_url=f"/v1/cases/{h.case_id}",
    )  # fmt: skip


def _core_filters(f: S.Filters) -> CoreFilters:
    return CoreFilters(**{k: v for k, v in f.model_dump().items() if v})


def _form_filters(modality, body_region, split, source, plane) -> S.Filters:
    return S.Filters(modality=modality, body_region=body_region, split=split, source=source, plane=plane)


def _audit(state, request: Request, who, action: str, status: int, started: float, **fields: Any) -> None:
    state.audit.write(
        request_id=request.state.request_id, who=who.id, name=who.name,
        client=request.client.host if request.client else None, action=action, status=status,
        ms=round((time.perf_counter() - started) * 1000, 1), **fields,
    )  # fmt: skip


def _image_query(searcher: Searcher, state, file: UploadFile | None, image_id: int | None):
    """(query for Searcher.similar, public description). The upload is never stored or logged."""
    if (file is None) == (image_id is None):
        raise InvalidInput("give exactly one of `file` (an upload) or `image_id`", hint="send one, not both")
    if image_id is not None:
        row = searcher.catalog.find_image(int(image_id))
        return int(image_id), S.QueryImage(image_id=int(image_id), case_id=row["case_id"])
    up = read_upload(file, state.upload_imaging)
    own = searcher.catalog.image_by_sha(up.sha256)
    desc = S.QueryImage(sha256=up.sha256, bytes=up.nbytes, width=up.image.width, height=up.image.height)
    if own is not None and own.get("frame") is None:
        # Byte-identical to a catalog image: use its stored vector, which also lets the
        # caller exclude the image's own case.
        desc.image_id, desc.case_id = own["image_id"], own["case_id"]
        return own["image_id"], desc
    return up.image, desc


# Form fields shared by the two image endpoints (multipart).
FileField = Annotated[UploadFile | None, File(description="Query image: PNG, JPEG or DICOM.")]
ImageIdField = Annotated[int | None, Form(ge=1, description="Or: the id of a catalog image.")]
KField = Annotated[int, Form(ge=1, le=100)]
ListField = Annotated[list[str] | None, Form()]


# ---------------------------------------------------------------------------- routes
@router.get("/health", response_model=S.HealthOut, tags=["service"])
def health(state: State) -> S.HealthOut:
    """Liveness and what is loaded: model, index sizes and generations, catalog counts. No key needed."""
    s = state.searcher
    indexes = {}
    if s is not None:
        for space, idx in s.loaded_indexes().items():
            m = idx.manifest
            indexes[space] = S.IndexInfo(count=idx.ntotal, generation=m.generation, kind=m.kind, dim=m.dim,
                                         built_at=m.built_at)  # fmt: skip
    status = "ok" if s is not None else "no_index"
    if s is not None and state.last_reload_error:
        status = "degraded"
    return S.HealthOut(
        status=status, version=medsearch.__version__, model=s.model_id if s else state.model_id(),
        shared_space=bool(s.encoder.shared_space) if s else None, indexes=indexes,
        catalog=state.catalog.counts(), auth_required=state.settings.auth_required,
        drafts_available=state.drafts_available,
        loaded_at=state.loaded_at, last_reload_error=state.last_reload_error,
    )  # fmt: skip


@router.get("/facets", response_model=S.FacetsOut, tags=["search"], responses=_ERRORS)
def facets(state: State, who: Caller) -> S.FacetsOut:
    """Values each filter accepts, with image counts (modality, body region, split, source, plane)."""
    cat = state.catalog
    return S.FacetsOut(**{
        name: [S.FacetValue(value=v, count=n) for v, n in cat.distinct(name)]
        for name in ("modality", "body_region", "split", "source", "plane")
    })  # fmt: skip


@router.post("/search/text", response_model=S.SearchResponse, tags=["search"], responses=_ERRORS)
def search_text(body: S.TextSearchRequest, request: Request, state: State, who: Caller) -> S.SearchResponse:
    """Text -> images (one per case by default) or, with `target=reports`, cases by report text."""
    t0 = time.perf_counter()
    status, hits = 500, []
    try:
        s = state.current()
        f = _core_filters(body.filters)
        if body.target == "reports":
            hits = s.search_reports(body.query, k=body.k, filters=f)
        else:
            hits = s.search_text(body.query, k=body.k, filters=f, per_case=body.per_case, mode=body.mode)
        status = 200
    except MedsearchError as e:
        status = e.http_status
        raise
    finally:
        _audit(state, request, who, "search.text", status, t0, query=body.query[:300], k=body.k,
               filters=body.filters.model_dump(exclude_none=True), mode=body.mode, target=body.target,
               results=len(hits))  # fmt: skip
    state.metrics.search_hits.labels(kind="text").observe(len(hits))
    return S.SearchResponse(
        hits=[hit_out(i, h) for i, h in enumerate(hits, 1)], count=len(hits), model=s.model_id,
        generation=state.generations(s), took_ms=round((time.perf_counter() - t0) * 1000, 2),
    )  # fmt: skip


@router.post("/search/image", response_model=S.SearchResponse, tags=["search"], responses=_ERRORS)
def search_image(
    request: Request,
    state: State,
    who: Caller,
    file: FileField = None,
    image_id: ImageIdField = None,
    k: KField = 10,
    modality: ListField = None,
    body_region: ListField = None,
    split: ListField = None,
    source: ListField = None,
    plane: ListField = None,
    exclude_own_case: Annotated[bool, Form(description="Leave out the query image's own case.")] = False,
    per_case: Annotated[bool, Form(description="One hit per case.")] = True,
) -> S.SearchResponse:
    """Image -> similar images/cases. Send `file` (multipart upload) or `image_id` (a catalog image)."""
    t0 = time.perf_counter()
    status, hits, desc = 500, [], None
    filters = _form_filters(modality, body_region, split, source, plane)
    try:
        s = state.current()
        query, desc = _image_query(s, state, file, image_id)
        hits = s.similar(query, k=k, filters=_core_filters(filters), per_case=per_case,
                         exclude_same_case=exclude_own_case)  # fmt: skip
        status = 200
    except MedsearchError as e:
        status = e.http_status
        raise
    finally:
        _audit(state, request, who, "search.image", status, t0, image_id=image_id,
               upload_sha256=desc.sha256 if desc else None, upload_bytes=desc.bytes if desc else None, k=k,
               filters=filters.model_dump(exclude_none=True), results=len(hits))  # fmt: skip
    state.metrics.search_hits.labels(kind="image").observe(len(hits))
    return S.SearchResponse(
        hits=[hit_out(i, h) for i, h in enumerate(hits, 1)], count=len(hits), model=s.model_id,
        generation=state.generations(s), took_ms=round((time.perf_counter() - t0) * 1000, 2), query_image=desc,
    )  # fmt: skip


@router.get("/cases/{case_ref}", response_model=S.CaseOut, tags=["cases"], responses=_ERRORS)
def get_case(
    request: Request,
    state: State,
    who: Caller,
    case_ref: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,200}$", description="Case id (or key, e.g. MPX1007).")],
) -> S.CaseOut:
    """A whole case: report sections, labels and all its images (with image and thumbnail URLs)."""
    t0 = time.perf_counter()
    status = 500
    try:
        cv = state.catalog.get_case(case_ref)
        status = 200
    except MedsearchError as e:
        status = e.http_status
        raise
    finally:
        _audit(state, request, who, "case.get", status, t0, case=case_ref)
    images = []
    for im in cv.images:
        image_url, thumb = _urls(im["image_id"])
        images.append(S.ImageInfo(**im, image_url=image_url, thumbnail_url=thumb))
    return S.CaseOut(
        case_id=cv.case_id, case_key=cv.case_key, source=cv.source, split=cv.split, title=cv.title,
        diagnosis=cv.diagnosis, category=cv.category, sections=cv.sections, labels=cv.labels, images=images,
    )  # fmt: skip


_PNG = {200: {"content": {"image/png": {}}, "description": "PNG image."}, **_ERRORS}


def _png(request: Request, data: bytes, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content=data, media_type="image/png", headers=headers)


@router.get("/images/{image_id}", response_class=Response, responses=_PNG, tags=["images"])
def get_image(
    request: Request,
    state: State,
    who: Caller,
    image_id: Annotated[int, Path(ge=1, description="Catalog image id (from a hit or a case).")],
    max_side: Annotated[int | None, Query(ge=64, le=8192, description="Shrink so the longer side fits.")] = None,
) -> Response:
    """The image as an 8-bit PNG (DICOM windowed for display). Served by catalog id only."""
    data, etag = state.image_png(image_id, max_side=max_side)
    return _png(request, data, etag)


@router.get("/images/{image_id}/thumbnail", response_class=Response, responses=_PNG, tags=["images"])
def get_thumbnail(
    request: Request,
    state: State,
    who: Caller,
    image_id: Annotated[int, Path(ge=1)],
    size: Annotated[int, Query(ge=32, le=512, description="Longer side in pixels.")] = 256,
) -> Response:
    """A small PNG for result grids (cached in memory)."""
    data, etag = state.image_png(image_id, max_side=size)
    return _png(request, data, etag)


@router.post("/drafts", response_model=S.DraftOut, tags=["drafts"],
             responses={**_ERRORS, 501: {"model": S.ErrorOut, "description": "Drafting is not installed."}})  # fmt: skip
def create_draft(
    request: Request,
    state: State,
    who: Caller,
    file: FileField = None,
    image_id: ImageIdField = None,
    generator: Annotated[
        str, Form(description="extractive (no LLM), or an LLM generator the server enables.")
    ] = "extractive",
) -> S.DraftOut:
    """Image -> a draft report whose sentences cite the similar prior cases they come from."""
    from .drafts import run_draft

    t0 = time.perf_counter()
    status, out, desc = 500, None, None
    try:
        s = state.current()
        query, desc = _image_query(s, state, file, image_id)
        out = run_draft(state, s, query, desc, generator)
        status = 200
    except MedsearchError as e:
        status = e.http_status
        raise
    except ApiError as e:
        status = e.status_code
        raise
    finally:
        _audit(state, request, who, "draft", status, t0, image_id=image_id, generator=generator,
               upload_sha256=desc.sha256 if desc else None,
               results=len(out.sentences) if out else 0,
               cited_cases=sorted({c.case_id for st in out.sentences for c in st.citations}) if out else [])  # fmt: skip
    out.took_ms = round((time.perf_counter() - t0) * 1000, 1)
    return out


@router.post("/admin/reindex", response_model=S.ReloadOut, tags=["admin"], responses=_ERRORS)
def reindex(request: Request, state: State, who: Admin) -> S.ReloadOut:
    """Load the newest index generation (built by `medsearch index`) and swap it in atomically.

    Requests in flight finish on the generation they started with; if the new generation cannot
    be loaded whole (e.g. `medsearch index` is still writing), the old one keeps serving and this
    returns 409.
    """
    t0 = time.perf_counter()
    status = 500
    try:
        info = state.reload()
        status = 200
    except MedsearchError as e:
        status = e.http_status
        raise
    finally:
        _audit(state, request, who, "admin.reindex", status, t0)
    return S.ReloadOut(swapped=True, **info)
