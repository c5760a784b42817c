"""The Generator protocol: evidence in, a cited draft (text or sentences) out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.rag.evidence import EvidencePack
    from medsearch.rag.grounding import Proposed

OnToken = Callable[[str], None]


@dataclass
class Generation:
    """What a generator returns: raw text with ``[C<n>]`` markers (LLMs) or sentences (extractive)."""

    model: str
    text: str | None = None
    sentences: list[Proposed] | None = None
    meta: dict[str, object] = field(default_factory=dict)  # tokens, finish reason, ...


@runtime_checkable
class Generator(Protocol):
    name: str  # extractive, openai, llama-cpp, transformers

    @property
    def model(self) -> str:
        """The model that writes (a file name, an endpoint model, or 'extractive')."""

    def generate(self, pack: EvidencePack, on_token: OnToken | None = None) -> Generation:
        """Write a draft from ``pack``; stream text pieces to ``on_token`` when given."""
