"""Retrieval-augmented report drafting with sentence-level citations.

    from medsearch.rag import Drafter
    draft = Drafter(searcher, "extractive").draft("scan.png")

Modules: ``evidence`` (retrieval, adaptive k), ``generators`` (extractive, openai,
llama-cpp, transformers), ``grounding`` (citations, support), ``guard`` (prompt injection),
``prompt``, ``render`` (JSON, markdown), ``evaluate`` (``medsearch eval drafts``).
Nothing heavy is imported here.
"""

from __future__ import annotations

from medsearch.rag.config import GENERATORS, DraftConfig, EvidenceConfig, ExtractiveConfig, LLMConfig
from medsearch.rag.drafter import Drafter
from medsearch.rag.records import Citation, Draft, DraftSentence, EvidenceCase, EvidenceSentence

__all__ = [
    "GENERATORS",
    "Citation",
    "Draft",
    "DraftConfig",
    "DraftSentence",
    "Drafter",
    "EvidenceCase",
    "EvidenceConfig",
    "EvidenceSentence",
    "ExtractiveConfig",
    "LLMConfig",
]
