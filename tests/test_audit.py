"""The hash-chained audit log: rotation keeps the chain; an edited, removed or reordered line is named.

Real files and real processes: two writer processes append to one log at once (the advisory
lock), a torn last line is recovered, and the API's audit lines are verified after real requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app
from medsearch.audit import GENESIS, AuditLog, line_hash, log_files, verify
from medsearch.errors import InvalidInput

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def write_log(path: Path, n: int, max_bytes: int = 0) -> AuditLog:
    log = AuditLog(path, max_bytes=max_bytes)
    for i in range(n):
        log.write(action="search.text", who="key:0badc0de", i=i, query=f"query number {i}")
    log.close()
    return log


@pytest.fixture()
def rotated(tmp_path) -> Path:
    """60 records over several files (rotation at 1.5 kB)."""
    path = tmp_path / "audit.log"
    write_log(path, 60, max_bytes=1500)
    return path


def lines_of(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines(keepends=True)


def test_chain_is_intact_and_runs_through_rotated_files(rotated):
    files = log_files(rotated)
    assert len(files) >= 4 and files[-1] == rotated
    assert [f.name for f in files[:-1]] == [f"audit.log.{i:06d}" for i in range(1, len(files))]
    v = verify(rotated)
    assert v.ok and v.problem is None and v.notes == []
    recs = [json.loads(x) for f in files for x in lines_of(f)]
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1)) and v.records == len(recs)
    assert recs[0]["prev"] == GENESIS and recs[0]["action"] == "audit.start"
    assert sum(1 for r in recs if r.get("action") == "search.text") == 60
    for older, newer in zip(files[:-1], files[1:], strict=True):  # each new file starts with the last hash of the old one
        first = json.loads(lines_of(newer)[0])
        assert first["action"] == "audit.start" and first["continues"] == older.name
        assert first["prev"] == line_hash(lines_of(older)[-1].rstrip(b"\n"))
    for f in files:
        assert f.stat().st_size <= 1500
    assert v.head_hash == line_hash(lines_of(rotated)[-1].rstrip(b"\n")) and v.head_seq == recs[-1]["seq"]
    assert verify(rotated.parent).ok  # a folder means its audit.log
    assert verify(files[1]).ok  # a rotated member means the whole log


def _rewrite(p: Path, lines: list[bytes]) -> None:
    p.write_bytes(b"".join(lines))


@pytest.mark.parametrize("member", [1, -1], ids=["rotated-file", "current-file"])
def test_changed_line_is_named(rotated, member):
    f = log_files(rotated)[member]
    lines = lines_of(f)
    rec = json.loads(lines[2])
    lines[2] = lines[2].replace(f'"i":{rec["i"]}'.encode(), f'"i":{rec["i"] + 100}'.encode())
    _rewrite(f, lines)
    v = verify(rotated)
    assert not v.ok and v.problem.kind == "changed" and (v.problem.file, v.problem.line) == (f.name, 3)
    assert v.problem.seq == rec["seq"] and f"{f.name} line 3 was changed" in v.problem.message


def test_changed_seq_is_named(rotated):
    f = log_files(rotated)[1]
    lines = lines_of(f)
    rec = json.loads(lines[2])
    lines[2] = lines[2].replace(f'"seq":{rec["seq"]}'.encode(), f'"seq":{rec["seq"] + 7}'.encode())
    _rewrite(f, lines)
    v = verify(rotated)
    assert v.problem.kind == "changed" and (v.problem.file, v.problem.line) == (f.name, 3)


def test_line_that_is_not_json_is_named(rotated):
    f = log_files(rotated)[0]
    lines = lines_of(f)
    lines[4] = b"{not json\n"
    _rewrite(f, lines)
    assert (verify(rotated).problem.kind, verify(rotated).problem.line) == ("changed", 5)


def test_removed_line_is_named(rotated):
    f = log_files(rotated)[1]
    lines = lines_of(f)
    gone = json.loads(lines[3])["seq"]
    del lines[3]
    _rewrite(f, lines)
    v = verify(rotated)
    assert v.problem.kind == "removed" and v.problem.seq == gone and (v.problem.file, v.problem.line) == (f.name, 4)
    assert f"record seq {gone} removed" in v.problem.message


def test_reordered_lines_are_named(rotated):
    f = log_files(rotated)[-1]
    lines = lines_of(f)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(f, lines)
    v = verify(rotated)
    assert v.problem.kind == "reordered" and (v.problem.file, v.problem.line) == (f.name, 3)
    assert f"{f.name} line 4" in v.problem.message  # where the displaced record went


def test_line_moved_across_files_is_named(rotated):
    a, b = log_files(rotated)[0], log_files(rotated)[1]
    la, lb = lines_of(a), lines_of(b)
    moved = la.pop(2)
    lb.insert(2, moved)
    _rewrite(a, la)
    _rewrite(b, lb)
    v = verify(rotated)
    assert v.problem.kind == "reordered" and (v.problem.file, v.problem.line) == (a.name, 3)


def test_removed_or_changed_last_line_is_named_by_the_head(rotated):
    lines = lines_of(rotated)
    last = json.loads(lines[-1])["seq"]
    _rewrite(rotated, lines[:-1])
    v = verify(rotated)
    assert v.problem.kind == "removed" and v.problem.seq == last and v.problem.line == len(lines)
    _rewrite(rotated, lines[:-1] + [lines[-1].replace(b"query number", b"query NUMBER")])
    v = verify(rotated)
    assert v.problem.kind == "changed" and v.problem.line == len(lines)
    _rewrite(rotated, lines)
    assert verify(rotated).ok


def test_removed_rotated_file_is_named(rotated):
    files = log_files(rotated)
    first_gone = json.loads(lines_of(files[1])[0])["seq"]
    files[1].unlink()
    v = verify(rotated)
    assert v.problem.kind == "removed" and v.problem.seq == first_gone and v.problem.file == files[2].name
    assert v.problem.line == 1


def test_removed_first_file_is_named(rotated):
    log_files(rotated)[0].unlink()
    v = verify(rotated)
    assert v.problem.kind == "removed" and v.problem.seq == 1 and "start of the log" in v.problem.message


def test_reopening_continues_the_chain_and_rotation_after_reopen(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 5)
    out = AuditLog(path, max_bytes=path.stat().st_size + 10)  # the next write rotates
    r = out.write(action="after restart")
    out.close()
    assert r["seq"] == 8 and verify(path).ok and len(log_files(path)) == 2
    recs = [json.loads(x) for f in log_files(path) for x in lines_of(f)]
    assert [x["seq"] for x in recs] == list(range(1, 9))  # 1 start + 5, then the start of the new file, then 1


def test_torn_last_line_is_dropped_and_noted(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 4)
    with open(path, "ab") as f:
        f.write(b'{"seq":6,"prev":"abc","ts":"2026')  # a write cut short by a crash
    assert verify(path).problem.kind == "incomplete"
    log = AuditLog(path)
    log.write(action="next")
    log.close()
    v = verify(path)
    assert v.ok, v.problem
    recs = [json.loads(x) for x in lines_of(path)]
    assert recs[-2]["action"] == "audit.recovered" and recs[-2]["dropped_bytes"] == 32 and recs[-1]["action"] == "next"


def test_damaged_last_line_refuses_to_append(tmp_path):
    path = tmp_path / "audit.log"
    write_log(path, 3)
    lines = lines_of(path)
    _rewrite(path, lines[:-1] + [b"garbage\n"])
    with pytest.raises(InvalidInput) as e:
        AuditLog(path)
    assert "audit verify" in e.value.hint


WRITER = """
import sys
from pathlib import Path
from medsearch.audit import AuditLog
log = AuditLog(Path(sys.argv[1]), max_bytes=4000)
for i in range(int(sys.argv[3])):
    log.write(action="w", writer=sys.argv[2], i=i)
