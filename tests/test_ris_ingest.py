"""`medsearch ingest DICOM_TREE --reports RIS.csv`: a RIS export joined to studies in memory, scrubbed, reported."""

from __future__ import annotations

import json

from pacs_data import PLANTED, ct_series, write_series
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from cli.main import app
from medsearch.catalog import Catalog


def test_ris_export_joins_by_accession_scrubs_and_lists_unmatched_rows(tmp_path):
    study = ct_series(3, study_uid=generate_uid(), series_uid=generate_uid())
    write_series(study, tmp_path / "tree")
    ris = tmp_path / "ris.csv"
    ris.write_text(
        "Accession_Number,Findings,Impression\n"
        f"{PLANTED['AccessionNumber']},\"Spiculated mass in the right upper lobe. Dictated by Dr. Gregory House.\","
        "\"Suspicious for carcinoma.\"\n"
        "ACC-NOT-IN-TREE,\"Normal chest.\",\"Normal.\"\n"
    )
    home = tmp_path / "home"
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "tree"), "--home", str(home), "--reports", str(ris), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["reports"] == {"ris": 1, "scrubbed": 1} and out["reports_unmatched"] == ["row 2"]
    cat = Catalog.open(home / "catalog.db")
    (cid,) = cat.db.execute("SELECT id FROM cases").fetchone()
    case = cat.get_case(cid)
    assert "Spiculated mass" in case.sections["findings"] and case.sections["impression"] == "Suspicious for carcinoma."
    assert "House" not in case.sections["findings"]
    stored = (home / "catalog.db").read_bytes().decode("latin-1")
    cat.close()
    assert PLANTED["AccessionNumber"] not in stored  # the join key is never stored
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "tree"), "--home", str(tmp_path / "h2"), "--reports",
                                 str(tmp_path / "missing.csv")])  # fmt: skip
    assert r.exit_code == 2 and "missing.csv" in r.output
