"""indexer.sources.ris: CSV and JSONL RIS exports joined to studies by accession number or Study Instance
UID, in memory; unmatched rows listed by label; planted identifiers scrubbed; bad files raise typed errors."""

from __future__ import annotations

import json

import pytest
import sr_fixtures as F

from indexer.sources.ris import RisReports, split_report
from medsearch.errors import InvalidInput, NotFound

UID = "1.2.826.0.1.3680043.8.498.1"
KEYS = ("A1001", "A9999", UID)
WRITERS = {"csv": F.write_ris_csv, "jsonl": F.write_ris_jsonl}


@pytest.fixture(params=list(WRITERS))
def export(request, tmp_path):
    return WRITERS[request.param](tmp_path / f"ris-export.{request.param}")


def _no_key_in(text: str) -> None:
    for key in KEYS:
        assert key not in text, key


def test_join_on_either_key_and_unmatched_rows_by_label(export):
    ris = RisReports.load(export)
    assert ris.format == export.suffix[1:] and set(ris.keys) == {"accession_number", "study_instance_uid"}
    assert ris.stats == {
        "rows": 3,
        "reports": 3,
        "matched": 0,
        "unmatched": 3,
        "no_key": 0,
        "no_text": 0,
        "duplicates": 0,
    }
    by_acc = ris.lookup(accession_number="A1001")
    assert by_acc == {
        "findings": F.RIS_ROWS[0]["Findings"],
        "impression": F.RIS_ROWS[0]["Impression"],
    }
    by_uid = ris.lookup(study_instance_uid=UID)  # the single "report" column, split at its headings
    assert by_uid == {
        "history": "Fall. Patient Okonkwo.",
        "findings": "Nondisplaced fracture of the left fifth rib.",
        "impression": "Rib fracture. Signed by Petra Lindqvist, MD on 2024-01-05.",
    }
    assert ris.lookup(accession_number="A5555") is None and ris.lookup() is None
    assert ris.lookup(accession_number="nope", study_instance_uid="1.2.3") is None
    assert ris.unmatched() == ["row 3"]
    assert ris.stats["matched"] == 2 and ris.stats["unmatched"] == 1
    ris.lookup(accession_number="A1001")  # a second lookup of one row counts it once
    assert ris.stats["matched"] == 2
    _no_key_in(repr(ris) + json.dumps(ris.stats) + json.dumps(ris.unmatched()) + json.dumps(ris.skipped()))
    assert "Okonkwo" not in repr(ris.lookup_entry(study_instance_uid=UID))  # a repr shows no report text


def test_uid_first_then_accession_and_key_normalisation(tmp_path):
    rows = [
        {"accession_number": "A1", "study_instance_uid": "1.2.3.1", "impression": "first"},
        {"accession_number": "A2", "study_instance_uid": "1.2.3.2", "impression": "second"},
        {"accession_number": "0001003", "study_instance_uid": "", "impression": "third"},
    ]
    ris = RisReports.load(F.write_ris_csv(tmp_path / "r.csv", rows))
    assert ris.lookup(accession_number="A1", study_instance_uid="1.2.3.2") == {"impression": "second"}
    assert ris.lookup(accession_number=" a1 ", study_instance_uid="9.9") == {"impression": "first"}
    assert ris.lookup(study_instance_uid="1.2.3.1\x00") == {"impression": "first"}  # DICOM NUL padding
    assert ris.lookup(accession_number="1003") is None  # leading zeros are part of the key
    assert ris.lookup(accession_number="0001003") == {"impression": "third"}


def test_scrubbed_rows_carry_no_planted_identifier(export):
    ris = RisReports.load(export)
    for kw in ({"accession_number": "A1001"}, {"study_instance_uid": UID}):
        entry = ris.lookup_entry(**kw)
        assert entry is not None
        sections, n = entry.scrubbed()
        text = json.dumps(sections)
        for raw in ("Garcia", "Maria", "03/14/2023", "555", "4567", "Okonkwo", "Lindqvist", "2024-01-05"):
            assert raw not in text, raw
        assert n >= 3 and set(sections) == set(entry.sections)
    # "Patient Okonkwo" has no title: the row's patient_name column is what catches it
    assert "Patient [NAME]" in json.dumps(ris.lookup_entry(study_instance_uid=UID).scrubbed()[0])
    assert "consolidation" in json.dumps(ris.lookup_entry(accession_number="A1001").scrubbed()[0])


