"""Draft renderers: the one JSON shape of a draft, and markdown with [C<n>] citations.

``draft_to_dict`` is what ``medsearch draft --json`` prints and what ``POST /v1/drafts`` returns
(the API adds only URLs and its own timing); ``api/schemas.py: DraftOut`` mirrors it field by field.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from medsearch.rag.records import Citation, Draft, DraftSentence, EvidenceCase

SECTION_TITLES = {"findings": "FINDINGS", "impression": "IMPRESSION", "differential": "DIFFERENTIAL"}


def citation_to_dict(c: Citation) -> dict[str, Any]:
    """A citation: its ``C<n>`` marker, the case and the evidence sentence that supports it best."""
    return {"cite": f"C{c.n}", **{f.name: getattr(c, f.name) for f in fields(c)}}


def sentence_to_dict(s: DraftSentence) -> dict[str, Any]:
    """A draft sentence with its citations, support score and flags."""
    return {
        "section": s.section,
        "text": s.text,
        "cites": [f"C{c.n}" for c in s.citations],
        "case_ids": list(s.case_ids),
        "case_keys": [c.case_key for c in s.citations],
        "support": round(s.support, 4),
        "supported": s.supported,
        "flags": list(s.flags),
        "citations": [citation_to_dict(c) for c in s.citations],
    }


def evidence_to_dict(e: EvidenceCase) -> dict[str, Any]:
    """An evidence case (what ``[C<n>]`` points at) with the report sentences shown to the generator."""
    d = {f.name: getattr(e, f.name) for f in fields(e) if f.name != "sentences"}
    d["cite"] = f"C{e.n}"
    d["sentences"] = [{"section": x.section, "text": x.text} for x in e.sentences]
    return d


def draft_to_dict(d: Draft) -> dict[str, Any]:
    """Everything a client needs: sentences with citations and support, evidence, generator, model."""
    return {
        "query": d.query,
        "generator": d.generator,
        "model": d.model,
        "fallback_from": d.fallback_from,
        "fallback_reason": d.fallback_reason,
        "sentences": [sentence_to_dict(s) for s in d.sentences],
        "findings": d.text("findings"),
        "impression": d.text("impression"),
        "unsupported_sentences": d.unsupported,
        "invalid_citations_removed": d.invalid_citations_removed,
        "citations_total": d.citations_total,
        "evidence": [evidence_to_dict(e) for e in d.evidence],
        "timings": d.timings,
    }


def draft_to_markdown(d: Draft) -> str:
    """A readable report: sections, sentences with citations, flags, then the evidence cases."""
    lines = [f"# Draft report for {d.query}", ""]
    gen = f"{d.generator} ({d.model})"
    if d.fallback_from:
        gen += f", fallback from {d.fallback_from}: {d.fallback_reason}"
    lines += [f"_Generator: {gen}. Draft only: to be checked by a radiologist._", ""]
    for section in SECTION_TITLES:
        sents = d.section(section)
        if not sents:
            continue
        lines += [f"## {SECTION_TITLES[section]}", ""]
        for s in sents:
            cites = "".join(f"[C{c.n}]" for c in s.citations)
            flag = f" ⚠ {', '.join(s.flags)}" if s.flags else ""
            lines.append(f"- {s.text} {cites} _(support {s.support:.2f})_{flag}".replace("  ", " "))
        lines.append("")
    notes = []
    if d.unsupported:
        notes.append(f"{d.unsupported} sentence(s) not supported by the cited evidence")
    if d.invalid_citations_removed:
        notes.append(f"{d.invalid_citations_removed} citation(s) to cases that were not retrieved removed")
    if notes:
        lines += ["> " + "; ".join(notes) + ".", ""]
    lines += ["## Evidence", "", "| cite | case | similarity | modality | region | diagnosis |", "|---|---|---|---|---|---|"]
    for e in d.evidence:
        dx = (e.diagnosis or "-").replace("|", "/")
        lines.append(
            f"| C{e.n} | {e.case_key} | {e.score:.3f} | {e.modality_type or '-'} | {e.body_region or '-'} | {dx} |"
        )
    return "\n".join(lines) + "\n"
