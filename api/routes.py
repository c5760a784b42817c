"""Routes under ``/v1``. Each one calls the library once and maps records to public schemas.

Sync ``def`` handlers run in the server's thread pool: the encoders and SQLite calls block, and
FAISS/torch release the GIL while they work. Audited routes take an ``Audit*`` dependency and note
their fields on it; the dependency writes the line with the status the request ended with.
Each route's ``responses`` lists every error status it can answer with.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile as UploadedFile

import medsearch
from medsearch.errors import InvalidInput, NotFound
from medsearch.records import Hit as HitRecord
from medsearch.search import Filters as CoreFilters
from medsearch.search import Searcher

from . import schemas as S
from .deps import Admin, AuditCase, AuditDelete, AuditDraft, AuditImage, AuditReindex, AuditText, Caller, State
from .errors import responses
from .uploads import read_upload

router = APIRouter(prefix="/v1")
MAX_ID = 2**63 - 1  # SQLite's largest integer: catalog ids are never beyond it


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


def _image_query(searcher: Searcher, state, file: UploadFile | str | None, image_id: int | None):
    """(query for Searcher.similar, public description). The upload is never stored or logged.

    A ``file`` part that is not a file (a plain text field, e.g. empty) is treated as absent."""
    if not isinstance(file, UploadedFile):  # starlette's class: what the form parser hands over
        file = None
    if (file is None) == (image_id is None):
        raise InvalidInput("give exactly one of `file` (an upload) or `image_id`", hint="send one, not both")
    if image_id is not None:
        q = searcher.image_query(int(image_id))
        return q, S.QueryImage(image_id=int(image_id), case_id=q.row.case_id)
    up = read_upload(file, state.upload_imaging)
    # the core's rule: byte-identical to a (single-frame) catalog image -> its stored vector,
    # which also lets the caller exclude the image's own case
    q = searcher.image_query(up.image, sha256=up.sha256)
    desc = S.QueryImage(sha256=up.sha256, bytes=up.nbytes, width=up.image.width, height=up.image.height)
    if q.stored:
        desc.image_id, desc.case_id = q.row.image_id, q.row.case_id
    return q, desc


# Form fields shared by the two image endpoints (multipart). ``file`` also accepts a plain text
# part, which counts as no file (clients that always send the field, empty, keep working).
FileField = Annotated[
    UploadFile | str,
    File(description="Query image: PNG, JPEG or DICOM. A text value (not a file) counts as absent."),
]
# Optional form fields are typed without ``| None``: multipart has no null, so the schema must not
# offer one (a client sending the text "null" would be told it is valid, then get 422); absent = None.
ImageIdField = Annotated[int, Form(ge=1, le=MAX_ID, description="Or: the id of a catalog image.")]
FilesField = Annotated[
    list[UploadFile],
    File(description="Several slices of one study (PNG, JPEG or DICOM): one hit per prior study."),
]
MAX_STUDY_FILES = 64


def _study_query(searcher: Searcher, state, files: list[UploadFile]) -> tuple[list[Any], str | None]:
    """Decoded query slices and the study key of the DICOM ones (uploads are never stored or logged)."""
    from medsearch.studies import dicom_study_key, dicom_study_uid

    if len(files) > MAX_STUDY_FILES:
        raise InvalidInput(f"{len(files)} files uploaded; a study query takes at most {MAX_STUDY_FILES}",
                           hint="upload the slices to compare, not the whole series")  # fmt: skip
    pils, uids = [], set()
    for f in files:
        up = read_upload(f, state.upload_imaging)
        pils.append(up.image)
        if up.kind == "dicom":
            f.file.seek(0)
            uid = dicom_study_uid(f.file.read(state.upload_imaging.max_file_bytes))
            if uid:
                uids.add(uid)
    if len(uids) > 1:
        raise InvalidInput(f"the uploaded files belong to {len(uids)} studies; a study query takes one",
                           hint="upload slices of one study")  # fmt: skip
    key = dicom_study_key(uids.pop(), searcher.catalog.salt) if uids else None
    return pils, key


KField = Annotated[int, Form(ge=1, le=100)]
ListField = Annotated[list[str], Form()]

# The error statuses each kind of route can answer with (documented in OpenAPI).
_READ = (401, 429)
_BODY = (400, 413, 422)
_INDEX = (409,)
_IMAGE_IN = (404, 415)


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
                                         built_at=m.built_at, behind=s.behind.get(space, 0))  # fmt: skip
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


@router.get("/facets", response_model=S.FacetsOut, tags=["search"], responses=responses(*_READ))
def facets(state: State, who: Caller) -> S.FacetsOut:
    """Values each filter accepts, with image counts (modality, body region, split, source, plane)."""
    cat = state.catalog
    return S.FacetsOut(**{
        name: [S.FacetValue(value=v, count=n) for v, n in cat.distinct(name)]
        for name in ("modality", "body_region", "split", "source", "plane")
    })  # fmt: skip


@router.post("/search/text", response_model=S.SearchResponse, tags=["search"],
             responses=responses(*_BODY, *_READ, *_INDEX))  # fmt: skip
def search_text(body: S.TextSearchRequest, state: State, audit: AuditText) -> S.SearchResponse:
    """Text -> images (one per case by default) or, with `target=reports`, cases by report text."""
    t0 = time.perf_counter()
    audit.note(query=body.query[:300], k=body.k, filters=body.filters.model_dump(exclude_none=True), mode=body.mode,
               target=body.target, results=0)  # fmt: skip
    s = state.current()
    f = _core_filters(body.filters)
    u = None
    if body.target == "reports":
        hits = s.search_reports(body.query, k=body.k, filters=f)
    else:
        u = s.understand(body.query) if body.understand else None
        hits = s.search_text(body.query, k=body.k, filters=f, per_case=body.per_case, mode=body.mode,
                             understand=u or False)  # fmt: skip
    audit.note(results=len(hits))
    state.metrics.search_hits.labels(kind="text").observe(len(hits))
    return S.SearchResponse(
        hits=[hit_out(i, h) for i, h in enumerate(hits, 1)], count=len(hits), model=s.model_id,
        generation=state.generations(s), took_ms=round((time.perf_counter() - t0) * 1000, 2),
        understood=S.Understood(**u.to_dict()) if u is not None else None,
    )  # fmt: skip


@router.post("/search/image", response_model=S.SearchResponse, tags=["search"],
             responses=responses(*_BODY, *_READ, *_IMAGE_IN, *_INDEX))  # fmt: skip
def search_image(
    state: State,
    audit: AuditImage,
    file: FileField = None,  # type: ignore[assignment]
    image_id: ImageIdField = None,  # type: ignore[assignment]
    files: FilesField = None,  # type: ignore[assignment]
    k: KField = 10,
    modality: ListField = None,  # type: ignore[assignment]
    body_region: ListField = None,  # type: ignore[assignment]
    split: ListField = None,  # type: ignore[assignment]
    source: ListField = None,  # type: ignore[assignment]
    plane: ListField = None,  # type: ignore[assignment]
    exclude_own_case: Annotated[bool, Form(description="Leave out the query image's own case.")] = False,
    per_case: Annotated[bool, Form(description="One hit per case.")] = True,
) -> S.SearchResponse:
    """Image -> similar images/cases. Send `file` (multipart upload) or `image_id` (a catalog image).

    Several `files` (slices of one study) -> one hit per prior study, scored by the mean over the
    uploaded slices of the best similarity to any slice of that study; the query's own study (its
    DICOM StudyInstanceUID) is left out.
    """
    t0 = time.perf_counter()
    filters = _form_filters(modality, body_region, split, source, plane)
    audit.note(image_id=image_id, files=len(files or []), k=k, filters=filters.model_dump(exclude_none=True), results=0)
    s = state.current()
    if files:
        if file is not None or image_id is not None:
            raise InvalidInput("give `files` (a study) or one `file` / `image_id`, not both", hint="send one")
        pils, study_key = _study_query(s, state, files)
        hits = s.similar_study(pils, k=k, filters=_core_filters(filters), own_study_key=study_key)
        desc = None
    else:
        query, desc = _image_query(s, state, file, image_id)
        audit.note(upload_sha256=desc.sha256, upload_bytes=desc.bytes)
        hits = s.similar(query, k=k, filters=_core_filters(filters), per_case=per_case,
                         exclude_same_case=exclude_own_case)  # fmt: skip
    audit.note(results=len(hits))
    state.metrics.search_hits.labels(kind="image").observe(len(hits))
    return S.SearchResponse(
        hits=[hit_out(i, h) for i, h in enumerate(hits, 1)], count=len(hits), model=s.model_id,
        generation=state.generations(s), took_ms=round((time.perf_counter() - t0) * 1000, 2), query_image=desc,
    )  # fmt: skip


@router.get("/cases/{case_ref}", response_model=S.CaseOut, tags=["cases"], responses=responses(404, 422, *_READ))
def get_case(
    state: State,
    who: Caller,
    audit: AuditCase,
    case_ref: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,200}$", description="Case id (or key, e.g. MPX1007).")],
) -> S.CaseOut:
    """A whole case: report sections, labels and all its images (with image and thumbnail URLs)."""
    audit.note(case=case_ref)
    if case_ref.isdigit() and int(case_ref) > MAX_ID:
        raise NotFound(f"no case {case_ref!r}", hint="use a case id or key from a search result")
    cv = state.catalog.get_case(case_ref)
    images = []
    for im in cv.images:
        image_url, thumb = _urls(im["image_id"])
        images.append(S.ImageInfo(**im, image_url=image_url, thumbnail_url=thumb))
    series = [
        S.SeriesOut(**{k: v for k, v in sr.items() if k in S.SeriesOut.model_fields and k != "slices"},
                    slices=[S.SliceOut(**sl, thumbnail_url=_urls(sl["image_id"])[1]) for sl in sr["slices"]])
        for sr in state.catalog.case_series(cv.case_id, state.model_id())
    ]  # fmt: skip
    return S.CaseOut(
        case_id=cv.case_id, case_key=cv.case_key, source=cv.source, split=cv.split, title=cv.title,
        diagnosis=cv.diagnosis, category=cv.category, sections=cv.sections, labels=cv.labels, images=images,
        series=series, viewer_url=_viewer_url(state, who, cv.source, cv.case_key),
    )  # fmt: skip


def _viewer_url(state, who, source: str, case_key: str) -> str | None:
    """The hospital viewer's URL of a study: admin keys only, with --viewer-url and a link back in the home."""
    template = state.settings.viewer_url
    if not template or not who.allows("admin"):
        return None
    from medsearch.catalog.links import LinkStore, viewer_url

    store = LinkStore.open(state.paths.home)
    if store is None:
        return None
    try:
        uid = store.uid(source, case_key)
    finally:
        store.close()
    return viewer_url(template, uid) if uid else None


