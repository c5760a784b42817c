"""The FastAPI app factory: ``create_app(settings)``.

The lifespan opens the catalog, loads the model and the indexes once (``AppState``), and runs
the file watch that swaps in a new index generation when ``medsearch index`` writes one.
Errors leave as JSON ``{"error": {code, message, hint, request_id}}`` (api/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

import medsearch
from medsearch.errors import IndexNotBuilt, MedsearchError

from .deps import Caller
from .errors import describe_codes, install_handlers, responses, scrub
from .metrics import Metrics
from .middleware import ObserveMiddleware
from .routes import router
from .settings import ApiSettings
from .state import AppState

log = logging.getLogger("medsearch.api")
WEB = Path(__file__).parent / "web"
__all__ = ["app_from_env", "check_settings", "create_app", "scrub"]

DESCRIPTION = """\
Search a medical imaging archive by text or by image, read whole cases, and draft reports that
cite similar prior cases.

**Auth**: send `Authorization: Bearer <key>` or `X-API-Key: <key>` (keys come from
`medsearch keys add --scope read|admin`). Keys are required whenever the server listens beyond
loopback; on 127.0.0.1 a caller without a key gets read access. `/v1/health` needs no key.

**Errors** are JSON: `{"error": {"code", "message", "hint", "request_id"}}` with a 4xx status that
says what went wrong (400 invalid input, 401 key, 403 scope, 404 not found, 409 index, 413 too
large, 415 not an image, 422 invalid fields, 429 rate limit, 501 drafting not installed). The
codes are the library's, the same as in `medsearch ... --json` errors: {codes}.
"""


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
        description=DESCRIPTION.replace("{codes}", describe_codes()),
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
    install_handlers(app)
    app.include_router(router)
    _document_uploads(app, settings)

    @app.get("/metrics", include_in_schema=True, tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, **responses(401, 429)})  # fmt: skip
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


UPLOAD_ROUTES = ("/v1/search/image", "/v1/drafts")
UPLOAD_TYPES = "image/png, image/jpeg, application/dicom"


def _document_uploads(app: FastAPI, settings: ApiSettings) -> None:
    """Make the multipart contract of the upload routes exact in OpenAPI, where FastAPI cannot say it:
    ``file`` is a binary part of an accepted image type, exactly one of ``file`` / ``image_id`` is
    sent (``oneOf``), and ``generator`` is one this server enables (``--generator``). A text
    (non-file) ``file`` part is still read as "no file" (lenient input)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes, tags=app.openapi_tags)  # fmt: skip
            for path in UPLOAD_ROUTES:
                body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
                schema = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
                schema["properties"]["file"] = {
                    "type": "string", "contentMediaType": "application/octet-stream", "minLength": 1, "title": "File",
                    "description": f"Query image ({UPLOAD_TYPES}). Send this or `image_id`, not both.",
                }  # fmt: skip
                schema["oneOf"] = [{"required": ["file"]}, {"required": ["image_id"]}]
                if "files" in schema["properties"]:  # a whole study: several slices, instead of file / image_id
                    schema["properties"]["files"] = {
                        "type": "array", "minItems": 1, "maxItems": 64, "title": "Files",
                        "items": {"type": "string", "contentMediaType": "application/octet-stream", "minLength": 1},
                        "description": f"Slices of one study ({UPLOAD_TYPES}): one hit per prior study. Instead of "
                                       "`file` / `image_id`.",
                    }  # fmt: skip
                    schema["oneOf"].append({"required": ["files"]})
                if "generator" in schema["properties"]:
                    schema["properties"]["generator"]["enum"] = list(settings.draft_generators)
                body["encoding"] = {"file": {"contentType": UPLOAD_TYPES}}
                if "files" in schema["properties"]:
                    body["encoding"]["files"] = {"contentType": UPLOAD_TYPES}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
