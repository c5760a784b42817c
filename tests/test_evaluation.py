"""Retrieval metrics: hand-computed cases, a brute-force oracle (Hypothesis) and the report plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsearch.errors import InvalidInput
from medsearch.metrics import (
    average_precision,
    bootstrap_ci,
    chance_recall_at_k,
    first_relevant_rank,
    knn_vote,
    precision_at_k,
    ranked_relevance,
    recall_at_k,
    reciprocal_rank,
    summarize,
)

# ---------------------------------------------------------------------------- hand-computed


def test_hand_computed_single_query():
    # items 0..4 with scores; ranking = 3 (0.9), 1 (0.8), 4 (0.5), 0 (0.2), 2 (0.1)
    scores = np.array([[0.2, 0.8, 0.1, 0.9, 0.5]])
    relevant = np.array([[True, True, False, False, False]])  # items 0 and 1 -> ranks 4 and 2
    rel, n_valid = ranked_relevance(scores, relevant)
    assert rel.tolist() == [[False, True, False, True, False]]
    assert n_valid.tolist() == [5]
    assert first_relevant_rank(rel).tolist() == [2.0]
    assert recall_at_k(rel, 1).tolist() == [0.0]
    assert recall_at_k(rel, 2).tolist() == [1.0]
    assert precision_at_k(rel, 2).tolist() == [0.5]
    assert precision_at_k(rel, 4).tolist() == [0.5]
    # AP = (1/2 + 2/4) / 2 = 0.5
    assert average_precision(rel).tolist() == [0.5]
    assert reciprocal_rank(first_relevant_rank(rel)).tolist() == [0.5]


def test_exclusion_removes_items_from_the_ranking():
    scores = np.array([[0.9, 0.8, 0.7]])
    relevant = np.array([[True, False, True]])
    exclude = np.array([[True, False, False]])  # the best item is the query's own case
    rel, n_valid = ranked_relevance(scores, relevant, exclude)
    assert n_valid.tolist() == [2]
    assert rel.tolist() == [[False, True, False]]  # rank 1 = item 1, rank 2 = item 2
    assert first_relevant_rank(rel).tolist() == [2.0]
    assert precision_at_k(rel, 2).tolist() == [0.5]


def test_ties_break_by_pool_index():
    scores = np.array([[0.5, 0.5, 0.5]])
    rel, _ = ranked_relevance(scores, np.array([[False, False, True]]))
    assert first_relevant_rank(rel).tolist() == [3.0]


def test_no_relevant_item():
    rel, _ = ranked_relevance(np.array([[0.1, 0.2]]), np.array([[False, False]]))
    assert math.isinf(first_relevant_rank(rel)[0])
    assert math.isnan(average_precision(rel)[0])
    assert reciprocal_rank(first_relevant_rank(rel)).tolist() == [0.0]


def test_chance_recall_hand_computed():
    # 1 relevant in 10: R@k = k/10 ; 2 relevant in 4, k=1: 1/2 ; k=3: 1 - C(2,3)/C(4,3) = 1
    assert chance_recall_at_k(np.array([1]), np.array([10]), 3)[0] == pytest.approx(0.3)
    assert chance_recall_at_k(np.array([2]), np.array([4]), 1)[0] == pytest.approx(0.5)
    assert chance_recall_at_k(np.array([2]), np.array([4]), 3)[0] == pytest.approx(1.0)
    # 2 relevant in 5, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert chance_recall_at_k(np.array([2]), np.array([5]), 2)[0] == pytest.approx(0.7)


def test_knn_vote_weights_by_similarity_and_skips_excluded():
    sims = np.array([[0.9, 0.2, 0.25, 0.3]])
    labels = np.array(["CT", "MR", "MR", "MR"], dtype=object)
    # top-3 without exclusion: CT 0.9 vs MR 0.3 + 0.25 = 0.55 -> CT
    assert knn_vote(sims, labels, 3).tolist() == ["CT"]
    # own case (item 0) excluded -> MR
    assert knn_vote(sims, labels, 3, exclude=np.array([[True, False, False, False]])).tolist() == ["MR"]


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    v = np.r_[np.ones(70), np.zeros(30)]
    lo, hi = bootstrap_ci(v, n_boot=2000, seed=1)
    assert lo < 0.7 < hi and 0.55 < lo and hi < 0.85
    assert bootstrap_ci(v, n_boot=2000, seed=1) == (lo, hi)
    s = summarize(v, n_boot=500)
    assert s["value"] == 0.7 and s["n"] == 100
    assert summarize(np.array([3.0, 1.0, 2.0]), stat="median")["value"] == 2.0


def test_shapes_are_checked():
    with pytest.raises(InvalidInput, match="n_queries, n_items"):
        ranked_relevance(np.zeros((2, 3)), np.zeros((2, 4), dtype=bool))


# ---------------------------------------------------------------------------- brute-force oracle


def _brute(scores_row, relevant_row, exclude_row, k):
    order = sorted((j for j in range(len(scores_row)) if not exclude_row[j]), key=lambda j: (-scores_row[j], j))
    rels = [bool(relevant_row[j]) for j in order]
    first = next((r + 1 for r, x in enumerate(rels) if x), math.inf)
    hits = 0
    precs = []
    for r, x in enumerate(rels, 1):
        if x:
            hits += 1
            precs.append(hits / r)
    ap = sum(precs) / len(precs) if precs else math.nan
    return {
        "first": first,
        "recall": 1.0 if any(rels[:k]) else 0.0,
        "precision": sum(rels[:k]) / k,
        "ap": ap,
        "rr": 0.0 if first == math.inf else 1.0 / first,
    }


@st.composite
def _problems(draw):
    nq = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    vals = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0, -0.3])  # few values -> many ties
    scores = np.array(draw(st.lists(st.lists(vals, min_size=n, max_size=n), min_size=nq, max_size=nq)))
    relevant = np.array(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=nq, max_size=nq)))
    exclude = np.array(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=nq, max_size=nq)))
    k = draw(st.integers(1, n + 2))
    return scores, relevant, exclude, k


@settings(max_examples=300, deadline=None)
@given(_problems())
def test_metrics_match_brute_force(problem):
    scores, relevant, exclude, k = problem
    rel, n_valid = ranked_relevance(scores, relevant, exclude)
    fr = first_relevant_rank(rel)
    got = {
        "first": fr,
        "recall": recall_at_k(rel, k),
        "precision": precision_at_k(rel, k),
        "ap": average_precision(rel),
        "rr": reciprocal_rank(fr),
    }
    for q in range(len(scores)):
        want = _brute(scores[q], relevant[q], exclude[q], k)
        assert n_valid[q] == (~exclude[q]).sum()
        for name, value in want.items():
            g = got[name][q]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(g), name
            else:
                assert g == pytest.approx(value), name


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(0, 30), st.integers(1, 30))
def test_chance_recall_matches_the_binomial_formula(n, m, k):
    m = min(m, n)
    # exact: 1 - C(n-m, k)/C(n, k) with k capped at n
    kk = min(k, n)
    want = 0.0 if m == 0 else 1.0 - (math.comb(n - m, kk) / math.comb(n, kk))
    assert chance_recall_at_k(np.array([m]), np.array([n]), k)[0] == pytest.approx(want)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000))
def test_knn_vote_matches_brute_force(n, seed):
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-1, 1, size=(3, n)).round(2)
    labels = rng.choice(np.array(["a", "b", "c"], dtype=object), size=n)
    exclude = rng.random((3, n)) < 0.3
    k = int(rng.integers(1, n + 1))
    got = knn_vote(sims, labels, k, exclude)
    for q in range(3):
        order = sorted(range(n), key=lambda j: (exclude[q, j], -sims[q, j], j))[:k]
        votes: dict[str, float] = {}
        for j in order:
            if not exclude[q, j]:
                votes[labels[j]] = votes.get(labels[j], 0.0) + max(sims[q, j], 0.0) + 1e-6
        want = max(votes, key=lambda lab: votes[lab]) if votes else None
        assert got[q] == want


# ---------------------------------------------------------------------------- by case


def test_case_bootstrap_resamples_whole_cases():
    """One case of 9 identical queries and 9 cases of one query each: a query bootstrap sees 18
    independent values, the case bootstrap 10 clusters, so its interval is wider; both bracket the mean."""
    from medsearch.eval.bycase import bootstrap_ci_by_case, summarize_by_case

    v = np.array([1.0] * 9 + [0, 1, 0, 0, 1, 0, 0, 1, 0], dtype=float)
    cases = np.array([0] * 9 + list(range(1, 10)))
    lo_q, hi_q = bootstrap_ci(v, n_boot=2000, seed=1)
    lo_c, hi_c = bootstrap_ci_by_case(v, cases, n_boot=2000, seed=1)
    assert lo_c <= v.mean() <= hi_c and hi_c - lo_c > 1.3 * (hi_q - lo_q)
    s = summarize_by_case(v, cases, n_boot=500, seed=0)
    assert s["value"] == round(v.mean(), 4) and s["n"] == 18 and s["n_cases"] == 10
    assert summarize_by_case(v, cases, n_boot=500, seed=0) == s  # seeded
    # one query per case: the same distribution as the query bootstrap (same draws)
    one = np.arange(len(v))
    np.testing.assert_allclose(bootstrap_ci_by_case(v, one, n_boot=300, seed=3), bootstrap_ci(v, n_boot=300, seed=3))
    # a case with a NaN (no relevant item) keeps its other queries; all-NaN = no value
    assert summarize_by_case(np.array([np.nan, 1.0]), np.array([0, 0]))["n"] == 1
    assert summarize_by_case(np.array([np.nan]), np.array([0]))["value"] is None
    med = summarize_by_case(np.array([1.0, 2, 3, 10]), np.array([0, 0, 1, 2]), stat="median", n_boot=200)
    assert med["value"] == 2.5 and med["ci95"][0] <= 2.5 <= med["ci95"][1]


def test_case_scores_keep_the_best_image_of_each_case():
    from medsearch.eval.retrieval import case_scores

    s = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, -0.2, 0.4, 0.8]])
    cs, cases = case_scores(s, np.array([7, 3, 7, 5]))
    assert cases.tolist() == [3, 5, 7]
    np.testing.assert_array_equal(cs, [[0.9, 0.2, 0.3], [-0.2, 0.8, 0.5]])


# ---------------------------------------------------------------------------- `medsearch eval retrieval`


@pytest.mark.slow
def test_evaluate_dataset_reads_a_folder_that_is_not_ingested_into_memory(tmp_path):
    """The core resolves DATASET: not in the home -> the shell's ingest fills an in-memory catalog;
    the default model of an empty home is the towers; the home is left without a catalog."""
    from conftest import MEDPIX, balanced_medpix_cases, make_slice

    from indexer.ingest import ingest_path
    from medsearch.config import Paths
    from medsearch.errors import NotFound
    from medsearch.eval.report import markdown
    from medsearch.eval.retrieval import EvalConfig, evaluate_dataset

    data = make_slice(tmp_path / "medpix-2.0", MEDPIX, balanced_medpix_cases(1, split="dev"))
    n_images = sum(1 for _ in open(data / "images.jsonl"))
    paths = Paths(tmp_path / "home")
    with pytest.raises(NotFound, match="no source 'nowhere'"):
        evaluate_dataset(paths, "nowhere")
    said: list[str] = []
    ingested: list[str] = []

    def ingest(cat, folder, source):
        ingested.append(source)
        ingest_path(cat, folder, source=source)

    report = evaluate_dataset(paths, str(data), EvalConfig(n_boot=100), device="cpu", ingest=ingest, log=said.append)
    assert ingested == ["medpix-2.0"] and any("into memory" in m for m in said)
    assert report["model"] == "towers" and report["source"] == "medpix-2.0" and report["split"] == "dev"
    assert report["pool"]["images"] == report["pool"]["query images"] == n_images
    assert "cross-modal" not in report  # the towers have no shared space
    assert 0 <= report["image->image"]["model"]["modality_type"]["P@10"]["value"] <= 1
    assert not paths.catalog.exists()  # nothing was written into the home's catalog
    assert "image->image P@10 modality_type" in markdown(report)
    with pytest.raises(NotFound, match="split 'nope' has no images"):
        evaluate_dataset(paths, str(data), EvalConfig(split="nope"), device="cpu", ingest=ingest)


def _lcs_table(a: list[str], b: list[str]) -> int:
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            d[i + 1][j + 1] = d[i][j] + 1 if x == y else max(d[i][j + 1], d[i + 1][j])
    return d[-1][-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), max_size=40), st.lists(st.sampled_from("abcdefg"), max_size=70))
def test_bit_parallel_lcs_matches_the_table(a, b):
    from medsearch.metrics import lcs_length, token_masks

    assert lcs_length(a, token_masks(b), len(b)) == _lcs_table(a, b)


def test_lcs_f1_equals_rouge_score_on_report_text():
    from rouge_score import rouge_scorer

    from medsearch.metrics import lcs_f1, lcs_length, token_masks

    r = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ref = "Axial CT images demonstrate a large enhancing mass in the left lower lobe with a small pleural effusion."
    for hyp in ("There is a mass in the left lower lobe.", "No pleural effusion.", "Normal brain MRI.", ref):
        a, b = r._tokenizer.tokenize(hyp), r._tokenizer.tokenize(ref)
        assert lcs_f1(lcs_length(a, token_masks(b), len(b)), len(a), len(b)) == pytest.approx(
            r.score(ref, hyp)["rougeL"].fmeasure, abs=1e-12
        )
