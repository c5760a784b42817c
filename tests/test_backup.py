"""Online backup and restore on real homes: while another process ingests and indexes, a corrupt
backup refused by checksum, and a full disk (a real tiny tmpfs) that leaves the home untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from medsearch.backup import MANIFEST, BackupCorrupt, backup, restore, verify_backup
from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.consistency import check_home
from medsearch.errors import InvalidInput

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"


@pytest.fixture()
def home(small_home, tmp_path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(small_home, dst)
    from api.keys import KeyStore
    from medsearch.audit import AuditLog

    KeyStore(dst / "api_keys.json").add("admin", "ops")
    log = AuditLog(dst / "audit.log")
    log.write(action="search.text", query="before the backup")
    log.close()
    return dst


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


def check(home: Path) -> dict:
    cat = Catalog.open(home / "catalog.db", create=False)
    try:
        return check_home(cat, Paths(home))
    finally:
        cat.close()


def counts(home: Path) -> dict[str, int]:
    cat = Catalog.open(home / "catalog.db", create=False)
    try:
        return cat.counts()
    finally:
        cat.close()


def test_backup_and_restore_round_trip_with_the_cli(home, tmp_path):
    before = tree_digest(home)
    r = runner.invoke(app, ["backup", str(tmp_path / "b"), "--home", str(home)])
    assert r.exit_code == 0 and "generations: towers" in r.output, r.output
    assert tree_digest(home) == before  # the home is only read
    man = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert man["consistent_as_copied"] and man["repaired"] == [] and man["check_ok"]
    assert set(man["generations"]["towers"]) == {"image", "text", "bm25"}
    assert {"catalog.db", "api_keys.json", "audit.log", "audit.log.head", "indexes/towers/image.faiss",
            "indexes/towers/image.json", "indexes/towers/text.faiss", "indexes/towers/bm25.json"} <= set(man["files"])
    assert oct((tmp_path / "b").stat().st_mode & 0o777) == "0o700"  # keys and the de-id salt are inside
    r = runner.invoke(app, ["restore", str(tmp_path / "b"), "--home", str(tmp_path / "restored")])
    assert r.exit_code == 0 and "check: consistent" in r.output, r.output
    r = runner.invoke(app, ["check", "--home", str(tmp_path / "restored")])
    assert r.exit_code == 0 and "consistent" in r.output, r.output
    restored = tree_digest(tmp_path / "restored")
    for rel in ("indexes/towers/image.faiss", "indexes/towers/text.json", "api_keys.json", "audit.log"):
        assert restored[rel] == before[rel]
    assert counts(tmp_path / "restored") == counts(home)
    assert oct((tmp_path / "restored" / "api_keys.json").stat().st_mode & 0o777) == "0o600"
    from medsearch.audit import verify

    assert verify(tmp_path / "restored" / "audit.log").ok
    from api.keys import KeyStore

    assert [k.name for k in KeyStore(tmp_path / "restored" / "api_keys.json").keys()] == ["ops"]
    from medsearch.search import Searcher

    hits = Searcher(tmp_path / "restored").search_text("pneumonia", k=3)
    assert hits and all(h.case_key for h in hits)


def test_destination_must_be_new_and_outside_the_home(home, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidInput, match="not an empty folder"):
        backup(home, tmp_path / "full")
    with pytest.raises(InvalidInput, match="inside the home"):
        backup(home, home / "backups" / "today")
    (tmp_path / "empty").mkdir()
    assert backup(home, tmp_path / "empty")["files"] > 5  # an empty folder is fine


def test_restore_refuses_to_overwrite_unless_forced(home, tmp_path):
    backup(home, tmp_path / "b")
    with pytest.raises(InvalidInput, match="not empty"):
        restore(tmp_path / "b", home)
    out = restore(tmp_path / "b", home, force=True)
    aside = Path(out["moved_aside"])
    assert aside.is_dir() and (aside / "catalog.db").is_file() and check(home)["ok"]


def _flip(p: Path, at: int = 200) -> None:
    data = bytearray(p.read_bytes())
    data[min(at, len(data) - 1)] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["catalog", "index", "bm25", "manifest", "missing", "extra", "keys"])
def test_corrupt_backup_is_refused_by_checksum(home, tmp_path, damage):
    b = tmp_path / "b"
    backup(home, b)
    named = {
        "catalog": "catalog.db", "index": "indexes/towers/image.faiss", "bm25": "indexes/towers/bm25.json",
        "keys": "api_keys.json", "missing": "indexes/towers/text.faiss", "extra": "indexes/towers/planted.faiss",
        "manifest": MANIFEST,
    }[damage]  # fmt: skip
    if damage == "missing":
        (b / named).unlink()
    elif damage == "extra":
        (b / named).write_bytes(b"\0" * 64)
    elif damage == "manifest":
        man = json.loads((b / MANIFEST).read_text())
        man["generations"]["towers"]["image"] += 1
        (b / MANIFEST).write_text(json.dumps(man))
    else:
        _flip(b / named)
    with pytest.raises(BackupCorrupt) as e:
        verify_backup(b)
    assert named in str(e.value) or (damage == "manifest" and "checksum" in str(e.value))
    target = tmp_path / "restored"
    r = runner.invoke(app, ["restore", str(b), "--home", str(target)])
    assert r.exit_code == 2 and named.split("/")[-1] in r.output and "restore another backup" in r.output, r.output
    assert not target.exists() and not list(tmp_path.glob(".restored.restoring-*"))  # nothing half restored


WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from conftest import make_slice
    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths
    from medsearch.encoders.registry import load_encoder

    home, work, medpix = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    batches = json.loads((work / "batches.json").read_text())
    enc = load_encoder("towers", device="cpu")
    cat = Catalog.open(home / "catalog.db")
    for i, ids in enumerate(batches):
        if (work / "stop").exists():
            break
        ingest_path(cat, make_slice(work / f"b{i}" / "medpix-more", medpix, case_ids=set(ids)), source="medpix-more")
        (work / "ingested").write_text(str(i + 1))
        run_index(cat, enc, Paths(home), config=EmbedConfig(batch_size=8, workers=0), progress=False)
        (work / "cycles").write_text(str(i + 1))
    cat.close()
    """
)


