"""Milvus store on a real Milvus Lite (a file in a temp home): equal to FAISS flat with an exact
index, filters inside the engine, recall of the ANN types, sync after damage or a kill, check."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic_catalog import clustered, make_catalog

from medsearch.config import IndexConfig, Paths
from medsearch.stores import open_store
from medsearch.stores.faiss import VectorIndex
from medsearch.stores.milvus import (
    KINDS,
    LITE2_KINDS,
    MilvusStore,
    choose_kind,
    close_clients,
    connect,
    engine_kinds,
    engine_tunes,
    filter_expression,
    lite_major,
    resolve_uri,
)
from medsearch.stores.milvus_sync import check_store, sync_store

pytest.importorskip("pymilvus")
pytestmark = pytest.mark.slow  # each test starts Milvus Lite (about a second) and builds collections

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _stop_milvus_lite():
    """Each test's Milvus Lite server stops after it, not with the session (CI has 2 cores)."""
    yield
    close_clients()


def _lite_servers() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.name() == "milvus"]


def _sync(cat, home, space="image", dim=32, **kw):
    return sync_store(cat, Paths(home).index_dir("m"), model_id="m", weights_hash="w", space=space, dim=dim, **kw)


def _faiss(cat, space="image", dim=32):
    n = cat.count_vectors("m", space)
    return VectorIndex.from_blocks(functools.partial(cat.iter_vectors, "m", space), model_id="m", weights_hash="w",
                                   space=space, dim=dim, count=n, config=IndexConfig(kind="flat"))  # fmt: skip


def _check(cat, home, space="image", repair=False):
    problems, repaired = [], []
    entry = {"model": "m", "space": space, "stored_vectors": cat.count_vectors("m", space)}
    check_store(cat, Paths(home).index_dir("m"), space, entry, problems, repaired, repair=repair)
    return problems, repaired, entry


FILTERS = [
    {},
    {"modality": "ct"},
    {"modality": ["CT", "mr"], "split": "dev"},
    {"body_region": "thorax", "plane": "axial", "source": "syn"},
    {"modality": "PET"},  # matches nothing
    {"modality": 'ct" or id > 0 or modality like "'},  # an injection attempt is just a value that matches nothing
]


def test_flat_collection_equals_faiss_flat_with_and_without_filters(tmp_path):
    cat, ids, x = make_catalog(tmp_path / "catalog.db", 400)
    out = _sync(cat, tmp_path, config=IndexConfig(kind="auto"))
    assert out["kind"] == "milvus flat" and out["count"] == len(ids)
    store = open_store(Paths(tmp_path).index_dir("m"), "image", model_id="m")
    assert isinstance(store, MilvusStore) and store.manifest.store == "milvus"
    flat = _faiss(cat)
    q = clustered(6, 32, sample=9)
    for f in FILTERS:
        allowed = cat.image_ids_where(f)
        D, I = store.search(q, 10, filters=f)
        Df, If = flat.search(q, 10, allowed=allowed) if allowed is None or len(allowed) else (None, np.full_like(I, -1))
        np.testing.assert_array_equal(I, If, err_msg=str(f))
        if Df is not None:
            np.testing.assert_allclose(D[I >= 0], Df[If >= 0], atol=1e-5)
        if allowed is not None:
            assert np.isin(I[I >= 0], allowed).all()
    assert filter_expression({"modality": "ct"}) == '(modality like "%|6374|%")'
    assert filter_expression({}, np.array([], np.int64)) is None  # an empty allow-list matches nothing
    cat.close()


def test_text_space_filters_follow_the_case_images(tmp_path):
    cat, _, _ = make_catalog(tmp_path / "catalog.db", 200, texts=True)
    _sync(cat, tmp_path, space="text", config=IndexConfig(kind="flat"))
    store = MilvusStore.load(Paths(tmp_path).index_dir("m"), "text")
    flat = _faiss(cat, "text")
    q = clustered(4, 32, seed=1, sample=5)
    for f in ({"modality": "us"}, {"split": "dev"}, {"body_region": ["head", "abdomen"]}):
        _, I = store.search(q, 10, filters=f)
        _, If = flat.search(q, 10, allowed=cat.text_ids_where(f))
        np.testing.assert_array_equal(I, If, err_msg=str(f))
    cat.close()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "flat" and k in engine_kinds(None)])  # what the Lite builds