_PNG = {
    200: {"content": {"image/png": {}}, "description": "PNG image."},
    304: {"description": "Not modified (the `If-None-Match` ETag matches)."},
    **responses(404, 415, 422, *_READ),
}


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
    image_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Catalog image id (from a hit or a case).")],
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
    image_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    size: Annotated[int, Query(ge=32, le=512, description="Longer side in pixels.")] = 256,
) -> Response:
    """A small PNG for result grids (cached in memory)."""
    data, etag = state.image_png(image_id, max_side=size)
    return _png(request, data, etag)


@router.post("/drafts", response_model=S.DraftOut, tags=["drafts"],
             responses=responses(*_BODY, *_READ, *_IMAGE_IN, *_INDEX, 501, 502, 503))  # fmt: skip
def create_draft(
    state: State,
    audit: AuditDraft,
    file: FileField = None,  # type: ignore[assignment]
    image_id: ImageIdField = None,  # type: ignore[assignment]
    generator: Annotated[
        str, Form(description="extractive (no LLM), or an LLM generator the server enables.")
    ] = "extractive",
) -> S.DraftOut:
    """Image -> a draft report whose sentences cite the similar prior cases they come from.

    The body is what `medsearch draft --json` prints, plus case and thumbnail URLs."""
    from .drafts import run_draft

    t0 = time.perf_counter()
    audit.note(image_id=image_id, generator=generator, results=0, cited_cases=[])
    s = state.current()
    query, desc = _image_query(s, state, file, image_id)
    audit.note(upload_sha256=desc.sha256)
    out = run_draft(state.settings, s, query, desc, generator)
    audit.note(results=len(out.sentences),
               cited_cases=sorted({c.case_id for st in out.sentences for c in st.citations}))  # fmt: skip
    out.took_ms = round((time.perf_counter() - t0) * 1000, 1)
    return out


