"""``POST /v1/drafts`` glue: ``medsearch.rag.Drafter`` when it is installed, a clear 501 when not.

Generators are chosen by the client only from the server's allow-list (``ApiSettings.draft_generators``);
LLM endpoints and model files are server settings, never request fields (no SSRF, no file paths).
The response is ``medsearch.rag.render.draft_to_dict`` (the JSON ``medsearch draft --json`` prints)
plus URLs for the cited cases and thumbnails.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import replace
from typing import Any

from medsearch.errors import InvalidInput, NotInstalled

from . import schemas as S


def available() -> bool:
    """True when ``medsearch.rag`` exports ``Drafter``."""
    if importlib.util.find_spec("medsearch.rag") is None:
        return False
    try:
        return hasattr(importlib.import_module("medsearch.rag"), "Drafter")
    except ImportError:
        return False


def run_draft(settings: Any, searcher: Any, query: Any, desc: S.QueryImage, generator: str) -> S.DraftOut:
    """Draft a report for ``query`` (catalog image id or PIL image) with ``generator``."""
    try:
        from medsearch.rag import DraftConfig, Drafter
        from medsearch.rag.render import draft_to_dict
    except ImportError:
        raise NotInstalled(
            "report drafting is not available in this installation",
            hint="install a medsearch version that includes medsearch.rag; search endpoints work without it",
        ) from None
    allowed = settings.draft_generators
    if generator not in allowed:
        raise InvalidInput(
            f"generator {generator!r} is not enabled on this server", hint=f"use one of: {', '.join(allowed)}"
        )
    base = DraftConfig(llm=settings.llm) if settings.llm is not None else DraftConfig()
    config = replace(base, generator=generator, fallback=settings.draft_fallback)
    draft = Drafter(searcher, config=config).draft(query)
    return draft_out(draft_to_dict(draft), desc)


def draft_out(body: dict[str, Any], desc: S.QueryImage | None) -> S.DraftOut:
    """``draft_to_dict`` output -> the public schema, with case and thumbnail URLs added."""
    for s in body["sentences"]:
        for c in s["citations"]:
            c["case_url"] = f"/v1/cases/{c['case_id']}"
    for e in body["evidence"]:
        e["case_url"] = f"/v1/cases/{e['case_id']}"
        e["thumbnail_url"] = f"/v1/images/{e['image_id']}/thumbnail" if e.get("image_id") else None
    return S.DraftOut(**body, query_image=desc)