def test_ann_kinds_reach_the_recall_target_and_record_it(tmp_path, kind):
    cat, ids, x = make_catalog(tmp_path / "catalog.db", 1500, d=32)  # 4,500 vectors
    out = _sync(cat, tmp_path, config=IndexConfig(kind=kind, target_recall=0.95))
    assert out["kind"] == f"milvus {kind}"
    store = MilvusStore.load(Paths(tmp_path).index_dir("m"), "image")
    p = store.manifest.params
    assert p["target_met"] and p["tuned_recall_at_10"] >= 0.95 and p["index_type"] == kind.upper()
    if not engine_tunes(None):  # Milvus Lite 2.x ignores a request's nprobe: measured once, no knob sent
        assert p["search_params"] == {} and p["search_knob"] == "engine"
    else:
        assert set(p["search_params"]) == {"ef" if kind == "hnsw" else "nprobe"}
    q = clustered(200, 32, sample=1)  # fresh points from the collection's distribution
    _, I = store.search(q, 10)
    _, If = _faiss(cat).search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, If, strict=True)])
    assert recall >= 0.95, recall
    for f in ({"modality": "ct", "split": "train"}, {"source": "other", "plane": "axial", "modality": "mr"}):
        allowed = cat.image_ids_where(f)  # 19% and 2% of the rows: the knob widens with the selectivity
        _, I = store.search(q[:50], 10, filters=f)
        assert np.isin(I[I >= 0], allowed).all()
        _, If = _faiss(cat).search(q[:50], 10, allowed=allowed)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, If, strict=True)])
        assert recall >= 0.95, (f, recall)
        if kind == "ivf_flat":  # few matches: every list is probed, the hits are FAISS flat's
            np.testing.assert_array_equal(I, If, err_msg=str(f))
    cat.close()


def test_auto_kind_follows_what_the_engine_builds(tmp_path):
    """Milvus Lite 2.x (C++) builds FLAT and IVF_FLAT only, 3.x and a server also HNSW and IVF_SQ8:
    auto picks what the engine has, a kind it lacks is a clear error before anything is written."""
    from medsearch.errors import InvalidInput

    cfg = IndexConfig(flat_max=1000)
    assert choose_kind(1000, cfg) == "flat" and choose_kind(1001, cfg) == "hnsw"
    assert choose_kind(1001, cfg, LITE2_KINDS) == "ivf_flat"
    assert choose_kind(10**7, cfg, LITE2_KINDS, tunes=False) == "flat"  # Lite 2.x: no ANN held to the target
    assert engine_tunes("http://milvus:19530") and engine_tunes(None) == (lite_major() >= 3)
    with pytest.raises(InvalidInput) as e:
        choose_kind(10, IndexConfig(kind="hnsw"), LITE2_KINDS)
    assert "ivf_flat" in e.value.hint and "server" in e.value.hint
    assert engine_kinds("http://milvus:19530") == tuple(KINDS)
    cat, _, _ = make_catalog(tmp_path / "catalog.db", 30)  # 90 vectors
    missing = [k for k in KINDS if k not in engine_kinds(None)]
    if missing:  # the installed Lite lacks some: sync refuses them and creates no collection
        with pytest.raises(InvalidInput):
            _sync(cat, tmp_path, config=IndexConfig(kind=missing[0]))
        assert not Paths(tmp_path).index_dir("m").joinpath("image.json").exists()
    out = _sync(cat, tmp_path, config=IndexConfig(flat_max=50))  # past flat_max
    assert out["kind"] == ("milvus hnsw" if engine_tunes(None) else "milvus flat")
    cat.close()


def test_sync_repairs_a_damaged_collection_and_check_sees_it(tmp_path):
    cat, ids, x = make_catalog(tmp_path / "catalog.db", 300)
    _sync(cat, tmp_path, config=IndexConfig(kind="flat"))
    assert _check(cat, tmp_path)[0] == []
    store = MilvusStore.load(Paths(tmp_path).index_dir("m"), "image")
    client, coll = store.client, store.collection
    client.delete(coll, ids=ids[:7].tolist())  # lost rows
    row = client.query(coll, filter=f"id in [{int(ids[10])}]", output_fields=["*"], consistency_level="Strong")[0]
    client.insert(coll, [row])  # a duplicate (an insert retried after a kill)
    cat.put_vectors("m", "image", [int(ids[20])], -x[20:21])  # a replaced vector in the catalog
    client.flush(coll)
    problems, _, entry = _check(cat, tmp_path)
    assert problems and entry["count"] != len(ids)
    problems, repaired, entry = _check(cat, tmp_path, repair=True)
    assert repaired and entry["count"] == len(ids)
    assert _check(cat, tmp_path)[0] == []
    store = MilvusStore.load(Paths(tmp_path).index_dir("m"), "image")
    q = np.concatenate([-x[20:21], clustered(3, 32, sample=3)])
    np.testing.assert_array_equal(store.search(q, 10)[1], _faiss(cat).search(q, 10)[1])
    cat.close()


def test_filter_values_cannot_break_out_of_the_expression(tmp_path):
    cat, _, _ = make_catalog(tmp_path / "catalog.db", 50)
    _sync(cat, tmp_path, config=IndexConfig(kind="flat"))
    store = MilvusStore.load(Paths(tmp_path).index_dir("m"), "image")
    for value in ['"', "\\", "%", "_", 'x") or (id >= 0', "ct|mr"]:
        _, I = store.search(clustered(1, 32, sample=1), 5, filters={"modality": value})
        assert (I == -1).all(), value
    cat.close()


