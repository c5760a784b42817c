"""Crash-safety harness: SIGKILL every medsearch writer at seeded moments.

    .venv/bin/python tests/crash_harness.py --kills 120 --seed 0     # the full run; prints the tally
    tests/test_crash.py                                               # a short seeded subset (slow)

Writers (each a real `medsearch` subprocess in its own process group, killed with SIGKILL):
ingest, index, train, listen (dcmtk storescu pushes; killed mid-push, mid ingest round, mid
drain), remove --case, remove --patient, milvus (`index --store milvus`, Milvus Lite),
check --repair (on a damaged home) and backup. ``--kills`` is shared by weight; ``--writers``
picks a subset. The writers past ingest/index live in ``crash_writers.py``; what is checked in
``crash_checks.py``; the subprocess and kill plumbing in ``crash_proc.py``.

The data is real: a slice of medpix-2.0 and of covid-chestxray from ../shared/datasets,
symlinked (never copied) into a temporary dataset folder, and CT series written by pydicom
(tests/pacs_data.py) for the listener. The pipeline

    medsearch ingest medpix-2.0 -> medsearch ingest covid-chestxray -> medsearch index --model towers

runs first. One uninterrupted run builds the reference home (it must pass the same final checks)
and measures the pipeline's length T; that home is then the prepared home of train, remove,
milvus, check --repair and backup (listen starts from an empty home), and each of those writers
has its own uninterrupted reference run from a copy of it. Each round starts from a fresh copy;
every attempt reruns the writer (every writer is idempotent or refuses a done job by name) and a
kill plan draws t ~ U(t_first, T) (t_first: the reference's first catalog write or temp file), or
"just after the nth catalog commit", or "inside a save" (a temp file or backup stage in flight).
After a kill the harness checks what must hold at every instant (SQLite integrity, no phantom or
duplicated row, no committed row lost, no orphan vector, every index on disk either loadable or
marked for rebuild, plus each writer's own: a model that loads, acknowledged DICOM instances
spooled or catalogued, a backup that is absent or verifies); after at most ``kills_per_round``
kills the round runs to the end and the finished home is checked: the same rows as the reference
by natural key, exactly one vector per image and text and equal to the reference's, FAISS ntotal
== stored count with the same ids, Milvus collections holding exactly the stored ids and vectors,
manifests that match their files, no temp file left in the home, ``medsearch check`` ok, and the
writer's own end state (weights equal to the reference's, one finished erasure in the log and the
key gone from the catalog file, an empty spool and no orphan PNG, a backup that verifies, restores
and checks). A kill point is (writer, moment): step, plan mode, phase, tenth of T, catalog writes
seen and whether a temp file was in flight; the tally counts the distinct ones.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path[:0] = [str(TESTS), str(REPO)]

from crash_checks import MODEL, always_invariants, connect, dump, final_checks, natural_vectors  # noqa: E402
from crash_proc import Attempt, draw_plan, run_attempt, snapshot_source  # noqa: E402

if TYPE_CHECKING:
    from crash_writers import Writer

DATASETS = REPO.parent / "shared" / "datasets"


# ---------------------------------------------------------------------------- data and pipeline
def make_data(root: Path, n_medpix: int, n_covid: int) -> list[Path]:
    """Two JSONL dataset folders named like their sources, images symlinked from ../shared."""
    from conftest import make_slice

    medpix = make_slice(root / "medpix-2.0", DATASETS / "medpix-2.0", n_cases=n_medpix, splits=("dev",))
    covid = make_slice(root / "covid-chestxray", DATASETS / "covid-chestxray", n_cases=n_covid)
    return [medpix, covid]


def pipeline(datasets: list[Path], commit_every: int, chunk: int) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = [(f"ingest {d.name}", ["ingest", str(d), "-q"]) for d in datasets]
    steps = [(n, [*argv[:2], "--chunk", str(chunk), *argv[2:]]) for n, argv in steps]
    steps.append(("index", ["index", "--model", MODEL, "--workers", "0", "--batch-size", "8",
                            "--commit-every", str(commit_every), "-q"]))  # fmt: skip
    return steps


# ---------------------------------------------------------------------------- the run
CATEGORIES = {  # what a problem line is about, for the tally
    "lost": ("lost", "missing"),
    "duplicated": ("duplicated", "duplicate"),
    "phantom": ("phantom", "extra", "orphan"),
    "index != catalog": ("index", "ntotal", "Milvus", "manifest", "vectors differ", "vectors:"),
    "stray temp files": ("temporary files", "temp file"),
    "check failed": ("medsearch check",),
    "backup": ("backup", "restore"),
}


@dataclass
class WriterTally:
    kills: int = 0
    survived: int = 0
    rounds: int = 0
    rounds_ok: int = 0
    points: set = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    span: float = 0.0


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
    writers: dict[str, WriterTally] = field(default_factory=dict)
    stopped: str | None = None  # why the run ended before every writer made its kills

    def writer(self, name: str) -> WriterTally:
        return self.writers.setdefault(name, WriterTally())

    def record(self, writer: str, a: Attempt, span: float, problems: list[str], rnd: int) -> None:
        """One kill point: (writer, moment) where the moment is what the harness saw at the kill: step,
        plan mode, phase, tenth of the span, catalog writes so far, a temp file in flight or not."""
        decile = min(9, int(10 * a.at / span)) if span > 0 else 0
        point = (writer, a.step, a.mode, a.phase, decile, a.writes, a.tmp_at_kill)
        w = self.writer(writer)
        w.kills += 1
        w.points.add(point)
        self.kill_points += 1
        self.by_step[f"{a.step} ({a.mode})"] += 1
        if not problems:
            w.survived += 1
            self.survived += 1
        self.kills.append({"writer": writer, "round": rnd, "step": a.step, "mode": a.mode, "phase": a.phase,
                           "at_s": round(a.at, 3), "into_step_s": round(a.into_step, 3), "decile": decile,
                           "writes": a.writes, "tmp": a.tmp_at_kill, "ok": not problems})  # fmt: skip

    def end_round(self, writer: str, problems: list[str], rnd: int) -> None:
        w = self.writer(writer)
        w.rounds += 1
        self.rounds += 1
        if problems:
            w.problems += problems
            self.problems += [f"{writer} round {rnd}: {p}" for p in problems]
        else:
            w.rounds_ok += 1
            self.rounds_ok += 1

    @property
    def distinct(self) -> int:
        return sum(len(w.points) for w in self.writers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"kill_points": self.kill_points, "distinct_kill_points": self.distinct, "survived": self.survived,
                "rounds": self.rounds, "rounds_ok": self.rounds_ok, "kills_by_step": dict(self.by_step),
                "writers": {n: {"kills": w.kills, "distinct": len(w.points), "survived": w.survived, "rounds": w.rounds,
                                "rounds_ok": w.rounds_ok, "seconds": round(w.seconds, 1), "span_s": round(w.span, 1),
                                "problems": w.problems} for n, w in self.writers.items()},
                "problems": self.problems, "seconds": round(self.seconds, 1), "span_s": round(self.span, 1),
                "kills": self.kills}  # fmt: skip

    def table(self) -> str:
        """The tally as a markdown table, one row per writer, then the totals."""
        head = "| writer | kills | distinct points | survived | rounds ok | " + " | ".join(CATEGORIES) + " | s |"
        rows = [head, "|" + "---|" * (6 + len(CATEGORIES))]
        tot = Counter()
        for n, w in self.writers.items():
            cats = [sum(any(k in p for k in keys) for p in w.problems) for keys in CATEGORIES.values()]
            tot.update({"kills": w.kills, "distinct": len(w.points), "survived": w.survived, "ok": w.rounds_ok,
                        "rounds": w.rounds, "s": w.seconds, **{c: x for c, x in zip(CATEGORIES, cats, strict=True)}})  # fmt: skip
            rows.append(f"| {n} | {w.kills} | {len(w.points)} | {w.survived} | {w.rounds_ok}/{w.rounds} | "
                        + " | ".join(map(str, cats)) + f" | {w.seconds:.0f} |")  # fmt: skip
        rows.append(f"| **all** | {tot['kills']} | {tot['distinct']} | {tot['survived']} | {tot['ok']}/{tot['rounds']} | "
                    + " | ".join(str(tot[c]) for c in CATEGORIES) + f" | {self.seconds:.0f} |")  # fmt: skip
        return "\n".join(rows)


def step_writer(step: str | None) -> str:
    return (step or "?").split()[0]  # "ingest medpix-2.0" -> ingest


class Pipeline:
    """ingest medpix-2.0 -> ingest covid-chestxray -> index: the reference run, then rounds from an empty home.
    The reference home (``work/reference``) is the prepared home of the other writers."""

    def __init__(self, work: Path, *, n_medpix: int, n_covid: int, commit_every: int, chunk: int, echo=print) -> None:
        self.work = work
        self.steps = pipeline(make_data(work / "data", n_medpix, n_covid), commit_every, chunk)
        ref_home = work / "reference"
        shutil.rmtree(ref_home, ignore_errors=True)
        first = run_attempt(self.steps, ref_home, None, work / "reference.log")  # uninterrupted
        if first.failed:
            raise RuntimeError(f"the uninterrupted reference run failed: {first.failed}")
        self.span, self.writes = first.at, first.writes
        con = connect(ref_home / "catalog.db")
        self.ref, self.ref_vecs = dump(con), natural_vectors(con, MODEL)
        con.close()
        if bad := final_checks(ref_home, self.ref, self.ref_vecs):
            raise RuntimeError(f"the uninterrupted reference run is not consistent: {bad}")
        self.rounds = 0
        ref = self.ref
        echo(f"ingest+index reference run: {self.span:.1f}s, {self.writes} catalog writes, {sum(ref['cases'].values())} "
             f"cases, {sum(ref['images'].values())} images, {sum(ref['texts'].values())} texts")  # fmt: skip

    def round(self, tally: Tally, rng: random.Random, kills: int, kills_per_round: int, echo=print) -> int:
        """One round from an empty home: up to ``min(kills, kills_per_round)`` kills, then a run to the end."""
        self.rounds += 1
        rounds, span, t_round = self.rounds, self.span, time.monotonic()
        home = self.work / f"round-{rounds:03d}"
        log = self.work / f"round-{rounds:03d}.log"
        prev: dict[str, int] | None = None
        round_problems: list[str] = []
        n_round = 0
        killed_steps: list[str] = []
        for a in killed_attempts(lambda plan: run_attempt(self.steps, home, plan, log),
                                 lambda: draw_plan(rng, span, self.writes), min(kills, kills_per_round),
                                 round_problems):  # fmt: skip
            n_round += 1
            problems, counts = always_invariants(home, self.ref, prev)
            prev = counts or prev
            tally.record(step_writer(a.step), a, span, problems, rounds)
            killed_steps.append(step_writer(a.step))
            round_problems += [f"after kill {tally.kill_points} ({a.step} +{a.into_step:.2f}s): {p}" for p in problems]
            echo(f"kill {tally.kill_points:>3}: round {rounds} {a.mode:<5} {a.step:<24} +{a.into_step:6.2f}s  "
                 f"{counts}  {'ok' if not problems else 'PROBLEM'}")  # fmt: skip
        if not round_problems:
            round_problems = final_checks(home, self.ref, self.ref_vecs)
        owner = Counter(killed_steps).most_common(1)[0][0] if killed_steps else "index"
        tally.end_round(owner, round_problems, rounds)
        tally.writer(owner).seconds += time.monotonic() - t_round
        for p in round_problems:
            echo(f"  round {rounds}: {p}")
        if not round_problems:
            echo(f"round {rounds}: complete and consistent after {n_round} kills")
            shutil.rmtree(home, ignore_errors=True)  # keep the failing ones only (disk)
        return n_round


def killed_attempts(attempt, draw, limit: int, problems: list[str]):
    """Run ``attempt(plan)`` until one is not killed: the first ``limit`` get a kill plan from ``draw()``,
    the rest run to the end. Yields each killed attempt; a failed one ends the loop with its failure
    appended to ``problems``."""
    made = 0
    while True:
        a = attempt(draw() if made < limit else None)
        if a.failed:
            problems.append(a.failed)
            return
        if not a.killed:
            return
        made += 1
        yield a


def crash_run(work: Path, *, kills: int, seed: int, n_medpix: int = 4, n_covid: int = 6, kills_per_round: int = 4,
              commit_every: int = 16, chunk: int = 8, snapshot: bool = True, echo=print) -> Tally:  # fmt: skip
    """ingest + ingest + index only: rounds until ``kills`` kill points were made; returns the tally."""
    t_start = time.monotonic()
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    if snapshot:
        snapshot_source(work / "src")
    tally = Tally()
    p = Pipeline(work, n_medpix=n_medpix, n_covid=n_covid, commit_every=commit_every, chunk=chunk, echo=echo)
    tally.span = p.span
    made = 0
    while made < kills:
        made += p.round(tally, rng, kills - made, kills_per_round, echo)
    tally.seconds = time.monotonic() - t_start
    return tally


def writer_round(writer: Writer, *, kills: int, rng: random.Random, tally: Tally, kills_per_round: int = 4,
                 echo=print) -> int:  # fmt: skip
    """One round of a writer: a fresh copy of its prepared home, up to ``min(kills, kills_per_round)``
    killed attempts, then a rerun to the end and the final checks. Returns the kills made."""
    t0 = time.monotonic()
    ref = writer.ref
    assert ref is not None
    w = tally.writer(writer.name)
    n = w.rounds + 1
    rnd = writer.work / f"round-{n:03d}"
    shutil.rmtree(rnd, ignore_errors=True)
    rnd.mkdir(parents=True)
    home = rnd / "home"
    writer.prepare_home(home)
    problems: list[str] = []
    n_round = 0
    for a in killed_attempts(lambda plan: writer.attempt(home, rnd, plan, rnd / "run.log"),
                             lambda: draw_plan(rng, ref.span, ref.writes, first=0.8 * ref.first, saves=ref.saves),
                             min(kills, kills_per_round), problems):  # fmt: skip
        n_round += 1
        found = writer.after_kill(home, rnd)
        tally.record(writer.name, a, ref.span, found, n)
        problems += [f"after kill {tally.kill_points} ({a.mode} {a.phase or a.step} +{a.at:.2f}s): {p}" for p in found]
        echo(f"kill {tally.kill_points:>3}: {writer.name:<16} round {n} {a.mode:<5} {a.phase or a.step:<20} "
             f"+{a.at:6.2f}s writes {a.writes:>3} tmp {int(a.tmp_at_kill)}  {'ok' if not found else 'PROBLEM'}")  # fmt: skip
    if not problems:
        problems = writer.final(home, rnd)
    tally.end_round(writer.name, problems, n)
    for p in problems:
        echo(f"  {writer.name} round {n}: {p}")
    if not problems:
        echo(f"{writer.name} round {n}: complete and consistent after {n_round} kills")
        shutil.rmtree(home, ignore_errors=True)  # keep the failing ones only (disk)
    w.seconds += time.monotonic() - t0
    return n_round


PIPELINE_WEIGHT = 2.5  # ingest + index share of the kills (two writers)


def crash_all(work: Path, *, kills: int, seed: int, writers: set[str] | None = None, kills_per_round: int = 4,
              n_medpix: int = 4, n_covid: int = 6, snapshot: bool = True, echo=print,
              tally: Tally | None = None, budget_s: float | None = None) -> Tally:  # fmt: skip
    """Every writer: ``kills`` kill points shared by weight. The ingest+index reference comes first (its
    home is the prepared home of the others; listen starts from an empty home), then every writer's
    reference run, then rounds in turn (one per writer with kills left), so a run stopped early
    still covers every writer. ``budget_s``: start no round after that many seconds (the tally says so)."""
    from crash_writers import all_writers

    from medsearch.catalog import Catalog

    t_start = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    if snapshot:
        snapshot_source(work / "src")
    empty = work / "empty-home"
    empty.mkdir(exist_ok=True)
    Catalog.open(empty / "catalog.db").close()
    tally = tally if tally is not None else Tally()
    rng = random.Random(seed)
    pipeline_on = writers is None or bool({"ingest", "index"} & writers)
    others = all_writers(work, work / "reference", empty, writers)
    total_w = (PIPELINE_WEIGHT if pipeline_on else 0) + sum(w.weight for w in others)
    left = {w.name: max(1, round(kills * w.weight / total_w)) for w in others}
    pipe_left = max(0, kills - sum(left.values())) if pipeline_on else 0
    echo(f"kills by writer: ingest+index {pipe_left}, " + ", ".join(f"{n} {q}" for n, q in left.items()))
    try:
        pipe = None
        if pipe_left or not (work / "reference" / "catalog.db").exists():  # (a kept --work folder: reuse its home)
            pipe = Pipeline(work, n_medpix=n_medpix, n_covid=n_covid, commit_every=16, chunk=8, echo=echo)
            tally.span = pipe.span
        for w in list(others):
            try:
                ref = w.reference()
            except RuntimeError as e:  # a writer whose uninterrupted run fails: a finding, the others go on
                tally.problems.append(f"{w.name}: {e}")
                tally.writer(w.name).problems.append(str(e))
                echo(f"{w.name}: {e}")
                others.remove(w)
                left[w.name] = 0
                continue
            tally.writer(w.name).span = ref.span
            echo(f"{w.name}: reference run {ref.span:.1f}s, first write or temp file at {ref.first:.1f}s, "
                 f"{ref.writes} catalog writes, temp files: {ref.saves}")  # fmt: skip
        def over() -> bool:
            if budget_s is not None and time.monotonic() - t_start > budget_s:
                tally.stopped = f"time budget of {budget_s:.0f} s spent: {pipe_left + sum(left.values())} kills not made"
                return True
            return False

        while (pipe_left or any(left.values())) and not over():
            if pipe is not None and pipe_left:
                pipe_left -= pipe.round(tally, rng, pipe_left, kills_per_round, echo)
            for w in others:
                if left[w.name] and not over():
                    left[w.name] -= writer_round(w, kills=left[w.name], rng=rng, tally=tally,
                                                 kills_per_round=kills_per_round, echo=echo)  # fmt: skip
    finally:
        tally.seconds = time.monotonic() - t_start
    return tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=120, help="kill points to make over all writers (default 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--writers", default=None, help="comma-separated subset: ingest,index,train,listen,remove --case,"
                                                    "remove --patient,milvus,check --repair,backup (default: all)")  # fmt: skip
    ap.add_argument("--medpix", type=int, default=4, help="medpix-2.0 dev cases in the slice")
    ap.add_argument("--covid", type=int, default=6, help="covid-chestxray cases in the slice")
    ap.add_argument("--kills-per-round", type=int, default=4)
    ap.add_argument("--budget-min", type=float, default=None, help="start no new round after this many minutes")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder, kept)")
    ap.add_argument("--json", action="store_true", help="print the tally as JSON")
    ap.add_argument("--no-snapshot", action="store_true", help="run the live working tree, not a copy")
    a = ap.parse_args(argv)
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup that kills the child

    work = a.work or Path(tempfile.mkdtemp(prefix="medsearch-crash-"))
    writers = {w.strip() for w in a.writers.split(",")} if a.writers else None
    tally = Tally()
    try:
        crash_all(work, kills=a.kills, seed=a.seed, writers=writers, kills_per_round=a.kills_per_round,
                  n_medpix=a.medpix, n_covid=a.covid, snapshot=not a.no_snapshot, tally=tally,
                  budget_s=None if a.budget_min is None else 60 * a.budget_min)  # fmt: skip
    except (KeyboardInterrupt, SystemExit):  # stopped early: the tally so far (the round in flight has no end check)
        tally.stopped = "interrupted (SIGTERM or Ctrl-C); the round in flight was not finished"
    if a.json:
        print(json.dumps(tally.to_dict(), indent=2))
    print(f"\n{tally.table()}\n")
    print(f"kill points: {tally.kill_points} ({tally.distinct} distinct writer x moment), survived with nothing "
          f"lost, duplicated or phantom: {tally.survived}; rounds complete and consistent: {tally.rounds_ok}/{tally.rounds}; "
          f"{tally.seconds:.0f}s (work folder {work})")  # fmt: skip
    if tally.stopped:
        print(f"stopped early: {tally.stopped}")
    for p in tally.problems:
        print(f"PROBLEM {p}")
    return 0 if not tally.problems and tally.survived == tally.kill_points else 1


if __name__ == "__main__":
    sys.exit(main())