@router.post("/admin/reindex", response_model=S.ReloadOut, tags=["admin"], responses=responses(403, *_READ, 409, 503))
def reindex(state: State, who: Admin, audit: AuditReindex) -> S.ReloadOut:
    """Load the newest index generation (built by `medsearch index`) and swap it in atomically.

    Requests in flight finish on the generation they started with; if the new generation cannot
    be loaded whole (e.g. `medsearch index` is still writing), the old one keeps serving and this
    returns 409.
    """
    return S.ReloadOut(swapped=True, **state.reload())


class ErasureOut(BaseModel):
    """What `DELETE /v1/cases/{case_ref}` erased (counts only; the key is not echoed)."""

    erasure_id: int | None = None
    cases: int
    images: int
    texts: int
    files: int
    resumed: int


@router.delete("/cases/{case_ref}", response_model=ErasureOut, tags=["admin"],
               responses=responses(403, 404, 422, *_READ, 409, 503))  # fmt: skip
def delete_case(
    state: State,
    who: Admin,
    audit: AuditDelete,
    case_ref: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,200}$", description="Case id (or key) to erase.")],
) -> ErasureOut:
    """Erase a case (admin key): its rows, vectors, index entries, BM25 terms and spool files.

    Crash-safe like `medsearch remove --case`; the audit log records a keyed digest, not the key.
    The server then serves the new index generation (without the case).
    """
    from medsearch.erasure import digest_of
    from medsearch.erasure import remove as run_remove

    audit.note(case_digest=digest_of(state.catalog, "case", case_ref))
    out = run_remove(state.catalog, state.paths, case=case_ref, actor=who.name)
    audit.note(erasure_id=out.get("erasure_id"))
    state.thumbs = type(state.thumbs)(state.thumbs.capacity)  # cached thumbnails of the case go too
    if state.searcher is not None:
        state.reload()
    return ErasureOut(**{k: out.get(k) for k in ErasureOut.model_fields})