def _train_batches(n_batches: int, per: int) -> list[list[str]]:
    ids = []
    with open(MEDPIX / "reports.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == "train" and r["images"]:
                ids.append(r["id"])
            if len(ids) >= n_batches * per:
                break
    return [ids[i : i + per] for i in range(0, len(ids), per)]


def test_backup_while_another_process_ingests_and_indexes(home, tmp_path):
    work = tmp_path / "writer"
    work.mkdir()
    batches = _train_batches(5, 2)
    (work / "batches.json").write_text(json.dumps(batches))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(home), str(work), str(MEDPIX), str(REPO / "tests")],
                            cwd=str(REPO), stderr=subprocess.PIPE, text=True)  # fmt: skip
    taken: list[tuple[Path, dict]] = []
    try:
        deadline = time.time() + 300
        while not (work / "ingested").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the writer never ingested"
            time.sleep(0.2)
        while len(taken) < 16 and proc.poll() is None and time.time() < deadline:  # until the writer is done
            dest = tmp_path / f"b{len(taken)}"
            taken.append((dest, backup(home, dest)))
            time.sleep(1.0)
    finally:
        (work / "stop").write_text("1")
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert len(taken) >= 3, "too few backups overlapped the writer"
    print("backups:", [(d.name, o["seconds"], o["consistent_as_copied"]) for d, o in taken])
    per_case = _images_per_case(batches)
    seen_cases = []
    for dest, out in taken:
        target = tmp_path / f"restored-{dest.name}"
        rep = restore(dest, target)
        assert rep["check"]["ok"], (out, rep)
        r = runner.invoke(app, ["check", "--home", str(target)])
        assert r.exit_code == 0, r.output
        cat = Catalog.open(target / "catalog.db", create=False)
        try:
            rows = cat.db.execute(
                "SELECT c.key, count(i.id) FROM cases c LEFT JOIN images i ON i.case_id = c.id "
                "WHERE c.source = 'medpix-more' GROUP BY c.id"
            ).fetchall()
        finally:
            cat.close()
        got = {k: n for k, n in rows}
        for ids in batches:  # one ingest transaction per batch: all of it or none of it
            present = [c for c in ids if c in got]
            assert present in ([], ids), (dest.name, ids, got)
            for c in present:
                assert got[c] == per_case[c]
        seen_cases.append(len(got))
    assert seen_cases == sorted(seen_cases) and seen_cases[-1] > seen_cases[0], seen_cases  # the writer moved on
    assert check(home)["ok"]  # the live home, after the writer's last index run


def _images_per_case(batches: list[list[str]]) -> dict[str, int]:
    want = {c for b in batches for c in b}
    out: dict[str, int] = {}
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["case_id"] in want:
                out[r["case_id"]] = out.get(r["case_id"], 0) + 1
    return out


