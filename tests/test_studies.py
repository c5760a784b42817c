"""DICOM studies and series: position order, slice selection, whole-study queries, presets, bad input, no PHI."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from dicom_studies import PLANTED, PLANTED_NESTED, PLANTED_PRIVATE, ct_series, medpix_pngs, pydicom_series

from indexer.ingest import ingest_path
from indexer.sources.common import Note, StudyDone
from indexer.sources.series import iter_dicom
from medsearch.catalog import SCHEMA_VERSION, Catalog
from medsearch.deid import pseudonym
from medsearch.errors import InvalidInput
from medsearch.records import CaseRecord, ImageRecord, Skipped
from medsearch.studies import SeriesRecord, order_slices, spread, study_scores

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SALT = "study-salt"


def items(root: Path, **kw):
    return list(iter_dicom(root, source="pacs", salt=SALT, **kw))


def series_of(its) -> list[SeriesRecord]:
    return [i for i in its if isinstance(i, SeriesRecord)]


def key(sop: str) -> str:
    return pseudonym(sop, SALT, "SOPInstanceUID")


@pytest.fixture(scope="module")
def pngs() -> list[Path]:
    return medpix_pngs("CT", n=4)


# ---------------------------------------------------------------------------- pure rules
def test_spread_covers_the_extent_and_never_repeats():
    assert spread(300, 8)[0] == 0 and spread(300, 8)[-1] == 299 and len(set(spread(300, 8))) == 8
    assert spread(5, 8) == [0, 1, 2, 3, 4] and spread(5, None) == [0, 1, 2, 3, 4]
    assert spread(9, 1) == [4]
    pos = [0, 1, 2, 3, 50, 51, 52, 100]  # uneven spacing: nearest to 0, 50, 100
    assert spread(8, 3, pos) == [0, 4, 7]


def test_order_by_position_along_the_normal():
    iop = [1, 0, 0, 0, 1, 0]  # axial: normal +z
    so = order_slices([iop] * 3, [[0, 0, 5], [0, 0, -5], [0, 0, 0]], [1, 2, 3])
    assert so.order == [1, 2, 0] and so.ordered_by == "position" and so.positions == [-5, 0, 5]
    cor = [1, 0, 0, 0, 0, -1]  # coronal: normal (1,0,0) x (0,0,-1) = +y
    so = order_slices([cor] * 2, [[5, 20, 0], [-5, 10, 3]], [1, 2])  # only y counts
    assert so.order == [1, 0] and so.positions == [10, 20]
    so = order_slices([iop, iop], [[0, 0, 1], None], [2, 1])
    assert so.ordered_by == "instance_number" and so.order == [1, 0] and "ImagePositionPatient" in so.note
    so = order_slices([iop, iop], [[0, 0, 1], [0, 0, 1]], [2, 1])
    assert so.ordered_by == "instance_number" and "share a position" in so.note


def test_study_score_is_mean_over_query_slices_of_the_best_prior_slice():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    v = rng.normal(size=(20, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    owners = rng.integers(1, 6, size=20)
    studies, scores, best = study_scores(q, v, owners)
    for s, sc, b in zip(studies, scores, best, strict=True):  # brute-force oracle
        cols = v[owners == s]
        assert sc == pytest.approx(float((q @ cols.T).max(axis=1).mean()), abs=1e-6)
        assert owners[b] == s and (q @ v[b]).max() == pytest.approx((q @ cols.T).max(), abs=1e-6)
    assert list(scores) == sorted(scores, reverse=True) and sorted(studies) == sorted(set(owners))


# ---------------------------------------------------------------------------- reader
def test_ct_series_is_ordered_by_position_not_file_name_or_instance_number(tmp_path, pngs):
    made = ct_series(tmp_path / "st", pngs[0], n_slices=12)
    its = items(tmp_path / "st", slices=4)
    assert [type(i) for i in its[:2]] == [CaseRecord, SeriesRecord] and isinstance(its[-1], StudyDone)
    [s] = series_of(its)
    assert s.ordered_by == "position" and s.slice_count == 12 and s.plane == "Axial" and s.order_note is None
    assert [r.key for r in s.slices] == [key(u) for u in made["sop_uids"]]  # true order
    names = sorted(made["files"])  # neither the name order nor the InstanceNumber order is the slice order
    assert [key(u) for u in made["sop_uids"]] != [key(made["sop_uids"][made["files"].index(f)]) for f in names]
    assert made["numbers"] != sorted(made["numbers"])
    assert [r.index for r in s.slices if r.embed] == [0, 4, 7, 11]  # 4 spread over the extent
    assert s.thickness == 2.5 and s.spacing == 2.5 and s.position_range == (-100.0, -72.5)
    assert s.window == (40.0, 400.0) and s.preset is None
    imgs = [i for i in its if isinstance(i, ImageRecord)]
    assert [i.key for i in imgs] == [r.key for r in s.slices]  # images follow slice order


@pytest.mark.parametrize("geometry, why", [("missing", "without ImagePositionPatient"), ("tilted", "ImageOrientationPatient")])
def test_bad_geometry_falls_back_to_instance_number_and_says_so(tmp_path, pngs, geometry, why):
    made = ct_series(tmp_path / "bad", pngs[1], n_slices=6, geometry=geometry, series_number=7)
    its = items(tmp_path / "bad")
    [s] = series_of(its)
    assert s.ordered_by == "instance_number" and why in s.order_note and s.position_range is None
    by_number = [u for _, u in sorted(zip(made["numbers"], made["sop_uids"], strict=True))]
    assert [r.key for r in s.slices] == [key(u) for u in by_number]
    [note] = [i for i in its if isinstance(i, Note)]
    assert "series 7" in note.item and str(tmp_path / "bad") in note.item and "InstanceNumber" in note.message


def test_pydicom_series_radial_mr_falls_back_and_ct_sorts_by_position(tmp_path):
    pydicom_series(tmp_path / "mr700", "98892003/MR700")  # radial: every slice has another orientation
    pydicom_series(tmp_path / "ct5n", "98892001/CT5N")  # z descending while InstanceNumber ascends
    ser = {s.modality: s for s in series_of(items(tmp_path))}
    assert ser["MR"].ordered_by == "instance_number" and "inconsistent geometry" in ser["MR"].order_note
    assert ser["CT"].ordered_by == "position" and ser["CT"].slice_count == 5
    assert ser["CT"].position_range == pytest.approx((-1.2, 8.8), abs=0.1)


def test_duplicates_and_mixed_studies_are_reported_by_name(tmp_path, pngs):
    a = ct_series(tmp_path / "mixed", pngs[0], n_slices=3, seed=1)
    ct_series(tmp_path / "mixed", pngs[1], n_slices=3, seed=2)  # another study in the same folder
    dup = tmp_path / "mixed" / "zz_copy.dcm"
    shutil.copyfile(a["files"][0], dup)
    its = items(tmp_path / "mixed")
    assert len([i for i in its if isinstance(i, CaseRecord)]) == 2
    [skip] = [i for i in its if isinstance(i, Skipped)]
    assert skip.item == str(dup) and str(a["files"][0]) in skip.reason and "copy" in skip.reason
    [note] = [i for i in its if isinstance(i, Note)]
    assert note.item == str(tmp_path / "mixed") and "2 studies" in note.message
    with pytest.raises(InvalidInput, match="slice count"):
        items(tmp_path / "mixed", slices=0)


# ---------------------------------------------------------------------------- catalog
def _dump(db: Path) -> str:
    con = sqlite3.connect(db)
    out = []
    for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in con.execute(f"SELECT * FROM {t}"):
            out.append(" ".join(str(v) for v in row if not isinstance(v, bytes)))
    con.close()
    return "\n".join(out)


def _statuses(cat: Catalog) -> dict[str, int]:
    return dict(cat.db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())


def test_ingest_stores_studies_series_and_defers_unselected_slices(tmp_path, pngs):
    ct = ct_series(tmp_path / "tree" / "ct", pngs[0], n_slices=12)
    mr = pydicom_series(tmp_path / "tree" / "mr", "98892001/CT5N")  # a second, real study
    db = tmp_path / "home" / "catalog.db"
    cat = Catalog.open(db)
    s = ingest_path(cat, tmp_path / "tree", slices=4)
    assert (s.cases_added, s.series_added, s.images_added) == (2, 2, 17)
    assert (s.slices_selected, s.slices_deferred) == (8, 9) and not s.skipped
    assert _statuses(cat) == {"ok": 8, "deferred": 9}
    assert len(cat.image_ids_to_embed("any-model")) == 8  # the embed stage sees only the selected slices
    case_id = cat.case_id_for_key(pseudonym(ct["study_uid"], cat.salt, "StudyInstanceUID"))
    [series] = cat.case_series(case_id)
    assert [sl["key"] for sl in series["slices"]] == [pseudonym(u, cat.salt, "SOPInstanceUID") for u in ct["sop_uids"]]
    assert [sl["status"] for sl in series["slices"]].count("ok") == 4 and series["ordered_by"] == "position"
    again = ingest_path(cat, tmp_path / "tree", slices=4)  # idempotent
    assert again.cases_added == again.images_added == again.series_added == again.series_updated == 0
    assert _statuses(cat) == {"ok": 8, "deferred": 9}
    more = ingest_path(cat, tmp_path / "tree", slices=None)  # --slices all adds the rest, stores no new rows
    assert more.images_added == 0 and more.slices_deferred == 0 and _statuses(cat) == {"ok": 17}
    fewer = ingest_path(cat, tmp_path / "tree", slices=2)  # selection only grows
    assert fewer.slices_deferred == 0 and _statuses(cat) == {"ok": 17}
    assert cat.study_counts() == {"series": 2, "slices": 17, "deferred_images": 0}
    cat.close()
    text = _dump(db)
    for value in [*PLANTED.values(), PLANTED_PRIVATE, PLANTED_NESTED, ct["study_uid"], ct["series_uid"],
                  *ct["sop_uids"], "Plantedname", "MRN7731234", "Jane"]:  # fmt: skip
        assert value not in text, f"{value!r} reached the catalog"
    assert not any(str(m) in text for m in [])  # paths are allowed; identifiers are not
    assert mr


def test_a_failed_ingest_changes_nothing_already_stored(tmp_path, pngs):
    ct_series(tmp_path / "tree", pngs[2], n_slices=10)
    cat = Catalog.open(tmp_path / "catalog.db")
    ingest_path(cat, tmp_path / "tree", slices=3)
    before = (_statuses(cat), cat.counts(), cat.study_counts(), _dump(tmp_path / "catalog.db").count("\n"))

    class Boom(Exception):
        pass

    seen = []

    def explode(item):  # fail inside the study, after its series row and some slices were written
        seen.append(item)
        if len(seen) == 6:
            raise Boom

    with pytest.raises(Boom):
        ingest_path(cat, tmp_path / "tree", slices=None, progress=explode)
    assert isinstance(seen[1], SeriesRecord)
    after = (_statuses(cat), cat.counts(), cat.study_counts(), _dump(tmp_path / "catalog.db").count("\n"))
    assert after[:3] == before[:3] and _statuses(cat) == {"ok": 3, "deferred": 7}
    assert cat.db.execute("SELECT status FROM ingest_log ORDER BY id DESC LIMIT 1").fetchone()[0] == "failed"
    cat.close()


V1_IMAGES = """CREATE TABLE images (id INTEGER PRIMARY KEY, case_id INTEGER NOT NULL REFERENCES cases(id),
source TEXT NOT NULL, key TEXT NOT NULL, path TEXT NOT NULL, frame INTEGER, sha256 TEXT NOT NULL, bytes INTEGER,
width INTEGER, height INTEGER, split TEXT, modality_type TEXT, modality TEXT, plane TEXT, body_region TEXT,
location TEXT, laterality TEXT, study_date TEXT, caption TEXT, labels TEXT NOT NULL DEFAULT '{}',
meta TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL DEFAULT 'ok', error TEXT, ingested_at TEXT NOT NULL,
UNIQUE (source, key));"""


def test_a_version_1_catalog_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
        "INSERT INTO meta VALUES ('schema_version', '1'), ('salt', 'abc');"
        "CREATE TABLE cases (id INTEGER PRIMARY KEY, source TEXT NOT NULL, key TEXT NOT NULL, split TEXT,"
        " patient_key TEXT, title TEXT, diagnosis TEXT, category TEXT, sections TEXT NOT NULL DEFAULT '{}',"
        " labels TEXT NOT NULL DEFAULT '{}', meta TEXT NOT NULL DEFAULT '{}', content_hash TEXT NOT NULL,"
        " ingested_at TEXT NOT NULL, UNIQUE (source, key));"
        + V1_IMAGES
        + "INSERT INTO cases (id, source, key, content_hash, ingested_at) VALUES (1, 's', 'c1', 'h', 't');"
        "INSERT INTO images (case_id, source, key, path, sha256, ingested_at) VALUES (1, 's', 'i1', '/x', 'h', 't');"
    )
    con.commit()
    con.close()
    cat = Catalog.open(db)
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION) == "2" and cat.salt == "abc"
    cols = {r[1] for r in cat.db.execute("PRAGMA table_info(images)")}
    assert {"series_id", "slice_index", "position"} <= cols
    assert cat.counts()["images"] == 1 and cat.study_counts()["series"] == 0
    cat.close()
    Catalog.open(db).close()  # a second open changes nothing


# ---------------------------------------------------------------------------- presets
def test_ct_without_window_gets_its_body_part_preset(tmp_path, pngs):
    import pydicom

    from medsearch.imaging import PRESETS, dicom_array, dicom_to_uint8, preset_for, window

    made = ct_series(tmp_path / "nowin", pngs[0], n_slices=2, window=None, body_part="HEAD")
    ds = pydicom.dcmread(made["files"][0])
    hu = dicom_array(ds)
    assert preset_for("HEAD") == "brain" and preset_for("Thorax") == "lung" and preset_for("FOOT") == "bone"
    assert preset_for("ABDOMEN") == "soft_tissue" and preset_for("TOASTER") is None
    np.testing.assert_array_equal(dicom_to_uint8(ds), window(hu, *PRESETS["brain"]))
    np.testing.assert_array_equal(dicom_to_uint8(ds, window="bone"), window(hu, *PRESETS["bone"]))
    with pytest.raises(InvalidInput, match="brain, lung, soft_tissue, bone"):
        dicom_to_uint8(ds, window="toaster")
    [s] = series_of(items(tmp_path / "nowin"))
    assert s.window is None and s.preset == "brain"


# ---------------------------------------------------------------------------- whole-study queries
REPORT = {"findings": "Spiculated pulmonary nodule in the right upper lobe. Reviewed by Dr. Drhouse on 03/04/2021.",
          "impression": "Suspicious nodule; Jane Plantedname to be called back."}


@pytest.fixture(scope="module")
def study_home(tmp_path_factory, towers, pngs):
    """Three CT studies from three medpix cases plus a real CT study, indexed at --slices 4.

    Study 2 has a report, joined from a RIS-style lookup by StudyInstanceUID (in memory)."""
    from dicom_studies import uid

    from indexer.embed import run_index
    from indexer.ingest import ingest_items
    from medsearch.config import EmbedConfig, Paths

    root = tmp_path_factory.mktemp("studies")
    made = [ct_series(root / "tree" / f"s{i}", png, n_slices=10, size=128, seed=i, study_uid=uid())
            for i, png in enumerate(pngs[:3])]  # fmt: skip
    pydicom_series(root / "tree" / "other", "98892001/CT5N")
    home = root / "home"
    cat = Catalog.open(home / "catalog.db")
    calls = []

    def ris(accession, study_uid):
        calls.append((accession, study_uid))
        return dict(REPORT) if study_uid == made[2]["study_uid"] else None

    its = iter_dicom(root / "tree", source="tree", salt=cat.salt, slices=4, reports=ris)
    summary = ingest_items(cat, its, path=str(root / "tree"), layout="folder")
    assert summary.slices_selected == 3 * 4 + 4 and (PLANTED["AccessionNumber"], made[2]["study_uid"]) in calls
    run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=8, workers=0), progress=False)
    cat.close()
    return root, home, made


def test_a_study_report_is_joined_scrubbed_and_searchable(study_home, towers):
    from medsearch.search import Filters, Searcher

    root, home, made = study_home
    s = Searcher(home, encoder=towers)
    want = s.catalog.case_id_for_key(pseudonym(made[2]["study_uid"], s.catalog.salt, "StudyInstanceUID"))
    cv = s.catalog.get_case(want)
    assert "right upper lobe" in cv.sections["findings"]
    assert "Plantedname" not in json.dumps(cv.sections) and "Drhouse" not in json.dumps(cv.sections)
    assert "03/04/2021" not in cv.sections["findings"]
    hits = s.search_text("spiculated nodule in the right upper lobe", k=3)
    assert hits[0].case_id == want and hits[0].image_id is not None  # a study hit shows one of its slices
    assert s.catalog.image_case_ids([hits[0].image_id])[hits[0].image_id] == want
    assert s.search_text("spiculated nodule right upper lobe", k=3, filters=Filters(modality="MR")) == []
    assert s.search_reports("spiculated nodule", k=1)[0].case_id == want


def test_a_study_query_finds_the_study_of_the_same_pixels_and_excludes_its_own(study_home, towers, pngs, tmp_path):
    from indexer.sources.query import query_study
    from medsearch.imaging import load_image
    from medsearch.search import Filters, Searcher

    root, home, made = study_home
    s = Searcher(home, encoder=towers)
    n_studies = s.catalog.counts()["cases"]
    # a new acquisition of case 1's pixels (another study uid, other shifts)
    ct_series(tmp_path / "q", pngs[1], n_slices=9, size=128, shift=3, seed=9)
    key, chosen, _ = query_study(tmp_path / "q", s.catalog.salt, slices=4)
    assert len(chosen) == 4 and s.catalog.case_id_for_key(key) is None
    hits = s.similar_study([load_image(p, frame=f) for p, f in chosen], k=10)
    own1 = s.catalog.case_id_for_key(pseudonym(made[1]["study_uid"], s.catalog.salt, "StudyInstanceUID"))
    assert hits[0].case_id == own1 and hits[0].matched == "study"
    assert len({h.case_id for h in hits}) == len(hits) == n_studies  # one hit per prior study
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # the query study's own folder: its study is left out
    key0, chosen0, _ = query_study(root / "tree" / "s0", s.catalog.salt, slices=4)
    own0 = s.catalog.case_id_for_key(key0)
    hits0 = s.similar_study([load_image(p, frame=f) for p, f in chosen0], own_study_key=key0)
    assert own0 is not None and own0 not in {h.case_id for h in hits0} and len(hits0) == n_studies - 1
    # files that are byte-identical to catalog slices count as the own study even without the key
    hits_files = s.similar_study([p for p, _ in chosen0])
    assert own0 not in {h.case_id for h in hits_files}
    # filters: only MR slices count -> no CT study is returned
    assert s.similar_study([p for p, _ in chosen0], filters=Filters(modality="MR")) == []
    # per-case single-image search groups by study and shows the best slice
    single = s.similar(chosen[0][0], k=10)
    assert len({h.case_id for h in single}) == len(single) and single[0].case_id == own1


def test_exhaustive_and_candidate_scoring_agree(study_home, towers):
    from medsearch import study_search
    from medsearch.imaging import load_image
    from medsearch.search import Searcher

    root, home, made = study_home
    s = Searcher(home, encoder=towers)
    files = made[1]["files"][3:6]
    q, own = study_search._query_vectors(s, [load_image(f) for f in files])
    idx = s.index("image")
    a = study_search._exhaustive(s.catalog, idx, q, None, set(), set())
    b = study_search._candidates(s, idx, q, 2, None, set(), set())  # k=2: a small first fetch
    assert a is not None
    for (ids_a, st_a, sc_a, best_a), (ids_b, st_b, sc_b, best_b) in [(a, b)]:
        n = min(len(st_a), len(st_b), 2)
        assert list(st_a[:n]) == list(st_b[:n]) and np.allclose(sc_a[:n], sc_b[:n], atol=1e-5)
        assert [ids_a[i] for i in best_a[:n]] == [ids_b[i] for i in best_b[:n]]
    assert len(st_a) == s.catalog.counts()["cases"]  # every study scored


def test_cli_ingest_slices_and_similar_study_folder(study_home, tmp_path, pngs, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    root, home, made = study_home
    runner = CliRunner()
    bad = runner.invoke(app, ["ingest", str(root / "tree"), "--home", str(tmp_path / "h"), "--slices", "zero"])
    assert bad.exit_code == 2 and "--slices" in bad.output and not (tmp_path / "h" / "catalog.db").exists()
    ct_series(tmp_path / "q", pngs[2], n_slices=7, size=128, shift=2, seed=5)
    monkeypatch.setenv("MEDSEARCH_DEVICE", "cpu")
    res = runner.invoke(app, ["similar", str(tmp_path / "q"), "--home", str(home), "--json", "-k", "2",
                              "--model", "towers"])  # fmt: skip
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    cat = Catalog.open(home / "catalog.db")
    want = cat.case_id_for_key(pseudonym(made[2]["study_uid"], cat.salt, "StudyInstanceUID"))
    cat.close()
    assert len(hits) == 2 and hits[0]["case_id"] == want and hits[0]["matched"] == "study"
    case = runner.invoke(app, ["case", str(want), "--home", str(home), "--json"])
    [series] = json.loads(case.output)["series"]
    assert series["slice_count"] == 10 and [sl["embedded"] for sl in series["slices"]].count(True) == 4
    text = runner.invoke(app, ["case", str(want), "--home", str(home)])
    assert "10 slices (4 embedded), ordered by position" in text.output


def test_api_study_upload_and_case_view_lists_series(study_home, towers, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import ApiSettings

    root, home, made = study_home
    settings = ApiSettings(home=home, device="cpu", watch_seconds=0, rate_per_minute=0,
                           keys_file=tmp_path / "keys.json", audit_log=tmp_path / "audit.log")  # fmt: skip
    files = made[0]["files"][2:5]
    with TestClient(create_app(settings, encoder=towers)) as c:
        up = [("files", (f"s{i}.dcm", f.read_bytes(), "application/dicom")) for i, f in enumerate(files)]
        r = c.post("/v1/search/image", files=up, data={"k": "10"})
        assert r.status_code == 200, r.text
        cat = Catalog.open(home / "catalog.db")
        own = cat.case_id_for_key(pseudonym(made[0]["study_uid"], cat.salt, "StudyInstanceUID"))
        cat.close()
        got = [h["case_id"] for h in r.json()["hits"]]
        assert own not in got and len(got) == len(set(got)) > 0  # own study (from the DICOM header) left out
        case = c.get(f"/v1/cases/{got[0]}").json()
        [series] = case["series"]
        assert series["slice_count"] == 10 and series["ordered_by"] == "position" and len(series["slices"]) == 10
        assert sum(sl["embedded"] for sl in series["slices"]) == 4
        assert [sl["slice_index"] for sl in series["slices"]] == list(range(10))
        assert "Plantedname" not in r.text + json.dumps(case)
        both = c.post("/v1/search/image", files=[*up, ("file", ("x.dcm", files[0].read_bytes(), "application/dicom"))])
        assert both.status_code == 400


def test_a_truncated_slice_is_skipped_by_name_and_the_rest_of_its_series_goes_in(tmp_path, pngs):
    made = ct_series(tmp_path / "st", pngs[0], n_slices=4, size=64)
    cut = made["files"][1]
    cut.write_bytes(cut.read_bytes()[:-500])
    cat = Catalog.open(tmp_path / "catalog.db")
    s = ingest_path(cat, tmp_path / "st")
    [skip] = s.skipped
    assert skip.item == str(cut) and "truncated" in skip.reason
    assert s.images_added == 3 and s.series_added == 1 and cat.study_counts()["slices"] == 3
    cat.close()
