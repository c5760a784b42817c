"""PACS benchmark: DICOMweb sync from a real Orthanc and the C-STORE listener, side by side with baselines.

    python benchmarks/pacs_bench.py [--slices 300] [--studies 1000] [--size 512] [--out benchmarks/results/pacs_bench.md]

1. Sync of one CT study of --slices slices (real medpix pixels, --size px) at ``--slices 8`` against
   ``--slices all``: instances fetched, seconds to sync (fetch, de-identify, render), seconds to embed
   with the towers as ``medsearch index`` does (default EmbedConfig; model loaded before the clock
   starts), vectors and catalog bytes; instances/s end to end; CPU seconds of this process.
2. Listener: the same study pushed with dcmtk's storescu to ``medsearch listen`` (de-identify, spool;
   rendering happens in the ingest round) and, as the baseline, to dcmtk's own storescp (writes the
   files as they come); instances/s received, and seconds from the end of the push to searchable
   (indexed) with --index-every 5. Each twice: storescu as shipped (dcmtk 3.6.7 leaves Nagle's
   algorithm on, so every PDU header/data pair waits for the peer's delayed ACK, ~40 ms) and with
   ``TCP_NODELAY=1`` in its environment (dcmtk's switch to disable Nagle).
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


def bench_listener(root: Path, files: list[Path], towers, nodelay: bool) -> dict:
    from orthanc import free_port

    from indexer.embed import run_index
    from indexer.listen import ListenConfig, Listener
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    home = _home(root, f"listen-{int(nodelay)}")
    done: list[float] = []

    def index(cat):  # what `medsearch listen` runs each round
        run_index(cat, towers, Paths(home), config=EmbedConfig(workers=0), progress=False)
        if cat.count_vectors(towers.model_id, "image") >= len(files):
            done.append(time.perf_counter())

    lis = Listener(home, ListenConfig(port=free_port(), index_every=5), index=index).start()
    try:
        t0 = time.perf_counter()
        subprocess.run(["storescu", "-aec", "MEDSEARCH", "127.0.0.1", str(lis.port), *map(str, files)], check=True,
                       capture_output=True, env=_storescu_env(nodelay))  # fmt: skip
        t1 = time.perf_counter()
        spooled = lis.stats.spooled
        deadline = time.monotonic() + 300
        while not done and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        lis.stop(drain=False)
    cat = Catalog.open(home / "catalog.db", readonly=True)
    n = cat.counts()["images"]
    cat.close()
    return {"received": spooled, "push_s": t1 - t0, "inst_per_s": spooled / (t1 - t0),
            "to_searchable_s": (done[0] - t1) if done else None, "catalogued": n}


def bench_storescp(root: Path, files: list[Path], nodelay: bool) -> dict:
    from orthanc import free_port

    out = root / f"storescp-{int(nodelay)}"
    out.mkdir()
    port = free_port()
    p = subprocess.Popen(["storescp", "-aet", "BASE", "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=_storescu_env(nodelay))  # fmt: skip
    try:
        for _ in range(100):
            if subprocess.run(["echoscu", "-aec", "BASE", "127.0.0.1", str(port)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        t0 = time.perf_counter()
        subprocess.run(["storescu", "-aec", "BASE", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True, env=_storescu_env(nodelay))  # fmt: skip
        dt = time.perf_counter() - t0
    finally:
        p.terminate()
        p.wait()
    return {"received": len(list(out.iterdir())), "push_s": dt, "inst_per_s": len(files) / dt}


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
    ap.add_argument("--only", choices=("sync",), default=None, help="run only the sync benchmark")
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
        towers = load_encoder("towers", device="cpu")
        study = ct_series(args.slices, study_uid=generate_uid(), series_uid=generate_uid(), size=args.size)
        files = write_series(study, root / "study")
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
            return _write(lines, args.out)
        lines.append(f"\n## C-STORE receive of the same {args.slices} instances (dcmtk storescu, one association)\n")
        lines.append("| receiver | storescu | instances | push s | instances/s | end of push -> searchable s (--index-every 5) |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for nodelay in (False, True):
            lis = bench_listener(root, files, towers, nodelay)
            base = bench_storescp(root, files, nodelay)
            how = "TCP_NODELAY=1" if nodelay else "as shipped (Nagle on)"
            reach = f"{lis['to_searchable_s']:.1f}" if lis["to_searchable_s"] is not None else "not reached"
            lines.append(f"| medsearch listen (de-identify, spool; fsync each) | {how} | {lis['received']} | "
                         f"{lis['push_s']:.2f} | {lis['inst_per_s']:.0f} | {reach} |")
            lines.append(f"| baseline: dcmtk storescp (writes files, no fsync) | {how} | {base['received']} | "
                         f"{base['push_s']:.2f} | {base['inst_per_s']:.0f} | - |")
        lines.append(f"\nLoad after the listener runs: {load_avg()}.")
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
    _write(lines, args.out)


def _write(lines: list[str], out: Path | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
