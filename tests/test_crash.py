"""Crash safety: real `medsearch ingest` + `index` subprocesses SIGKILLed at seeded moments
(``tests/crash_harness.py``; the full >= 50-kill run is ``python tests/crash_harness.py``), and
the two states a kill can leave an index in, built from real files.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from crash_harness import crash_run

from indexer.embed import build_indexes
from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.vectors import VectorIndex, read_manifest

MODEL = "towers"


@pytest.mark.slow
def test_sigkill_at_seeded_moments_loses_and_duplicates_nothing(tmp_path):
    lines: list[str] = []
    tally = crash_run(tmp_path / "crash", kills=6, seed=6, n_medpix=2, n_covid=3, kills_per_round=6, echo=lines.append)
    assert tally.kill_points == 6, lines
    assert tally.problems == [], "\n".join(lines)
    assert tally.survived == tally.kill_points and tally.rounds_ok == tally.rounds >= 1


def _home(small_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(small_home, home)
    cat = Catalog.open(home / "catalog.db")
    weights = cat.get_meta(f"weights:{MODEL}")
    dims = {s: cat.db.execute("SELECT dim FROM vectors WHERE model = ? AND space = ? LIMIT 1", [MODEL, s]).fetchone()[0]
            for s in ("image", "text")}  # fmt: skip
    return home, cat, weights, dims


def test_vector_rewritten_with_the_same_count_marks_the_index_dirty(small_home, tmp_path):
    """A changed image re-embedded (count unchanged), then a kill before the index step: still rebuilt."""
    home, cat, weights, dims = _home(small_home, tmp_path)
    d = Paths(home).index_dir(MODEL)
    gen = read_manifest(d / "image.json").generation
    iid = cat.db.execute("SELECT max(item_id) FROM vectors WHERE space = 'image'").fetchone()[0]
    new = np.zeros((1, dims["image"]), np.float32)
    new[0, 0] = 1.0
    cat.put_vectors(MODEL, "image", [iid], new)  # committed; the process "dies" before run_index marks anything
    assert cat.get_meta(f"dirty:{MODEL}:image") == "1"
    out = build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=weights, dims=dims)
    assert out["image"]["rebuilt"] and out["image"]["generation"] == gen + 1
    np.testing.assert_allclose(VectorIndex.load(d, "image").reconstruct(iid), new[0], atol=1e-3)
    assert not build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=weights, dims=dims)["image"]["rebuilt"]
    cat.close()


def test_kill_between_the_index_file_and_its_manifest_is_rebuilt_next_run(small_home, tmp_path):
    """The window between the two renames of a save: a new .faiss beside the old manifest, same count."""
    home, cat, weights, dims = _home(small_home, tmp_path)
    d = Paths(home).index_dir(MODEL)
    ids, vecs = next(cat.iter_vectors(MODEL, "text"))
    other = VectorIndex.from_blocks([(ids, vecs[::-1].copy())], model_id=MODEL, weights_hash=weights, space="text",
                                    dim=dims["text"], count=len(ids))  # fmt: skip
    scratch = tmp_path / "scratch"
    other.save(scratch)
    cat.set_meta(f"dirty:{MODEL}:text", "1")  # what build_indexes records before it saves
    shutil.copy(scratch / "text.faiss", d / "text.faiss")  # killed after the first rename
    assert read_manifest(d / "text.json").count == len(ids)  # same count: only the flag tells
    out = build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=weights, dims=dims)
    assert out["text"]["rebuilt"]
    idx = VectorIndex.load(d, "text", model_id=MODEL)
    np.testing.assert_allclose(idx.reconstruct(int(ids[0])), vecs[0], atol=1e-3)
    cat.close()
