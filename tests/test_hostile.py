"""Hostile inputs (``tests/hostile.py``, generated at test time) and property tests for the readers.

Every hostile input gives a named skip with a clear reason, or is stored harmlessly; nothing
crashes the ingest or the index run; and nothing previously stored changes (a full dump of the
catalog's tables before and after, compared row by row).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import string
import subprocess
import sys
from pathlib import Path

import hostile
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.embed import run_index
from indexer.ingest import ingest_items, ingest_path
from indexer.sources.jsonl import read_jsonl_dataset
from medsearch.catalog import Catalog
from medsearch.config import EmbedConfig, Paths
from medsearch.consistency import check_home
from medsearch.records import CaseRecord, ImageRecord, Skipped

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TABLES = ("meta", "cases", "images", "texts", "labels", "vectors")


def dump(db: Path) -> dict[str, dict]:
    """Every row of every table but the ingest log, keyed by its primary key (vectors by digest)."""
    con = sqlite3.connect(str(db))
    try:
        out: dict[str, dict] = {}
        for t in TABLES:
            if t == "vectors":
                rows = con.execute("SELECT model, space, item_id, dim, vec FROM vectors").fetchall()
                out[t] = {r[:3]: (r[3], hashlib.sha256(r[4]).hexdigest()) for r in rows}
            elif t == "meta":
                out[t] = dict(con.execute("SELECT key, value FROM meta").fetchall())
            elif t == "labels":
                out[t] = {r: None for r in con.execute("SELECT case_id, image_id, name, value FROM labels").fetchall()}
            else:
                cols = [d[0] for d in con.execute(f"SELECT * FROM {t} LIMIT 0").description]
                drop = {"ingested_at"}
                out[t] = {r[0]: tuple(v for c, v in zip(cols, r, strict=True) if c not in drop)
                          for r in con.execute(f"SELECT * FROM {t}")}  # fmt: skip
        return out
    finally:
        con.close()


def unchanged(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """Rows of ``before`` that are gone or different in ``after`` (dirty flags of the index may move)."""
    out = []
    for t, rows in before.items():
        for k, v in rows.items():
            if t == "meta" and str(k).startswith("dirty:"):
                continue
            if after[t].get(k, "<gone>") != v:
                out.append(f"{t} {k!r}: {v!r} -> {after[t].get(k, '<gone>')!r}"[:300])
    return out


@pytest.fixture()
def home(small_home, tmp_path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(small_home, dst)
    return dst


CORPORA = {
    "image_folder": lambda root, covid: hostile.image_folder(root, covid),
    "jsonl_dataset": lambda root, covid: hostile.jsonl_dataset(root, covid),
    "dicom_tree": lambda root, covid: hostile.dicom_tree(root),
}


@pytest.mark.parametrize("corpus", list(CORPORA))
def test_hostile_corpus_named_skips_and_nothing_stored_changes(corpus, home, covid_dir, towers, tmp_path):
    root = tmp_path / corpus
    entries = CORPORA[corpus](root, covid_dir)
    db = home / "catalog.db"
    before = dump(db)
    cat = Catalog.open(db)
    try:
        summary = ingest_path(cat, root)  # must not raise
        skipped = [(s.item, s.reason) for s in summary.skipped]
        stored = [
            r[0] + "\n" + r[1] for r in cat.db.execute("SELECT key, path FROM images WHERE source = ?", [root.name])
        ]
        for e in entries:
            hits = [(i, r) for i, r in skipped if re.search(re.escape(e.item) + r"(?!\d)", i)]  # line 1 is not line 10
            if e.expect == "skip":
                assert hits, f"{e.name}: not skipped by name ({e.item!r}); skipped: {skipped}"
                assert any(hostile.reason_ok(e, r) for _, r in hits), f"{e.name}: reason {hits} !~ {e.reason!r}"
            else:
                assert not hits, f"{e.name}: expected to be stored, was skipped: {hits}"
                if corpus != "jsonl_dataset":
                    assert any(e.item in s for s in stored), f"{e.name}: not stored ({stored})"
        assert len(summary.skipped) >= sum(e.expect == "skip" for e in entries)
        log = cat.db.execute("SELECT status, skipped FROM ingest_log ORDER BY id DESC LIMIT 1").fetchone()
        assert log == ("ok", len(summary.skipped))
        after_ingest = dump(db)
        assert unchanged(before, after_ingest) == []
        # the DICOM private tag and the file names' odd bytes never reach the catalog
        text = repr(after_ingest)
        assert "PHI-IN-A-PRIVATE-TAG" not in text and "HOSTILE TEST" not in text
        # what was stored embeds without a crash, and nothing stored before changes
        s = run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=8, workers=0), progress=False)
        assert s.images_failed == [], s.images_failed
        assert unchanged(before, dump(db)) == []
        assert check_home(cat, Paths(home))["ok"]
    finally:
        cat.close()


def test_cli_ingest_of_the_hostile_folder_exits_cleanly(tmp_path, covid_dir):
    """A real `medsearch ingest` subprocess prints odd names (newline, non-UTF-8 bytes) without crashing."""
    root = tmp_path / "hostile"
    entries = hostile.image_folder(root, covid_dir)
    exe = str(Path(sys.executable).parent / "medsearch")
    for extra in ([], ["--json"]):
        r = subprocess.run([exe, "ingest", str(root), "--home", str(tmp_path / "h"), "-q", *extra],
                           capture_output=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    rep = json.loads(r.stdout)
    assert rep["skipped"] >= sum(e.expect == "skip" for e in entries)
    assert any("latin1-\\udce9\\udcff.png" in s["item"] for s in rep["skipped_items"])


def test_unreadable_csv_sidecar_is_a_named_error_and_stores_nothing(tmp_path, covid_dir):
    from medsearch.errors import InvalidInput

    d = tmp_path / "folder"
    d.mkdir()
    shutil.copy(next((covid_dir / "images").iterdir()), d / "a.png")
    (d / "reports.csv").write_bytes(b'file,findings\na.png,"' + b"x" * 200_000 + b'"\n')  # over csv's field limit
    cat = Catalog.open(tmp_path / "catalog.db")
    with pytest.raises(InvalidInput, match="reports.csv") as e:
        ingest_path(cat, d)
    assert e.value.hint and cat.counts()["images"] == 0
    (d / "reports.csv").write_bytes(b"file,findings\na.png,caf\xe9\n")
    with pytest.raises(InvalidInput, match="UTF-8"):
        ingest_path(cat, d)
    assert cat.counts()["images"] == 0


# ---------------------------------------------------------------------------- property tests
_KEYS = ["id", "split", "title", "findings", "impression", "history", "diagnosis", "labels", "images",
         "image_id", "case_id", "file", "frame", "caption", "modality_type", "age", "topic", "patient_id"]  # fmt: skip
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=()), max_size=30),  # lone surrogates too
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(_KEYS), json_values, max_size=8)
# JSONL lines: JSON objects (ASCII-escaped, so lone surrogates arrive as \ud800 escapes), other JSON, raw bytes
lines = st.one_of(
    records.map(lambda r: json.dumps(r, ensure_ascii=True).encode()),
    records.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b and b"\r" not in b),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reports=st.lists(lines, max_size=6), images=st.lists(lines, max_size=6))
def test_jsonl_reader_and_ingest_never_crash(tmp_path_factory, reports, images):
    root = tmp_path_factory.mktemp("prop")
    (root / "images").mkdir()
    (root / "reports.jsonl").write_bytes(b"\n".join(reports) + b"\n")
    (root / "images.jsonl").write_bytes(b"\n".join(images) + b"\n")
    items = list(read_jsonl_dataset(root))  # must not raise
    named = [i.item for i in items if isinstance(i, Skipped)]
    assert len(named) == len(set(named))  # one reason per line at most
    cases = [i for i in items if isinstance(i, CaseRecord)]
    seen = set()
    for it in items:  # a case always comes before its images
        if isinstance(it, CaseRecord):
            seen.add(it.key)
        elif isinstance(it, ImageRecord):
            assert it.case_key in seen
    cat = Catalog.open(None)
    s = ingest_items(cat, items, path=str(root), layout="jsonl")  # must not raise
    stored = {r[0] for r in cat.db.execute("SELECT key FROM cases")}
    assert stored == {c.key for c in cases if _is_text(c)}  # every case once; only unstorable text is skipped
    assert s.images_added == 0  # no image file exists: every image row is a named skip
    assert cat.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _is_text(c: CaseRecord) -> bool:
    try:
        json.dumps(c.__dict__, ensure_ascii=False, default=str).encode()
        return True
    except UnicodeEncodeError:
        return False


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=50, deadline=None)
@given(
    key=text.filter(bool),
    fields=st.fixed_dictionaries(
        {
            "caption": st.none() | text,
            "modality_type": st.none() | text,
            "body_region": st.none() | text,
            "plane": st.none() | text,
            "split": st.none() | text,
            "frame": st.none() | st.integers(0, 2**31 - 1),
        }
    ),  # fmt: skip
    labels=st.dictionaries(
        st.text(string.ascii_letters, min_size=1, max_size=8), text | st.lists(text, max_size=3), max_size=4
    ),
    meta=st.dictionaries(
        st.text(max_size=8), st.none() | st.integers() | text | st.floats(allow_nan=False), max_size=4
    ),
)
def test_image_catalog_roundtrip_property(key, fields, labels, meta):
    cat = Catalog.open(None)
    cid, _ = cat.upsert_case(CaseRecord(source="s", key="c"))
    rec = ImageRecord(source="s", key=key, case_key="c", path="/data/x.png", labels=labels, meta=meta, **fields)
    iid, status = cat.upsert_image(rec, cid, sha256="h", nbytes=1, width=2, height=3)
    assert status == "added"
    row = cat.image_rows([iid])[iid]
    assert row.image_key == key and row.frame == fields["frame"]
    for f in ("caption", "modality_type", "body_region", "plane", "split"):
        assert getattr(row, f) == fields[f]
    got = json.loads(cat.db.execute("SELECT labels, meta FROM images WHERE id = ?", [iid]).fetchone()[0])
    assert got == labels
    stored_labels = sorted(cat.db.execute("SELECT name, value FROM labels WHERE image_id = ?", [iid]).fetchall())
    want = sorted((n, str(v)) for n, vs in labels.items() for v in (vs if isinstance(vs, list) else [vs]) if v != "")
    assert stored_labels == want
    captions = cat.db.execute("SELECT text FROM texts WHERE image_id = ? AND kind = 'caption'", [iid]).fetchall()
    assert captions == ([(fields["caption"].strip(),)] if fields["caption"] and fields["caption"].strip() else [])
    assert cat.upsert_image(rec, cid, sha256="h", nbytes=1, width=2, height=3) == (iid, "unchanged")
