"""Crash safety: real `medsearch` writers SIGKILLed at seeded moments (``tests/crash_harness.py``;
the full run over every writer is ``python tests/crash_harness.py --kills 120``): here a seeded
subset (ingest, index, remove --case), the two states a kill can leave an index in, built
from real files, and the temp files a killed writer leaves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from crash_harness import crash_all

from indexer.embed import build_indexes
from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.stores.faiss import VectorIndex, read_manifest

MODEL = "towers"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigkill_at_seeded_moments_loses_and_duplicates_nothing(tmp_path):
    """ingest + index (2 kills), then `remove --case` on the finished home (1 kill): after every kill
    nothing lost, duplicated or phantom and every index loadable or pending; after each rerun the
    reference state, a passing `medsearch check`, no temp file, one finished erasure. (The other
    writers are in the full run: `python tests/crash_harness.py --kills 120`.)"""
    lines: list[str] = []
    tally = crash_all(tmp_path / "crash", kills=3, seed=6, writers={"ingest", "index", "remove --case"},
                      n_medpix=2, n_covid=3, kills_per_round=2, echo=lines.append)  # fmt: skip
    assert tally.kill_points == 3, lines
    assert tally.problems == [], "\n".join(lines)
    assert tally.survived == tally.kill_points and tally.rounds_ok == tally.rounds >= 2
    assert tally.writers["remove --case"].kills == 1
    assert 2 <= tally.distinct <= tally.kill_points  # one writer x moment per kill, two writers at least


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


def test_save_interrupted_between_the_index_file_and_its_manifest_is_rebuilt_next_run(small_home, tmp_path):
    """`index --rebuild --kind hnsw` stops after the .faiss rename (same count, other bytes): the next
    plain `index` must not call the old manifest "up to date"."""
    from medsearch.config import IndexConfig
    from medsearch.errors import IndexInconsistent, StorageError

    home, cat, weights, dims = _home(small_home, tmp_path)
    d = Paths(home).index_dir(MODEL)
    old_manifest = (d / "text.json").read_bytes()
    (d / "text.json").unlink()
    (d / "text.json").mkdir()  # the manifest rename will fail: a stand-in for the kill
    (d / "text.json" / "x").write_text("x")
    with pytest.raises(StorageError):
        build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=weights, dims={"text": dims["text"]},
                      config=IndexConfig(kind="hnsw"), force=True)  # fmt: skip
    shutil.rmtree(d / "text.json")
    (d / "text.json").write_bytes(old_manifest)  # new HNSW file, old flat manifest, same count
    with pytest.raises(IndexInconsistent, match="checksum"):
        VectorIndex.load(d, "text", model_id=MODEL)
    out = build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=weights, dims=dims)
    assert out["text"]["rebuilt"]
    assert VectorIndex.load(d, "text", model_id=MODEL).ntotal == cat.count_vectors(MODEL, "text")
    cat.close()


def test_a_killed_manifest_write_leaves_no_temp_file_behind(tmp_path):
    """Found by the harness: a kill inside the BM25 manifest write left `.bm25.json.*.tmp` for good."""
    import os
    import time

    from medsearch.stores.base import write_json_atomic

    old, fresh = tmp_path / ".bm25.json.k1ll3d.tmp", tmp_path / ".bm25.json.inflight.tmp"
    old.write_text("{")
    fresh.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # left by a run killed an hour ago
    write_json_atomic(tmp_path / "bm25.json", {"count": 1})
    assert not old.exists()
    assert fresh.exists()  # a concurrent writer's file in flight is left alone
    assert (tmp_path / "bm25.json").read_text().strip().startswith("{")


def test_write_atomic_drops_the_temp_file_a_killed_writer_left(tmp_path):
    """Found by the harness (`train` killed inside a feature-cache write): `write_atomic` left
    `.NAME.*.tmp` for good. Now the next write of the same file removes a temp whose process is
    gone (or that has not been written for 10 s), never one a live process is writing."""
    import os
    import subprocess
    import sys
    import time

    from medsearch.fileio import write_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "30fc8743f37e199e.npz"
    killed = tmp_path / f".{target.name}.{int(dead.stdout)}.5_gbm8nb.tmp"  # fresh, but its writer is gone
    live = tmp_path / f".{target.name}.{os.getppid()}.inflight.tmp"  # a running process's write in flight
    old = tmp_path / f".{target.name}.k1ll3d.tmp"  # no pid (an older writer), untouched for an hour
    other = tmp_path / f".other.npz.{int(dead.stdout)}.x.tmp"  # another file's temp: not this write's business
    for p in (killed, live, old, other):
        p.write_bytes(b"half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    write_atomic(target, lambda f: f.write(b"whole"))
    assert target.read_bytes() == b"whole"
    assert not killed.exists() and not old.exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


_SYNC_CHILD = """
import sys
from medsearch.catalog import Catalog
from medsearch.config import IndexConfig, Paths
from medsearch.stores.milvus_sync import sync_store
cat = Catalog.open(sys.argv[1] + "/catalog.db")
from pathlib import Path
sync_store(cat, Paths(Path(sys.argv[1])).index_dir("m"), model_id="m", weights_hash="w", space="image", dim=32,
           config=IndexConfig(kind="flat"))
cat.close()
"""


@pytest.mark.slow
def test_check_in_a_fresh_process_reads_a_milvus_lite_home(tmp_path):
    """Found by the harness (the milvus writer's reference run): `medsearch check` started after
    `index --store milvus` had exited found every collection 'released' (Milvus Lite loads none when
    it starts) and called a consistent home broken."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("pymilvus")
    from synthetic_catalog import make_catalog

    cat, ids, _ = make_catalog(tmp_path / "catalog.db", 300)
    cat.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _SYNC_CHILD, str(tmp_path)], check=True, env=env, timeout=300)
    r = subprocess.run([sys.executable, "-m", "cli.main", "check", "--home", str(tmp_path), "--json"], cwd=str(REPO),
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], report["problems"]
    (entry,) = [e for e in report["indexes"] if e["space"] == "image"]
    assert entry["count"] == entry["stored_vectors"] == len(ids) and entry["store"] == "milvus"


@pytest.mark.slow
def test_a_collection_folder_left_by_a_kill_inside_create_does_not_block_the_next_index(tmp_path):
    """Found by the harness (`index --store milvus` killed inside Milvus Lite's create_collection): the
    collection's folder existed but was never registered, and every later sync failed with
    `[Errno 17] File exists` - the home could not be indexed again."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("pymilvus")
    from medsearch.stores.milvus import lite_major

    if 0 < lite_major() < 3:
        pytest.skip("Milvus Lite 2.x keeps its store in one SQLite file: there is no collection folder to orphan")
    from synthetic_catalog import make_catalog

    cat, ids, _ = make_catalog(tmp_path / "catalog.db", 300)
    cat.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _SYNC_CHILD, str(tmp_path)], check=True, env=env, timeout=300)
    manifest = Paths(tmp_path).index_dir("m") / "image.json"
    coll = json.loads(manifest.read_text())["params"]["collection"]
    shutil.rmtree(tmp_path / "milvus.db")  # the state the kill left: a Lite store whose registry lacks
    (tmp_path / "milvus.db" / "collections" / coll).mkdir(parents=True)  # the collection its folder holds
    manifest.unlink()
    r = subprocess.run([sys.executable, "-c", _SYNC_CHILD, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "cli.main", "check", "--home", str(tmp_path), "--json"], cwd=str(REPO),
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], report["problems"]
    assert [e["count"] for e in report["indexes"] if e["space"] == "image"] == [len(ids)]
