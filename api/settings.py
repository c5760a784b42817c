"""Server settings: one frozen dataclass, built by ``medsearch serve`` from options (or ``from_env``).

The core never reads the environment; this shell may, at its edge only (``from_env``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medsearch.rag.config import LLMConfig

AUTH_MODES = ("auto", "required", "off")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0, :: and any other address."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from outside


@dataclass(frozen=True)
class ApiSettings:
    """Everything the HTTP service needs; nothing here is read at import time."""

    home: Path
    model: str | None = None  # default: the model recorded by the last `medsearch index`
    device: str = "auto"
    host: str = "127.0.0.1"  # where the server binds; decides whether keys are required
    port: int = 8000
    auth: str = "auto"  # auto: keys required beyond loopback; required; off (loopback only)
    keys_file: Path | None = None  # default: HOME/api_keys.json
    anonymous_scope: str = "read"  # what a caller without a key may do when keys are not required
    rate_per_minute: float = 600.0  # per key (or per client address when anonymous); 0 = no limit
    rate_burst: int = 120
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 50_000_000  # declared width x height above this: 413 before decoding
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    audit_log: Path | None = None  # default: HOME/audit.log; Path("-") = the server's stderr log
    watch_seconds: float = 2.0  # poll index manifests and swap in a new generation; 0 = off
    thumbnail_cache: int = 1024  # thumbnails kept in memory (PNG bytes)
    draft_generators: tuple[str, ...] = ("extractive",)  # generators a client may ask for
    llm: LLMConfig | None = None  # LLM generators' settings (server-side only); None: LLMConfig()
    draft_fallback: bool = False  # an LLM failure drafts with the extractive generator instead
    viewer_url: str | None = None  # e.g. "https://pacs/viewer?StudyInstanceUIDs={uid}": admin keys only, needs the link back

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if self.anonymous_scope not in ("read", "none"):
            raise ValueError(f"anonymous_scope must be 'read' or 'none', got {self.anonymous_scope!r}")

    @property
    def auth_required(self) -> bool:
        """Keys are required when asked for, and always when the server listens beyond loopback."""
        if self.auth == "required":
            return True
        return not is_loopback(self.host)

    @property
    def keys_path(self) -> Path:
        return self.keys_file or (Path(self.home) / "api_keys.json")

    @property
    def audit_path(self) -> Path | None:
        if self.audit_log is not None and str(self.audit_log) == "-":
            return None
        return self.audit_log or (Path(self.home) / "audit.log")


def from_env(home: str | Path | None = None, **overrides) -> ApiSettings:
    """Settings from ``MEDSEARCH_*`` variables (for ``uvicorn api.app:app_from_env --factory``)."""
    env = os.environ
    values: dict = {
        "home": Path(home or env.get("MEDSEARCH_HOME") or "~/.medsearch").expanduser().resolve(),
        "model": env.get("MEDSEARCH_MODEL") or None,
        "device": env.get("MEDSEARCH_DEVICE", "auto"),
        "host": env.get("MEDSEARCH_HOST", "127.0.0.1"),
        "auth": env.get("MEDSEARCH_AUTH", "auto"),
        "rate_per_minute": float(env.get("MEDSEARCH_RATE_PER_MINUTE", "600")),
        "max_upload_bytes": int(env.get("MEDSEARCH_MAX_UPLOAD_BYTES", str(20 * 1024 * 1024))),
        "cors_origins": tuple(o.strip() for o in env.get("MEDSEARCH_CORS_ORIGINS", "").split(",") if o.strip()),
    }
    if env.get("MEDSEARCH_KEYS_FILE"):
        values["keys_file"] = Path(env["MEDSEARCH_KEYS_FILE"]).expanduser()
    values.update(overrides)
    return ApiSettings(**values)