log.close()
"""


def test_two_processes_append_to_one_chain(tmp_path):
    path = tmp_path / "audit.log"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, "150"], cwd=str(REPO))
             for name in ("a", "b")]  # fmt: skip
    assert all(p.wait(timeout=120) == 0 for p in procs)
    v = verify(path)
    assert v.ok, v.problem
    recs = [json.loads(x) for f in log_files(path) for x in lines_of(f)]
    by = {w: [r["i"] for r in recs if r.get("writer") == w] for w in ("a", "b")}
    assert by == {"a": list(range(150)), "b": list(range(150))}
    assert len(log_files(path)) > 3  # rotations happened while both wrote


def test_cli_audit_verify(rotated):
    r = runner.invoke(app, ["audit", "verify", str(rotated)])
    assert r.exit_code == 0 and "intact" in r.output, r.output
    r = runner.invoke(app, ["audit", "verify", "--home", str(rotated.parent), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    f = log_files(rotated)[2]
    lines = lines_of(f)
    del lines[1]
    _rewrite(f, lines)
    r = runner.invoke(app, ["audit", "verify", str(rotated)])
    assert r.exit_code == 1 and f"{f.name} line 2" in r.output and "removed" in r.output, r.output
    r = runner.invoke(app, ["audit", "verify", str(rotated.parent / "nothing.log")])
    assert r.exit_code == 2 and "no audit log" in r.output


def test_api_audit_lines_form_a_chain(small_home, towers, tmp_path):
    from api.app import create_app
    from api.settings import ApiSettings

    home = tmp_path / "home"
    shutil.copytree(small_home, home)
    log = tmp_path / "audit.log"
    s = ApiSettings(home=home, device="cpu", watch_seconds=0, rate_per_minute=0, keys_file=tmp_path / "keys.json",
                    audit_log=log)  # fmt: skip
    with TestClient(create_app(s, encoder=towers)) as c:
        for q in ("pneumonia", "brain mass", "fracture"):
            assert c.post("/v1/search/text", json={"query": q, "k": 3}).status_code == 200
    with TestClient(create_app(s, encoder=towers)) as c:  # a restarted server continues the chain
        assert c.post("/v1/search/text", json={"query": "edema", "k": 3}).status_code == 200
    v = verify(log)
    assert v.ok, v.problem
    recs = [json.loads(x) for x in lines_of(log)]
    assert [r.get("query") for r in recs if r.get("action") == "search.text"] == [
        "pneumonia", "brain mass", "fracture", "edema"]  # fmt: skip
    lines = lines_of(log)
    at = next(i for i, r in enumerate(recs) if r.get("query") == "brain mass")
    lines[at] = lines[at].replace(b"brain mass", b"brain mess")
    _rewrite(log, lines)
    v = verify(log)
    assert v.problem.kind == "changed" and v.problem.line == at + 1


def test_a_log_from_before_the_chain_is_kept_aside(tmp_path):
    path = tmp_path / "audit.log"
    old = '{"ts":"2026-11-30T10:00:00+00:00","action":"search.text","query":"old"}\n'
    path.write_text(old * 3)
    log = AuditLog(path)
    log.write(action="search.text", query="new")
    log.close()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("audit.log.unchained-")]
    assert len(kept) == 1 and kept[0].read_text() == old * 3  # byte for byte
    v = verify(path)
    assert v.ok and v.files == ["audit.log"], v
    recs = [json.loads(x) for x in lines_of(path)]
    assert recs[1] == {**recs[1], "action": "audit.unchained_log_kept", "file": kept[0].name}
