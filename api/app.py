"""The FastAPI app factory: ``create_app(settings)``.

The lifespan opens the catalog, loads the model and the indexes once (``AppState``), and runs
the file watch that swaps in a new index generation when ``medsearch index`` writes one.
Errors leave as JSON ``{"error": {code, message, hint, request_id}}``: library errors with their
own 4xx status, anything unexpected as a bare 500 (the traceback goes to the server log only).
Absolute file paths are scrubbed from every error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import medsearch
from medsearch.errors import IndexNotBuilt, MedsearchError

from .deps import Caller
from .metrics import Metrics
from .middleware import ObserveMiddleware
from .routes import router
from .settings import ApiSettings
from .state import AppState

log = logging.getLogger("medsearch.api")
WEB = Path(__file__).parent / "web"
_PATH_RE = re.compile(r"(?<![\w.])(?!/v1/)(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?")

DESCRIPTION = """\
Search a medical imaging archive by text or by image, read whole cases, and draft reports that
cite similar prior cases.

**Auth**: send `Authorization: Bearer <key>` or `X-API-Key: <key>` (keys come from
`medsearch keys add --scope read|admin`). Keys are required whenever the server listens beyond
loopback; on 127.0.0.1 a caller without a key gets read access. `/v1/health` needs no key.

**Errors** are JSON: `{"error": {"code", "message", "hint", "request_id"}}` with a 4xx status that
says what went wrong (401 key, 403 scope, 404 not found, 409 index, 413 too large, 415 not an
image, 422 invalid fields, 429 rate limit, 501 drafting not installed).
"""


def scrub(text: str, home: Path | None = None) -> str:
    """Remove server file paths from a message."""
    if home is not None:
        text = text.replace(str(home), "<home>")
    return _PATH_RE.sub("<path>", text)


def _error(status: int, code: str, message: str, hint: str | None, request: Request,
           details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    home = getattr(getattr(request.app.state, "ms", None), "paths", None)
    home_dir = home.home if home is not None else None
    body: dict[str, Any] = {
        "code": code,
        "message": scrub(message, home_dir),
        "hint": scrub(hint, home_dir) if hint else None,
        "request_id": getattr(request.state, "request_id", None),
    }
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedsearchError)
    async def _medsearch_error(request: Request, e: MedsearchError) -> JSONResponse:
        status = e.http_status
        if status >= 500 and status not in (502, 503):  # 502/503: an LLM or model not available
            log.error("library error on %s: %s", request.url.path, e)
            return _error(status, type(e).__name__, "internal error in the search library", None, request)
        return _error(status, type(e).__name__, e.message, e.hint, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e.detail, dict):
            d = e.detail
            return _error(e.status_code, d.get("code", "error"), d.get("message", ""), d.get("hint"), request,
                          headers=e.headers)  # fmt: skip
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(e.status_code, "error")
        hint = "see /docs for the routes" if e.status_code in (404, 405) else None
        return _error(e.status_code, code, str(e.detail), hint, request, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(x) for x in err.get("loc", ())], "msg": err.get("msg", ""), "type": err.get("type", "")}
            for err in e.errors()[:20]
        ]  # the offending input is not echoed back
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(x for x in first["loc"] if x not in ("body",)) or "request"
        return _error(422, "invalid_request", f"{where}: {first['msg']}", "see /docs for the request schema",
                      request, details)  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal server error", "the server log has the details under this "
                      "request_id", request)  # fmt: skip


async def _watch(state: AppState, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(state.maybe_reload)
        except Exception:  # never let the watch die
            log.exception("index watch failed")


def create_app(settings: ApiSettings, *, encoder: Any = None) -> FastAPI:
    """Build the app. ``encoder`` reuses an already loaded encoder (tests, benchmarks).

    Refuses to build (``NotFound``/``InvalidInput`` with a hint) when the home has no catalog,
    or when keys are required and none exist, so ``medsearch serve`` fails before it binds.
    """
    check_settings(settings)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState(settings, encoder=encoder, metrics=metrics)
        app.state.ms = state
        try:
            # On purpose in this (the main) thread, before serving: torch calls from the server's
            # worker threads ran ~15x slower (670 vs 45 ms per text search, measured) until the
            # main thread had run the encoder once.
            state.reload()
        except IndexNotBuilt as e:
            log.warning("starting without an index: %s", e)
        except MedsearchError as e:
            log.error("starting with the index not loaded: %s", e)
        watch = asyncio.create_task(_watch(state, settings.watch_seconds)) if settings.watch_seconds > 0 else None
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            state.close()

    app = FastAPI(
        title="medsearch",
        version=medsearch.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from local files (no CDN)
        redoc_url=None,
        openapi_tags=[
            {"name": "search", "description": "Text and image search."},
            {"name": "cases", "description": "Whole cases."},
            {"name": "images", "description": "Images and thumbnails by catalog id (PNG)."},
            {"name": "drafts", "description": "Cited report drafts."},
            {"name": "admin", "description": "Needs an admin key."},
            {"name": "service", "description": "Health and metrics."},
        ],
    )
    app.state.settings = settings
    _install_handlers(app)
    app.include_router(router)

    @app.get("/metrics", include_in_schema=True, tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
    def metrics_route(who: Caller) -> Response:
        """Prometheus text: requests and latency per route, index sizes and generations, reloads."""
        return Response(metrics.render(), media_type=metrics.content_type)

    # ---- web page and docs (local files only)
    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    _mount_docs(app)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"], allow_credentials=False, max_age=600,
        )  # fmt: skip
    # outermost: request id, body cap (uploads + multipart overhead), metrics, security headers
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body=settings.max_upload_bytes + 64 * 1024)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the files shipped in the ``fastapi-offline`` package (no CDN)."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    app.mount("/docs-static", StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="medsearch API", swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css", swagger_favicon_url="/docs-static/favicon.png",
        )  # fmt: skip


def check_settings(settings: ApiSettings) -> None:
    """The start-up checks that need no model: a catalog, and keys when they are required."""
    from medsearch.config import Paths
    from medsearch.errors import InvalidInput, NotFound

    from .keys import KeyStore

    paths = Paths(Path(settings.home).expanduser().resolve())
    if not paths.catalog.exists():
        raise NotFound(f"no catalog in {paths.home}", hint="run `medsearch ingest PATH` and `medsearch index` first")
    if settings.auth_required and not KeyStore(settings.keys_path).has_active():
        why = (
            "--auth required"
            if settings.auth == "required"
            else f"the server listens on {settings.host}, beyond loopback"
        )
        raise InvalidInput(
            f"API keys are required ({why}) but {settings.keys_path.name} holds no active key",
            hint="create one with `medsearch keys add --scope admin`, or serve on 127.0.0.1",
        )


def app_from_env() -> FastAPI:
    """For ``uvicorn api.app:app_from_env --factory``: settings from ``MEDSEARCH_*`` variables."""
    from .settings import from_env

    return create_app(from_env())
