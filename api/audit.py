"""The audit record of a request: one hash-chained JSON line (medsearch.audit) per audited request.

Never the image, only its hash; never a key, only its id. Routes get an ``AuditRecord`` from the
``audited(action)`` dependency (api/deps.py) and add their fields to it; the dependency writes the
line when the request ends, with the status it ended with (errors included).
"""

from __future__ import annotations

from typing import Any


class AuditRecord:
    """The fields one route adds to its audit line (query, k, filters, results, upload hash ...)."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.fields: dict[str, Any] = {}

    def note(self, **fields: Any) -> None:
        self.fields.update(fields)
