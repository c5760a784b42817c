"""Dependencies as ``Annotated`` aliases: the app state, the caller (auth + rate limit), scopes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .state import AppState, Principal

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer msk_...` (from `medsearch keys add`).")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key in an `X-API-Key` header.")

_KEY_HINT = (
    "send `Authorization: Bearer <key>` or `X-API-Key: <key>`; create a key with `medsearch keys add --scope read`"
)


def get_state(request: Request) -> AppState:
    return request.app.state.ms


State = Annotated[AppState, Depends(get_state)]


class ApiError(HTTPException):
    """An HTTP error with our JSON shape (code, message, hint)."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail={"code": code, "message": message, "hint": hint}, headers=headers)


def get_principal(
    request: Request,
    state: State,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Principal:
    """Who is calling (key or anonymous), after the per-caller rate limit."""
    auth_header = request.headers.get("authorization")
    if auth_header and bearer is None:
        raise ApiError(401, "unauthorized", "the Authorization header is not a Bearer token", _KEY_HINT,
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip
    token = bearer.credentials if bearer else api_key
    if token:
        info = state.keys.verify(token.strip())
        if info is None:
            raise ApiError(401, "unauthorized", "the API key is not valid (unknown, mistyped or revoked)", _KEY_HINT,
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip
        who = Principal(id=f"key:{info.id}", name=info.name, scope=info.scope, anonymous=False)
    elif state.settings.auth_required or state.settings.anonymous_scope == "none":
        raise ApiError(401, "unauthorized", "an API key is required", _KEY_HINT, {"WWW-Authenticate": "Bearer"})
    else:
        host = request.client.host if request.client else "unknown"
        who = Principal(id=f"anon:{host}", name="anonymous", scope=state.settings.anonymous_scope, anonymous=True)
    wait = state.limiter.take(who.id)
    if wait > 0:
        state.metrics.rate_limited.inc()
        raise ApiError(
            429, "rate_limited", f"too many requests for {who.name}; try again in {wait:.1f} s",
            "slow down, or ask the operator for a higher --rate-limit", {"Retry-After": str(max(1, round(wait + 0.5)))},
        )  # fmt: skip
    request.state.principal = who
    return who


Caller = Annotated[Principal, Depends(get_principal)]


def require_admin(who: Caller) -> Principal:
    if not who.allows("admin"):
        raise ApiError(403, "forbidden", f"{who.name} has scope {who.scope!r}; this needs an admin key",
                       "create one with `medsearch keys add --scope admin`")  # fmt: skip
    return who


Admin = Annotated[Principal, Depends(require_admin)]
