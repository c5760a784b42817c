"""Sentence splitting and token-budget chunking (pure Python, no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsearch.text import chunk_by_tokens, split_sentences


def words(s: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(s.split())


def test_abbreviations_and_decimals_do_not_split() -> None:
    text = "Seen by Dr. Smith vs. Dr. Jones, e.g. Fig. 2 shows it. Mass measures 3.5 cm. It is i.e. stable."
    assert split_sentences(text) == [
        "Seen by Dr. Smith vs. Dr. Jones, e.g. Fig. 2 shows it.",
        "Mass measures 3.5 cm.",
        "It is i.e. stable.",
    ]


def test_initials_quotes_question_marks() -> None:
    text = 'Patient J. Doe is 45 y.o. Follow-up in 3 mo. (see above). "Quoted." Next one? Yes!'
    assert split_sentences(text) == [
        "Patient J. Doe is 45 y.o.",
        "Follow-up in 3 mo. (see above).",
        '"Quoted."',
        "Next one?",
        "Yes!",
    ]


def test_newlines_bullets_headings() -> None:
    text = (
        "FINDINGS:\n"
        "Restricted diffusion in the right PCA territory.  Periventricular white matter\n"
        "ischemic changes.\n\n"
        "IMPRESSION\n"
        "\u2022 Acute infarct\n"
        "\u2022 Chronic small vessel disease\n"
        "1. Lungs clear. 2. Heart normal.\n"
        "- no fracture"
    )
    assert split_sentences(text) == [
        "FINDINGS: Restricted diffusion in the right PCA territory.",
        "Periventricular white matter ischemic changes.",  # soft-wrapped line joined
        "IMPRESSION: Acute infarct",
        "Chronic small vessel disease",
        "Lungs clear.",
        "Heart normal.",
        "no fracture",
    ]


def test_inline_bullets_and_empty() -> None:
    assert split_sentences("a \u2022 b \u2022 c") == ["a", "b", "c"]
    assert split_sentences("") == []
    assert split_sentences(" \n\n ") == []
    assert split_sentences("No acute disease") == ["No acute disease"]


def test_chunks_respect_budget_and_sentence_boundaries() -> None:
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(20)]
    chunks = chunk_by_tokens(" ".join(sentences), 20, words)
    assert all(words(c) <= 20 for c in chunks)
    assert len(chunks) == 10  # two 7-word sentences per chunk, never three
    assert " ".join(chunks) == " ".join(sentences)  # nothing lost, order kept


def test_long_sentence_split_on_words_and_giant_word_cut() -> None:
    long = " ".join(f"w{i}" for i in range(50))
    chunks = chunk_by_tokens(long, 8, words)
    assert all(words(c) <= 8 for c in chunks) and " ".join(chunks) == long

    def chars(s: str) -> int:
        return len(s)

    chunks = chunk_by_tokens("x" * 100, 10, chars)
    assert all(len(c) <= 10 for c in chunks) and "".join(chunks) == "x" * 100


def test_chunk_accepts_sentence_list_and_validates_budget() -> None:
    assert chunk_by_tokens(["a b", "c", "  "], 3, words) == ["a b c"]
    assert chunk_by_tokens("", 5, words) == []
    with pytest.raises(ValueError):
        chunk_by_tokens("a", 0, words)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abc .\n\u2022", min_size=0, max_size=40), max_size=8), st.integers(1, 12))
def test_chunking_never_drops_words_and_fits(parts: list[str], budget: int) -> None:
    text = " ".join(parts)
    chunks = chunk_by_tokens(text, budget, words)
    assert all(words(c) <= budget for c in chunks)
    # every word of every sentence survives, in order
    expected = " ".join(split_sentences(text)).split()
    assert " ".join(chunks).split() == expected
