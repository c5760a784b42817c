"""Dependencies as ``Annotated`` aliases: the app state, the caller (auth + rate limit), scopes, audit.

Every failure here is a core error (``Unauthorized``, ``Forbidden``, ``RateLimited``), turned into
JSON by the one handler in api/errors.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from medsearch.errors import Forbidden, MedsearchError, RateLimited, Unauthorized

from .audit import AuditRecord
from .principal import Principal
from .state import AppState

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer msk_...` (from `medsearch keys add`).")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key in an `X-API-Key` header.")

_KEY_HINT = (
    "send `Authorization: Bearer <key>` or `X-API-Key: <key>`; create a key with `medsearch keys add --scope read`"
)


def get_state(request: Request) -> AppState:
    return request.app.state.ms


State = Annotated[AppState, Depends(get_state)]


def get_principal(
    request: Request,
    state: State,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Principal:
    """Who is calling (key or anonymous), after the per-caller rate limit.

    A key header that is present but empty or malformed is an invalid key (401), never "no key":
    a client whose key variable is unset must not silently fall back to anonymous access.
    """
    auth_header = request.headers.get("authorization")
    key_header = request.headers.get("x-api-key")
    if auth_header is not None and bearer is None:
        raise Unauthorized("the Authorization header is not a Bearer token (or it is empty)", _KEY_HINT)
    if key_header is not None and not key_header.strip():
        raise Unauthorized("the X-API-Key header is empty", _KEY_HINT)
    token = bearer.credentials if bearer else api_key
    if token:
        info = state.keys.verify(token.strip())
        if info is None:
            raise Unauthorized("the API key is not valid (unknown, mistyped or revoked)", _KEY_HINT)
        who = Principal(id=f"key:{info.id}", name=info.name, scope=info.scope, anonymous=False)
    elif state.settings.auth_required or state.settings.anonymous_scope == "none":
        raise Unauthorized("an API key is required", _KEY_HINT)
    else:
        host = request.client.host if request.client else "unknown"
        who = Principal(id=f"anon:{host}", name="anonymous", scope=state.settings.anonymous_scope, anonymous=True)
    wait = state.limiter.take(who.id)
    if wait > 0:
        state.metrics.rate_limited.inc()
        raise RateLimited(f"too many requests for {who.name}; try again in {wait:.1f} s",
                          "slow down, or ask the operator for a higher --rate-limit", retry_after=wait)  # fmt: skip
    request.state.principal = who
    return who


Caller = Annotated[Principal, Depends(get_principal)]


def require_admin(who: Caller) -> Principal:
    if not who.allows("admin"):
        raise Forbidden(f"{who.name} has scope {who.scope!r}; this needs an admin key",
                        "create one with `medsearch keys add --scope admin`")  # fmt: skip
    return who


Admin = Annotated[Principal, Depends(require_admin)]


def audited(action: str) -> Callable[..., Iterator[AuditRecord]]:
    """A dependency that writes one audit line for the request when it ends: who, action, status,
    latency and the fields the route noted (``record.note(query=..., results=...)``)."""

    def dependency(request: Request, state: State, who: Caller) -> Iterator[AuditRecord]:
        record = AuditRecord(action)
        t0 = time.perf_counter()
        status = 500
        try:
            yield record
            status = 200
        except MedsearchError as e:
            status = e.http_status
            raise
        except HTTPException as e:
            status = e.status_code
            raise
        except RequestValidationError:
            status = 422
            raise
        finally:
            state.audit.write(
                request_id=getattr(request.state, "request_id", None), who=who.id, name=who.name,
                client=request.client.host if request.client else None, action=action, status=status,
                ms=round((time.perf_counter() - t0) * 1000, 1), **record.fields,
            )  # fmt: skip

    return dependency


AuditText = Annotated[AuditRecord, Depends(audited("search.text"))]
AuditImage = Annotated[AuditRecord, Depends(audited("search.image"))]
AuditCase = Annotated[AuditRecord, Depends(audited("case.get"))]
AuditDraft = Annotated[AuditRecord, Depends(audited("draft"))]
AuditReindex = Annotated[AuditRecord, Depends(audited("admin.reindex"))]
AuditDelete = Annotated[AuditRecord, Depends(audited("case.delete"))]
