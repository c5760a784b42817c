"""Erasure (`medsearch remove`, `DELETE /v1/cases/{id}`) on real homes, FAISS and Milvus Lite:
nothing of the removed case is found or stored afterwards, the audit log keeps no key, and a
SIGKILL at any step is finished by the next run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.consistency import check_home
from medsearch.erasure import audit_log, digest_of
from medsearch.errors import NotFound
from medsearch.search import Searcher

MODEL = "towers"
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _copy(small_home, tmp_path, store: str) -> Path:
    home = tmp_path / "home"
    shutil.copytree(small_home, home)
    if store == "milvus":
        pytest.importorskip("pymilvus")
        from indexer.embed import build_indexes

        cat = Catalog.open(home / "catalog.db")
        dims = {s: int(next(iter(cat.iter_vectors(MODEL, s)))[1].shape[1]) for s in ("image", "text")}
        out = build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=cat.get_meta(f"weights:{MODEL}"), dims=dims,
                            store="milvus")  # fmt: skip
        assert out["image"]["kind"].startswith("milvus")
        cat.close()
    return home


def _victim(home: Path, source: str = "medpix-2.0") -> dict:
    """The first case of ``source`` with report sentences: its key, patient key, image ids and its
    longest sentence (a text no other case has, for medpix)."""
    cat = Catalog.open(home / "catalog.db")
    try:
        for cid in range(1, 1000):
            try:
                cv = cat.get_case(cid)
            except NotFound:
                continue
            sentences = cat.case_texts([cv.case_id]).get(cv.case_id, [])
            if cv.source == source and sentences and cv.images:
                text = max((s.text for s in sentences), key=len)
                row = cat.image_rows([cv.images[0]["image_id"]])[cv.images[0]["image_id"]]
                return {"key": cv.case_key, "case_id": cv.case_id, "patient": row.patient_key, "text": text,
                        "images": [im["image_id"] for im in cv.images]}  # fmt: skip
    finally:
        cat.close()
    raise AssertionError(f"no {source} case with a report in the small home")


def _assert_gone(home: Path, v: dict, extra: list[bytes] = ()) -> None:
    cat = Catalog.open(home / "catalog.db")
    try:
        with pytest.raises(NotFound):
            cat.get_case(v["key"])
        s = Searcher(home, catalog=cat)
        for mode in ("auto", "bm25", "text"):
            assert v["key"] not in {h.case_key for h in s.search_text(v["text"], k=50, mode=mode)}, mode
        other = s.search_text("chest radiograph", k=1)[0].image_id  # an image that stays
        assert v["key"] not in {h.case_key for h in s.similar(int(other), k=50)}
        report = check_home(cat, Paths(home))
        assert report["ok"], report["problems"]
        assert all(e.get("count") == e["stored_vectors"] for e in report["indexes"])
    finally:
        cat.close()
    needles = [v["key"].encode(), v["text"].encode(), *extra]
    for f in home.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for n in needles:
                assert n not in data, f"{f} still holds {n[:40]!r}"


@pytest.mark.slow
@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_remove_case_leaves_no_trace(small_home, tmp_path, store):
    home = _copy(small_home, tmp_path, store)
    v = _victim(home)
    dry = runner.invoke(app, ["remove", "--home", str(home), "--case", v["key"], "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert '"cases": 1' in dry.output and '"dry_run": true' in dry.output
    cat = Catalog.open(home / "catalog.db")
    assert cat.get_case(v["key"]).case_id == v["case_id"]  # a dry run changes nothing
    cat.close()
    res = runner.invoke(app, ["remove", "--home", str(home), "--case", v["key"]])
    assert res.exit_code == 0, res.output
    assert "erased 1 cases" in res.output
    _assert_gone(home, v)
    cat = Catalog.open(home / "catalog.db")
    log = audit_log(cat)
    assert log[0]["state"] == "done" and log[0]["kind"] == "case" and log[0]["digest"] == digest_of(cat, "case", v["key"])
    assert log[0]["counts"]["images"] == len(v["images"])
    cat.close()
    again = runner.invoke(app, ["remove", "--home", str(home), "--case", v["key"]])
    assert again.exit_code != 0 and "no case" in again.output  # nothing left to remove


@pytest.mark.slow
def test_remove_patient_and_source(small_home, tmp_path):
    home = _copy(small_home, tmp_path, "faiss")
    v = _victim(home, "covid-chestxray")
    assert v["patient"]
    cat = Catalog.open(home / "catalog.db")
    keys = [cat.get_case(i).case_key for i in range(1, 100) if _has(cat, i) and cat.get_case(i).source == "covid-chestxray"]
    same_patient = [k for k in keys if cat.image_rows([cat.get_case(k).images[0]["image_id"]]).popitem()[1].patient_key == v["patient"]]
    cat.close()
    res = runner.invoke(app, ["remove", "--home", str(home), "--patient", v["patient"], "--json"])
    assert res.exit_code == 0, res.output
    assert f'"cases": {len(same_patient)}' in res.output
    _assert_gone(home, {**v, "text": same_patient[-1]}, extra=[k.encode() for k in same_patient])
    res = runner.invoke(app, ["remove", "--home", str(home), "--source", "covid-chestxray", "--json"])
    assert res.exit_code == 0 and f'"cases": {len(keys) - len(same_patient)}' in res.output, res.output
    cat = Catalog.open(home / "catalog.db")
    assert all(h.source != "covid-chestxray" for h in Searcher(home, catalog=cat).search_text("chest x-ray", k=50))
    assert check_home(cat, Paths(home))["ok"]
    cat.close()
    bad = runner.invoke(app, ["remove", "--home", str(home), "--case", "x", "--source", "y"])
    assert bad.exit_code != 0 and "exactly one" in bad.output


def _has(cat, case_id: int) -> bool:
    try:
        cat.get_case(case_id)
        return True
    except NotFound:
        return False


_KILL = """
import os, signal, sys
import medsearch.erasure as er
import medsearch.catalog.erasure as db
step = sys.argv[2]
def killer(fn):
    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    return wrapped
