"""Frozen records of a draft: evidence cases, cited sentences and the draft itself.

A ``Draft`` is what ``Drafter.draft`` returns; ``medsearch.rag.render`` turns it into the one
JSON shape both shells return (``draft_to_dict``) and markdown (``draft_to_markdown``).
Citations are written ``[C<n>]`` in generated text; ``n`` is the 1-based position of the
evidence case in ``Draft.evidence``. Records keep case ids and keys so a citation survives
renumbering.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvidenceSentence:
    """One report sentence of an evidence case, as shown to the generator."""

    text: str
    section: str  # findings, impression, diagnosis, caption
    text_id: int | None = None  # catalog texts.id when stored, else None


@dataclass(frozen=True)
class EvidenceCase:
    """A retrieved prior case the draft may cite as ``[C<n>]``."""

    n: int
    case_id: int
    case_key: str
    source: str
    score: float  # image->image cosine to the query (image->text cosine for a case found only by its text)
    image_id: int | None
    image_key: str | None
    matched: str  # image, text, fused
    modality_type: str | None
    body_region: str | None
    category: str | None
    diagnosis: str | None
    split: str | None
    sentences: tuple[EvidenceSentence, ...] = ()
    neutralised: int = 0  # sentences dropped as instruction-like


@dataclass(frozen=True)
class Citation:
    """A valid citation of one draft sentence, with the evidence sentence that supports it best."""

    n: int
    case_id: int
    case_key: str
    similarity: float  # cosine between the draft sentence and ``evidence``, clipped to [0, 1]
    evidence: str


@dataclass(frozen=True)
class DraftSentence:
    """One sentence of the draft with its citations and support score."""

    section: str  # findings | impression
    text: str  # without citation markers
    citations: tuple[Citation, ...]
    support: float  # max cosine to the cited evidence sentences, in [0, 1]; 0 when uncited
    supported: bool  # has a valid citation and support >= the threshold
    flags: tuple[str, ...] = ()  # uncited, low_support, invalid_citation

    @property
    def case_ids(self) -> tuple[int, ...]:
        return tuple(c.case_id for c in self.citations)


@dataclass(frozen=True)
class Draft:
    """A grounded draft report for one query image."""

    query: str
    generator: str
    model: str
    sentences: tuple[DraftSentence, ...]
    evidence: tuple[EvidenceCase, ...]
    invalid_citations_removed: int = 0
    citations_total: int = 0  # citations the generator wrote, valid or not
    fallback_from: str | None = None  # the generator that failed when --fallback was used
    fallback_reason: str | None = None
    raw_text: str | None = None  # the LLM's completion before parsing (None for extractive)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def section(self, name: str) -> list[DraftSentence]:
        return [s for s in self.sentences if s.section == name]

    def text(self, section: str | None = None) -> str:
        """Plain text of the draft (or one section), citations stripped."""
        return " ".join(s.text for s in self.sentences if section is None or s.section == section)

    @property
    def unsupported(self) -> int:
        return sum(not s.supported for s in self.sentences)

    @property
    def cited_case_ids(self) -> list[int]:
        seen: dict[int, None] = {}
        for s in self.sentences:
            for c in s.citations:
                seen.setdefault(c.case_id, None)
        return list(seen)
