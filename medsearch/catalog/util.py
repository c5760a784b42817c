"""Small helpers of the catalog's queries: timestamps, JSON columns, id chunks, filter clauses."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from .schema import FILTER_COLUMNS


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_json(value: Any) -> str:
    """Canonical JSON of a column value (sorted keys, so equal content gives equal text and hashes)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    """``seq`` in slices of ``n`` (SQLite caps the number of ``?`` in one statement)."""
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def filter_sql(filters: dict[str, str | Sequence[str] | None]) -> tuple[str, list[Any]]:
    """(WHERE clause over ``images`` columns, params) for search filters: case-insensitive equality."""
    clauses, params = [], []
    for name, value in filters.items():
        if value is None or value == "" or value == []:
            continue
        if name not in FILTER_COLUMNS:
            raise ValueError(f"unknown filter {name!r}; valid: {', '.join(FILTER_COLUMNS)}")
        col = FILTER_COLUMNS[name]
        values = [value] if isinstance(value, str) else list(value)
        clauses.append(f"lower({col}) IN ({','.join('?' * len(values))})")
        params.extend(v.lower() for v in values)
    return " AND ".join(clauses), params
