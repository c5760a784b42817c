"""Who is calling: a key (by id, name and scope) or an anonymous loopback client (by address)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """The caller of one request, as the auth dependency found it."""

    id: str  # key:<key id> or anon:<client address>; what the audit log and rate limiter use
    name: str
    scope: str  # read, admin
    anonymous: bool

    def allows(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope
