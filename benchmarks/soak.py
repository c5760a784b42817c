"""Soak with faults: clients search while a writer ingests and indexes, with SIGKILLs.

    python benchmarks/soak.py [--seconds 600] [--clients 8] [--seed 16] [--base-home HOME]
                              [--work DIR] [--out benchmarks/results/soak.json]

``medsearch serve`` runs on a free loopback port under a small supervisor that restarts it when it
dies. N client threads send text searches, image searches (uploads of new pixels: dataset images
re-encoded as JPEG), case views (of cases from their own hits) and drafts (extractive; an upload or
a hit's image id) for ``--seconds``, while a writer loop takes new medpix-2.0 cases (a real slice
of ../shared/datasets), runs ``medsearch ingest`` and ``medsearch index``, and the server swaps in
each new generation (``--watch 1``). At seeded moments the writer is SIGKILLed (and run again, as
an operator would: ingest is idempotent, index resumes), and once, the server itself.

Printed (markdown) and written as JSON (``--out``; times in seconds since the server was first launched): requests/s and p50/p95/p99 per kind, errors by
status inside and outside the restart window, server RSS over time (mean of the first vs the last
third of the longest-serving server process), the writer's rounds and kills; and the checks after
the run: every hit, citation and case view names rows that exist in the catalog, no lost,
duplicated or phantom cases or images, the served index equals the catalog, ``medsearch check``
passes, and the audit log's hash chain verifies. Exit 1 when a check fails.

The base home (``--base-home``, copied; default: 5 covid-chestxray + 4 medpix-2.0 cases indexed
with the frozen towers here) must hold a medpix-2.0 source. All CPU: on a small shared host the
clients, the server and the writer compete for the same cores; the load average is printed.
``--work DIR`` keeps the folder (home, logs, and every request in ``samples.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

from soak_checks import (
    KINDS,
    SOURCE,
    catalog_cases,
    check_rows,
    gates,
    latency_table,
    markdown,
    rss_trend,
    served_matches,
    timeline,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"
COVID = REPO.parent / "shared" / "datasets" / "covid-chestxray"


def _make_slice():
    """tests/conftest.py's make_slice: a JSONL dataset folder of some cases, images symlinked."""
    spec = importlib.util.spec_from_file_location("_soak_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.make_slice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def run_cli(*args: str, timeout: float = 900) -> dict:
    r = subprocess.run(cli(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"medsearch {' '.join(args[:1])} failed ({r.returncode}): {r.stderr[-2000:]}{r.stdout[-500:]}")
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def medpix_cases() -> dict[str, int]:
    """medpix-2.0 case id -> its image count (cases with images only), in file order."""
    counts: dict[str, int] = {}
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            r = json.loads(line)
            counts[r["case_id"]] = counts.get(r["case_id"], 0) + 1
    return counts


def build_base(home: Path, work: Path, make_slice) -> None:
    """5 covid-chestxray and 4 medpix-2.0 cases, ingested and indexed with the frozen towers."""
    medpix = make_slice(work / "base" / SOURCE, MEDPIX, n_cases=4, splits=("dev",))
    covid = make_slice(work / "base" / "covid-chestxray", COVID, n_cases=5)
    run_cli("ingest", str(medpix), "--home", str(home), "--source", SOURCE, "--json")
    run_cli("ingest", str(covid), "--home", str(home), "--json")
    run_cli("index", "--home", str(home), "--model", "towers", "--device", "cpu", "--workers", "0", "--json")


def upload_images(n: int, rng: random.Random) -> list[bytes]:
    """JPEG re-encodings of medpix images: new pixels, so the server decodes and embeds each one."""
    from PIL import Image

    files = []
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            r = json.loads(line)
            files.append(r["file"])
    out = []
    for name in rng.sample(files, min(n, len(files))):
        im = Image.open(MEDPIX / name).convert("RGB")
        im.thumbnail((512, 512))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


class Deadline:
    """When clients and writer stop: the soak's seconds of serving, moved later by the server's downtime."""

    def __init__(self, at: float) -> None:
        self.at = at

    def passed(self) -> bool:
        return time.perf_counter() >= self.at


# ---------------------------------------------------------------------------- the server
@dataclass
class Incarnation:
    pid: int
    started: float
    answering: float | None = None  # /v1/health answers (the process is up)
    ready: float | None = None  # and it serves an index (health status ok or degraded)
    died: float | None = None
    killed: bool = False  # by this script (the planned kill)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    threads: list[tuple[float, int]] = field(default_factory=list)


def _proc_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (OSError, ValueError):
        return {}


class Supervisor(threading.Thread):
    """Runs ``medsearch serve`` and starts it again whenever it dies; samples its RSS every second."""

    def __init__(self, home: Path, port: int, t0: float, log: Path) -> None:
        super().__init__(daemon=True)
        self.home, self.port, self.t0 = home, port, t0
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.incarnations: list[Incarnation] = []
        self.served: list[tuple[float, int]] = []  # (t, image index generation) whenever it changes
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self._start()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _start(self) -> None:
        cmd = cli("serve", "--home", str(self.home), "--port", str(self.port), "--device", "cpu", "--watch", "1",
                  "--rate-limit", "0", "--log-level", "warning")  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        self.incarnations.append(Incarnation(pid=self.proc.pid, started=self.now()))

    def _health(self) -> str | None:
        """The server's status (None when it does not answer); notes the image generation it serves."""
        import httpx

        try:
            r = httpx.get(self.base + "/v1/health", timeout=5)
            h = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return None
        gen = h.get("indexes", {}).get("image", {}).get("generation")
        if gen is not None and (not self.served or self.served[-1][1] != gen):
            self.served.append((round(self.now(), 1), gen))
        return h.get("status")

    def serving(self) -> bool:
        inc = self.incarnations[-1]
        return inc.ready is not None and inc.died is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready within {timeout:.0f} s; see {self.log.name}")
            time.sleep(0.2)

    def run(self) -> None:
        last_sample = 0.0
        while not self.stopping.is_set():
            inc = self.incarnations[-1]
            if self.proc is not None and self.proc.poll() is not None:
                with self.lock:
                    inc.died = inc.died or self.now()
                    if not self.stopping.is_set():
                        self._start()  # the supervisor's one job
                continue
            if inc.ready is None and (status := self._health()) is not None:
                inc.answering = inc.answering or self.now()
                if status in ("ok", "degraded"):
                    inc.ready = self.now()
            if self.now() - last_sample >= 1.0:
                last_sample = self.now()
                st = _proc_status(inc.pid)
                if "VmRSS" in st:
                    inc.rss_mb.append((last_sample, int(st["VmRSS"].split()[0]) / 1024))
                    inc.threads.append((last_sample, int(st.get("Threads", "0"))))
                if inc.ready is not None:
                    self._health()
            time.sleep(0.1)

    def kill(self) -> float:
        """SIGKILL the server now (the planned fault); the loop above restarts it."""
        with self.lock:
            inc = self.incarnations[-1]
            inc.killed, inc.died = True, self.now()
            os.killpg(inc.pid, signal.SIGKILL)
        return inc.died

    def windows(self) -> list[tuple[float, float]]:
        """(death, next ready) of every restart: requests overlapping one may fail."""
        out = []
        for a, b in zip(self.incarnations, self.incarnations[1:], strict=False):
            out.append((a.died or b.started, b.ready if b.ready is not None else float("inf")))
        return out

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.incarnations[-1].died = self.incarnations[-1].died or self.now()
        self.log.close()


# ---------------------------------------------------------------------------- the writer
class Writer(threading.Thread):
    """Ingests ``batch`` new medpix cases per round, then indexes; SIGKILLs steps at seeded moments."""

    def __init__(self, home: Path, work: Path, pool: list[str], batch: int, kill_prob: float, rng: random.Random,
                 deadline: Deadline, t0: float, make_slice) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.home, self.work, self.pool, self.batch = home, work, pool, batch
        self.kill_prob, self.rng, self.deadline, self.t0 = kill_prob, rng, deadline, t0
        self.make_slice = make_slice
        self.expected = {"ingest": 4.0, "index": 15.0}  # seconds; updated from runs that were not killed
        self.rounds: list[dict] = []
        self.kills: list[dict] = []
        self.failures: list[dict] = []
        self.ingested: list[str] = []  # case keys whose ingest completed
        self.proc: subprocess.Popen | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, name: str, args: list[str], rnd: int) -> None:
        """Run one writer command until it completes, killing it at seeded moments (at most twice)."""
        killed = 0
        while True:
            may_kill = killed < 2 and not self.deadline.passed() and self.rng.random() < self.kill_prob
            delay = self.rng.uniform(0.15, 1.0) * self.expected[name] if may_kill else None
            t = time.perf_counter()
            log = open(self.work / f"writer-{rnd:03d}-{name}.log", "a")  # noqa: SIM115
            self.proc = subprocess.Popen(cli(*args), cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
            try:
                rc = self.proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                killed += 1
                self.kills.append({"round": rnd, "step": name, "after_s": round(time.perf_counter() - t, 2),
                                   "at": round(self.now(), 1)})  # fmt: skip
                continue
            finally:
                log.close()
            took = time.perf_counter() - t
            if rc == 0:
                self.expected[name] = 0.5 * self.expected[name] + 0.5 * took
                return
            self.failures.append({"round": rnd, "step": name, "rc": rc, "at": round(self.now(), 1),
                                  "log": (self.work / f"writer-{rnd:03d}-{name}.log").read_text()[-1500:]})  # fmt: skip
            if len([f for f in self.failures if f["round"] == rnd]) >= 3:
                raise RuntimeError(f"writer step {name} of round {rnd} failed three times")

    def run(self) -> None:
        home = ["--home", str(self.home)]
        rnd = 0
        while not self.deadline.passed() and self.pool:
            take, self.pool = self.pool[: self.batch], self.pool[self.batch :]
            t = self.now()
            d = self.make_slice(self.work / "slices" / f"r{rnd:03d}" / SOURCE, MEDPIX, case_ids=set(take))
            try:
                self.step("ingest", ["ingest", str(d), *home, "--source", SOURCE, "--json"], rnd)
                self.ingested += take
                self.step("index", ["index", *home, "--device", "cpu", "--workers", "0", "--json"], rnd)
            except RuntimeError:
                break
            self.rounds.append({"round": rnd, "cases": len(take), "start": round(t, 1), "end": round(self.now(), 1)})
            rnd += 1


# ---------------------------------------------------------------------------- the clients
@dataclass
class Sample:
    kind: str
    t0: float
    t1: float
    status: int | str  # HTTP status, or "conn" (refused / reset) / "timeout" / "bad_body" (200, unreadable)
    generation: int | None = None  # the image index generation that answered a search


class Clients:
    """N threads, each cycling through the four kinds of request until the deadline."""

    def __init__(self, base: str, n: int, texts: list[str], uploads: list[bytes], seed_cases: list[int],
                 deadline: Deadline, t0: float) -> None:  # fmt: skip
        self.base, self.n, self.texts, self.uploads = base, n, texts, uploads
        self.seed_cases, self.deadline, self.t0 = seed_cases, deadline, t0
        self.samples: list[Sample] = []
        self.hit_rows: set[tuple[int, int | None]] = set()  # (case_id, image_id) from hits, citations, cases
        self.generations: set[int] = set()
        self.lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, args=(w,), daemon=True) for w in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, w: int) -> None:
        import httpx

        mine: list[Sample] = []
        rows: set[tuple[int, int | None]] = set()
        gens: set[int] = set()
        recent: list[tuple[int, int | None]] = []  # this client's last hits: what it views and drafts
        i = w
        c = httpx.Client(base_url=self.base, timeout=120)
        try:
            while not self.deadline.passed():
                kind = KINDS[i % len(KINDS)]
                t0 = time.perf_counter()
                status: int | str
                gen = None
                try:
                    r = self._request(c, kind, i, recent)
                    status = r.status_code
                    if status == 200:
                        body = r.json()
                        found = self._rows(kind, body)
                        rows.update(found)
                        if kind in ("text", "image"):
                            recent = [x for x in found if x[1] is not None][:10] or recent
                            gen = int(body["generation"]["image"])
                            gens.add(gen)
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.TransportError:
                    status = "conn"
                    c.close()
                    c = httpx.Client(base_url=self.base, timeout=120)
                    time.sleep(0.5)  # the server is restarting: do not spin
                except (ValueError, KeyError, TypeError):
                    status = "bad_body"
                mine.append(Sample(kind, t0 - self.t0, time.perf_counter() - self.t0, status, gen))
                i += self.n
        finally:
            c.close()
            with self.lock:
                self.samples += mine
                self.hit_rows |= rows
                self.generations |= gens

    def _request(self, c, kind: str, i: int, recent: list[tuple[int, int | None]]):
        if kind == "text":
            return c.post("/v1/search/text", json={"query": self.texts[i % len(self.texts)], "k": 10})
        if kind == "image":
            jpg = self.uploads[i % len(self.uploads)]
            return c.post("/v1/search/image", files={"file": ("q.jpg", jpg, "image/jpeg")}, data={"k": "10"})
        if kind == "case":
            case_id = recent[i % len(recent)][0] if recent else self.seed_cases[i % len(self.seed_cases)]
            return c.get(f"/v1/cases/{case_id}")
        if recent and (i // len(KINDS)) % 2:  # drafts: every other one by a hit's image id
            return c.post("/v1/drafts", data={"image_id": str(recent[i % len(recent)][1]), "generator": "extractive"})
        jpg = self.uploads[(i + 1) % len(self.uploads)]
        return c.post("/v1/drafts", files={"file": ("q.jpg", jpg, "image/jpeg")}, data={"generator": "extractive"})

    @staticmethod
    def _rows(kind: str, body: dict) -> list[tuple[int, int | None]]:
        if kind in ("text", "image"):
            return [(h["case_id"], h["image_id"]) for h in body["hits"]]
        if kind == "case":
            return [(body["case_id"], im["image_id"]) for im in body["images"]] or [(body["case_id"], None)]
        out = [(e["case_id"], e["image_id"]) for e in body["evidence"]]
        return out + [(c["case_id"], None) for s in body["sentences"] for c in s["citations"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--batch", type=int, default=3, help="New medpix cases per writer round.")
    ap.add_argument("--kill-prob", type=float, default=0.35, help="Chance that a writer run is SIGKILLed.")
    ap.add_argument("--base-home", type=Path, help="An indexed home with a medpix-2.0 source (copied).")
    ap.add_argument("--work", type=Path, help="Working folder (default: a new temporary one, removed after).")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args()
    from common import load_avg

    rng = random.Random(args.seed)
    work = (args.work or Path(__import__("tempfile").mkdtemp(prefix="soak-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    make_slice = _make_slice()
    t_setup = time.perf_counter()
    if args.base_home:
        shutil.copytree(args.base_home, home, symlinks=True)
    else:
        build_base(home, work, make_slice)
    base_cases = catalog_cases(home)
    if not base_cases:
        raise SystemExit(f"the base home has no {SOURCE} source")
    all_cases = medpix_cases()
    pool = [c for c in all_cases if c not in base_cases]
    rng.shuffle(pool)
    texts = sorted({json.loads(line).get("title") or "" for line in open(MEDPIX / "reports.jsonl")} - {""})
    rng.shuffle(texts)
    uploads = upload_images(24, rng)
    from medsearch.catalog import Catalog

    cat = Catalog.open(home / "catalog.db", create=False, readonly=True)
    seed_cases = [r.case_id for r in cat.cases_where()]
    cat.close()
    load_before = load_avg()
    print(f"soak: {args.seconds:.0f} s, {args.clients} clients, seed {args.seed}, work {work}; load {load_before}",
          flush=True)  # fmt: skip

    t0 = time.perf_counter()
    sup = Supervisor(home, free_port(), t0, work / "server.log")
    sup.start()
    sup.wait_ready(600)
    setup_s = time.perf_counter() - t_setup
    start = time.perf_counter()  # the soak's clock: the server answers
    deadline = Deadline(start + args.seconds)
    kill_at = start + args.seconds * rng.uniform(0.25, 0.45)
    writer = Writer(home, work, pool, args.batch, args.kill_prob, rng, deadline, t0, make_slice)
    clients = Clients(sup.base, args.clients, texts[:200], uploads, seed_cases, deadline, t0)
    try:
        writer.start()
        ct = threading.Thread(target=clients.run, daemon=True)
        ct.start()
        while time.perf_counter() < kill_at:
            time.sleep(0.1)
        sup.kill()
        print(f"  server SIGKILLed at {kill_at - start:.1f} s", flush=True)
        end, t_kill = deadline.at, time.perf_counter()
        while not sup.serving():  # the clients get --seconds of a serving server: push the end while it is down
            deadline.at = end + time.perf_counter() - t_kill
            if time.perf_counter() - t_kill > 900:
                raise SystemExit(f"the server did not serve again within 900 s; see {sup.log.name}")
            time.sleep(0.05)
        down = sup.windows()[-1]
        deadline.at = end + down[1] - down[0]
        print(f"  serving again after {down[1] - down[0]:.1f} s; the soak ends at {deadline.at - start:.0f} s",
              flush=True)  # fmt: skip
        ct.join()
        wall = time.perf_counter() - start
        print(f"  clients done: {len(clients.samples)} requests; waiting for the writer's last step", flush=True)
        writer.join(timeout=900)
        sup.wait_ready(600)
        served = served_matches(sup.base, home, 300)
    finally:
        deadline.at = 0  # on an error: clients and writer stop at their next step
        if writer.is_alive() and writer.proc is not None and writer.proc.poll() is None:
            os.killpg(writer.proc.pid, signal.SIGKILL)
        sup.stop()
    load_after = load_avg()

    expected = {k: all_cases[k] for k in base_cases} | {k: all_cases[k] for k in writer.ingested}
    rows = check_rows(home, expected, clients.hit_rows)
    chk = subprocess.run(cli("check", "--home", str(home), "--json"), cwd=REPO, env=cli_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    try:
        check = json.loads(chk.stdout)
    except ValueError:
        check = {"ok": False, "stdout": chk.stdout[-1000:], "stderr": chk.stderr[-1000:]}
    from medsearch.audit import verify

    v = verify(home / "audit.log")
    audit = {"ok": v.ok, "records": v.records, "problem": str(v.problem) if v.problem else None}
    windows = sup.windows()
    latency, errors = latency_table(clients.samples, args.seconds, windows)
    kills_by_step: dict[str, int] = {}
    for k in writer.kills:
        kills_by_step[k["step"]] = kills_by_step.get(k["step"], 0) + 1
    incs = sup.incarnations
    res = dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, setup_s=round(setup_s, 1),
        wall_s=round(wall, 1),
        load_before=load_before, load_after=load_after, latency=latency, errors=errors,
        generations=sorted(clients.generations), served_generations=sup.served, soak_start_s=round(start - t0, 1),
        server=dict(restarts=len(incs) - 1, planned_kills=sum(i.killed for i in incs),
                    unplanned_deaths=sum(1 for i in incs[:-1] if not i.killed),
                    windows=[(round(a, 1), round(b, 1)) for a, b in windows],
                    up_after_s=[round((i.answering or i.started) - (p.died or i.started), 1) for p, i in zip(incs, incs[1:], strict=False)],
                    serving_after_s=[round(b - a, 1) for a, b in windows],
                    incarnations=[{k: v for k, v in asdict(i).items() if k not in ("rss_mb", "threads")} for i in incs]),
        writer=dict(rounds=writer.rounds, kills=writer.kills, kills_by_step=kills_by_step, failures=writer.failures,
                    cases_added=len(writer.ingested)),
        rss=rss_trend(incs), rows=rows, timeline=timeline([astuple(x) for x in clients.samples]), served=served, check=check, audit=audit,
    )  # fmt: skip
    res["stray_tmp"] = sorted(str(x.relative_to(home)) for x in home.rglob("*.tmp"))  # left by a killed writer
    res["failed"] = gates(res)
    print(markdown(res), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    (work / "samples.json").write_text(json.dumps([astuple(x) for x in clients.samples]))  # every request
    print(f"wrote {args.out}")
    if args.work is None and not res["failed"]:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