def test_headers_case_delimiters_and_encodings(tmp_path):
    rows = [
        {
            "ACCESSION NUMBER": "X77",
            "Study-Instance-UID": "",
            "FINDINGS": "Café-au-lait spot. Ærodigestive tract clear.",
        }
    ]
    text = "ACCESSION NUMBER;Study-Instance-UID;FINDINGS\r\nX77;;Café-au-lait spot. Ærodigestive tract clear.\r\n"
    (tmp_path / "semi.csv").write_text(text, encoding="utf-8-sig")  # Excel: BOM, semicolons, CRLF
    expect = {"findings": rows[0]["FINDINGS"]}
    assert RisReports.load(tmp_path / "semi.csv").lookup(accession_number="x77") == expect
    (tmp_path / "win.csv").write_bytes(text.encode("cp1252"))
    assert RisReports.load(tmp_path / "win.csv", encoding="cp1252").lookup(accession_number="X77") == expect
    (tmp_path / "u16.txt").write_text(text, encoding="utf-16")  # "Unicode text" export, with its BOM
    assert RisReports.load(tmp_path / "u16.txt").lookup(accession_number="X77") == expect
    (tmp_path / "tabs.tsv").write_text(text.replace(";", "\t"), encoding="utf-8")
    assert RisReports.load(tmp_path / "tabs.tsv").lookup(accession_number="X77") == expect
    # JSON: numeric accession numbers, a JSON array, an unknown suffix sniffed as JSON
    (tmp_path / "n.json").write_text(json.dumps([{"Accession_Number": 1001, "Report": "Normal chest."}]))
    assert RisReports.load(tmp_path / "n.json").lookup(accession_number="1001") == {"findings": "Normal chest."}
    (tmp_path / "export.dat").write_text('{"study_uid": "1.2.3", "impressions": "Normal."}\n')
    ris = RisReports.load(tmp_path / "export.dat")
    assert ris.format == "jsonl" and ris.lookup(study_instance_uid="1.2.3") == {"impression": "Normal."}


def test_rows_without_key_text_or_with_a_repeated_key_are_skipped_by_label(tmp_path):
    rows = [
        {"accession_number": "A1", "findings": "one"},
        {"accession_number": "", "findings": "no key"},
        {"accession_number": "A2", "findings": " "},
        {"accession_number": "a1", "findings": "repeat of A1"},
        {"accession_number": "A3", "findings": "three"},
    ]
    ris = RisReports.load(F.write_ris_csv(tmp_path / "r.csv", rows))
    assert ris.skipped() == {"no_key": ["row 2"], "no_text": ["row 3"], "duplicates": ["row 4"]}
    assert ris.stats == {
        "rows": 5,
        "reports": 2,
        "matched": 0,
        "unmatched": 2,
        "no_key": 1,
        "no_text": 1,
        "duplicates": 1,
    }
    assert ris.lookup(accession_number="A1") == {"findings": "one"}  # the first row with a key wins
    assert ris.unmatched() == ["row 5"] and len(ris) == 2


def test_split_report():
    assert split_report("Plain text.") == {"findings": "Plain text."}
    assert split_report("") == {}
    got = split_report("EXAMINATION: CHEST PA. INDICATION: cough. COMPARISON: None.\nFINDINGS: Lungs: clear. "
                       "No new findings: stable.\nImpression: Normal. FINDINGS: Addendum text.")  # fmt: skip
    assert got == {
        "exam": "CHEST PA.", "indication": "cough.", "comparison": "None.",
        "findings": "Lungs: clear. No new findings: stable.\nAddendum text.", "impression": "Normal.",
    }  # fmt: skip
    assert split_report("Preamble. FINDINGS: a")["other"] == "Preamble."


def _bad(path, match, **kw):
    with pytest.raises(InvalidInput, match=match) as err:
        RisReports.load(path, **kw)
    assert path.name in err.value.message and err.value.hint
    return err.value


def test_bad_files_raise_typed_errors_naming_the_file_and_the_fix(tmp_path):
    p = tmp_path / "nokey.csv"
    p.write_text("patient_name,findings\nSmithers^Jonathan,Normal.\n")
    e = _bad(p, "no join key column")
    assert "accession_number or study_instance_uid" in e.hint and "Smithers" not in str(e)
    p = tmp_path / "notext.jsonl"
    p.write_text('{"accession_number": "A1", "mrn": "12345678"}\n')
    e = _bad(p, "no report text column")
    assert "findings and impression" in e.hint and "12345678" not in str(e)
    p = tmp_path / "latin.csv"
    p.write_bytes("accession_number,findings\nA1,ok\nA2,Caf\xe9\n".encode("latin-1"))
    e = _bad(p, r"not valid utf-8 text \(line 3")
    assert "encoding" in e.hint
    assert RisReports.load(p, encoding="latin-1").lookup(accession_number="A2") == {"findings": "Café"}
    p = tmp_path / "broken.jsonl"
    p.write_text('{"accession_number": "A1", "findings": "x"}\n\n{"accession_number": "A2", "findings": \n')
    _bad(p, "line 3 is not valid JSON")
    p = tmp_path / "list.jsonl"
    p.write_text('{"accession_number": "A1", "findings": "x"}\n["A2", "y"]\n')
    _bad(p, "line 2 is a JSON list, not an object")
    p = tmp_path / "array.json"
    p.write_text('[{"accession_number": "A1", "findings": "x"}, "A2"]')
    _bad(p, "item 2 is a JSON str, not an object")
    p = tmp_path / "empty.csv"
    p.write_text("")
    _bad(p, "empty or has no header")
    p = tmp_path / "header-only.csv"
    p.write_text("accession_number,findings\n")
    _bad(p, "has no records")
    _bad(tmp_path / "header-only.csv", "encoding 'klingon'", encoding="klingon")
    _bad(tmp_path / "header-only.csv", "format 'xml'", fmt="xml")
    with pytest.raises(NotFound, match="missing.csv"):
        RisReports.load(tmp_path / "missing.csv")