def test_backup_rebuilds_a_stale_index_in_the_copy(home, tmp_path):
    """Vectors committed but not yet indexed (a writer between embed and index): the copy is made consistent."""
    cat = Catalog.open(home / "catalog.db", create=False)
    try:
        with cat.atomic():
            victim = cat.db.execute("SELECT max(item_id) FROM vectors WHERE space = 'image'").fetchone()[0]
            cat.db.execute("DELETE FROM vectors WHERE space = 'image' AND item_id = ?", [victim])
    finally:
        cat.close()
    assert not check(home)["ok"]
    out = backup(home, tmp_path / "b")
    assert not out["consistent_as_copied"] and any("image index" in r for r in out["repaired"])
    verify_backup(tmp_path / "b")
    assert restore(tmp_path / "b", tmp_path / "r")["check"]["ok"]
    assert not check(home)["ok"]  # the live home is left as it was for `medsearch check --repair`


CHILD = textwrap.dedent(
    r'''
    import hashlib, json, os, sys
    from pathlib import Path
    from medsearch.backup import backup, restore
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.consistency import check_home
    from medsearch.errors import StorageError

    home, root = Path(sys.argv[1]), Path(sys.argv[2])
    PAGE = os.statvfs(root).f_frsize

    def digest():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(home.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    def ok():
        cat = Catalog.open(home / "catalog.db", create=False)
        try:
            return check_home(cat, Paths(home))["ok"]
        finally:
            cat.close()

    def fill(free_pages):
        filler = root / "filler"
        with open(filler, "ab", buffering=0) as f:
            try:
                while f.write(b"\0" * PAGE):
                    pass
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size // PAGE - free_pages) * PAGE)

    before = digest()
    need = sum(p.stat().st_size for p in home.rglob("*") if p.is_file()) // PAGE + 8
    results = []
    for free in sorted({0, 1, need // 8, need // 4, need // 2, (3 * need) // 4, need - 10}):
        fill(free)
        try:
            backup(home, root / "b")
            results.append({"free": free, "saved": True})
            os.system(f"rm -rf {root / 'b'}")
        except StorageError as e:
            left = sorted(p.name for p in root.iterdir() if p.name != "filler")
            results.append({"free": free, "saved": False, "error": e.message, "hint": e.hint, "left": left,
                            "home_same": digest() == before, "home_ok": ok()})
        (root / "filler").unlink()
    out = backup(home, root / "b")  # enough space: a complete backup
    fill(4)
    try:
        restore(root / "b", root / "r")
        restored = "saved"
    except StorageError as e:
        restored = {"error": e.message, "left": sorted(p.name for p in root.iterdir() if p.name not in ("filler", "b"))}
    print(json.dumps({"results": results, "final": out["files"], "restore_full": restored}))
    '''
)


def test_full_disk_during_backup_leaves_the_home_serving(home, tmp_path):
    ns = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [*ns, "sh", "-c", 'mount -t tmpfs -o size=2m tmpfs "$1" && exec "$2" "$3" "$4" "$1"', "sh", str(mnt),
           sys.executable, str(script), str(home)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    if r.returncode != 0 and ("mount" in r.stderr or "unshare" in r.stderr) and "Traceback" not in r.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    failed = [o for o in res["results"] if not o["saved"]]
    assert len(failed) >= 4, res
    for o in failed:  # a named error, nothing left behind, the home byte for byte and consistent
        assert "No space left on device" in o["error"] or "disk is full" in o["error"], o
        assert "free disk space" in o["hint"] and o["left"] == [] and o["home_same"] and o["home_ok"], o
    assert res["final"] > 5
    assert isinstance(res["restore_full"], dict) and res["restore_full"]["left"] == [], res["restore_full"]


def test_a_killed_backup_leaves_nothing_and_the_next_one_cleans_up(home, tmp_path):
    big = home / "models" / "lite" / "model.safetensors"  # a large file keeps the backup busy long enough
    big.parent.mkdir(parents=True, exist_ok=True)
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 96)
    before = tree_digest(home)
    dest = tmp_path / "b"
    code = f"from medsearch.backup import backup; backup({str(home)!r}, {str(dest)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.partial-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the backup finished before it could be killed")
    assert not dest.exists() and list(tmp_path.glob(".b.partial-*"))  # a hidden partial folder, no backup
    assert tree_digest(home) == before and check(home)["ok"]
    out = backup(home, dest)
    assert out["files"] > 5 and not list(tmp_path.glob(".b.partial-*"))
    verify_backup(dest)
    assert restore(dest, tmp_path / "r")["check"]["ok"]
