"""Citations and support: parse generated text into cited sentences and check them.

    "FINDINGS:\\nA mass in the right lobe [C1][C3]. ..."
        ─► parse_generation ─► [Proposed(section, text, cites=[1, 3])]
        ─► ground ─► DraftSentence(citations valid only, support = max cosine to the cited
                     cases' evidence sentences, flags: uncited / low_support / invalid_citation)

A citation to a number that is not an evidence case is removed and counted. A sentence left
without a valid citation is flagged ``uncited`` (or dropped with ``drop_uncited``). A draft
in which no sentence has a valid citation is refused by the Drafter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from medsearch.rag.records import Citation, DraftSentence
from medsearch.text import split_sentences

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.encoders.base import Encoder
    from medsearch.rag.evidence import EvidencePack

# [C1], [C 2], [C1, C3], [C1; 2], [c4] (one bracket group, several numbers)
_CITE_GROUP = re.compile(r"\[\s*[Cc]\s*\d+(?:\s*(?:[,;/&]|and)\s*[Cc]?\s*\d+)*\s*\]")
_CITE_NUM = re.compile(r"\d+")
# a citation the completion left unclosed ("... lobe [C1" or "[C" where max_tokens cut it): not a citation, not text
_CITE_BROKEN = re.compile(r"\[\s*[Cc]\s*\d*(?:\s*(?:[,;/&]|and)\s*[Cc]?\s*\d*)*\s*(?=$|[^\]\w])")
# Section headings the models write: "FINDINGS:", "**Impression**", "## Findings", "Conclusion -"
_HEADING = re.compile(
    r"(?im)^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(findings?|impressions?|conclusions?|summary|diagnosis|captions?|differentials?(?:[ \t]+diagnos[ie]s)?|ddx)[ \t]*(?:\*\*|__)?"
    r"[ \t]*[:\-\u2013]?[ \t]*(?:\*\*|__)?[ \t]*"
)
_SECTION = {"finding": "findings", "findings": "findings", "impression": "impression", "impressions": "impression",
            "conclusion": "impression", "conclusions": "impression", "summary": "impression",
            "diagnosis": "impression", "caption": "findings", "captions": "findings", "differential": "differential",
            "differentials": "differential", "ddx": "differential"}  # fmt: skip
# Our evidence delimiters when a model echoes them ("<<<EVIDENCE C1 (similarity ...)", "END C1>>>")
_ECHO = re.compile(r"(?im)^.*(?:<<<|>>|\bEVIDENCE\s+C\s*\d+|^\s*END\s+C\s*\d+).*$")
_CHAT_TOKENS = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]")
# A line labelled with its evidence case, as small models write it: "C1: Multiple nodules ..." or
# "[C2]: ..." (the number must be followed by a colon; "C1-C2 subluxation" is left alone)
_LINE_LABEL = re.compile(r"(?m)^([ \t]*(?:[-*\u2022][ \t]*)?)\[?[Cc][ \t]?(\d{1,2})\]?[ \t]*:[ \t]*(\S.*?)[ \t]*$")
_LEADING_CITES = re.compile(r"^\s*((?:\[\s*[Cc]\s*\d+[^\]]*\]\s*)+)")
_JUNK = re.compile(r"^[\s\-\*\u2022#>:.,;]+|[\s\-\*#>]+$")


@dataclass
class Proposed:
    """A sentence a generator proposes, with the evidence numbers it cites."""

    section: str
    text: str
    cites: list[int] = field(default_factory=list)


def extract_citations(sentence: str) -> tuple[str, list[int]]:
    """(sentence without citation markers, cited numbers in order, duplicates removed)."""
    nums: list[int] = []
    for m in _CITE_GROUP.finditer(sentence):
        for d in _CITE_NUM.findall(m.group(0)):
            if int(d) not in nums:
                nums.append(int(d))
    text = _CITE_BROKEN.sub(" ", _CITE_GROUP.sub(" ", sentence))
    text = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", text)).strip()
    return text, nums


def _split_sections(text: str) -> list[tuple[str, str]]:
    """[(section, body)] in order; text before any heading is findings."""
    out: list[tuple[str, str]] = []
    pos, section = 0, "preamble"  # chatter before the first heading ("Sure! Here is ...")
    for m in _HEADING.finditer(text):
        body = text[pos : m.start()]
        if body.strip():
            out.append((section, body))
        head = m.group(1).lower()
        section = _SECTION.get(head, "differential" if head.startswith("differential") else "findings")
        pos = m.end()
    if text[pos:].strip():
        out.append((section, text[pos:]))
    if len(out) == 1 and out[0][0] == "preamble":  # no headings at all: all of it is findings
        out = [("findings", out[0][1])]
    return out


def _label_to_citation(m: re.Match[str]) -> str:
    """ "C1: Hilar adenopathy" -> "Hilar adenopathy. [C1]" (the line ends its sentence)."""
    body = m.group(3)
    end = "" if body[-1] in ".!?" else "."
    return f"{m.group(1)}{body}{end} [C{m.group(2)}]"


def parse_generation(text: str) -> list[Proposed]:
    """Split a completion into sentences with their ``[C<n>]`` citations (see the module docstring).

    Citation markers that start a sentence belong to the sentence before them
    ("... lobe. [C1] No effusion [C2]."). A line labelled "C1: ..." cites C1 at its end.
    """
    text = _CHAT_TOKENS.sub(" ", text or "").replace("\r\n", "\n")
    text = _ECHO.sub("", text)
    text = _LINE_LABEL.sub(_label_to_citation, text)
    out: list[Proposed] = []
    for section, body in _split_sections(text):
        for raw in split_sentences(body):
            m = _LEADING_CITES.match(raw)
            if m and out:
                _, lead = extract_citations(m.group(1))
                out[-1].cites.extend(n for n in lead if n not in out[-1].cites)
                raw = raw[m.end() :]
            clean, nums = extract_citations(raw)
            clean = _JUNK.sub("", clean).strip()
            if section == "preamble" and not nums:
                continue
            if not any(c.isalpha() for c in clean):
                if nums and out:  # a line that is only citations
                    out[-1].cites.extend(n for n in nums if n not in out[-1].cites)
                continue
            out.append(Proposed(section="findings" if section == "preamble" else section, text=clean, cites=nums))
    return out


def ground(
    proposed: list[Proposed],
    pack: EvidencePack,
    encoder: Encoder,
    *,
    support_threshold: float,
    drop_uncited: bool = False,
) -> tuple[list[DraftSentence], int, int]:
    """(draft sentences, invalid citations removed, citations written) for proposed sentences."""
    n_cases = len(pack.cases)
    written = sum(len(p.cites) for p in proposed)
    invalid = 0
    valid_cites: list[list[int]] = []
    for p in proposed:
        ok = [n for n in p.cites if 1 <= n <= n_cases]
        invalid += len(p.cites) - len(ok)
        valid_cites.append(ok)
    keep = [i for i, p in enumerate(proposed) if valid_cites[i] or not drop_uncited]
    if not keep:
        return [], invalid, written
    vecs = _sentence_vectors([proposed[i].text for i in keep], pack, encoder)  # (s, d)
    sims = vecs @ pack.sent_vecs.T if len(pack.sent_text) else np.zeros((len(keep), 0), np.float32)  # (s, m)
    out: list[DraftSentence] = []
    for row, i in enumerate(keep):
        p = proposed[i]
        cites: list[Citation] = []
        for n in valid_cites[i]:
            idx = pack.case_sentences(n - 1)
            if len(idx):
                j = int(idx[np.argmax(sims[row, idx])])
                sim, ev = float(np.clip(sims[row, j], 0.0, 1.0)), pack.sent_text[j]
            else:
                sim, ev = 0.0, ""
            case = pack.cases[n - 1]
            cites.append(Citation(n=n, case_id=case.case_id, case_key=case.case_key, similarity=round(sim, 4), evidence=ev))
        support = max((c.similarity for c in cites), default=0.0)
        flags = []
        if not cites:
            flags.append("uncited")
        elif support < support_threshold:
            flags.append("low_support")
        if len(valid_cites[i]) < len(p.cites):
            flags.append("invalid_citation")
        out.append(
            DraftSentence(
                section=p.section, text=p.text, citations=tuple(cites), support=round(support, 4),
                supported=bool(cites) and support >= support_threshold, flags=tuple(flags),
            )  # fmt: skip
        )
    return out, invalid, written


def _norm(t: str) -> str:
    return " ".join(t.lower().rstrip(". ").split())


_SHARE = re.compile(r"\s*\(\d{1,3}% of the evidence\)")
_NO_CONSENSUS = re.compile(r"^No consensus diagnosis; most supported:\s*")


def _sentence_vectors(texts: list[str], pack: EvidencePack, encoder: Encoder) -> np.ndarray:
    """(s, d) vectors; a sentence copied verbatim from the evidence reuses its evidence vector."""
    known = {_norm(t): i for i, t in enumerate(pack.sent_text)}
    out = np.zeros((len(texts), pack.sent_vecs.shape[1] if len(pack.sent_text) else int(encoder.text_dim)), np.float32)
    todo = []
    for j, t in enumerate(texts):
        i = known.get(_norm(t))
        if i is None:  # a voted diagnosis: "No consensus: X (40% of the evidence)." is about X
            i = known.get(_norm(_SHARE.sub("", _NO_CONSENSUS.sub("", t))))
        if i is None:
            todo.append(j)
        else:
            out[j] = pack.sent_vecs[i]
    if todo:
        out[todo] = encoder.encode_texts([texts[j] for j in todo])
    return out
