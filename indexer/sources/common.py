"""What every source reader yields, and the small helpers they share."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsearch.records import CaseRecord, ImageRecord, Skipped
from medsearch.studies import SeriesRecord


@dataclass(frozen=True)
class Note:
    """Something the ingest summary reports by name that is not a skip (e.g. a series ordered by InstanceNumber)."""

    item: str
    message: str


@dataclass(frozen=True)
class StudyDone:
    """The last item of one study: the ingest commits a study whole, never half of it."""

    key: str


Item = CaseRecord | SeriesRecord | ImageRecord | Skipped | Note | StudyDone


class RecentKeys(OrderedDict):
    """A dict that keeps only the ``cap`` most recently used keys, so per-archive bookkeeping
    (case ids, cases already yielded) stays flat in the number of items
    (benchmarks/memory_bench.py). Callers must tolerate a forgotten key: look it up again."""

    def __init__(self, cap: int = 10_000) -> None:
        super().__init__()
        self.cap = cap

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.cap:
            self.popitem(last=False)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record or None, error or None) for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # a BOM may start a file
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 ({e.reason} at byte {e.start})"
                continue
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            except RecursionError:
                yield lineno, None, "JSON nested too deeply to read"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"expected a JSON object, got {type(rec).__name__}"
                continue
            if (bad := _not_unicode(rec)) is not None:
                yield lineno, None, bad
                continue
            yield lineno, rec, None


def _not_unicode(rec: dict[str, Any]) -> str | None:
    """Why a decoded record cannot be stored as text (JSON escapes can spell lone surrogates), or None."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode (a lone UTF-16 surrogate {e.object[e.start:e.end]!a} in a string)"
    except (ValueError, RecursionError):  # a structure json.dumps cannot walk back
        return "JSON nested too deeply to read"
    return None

