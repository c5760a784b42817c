"""What the crash harness checks: catalog views by natural key, what must hold right after any
SIGKILL (``always_invariants``, ``writer_invariants``) and what a finished home must equal
(``final_checks``): the uninterrupted reference's rows and vectors, every index == the catalog
(FAISS ids and vectors, or the Milvus collection's ids), manifests that match their files, no
temp files, and ``medsearch check`` ok.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from crash_proc import REPO, run_cli, temp_files

MODEL = "towers"
SPACES = ("image", "text")


# ---------------------------------------------------------------------------- catalog views
def connect(db: Path) -> sqlite3.Connection:
    """A read-write connection, as the next medsearch run would open it (recovers the WAL)."""
    con = sqlite3.connect(str(db), timeout=30)
    con.execute("PRAGMA foreign_keys=ON")
    return con


def dump(con: sqlite3.Connection, home: Path | None = None) -> dict[str, Counter]:
    """Every stored row by natural key (no row ids, no timestamps), as multisets. Image paths inside
    ``home`` (display PNGs of received DICOM) are written relative to it, so two homes compare."""
    cases = Counter(con.execute(
        "SELECT source, key, split, patient_key, title, diagnosis, category, sections, labels, meta, content_hash "
        "FROM cases").fetchall())  # fmt: skip
    images = Counter(con.execute(
        "SELECT i.source, i.key, c.key, i.path, i.frame, i.sha256, i.bytes, i.width, i.height, i.split, "
        "i.modality_type, i.modality, i.plane, i.body_region, i.caption, i.labels, i.meta, i.status "
        "FROM images i JOIN cases c ON c.id = i.case_id").fetchall())  # fmt: skip
    texts = Counter(con.execute(
        "SELECT c.source, c.key, i.key, t.section, t.kind, t.seq, t.text FROM texts t "
        "JOIN cases c ON c.id = t.case_id LEFT JOIN images i ON i.id = t.image_id").fetchall())  # fmt: skip
    labels = Counter(con.execute(
        "SELECT c.source, c.key, i.key, l.name, l.value FROM labels l JOIN cases c ON c.id = l.case_id "
        "LEFT JOIN images i ON i.id = l.image_id").fetchall())  # fmt: skip
    if home is not None:
        prefixes = {str(home), str(Path(home).resolve())}

        def rel(p: str) -> str:
            for pre in prefixes:
                if p and p.startswith(pre + "/"):
                    return "$HOME" + p[len(pre) :]
            return p

        images = Counter({(*r[:3], rel(r[3]), *r[4:]): n for r, n in images.items()})
    return {"cases": cases, "images": images, "texts": texts, "labels": labels}


def natural_vectors(con: sqlite3.Connection, model: str) -> dict[str, dict[tuple, np.ndarray]]:
    """Stored vectors keyed by their row's natural key (float32)."""
    out: dict[str, dict[tuple, np.ndarray]] = {"image": {}, "text": {}}
    for src, key, blob in con.execute(
        "SELECT i.source, i.key, v.vec FROM vectors v JOIN images i ON i.id = v.item_id "
        "WHERE v.model = ? AND v.space = 'image'", [model]):  # fmt: skip
        out["image"][(src, key)] = np.frombuffer(blob, np.float16).astype(np.float32)
    for src, ckey, ikey, sec, kind, seq, text, blob in con.execute(
        "SELECT c.source, c.key, i.key, t.section, t.kind, t.seq, t.text, v.vec FROM vectors v "
        "JOIN texts t ON t.id = v.item_id JOIN cases c ON c.id = t.case_id LEFT JOIN images i ON i.id = t.image_id "
        "WHERE v.model = ? AND v.space = 'text'", [model]):  # fmt: skip
        out["text"][(src, ckey, ikey, sec, kind, seq, text)] = np.frombuffer(blob, np.float16).astype(np.float32)
    return out


def table_counts(con: sqlite3.Connection) -> dict[str, int]:
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("cases", "images", "texts", "labels", "vectors")}  # fmt: skip