if step == "begin":
    db.begin = killer(db.begin)
elif step == "rows":
    db.delete_rows = killer(db.delete_rows)
elif step == "stores":
    er._purge_stores = killer(er._purge_stores)
elif step == "files":
    er._purge_files = killer(er._purge_files)
elif step == "segment":  # a segmented index: one rewritten segment on disk, the manifest not yet swapped
    import medsearch.stores.segments as sg
    sg.write_segment = killer(sg.write_segment)
elif step == "manifest":  # the manifest swapped, the files it no longer names (with the removed rows) still there
    import medsearch.stores.segments as sg
    def die(*a, **kw):
        os.kill(os.getpid(), signal.SIGKILL)
    sg.collect = die
from cli.main import app
app(["remove", "--home", sys.argv[1], "--case", sys.argv[3]])
"""


@pytest.mark.slow
@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_sigkill_at_each_step_is_finished_by_the_next_run(small_home, tmp_path, store):
    home = _copy(small_home, tmp_path, store)
    v = _victim(home)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = ("begin", "rows", "stores", "files")
    for i, step in enumerate(steps):
        h = tmp_path / f"home-{step}"
        shutil.copytree(home, h)
        p = subprocess.run([sys.executable, "-c", _KILL, str(h), step, v["key"]], env=env, capture_output=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
        cat = Catalog.open(h / "catalog.db")
        unfinished = [e for e in audit_log(cat) if e["state"] != "done"]
        assert len(unfinished) == 1  # the kill left the erasure recorded, not done
        if i >= 1:  # rows went first: the case is already gone for every reader
            with pytest.raises(NotFound):
                cat.get_case(v["key"])
            assert not check_home(cat, Paths(h))["ok"]  # check sees the interrupted erasure
        cat.close()
        res = runner.invoke(app, ["remove", "--home", str(h), "--case", v["key"], "--json"])
        assert res.exit_code == 0, res.output
        assert '"resumed": 1' in res.output
        _assert_gone(h, v)
        if store == "milvus":
            from medsearch.stores.milvus import close_clients

            close_clients()  # one Milvus Lite per home copy: let the next one start clean


@pytest.mark.slow
def test_api_delete_is_admin_only_and_serves_the_new_generation(small_home, tmp_path, towers):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.keys import KeyStore
    from api.settings import ApiSettings

    home = _copy(small_home, tmp_path, "faiss")
    v = _victim(home)
    store = KeyStore(tmp_path / "keys.json")
    _, read_key = store.add("read", "reader")
    _, admin_key = store.add("admin", "ops")
    settings = ApiSettings(home=home, device="cpu", watch_seconds=0, rate_per_minute=0, keys_file=store.path,
                           audit_log=home / "audit.log", auth="required")  # fmt: skip
    with TestClient(create_app(settings, encoder=towers)) as c:
        assert c.get(f"/v1/cases/{v['key']}", headers={"X-API-Key": read_key}).status_code == 200
        before = c.get("/v1/health").json()
        assert c.delete(f"/v1/cases/{v['case_id']}", headers={"X-API-Key": read_key}).status_code == 403
        r = c.delete(f"/v1/cases/{v['case_id']}", headers={"X-API-Key": admin_key})
        assert r.status_code == 200, r.text
        assert r.json()["cases"] == 1 and v["key"] not in r.text
        assert c.get(f"/v1/cases/{v['case_id']}", headers={"X-API-Key": read_key}).status_code == 404
        after = c.get("/v1/health").json()
        assert after["indexes"]["image"]["count"] == before["indexes"]["image"]["count"] - len(v["images"])
        assert after["catalog"]["cases"] == before["catalog"]["cases"] - 1
        query = v["text"][: len(v["text"]) // 2]  # (the audit log records queries: not the whole removed sentence)
        r = c.post("/v1/search/text", json={"query": query, "k": 50}, headers={"X-API-Key": read_key})
        assert r.status_code == 200 and r.json()["hits"] and v["key"] not in r.text
    _assert_gone(home, v)  # the server's own audit log (in the home) included


# ---------------------------------------------------------------------------- segmented FAISS indexes
def _flat(x, ids):
    from medsearch.config import IndexConfig
    from medsearch.stores.faiss import VectorIndex

    return VectorIndex.from_blocks([(ids, x)], model_id="m", weights_hash="w", space="image", dim=x.shape[1],
                                   count=len(ids), config=IndexConfig(kind="flat"))  # fmt: skip


def test_segmented_flat_index_answers_as_a_rebuild_and_remove_rewrites_only_its_segments(tmp_path, monkeypatch):
    import numpy as np

    import medsearch.stores.segments as sg
    from medsearch.stores.faiss import VectorIndex, saved_files

    monkeypatch.setattr(sg, "SEGMENT_BYTES", 100 * 4 * 16)  # 100 rows of 16-d per segment
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1, 1001, dtype=np.int64) * 3  # catalog ids are not positions
    xq = rng.standard_normal((20, 16)).astype(np.float32)
    _flat(x, ids).save(tmp_path)
    segs = saved_files(tmp_path, "image")
    assert len(segs) == 10 and not (tmp_path / "image.faiss").exists()
    assert sorted(p.name for p in tmp_path.glob("image.*")) == sorted([p.name for p in segs] + ["image.json"])
    back = VectorIndex.load(tmp_path, "image")
    truth = ids[np.argsort(-(xq @ x.T), axis=1)[:, :10]]  # brute-force oracle
    assert (back.search(xq, 10)[1] == truth).all()

    gone = np.r_[ids[300:320], ids[777]]  # rows of segments 3 and 7
    assert VectorIndex.remove_saved(tmp_path, "image", gone) == 21
    after = saved_files(tmp_path, "image")
    assert len(set(segs) - set(after)) == 2 and len(set(after) - set(segs)) == 2  # two rewritten, eight untouched
    assert sorted(tmp_path.glob("image.seg-*")) == sorted(after)  # the replaced files are gone
    keep = ~np.isin(ids, gone)
    now = VectorIndex.load(tmp_path, "image")
    assert now.ntotal == 979 and now.manifest.generation == back.manifest.generation + 1
    D, I = now.search(xq, 10)
    D0, I0 = _flat(x[keep], ids[keep]).search(xq, 10)
    assert (I == I0).all() and np.allclose(D, D0)  # the same answers as an index rebuilt without them
    for f in tmp_path.iterdir():
        data = f.read_bytes()
        assert not any(x[np.searchsorted(ids, g)].tobytes() in data for g in gone), f
    assert VectorIndex.remove_saved(tmp_path, "image", gone) == 0 and saved_files(tmp_path, "image") == after

    # new vectors: a save after a sync keeps every segment still on disk and writes only the new rows
    new = rng.standard_normal((150, 16)).astype(np.float32)
    assert now.sync([(ids[keep], x[keep]), (np.arange(5000, 5150, dtype=np.int64), new)]) == 150
    now.save(tmp_path)
    assert set(after) <= set(saved_files(tmp_path, "image")) and len(saved_files(tmp_path, "image")) == 12
    assert VectorIndex.load(tmp_path, "image").ntotal == 1129
    # an in-memory remove rewrites from the first segment that changed on
    now.remove(np.array([ids[950]]))
    now.save(tmp_path)
    assert len(set(after) & set(saved_files(tmp_path, "image"))) == 9
    # a remove that replaces segments while a server reads them: the reader retries on the new generation
    real, calls = sg.read_segment, []

    def racing(*a, **kw):
        if not calls:
            calls.append(None)
            monkeypatch.setattr(sg, "read_segment", real)  # the remove itself reads as usual
            calls[0] = VectorIndex.remove_saved(tmp_path, "image", ids[:5])  # rewrites and collects segment 0
        return real(*a, **kw)

    monkeypatch.setattr(sg, "read_segment", racing)
    raced = VectorIndex.load(tmp_path, "image")
    assert calls == [5] and raced.ntotal == 1128 - 5 and not np.isin(ids[:5], raced.item_ids()).any()
    monkeypatch.setattr(sg, "read_segment", real)
    # a damaged segment is refused; one that vanished under a reader is refused with the repair hint
    victim = saved_files(tmp_path, "image")[0]
    victim.write_bytes(victim.read_bytes()[:-8] + bytes(8))
    with pytest.raises(Exception, match="checksum"):
        VectorIndex.load(tmp_path, "image")
    victim.unlink()
    with pytest.raises(Exception, match="missing"):
        VectorIndex.load(tmp_path, "image")
    # back under one segment: one file again, no segment left
    _flat(x[:50], ids[:50]).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["image.faiss", "image.json"]


def _segmented(small_home, tmp_path, monkeypatch) -> Path:
    """A copy of the small home whose FAISS indexes are saved as segments of 3 image rows."""
    import medsearch.stores.segments as sg
    from indexer.embed import build_indexes
    from medsearch.stores.faiss import saved_files

    home = _copy(small_home, tmp_path, "faiss")
    cat = Catalog.open(home / "catalog.db")
    dims = {s: int(next(iter(cat.iter_vectors(MODEL, s)))[1].shape[1]) for s in ("image", "text")}
    monkeypatch.setattr(sg, "SEGMENT_BYTES", 3 * 4 * dims["image"])
    build_indexes(cat, Paths(home), model_id=MODEL, weights_hash=cat.get_meta(f"weights:{MODEL}"), dims=dims,
                  config=__import__("medsearch.config", fromlist=["IndexConfig"]).IndexConfig(kind="flat"), force=True)  # fmt: skip
    cat.close()
    d = Paths(home).index_dir(MODEL)
    assert len(saved_files(d, "image")) > 2 and not (d / "image.faiss").exists()
    return home


def _vector_needles(home: Path, image_ids: list[int]) -> list[bytes]:
    """The removed images' vectors as the index files hold them (float32) and the catalog (float16)."""
    import numpy as np

    from medsearch.stores.faiss import VectorIndex

    idx = VectorIndex.load(Paths(home).index_dir(MODEL), "image")
    vecs = [idx.reconstruct(i) for i in image_ids]
    return [v.astype(np.float32).tobytes() for v in vecs] + [v.astype(np.float16).tobytes() for v in vecs]


