"""``POST /v1/drafts`` glue: ``medsearch.rag.Drafter`` when it is installed, a clear 501 when not.

Generators are chosen by the client only from the server's allow-list (``ApiSettings.draft_generators``);
LLM endpoints and model files are server settings, never request fields (no SSRF, no file paths).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from medsearch.errors import InvalidInput

from . import schemas as S
from .deps import ApiError


def available() -> bool:
    """True when ``medsearch.rag`` exports ``Drafter``."""
    if importlib.util.find_spec("medsearch.rag") is None:
        return False
    try:
        return hasattr(importlib.import_module("medsearch.rag"), "Drafter")
    except ImportError:
        return False


def _drafter_cls() -> Any:
    try:
        from medsearch.rag import Drafter
    except ImportError:
        raise ApiError(
            501, "not_implemented", "report drafting is not available in this installation",
            "install a medsearch version that includes medsearch.rag; search endpoints work without it",
        ) from None  # fmt: skip
    return Drafter


def run_draft(state: Any, searcher: Any, query: Any, desc: S.QueryImage, generator: str) -> S.DraftOut:
    """Draft a report for ``query`` (catalog image id or PIL image) with ``generator``."""
    drafter_cls = _drafter_cls()
    allowed = state.settings.draft_generators
    if generator not in allowed:
        raise InvalidInput(
            f"generator {generator!r} is not enabled on this server", hint=f"use one of: {', '.join(allowed)}"
        )
    from medsearch.rag.config import DraftConfig, LLMConfig

    config = DraftConfig(
        generator=generator, llm=state.settings.llm or LLMConfig(), fallback=state.settings.draft_fallback
    )
    draft = drafter_cls(searcher, config=config).draft(query)
    return draft_out(draft, desc)


def draft_out(draft: Any, desc: S.QueryImage | None) -> S.DraftOut:
    """``medsearch.rag.records.Draft`` -> the public schema."""
    sentences = [
        S.DraftSentence(
            section=s.section,
            text=s.text,
            support=round(float(s.support), 4),
            supported=bool(s.supported),
            flags=list(s.flags),
            citations=[
                S.Citation(
                    cite=f"C{c.n}",
                    n=c.n,
                    case_id=c.case_id,
                    case_key=c.case_key,
                    similarity=round(float(c.similarity), 4),
                    evidence=c.evidence,
                    case_url=f"/v1/cases/{c.case_id}",
                )  # fmt: skip
                for c in s.citations
            ],
        )
        for s in draft.sentences
    ]
    evidence = [
        S.Evidence(
            cite=f"C{e.n}",
            n=e.n,
            case_id=e.case_id,
            case_key=e.case_key,
            source=e.source,
            score=round(float(e.score), 6),
            image_id=e.image_id,
            image_key=e.image_key,
            matched=e.matched,
            modality_type=e.modality_type,
            body_region=e.body_region,
            diagnosis=e.diagnosis,
            thumbnail_url=f"/v1/images/{e.image_id}/thumbnail" if e.image_id else None,
            case_url=f"/v1/cases/{e.case_id}",
        )  # fmt: skip
        for e in draft.evidence
    ]
    return S.DraftOut(
        generator=draft.generator, model=draft.model, sentences=sentences, evidence=evidence,
        invalid_citations_removed=draft.invalid_citations_removed, fallback_from=draft.fallback_from,
        fallback_reason=draft.fallback_reason, timings={k: round(float(v), 4) for k, v in draft.timings.items()},
        query_image=desc,
    )  # fmt: skip