# ---------------------------------------------------------------------------- invariants
def always_invariants(
    home: Path, ref: dict[str, Counter], prev: dict[str, int] | None
) -> tuple[list[str], dict[str, int]]:
    """What must hold at any instant, even right after a SIGKILL. Returns (problems, counts)."""
    problems: list[str] = []
    db = home / "catalog.db"
    if not db.exists():
        return problems, {}
    con = connect(db)
    try:
        if (r := con.execute("PRAGMA integrity_check").fetchone()[0]) != "ok":
            problems.append(f"integrity_check: {r}")
        if fk := con.execute("PRAGMA foreign_key_check").fetchall():
            problems.append(f"foreign key violations: {fk[:5]}")
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'vectors'").fetchone():
            return problems, {}  # killed while the schema was being created
        got = dump(con)
        for table, rows in got.items():
            dup = [r for r, n in rows.items() if n > 1]
            if dup:
                problems.append(f"{len(dup)} duplicated {table} rows, e.g. {dup[0][:4]}")
            phantom = rows - ref[table]
            if phantom:
                problems.append(
                    f"{sum(phantom.values())} phantom {table} rows (not in the input), e.g. {next(iter(phantom))[:4]}"
                )
        for space, table in (("image", "images"), ("text", "texts")):
            n = con.execute(f"SELECT count(*) FROM vectors v WHERE v.space = ? AND NOT EXISTS "
                            f"(SELECT 1 FROM {table} t WHERE t.id = v.item_id)", [space]).fetchone()[0]  # fmt: skip
            if n:
                problems.append(f"{n} orphan {space} vectors")
        counts = table_counts(con)
        if prev:
            lost = {t: (prev[t], n) for t, n in counts.items() if n < prev.get(t, 0)}
            if lost:
                problems.append(f"committed rows lost after a restart: {lost}")
        problems += index_state(home, con, final=False)
    finally:
        con.close()
    return problems, counts


def store_of(mpath: Path) -> str:
    try:
        return str(json.loads(mpath.read_text()).get("store") or "faiss")
    except (OSError, ValueError, AttributeError):
        return "faiss"


