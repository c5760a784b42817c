"""PACS benchmark: DICOMweb sync from a real Orthanc and the C-STORE listener, side by side with baselines.

    python benchmarks/pacs_bench.py [--slices 300] [--studies 1000] [--size 512] [--out benchmarks/results/pacs_bench.md]

1. Sync of one CT study of --slices slices (real medpix pixels, --size px) at ``--slices 8`` against
   ``--slices all``: instances fetched, seconds to sync (fetch, de-identify, render), seconds to embed
   with the towers as ``medsearch index`` does (default EmbedConfig; model loaded before the clock
   starts), vectors and catalog bytes; instances/s end to end; CPU seconds of this process.
2. Listener (``--only listener`` runs just this): the same study pushed with dcmtk's storescu
   (``TCP_NODELAY=1``: dcmtk 3.6.7 leaves Nagle's algorithm on otherwise, ~40 ms per PDU pair) over 1
   and ``--associations`` parallel associations to: dcmtk's own storescp (C++, writes files), a bare
   pynetdicom SCP with a no-op handler, and ``Listener`` with the pynetdicom engine (before) and the
   native one (``indexer.dimse``), with and without fsync; rows interleaved ``--repeats`` times so
   they share the machine's load; instances/s and CPU ms per instance. Then push -> searchable at
   --index-every 5 (towers, as ``medsearch listen`` embeds): one batch per round against batches of
   64 and 32: when the first generation is published, per-instance latency (acknowledged ->
   searchable), end of push -> all searchable, the process's CPU seconds and the round's stages.
3. Peak RSS of a sync of 100 and of --studies one-slice studies (each in a fresh process; VmHWM of
   the child: ``ru_maxrss`` would carry the parent's peak, the loaded towers, across fork + exec).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what `medsearch index` and `medsearch listen` set
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import load_avg  # noqa: E402


def _dicom_bytes(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _home(root: Path, name: str) -> Path:
    from medsearch.catalog import Catalog

    h = root / name
    h.mkdir()
    Catalog.open(h / "catalog.db").close()
    return h


def _cpu(children: bool = False) -> float:
    """CPU seconds of this process (with ``children``: plus its finished children, e.g. DataLoader workers)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN) if children else None
    return r.ru_utime + r.ru_stime + (c.ru_utime + c.ru_stime if c else 0.0)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process so far, from /proc (Orthanc's share of the 2 cores)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_sync(orthanc, root: Path, towers, slices: int | None, embed: str = "index") -> dict:
    """One sync of the study into a fresh home, then `medsearch index`'s work (run_index), timed together.

    ``embed``: "index" embeds in the index pass (DataLoader workers read the PNGs back, as before);
    "sync" embeds during the sync from the rendered pixels (``sync_dicomweb(encoder=...)``, towers loaded
    before the clock); "sync+load" the same with the towers loaded by the sync, in its embedding thread,
    inside the clock (what a fresh `medsearch ingest ... --embed` process pays)."""
    from indexer.embed import run_index
    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    home = _home(root, f"sync-{slices or 'all'}-{embed.replace('+', '-')}-{time.monotonic_ns()}")
    cat = Catalog.open(home / "catalog.db")
    encoder = None
    if embed.startswith("sync") and "+load" not in embed:
        encoder = towers
    elif embed.startswith("sync+load"):
        from medsearch.encoders.registry import load_encoder

        encoder = lambda: load_encoder("towers", device="cpu")  # noqa: E731
    t0, c0, o0, a0 = time.perf_counter(), _cpu(), _proc_cpu(orthanc.proc.pid), _cpu(children=True)
    kw = {"encoder": encoder} if encoder is not None else {}  # (runs against older code too, for before/after)
    threads = {"embed_threads": int(embed.split("-t")[1])} if "-t" in embed else {}  # e.g. "sync-t1"
    s = sync_dicomweb(cat, home, DicomwebConfig(url=f"dicomweb+{orthanc.dicomweb}", slices=slices, **threads), **kw)
    t1, c1, o1 = time.perf_counter(), _cpu(), _proc_cpu(orthanc.proc.pid)
    index_enc = encoder() if callable(encoder) and not hasattr(encoder, "encode_image_batch") else towers
    t1b = time.perf_counter() if index_enc is not towers else t1  # the index pass has nothing left to embed
    e = run_index(cat, index_enc, Paths(home), config=EmbedConfig(), progress=False)  # what `medsearch index` runs
    t2, a2, o2 = time.perf_counter(), _cpu(children=True), _proc_cpu(orthanc.proc.pid)
    total = (t1 - t0) + (t2 - t1b)
    vectors = cat.count_vectors(towers.model_id, "image")
    cat.close()
    nbytes = sum(p.stat().st_size for p in home.rglob("catalog.db*"))
    images = sum(p.stat().st_size for p in (home / "images").rglob("*.png"))
    return {"slices": "all" if slices is None else slices, "embed": embed, "fetched": s.instances_fetched,
            "sync_s": t1 - t0, "embed_s": t2 - t1b, "total_s": total, "vectors": vectors, "catalog_bytes": nbytes,
            "display_bytes": images, "inst_per_s": s.instances_fetched / total, "embedded": e.images_embedded,
            "in_sync": getattr(s, "images_embedded", 0), "sync_cpu_s": c1 - c0, "orthanc_cpu_s": o1 - o0,
            "all_cpu_s": (a2 - a0) + (o2 - o0),
            "stages": s.stage_seconds}  # fmt: skip


def sync_table(rows: list[dict]) -> list[str]:
    lines = ["| --slices | embedded | instances fetched | sync s | sync CPU s | Orthanc CPU s | index s | total s | "
             "CPU s end to end | CPU ms per instance | vectors | display PNG bytes | instances/s end to end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    def where(mode: str) -> str:
        if mode == "index":
            return "in `index` (PNG read back)"
        how = "towers loaded in the clock" if "+load" in mode else "towers loaded"
        return f"in the sync ({how}{', torch threads ' + mode.split('-t')[1] if '-t' in mode else ''})"

    for r in rows:
        lines.append(f"| {r['slices']} | {where(r['embed'])} | {r['fetched']} | {r['sync_s']:.2f} | {r['sync_cpu_s']:.2f} | "
                     f"{r['orthanc_cpu_s']:.2f} | {r['embed_s']:.2f} | {r['total_s']:.2f} | {r['all_cpu_s']:.2f} | "
                     f"{1000 * r['all_cpu_s'] / max(1, r['fetched']):.0f} | {r['vectors']} | "
                     f"{r['display_bytes']:,} | {r['inst_per_s']:.1f} |")  # fmt: skip
    for r in rows:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
        lines.append(f"\n--slices {r['slices']}, embedded {r['embed']}: sync stages (s): {stages}; index {r['embed_s']:.2f}.")
    return lines


def _storescu_env(nodelay: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return {**env, "TCP_NODELAY": "1"} if nodelay else env


def _push(port: int, ae: str, files: list[Path], nodelay: bool, associations: int = 1) -> float:
    """Seconds for ``associations`` storescu processes (one association each, files dealt round-robin) to push."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", ae, "127.0.0.1", str(port), *map(str, files[i::associations])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_storescu_env(nodelay))
             for i in range(associations)]  # fmt: skip
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"storescu exited {p.returncode}: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def bench_listener(root: Path, files: list[Path], towers, nodelay: bool, *, engine: str = "native",
                   fsync: bool = True, associations: int = 1, batch: int = 64) -> dict:  # fmt: skip
    """Push ``files`` to a Listener. ``towers`` None: receive only (no ingest round during the push), with the
    CPU seconds of this process per instance; else rounds every 5 s embedding with ``towers`` as `medsearch
    listen` does, and the seconds from each instance spooled to searchable (its vector in a published index)."""
    import threading

    from orthanc import free_port

    from indexer.embed import run_index
    from indexer.listen import ListenConfig, Listener
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    home = _home(root, f"listen-{engine}-{int(nodelay)}-{int(fsync)}-{associations}-{batch}-{time.monotonic_ns()}")
    published: list[tuple[float, int]] = []  # (time, vectors in the published index)

    embed = {"images": 0.0, "texts": 0.0, "indexes": 0.0}  # run_index's own split, summed over batches

    def index(cat):  # what `medsearch listen` runs each batch
        e = run_index(cat, towers, Paths(home), config=EmbedConfig(workers=0), progress=False)
        for k, v in (("images", e.image_seconds), ("texts", e.text_seconds), ("indexes", e.index_seconds)):
            embed[k] += v
        published.append((time.perf_counter(), cat.count_vectors(towers.model_id, "image")))

    cfg = ListenConfig(port=free_port(), index_every=5 if towers else 3600, engine=engine, fsync=fsync, batch=batch)
    lis = Listener(home, cfg, index=index if towers else None).start()
    spooled: list[tuple[float, int]] = []
    watching = threading.Event()

    def watch() -> None:  # when the k-th instance was spooled (acknowledged)
        while not watching.is_set():
            spooled.append((time.perf_counter(), lis.stats.spooled))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        time.sleep(0.5)  # the first (empty) round has run
        watcher.start()
        c0 = _cpu()
        push_s = _push(lis.port, "MEDSEARCH", files, nodelay, associations)
        cpu = _cpu() - c0
        t1 = time.perf_counter()
        n = lis.stats.spooled
        deadline = time.monotonic() + 600
        while towers and (not published or published[-1][1] < n) and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu_all = _cpu() - c0  # receive, render, store, embed, index: all of it in this process
        watching.set()
        watcher.join()
    finally:
        lis.stop(drain=False)
    out = {"engine": engine, "fsync": fsync, "associations": associations, "batch": batch, "received": n,
           "push_s": push_s, "inst_per_s": n / push_s, "cpu_ms_per_inst": 1000 * cpu / max(n, 1)}  # fmt: skip
    if towers:
        def first(series: list[tuple[float, int]], k: int) -> float | None:
            return next((t for t, c in series if c >= k), None)

        lat = [first(published, k) - first(spooled, k) for k in range(1, n + 1) if first(published, k)]
        cat = Catalog.open(home / "catalog.db", readonly=True)
        out.update(catalogued=cat.counts()["images"], generations=len(published),
                   to_searchable_s=(published[-1][0] - t1) if published and published[-1][1] >= n else None,
                   first_searchable_s=(published[0][0] - spooled[0][0]) if published else None,
                   latency_max_s=max(lat) if len(lat) == n else None, latency_p50_s=sorted(lat)[len(lat) // 2] if lat else None,
                   stages=dict(lis.stats.stage_seconds), embed=embed, cpu_s=cpu_all)  # fmt: skip
        cat.close()
    return out


def bench_storescp(root: Path, files: list[Path], nodelay: bool, associations: int = 1) -> dict:
    from orthanc import free_port

    out = root / f"storescp-{int(nodelay)}-{associations}-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    p = subprocess.Popen(["storescp", "-aet", "BASE", "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=_storescu_env(nodelay))  # fmt: skip
    try:
        for _ in range(100):
            if subprocess.run(["echoscu", "-aec", "BASE", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        dt = _push(port, "BASE", files, nodelay, associations)
    finally:
        p.terminate()
        p.wait()
    n = len(list(out.iterdir()))
    shutil.rmtree(out, ignore_errors=True)
    return {"received": n, "push_s": dt, "inst_per_s": len(files) / dt}


def bench_pynetdicom_noop(files: list[Path], nodelay: bool, associations: int = 1) -> dict:
    """A bare pynetdicom SCP whose C-STORE handler answers success at once: pynetdicom's own cost."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from indexer.listen import ALL_TRANSFER_SYNTAXES, _no_delay

    ae = AE(ae_title="MEDSEARCH")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    got = []
    handlers = [(evt.EVT_C_STORE, lambda e: got.append(1) or 0x0000), (evt.EVT_CONN_OPEN, _no_delay)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        c0 = _cpu()
        dt = _push(server.server_address[1], "MEDSEARCH", files, nodelay, associations)
        cpu = _cpu() - c0
    finally:
        server.shutdown()
    return {"received": len(got), "push_s": dt, "inst_per_s": len(got) / dt, "cpu_ms_per_inst": 1000 * cpu / len(got)}


def listener_report(root: Path, files: list[Path], towers, repeats: int = 2, associations: int = 4,
                    searchable: tuple[tuple[int, int], ...] = ((0, 1), (64, 1), (32, 1), (64, 4))) -> list[str]:
    """The listener tables: receive rates (each receiver, 1 and ``associations`` associations, runs interleaved
    ``repeats`` times so they share the load), then push -> searchable with batches against one round."""
    lines = [f"\n## C-STORE receive of {len(files)} instances (dcmtk storescu, TCP_NODELAY=1)\n",
             f"Load before: {load_avg()}. Each row: {repeats} runs interleaved with the other rows (median shown, "
             "all runs in brackets); CPU ms = this process's CPU seconds during the push per instance.\n",
             "| receiver | associations | instances/s | CPU ms/instance |", "| --- | --- | --- | --- |"]  # fmt: skip
    kinds = {"dcmtk storescp (C++, writes files, no fsync)": lambda a: bench_storescp(root, files, True, a),
             "bare pynetdicom SCP, no-op handler": lambda a: bench_pynetdicom_noop(files, True, a),
             "listen, pynetdicom engine (before), fsync": lambda a: bench_listener(root, files, None, True, engine="pynetdicom", associations=a),
             "listen, native engine, fsync": lambda a: bench_listener(root, files, None, True, associations=a),
             "listen, native engine, no fsync (kill-safe)": lambda a: bench_listener(root, files, None, True, fsync=False, associations=a)}  # fmt: skip
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(repeats):
        for a in sorted({1, associations}):
            for name, fn in kinds.items():
                runs.setdefault((name, a), []).append(fn(a))
    for (name, a), rs in runs.items():
        rates = sorted(r["inst_per_s"] for r in rs)
        cpu = sorted(r.get("cpu_ms_per_inst", 0) for r in rs)
        assert all(r["received"] == len(files) for r in rs), (name, rs)
        cpu_s = f"{cpu[len(cpu) // 2]:.1f}" if "storescp" not in name else "-"
        lines.append(f"| {name} | {a} | {rates[len(rates) // 2]:.0f} ({', '.join(f'{x:.0f}' for x in rates)}) | {cpu_s} |")
    lines.append(f"\nLoad after: {load_avg()}.")
    if towers is None:
        return lines
    lines += [f"\n## Push -> searchable, {len(files)} instances, --index-every 5, towers on CPU (EmbedConfig(workers=0))\n",
              f"Load before: {load_avg()}.\n",
              "| ingest rounds | associations | instances/s received | generations | first searchable s | "
              "latency p50 s | latency max s | end of push -> all searchable s | CPU s | round s: render, fsync, store, index (embed images, texts, build indexes) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for batch, a in searchable:  # (batch, associations)
        r = bench_listener(root, files, towers, True, batch=batch, associations=a)

        def f(v):
            return "-" if v is None else f"{v:.1f}"

        how = "one batch per round (before)" if batch == 0 else f"batches of {batch}"
        lines.append(f"| {how} | {a} | {r['inst_per_s']:.0f} | {r['generations']} | {f(r['first_searchable_s'])} | "
                     f"{f(r['latency_p50_s'])} | {f(r['latency_max_s'])} | {f(r['to_searchable_s'])} | {f(r['cpu_s'])} | "
                     f"{', '.join(f(r['stages'].get(k)) for k in ('render', 'fsync', 'store', 'index'))} "
                     f"({', '.join(f(v) for v in r['embed'].values())}) |")  # fmt: skip
        lines.append(f"<!-- load {load_avg()} -->")
    lines.append(f"\nLoad after: {load_avg()}. Latency: from an instance acknowledged to the first published "
                 "index holding its vector (FIFO: the k-th spooled against the k-th embedded).")
    return lines


RSS_CHILD = """
import json, sys
from pathlib import Path
from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb
from medsearch.catalog import Catalog
home = Path(sys.argv[1]); home.mkdir()
cat = Catalog.open(home / "catalog.db")
mods = tuple(sys.argv[3].split(",")) if sys.argv[3] else ()
s = sync_dicomweb(cat, home, DicomwebConfig(url=sys.argv[2], slices=8, modalities=mods))
cat.close()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"studies": s.studies_synced, "seconds": s.seconds, "peak_rss_mb": int(hwm) / 1024}))
"""


def bench_rss(orthanc, root: Path, name: str, modalities: str) -> dict:
    """Peak RSS of a fresh process that syncs the studies matching ``modalities`` ("" = all) into a fresh home."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(root / f"rss-{name}"), f"dicomweb+{orthanc.dicomweb}",
                        modalities], env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", choices=["listener", "sync"], default=None, help="run only the listener or the sync tables")
    ap.add_argument("--associations", type=int, default=4, help="parallel storescu associations of the listener rows")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each listener receive row")
    ap.add_argument("--no-searchable", action="store_true", help="listener: receive rates only (no towers)")
    ap.add_argument("--sync-modes", default="index,sync,sync+load", help="where the sync rows embed (bench_sync)")
    ap.add_argument("--sync-rounds", type=int, default=1, help="rounds of the sync rows (alternating modes)")
    args = ap.parse_args()
    from orthanc import OrthancServer
    from pacs_data import ct_series, write_series
    from pydicom.uid import generate_uid

    from medsearch.encoders.registry import load_encoder

    root = Path(tempfile.mkdtemp(prefix="pacs-bench-"))
    lines = [f"# PACS benchmark\n\n`python benchmarks/pacs_bench.py --slices {args.slices} --studies {args.studies} "
             f"--size {args.size}`; load before: {load_avg()}\n"]  # fmt: skip
    try:
        towers = None if args.only == "listener" and args.no_searchable else load_encoder("towers", device="cpu")
        study = ct_series(args.slices, study_uid=generate_uid(), series_uid=generate_uid(), size=args.size)
        files = write_series(study, root / "study")
        if args.only == "listener":
            lines[0] = (f"# C-STORE listener benchmark\n\n`python benchmarks/pacs_bench.py --only listener --slices "
                        f"{args.slices} --size {args.size} --associations {args.associations}`\n")  # fmt: skip
            lines += listener_report(root, files, towers, repeats=args.repeats, associations=args.associations)
            _emit(lines, args.out)
            return
        with OrthancServer(root / "orthanc") as o:
            for ds in study:
                o.upload(_dicom_bytes(ds))
            modes = args.sync_modes.split(",")
            rows = [bench_sync(o, root, towers, n, m) for _ in range(args.sync_rounds) for n in (8, None)
                    for m in modes]  # fmt: skip
        lines.append(f"## Sync of one {args.slices}-slice CT study ({args.size} px) from Orthanc on loopback, towers on CPU\n")
        lines.extend(sync_table(rows))
        lines.append(f"\nLoad after the sync: {load_avg()}.")
        if args.only == "sync":
            return _emit(lines, args.out)
        lines += listener_report(root, files, towers, associations=args.associations)
        # RSS: args.studies one-slice studies, the first 100 of them MR so a modality filter syncs exactly 100
        with OrthancServer(root / "orthanc-many") as o:
            for i in range(args.studies):
                ds = ct_series(1, study_uid=generate_uid(), series_uid=generate_uid(), size=64,
                               patient={"PatientID": f"P{i:05d}"})[0]  # fmt: skip
                if i < 100:
                    ds.Modality = "MR"
                o.upload(_dicom_bytes(ds))
            small = bench_rss(o, root, "100", "MR")  # the first 100 studies are MR: exactly 100 synced
            big = bench_rss(o, root, "all", "")
        lines.append("\n## Peak RSS of a sync (fresh process each, 64 px one-slice studies, QIDO pages of 100)\n")
        lines.append("| studies synced | seconds | studies/s | peak RSS MB |")
        lines.append("| --- | --- | --- | --- |")
        for r in (small, big):
            lines.append(f"| {r['studies']} | {r['seconds']:.1f} | {r['studies'] / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        lines.append(f"\nPeak RSS grows {100 * (big['peak_rss_mb'] / small['peak_rss_mb'] - 1):+.1f}% from "
                     f"{small['studies']} to {big['studies']} studies. Load after: {load_avg()}.")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _emit(lines, args.out)


def _emit(lines: list[str], out: Path | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
