"""Report-text utilities: sentence splitting and token-budget chunking.

Reports are longer than a text tower's context (77 tokens for CLIP, 256 for MiniLM).
Encoders never truncate silently: they split a long text on sentence boundaries into
chunks that fit (``chunk_by_tokens``), embed every chunk and average. The catalog uses the
same functions to store sentences, so a draft can cite the sentence that matched.

Pure Python (``re`` only); no model is needed here: the caller passes ``count_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# Words that end with a period without ending a sentence (compared lower-case, no dot).
# Units ("cm", "mm") are NOT here: "measures 3 cm. The ..." ends a sentence.
ABBREVIATIONS = frozenset(
    """
    dr mr mrs ms prof sr jr st vs v etc e.g i.e eg ie cf al approx appr ca
    fig figs no nos vol ref resp incl esp dept univ hosp pt pts hx dx tx rx sx
    inc ltd co jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)

_BULLET = r"[\u2022\u2023\u25aa\u25cf\u25e6\u2043\u2219\u00b7*\-\u2013\u2014]"
_LIST_MARKER = re.compile(rf"^\s*(?:{_BULLET}|\(?\d{{1,2}}[.)]|\(?[a-zA-Z][)])\s+")
_INLINE_BULLET = re.compile(r"\s*[\u2022\u25aa\u25cf\u25e6]\s*")
_BLANK_LINE = re.compile(r"\n\s*\n")
# A candidate boundary: terminal punctuation (+ closing quotes/brackets), whitespace, then
# something that can start a sentence (capital, digit, opening quote/bracket).
_BOUNDARY = re.compile(r"([.!?]+[\"')\]]*)(\s+)(?=[\"'(\[]?[A-Z0-9])")
_WS = re.compile(r"\s+")
_MARKER_ONLY = re.compile(r"^\(?(?:\d{1,2}|[a-zA-Z])[.)]$")  # "2." left over from "1. A. 2. B."


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str | None) -> list[str]:
    """Lower-case words (letters and digits) of a text, in order: what diagnoses are matched on and what the
    drafter's wording prior counts."""
    return _WORD.findall((text or "").lower())


def _is_heading(line: str) -> bool:
    """'FINDINGS', 'Impression:' - a short line that labels what follows."""
    s = line.strip()
    if not s:
        return False
    if s.endswith(":"):
        return True
    if s.endswith((".", "!", "?")):
        return False
    letters = [c for c in s if c.isalpha()]
    return len(s) <= 40 and bool(letters) and all(c.isupper() for c in letters)


def _lines_to_blocks(text: str) -> list[str]:
    """Join soft-wrapped lines; keep list items, headings and paragraphs apart."""
    blocks: list[str] = []
    for para in _BLANK_LINE.split(text):
        current: list[str] = []
        for raw in para.split("\n"):
            line = raw.strip()
            if not line:
                continue
            starts_item = bool(_LIST_MARKER.match(line))
            prev = current[-1] if current else ""
            breaks = starts_item or prev.endswith((".", "!", "?", ":", ";")) or _is_heading(prev)
            if current and breaks:
                blocks.append(" ".join(current))
                current = []
            current.append(_LIST_MARKER.sub("", line, count=1) if starts_item else line)
        if current:
            blocks.append(" ".join(current))
    return blocks


def _ends_with_abbreviation(chunk: str) -> bool:
    """True when the text before a period is an abbreviation or a single initial."""
    words = chunk.rstrip(".!?\"')]").split()
    if not words:
        return False
    last = words[-1].lower().lstrip("(\"'[")
    if last in ABBREVIATIONS:
        return True
    # "J. Smith", "e.g" written as "e.g", single letters like "a." in "type a. B"
    return len(last) == 1 and last.isalpha()


def _split_block(block: str) -> list[str]:
    """Split one line/paragraph at sentence punctuation, respecting abbreviations."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(block):
        candidate = block[start : m.end(1)]
        if m.group(1).startswith(".") and _ends_with_abbreviation(candidate):
            continue
        out.append(candidate)
        start = m.end(2)
    out.append(block[start:])
    return out


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences.

    Handles newlines (soft-wrapped lines are joined; blank lines, list items, headings
    and lines ending in punctuation break), bullets ("•", "-", "1.", "a)") whose markers
    are dropped, decimals ("3.5 cm"), abbreviations ("Dr.", "e.g.", "vs.", "Fig. 2") and
    initials. Whitespace is collapsed; empty pieces are dropped.
    """
    if not text or not text.strip():
        return []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sentences: list[str] = []
    heading = ""  # a heading line is prefixed to the sentence that follows it
    for block in _lines_to_blocks(text):
        if _is_heading(block):
            heading = f"{heading} {block.rstrip(':').strip()}".strip()
            continue
        for piece in _INLINE_BULLET.split(block):
            for s in _split_block(piece):
                s = _WS.sub(" ", s).strip()
                if not s or _MARKER_ONLY.match(s) or not any(c.isalnum() for c in s):
                    continue
                if heading:
                    s, heading = f"{heading}: {s}", ""
                sentences.append(s)
    if heading:
        sentences.append(heading)
    return sentences


def _cut_word(word: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Cut one over-long "word" (a URL, a hash) into the longest prefixes that fit (binary search)."""
    out: list[str] = []
    while word:
        lo, hi = 1, len(word)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(word[:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(word[:lo])
        word = word[lo:]
    return out


def _split_long_piece(piece: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Split a sentence that alone exceeds the budget on words (and a giant word on characters)."""
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for word in piece.split():
        n = count_tokens(word)
        if n > max_tokens:
            if current:
                parts.append(" ".join(current))
                current, used = [], 0
            parts.extend(_cut_word(word, max_tokens, count_tokens))
            continue
        if current and used + n > max_tokens:
            parts.append(" ".join(current))
            current, used = [], 0
        current.append(word)
        used += n
    if current:
        parts.append(" ".join(current))
    return parts


def chunk_by_tokens(
    text: str | Sequence[str],
    max_tokens: int,
    count_tokens: Callable[[str], int],
) -> list[str]:
    """Pack sentences greedily into chunks of at most ``max_tokens`` tokens.

    ``text`` is a string (split with ``split_sentences``) or a list of sentences.
    ``count_tokens(s)`` returns the tokens of ``s`` WITHOUT special tokens, and
    ``max_tokens`` is the budget for content (context length minus specials). Sentences
    are never cut unless a single one exceeds the budget; then it is split on words.
    Word-piece and BPE tokenizers split on whitespace first, so counts add up across
    sentences joined with a space. Returns [] for empty text.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sentences = split_sentences(text) if isinstance(text, str) else [s for s in text if s.strip()]
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for sentence in sentences:
        n = count_tokens(sentence)
        pieces = [sentence] if n <= max_tokens else _split_long_piece(sentence, max_tokens, count_tokens)
        for piece in pieces:
            n = count_tokens(piece) if len(pieces) > 1 else n
            if current and used + n > max_tokens:
                chunks.append(" ".join(current))
                current, used = [], 0
            current.append(piece)
            used += n
    if current:
        chunks.append(" ".join(current))
    return chunks