_KILL_CHILD = """
import sys
from medsearch.catalog import Catalog
from medsearch.config import IndexConfig, Paths
from medsearch.stores.milvus_sync import sync_store
home = sys.argv[1]
cat = Catalog.open(home + "/catalog.db")
print("ready", flush=True)
sync_store(cat, Paths(home).index_dir("m"), model_id="m", weights_hash="w", space="image", dim=32,
           config=IndexConfig(kind=sys.argv[2]))
print("done", flush=True)
"""


def test_a_killed_index_is_finished_by_the_next_run(tmp_path):
    """SIGKILL a sync mid-way (its Milvus Lite server dies with it): the catalog is still the truth
    and the next sync brings the collection up to date."""
    cat, ids, x = make_catalog(tmp_path / "catalog.db", 3000)
    cat.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    kind = "hnsw" if "hnsw" in engine_kinds(None) else "ivf_flat"  # an ANN kind: the longest sync
    for delay in (1.0, 2.5):
        p = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path), kind], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    from medsearch.catalog import Catalog

    cat = Catalog.open(tmp_path / "catalog.db")
    out = _sync(cat, tmp_path, config=IndexConfig(kind=kind))
    assert out["count"] == len(ids)
    assert _check(cat, tmp_path)[0] == []
    cat.close()


def test_close_clients_stops_the_milvus_lite_server(tmp_path):
    before = {p.pid for p in _lite_servers()}
    client = connect(str(tmp_path / "milvus.db"), None)
    assert client.list_collections() == []
    started = [p for p in _lite_servers() if p.pid not in before]
    if lite_major() >= 3:  # Lite 3.x serves from threads of this process
        assert started == []
        return
    assert len(started) == 1
    close_clients()
    started[0].wait(timeout=10)  # raises if it is still running
    assert not (tmp_path / ".milvus.db.lock").exists()


def test_default_uri_is_a_file_in_the_home_and_a_bad_server_is_a_clear_error(tmp_path):
    from medsearch.errors import InvalidInput, StorageError

    assert resolve_uri(tmp_path, None) == str(tmp_path / "milvus.db")
    with pytest.raises(StorageError) as e:
        connect("http://127.0.0.1:9", None)
    assert "--milvus-uri" in e.value.hint or "Milvus" in e.value.message
    with pytest.raises(InvalidInput) as e:  # pymilvus starts Milvus Lite only for a *.db file
        connect(str(tmp_path / "vectors"), None)
    assert str(tmp_path / "vectors.db") in e.value.hint
    if 0 < lite_major() < 3:  # a home indexed with milvus-lite 3.x (its store is a folder): a clear way out
        (tmp_path / "old" / "milvus.db").mkdir(parents=True)
        with pytest.raises(StorageError) as e:
            connect(str(tmp_path / "old" / "milvus.db"), None)
        assert "3.x" in e.value.message and "index --store milvus" in e.value.hint


def test_cli_index_store_milvus_serves_the_same_hits_as_faiss(small_home, tmp_path):
    """`medsearch index --store milvus` on a real home (vectors already stored: nothing re-embedded),
    then `search`/`similar` use it from the manifest, with the same hits as the FAISS home."""
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from medsearch.catalog import Catalog
    from medsearch.search import Filters, Searcher

    home = tmp_path / "home"
    shutil.copytree(small_home, home)
    res = CliRunner().invoke(app, ["index", "--home", str(home), "--store", "milvus", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "milvus flat" in res.output
    assert not list(Paths(home).index_dir("towers").glob("*.faiss"))  # the store moved, nothing stale left
    assert (home / "milvus.db").exists()
    check = CliRunner().invoke(app, ["check", "--home", str(home)])
    assert check.exit_code == 0 and "consistent" in check.output, check.output
    a, b = Catalog.open(small_home / "catalog.db", readonly=True), Catalog.open(home / "catalog.db")
    fa, mi = Searcher(small_home, catalog=a), Searcher(home, catalog=b)
    assert isinstance(mi.index("image"), MilvusStore)
    image_id = next(iter(a.case_images([1]).values()))[0]
    for f in (Filters(), Filters(source="covid-chestxray")):
        ha, hb = fa.similar(image_id, k=5, filters=f), mi.similar(image_id, k=5, filters=f)
        assert [(h.case_key, h.image_id) for h in ha] == [(h.case_key, h.image_id) for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-4)
    ta, tb = fa.search_text("opacity in the lung", k=5, mode="text"), mi.search_text("opacity in the lung", k=5, mode="text")
    np.testing.assert_allclose([h.score for h in ta], [h.score for h in tb], atol=1e-4)  # ties may swap keys
    last = ta[-1].score - 1e-4  # (p017-s01..s04 share one report)
    assert {h.case_key for h in ta if h.score > last} == {h.case_key for h in tb if h.score > last}
    a.close()
    b.close()
