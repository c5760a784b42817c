"""The audit log: one JSON line per audited request (who, what, when, status, result count).

Never the image, only its hash; never a key, only its id. Routes get an ``AuditRecord`` from the
``audited(action)`` dependency (api/deps.py) and add their fields to it; the dependency writes the
line when the request ends, with the status it ended with (errors included).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from medsearch.catalog import now


class AuditRecord:
    """The fields one route adds to its audit line (query, k, filters, results, upload hash ...)."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.fields: dict[str, Any] = {}

    def note(self, **fields: Any) -> None:
        self.fields.update(fields)


class AuditLog:
    """Appends JSON lines to a file (or the ``medsearch.audit`` logger when ``path`` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self._logger = logging.getLogger("medsearch.audit")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, **fields: Any) -> None:
        line = json.dumps({"ts": now(), **fields}, ensure_ascii=False, default=str, separators=(",", ":"))
        if self._file is None:
            self._logger.info(line)
            return
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
