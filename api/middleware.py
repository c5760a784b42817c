"""One pure-ASGI middleware: request id, body-size cap, metrics, security headers.

Pure ASGI (not ``BaseHTTPMiddleware``) so uploads stream through untouched and the per-request
cost stays in microseconds. The body cap answers 413 from ``Content-Length`` before anything is
read, and counts streamed bytes for chunked bodies, so no route ever buffers an oversized upload.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException

from medsearch.errors import INTERNAL, ImageTooLarge

from .metrics import Metrics

Scope = dict[str, Any]
log = logging.getLogger("medsearch.api")

_CSP_PAGE = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_CSP_DOCS = (  # Swagger UI's page has an inline bootstrap script and inline styles
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; object-src 'none'; frame-ancestors 'none'"
)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the cap; FastAPI re-raises HTTPExceptions
    from body parsing as they are, so the app's handler turns it into the usual JSON 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit:,} bytes")


class ObserveMiddleware:
    """Wraps the whole app. ``max_body`` bytes per request body (uploads included)."""

    def __init__(self, app: Any, *, metrics: Metrics, max_body: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        path: str = scope.get("path", "")
        csp = _CSP_DOCS if path.startswith("/docs") else _CSP_PAGE

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", csp.encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        declared = _content_length(scope)
        received = 0

        async def receive_wrapper() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        self.metrics.in_flight.inc()
        try:
            if declared is not None and declared > self.max_body:
                await _too_large(send_wrapper, request_id, self.max_body)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge:
            if not status["started"]:
                await _too_large(send_wrapper, request_id, self.max_body)
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope.get("method"), path, request_id)
            if status["started"]:
                raise
            await _send_json(send_wrapper, 500, {
                "code": INTERNAL,
                "message": "internal server error",
                "hint": "the server log has the details under this request_id",
                "request_id": request_id,
            })  # fmt: skip
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unmatched" if status["code"] == 404 else "other")
            self.metrics.observe(label, scope.get("method", "GET"), status["code"], time.perf_counter() - t0)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Any, request_id: str, limit: int) -> None:
    await _send_json(send, 413, {
        "code": ImageTooLarge.code,
        "message": f"request body is larger than the limit of {limit:,} bytes",
        "hint": "send a smaller image (downscale or crop it), or raise the server's --max-upload-mb",
        "request_id": request_id,
    }, close=True)  # fmt: skip


async def _send_json(send: Any, status: int, error: dict[str, Any], close: bool = False) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
