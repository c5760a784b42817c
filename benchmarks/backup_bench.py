"""Online backup: how long `backup` and `restore` take, and what they do to a server's latency.

    python benchmarks/backup_bench.py --home HOME [--clients 4] [--seconds 10]
    python benchmarks/backup_bench.py --build 200          # a home of 200 medpix-2.0 cases (towers)

Phases, each ``--seconds`` long, with ``--clients`` keep-alive clients sending text searches to
`medsearch serve` (a subprocess on 127.0.0.1):

    idle      no backup running (the baseline)
    backup    backups of the served home taken back to back into a temp folder

then one restore of the last backup plus `check` on it. Prints backup seconds (median/max),
MB and MB/s, the catalog snapshot and index copy times, restore seconds, and the clients'
requests/s and p50/p95/p99 per phase. The clients and the backup share the server's CPUs, so on
a small machine the latency change is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"
QUERIES = ["pneumonia", "ring enhancing brain lesion", "rib fracture", "pleural effusion", "liver mass",
           "subdural hematoma", "bowel obstruction", "renal cyst", "pulmonary nodule", "spinal cord compression",
           "ground glass opacities", "aortic dissection"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_home(root: Path, n_cases: int) -> Path:
    """A home with the first ``n_cases`` medpix-2.0 cases, ingested and indexed with the towers."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_slice

    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths
    from medsearch.encoders.registry import load_encoder

    data = make_slice(root / "data" / "medpix-2.0", MEDPIX, n_cases=n_cases)
    home = root / "home"
    cat = Catalog.open(home / "catalog.db")
    try:
        ingest_path(cat, data)
        run_index(cat, load_encoder("towers", device="cpu"), Paths(home), config=EmbedConfig(workers=0),
                  progress=False)  # fmt: skip
    finally:
        cat.close()
    return home


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    a = np.asarray(xs) * 1000
    return {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}


class Clients:
    """``n`` threads sending text searches until stopped; latencies are kept per phase label."""

    def __init__(self, base: str, n: int, queries: list[str]) -> None:
        import httpx

        self.base, self.queries, self.phase = base, queries, "idle"
        self.lat: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = [httpx.Client(timeout=60) for _ in range(n)]
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        c, j = self._clients[i], i
        while not self._stop.is_set():
            q = self.queries[j % len(self.queries)]
            j += len(self._clients)
            phase, t0 = self.phase, time.perf_counter()
            try:
                ok = c.post(f"{self.base}/v1/search/text", json={"query": q, "k": 10}).status_code == 200
            except Exception:  # noqa: BLE001 - counted as an error, the run goes on
                ok = False
            dt = time.perf_counter() - t0
            with self._lock:
                if ok:
                    self.lat.setdefault(phase, []).append(dt)
                else:
                    self.errors[phase] = self.errors.get(phase, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        for c in self._clients:
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, help="an indexed home (only read)")
    ap.add_argument("--build", type=int, default=0, help="build a home of this many medpix-2.0 cases instead")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    from common import load_avg

    work = Path(tempfile.mkdtemp(prefix="backup-bench-"))
    try:
        home = args.home.expanduser().resolve() if args.home else build_home(work, args.build or 200)
        print(f"home {home}  load {load_avg()}", flush=True)
        from medsearch.catalog import Catalog

        cat = Catalog.open(home / "catalog.db", create=False)
        try:
            counts = cat.counts()
        finally:
            cat.close()
        port = free_port()
        log = open(work / "server.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--home", str(home), "--port", str(port),
                                 "--device", "cpu", "--rate-limit", "0", "--watch", "0", "--audit-log",
                                 str(work / "audit.log"), "--log-level", "warning"],
                                cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            result = _measure(args, home, work, proc, f"http://127.0.0.1:{port}", counts)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
            log.close()
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, home: Path, work: Path, proc: subprocess.Popen, base: str,
             counts: dict) -> dict:  # fmt: skip
    import httpx
    from common import load_avg

    from medsearch.backup import backup, restore

    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    clients = Clients(base, args.clients, QUERIES)
    clients.start()
    time.sleep(2.0)  # warm-up, not counted
    clients.lat.clear()
    clients.errors.clear()
    time.sleep(args.seconds)
    clients.phase = "backup"
    runs = []
    t_end = time.time() + args.seconds
    while time.time() < t_end or not runs:
        dest = work / f"b{len(runs)}"
        out = backup(home, dest)
        man = json.loads((dest / "backup.json").read_text())
        runs.append({"seconds": out["seconds"], "bytes": out["bytes"], "catalog_s": man["catalog"]["seconds"],
                     "index_copy_s": man["index_copy_seconds"], "repaired": bool(out["repaired"])})  # fmt: skip
        if len(runs) > 1:
            shutil.rmtree(work / f"b{len(runs) - 2}")
    clients.phase = "after"
    clients.stop()
    proc.terminate()
    proc.wait(timeout=60)
    t0 = time.perf_counter()
    rep = restore(work / f"b{len(runs) - 1}", work / "restored")
    restore_s = time.perf_counter() - t0
    secs = [r["seconds"] for r in runs]
    mb = runs[-1]["bytes"] / 1e6
    result = {
        "home": str(home), "counts": counts, "load": load_avg(), "clients": args.clients,
        "backups": len(runs), "backup_s_median": round(float(np.median(secs)), 3), "backup_s_max": max(secs),
        "backup_mb": round(mb, 1), "mb_per_s": round(mb / float(np.median(secs)), 1),
        "catalog_snapshot_s_median": round(float(np.median([r["catalog_s"] for r in runs])), 3),
        "index_copy_s_median": round(float(np.median([r["index_copy_s"] for r in runs])), 3),
        "repaired_in_copy": sum(r["repaired"] for r in runs), "restore_s": round(restore_s, 3),
        "restore_check_ok": rep["check"]["ok"],
        "latency": {ph: {"requests": len(clients.lat.get(ph, [])), "rps": round(len(clients.lat.get(ph, [])) /
                         args.seconds, 1), **pct(clients.lat.get(ph, [])), "errors": clients.errors.get(ph, 0)}
                    for ph in ("idle", "backup")},
    }  # fmt: skip
    print(f"catalog {counts}; {len(runs)} backups of {mb:.1f} MB: median {result['backup_s_median']} s, "
          f"max {result['backup_s_max']} s ({result['mb_per_s']} MB/s); catalog snapshot "
          f"{result['catalog_snapshot_s_median']} s, index copy {result['index_copy_s_median']} s (median); "
          f"restore + check {result['restore_s']} s (ok={rep['check']['ok']})")  # fmt: skip
    print(f"| phase | requests/s | p50 ms | p95 ms | p99 ms | errors |   ({args.clients} clients, "
          f"{args.seconds:.0f} s each, load {load_avg()})\n|---|---|---|---|---|---|")  # fmt: skip
    for ph, v in result["latency"].items():
        print(f"| {ph} | {v['rps']} | {v['p50']} | {v['p95']} | {v['p99']} | {v['errors']} |")
    return result


if __name__ == "__main__":
    main()
