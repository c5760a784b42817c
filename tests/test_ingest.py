"""Readers and ingest on real data: idempotent, bad input reported by name, nothing stored changes."""

from __future__ import annotations

import json
import shutil

import pytest

from indexer.ingest import ingest_path
from indexer.sources.jsonl import read_jsonl_dataset
from indexer.sources.layout import detect_layout
from medsearch.catalog import Catalog
from medsearch.errors import InvalidInput


def test_jsonl_layout_detected_and_streamed(medpix_slice, covid_dir):
    assert detect_layout(medpix_slice) == "jsonl"
    assert detect_layout(covid_dir) == "jsonl"
    items = list(read_jsonl_dataset(covid_dir))
    cases = [i for i in items if type(i).__name__ == "CaseRecord"]
    images = [i for i in items if type(i).__name__ == "ImageRecord"]
    assert len(cases) == 41 and len(images) == 50
    # Every image comes after its case.
    seen = set()
    for it in items:
        if type(it).__name__ == "CaseRecord":
            seen.add(it.key)
        elif type(it).__name__ == "ImageRecord":
            assert it.case_key in seen
    x = next(i for i in images if i.modality_type == "X-ray")
    assert x.body_region == "Thorax" and x.caption


def test_ingest_twice_adds_nothing(tmp_path, medpix_slice):
    cat = Catalog.open(tmp_path / "catalog.db")
    s1 = ingest_path(cat, medpix_slice, source="medpix-2.0")
    assert s1.cases_added > 20 and s1.images_added > s1.cases_added and not s1.skipped
    counts = cat.counts()
    s2 = ingest_path(cat, medpix_slice, source="medpix-2.0")
    assert (s2.cases_added, s2.images_added, s2.cases_updated, s2.images_updated) == (0, 0, 0, 0)
    assert s2.unchanged == s1.cases_added + s1.images_added
    assert cat.counts() == counts
    # texts: sections, their sentences and captions are all stored
    kinds = dict(cat.db.execute("SELECT kind, count(*) FROM texts GROUP BY kind").fetchall())
    assert kinds["caption"] == counts["images"] and kinds["sentence"] > kinds["section"] > 0
    log = cat.db.execute("SELECT status, images_added FROM ingest_log ORDER BY id").fetchall()
    assert log == [("ok", s1.images_added), ("ok", 0)]


def test_split_filter(tmp_path, covid_dir):
    cat = Catalog.open(tmp_path / "catalog.db")
    s = ingest_path(cat, covid_dir, splits=["dev"])
    assert s.images_added == 5 and s.cases_added == 5
    assert {r[0] for r in cat.db.execute("SELECT DISTINCT split FROM images")} == {"dev"}


def _broken_dataset(tmp_path, covid_dir):
    """covid-chestxray with a malformed line, a missing image, a corrupt PNG and a text file named .png."""
    d = tmp_path / "broken"
    (d / "images").mkdir(parents=True)
    shutil.copy(covid_dir / "reports.jsonl", d / "reports.jsonl")
    lines = (covid_dir / "images.jsonl").read_text().splitlines()[:8]
    recs = [json.loads(line) for line in lines]
    for r in recs:
        shutil.copy(covid_dir / r["file"], d / r["file"])
    (d / recs[1]["file"]).unlink()  # missing referenced image
    data = (covid_dir / recs[2]["file"]).read_bytes()
    (d / recs[2]["file"]).write_bytes(data[: len(data) // 3])  # truncated PNG
    (d / recs[3]["file"]).write_text("this is a report, not an image\n")  # text renamed .png
    with open(d / "images.jsonl", "w") as f:
        for i, line in enumerate(lines):
            f.write(line + "\n")
            if i == 4:
                f.write('{"image_id": "x", "file": \n')  # malformed JSON
    return d, recs


def test_bad_input_is_named_counted_and_skipped(tmp_path, covid_dir):
    d, recs = _broken_dataset(tmp_path, covid_dir)
    cat = Catalog.open(tmp_path / "catalog.db")
    s = ingest_path(cat, d)
    reasons = {sk.item: sk.reason for sk in s.skipped}
    assert any("images.jsonl:6" in k and "malformed JSON" in v for k, v in reasons.items())
    assert any(recs[1]["file"].split("/")[-1] in k and "missing" in v for k, v in reasons.items())
    assert any(recs[2]["file"].split("/")[-1] in k for k in reasons)
    assert any(recs[3]["file"].split("/")[-1] in k for k in reasons)
    assert s.images_added == 8 - 3
    assert cat.counts()["images"] == 5


def test_failed_ingest_changes_nothing_stored(tmp_path, covid_dir):
    cat = Catalog.open(tmp_path / "catalog.db")
    ingest_path(cat, covid_dir)
    before = cat.db.execute("SELECT id, sha256, caption FROM images ORDER BY id").fetchall()
    d, _ = _broken_dataset(tmp_path, covid_dir)
    ingest_path(cat, d, source="covid-chestxray")  # same source: the broken copies must not overwrite
    after = cat.db.execute("SELECT id, sha256, caption FROM images ORDER BY id").fetchall()
    assert after == before


def test_image_folder_with_csv_sidecar(tmp_path, covid_dir):
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    files = sorted((covid_dir / "images").iterdir())[:3]
    for f in files:
        shutil.copy(f, d / "sub" / f.name)
    (d / "reports.csv").write_text(
        "file,case_id,findings,modality,body_region\n"
        f"sub/{files[0].name},A,Bilateral patchy opacities.,X-ray,Thorax\n"
        f"sub/{files[1].name},A,Bilateral patchy opacities.,X-ray,Thorax\n"
    )
    (d / "notes.bin").write_bytes(b"\x00\x01")
    cat = Catalog.open(tmp_path / "catalog.db")
    s = ingest_path(cat, d)
    assert s.images_added == 3 and s.cases_added == 2  # two share case A, the third is its own case
    assert any("notes.bin" in sk.item for sk in s.skipped)
    case = cat.get_case("A")
    assert case.sections["findings"].startswith("Bilateral") and len(case.images) == 2


def test_symlink_loop_is_skipped_not_fatal(tmp_path, covid_dir):
    d = tmp_path / "loop"
    d.mkdir()
    shutil.copy(next((covid_dir / "images").iterdir()), d / "a.png")
    (d / "again").symlink_to(d)
    cat = Catalog.open(tmp_path / "catalog.db")
    s = ingest_path(cat, d)
    assert s.images_added == 1
    assert any("loop" in sk.reason for sk in s.skipped)


def test_missing_path_is_a_clear_error(tmp_path):
    cat = Catalog.open(tmp_path / "catalog.db")
    with pytest.raises(InvalidInput, match="does not exist"):
        ingest_path(cat, tmp_path / "nope")
