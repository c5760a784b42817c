"""Crash-safety harness: SIGKILL ``medsearch ingest`` + ``medsearch index`` at seeded random moments.

    .venv/bin/python tests/crash_harness.py --kills 50 --seed 0     # the full run; prints a tally
    tests/test_crash.py                                              # a short seeded subset (slow)

The data is real: a slice of medpix-2.0 and of covid-chestxray from ../shared/datasets,
symlinked (never copied) into a temporary dataset folder. The pipeline

    medsearch ingest medpix-2.0 -> medsearch ingest covid-chestxray -> medsearch index --model towers

runs as real subprocesses, each in its own process group. One uninterrupted run first builds
the reference home (it must pass the same final checks) and measures the pipeline's length T.
Each round then starts from an empty home; every attempt reruns the whole pipeline (every step
is idempotent) and a kill point draws t ~ U(0, T) and SIGKILLs the running step's process group
at t. After a kill the harness checks what must hold at every instant (SQLite integrity, no
phantom or duplicate rows, no committed row lost, no orphan vectors, every index on disk
either loadable or marked for rebuild); after at most ``kills_per_round`` kills the round runs
to the end and the finished home is checked: the same rows as the reference by natural key,
exactly one vector per image and text and equal to the reference's, FAISS ntotal == stored
count and the same ids for every index, manifests that match their files, the BM25 manifest
that matches the texts, no temp files left, and ``medsearch check`` says ok.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATASETS = REPO.parent / "shared" / "datasets"
MODEL = "towers"
SPACES = ("image", "text")


# ---------------------------------------------------------------------------- data and pipeline
def make_data(root: Path, n_medpix: int, n_covid: int) -> list[Path]:
    """Two JSONL dataset folders named like their sources, images symlinked from ../shared."""
    sys.path.insert(0, str(TESTS))
    from conftest import make_slice

    medpix = make_slice(root / "medpix-2.0", DATASETS / "medpix-2.0", n_cases=n_medpix, splits=("dev",))
    covid = make_slice(root / "covid-chestxray", DATASETS / "covid-chestxray", n_cases=n_covid)
    return [medpix, covid]


def medsearch_exe() -> str:
    exe = Path(sys.executable).parent / "medsearch"
    if not exe.exists():
        raise SystemExit(f"no medsearch console script beside {sys.executable}; run `pip install -e .` first")
    return str(exe)


def pipeline(datasets: list[Path], commit_every: int, chunk: int) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = [(f"ingest {d.name}", ["ingest", str(d), "-q"]) for d in datasets]
    steps = [(n, [*argv[:2], "--chunk", str(chunk), *argv[2:]]) for n, argv in steps]
    steps.append(("index", ["index", "--model", MODEL, "--workers", "0", "--batch-size", "8",
                            "--commit-every", str(commit_every), "-q"]))  # fmt: skip
    return steps


_SRC: Path | None = None  # a snapshot of the packages the children import (see snapshot_source)


def snapshot_source(dst: Path) -> Path:
    """Copy medsearch/, indexer/, cli/, api/ so that edits made to the working tree during a long
    run cannot change the code under test halfway (children get it first on PYTHONPATH)."""
    import shutil

    global _SRC
    for pkg in ("medsearch", "indexer", "cli", "api"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    _SRC = dst
    return dst


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEARCH_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if _SRC is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(_SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


@dataclass
class Attempt:
    killed: bool
    step: str | None = None  # the step that was running when killed
    at: float = 0.0  # seconds since the attempt started
    into_step: float = 0.0  # seconds since the killed step started
    failed: str | None = None  # a step that exited non-zero on its own: a bug
    writes: int = 0  # catalog writes seen during the attempt
    mode: str | None = None


@dataclass(frozen=True)
class KillPlan:
    """When to SIGKILL: ``time`` (``at`` s after the attempt started), ``write`` (``delay`` s after
    the ``nth`` catalog write seen), ``save`` (``delay`` s after a temp file appears in the index folder)."""

    mode: str
    at: float = 0.0
    nth: int = 0
    delay: float = 0.0


class Watch:
    """Observes a home from outside the process: catalog commits and index temp files, by polling."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.writes = 0
        self.last_write = 0.0
        self.tmp_seen: float | None = None
        self._state: tuple = ()

    def poll(self) -> None:
        state = []
        for name in ("catalog.db", "catalog.db-wal"):
            try:
                st = os.stat(self.home / name)
                state.append((st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                state.append(None)
        state = tuple(state)
        if state != self._state:
            if self._state and any(state):
                self.writes += 1
                self.last_write = time.monotonic()
            self._state = state
        if self.tmp_seen is None and (self.home / "indexes").is_dir():
            for d in os.scandir(self.home / "indexes"):
                if d.is_dir() and any(e.name.endswith(".tmp") for e in os.scandir(d.path)):
                    self.tmp_seen = time.monotonic()
                    break

    def due(self, plan: KillPlan, t0: float) -> bool:
        now = time.monotonic()
        if plan.mode == "time":
            return now - t0 >= plan.at
        if plan.mode == "write":
            return self.writes >= plan.nth and now - self.last_write >= plan.delay
        return self.tmp_seen is not None and now - self.tmp_seen >= plan.delay


def run_attempt(steps, home: Path, plan: KillPlan | None, log: Path, poll_s: float = 0.002) -> Attempt:
    """Run the steps in order; SIGKILL the running step's process group when ``plan`` says so."""
    exe, env = medsearch_exe(), child_env()
    watch = Watch(home)
    t0 = time.monotonic()
    for name, argv in steps:
        ts = time.monotonic()
        with open(log, "ab") as out:
            out.write(f"\n$ medsearch {' '.join(argv)}\n".encode())
            out.flush()
            p = subprocess.Popen([exe, *argv, "--home", str(home)], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=str(REPO), start_new_session=True)  # fmt: skip
            try:
                while (rc := p.poll()) is None:
                    watch.poll()
                    if plan is not None and watch.due(plan, t0):
                        os.killpg(p.pid, signal.SIGKILL)  # the group holds only this step's processes
                        p.wait()
                        now = time.monotonic()
                        return Attempt(True, name, now - t0, now - ts, writes=watch.writes, mode=plan.mode)
                    time.sleep(poll_s)
            finally:  # the harness itself interrupted: leave no child running
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        watch.poll()
        if rc != 0:
            return Attempt(False, name, time.monotonic() - t0, failed=f"{name} exited {rc}; see {log}")
    return Attempt(False, at=time.monotonic() - t0, writes=watch.writes)


def draw_plan(rng: random.Random, span: float, writes: int) -> KillPlan:
    """40% a uniform moment, 40% just after a random catalog commit, 20% during an index save."""
    r = rng.random()
    if r < 0.4:
        return KillPlan("time", at=rng.uniform(0.0, span))
    if r < 0.8:
        return KillPlan("write", nth=rng.randint(1, max(1, writes)), delay=rng.uniform(0.0, 0.05))
    return KillPlan("save", delay=rng.uniform(0.0, 0.02))


# ---------------------------------------------------------------------------- catalog views
def connect(db: Path) -> sqlite3.Connection:
    """A read-write connection, as the next medsearch run would open it (recovers the WAL)."""
    con = sqlite3.connect(str(db), timeout=30)
    con.execute("PRAGMA foreign_keys=ON")
    return con


def dump(con: sqlite3.Connection) -> dict[str, Counter]:
    """Every stored row by natural key (no row ids, no timestamps), as multisets."""
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


def index_state(home: Path, con: sqlite3.Connection, *, final: bool) -> list[str]:
    """Each index on disk is loadable and matches its manifest, or the next `index` run rebuilds it."""
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
        unresolved = [i for i in ids.tolist() if not con.execute(f"SELECT 1 FROM {table} WHERE id = ?", [i]).fetchone()]
        if unresolved:
            problems.append(f"{len(unresolved)} {space} index ids resolve to no {table} row")
    return problems


def final_checks(home: Path, ref: dict[str, Counter], ref_vecs: dict[str, dict[tuple, np.ndarray]]) -> list[str]:
    """The finished home equals the uninterrupted reference; vectors, indexes and manifests agree."""
    problems: list[str] = []
    con = connect(home / "catalog.db")
    try:
        got = dump(con)
        for table in ref:
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
        for space in SPACES:
            if set(vecs[space]) != set(ref_vecs[space]):
                problems.append(f"{space} vectors: {len(set(ref_vecs[space]) - set(vecs[space]))} missing, "
                                f"{len(set(vecs[space]) - set(ref_vecs[space]))} unexpected")  # fmt: skip
                continue
            worst = min((_cos(v, ref_vecs[space][k]) for k, v in vecs[space].items()), default=1.0)
            if worst < 0.995:  # a vector stored under another row's id, or a stale one
                problems.append(f"{space} vectors differ from the uninterrupted run (min cosine {worst:.4f})")
        problems += index_state(home, con, final=True)
        weights = (con.execute("SELECT value FROM meta WHERE key = ?", [f"weights:{MODEL}"]).fetchone() or [None])[0]
        problems += manifest_checks(home, con, weights)
    finally:
        con.close()
    r = subprocess.run([medsearch_exe(), "check", "--home", str(home), "--json"], capture_output=True, text=True,
                       env=child_env(), cwd=str(REPO), timeout=300)  # fmt: skip
    try:
        rep = json.loads(r.stdout)
        if r.returncode != 0 or not rep["ok"] or rep["problems"]:
            problems.append(f"medsearch check: rc {r.returncode}, problems {rep['problems']}")
    except (ValueError, KeyError):
        problems.append(f"medsearch check printed no report (rc {r.returncode}): {r.stderr[-300:]}")
    leftovers = [p.name for p in (home / "indexes").rglob("*.tmp")] if (home / "indexes").exists() else []
    if leftovers:
        problems.append(f"temporary files left in the index folder: {leftovers[:5]}")
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


# ---------------------------------------------------------------------------- the run
@dataclass
class Tally:
    kill_points: int = 0
    survived: int = 0  # kill points after which every invariant held
    rounds: int = 0
    rounds_ok: int = 0
    by_step: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    span: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"kill_points": self.kill_points, "survived": self.survived, "rounds": self.rounds,
                "rounds_ok": self.rounds_ok, "kills_by_step": dict(self.by_step), "problems": self.problems,
                "seconds": round(self.seconds, 1), "span_s": round(self.span, 1),
                "kills": self.kills}  # fmt: skip


def crash_run(work: Path, *, kills: int, seed: int, n_medpix: int = 4, n_covid: int = 6, kills_per_round: int = 4,
              commit_every: int = 16, chunk: int = 8, snapshot: bool = True, echo=print) -> Tally:  # fmt: skip
    """Run rounds until ``kills`` kill points were made; returns the tally."""
    t_start = time.monotonic()
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    if snapshot:
        snapshot_source(work / "src")
    steps = pipeline(make_data(work / "data", n_medpix, n_covid), commit_every, chunk)
    tally = Tally()
    ref_home = work / "reference"
    first = run_attempt(steps, ref_home, None, work / "reference.log")  # uninterrupted
    if first.failed:
        raise RuntimeError(f"the uninterrupted reference run failed: {first.failed}")
    span = tally.span = first.at
    ref_writes = first.writes
    con = connect(ref_home / "catalog.db")
    ref, ref_vecs = dump(con), natural_vectors(con, MODEL)
    con.close()
    if bad := final_checks(ref_home, ref, ref_vecs):
        raise RuntimeError(f"the uninterrupted reference run is not consistent: {bad}")
    echo(f"reference run: {span:.1f}s, {ref_writes} catalog writes, {sum(ref['cases'].values())} cases, {sum(ref['images'].values())} images, "
         f"{sum(ref['texts'].values())} texts")  # fmt: skip
    while tally.kill_points < kills:
        tally.rounds += 1
        home = work / f"round-{tally.rounds:03d}"
        log = work / f"round-{tally.rounds:03d}.log"
        prev: dict[str, int] | None = None
        round_problems: list[str] = []
        n_round = 0
        while True:
            plan = draw_plan(rng, span, ref_writes) if n_round < kills_per_round and tally.kill_points < kills else None
            a = run_attempt(steps, home, plan, log)
            if a.failed:
                round_problems.append(a.failed)
                break
            if not a.killed:
                break
            n_round += 1
            tally.kill_points += 1
            tally.by_step[f"{a.step} ({a.mode})"] += 1
            problems, counts = always_invariants(home, ref, prev)
            prev = counts or prev
            if not problems:
                tally.survived += 1
            round_problems += [f"after kill {tally.kill_points} ({a.step} +{a.into_step:.2f}s): {p}" for p in problems]
            tally.kills.append({"round": tally.rounds, "step": a.step, "mode": a.mode, "into_step_s": round(a.into_step, 3),
                                "counts": counts, "ok": not problems})  # fmt: skip
            echo(f"kill {tally.kill_points:>3}: round {tally.rounds} {a.mode:<5} {a.step:<24} +{a.into_step:6.2f}s  "
                 f"{counts}  {'ok' if not problems else 'PROBLEM'}")  # fmt: skip
        if not round_problems:
            round_problems = final_checks(home, ref, ref_vecs)
        if round_problems:
            tally.problems += [f"round {tally.rounds}: {p}" for p in round_problems]
            for p in round_problems:
                echo(f"  round {tally.rounds}: {p}")
        else:
            tally.rounds_ok += 1
            echo(f"round {tally.rounds}: complete and consistent after {n_round} kills")
    tally.seconds = time.monotonic() - t_start
    return tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50, help="kill points to make (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--medpix", type=int, default=4, help="medpix-2.0 dev cases in the slice")
    ap.add_argument("--covid", type=int, default=6, help="covid-chestxray cases in the slice")
    ap.add_argument("--kills-per-round", type=int, default=4)
    ap.add_argument("--commit-every", type=int, default=16, help="vectors per commit in `medsearch index`")
    ap.add_argument("--chunk", type=int, default=8, help="items per transaction in `medsearch ingest`")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder, kept)")
    ap.add_argument("--json", action="store_true", help="print the tally as JSON")
    ap.add_argument("--no-snapshot", action="store_true", help="run the live working tree, not a copy")
    a = ap.parse_args(argv)
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup that kills the child

    work = a.work or Path(tempfile.mkdtemp(prefix="medsearch-crash-"))
    tally = crash_run(work, kills=a.kills, seed=a.seed, n_medpix=a.medpix, n_covid=a.covid,
                      kills_per_round=a.kills_per_round, commit_every=a.commit_every, chunk=a.chunk,
                      snapshot=not a.no_snapshot)  # fmt: skip
    if a.json:
        print(json.dumps(tally.to_dict(), indent=2))
    print(f"\nkill points: {tally.kill_points}, survived with nothing lost, duplicated or phantom: {tally.survived}; "
          f"rounds complete and consistent: {tally.rounds_ok}/{tally.rounds}; by step: {dict(tally.by_step)}; "
          f"{tally.seconds:.0f}s (work folder {work})")  # fmt: skip
    for p in tally.problems:
        print(f"PROBLEM {p}")
    return 0 if not tally.problems and tally.survived == tally.kill_points else 1


if __name__ == "__main__":
    sys.exit(main())