def index_state(home: Path, con: sqlite3.Connection, *, final: bool, allow_unresolved: frozenset[int] = frozenset(),
                ) -> list[str]:  # fmt: skip
    """Each index on disk is loadable and matches its manifest, or the next `index` run rebuilds it.
    ``allow_unresolved``: ids an unfinished erasure still has to purge from the index (rows gone first)."""
    sys.path.insert(0, str(REPO))
    from medsearch.config import Paths
    from medsearch.errors import MedsearchError
    from medsearch.stores.faiss import VectorIndex, read_manifest

    problems: list[str] = []
    d = Paths(home).index_dir(MODEL)
    for space in SPACES:
        stored = con.execute("SELECT count(*) FROM vectors WHERE model = ? AND space = ?", [MODEL, space]).fetchone()[0]
        dirty = (con.execute("SELECT value FROM meta WHERE key = ?", [f"dirty:{MODEL}:{space}"]).fetchone() or [None])[
            0
        ]
        mpath = d / f"{space}.json"
        if not mpath.exists():
            if final and stored:
                problems.append(f"no {space} index although {stored} vectors are stored")
            continue
        if store_of(mpath) == "milvus":
            if final:
                problems += milvus_state(home, con, mpath, space)
            continue  # mid-sync a collection may lag: the next `index` syncs it from the catalog
        try:
            idx = VectorIndex.load(d, space, model_id=MODEL)
        except MedsearchError as e:
            pending = dirty == "1" or read_manifest(mpath).count != stored
            if final or not pending:
                problems.append(f"{space} index unusable and not marked for rebuild: {e.message}")
            continue
        import faiss

        ids = np.sort(faiss.vector_to_array(idx.index.id_map))
        if final or (dirty != "1" and idx.ntotal == stored):
            stored_ids = np.array([r[0] for r in con.execute(
                "SELECT item_id FROM vectors WHERE model = ? AND space = ? ORDER BY item_id", [MODEL, space])], np.int64)  # fmt: skip
            if idx.ntotal != stored or not np.array_equal(ids, stored_ids):
                problems.append(f"{space} index: ntotal {idx.ntotal}, stored {stored}, "
                                f"{len(np.setdiff1d(ids, stored_ids))} ids without a stored vector")  # fmt: skip
            else:  # the index holds exactly the stored vectors
                sample = stored_ids[:: max(1, len(stored_ids) // 16)]
                for i in sample.tolist():
                    blob = con.execute("SELECT vec FROM vectors WHERE model = ? AND space = ? AND item_id = ?",
                                       [MODEL, space, i]).fetchone()[0]  # fmt: skip
                    if not np.allclose(
                        idx.reconstruct(i), np.frombuffer(blob, np.float16).astype(np.float32), atol=1e-3
                    ):
                        problems.append(f"{space} index vector {i} differs from the stored one")
                        break
        table = "images" if space == "image" else "texts"
        unresolved = [
            i
            for i in ids.tolist()
            if i not in allow_unresolved and not con.execute(f"SELECT 1 FROM {table} WHERE id = ?", [i]).fetchone()
        ]
        if unresolved:
            problems.append(f"{len(unresolved)} {space} index ids resolve to no {table} row")
    return problems


def final_checks(home: Path, ref: dict[str, Counter], ref_vecs: dict[str, dict[tuple, np.ndarray]], *,
                 tmp_roots: tuple[Path, ...] = ()) -> list[str]:  # fmt: skip
    """The finished home equals the uninterrupted reference; vectors, indexes and manifests agree;
    no temp file is left in the home (or in ``tmp_roots``); ``medsearch check`` says ok."""
    problems: list[str] = []
    con = connect(home / "catalog.db")
    try:
        got = dump(con, home)
        for table in got:  # (``ref`` may also hold the vectors' keys: compared below, with their values)
            if got[table] != ref[table]:
                missing, extra = ref[table] - got[table], got[table] - ref[table]
                problems.append(f"{table}: {sum(missing.values())} missing, {sum(extra.values())} extra/duplicated")
        ok_images = con.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
        vecs = natural_vectors(con, MODEL)
        n_texts = con.execute("SELECT count(*) FROM texts").fetchone()[0]
        if len(vecs["image"]) != ok_images:
            problems.append(f"{len(vecs['image'])} image vectors for {ok_images} images")
        if len(vecs["text"]) != n_texts:
            problems.append(f"{len(vecs['text'])} text vectors for {n_texts} texts")
        problems += compare_vectors(vecs, ref_vecs)
        problems += index_state(home, con, final=True)
        weights = (con.execute("SELECT value FROM meta WHERE key = ?", [f"weights:{MODEL}"]).fetchone() or [None])[0]
        problems += manifest_checks(home, con, weights)
    finally:
        con.close()
    problems += check_ok(home)
    leftovers = temp_files(home, *tmp_roots)
    if leftovers:
        problems.append(f"temporary files left behind: {[str(p) for p in leftovers[:5]]}")
    return problems


def compare_vectors(
    vecs: dict[str, dict[tuple, np.ndarray]], ref_vecs: dict[str, dict[tuple, np.ndarray]]
) -> list[str]:
    problems: list[str] = []
    for space in SPACES:
        if set(vecs[space]) != set(ref_vecs[space]):
            problems.append(f"{space} vectors: {len(set(ref_vecs[space]) - set(vecs[space]))} missing, "
                            f"{len(set(vecs[space]) - set(ref_vecs[space]))} unexpected")  # fmt: skip
            continue
        worst = min((_cos(v, ref_vecs[space][k]) for k, v in vecs[space].items()), default=1.0)
        if worst < 0.995:  # a vector stored under another row's id, or a stale one
            problems.append(f"{space} vectors differ from the uninterrupted run (min cosine {worst:.4f})")
    return problems


def check_ok(home: Path) -> list[str]:
    """`medsearch check --json` on ``home`` passes (a real subprocess, as an operator runs it)."""
    r = run_cli(["check", "--home", str(home), "--json"], timeout=300)
    try:
        rep = json.loads(r.stdout)
        if r.returncode != 0 or not rep["ok"] or rep["problems"]:
            return [f"medsearch check: rc {r.returncode}, problems {rep['problems']}"]
    except (ValueError, KeyError):
        return [f"medsearch check printed no report (rc {r.returncode}): {r.stderr[-300:]}"]
    return []


_MILVUS_ROWS = """
import json, sys
from pymilvus import MilvusClient
client = MilvusClient(sys.argv[1])
client.load_collection(sys.argv[2])  # a fresh server holds it released
rows = client.query(sys.argv[2], filter="id >= 0", output_fields=["id", "vec"], limit=16384)
print(json.dumps([[int(r["id"]), [float(x) for x in r["vec"]]] for r in rows]))
"""


def milvus_state(home: Path, con: sqlite3.Connection, mpath: Path, space: str) -> list[str]:
    """The Milvus collection a manifest names holds exactly the stored ids, with the stored vectors.
    Read by a child process: Milvus Lite's server lives as long as the process that opened it, and
    holds the file, so the harness itself must not keep one."""
    import subprocess

    man = json.loads(mpath.read_text())
    uri = str(man["params"].get("uri") or home / "milvus.db")
    r = subprocess.run([sys.executable, "-c", _MILVUS_ROWS, uri, man["params"]["collection"]], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    if r.returncode != 0:
        return [f"cannot read the Milvus {space} collection: {r.stderr[-300:]}"]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    got = {i: np.asarray(v, np.float32) for i, v in rows}
    stored = {i: np.frombuffer(b, np.float16).astype(np.float32) for i, b in con.execute(
        "SELECT item_id, vec FROM vectors WHERE model = ? AND space = ?", [MODEL, space])}  # fmt: skip
    problems = []
    if len(rows) != len(got) or set(got) != set(stored) or man["count"] != len(stored):
        problems.append(f"Milvus {space} collection: {len(rows)} rows, {len(set(got) - set(stored))} ids without a "
                        f"stored vector, {len(set(stored) - set(got))} stored vectors missing; manifest {man['count']}")  # fmt: skip
    elif (worst := min((_cos(v, stored[i]) for i, v in got.items()), default=1.0)) < 0.999:
        problems.append(f"Milvus {space} vectors differ from the stored ones (min cosine {worst:.4f})")
    return problems


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def manifest_checks(home: Path, con: sqlite3.Connection, weights: str | None) -> list[str]:
    import hashlib

    from medsearch.config import Paths
    from medsearch.stores.faiss import read_manifest

    problems: list[str] = []
    d = Paths(home).index_dir(MODEL)
    for space in SPACES:
        if not (d / f"{space}.json").exists():
            continue  # no vectors of this space (index_state says whether that is right)
        if store_of(d / f"{space}.json") == "milvus":
            continue  # milvus_state compared the collection itself
        man = read_manifest(d / f"{space}.json")
        digest = hashlib.sha256((d / f"{space}.faiss").read_bytes()).hexdigest()
        stored = con.execute("SELECT count(*) FROM vectors WHERE model = ? AND space = ?", [MODEL, space]).fetchone()[0]
        dim = con.execute("SELECT DISTINCT dim FROM vectors WHERE model = ? AND space = ?", [MODEL, space]).fetchall()
        if (man.model_id, man.count, man.checksum, man.weights_hash, [(man.dim,)]) != (
            MODEL,
            stored,
            digest,
            weights,
            dim,
        ):
            problems.append(f"{space} manifest does not match: {man}")
        if (con.execute("SELECT value FROM meta WHERE key = ?", [f"dirty:{MODEL}:{space}"]).fetchone() or [None])[
            0
        ] == "1":
            problems.append(f"{space} index still marked dirty after a complete run")
    try:
        from medsearch.bm25 import catalog_docs
        from medsearch.bm25 import read_manifest as bm25_manifest
    except ImportError:  # BM25 not part of this build
        return problems
    man = bm25_manifest(d)
    ids, _, fingerprint = catalog_docs(_CatalogView(con))
    if man and (man.get("fingerprint") != fingerprint or man.get("count") != len(ids)):
        problems.append(f"bm25 manifest {man.get('fingerprint')}/{man.get('count')} != texts {fingerprint}/{len(ids)}")
    return problems


class _CatalogView:
    """Just enough of Catalog for ``medsearch.bm25.catalog_docs``: the catalog's own named query, run on
    the checker's read-only connection (the query reads ``self.db.execute`` only)."""

    from medsearch.catalog.reads import ReadQueries

    texts_of_kinds = ReadQueries.texts_of_kinds

    def __init__(self, con: sqlite3.Connection) -> None:
        self.db = con


def unfinished_erasure_ids(con: sqlite3.Connection) -> frozenset[int]:
    """Row ids an interrupted erasure still has to purge from the derived stores."""
    if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'erasures'").fetchone():
        return frozenset()
    out: set[int] = set()
    for (plan,) in con.execute("SELECT plan FROM erasures WHERE state != 'done'"):
        p = json.loads(plan)
        out.update(p.get("images", []), p.get("texts", []))
    return frozenset(out)


def vector_keys(vecs: dict[str, dict[tuple, np.ndarray]]) -> Counter:
    return Counter((space, k) for space, d in vecs.items() for k in d)


def writer_invariants(home: Path, before: dict[str, Counter], after: dict[str, Counter], *, check_index: bool = True,
                      ) -> list[str]:  # fmt: skip
    """Right after a kill of any writer that goes from the state ``before`` to ``after`` (dumps incl.
    ``vectors`` by natural key): SQLite intact, no duplicated row, no phantom (a row in neither state),
    nothing lost (a row in both states missing), no orphan vector, every index loadable or pending."""
    problems: list[str] = []
    con = connect(home / "catalog.db")
    try:
        if (r := con.execute("PRAGMA integrity_check").fetchone()[0]) != "ok":
            problems.append(f"integrity_check: {r}")
        if fk := con.execute("PRAGMA foreign_key_check").fetchall():
            problems.append(f"foreign key violations: {fk[:5]}")
        got = {**dump(con, home), "vectors": vector_keys(natural_vectors(con, MODEL))}
        for table, rows in got.items():
            if dup := [r for r, n in rows.items() if n > 1]:
                problems.append(f"{len(dup)} duplicated {table} rows, e.g. {dup[0][:4]}")
            if phantom := rows - (before[table] | after[table]):
                problems.append(f"{sum(phantom.values())} phantom {table} rows, e.g. {next(iter(phantom))[:4]}")
            if lost := (before[table] & after[table]) - rows:
                problems.append(f"{sum(lost.values())} {table} rows lost, e.g. {next(iter(lost))[:4]}")
        for space, table in (("image", "images"), ("text", "texts")):
            n = con.execute(f"SELECT count(*) FROM vectors v WHERE v.space = ? AND NOT EXISTS "
                            f"(SELECT 1 FROM {table} t WHERE t.id = v.item_id)", [space]).fetchone()[0]  # fmt: skip
            if n:
                problems.append(f"{n} orphan {space} vectors")
        if check_index:
            problems += index_state(home, con, final=False, allow_unresolved=unfinished_erasure_ids(con))
    finally:
        con.close()
    return problems


def home_state(home: Path) -> dict[str, Counter]:
    """dump() plus the stored vectors' natural keys, for writer_invariants."""
    con = connect(home / "catalog.db")
    try:
        return {**dump(con, home), "vectors": vector_keys(natural_vectors(con, MODEL))}
    finally:
        con.close()


def home_vectors(home: Path) -> dict[str, dict[tuple, np.ndarray]]:
    con = connect(home / "catalog.db")
    try:
        return natural_vectors(con, MODEL)
    finally:
        con.close()
