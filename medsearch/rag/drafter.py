"""Drafter: query image -> evidence -> generator -> grounded, cited draft.

    drafter = Drafter(searcher, "extractive")            # or a Generator instance
    draft = drafter.draft("scan.png")                     # Draft: sentences, citations, support
    print(draft_to_markdown(draft))                       # medsearch.rag.render

Every sentence keeps only citations to retrieved evidence cases (others are removed and
counted) and gets a support score; a draft with no validly cited sentence is refused with
``GenerationError``, or redrafted by the extractive generator when ``config.fallback`` is set.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from medsearch.errors import GenerationError
from medsearch.rag.config import DraftConfig
from medsearch.rag.evidence import EvidencePack, select_evidence
from medsearch.rag.generators import Generator, OnToken, make_generator
from medsearch.rag.grounding import ground, parse_generation
from medsearch.rag.records import Draft
from medsearch.rag.wording import WordingPrior, pool_prior
from medsearch.search import Filters

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from medsearch.search import ImageQuery, Searcher


class Drafter:
    """Draft reports for query images from one searcher's catalog."""

    def __init__(
        self, searcher: Searcher, generator: str | Generator | None = None, config: DraftConfig = DraftConfig()
    ) -> None:
        self.searcher = searcher
        self.config = config
        if generator is None or isinstance(generator, str):
            generator = make_generator(generator or config.generator, config)
        self.generator = generator
        self._extractive: Generator | None = generator if generator.name == "extractive" else None
        ev = config.evidence
        if generator.name != "extractive":  # an LLM sees a shorter evidence list (prompt length, speed)
            k_max = min(ev.k_max, config.llm.max_cases)
            ev = replace(ev, k_max=k_max, k_min=min(ev.k_min, k_max), max_sentences=min(ev.max_sentences, config.llm.max_sentences))
        self.evidence_config = ev

    @property
    def extractive(self) -> Generator:
        if self._extractive is None:
            self._extractive = make_generator("extractive", self.config)
        return self._extractive

    def evidence(self, image: str | Path | int | Image.Image | ImageQuery, filters: Filters = Filters()) -> EvidencePack:
        """The evidence pack for ``image`` (retrieval, adaptive k, guarded sentences, their wording typicality)."""
        return select_evidence(self.searcher, image, self.evidence_config, filters, prior=self.prior(filters))

    def prior(self, filters: Filters = Filters()) -> WordingPrior | None:
        """The wording prior of the pool ``filters`` draw evidence from (None when the extractive weight is 0);
        shared by the drafters of one process (``rag.wording.pool_prior``)."""
        if not self.config.extractive.wording:
            return None
        return pool_prior(self.searcher.catalog, filters)

    def draft(
        self,
        image: str | Path | int | Image.Image | ImageQuery,
        filters: Filters = Filters(),
        *,
        on_token: OnToken | None = None,
    ) -> Draft:
        """Draft a report for ``image`` (a file, a PIL image, a catalog image id/key, or a resolved ImageQuery)."""
        t0 = time.perf_counter()
        pack = self.evidence(image, filters)
        t1 = time.perf_counter()
        try:
            return self._draft(pack, self.generator, on_token, t0, t1)
        except GenerationError as e:
            if not self.config.fallback or self.generator.name == "extractive":
                raise
            d = self._draft(pack, self.extractive, None, t0, t1)
            return replace(d, fallback_from=self.generator.name, fallback_reason=str(e))

    def _draft(self, pack: EvidencePack, gen: Generator, on_token: OnToken | None, t0: float, t1: float) -> Draft:
        out = gen.generate(pack, on_token=on_token)
        t2 = time.perf_counter()
        proposed = out.sentences if out.sentences is not None else parse_generation(out.text or "")
        if not proposed:
            raise GenerationError(
                f"the {gen.name} generator ({out.model}) wrote no sentence for {pack.query}",
                hint="use --fallback to draft with the extractive generator",
            )
        sentences, invalid, written = ground(
            proposed, pack, self.searcher.encoder,
            support_threshold=self.config.support_threshold, drop_uncited=self.config.drop_uncited,
        )  # fmt: skip
        if not any(s.citations for s in sentences):
            raise GenerationError(
                f"the {gen.name} generator ({out.model}) cited no retrieved case in {len(proposed)} sentences "
                f"({invalid} invalid citations removed) for {pack.query}",
                hint="use --fallback to draft with the extractive generator, or a stronger model",
            )
        t3 = time.perf_counter()
        return Draft(
            query=pack.query,
            generator=gen.name,
            model=out.model,
            sentences=tuple(sentences),
            evidence=tuple(pack.cases),
            invalid_citations_removed=invalid,
            citations_total=written,
            raw_text=out.text,
            timings={
                "evidence_s": round(t1 - t0, 4), "generate_s": round(t2 - t1, 4),
                "ground_s": round(t3 - t2, 4), "total_s": round(t3 - t0, 4),
            },  # fmt: skip
        )

