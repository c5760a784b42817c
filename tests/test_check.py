"""`medsearch check [--repair]` on real damage to a copy of a small indexed home.

Deleted vector rows, a truncated .faiss file, a stale manifest, orphan vectors, a vanished space,
temp files of a killed save. Each is reported; --repair fixes it from stored vectors (re-embedding
only what has no vector); until then the Searcher, the CLI and the API refuse to serve it and
name `medsearch check`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.consistency import check_home
from medsearch.errors import IndexInconsistent
from medsearch.search import Searcher
from medsearch.stores.faiss import VectorIndex, read_manifest

runner = CliRunner()
MODEL = "towers"


@pytest.fixture()
def home(small_home, tmp_path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(small_home, dst)
    return dst


def _check(home: Path, repair: bool = False) -> dict:
    cat = Catalog.open(home / "catalog.db", create=False)
    try:
        return check_home(cat, Paths(home), repair=repair)
    finally:
        cat.close()


def _sql(home: Path, sql: str, params=()) -> list:
    cat = Catalog.open(home / "catalog.db", create=False)
    try:
        with cat.atomic():
            return cat.db.execute(sql, list(params)).fetchall()
    finally:
        cat.close()


def _refused_everywhere(home: Path, towers, space: str = "image") -> None:
    """Searcher, CLI search and the API all refuse the damaged index and name `medsearch check`."""
    s = Searcher(home, encoder=towers)
    with pytest.raises(IndexInconsistent) as e:
        s.index(space)
    assert "medsearch check" in str(e.value)
    ref = str(_sql(home, "SELECT max(item_id) FROM vectors WHERE space = 'image'")[0][0])  # an image with a vector
    r = runner.invoke(app, ["similar", ref, "--home", str(home)] if space == "image" else
                      ["search", "lung", "--mode", "text", "--home", str(home)])  # fmt: skip
    assert r.exit_code == 2 and "medsearch check" in r.output, r.output


def _index_dir(home: Path) -> Path:
    return Paths(home).index_dir(MODEL)


def test_clean_home_is_consistent(home):
    rep = _check(home)
    assert rep["ok"] and rep["problems"] == [] and rep["stale_files"] == []
    by_space = {e["space"]: e for e in rep["indexes"]}
    assert set(by_space) == {"image", "text"}
    for e in by_space.values():
        assert e["count"] == e["stored_vectors"] > 0 and e["not_embedded"] == 0
    r = runner.invoke(app, ["check", "--home", str(home)])
    assert r.exit_code == 0 and "consistent" in r.output


def test_deleted_vector_rows_are_found_refused_and_repaired(home, towers):
    _sql(home, "DELETE FROM vectors WHERE space = 'image' AND item_id IN "
               "(SELECT item_id FROM vectors WHERE space = 'image' ORDER BY item_id LIMIT 2)")  # fmt: skip
    rep = _check(home)
    assert not rep["ok"]
    assert any("holds" in p and "the catalog stores" in p for p in rep["problems"]), rep
    _refused_everywhere(home, towers, "image")
    r = runner.invoke(app, ["check", "--home", str(home)])
    assert r.exit_code == 1 and "medsearch check --repair" in r.output
    # library repair: rebuilt from the stored vectors; the 2 rows without a vector are reported, not invented
    rep = _check(home, repair=True)
    assert rep["ok"] and any("rebuilt the image index" in x for x in rep["repaired"])
    img = next(e for e in rep["indexes"] if e["space"] == "image")
    assert img["not_embedded"] == 2 and img["count"] == img["stored_vectors"]
    # CLI repair embeds exactly what has no vector, then everything agrees
    r = runner.invoke(app, ["check", "--home", str(home), "--repair", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert any("embedded 2 images" in x for x in out["repaired"]) and out["ok"]
    assert all(e["not_embedded"] == 0 for e in out["indexes"])


def test_truncated_faiss_file(home, towers):
    f = _index_dir(home) / "image.faiss"
    gen = read_manifest(_index_dir(home) / "image.json").generation
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rep = _check(home)
    assert not rep["ok"] and any("checksum" in p for p in rep["problems"])
    _refused_everywhere(home, towers, "image")
    rep = _check(home, repair=True)
    assert rep["ok"], rep
    idx = VectorIndex.load(_index_dir(home), "image", model_id=MODEL)
    assert idx.manifest.generation == gen + 1 and idx.ntotal == next(
        e["stored_vectors"] for e in rep["indexes"] if e["space"] == "image"
    )
    assert Searcher(home, encoder=towers).similar("1", k=3)


def test_stale_manifest(home, towers):
    d = _index_dir(home)
    old = (d / "text.json").read_text()
    _sql(
        home,
        "DELETE FROM vectors WHERE space = 'text' AND item_id = (SELECT max(item_id) FROM vectors WHERE space = 'text')",
    )
    assert _check(home, repair=True)["ok"]  # a new generation: one vector fewer
    (d / "text.json").write_text(old)  # the manifest of the previous generation comes back
    rep = _check(home)
    assert not rep["ok"] and any("checksum" in p for p in rep["problems"])
    _refused_everywhere(home, towers, "text")
    assert _check(home, repair=True)["ok"]
    assert VectorIndex.load(d, "text", model_id=MODEL).ntotal == json.loads(old)["count"] - 1


def test_manifest_of_another_model_and_unreadable_manifest(home):
    d = _index_dir(home)
    man = json.loads((d / "image.json").read_text())
    (d / "image.json").write_text(json.dumps({**man, "model_id": "lite"}))
    rep = _check(home)
    assert not rep["ok"] and any("built with model 'lite'" in p for p in rep["problems"])
    (d / "text.json").write_text("{not json")
    rep = _check(home)
    assert any("unreadable index manifest" in p for p in rep["problems"])
    assert _check(home, repair=True)["ok"]
    assert read_manifest(d / "image.json").model_id == MODEL


def test_orphan_vectors_resolve_to_no_row(home, towers):
    # an image row disappears (with its caption text and labels) but its vector and index entry stay
    img = _sql(home, "SELECT max(item_id) FROM vectors WHERE space = 'image'")[0][0]
    texts = [r[0] for r in _sql(home, "SELECT id FROM texts WHERE image_id = ?", [img])]
    _sql(home, f"DELETE FROM vectors WHERE space = 'text' AND item_id IN ({','.join('?' * len(texts))})", texts)
    _sql(home, "DELETE FROM texts WHERE image_id = ?", [img])
    _sql(home, "DELETE FROM labels WHERE image_id = ?", [img])
    _sql(home, "DELETE FROM images WHERE id = ?", [img])
    rep = _check(home)
    assert not rep["ok"]
    assert any("1 image vectors of towers point to rows that no longer exist" in p for p in rep["problems"]), rep
    rep = _check(home, repair=True)
    assert rep["ok"] and any("dropped 1 orphan image vectors" in x for x in rep["repaired"])
    idx = VectorIndex.load(_index_dir(home), "image", model_id=MODEL)
    import faiss

    assert img not in faiss.vector_to_array(idx.index.id_map).tolist()
    hits = Searcher(home, encoder=towers).similar("1", k=20, per_case=False)
    assert img not in [h.image_id for h in hits]


def test_index_whose_vectors_are_all_gone(home, towers):
    _sql(home, "DELETE FROM vectors WHERE space = 'text'")  # the text space has no stored vector at all
    rep = _check(home)
    assert not rep["ok"] and any("text index of towers holds" in p for p in rep["problems"]), rep
    _refused_everywhere(home, towers, "text")
    rep = _check(home, repair=True)
    assert rep["ok"] and any("removed the text index" in x for x in rep["repaired"])
    assert not (_index_dir(home) / "text.faiss").exists()
    r = runner.invoke(app, ["check", "--home", str(home), "--repair", "--device", "cpu", "--json"])
    out = json.loads(r.output)
    assert r.exit_code == 0 and out["ok"] and any("texts of towers that had no vector" in x for x in out["repaired"])
    assert VectorIndex.load(_index_dir(home), "text", model_id=MODEL).ntotal > 0


def test_temp_files_of_a_killed_save_are_cleaned(home):
    d = _index_dir(home)
    (d / ".image.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    (d / ".text.json.k1ll3d.tmp").write_text("{")
    rep = _check(home)
    assert rep["ok"] and sorted(rep["stale_files"]) == [
        f"{d.name}/.image.k1ll3d.tmp",
        f"{d.name}/.text.json.k1ll3d.tmp",
    ]
    rep = _check(home, repair=True)
    assert rep["stale_files"] == [] and not list(d.glob(".*.tmp"))
    (d / ".image.k1ll3d.tmp").write_bytes(b"\0")
    idx = VectorIndex.load(d, "image", model_id=MODEL)
    idx.save(d)  # the next save of that space removes what a killed save left
    assert not (d / ".image.k1ll3d.tmp").exists()


def test_api_refuses_an_inconsistent_index_and_names_check(home, towers, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import ApiSettings

    f = _index_dir(home) / "image.faiss"
    f.write_bytes(f.read_bytes()[:100])
    settings = ApiSettings(home=home, device="cpu", watch_seconds=0, rate_per_minute=0,
                           keys_file=tmp_path / "keys.json", audit_log=tmp_path / "audit.log")  # fmt: skip
    with TestClient(create_app(settings, encoder=towers)) as c:
        r = c.post("/v1/search/text", json={"query": "lung opacity", "k": 3})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "index_inconsistent" and "medsearch check" in err["hint"]
        assert str(home) not in r.text  # no server path leaks


def test_bm25_index_out_of_step_with_the_texts(home, towers):
    d = _index_dir(home)
    man = json.loads((d / "bm25.json").read_text())
    (d / "bm25.json").write_text(json.dumps({**man, "fingerprint": "0" * 16}))  # a stale BM25 generation
    rep = _check(home)
    assert not rep["ok"] and any("BM25 index of towers" in p for p in rep["problems"]), rep
    with pytest.raises(IndexInconsistent, match="BM25") as e:
        Searcher(home, encoder=towers).bm25()
    assert "medsearch check" in e.value.hint
    rep = _check(home, repair=True)
    assert rep["ok"] and any("rebuilt the BM25 index" in x for x in rep["repaired"])
    assert len(Searcher(home, encoder=towers).bm25()) > 0
