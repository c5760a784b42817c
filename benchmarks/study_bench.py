"""DICOM studies: cost of --slices, whole-study query latency, ingest memory in the number of studies.

    PYTHONPATH=$PWD python benchmarks/study_bench.py [--part volume,query,memory] [--slices-count 300]

Prints three tables:
  volume  a CT study of 300 slices (real medpix pixels, tests/dicom_studies.ct_series) ingested and
          indexed at --slices 8 and at --slices all: vectors, catalog bytes, ingest and index seconds
          (towers image encoder on CPU: the lite model runs the same image tower plus a small head).
  query   an 8-slice study query against 10,000 studies x 8 embedded slices. The 10,000 studies are
          synthetic vectors (random unit vectors, clustered per study) stored in a real catalog and a
          real FAISS index; the query study is real DICOM encoded by the towers (after model load).
  memory  peak RSS of a fresh process ingesting 100 and 1,000 synthetic studies (4 slices of 64x64 each).
  windows does embedding several CT windows per slice help? 60 medpix CT cases with two CT images, as
          pseudo-HU (grey*8-1024): the first image of each case is its "prior", the second the query.
          Top-1 and MRR of finding the query's own case among the 60, embedding one window (soft-tissue
          window, or the percentile stretch) against three windows as the RGB channels (brain / soft
          tissue / bone) and the mean of three single-window vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from common import load_avg  # noqa: E402


def _db_bytes(path: Path) -> int:
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def volume(tmp: Path, n_slices: int, encoder) -> list[dict]:
    from dicom_studies import ct_series, medpix_pngs

    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    ct_series(tmp / "study", medpix_pngs("CT", 1)[0], n_slices=n_slices, size=512)
    rows = []
    for slices in (8, None):
        home = tmp / f"home-{slices or 'all'}"
        cat = Catalog.open(home / "catalog.db")
        t0, c0 = time.perf_counter(), time.process_time()
        s = ingest_path(cat, tmp / "study", slices=slices)
        t1, c1 = time.perf_counter(), time.process_time()
        e = run_index(cat, encoder, Paths(home), config=EmbedConfig(workers=0), progress=False)
        t2, c2 = time.perf_counter(), time.process_time()
        vectors = cat.count_vectors(encoder.model_id, "image")
        cat.close()
        rows.append(dict(slices=slices or "all", images=s.images_added, vectors=vectors, embedded=e.images_embedded,
                         catalog_bytes=_db_bytes(home / "catalog.db"), ingest_s=round(t1 - t0, 2),
                         index_s=round(t2 - t1, 2), total_s=round(t2 - t0, 2), ingest_cpu_s=round(c1 - c0, 2),
                         index_cpu_s=round(c2 - c1, 2)))  # fmt: skip
    return rows


def query(tmp: Path, encoder, n_studies: int = 10_000, per_study: int = 8) -> dict:
    import numpy as np
    from dicom_studies import ct_series, medpix_pngs

    from indexer.embed import build_indexes
    from indexer.sources.query import query_study
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.imaging import load_image
    from medsearch.records import CaseRecord, ImageRecord
    from medsearch.search import Searcher

    home = tmp / "home-10k"
    cat = Catalog.open(home / "catalog.db")
    rng = np.random.default_rng(0)
    dim = encoder.image_dim
    t0 = time.perf_counter()
    ids: list[int] = []
    with cat.atomic():
        for s in range(n_studies):
            cid, _ = cat.upsert_case(CaseRecord(source="synth", key=f"study{s}", labels={"modality_type": "CT"}))
            for j in range(per_study):
                rec = ImageRecord(source="synth", key=f"s{s}-{j}", case_key=f"study{s}", path=f"/synthetic/{s}/{j}.dcm",
                                  modality_type="CT", body_region="Thorax", plane="Axial")  # fmt: skip
                iid, _ = cat.upsert_image(rec, cid, sha256=f"synthetic-{s}-{j}", nbytes=0, width=512, height=512)
                ids.append(iid)
    centers = rng.normal(size=(n_studies, dim)).astype(np.float32)
    vecs = np.repeat(centers, per_study, axis=0) + 0.5 * rng.normal(size=(n_studies * per_study, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cat.put_vectors(encoder.model_id, "image", ids, vecs)
    cat.set_meta("default_model", encoder.model_id)
    build_indexes(cat, Paths(home), model_id=encoder.model_id, weights_hash=encoder.weights_hash, dims={"image": dim})
    setup_s = time.perf_counter() - t0
    cat.close()

    ct_series(tmp / "query", medpix_pngs("CT", 2)[1], n_slices=40, size=512, seed=3)
    s = Searcher(home, encoder=encoder)
    s.warm()
    times, search_times = [], []
    for _ in range(5):
        t = time.perf_counter()
        key, chosen, _ = query_study(tmp / "query", s.catalog.salt, slices=8)
        pils = [load_image(p, frame=f) for p, f in chosen]
        t_enc = time.perf_counter()
        hits = s.similar_study(pils, k=10, own_study_key=key)
        done = time.perf_counter()
        times.append(done - t)
        search_times.append(done - t_enc)
    only = []
    for j in range(5):  # the search alone: query slices given as catalog image ids (their stored vectors)
        t = time.perf_counter()
        s.similar_study([ids[(j + 1) * 97 * per_study + i] for i in range(8)], k=10)
        only.append(time.perf_counter() - t)
    return dict(studies=n_studies, slices_per_study=per_study, vectors=n_studies * per_study, query_slices=len(chosen),
                hits=len(hits), setup_s=round(setup_s, 1), query_s_median=round(sorted(times)[2], 3),
                encode_and_search_s_median=round(sorted(search_times)[2], 3),
                search_only_s_median=round(sorted(only)[2], 3))  # fmt: skip


def _peak_kib() -> int:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _ingest_child(n: int, tmp: str) -> None:
    """Child process: ingest the n studies the parent wrote, print peak RSS (KiB) as JSON."""
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog

    root = Path(tmp) / f"tree{n}"
    base = _peak_kib()
    cat = Catalog.open(Path(tmp) / f"home{n}" / "catalog.db")
    t = time.perf_counter()
    s = ingest_path(cat, root, slices=8)
    secs = time.perf_counter() - t
    cat.close()
    peak = _peak_kib()
    print(json.dumps(dict(studies=n, cases=s.cases_added, images=s.images_added, rss_before_kib=base,
                          peak_rss_kib=peak, ingest_s=round(secs, 1))))  # fmt: skip


def memory(tmp: Path) -> list[dict]:
    from dicom_studies import ct_series, medpix_pngs

    png = medpix_pngs("CT", 1)[0]
    rows = []
    for n in (100, 1000):
        for i in range(n):
            ct_series(tmp / f"tree{n}" / f"st{i:05d}", png, n_slices=4, size=64, seed=i)
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--tmp", str(tmp)], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def windows(encoder, n: int = 60) -> list[dict]:
    import numpy as np
    from dicom_studies import MEDPIX
    from PIL import Image

    from medsearch.encoders.base import encode_images
    from medsearch.imaging import PRESETS, robust_scale, window
    from medsearch.imaging.windows import multi_window

    by_case: dict[str, list[Path]] = {}
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["modality_type"] == "CT":
                by_case.setdefault(r["case_id"], []).append(MEDPIX / r["file"])
    pairs = [v[:2] for v in by_case.values() if len(v) >= 2][:n]

    def hu(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("L").resize((256, 256)), dtype=np.float64) * 8 - 1024

    hus = [hu(a) for a, _ in pairs]  # priors: the first CT image of each case
    queries = [hu(b) for _, b in pairs]  # queries: another CT image of the same case

    def enc(arrs: list) -> np.ndarray:
        v = np.concatenate([encode_images(encoder, [Image.fromarray(a) for a in arrs[i:i + 8]])
                            for i in range(0, len(arrs), 8)])  # fmt: skip
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    variants = {
        "soft_tissue window": lambda h: window(h, *PRESETS["soft_tissue"]),
        "percentile stretch": robust_scale,
        "3 windows as RGB": lambda h: multi_window(h, ("brain", "soft_tissue", "bone")),
    }
    rows = []
    singles = {}
    for name, fn in variants.items():
        p, q = enc([fn(h) for h in hus]), enc([fn(h) for h in queries])
        singles[name] = (p, q)
        rows.append(_ranks(name, q @ p.T))
    per = [(enc([window(h, *PRESETS[w]) for h in hus]), enc([window(h, *PRESETS[w]) for h in queries]))
           for w in ("brain", "soft_tissue", "bone")]  # fmt: skip
    p = sum(a for a, _ in per)
    q = sum(b for _, b in per)
    rows.append(_ranks("mean of 3 window vectors", (q / np.linalg.norm(q, axis=1, keepdims=True))
                       @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T))  # fmt: skip
    return rows


def _ranks(name: str, sims) -> dict:
    import numpy as np

    ranks = (sims > np.diag(sims)[:, None]).sum(axis=1) + 1  # rank of the true prior, 1 = best
    return dict(embedding=name, images=len(ranks), top1=round(float(np.mean(ranks == 1)), 3),
                mrr=round(float(np.mean(1.0 / ranks)), 3))  # fmt: skip


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="volume,query,memory,windows")
    ap.add_argument("--slices-count", type=int, default=300)
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _ingest_child(a.child, a.tmp)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parts = set(a.part.split(","))
    print(f"load average {load_avg()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        enc = None
        if parts & {"volume", "query", "windows"}:
            from medsearch.encoders.registry import load_encoder

            enc = load_encoder("towers", device="cpu")
        if "volume" in parts:
            print(f"\n{a.slices_count}-slice CT study, --slices 8 vs all (towers on CPU)")
            print(_table(volume(tmp, a.slices_count, enc)))
        if "query" in parts:
            print(f"\nstudy query (8 slices) against {a.studies:,} synthetic studies in a real catalog + FAISS")
            print(_table([query(tmp, enc, a.studies)]))
        if "windows" in parts:
            print("\nmulti-window embedding (towers): another CT image of the same case -> its case, among 60")
            print(_table(windows(enc)))
        if "memory" in parts:
            print("\npeak RSS ingesting synthetic studies (fresh process each)")
            print(_table(memory(tmp)))
    print(f"\nload average {load_avg()}")


if __name__ == "__main__":
    main()
