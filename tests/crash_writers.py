"""The writers of the crash harness besides ingest/index: each one a real `medsearch` subprocess
started on a copy of a prepared home and SIGKILLed at seeded moments.

    train              `medsearch train` (lite, a few steps): feature cache files and the model swap
    listen             `medsearch listen` receiving dcmtk `storescu` pushes: killed mid-push, mid
                       ingest round (spool -> catalog -> index) and while draining on SIGTERM
    remove --case      `medsearch remove --case KEY`: pending record, row deletion, FAISS/BM25 purge
    remove --patient   `medsearch remove --patient KEY` (five cases of one patient)
    milvus             `medsearch index --store milvus` (Milvus Lite; its server dies with the group)
    check --repair     `medsearch check --repair` on a damaged home (a garbled FAISS file, image
                       vectors gone, a stale temp file): rebuild + re-embed
    backup             `medsearch backup DEST`: stage folder, copies, manifest, rename

For each writer one uninterrupted run from the same prepared home is the reference (and gives
the span T). After every kill ``writer_invariants`` must hold (no phantom, duplicated or lost row
between the states before and after the writer; indexes loadable or pending) plus the writer's
own; after the round's rerun the home must equal the reference (``final_checks``) plus the
writer's own end checks (a model equal to the reference's, a backup that verifies and restores,
an erasure logged once, the spool empty, ...).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from crash_checks import (
    MODEL,
    connect,
    final_checks,
    home_state,
    home_vectors,
    writer_invariants,
)
from crash_proc import REPO, Attempt, KillPlan, Watch, child_env, kill_group, medsearch_exe, run_attempt, run_cli


@dataclass
class Reference:
    before: dict[str, Counter]
    after: dict[str, Counter]
    vecs: dict[str, dict[tuple, np.ndarray]]
    span: float  # seconds of the uninterrupted run
    first: float  # seconds to its first catalog write or temp file (start-up before it)
    writes: int
    saves: bool  # it wrote temp files
    home: Path


class Writer:
    """A writer run as `medsearch` steps on a copy of ``base``; subclasses add their own checks."""

    name = "writer"
    weight = 1.0  # share of the kills
    check_index = True  # indexes must be loadable or pending right after a kill

    def __init__(self, work: Path, base: Path) -> None:
        self.work = work / re.sub(r"[^a-z0-9]+", "-", self.name).strip("-")
        self.work.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.ref: Reference | None = None

    # -- what runs
    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        raise NotImplementedError

    def prepare_home(self, home: Path) -> None:
        shutil.copytree(self.base, home, symlinks=True)

    def tmp_roots(self, rnd: Path) -> tuple[Path, ...]:
        return ()

    def accept(self, name: str, rc: int, out: str) -> bool:
        return False  # a non-zero exit is a bug unless a writer says otherwise

    def attempt(self, home: Path, rnd: Path, plan: KillPlan | None, log: Path) -> Attempt:
        return run_attempt(self.steps(home, rnd), home, plan, log, tmp_roots=self.tmp_roots(rnd), accept=self.accept)

    # -- checks
    def after_kill(self, home: Path, rnd: Path) -> list[str]:
        assert self.ref is not None
        return writer_invariants(home, self.ref.before, self.ref.after, check_index=self.check_index)

    def final(self, home: Path, rnd: Path) -> list[str]:
        assert self.ref is not None
        return final_checks(home, self.ref.after, self.ref.vecs, tmp_roots=self.tmp_roots(rnd))

    # -- the reference
    def reference(self) -> Reference:
        rnd = self.work / "reference"
        shutil.rmtree(rnd, ignore_errors=True)
        rnd.mkdir(parents=True)
        home = rnd / "home"
        self.prepare_home(home)
        before = home_state(home)
        a = self.attempt(home, rnd, None, rnd / "run.log")
        if a.failed:
            raise RuntimeError(f"the uninterrupted {self.name} run failed: {a.failed}")
        self.ref = Reference(before, home_state(home), home_vectors(home), a.at, a.first_event or 0.0, a.writes,
                             a.saw_tmp, home)  # fmt: skip
        if bad := self.final(home, rnd):
            raise RuntimeError(f"the uninterrupted {self.name} run is not consistent: {bad}")
        return self.ref


# ---------------------------------------------------------------------------- train
class Train(Writer):
    name = "train"
    weight = 0.7  # the slowest run (tower features on 2 CPUs): fewer kills

    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        return [("train", ["train", "--steps", "8", "--batch-size", "8", "--crops", "0", "--dev-split", "none", "-q"])]

    def after_kill(self, home: Path, rnd: Path) -> list[str]:
        problems = super().after_kill(home, rnd)
        d = home / "models" / "lite"
        if (d / "model.safetensors").exists():  # a model on disk is whole: the one a search would load
            try:
                _model_tensors(d)
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                problems.append(f"models/lite/model.safetensors does not load after the kill: {e}")
        return problems

    def final(self, home: Path, rnd: Path) -> list[str]:
        assert self.ref is not None
        problems = super().final(home, rnd)
        try:
            got, want = _model_tensors(home / "models" / "lite"), _model_tensors(self.ref.home / "models" / "lite")
        except Exception as e:  # noqa: BLE001
            return [*problems, f"the trained model does not load: {e}"]
        if set(got) != set(want):
            problems.append(f"model tensors {sorted(set(got) ^ set(want))[:3]} differ from the reference's")
        else:
            worst = max(float(np.max(np.abs(got[k] - want[k]))) if got[k].size else 0.0 for k in got)
            if worst > 1e-4:  # training is deterministic on CPU: a kill must not change what it learns
                problems.append(f"the trained weights differ from the uninterrupted run's (max |diff| {worst:.2e})")
        return problems


def _model_tensors(d: Path) -> dict[str, np.ndarray]:
    import json

    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="np") as f:
        meta = f.metadata() or {}
        json.loads(meta["config"])  # the config travels inside the weights file
        return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}


# ---------------------------------------------------------------------------- remove
class Remove(Writer):
    weight = 1.0

    def __init__(self, work: Path, base: Path, kind: str, key: str) -> None:
        self.kind, self.key = kind, key
        self.name = f"remove --{kind}"
        super().__init__(work, base)

    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        return [(self.name, ["remove", f"--{self.kind}", self.key, "--json"])]

    def accept(self, name: str, rc: int, out: str) -> bool:
        return rc != 0 and f"no {self.kind} " in out  # the rerun after a kill that came after the erasure finished

    def final(self, home: Path, rnd: Path) -> list[str]:
        problems = super().final(home, rnd)
        con = connect(home / "catalog.db")
        try:
            rows = con.execute("SELECT state, counts FROM erasures").fetchall()
        finally:
            con.close()
        if len(rows) != 1 or rows[0][0] != "done":
            problems.append(f"the erasure log holds {rows} (one finished erasure expected)")
        if len(self.key) >= 6:  # secure_delete + a truncated WAL: the key's bytes are gone from the files
            for f in home.glob("catalog.db*"):
                if self.key.encode() in f.read_bytes():
                    problems.append(f"the removed key {self.key} is still in {f.name}")
        return problems


# ---------------------------------------------------------------------------- milvus
class Milvus(Writer):
    name = "milvus"
    weight = 0.8  # Milvus Lite's start-up dominates each run

    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        return [("index --store milvus", ["index", "--store", "milvus", "--model", MODEL, "--workers", "0", "-q"])]

    def final(self, home: Path, rnd: Path) -> list[str]:
        problems = super().final(home, rnd)  # index_state compares each Milvus collection with the catalog
        if stale := sorted(p.name for p in (home / "indexes" / MODEL).glob("*.faiss")):
            problems.append(f"FAISS files left beside the Milvus manifests: {stale}")
        return problems


# ---------------------------------------------------------------------------- check --repair
class CheckRepair(Writer):
    name = "check --repair"
    check_index = False  # the prepared home is broken on purpose until the repair finishes

    def prepare_home(self, home: Path) -> None:
        super().prepare_home(home)
        d = home / "indexes" / MODEL
        size = (d / "text.faiss").stat().st_size
        (d / "text.faiss").write_bytes(bytes(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)))
        stale = d / ".image.faiss.k1ll3d.tmp"
        stale.write_bytes(b"half an index")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        con = sqlite3.connect(str(home / "catalog.db"))
        with con:
            con.execute("DELETE FROM vectors WHERE space = 'image' AND item_id IN "
                        "(SELECT item_id FROM vectors WHERE space = 'image' ORDER BY item_id LIMIT 3)")  # fmt: skip
        con.close()

    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        return [("check --repair", ["check", "--repair", "--device", "cpu", "--json"])]


# ---------------------------------------------------------------------------- backup
class Backup(Writer):
    name = "backup"

    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        return [("backup", ["backup", str(rnd / "backup"), "--json"])]

    def tmp_roots(self, rnd: Path) -> tuple[Path, ...]:
        return (rnd,)

    def accept(self, name: str, rc: int, out: str) -> bool:
        return rc != 0 and "already exists" in out  # the rerun after a kill that came after the rename

    def after_kill(self, home: Path, rnd: Path) -> list[str]:
        problems = super().after_kill(home, rnd)
        if (err := _verify(rnd / "backup")) not in (None, "absent"):
            problems.append(f"a killed backup left {rnd / 'backup'} present but not verifiable: {err}")
        if _tree_digest(home / "indexes") != _tree_digest(self.base / "indexes"):
            problems.append("the backup changed the home's index files")
        return problems

    def final(self, home: Path, rnd: Path) -> list[str]:
        assert self.ref is not None
        problems = super().final(home, rnd)
        dest = rnd / "backup"
        if err := _verify(dest):
            return [*problems, f"the finished backup does not verify: {err}"]
        restored = rnd / "restored"
        shutil.rmtree(restored, ignore_errors=True)
        r = run_cli(["restore", str(dest), "--home", str(restored), "--json"])
        if r.returncode != 0:
            return [*problems, f"medsearch restore of the backup failed: {r.stdout[-300:]} {r.stderr[-300:]}"]
        problems += [f"restored copy: {p}" for p in final_checks(restored, self.ref.after, self.ref.vecs,
                                                               tmp_roots=(rnd,))]  # fmt: skip
        return problems


def _verify(dest: Path) -> str | None:
    """None when ``dest`` is a complete backup whose every file matches its manifest."""
    from medsearch.backup import verify_backup
    from medsearch.errors import MedsearchError

    if not dest.exists():
        return "absent"
    try:
        verify_backup(dest)
    except MedsearchError as e:
        return e.message
    return None


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


# ---------------------------------------------------------------------------- listen
class Listen(Writer):
    """`medsearch listen` on an empty home; two studies pushed by dcmtk's storescu, one after the other,
    each waited for until ingested and indexed; then SIGTERM (drain). Kills land mid-push, mid-round
    or mid-drain; storescu's acknowledged instances must be spooled or catalogued after every kill."""

    name = "listen"
    weight = 1.2

    def __init__(self, work: Path, base: Path) -> None:
        super().__init__(work, base)
        self.series = self._make_series()

    def _make_series(self) -> list[list[Path]]:
        from pacs_data import ct_series, write_series
        from pydicom.uid import generate_uid

        from medsearch.catalog import Catalog
        from medsearch.deid import safe_metadata

        cat = Catalog.open(self.base / "catalog.db")
        salt = cat.salt
        cat.close()
        out, self.keys = [], {}
        for n, (slices, number) in enumerate(((4, 1), (3, 2))):
            ds = ct_series(slices, study_uid=generate_uid(), series_uid=generate_uid(), series_number=number)
            files = write_series(ds, self.work / "dicom" / f"study{n}")
            self.keys.update({str(f): safe_metadata(d, salt)["instance_key"] for f, d in zip(files, ds, strict=True)})
            out.append(files)
        return out

    def steps(self, home: Path, rnd: Path) -> list[tuple[str, list[str]]]:
        return []

    def attempt(self, home: Path, rnd: Path, plan: KillPlan | None, log: Path) -> Attempt:
        from orthanc import free_port

        port = free_port()
        env, exe = child_env(), medsearch_exe()
        out = open(log, "ab")
        out.write(f"\n$ medsearch listen --port {port}\n".encode())
        out.flush()
        p = subprocess.Popen([exe, "listen", "--port", str(port), "--index-every", "1", "--model", MODEL, "--device", "cpu",
                              "--home", str(home), "-q"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=str(REPO), start_new_session=True)  # fmt: skip
        self.acked: set[str] = set()
        push: subprocess.Popen | None = None
        try:
            deadline = time.monotonic() + 300
            while subprocess.run(
                ["echoscu", "-aec", "MEDSEARCH", "127.0.0.1", str(port)], capture_output=True
            ).returncode:
                if p.poll() is not None or time.monotonic() > deadline:
                    return Attempt(
                        False, "listen", failed=f"the listener did not answer C-ECHO (rc {p.poll()}); see {log}"
                    )
                time.sleep(0.2)
            watch, t0 = Watch(home), time.monotonic()

            def killed(phase: str) -> Attempt | None:
                watch.poll()
                if plan is None or not watch.due(plan, t0):
                    return None
                kill_group(p)
                if push is not None and push.poll() is None:
                    push.wait(timeout=60)  # storescu sees the association drop and exits
                now = time.monotonic()
                return Attempt(True, "listen", now - t0, now - t0, writes=watch.writes, mode=plan.mode,
                               tmp_at_kill=watch.tmp_now, phase=phase,
                               first_event=None if watch.first_event is None else watch.first_event - t0)  # fmt: skip

            pushed: set[str] = set()
            for i, files in enumerate(self.series):
                push_log = rnd / f"storescu-{time.monotonic_ns()}.log"
                with open(push_log, "wb") as plog:
                    push = subprocess.Popen(["storescu", "-v", "-aec", "MEDSEARCH", "127.0.0.1", str(port), *map(str, files)],
                                            stdout=plog, stderr=subprocess.STDOUT)  # fmt: skip
                    while push.poll() is None:
                        if a := killed(f"push {i}"):
                            self.acked |= _acked(push_log, self.keys)
                            return a
                        time.sleep(0.003)
                self.acked |= _acked(push_log, self.keys)
                if push.returncode != 0:
                    return Attempt(False, "listen", failed=f"storescu exited {push.returncode}; see {push_log}")
                push = None
                pushed |= {self.keys[str(f)] for f in files}
                deadline = time.monotonic() + 300
                while not _indexed(home, pushed):
                    if a := killed(f"round {i}"):
                        return a
                    if p.poll() is not None or time.monotonic() > deadline:
                        return Attempt(
                            False, "listen", failed=f"the listener did not ingest+index {len(pushed)} images; see {log}"
                        )
                    time.sleep(0.003)
            p.send_signal(signal.SIGTERM)
            while p.poll() is None:
                if a := killed("drain"):
                    return a
                time.sleep(0.003)
            if p.returncode != 0:
                return Attempt(False, "listen", failed=f"the listener exited {p.returncode} on SIGTERM; see {log}")
            watch.poll()
            return Attempt(False, at=time.monotonic() - t0, writes=watch.writes, saw_tmp=watch.tmp_seen is not None,
                           first_event=None if watch.first_event is None else watch.first_event - t0)  # fmt: skip
        finally:
            if p.poll() is None:
                kill_group(p)
            out.close()

    def after_kill(self, home: Path, rnd: Path) -> list[str]:
        problems = super().after_kill(home, rnd)
        con = connect(home / "catalog.db")
        try:
            images = dict(con.execute("SELECT key, path FROM images").fetchall())
        finally:
            con.close()
        spool = home / "spool" / "MEDSEARCH"
        spooled = {p.stem for pattern in ("*.spool", "*.json") for p in spool.glob(pattern)}
        if lost := self.acked - spooled - set(images):
            problems.append(f"{len(lost)} instances storescu saw acknowledged are neither spooled nor catalogued")
        if gone := [k for k, path in images.items() if not Path(path).is_file()]:
            problems.append(f"{len(gone)} catalogued images have no display PNG, e.g. {gone[0][:12]}")
        return problems

    def final(self, home: Path, rnd: Path) -> list[str]:
        problems = super().final(home, rnd)
        spool = home / "spool" / "MEDSEARCH"
        if left := sorted(p.name for p in spool.iterdir()) if spool.is_dir() else []:
            problems.append(f"the spool still holds {left[:3]}")
        con = connect(home / "catalog.db")
        try:
            named = {str(Path(p).resolve()) for (p,) in con.execute("SELECT path FROM images")}
        finally:
            con.close()
        pngs = {str(p.resolve()) for p in (home / "images").rglob("*") if p.is_file()}
        if orphans := sorted(pngs - named):
            problems.append(f"{len(orphans)} display files no catalog row names, e.g. {orphans[0]}")
        return problems


def _acked(push_log: Path, keys: dict[str, str]) -> set[str]:
    """Instance keys of the files storescu got a Success store response for."""
    out, current = set(), None
    for line in push_log.read_text(errors="replace").splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            out.add(keys[current])
            current = None
    return out


def _indexed(home: Path, keys: set[str]) -> bool:
    """The listener ingested and indexed every instance of ``keys`` (and whatever an earlier attempt of
    the round left), its spool is empty and the index holds every image (a read-only look)."""
    import json

    if any((home / "spool" / "MEDSEARCH").glob("*.spool")) or any((home / "spool" / "MEDSEARCH").glob("*.json")):
        return False
    try:
        man = json.loads((home / "indexes" / MODEL / "image.json").read_text())
    except (OSError, ValueError):
        return False
    try:
        con = sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True, timeout=5)
        try:
            have = {k for (k,) in con.execute("SELECT key FROM images")}
            vecs = con.execute("SELECT count(*) FROM vectors WHERE model = ? AND space = 'image'", [MODEL]).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return keys <= have and vecs[0] == len(have) and man.get("count") == len(have)


def all_writers(work: Path, indexed_home: Path, empty_home: Path, names: set[str] | None = None) -> list[Writer]:
    """The writers besides ingest/index (those in ``names``), on copies of ``indexed_home``
    (listen: of ``empty_home``)."""
    made = {
        "train": lambda: Train(work, indexed_home),
        "listen": lambda: Listen(work, empty_home),
        "remove --case": lambda: Remove(work, indexed_home, "case", "MPX1009"),
        "remove --patient": lambda: Remove(work, indexed_home, "patient", "17"),
        "milvus": lambda: Milvus(work, indexed_home),
        "check --repair": lambda: CheckRepair(work, indexed_home),
        "backup": lambda: Backup(work, indexed_home),
    }
    return [make() for name, make in made.items() if names is None or name in names]