@pytest.mark.slow
def test_remove_on_a_segmented_index_rewrites_only_its_segments_and_leaves_no_vector(small_home, tmp_path, monkeypatch):
    from medsearch.stores.faiss import saved_files

    home = _segmented(small_home, tmp_path, monkeypatch)
    v = _victim(home)
    d = Paths(home).index_dir(MODEL)
    before = set(saved_files(d, "image"))
    needles = _vector_needles(home, v["images"])
    res = runner.invoke(app, ["remove", "--home", str(home), "--case", v["key"]])
    assert res.exit_code == 0, res.output
    after = set(saved_files(d, "image"))
    assert before & after and len(before - after) <= len(v["images"])  # untouched segments kept their files
    assert sorted(d.glob("image.seg-*")) == sorted(after)
    _assert_gone(home, v, extra=needles)
    cat = Catalog.open(home / "catalog.db")
    assert not cat.is_dirty(MODEL, "image")  # in sync again without a rebuild
    cat.close()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["segment", "manifest", "damaged"])
def test_a_kill_inside_a_segmented_remove_is_finished_by_the_next_run(small_home, tmp_path, monkeypatch, step):
    from medsearch.stores.faiss import VectorIndex, saved_files

    home = _segmented(small_home, tmp_path, monkeypatch)
    v = _victim(home)
    d = Paths(home).index_dir(MODEL)
    needles = _vector_needles(home, v["images"])
    if step == "damaged":  # a segment holding the case is damaged: the purge rebuilds from stored vectors
        held = [f for f in saved_files(d, "image") if any(n in f.read_bytes() for n in needles)]
        held[0].write_bytes(held[0].read_bytes()[:-4] + bytes(4))
        res = runner.invoke(app, ["remove", "--home", str(home), "--case", v["key"]])
        assert res.exit_code == 0, res.output
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.run([sys.executable, "-c", _KILL, str(home), step, v["key"]], env=env, capture_output=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
        cat = Catalog.open(home / "catalog.db")
        assert [e["state"] for e in audit_log(cat)][0] != "done"
        cat.close()
        left = set(d.glob("image.seg-*")) - set(saved_files(d, "image"))  # written or replaced, named by no manifest
        assert left and any(n in f.read_bytes() for f in left for n in needles) == (step == "manifest")
        # whatever generation the kill left is whole and loadable (the rows already went from the catalog)
        assert VectorIndex.load(d, "image").ntotal >= 1
        res = runner.invoke(app, ["remove", "--home", str(home), "--case", v["key"], "--json"])
        assert res.exit_code == 0, res.output
        assert '"resumed": 1' in res.output
    assert sorted(d.glob("image.seg-*")) == sorted(saved_files(d, "image"))  # no unnamed segment left
    _assert_gone(home, v, extra=needles)
