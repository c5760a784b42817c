"""`medsearch audit-phi`: synthetic PHI is found by kind and never echoed; scrubbed text and
de-identified DICOM (pydicom's bundled samples, under neutral names) come out clean."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from cli.main import app
from indexer.ingest import ingest_path
from medsearch.catalog import Catalog
from medsearch.deid import IDENTIFYING_TAGS, find_phi, scrub_text
from medsearch.phi_audit import KINDS, audit_phi, scan_text, shape
from medsearch.records import CaseRecord, ImageRecord

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()

REPORT = (
    "Seen by Dr. John Smithers on 03/14/2019 and again on March 3, 2020. Call (555) 123-4567 or "
    "john.smithers@example.org. MRN: 12345678. A 93-year-old man from 12 Elm Street with a 3.5 cm nodule."
)
RAW = ["John", "Smithers", "Elm", "03/14/2019", "March 3", "555", "4567", "john.smithers", "12345678", "93-year",
       "Doe", "Jane", "5962", "20040119"]  # fmt: skip
CLEAN = "Bilateral patchy opacities in 2004; a 3.5 cm nodule at T12. No effusion. Compare 1.2.3 mm."


def _synthetic(cat: Catalog, report: str = REPORT) -> None:
    cid, _ = cat.upsert_case(CaseRecord(
        source="s", key="c1", title="Chest", sections={"history": report, "findings": CLEAN},
        labels={"note": "MRN 98765432"},
        meta={"patient_name": "Doe^Jane", "series": "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"},
    ))  # fmt: skip
    cat.upsert_image(ImageRecord(source="s", key="i1", case_key="c1", path="/data/i1.png",
                                 caption="Frontal view, 12/01/2003."), cid, sha256="x", nbytes=1, width=1, height=1)  # fmt: skip


def test_every_kind_is_found_and_examples_carry_no_phi():
    cat = Catalog.open(None)
    _synthetic(cat)
    rep = audit_phi(cat, examples=5)
    counts = {k: v["count"] for k, v in rep["kinds"].items()}
    assert all(counts[k] >= 1 for k in KINDS), counts
    assert counts["date"] >= 3 and counts["id"] >= 2  # two dates in the report, one in the caption; MRN x2
    assert rep["kinds"]["dicom_phi_key"]["where"] == {"cases.meta.patient_name": 1}
    assert "cases.sections.findings" not in json.dumps(rep)  # the clean section adds nothing
    shown = json.dumps([k["examples"] for k in rep["kinds"].values()])
    for raw in RAW:
        assert raw not in shown, raw
    assert "Dr. [NAME Xxxx Xxxxxxxx]" in shown and "[PHONE (999) 999-9999]" in shown


def test_clean_and_scrubbed_text_has_nothing():
    assert scan_text(CLEAN) == [] and find_phi(CLEAN) == []
    assert scan_text(scrub_text(REPORT)) == []  # what the scrubber replaces, the audit no longer sees
    assert scan_text("see https://medpix.nlm.nih.gov/case?id=12345678-aaaa, syntax 1.2.840.10008.1.2.4.50") == []
    assert [k for k, _, _ in scan_text("UID 1.3.6.1.4.1.9590.100.1.2.123456789")] == ["dicom_uid"]
    assert scan_text("Dr. XXXX XXXX was called; CBC 10.7> 12.3/38.4 <") == []  # masked by the data set; lab shorthand
    assert [k for k, _, _ in scan_text("seen 03/14/2019 and 3.4.2019")] == ["date", "date"]
    assert shape("Dr. Ab-9") == "Xx. Xx-9"


def test_cli_reports_by_kind_and_exits_1(tmp_path):
    home = tmp_path / "home"
    cat = Catalog.open(home / "catalog.db")
    _synthetic(cat)
    cat.close()
    r = runner.invoke(app, ["audit-phi", "--home", str(home)])
    assert r.exit_code == 1 and re.search(r"^name\s+2\s", r.output, re.M) and "PHI-like spans" in r.output
    for raw in RAW:
        assert raw not in r.output, raw
    r = runner.invoke(app, ["audit-phi", "--home", str(home), "--json", "--examples", "0"])
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["findings"] == sum(k["count"] for k in rep["kinds"].values())
    clean = tmp_path / "clean"
    cat = Catalog.open(clean / "catalog.db")
    cat.upsert_case(CaseRecord(source="s", key="c", sections={"findings": CLEAN}))
    cat.close()
    r = runner.invoke(app, ["audit-phi", "--home", str(clean)])
    assert r.exit_code == 0 and "no PHI-like content found" in r.output


def test_pydicom_samples_ingested_as_a_tree_leave_no_phi(tmp_path):
    """All of pydicom's bundled test files, copied under neutral names (some folder names are PatientIDs)."""
    base = Path(get_testdata_file("CT_small.dcm", download=False)).parent
    files = sorted(p for p in base.rglob("*") if p.is_file())
    tree = tmp_path / "tree"
    raw: set[str] = set()
    device: set[str] = set()  # Manufacturer/model are kept (whitelist); one sample's InstitutionName equals another's
    for i, f in enumerate(files):
        (tree / f"d{i // 50}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, tree / f"d{i // 50}" / f"f{i:04d}")
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            for kw in IDENTIFYING_TAGS:
                for v in (
                    (ds.get(kw) or "",)
                    if not isinstance(ds.get(kw), list | pydicom.multival.MultiValue)
                    else ds.get(kw)
                ):
                    for part in {str(v).strip(), *str(v).split("^")}:
                        if len(part.strip()) >= 6:
                            raw.add(part.strip())
            device.update(str(ds.get(k) or "").strip() for k in ("Manufacturer", "ManufacturerModelName"))
        except Exception:  # not DICOM: nothing to collect
            continue
    raw -= device
    home = tmp_path / "home"
    cat = Catalog.open(home / "catalog.db")
    s = ingest_path(cat, tree)
    assert s.images_added > 40 and s.cases_added > 10
    rep = audit_phi(cat)
    assert rep["findings"] == 0, {k: v for k, v in rep["kinds"].items() if v["count"]}
    cat.close()
    con = sqlite3.connect(str(home / "catalog.db"))
    dumped = "\n".join(con.iterdump())
    con.close()
    assert len(raw) > 50
    leaked = sorted(v for v in raw if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w.])", dumped))
    assert leaked == [], leaked[:10]


def test_shared_covid_dataset_is_scanned_whole(tmp_path, covid_dir):
    cat = Catalog.open(tmp_path / "catalog.db")
    ingest_path(cat, covid_dir)
    rep = audit_phi(cat)
    n_labels = cat.db.execute("SELECT count(*) FROM labels").fetchone()[0]
    assert (rep["scanned"]["cases"], rep["scanned"]["images"], rep["scanned"]["labels"]) == (41, 50, n_labels)
    assert rep["scanned"]["chars"] > 10_000


def test_report_sources_are_counted():
    """Cases whose report came from an SR or a RIS export, and how many were scrubbed (meta written by the ingest)."""
    cat = Catalog.open(None)
    for key, meta in (("a", {"report_source": "sr", "report_scrubbed": True}), ("b", {"report_source": "ris"}),
                      ("c", {"report_source": "ris", "report_scrubbed": True}), ("d", {})):  # fmt: skip
        cat.upsert_case(CaseRecord(source="s", key=key, sections={"findings": "Clear."}, meta=meta))
    assert audit_phi(cat)["report_sources"] == {"sr": {"cases": 1, "scrubbed": 1}, "ris": {"cases": 2, "scrubbed": 1}}
