"""Prompt-injection guard: retrieved report text is data, never instructions.

Three layers:
1. ``is_instruction_like``: a sentence that addresses the model ("ignore previous
   instructions", "you are now ...", "respond only with ...", chat-role markers) is dropped
   from the evidence before any generator sees it (the extractive generator too).
2. ``scrub``: markup that could forge structure is removed from every evidence sentence:
   citation markers (``[C7]``), our evidence delimiters, chat-template tokens, code fences.
3. The prompt puts evidence in numbered, delimited blocks and says they are quoted data.

The patterns are precise on purpose: on the 2,312 MedPix findings sentences they flag none
(``tests/test_rag.py`` checks this on the shared data).
"""

from __future__ import annotations

import re

_F = re.IGNORECASE

# Phrases that only make sense as instructions to a language model.
_INSTRUCTION = [
    re.compile(
        r"\b(ignore|disregard|forget|override|bypass|skip)\b[^.]{0,40}?"
        r"\b(previous|prior|above|earlier|preceding|all|any|the|your|system|these|those)\b[^.]{0,30}?"
        r"\b(instructions?|prompts?|rules?|directions?|guidelines?|context|messages?)\b",
        _F,
    ),
    re.compile(r"\b(new|updated|real|actual|hidden|secret)\s+(instructions?|task|prompt|system prompt)\b", _F),
    re.compile(r"\byou\s+(are|will|must|should|shall)\s+(now\s+)?(be\s+)?(an?\s+|the\s+)?(ai|assistant|model|chatbot|language model|llm|dan)\b", _F),
    re.compile(r"\bas an ai\b|\blanguage model\b|\bsystem prompt\b|\bjailbreak\b|\bprompt injection\b", _F),
    re.compile(
        r"\b(respond|reply|answer|output|print|say|write|return|repeat|type)\b[^.]{0,30}?"
        r"\b(only|exactly|verbatim|the following|the word|the phrase|instead)\b",
        _F,
    ),
    re.compile(r"\b(do not|don't|never)\s+(cite|mention|include|use|follow|report)\b[^.]{0,30}\b(evidence|citations?|instructions?|cases?)\b", _F),
    re.compile(r"^\s*(system|assistant|user|human|ai)\s*:", _F | re.MULTILINE),  # a chat turn, not "Nervous system:"
    re.compile(r"<\|[^|>]{1,40}\|>|\[/?INST\]|<</?SYS>>|<\s*/?\s*(system|instructions?|evidence|prompt)\b", _F),
]

# Markup removed from every evidence sentence (citation forgeries, delimiters, template tokens).
_SCRUB = [
    re.compile(r"\[\s*C\s*\d+(\s*[,;/&]\s*C?\s*\d+)*\s*\]", _F),  # [C3], [C1, C2]
    re.compile(r"<<<|>>>|\bEND\s+C\d+\b|\bEVIDENCE\s+C\d+\b", _F),  # our block delimiters
    re.compile(r"<\|[^|>]{1,40}\|>|\[/?INST\]|<</?SYS>>"),  # chat template tokens
    re.compile(r"```+|~~~+"),
    re.compile(r"^\s*#{1,6}\s+"),  # markdown headings
]
_WS = re.compile(r"\s+")


def is_instruction_like(text: str) -> bool:
    """True when ``text`` reads as an instruction to a model rather than a clinical statement."""
    return any(p.search(text) for p in _INSTRUCTION)


def scrub(text: str) -> str:
    """Remove markup that could forge citations, delimiters or chat turns; collapse whitespace."""
    for p in _SCRUB:
        text = p.sub(" ", text)
    return _WS.sub(" ", text).strip()


def neutralise(sentences: list[str]) -> tuple[list[str], int]:
    """(kept sentences, number dropped): instruction-like sentences are dropped, the rest scrubbed."""
    kept: list[str] = []
    dropped = 0
    for s in sentences:
        if is_instruction_like(s):
            dropped += 1
            continue
        s = scrub(s)
        if s and any(c.isalnum() for c in s):
            kept.append(s)
    return kept, dropped
