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
