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


def crash_run(work: Path, *, kills: int, seed: int, n_medpix: int = 4, n_covid: int = 6, kills_per_round: int = 4,
              commit_every: int = 16, chunk: int = 8, snapshot: bool = True, echo=print,
              tally: Tally | None = None) -> Tally:  # fmt: skip
    """ingest + ingest + index: rounds until ``kills`` kill points were made; returns the tally.
    The uninterrupted run's home (``work/reference``) is the prepared home of the other writers."""
    t_start = time.monotonic()
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    if snapshot:
        snapshot_source(work / "src")
    steps = pipeline(make_data(work / "data", n_medpix, n_covid), commit_every, chunk)
    tally = tally if tally is not None else Tally()
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
    for name in ("ingest", "index"):
        tally.writer(name).span = span
    made = rounds = 0
    while made < kills:
        rounds += 1
        t_round = time.monotonic()
        home = work / f"round-{rounds:03d}"
        log = work / f"round-{rounds:03d}.log"
        prev: dict[str, int] | None = None
        round_problems: list[str] = []
        n_round = 0
        killed_steps: list[str] = []
        while True:
            plan = draw_plan(rng, span, ref_writes) if n_round < kills_per_round and made < kills else None
            a = run_attempt(steps, home, plan, log)
            if a.failed:
                round_problems.append(a.failed)
                break
            if not a.killed:
                break
            n_round += 1
            made += 1
            problems, counts = always_invariants(home, ref, prev)
            prev = counts or prev
            tally.record(step_writer(a.step), a, span, problems, rounds)
            killed_steps.append(step_writer(a.step))
            round_problems += [f"after kill {tally.kill_points} ({a.step} +{a.into_step:.2f}s): {p}" for p in problems]
            echo(f"kill {tally.kill_points:>3}: round {rounds} {a.mode:<5} {a.step:<24} +{a.into_step:6.2f}s  "
                 f"{counts}  {'ok' if not problems else 'PROBLEM'}")  # fmt: skip
        if not round_problems:
            round_problems = final_checks(home, ref, ref_vecs)
        owner = Counter(killed_steps).most_common(1)[0][0] if killed_steps else "index"
        tally.end_round(owner, round_problems, rounds)
        tally.writer(owner).seconds += time.monotonic() - t_round
        for p in round_problems:
            echo(f"  round {rounds}: {p}")
        if not round_problems:
            echo(f"round {rounds}: complete and consistent after {n_round} kills")
    tally.seconds += time.monotonic() - t_start
    return tally


def writer_run(writer: Writer, *, kills: int, rng: random.Random, tally: Tally, kills_per_round: int = 4,
               echo=print) -> None:  # fmt: skip
    """Rounds of one writer until ``kills`` kill points were made: each round a fresh copy of the
    writer's prepared home, up to ``kills_per_round`` killed attempts, then a rerun to the end."""
    t0 = time.monotonic()
    ref = writer.reference()
    w = tally.writer(writer.name)
    w.span = ref.span
    echo(f"{writer.name}: reference run {ref.span:.1f}s, first write or temp file at {ref.first:.1f}s, "
         f"{ref.writes} catalog writes, temp files: {ref.saves}")  # fmt: skip
    made = 0
    while made < kills:
        n = w.rounds + 1
        rnd = writer.work / f"round-{n:03d}"
        shutil.rmtree(rnd, ignore_errors=True)
        rnd.mkdir(parents=True)
        home = rnd / "home"
        writer.prepare_home(home)
        problems: list[str] = []
        n_round = 0
        while True:
            plan = None
            if n_round < kills_per_round and made < kills:
                plan = draw_plan(rng, ref.span, ref.writes, first=0.8 * ref.first, saves=ref.saves)
            a = writer.attempt(home, rnd, plan, rnd / "run.log")
            if a.failed:
                problems.append(a.failed)
                break
            if not a.killed:
                break
            n_round += 1
            made += 1
            found = writer.after_kill(home, rnd)
            tally.record(writer.name, a, ref.span, found, n)
            problems += [
                f"after kill {tally.kill_points} ({a.mode} {a.phase or a.step} +{a.at:.2f}s): {p}" for p in found
            ]
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
    tally.seconds += time.monotonic() - t0


PIPELINE_WEIGHT = 3.0  # ingest + index share of the kills (two writers)


def crash_all(work: Path, *, kills: int, seed: int, writers: set[str] | None = None, kills_per_round: int = 4,
              n_medpix: int = 4, n_covid: int = 6, snapshot: bool = True, echo=print) -> Tally:  # fmt: skip
    """Every writer: ``kills`` kill points shared by weight (ingest+index first; its finished home is the
    prepared home of train, remove, milvus, check --repair and backup; listen starts from an empty home)."""
    from crash_writers import all_writers

    from medsearch.catalog import Catalog

    work.mkdir(parents=True, exist_ok=True)
    if snapshot:
        snapshot_source(work / "src")
    empty = work / "empty-home"
    empty.mkdir(exist_ok=True)
    Catalog.open(empty / "catalog.db").close()
    tally = Tally()
    rng = random.Random(seed)
    want = lambda n: writers is None or n in writers  # noqa: E731
    pipeline_on = want("ingest") or want("index")
    others = [w for w in all_writers(work, work / "reference", empty) if want(w.name)]
    total_w = (PIPELINE_WEIGHT if pipeline_on else 0) + sum(w.weight for w in others)
    quotas = {w.name: max(1, round(kills * w.weight / total_w)) for w in others}
    pipe_quota = max(0, kills - sum(quotas.values())) if pipeline_on else 0
    echo(f"kills by writer: ingest+index {pipe_quota}, " + ", ".join(f"{n} {q}" for n, q in quotas.items()))
    if pipe_quota or not (work / "reference" / "catalog.db").exists():  # (a kept --work folder: reuse its home)
        crash_run(work, kills=pipe_quota, seed=seed, kills_per_round=kills_per_round, n_medpix=n_medpix,
                  n_covid=n_covid, snapshot=False, echo=echo, tally=tally)  # fmt: skip
    for w in others:
        writer_run(w, kills=quotas[w.name], rng=rng, tally=tally, kills_per_round=kills_per_round, echo=echo)
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
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder, kept)")
    ap.add_argument("--json", action="store_true", help="print the tally as JSON")
    ap.add_argument("--no-snapshot", action="store_true", help="run the live working tree, not a copy")
    a = ap.parse_args(argv)
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup that kills the child

    work = a.work or Path(tempfile.mkdtemp(prefix="medsearch-crash-"))
    writers = {w.strip() for w in a.writers.split(",")} if a.writers else None
    tally = crash_all(work, kills=a.kills, seed=a.seed, writers=writers, kills_per_round=a.kills_per_round,
                      n_medpix=a.medpix, n_covid=a.covid, snapshot=not a.no_snapshot)  # fmt: skip
    if a.json:
        print(json.dumps(tally.to_dict(), indent=2))
    print(f"\n{tally.table()}\n")
    print(f"kill points: {tally.kill_points} ({tally.distinct} distinct writer x moment), survived with nothing "
          f"lost, duplicated or phantom: {tally.survived}; rounds complete and consistent: {tally.rounds_ok}/{tally.rounds}; "
          f"{tally.seconds:.0f}s (work folder {work})")  # fmt: skip
    for p in tally.problems:
        print(f"PROBLEM {p}")
    return 0 if not tally.problems and tally.survived == tally.kill_points else 1


if __name__ == "__main__":
    sys.exit(main())
