"""API load benchmark: N concurrent clients on loopback vs the same searches in-process.

    python benchmarks/api_load.py --home HOME [--clients 8] [--seconds 15] [--queries 40]

For text search and image search (an upload of new pixels: a catalog image re-encoded as JPEG,
so the server decodes and embeds it), each phase runs for a bounded time and reports requests/s
and p50/p95/p99 latency:

    in-process x1   Searcher called directly, one caller (the baseline)
    in-process xN   the same calls from N threads (same concurrency as the HTTP clients)
    http xN         N keep-alive clients against `medsearch serve` in a subprocess on 127.0.0.1

The difference between "http xN" and "in-process xN" is the API layer's cost (HTTP, JSON,
multipart, auth/rate-limit checks, audit log, metrics). The clients run on the same machine as the
server and take CPU from it, so on a small machine this is an upper bound of that cost.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queries(home: Path, n: int) -> tuple[list[str], list[bytes]]:
    """Text queries (case diagnoses/titles) and image uploads (catalog images re-encoded as JPEG)."""
    from PIL import Image

    from medsearch.catalog import Catalog
    from medsearch.imaging import load_image

    cat = Catalog.open(home / "catalog.db", create=False)
    try:
        texts = [
            r[0]
            for r in cat.db.execute(
                "SELECT DISTINCT coalesce(diagnosis, title) FROM cases WHERE coalesce(diagnosis, title) IS NOT NULL "
                "ORDER BY id LIMIT ?",
                [n],
            )
        ]
        rows = cat.db.execute(
            "SELECT path, frame FROM images WHERE status = 'ok' ORDER BY (id * 7919) % 1000003 LIMIT ?", [n]
        ).fetchall()
    finally:
        cat.close()
    images = []
    for path, frame in rows:
        im = load_image(path, frame=frame)
        im.thumbnail((768, 768), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return texts, images


def run_for(
    seconds: float, workers: int, call: Callable[[int], float | None]
) -> tuple[list[float], list[float], int, float]:
    """Run ``call(i)`` from ``workers`` threads until ``seconds`` pass.

    ``call`` returns the time the work itself took (server-side ``took_ms`` for HTTP, 0 in-process) or
    None on an error. Returns (latencies s, outside-the-work s per request, errors, wall s).
    """
    lat: list[float] = []
    extra: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(w: int) -> None:
        i = w
        mine: list[float] = []
        outside: list[float] = []
        bad = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            work = call(i)
            took = time.perf_counter() - t0
            mine.append(took)
            if work is None:
                bad += 1
            else:
                outside.append(took - work)
            i += workers
        with lock:
            lat.extend(mine)
            extra.extend(outside)
            errors[0] += bad

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, extra, errors[0], time.perf_counter() - t0


def summarise(name: str, kind: str, workers: int, result: tuple[list[float], list[float], int, float]) -> dict:
    lat, extra, errors, wall = result
    a = np.array(lat) * 1000
    p50, p95, p99 = (float(np.percentile(a, q)) for q in (50, 95, 99)) if len(a) else (0.0, 0.0, 0.0)
    outside = float(np.percentile(np.array(extra) * 1000, 50)) if extra else 0.0
    return dict(mode=name, kind=kind, clients=workers, n=len(a), errors=errors, rps=len(a) / wall, p50=p50,
                p95=p95, p99=p99, outside=outside)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, required=True, help="An indexed medsearch home (e.g. medpix-2.0).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0, help="Length of each phase.")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    home = args.home.expanduser().resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import httpx

    from medsearch.imaging import image_from_bytes
    from medsearch.search import Searcher

    load0 = os.getloadavg()[0]
    texts, images = queries(home, args.queries)
    print(f"home {home}: {len(texts)} text queries, {len(images)} image uploads "
          f"({sum(map(len, images)) / len(images) / 1024:.0f} KB avg), k={args.k}, {args.seconds:.0f} s per phase, "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip

    # ---- in-process baseline
    s = Searcher(home, device="cpu")
    s.warm()
    for q in texts:  # one warm-up pass over the query set (a fresh process runs its first passes slowly)
        s.search_text(q, k=args.k)
    for b in images:
        s.similar(image_from_bytes(b), k=args.k)

    def text_inproc(i: int) -> float | None:
        t0 = time.perf_counter()
        return time.perf_counter() - t0 if s.search_text(texts[i % len(texts)], k=args.k) else None

    def image_inproc(i: int) -> float | None:
        t0 = time.perf_counter()
        hits = s.similar(image_from_bytes(images[i % len(images)], name="upload"), k=args.k)
        return time.perf_counter() - t0 if hits else None

    rows = []
    for kind, fn in (("text", text_inproc), ("image", image_inproc)):
        for w in (1, args.clients):
            rows.append(summarise(f"in-process x{w}", kind, w, run_for(args.seconds, w, fn)))
            print(f"  done {rows[-1]['mode']} {kind}", flush=True)

    # ---- the HTTP server in its own process
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="api-load-"))
    cmd = [sys.executable, "-m", "cli.main", "serve", "--home", str(home), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--rate-limit", "0", "--watch", "0", "--audit-log", str(tmp / "audit.log"),
           "--keys-file", str(tmp / "keys.json"), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/v1/health", timeout=2).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {tmp / 'server.log'}")
            time.sleep(0.5)
        clients = [httpx.Client(base_url=base, timeout=60) for _ in range(args.clients)]
        for q in texts:  # the same warm-up pass in the server
            clients[0].post("/v1/search/text", json={"query": q, "k": args.k})
        for b in images:
            clients[0].post("/v1/search/image", files={"file": ("q.jpg", b, "image/jpeg")}, data={"k": args.k})

        def served(r: httpx.Response) -> float | None:
            return r.json()["took_ms"] / 1000 if r.status_code == 200 else None

        def text_http(i: int) -> float | None:
            c = clients[i % args.clients]
            return served(c.post("/v1/search/text", json={"query": texts[i % len(texts)], "k": args.k}))

        def image_http(i: int) -> bool:
            c = clients[i % args.clients]
            r = c.post("/v1/search/image", files={"file": ("q.jpg", images[i % len(images)], "image/jpeg")},
                       data={"k": str(args.k)})  # fmt: skip
            return served(r)

        import psutil

        rss = []
        proc = psutil.Process(server.pid)
        for kind, fn in (("text", text_http), ("image", image_http)):
            for w in (1, args.clients):
                rows.append(summarise(f"http x{w}", kind, w, run_for(args.seconds, w, fn)))
                rss.append(proc.memory_info().rss)
                print(f"  done {rows[-1]['mode']} {kind} (server RSS {rss[-1] / 2**20:.0f} MiB)", flush=True)
        audit_lines = sum(1 for _ in open(tmp / "audit.log"))
    finally:
        server.terminate()
        server.wait(20)

    print()
    print(f"{'mode':<16} {'kind':<6} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'outside p50':>12}")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["kind"] != "text", r["mode"].startswith("http"), r["clients"])):
        print(f"{r['mode']:<16} {r['kind']:<6} {r['clients']:>7} {r['n']:>8} {r['errors']:>6} {r['rps']:>8.1f} "
              f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {r['outside']:>12.1f}")  # fmt: skip
    print()
    for kind in ("text", "image"):
        for w in (1, args.clients):
            inp = next(r for r in rows if r["kind"] == kind and r["mode"] == f"in-process x{w}")
            http = next(r for r in rows if r["kind"] == kind and r["mode"] == f"http x{w}")
            print(f"API overhead, {kind} x{w}: p50 {http['p50'] - inp['p50']:+.1f} ms, "
                  f"throughput {100 * (http['rps'] / inp['rps'] - 1):+.0f}% vs in-process x{w}")  # fmt: skip
    print("outside p50: client latency minus the server's own took_ms per request (HTTP, parsing, queueing)")
    print(f"server RSS after each HTTP phase: {', '.join(f'{r / 2**20:.0f}' for r in rss)} MiB")
    print(f"audit log lines written by the server: {audit_lines}; "
          f"load average during the run: {load0:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
