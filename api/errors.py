"""The API's error boundary: every error leaves as ``{"error": {code, message, hint, request_id}}``.

Codes come from the core (``MedsearchError.code``, ``medsearch.errors.error_codes``), so the API and
the CLI's ``--json`` errors speak one vocabulary. Library errors answer with their own status;
anything unexpected is a bare 500 (the traceback goes to the server log only). Absolute file paths
are scrubbed from every message. ``responses(...)`` documents the error statuses of a route.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsearch.errors import (
    INTERNAL,
    ImageTooLarge,
    InvalidInput,
    MedsearchError,
    NotFound,
    RateLimited,
    Unauthorized,
    error_codes,
)

from . import schemas as S

log = logging.getLogger("medsearch.api")
_PATH_RE = re.compile(r"(?<![\w.])(?!/v1/)(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?")

METHOD_NOT_ALLOWED = "method_not_allowed"  # routing, not the library: the only code the core does not own
_HTTP_CODES = {400: InvalidInput.code, 404: NotFound.code, 405: METHOD_NOT_ALLOWED, 413: ImageTooLarge.code}

_STATUS_TEXT = {
    400: "Invalid input: a field the library cannot use, or a body that cannot be parsed.",
    401: "No API key where one is required, an empty or malformed key header, or an unknown/revoked key.",
    403: "The key's scope does not allow this (needs an admin key).",
    404: "No such case or image (or its file is gone).",
    409: "The index is not built, does not match the model, or disagrees with the catalog.",
    413: "Body larger than the upload limit, or an image that declares too many pixels.",
    415: "Not a PNG, JPEG or DICOM image, or an image that cannot be decoded.",
    422: "Request fields that do not match the schema (see `details`).",
    429: "Rate limit exceeded (see Retry-After).",
    501: "Drafting is not installed on this server.",
    502: "The draft generator failed (a malformed completion, no valid citation).",
    503: "The model or the LLM endpoint is not available.",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses: the error body and the codes each can carry."""
    codes = error_codes()
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        names = sorted(c for c, (st, _) in codes.items() if st == status)
        if status in (400, 422):
            names = sorted({*names, InvalidInput.code})
        text = _STATUS_TEXT[status] + (f" Codes: {', '.join(names)}." if names else "")
        out[status] = {"model": S.ErrorOut, "description": text}
    return out


def describe_codes() -> str:
    """A markdown list of every error code (for the API description)."""
    rows = [f"`{code}` ({status})" for code, (status, _) in sorted(error_codes().items(), key=lambda x: (x[1][0], x[0]))]
    return ", ".join(rows + [f"`{METHOD_NOT_ALLOWED}` (405)"])


def scrub(text: str, home: Path | None = None) -> str:
    """Remove server file paths from a message."""
    if home is not None:
        text = text.replace(str(home), "<home>")
    return _PATH_RE.sub("<path>", text)


def error_response(status: int, code: str, message: str, hint: str | None, request: Request,
                   details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    paths = getattr(getattr(request.app.state, "ms", None), "paths", None)
    home = paths.home if paths is not None else None
    body: dict[str, Any] = {
        "code": code,
        "message": scrub(message, home),
        "hint": scrub(hint, home) if hint else None,
        "request_id": getattr(request.state, "request_id", None),
    }
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _headers(e: MedsearchError) -> dict[str, str] | None:
    if isinstance(e, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(e, RateLimited):
        return {"Retry-After": str(max(1, round(e.retry_after + 0.5)))}
    return None


def _allowed(request: Request) -> str:
    """Every method some route serves at the request's path (Starlette's 405 names only the first route's)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedsearchError)
    async def _medsearch_error(request: Request, e: MedsearchError) -> JSONResponse:
        status = e.http_status
        if status >= 500 and status not in (501, 502, 503):  # 501-503: drafting, an LLM or a model not available
            log.error("library error on %s: %s", request.url.path, e)
            return error_response(status, INTERNAL, "internal error in the search library", None, request)
        return error_response(status, e.code, e.message, e.hint, request, headers=_headers(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(e.status_code, "error")
        hint = {
            400: "send JSON or multipart/form-data as /docs describes",
            404: "see /docs for the routes",
            405: "see /docs for the routes and their methods",
        }.get(e.status_code)
        message = str(e.detail)
        if e.status_code == 400:
            message = f"the request body cannot be parsed ({message.rstrip('.')})"
        headers = e.headers
        if e.status_code == 405:  # one path served by several routes (GET and DELETE /v1/cases/{ref}): allow them all
            headers = {**(headers or {}), "Allow": _allowed(request)}
        return error_response(e.status_code, code, message, hint, request, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(x) for x in err.get("loc", ())], "msg": err.get("msg", ""), "type": err.get("type", "")}
            for err in e.errors()[:20]
        ]  # the offending input is not echoed back
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(x for x in first["loc"] if x not in ("body",)) or "request"
        return error_response(422, InvalidInput.code, f"{where}: {first['msg']}", "see /docs for the request schema",
                              request, details)  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL, "internal server error", "the server log has the details under this "
                              "request_id", request)  # fmt: skip
