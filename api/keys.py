"""API keys, stored hashed in a JSON file (default ``HOME/api_keys.json``, mode 0600).

A key looks like ``msk_<id>_<secret>``: ``id`` (8 hex) names the key in logs and in
``medsearch keys list``; ``secret`` is 32 random bytes. Only ``sha256(key)`` is stored. A plain
hash (not a slow password KDF) is enough because the key is random with 256 bits of entropy:
there is no dictionary to try, and every request can be checked in microseconds.

Scopes: ``read`` (search, cases, images, drafts, metrics) and ``admin`` (read + reindex).
Pure stdlib: the CLI imports this without FastAPI.

Rotation (``rotate(id, overlap)``) gives a key a new secret under the same id, name and scope;
the old secret keeps working until ``previous_expires_at`` (the overlap), so clients can switch
without an outage, and is refused after it. Revoking a key refuses both secrets from the next
request on: a request already past authentication finishes, every later one gets 401. The file
is reread whenever it changes on disk (inode, size or mtime), so a running server sees a
rotation or revocation made by ``medsearch keys`` at its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from medsearch.errors import InvalidInput, NotFound
from medsearch.stores.base import write_json_atomic

SCOPES = ("read", "admin")
_KEY_RE = re.compile(r"^msk_([0-9a-f]{8})_([A-Za-z0-9_-]{20,128})$")


@dataclass(frozen=True)
class KeyInfo:
    """One stored key: never the key itself, only its hash."""

    id: str
    name: str
    scope: str
    hash: str
    created_at: str
    revoked_at: str | None = None
    rotated_at: str | None = None  # when the current secret replaced the previous one
    previous_hash: str | None = None  # the previous secret's hash, accepted until previous_expires_at
    previous_expires_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def previous_valid(self, now: datetime) -> bool:
        """Whether the previous secret is still inside its overlap period."""
        if not self.active or not self.previous_hash or not self.previous_expires_at:
            return False
        return now < datetime.fromisoformat(self.previous_expires_at)

    def allows(self, scope: str) -> bool:
        return self.active and (self.scope == "admin" or self.scope == scope)

    def public(self) -> dict[str, str | None]:
        """What may be shown: everything but the hashes."""
        return {k: v for k, v in asdict(self).items() if k not in ("hash", "previous_hash")}


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d`` (or plain seconds) -> timedelta; InvalidInput otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not m:
        raise InvalidInput(f"cannot read the duration {text!r}", hint="write it like 90s, 15m, 24h or 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * unit)


class KeyStore:
    """The keys file of one home. ``verify`` rereads the file when it changed on disk."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.path = Path(path)
        self.clock = clock  # aware UTC datetimes; tests move it instead of sleeping through an overlap
        self._keys: dict[str, KeyInfo] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._refresh()

    # ------------------------------------------------------------------ reading
    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # every write is a rename: a new inode
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            keys = {k["id"]: KeyInfo(**k) for k in data.get("keys", [])}
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise InvalidInput(
                f"the API keys file {self.path} is unreadable ({e})",
                hint="fix or delete it, then add keys with `medsearch keys add --scope admin`",
            ) from e
        self._keys, self._stamp = keys, stamp

    def keys(self) -> list[KeyInfo]:
        """All keys, active and revoked, oldest first."""
        with self._lock:
            self._refresh()
            return sorted(self._keys.values(), key=lambda k: k.created_at)

    def has_active(self) -> bool:
        return any(k.active for k in self.keys())

    def verify(self, key: str) -> KeyInfo | None:
        """The active key matching ``key`` (its current secret, or the previous one inside the
        rotation overlap), or None. Hashes are compared in constant time."""
        m = _KEY_RE.match(key or "")
        if not m:
            return None
        with self._lock:
            self._refresh()
            info = self._keys.get(m.group(1))
        if info is None or not info.active:
            return None
        given = hash_key(key)
        current = hmac.compare_digest(info.hash, given)
        previous = hmac.compare_digest(info.previous_hash or "", given)  # always compared: same timing
        if current or (previous and info.previous_valid(self.clock())):
            return info
        return None

    # ------------------------------------------------------------------ writing
    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": 1, "keys": [asdict(k) for k in self._keys.values()]})
        self.path.chmod(0o600)
        self._stamp = None

    def add(self, scope: str = "read", name: str = "") -> tuple[KeyInfo, str]:
        """Create a key; returns (its info, the key). The key is shown once and never stored."""
        if scope not in SCOPES:
            raise InvalidInput(f"unknown scope {scope!r}", hint=f"use one of: {', '.join(SCOPES)}")
        with self._lock:
            self._refresh()
            key_id = secrets.token_hex(4)
            while key_id in self._keys:
                key_id = secrets.token_hex(4)
            key = f"msk_{key_id}_{secrets.token_urlsafe(32)}"
            info = KeyInfo(
                id=key_id, name=name or f"key-{key_id}", scope=scope, hash=hash_key(key),
                created_at=self.clock().isoformat(timespec="seconds"),
            )  # fmt: skip
            self._keys[key_id] = info
            self._write()
        return info, key

    def revoke(self, key_id: str) -> KeyInfo:
        """Mark a key revoked (kept in the file so audit lines still resolve to a name)."""
        with self._lock:
            self._refresh()
            info = self._keys.get(key_id)
            if info is None:
                raise NotFound(f"no API key with id {key_id!r}", hint="see `medsearch keys list`")
            if info.active:
                info = KeyInfo(**{**asdict(info), "revoked_at": self.clock().isoformat(timespec="seconds")})
                self._keys[key_id] = info
                self._write()
        return info

    def rotate(self, key_id: str, overlap: timedelta = timedelta(hours=24)) -> tuple[KeyInfo, str]:
        """Give a key a new secret; the old one keeps working for ``overlap``, then is refused.

        Returns (its info, the new key). Same id, name and scope, so audit lines stay joined.
        Rotating again inside an overlap ends the older secret at once (one previous at a time).
        """
        if overlap < timedelta(0):
            raise InvalidInput(f"the overlap must not be negative (got {overlap})", hint="use e.g. --overlap 24h, or 0")
        with self._lock:
            self._refresh()
            info = self._keys.get(key_id)
            if info is None:
                raise NotFound(f"no API key with id {key_id!r}", hint="see `medsearch keys list`")
            if not info.active:
                raise InvalidInput(f"API key {key_id} is revoked and cannot be rotated",
                                   hint="create a new one with `medsearch keys add`")  # fmt: skip
            now = self.clock()
            key = f"msk_{key_id}_{secrets.token_urlsafe(32)}"
            info = KeyInfo(**{
                **asdict(info), "hash": hash_key(key), "rotated_at": now.isoformat(timespec="seconds"),
                "previous_hash": info.hash if overlap > timedelta(0) else None,
                "previous_expires_at": (now + overlap).isoformat(timespec="seconds") if overlap > timedelta(0) else None,
            })  # fmt: skip
            self._keys[key_id] = info
            self._write()
        return info, key
