"""Embedding throughput: the indexer pipeline vs a naive loop, same images, same model, same run.

    .venv/bin/python benchmarks/embed_throughput.py --n 192 --rounds 2

Images: the first ``--n`` PNGs of ../shared/datasets/medpix-2.0 (read in place). Model: the
offline ``towers`` encoder (EfficientNet-Lite0 image tower), or ``--model`` (e.g. an open_clip
spec). Device: ``--device`` (cpu here).

Contestants, measured in interleaved rounds (medians reported, every ratio from the same round):

  naive-fp32      for each file: PIL open -> preprocess -> encode 1 image; fp32, torch defaults
  naive           the same loop through the encoder as configured (bf16 on CPUs with native bf16)
  pipeline ...    ``indexer.embed.embed_images`` into a fresh copy of a catalog holding the same
                  images (DataLoader decode workers, batches, uint8 hand-over, commits to SQLite),
                  for each --grid entry  batch:workers:torch_threads:micro_batch

images/s = images / wall seconds of the whole call (DataLoader start-up and catalog writes
included). Also printed: cosine between pipeline vectors and the naive loop's (same settings)
and between bf16 and fp32 features, so a speed-up never hides a changed result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY_UNSET") != "1":  # (the --omp-compare child keeps the default)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what `medsearch index` sets
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"
from common import load_avg  # noqa: E402


def pick_images(n: int) -> list[Path]:
    files = []
    with open(MEDPIX / "images.jsonl") as f:
        for line in f:
            files.append(MEDPIX / json.loads(line)["file"])
            if len(files) >= n:
                break
    return files


def make_catalog(files: list[Path], work: Path) -> Path:
    """A catalog with the images ingested (image-folder layout of symlinks), not embedded."""
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog

    folder = work / "images"
    folder.mkdir()
    for p in files:
        (folder / p.name).symlink_to(p)
    db = work / "template.db"
    cat = Catalog.open(db)
    ingest_path(cat, folder, source="bench")
    cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cat.close()
    return db


def naive(enc, files, fp32: bool):
    """Open, preprocess and encode one image at a time; returns (images/s, (n, d) vectors)."""
    import numpy as np
    import torch
    from PIL import Image

    amp = getattr(enc, "amp", None)
    mb = getattr(enc, "micro_batch", None)
    threads = torch.get_num_threads()
    if fp32 and amp is not None:
        enc.amp = False
    out = []
    t = time.perf_counter()
    try:
        for p in files:
            with Image.open(p) as im:
                x = enc.preprocess(im)
            out.append(enc.encode_image_batch(x[None]))  # (1, d)
    finally:
        if amp is not None:
            enc.amp = amp
        if mb is not None:
            enc.micro_batch = mb
        torch.set_num_threads(threads)
    return len(files) / (time.perf_counter() - t), np.concatenate(out)


def pipeline(enc, template: Path, work: Path, batch: int, workers: int, threads: int, micro: int | None,
             in_workers: int = 0):  # fmt: skip
    import numpy as np

    from indexer.embed import embed_images
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig

    db = work / f"run-{time.monotonic_ns()}.db"
    shutil.copy(template, db)
    cat = Catalog.open(db)
    mb = getattr(enc, "micro_batch", None)
    if micro is not None and mb is not None:
        enc.micro_batch = micro
    try:
        t = time.perf_counter()
        cfg = EmbedConfig(batch_size=batch, workers=workers, torch_threads=threads, encode_in_workers=bool(in_workers))
        s = embed_images(cat, enc, config=cfg, progress=False)
        rate = s.images_embedded / (time.perf_counter() - t)
        ids, vecs = zip(*cat.iter_vectors(enc.model_id, "image"), strict=True)
        paths = dict(cat.db.execute("SELECT id, path FROM images").fetchall())
        order = [paths[int(i)] for i in np.concatenate(ids)]
        return rate, order, np.concatenate(vecs), s.images_failed
    finally:
        if mb is not None:
            enc.micro_batch = mb
        cat.close()
        for p in work.glob(db.name + "*"):
            p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="towers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", default="16:0:1:4,16:1:2:4,16:2:1:4:1,16:1:1:4,64:1:2:4,16:1:2:8",
                    help="batch:workers:torch_threads:micro_batch[:encode_in_workers] entries (micro_batch: towers' "
                         "CPU forward size; encode_in_workers 1: workers decode and encode, 1 thread each)")  # fmt: skip
    ap.add_argument("--omp-compare", action="store_true",
                    help="also run naive-fp32 and the first grid entry (32 images) in a child with OMP_WAIT_POLICY unset")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch

    from medsearch.encoders.registry import load_encoder

    enc = load_encoder(args.model, device=args.device)
    files = pick_images(args.n)
    print(f"# embed_throughput  model {enc.model_id} on {enc.device}  torch {torch.__version__}  "
          f"default threads {torch.get_num_threads()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  "
          f"images {len(files)}  load at start {load_avg()}", flush=True)  # fmt: skip
    grid = [tuple(int(v) for v in (g + ":0").split(":")[:5]) for g in args.grid.split(",") if g]
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        work = Path(tmp)
        template = make_catalog(files, work)
        naive(enc, files[:4], fp32=False)  # warm-up: first-call allocations
        results: dict[str, list[float]] = {}
        checks: dict[str, float] = {}
        loads = []
        for r in range(args.rounds):
            rate, v32 = naive(enc, files, fp32=True)
            results.setdefault("naive-fp32", []).append(rate)
            rate, vnaive = naive(enc, files, fp32=False)
            results.setdefault("naive", []).append(rate)
            if r == 0:
                cos = np.sum(v32 * vnaive, axis=1)
                checks["cos(naive, naive-fp32) min"] = float(cos.min())
                checks["cos(naive, naive-fp32) mean"] = float(cos.mean())
                # does the precision change retrieval? top-10 image->image neighbours among these images
                k = min(10, len(files) - 1)
                def knn(v, k=k):
                    s = v @ v.T
                    np.fill_diagonal(s, -np.inf)
                    return np.argsort(-s, axis=1)[:, :k]
                a, b = knn(v32), knn(vnaive)
                checks["top-10 neighbour overlap bf16 vs fp32"] = float(np.mean(
                    [len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))  # fmt: skip
            for b, w, th, mb, ew in grid:
                name = f"pipeline b{b} w{w} t{th} mb{mb}" + (" encode-in-workers" if ew else "")
                rate, order, vecs, failed = pipeline(enc, template, work, b, w, th, mb, ew)
                results.setdefault(name, []).append(rate)
                if r == 0 and failed:
                    print(f"   {name}: {len(failed)} failed images", flush=True)
                if r == 0 and "cos(pipeline, naive) min" not in checks:
                    by_path = {str(p): i for i, p in enumerate(files)}
                    ref = vnaive[[by_path[p] for p in order]]
                    checks["cos(pipeline, naive) min"] = float(np.sum(ref * vecs, axis=1).min())
            loads.append(load_avg())
            print(f"   round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items())
                  + f"  load {loads[-1]}", flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {k: [a / b for a, b in zip(v, results["naive-fp32"], strict=True)] for k, v in results.items()}
    ratios_n = {k: [a / b for a, b in zip(v, results["naive"], strict=True)] for k, v in results.items()}
    print()
    print("| contestant | images/s (median) | per round | x naive-fp32 (median of per-round ratios) | x naive |")
    print("|---|---|---|---|---|")
    for k in results:
        print(f"| {k} | {med[k]:.1f} | {' / '.join(f'{v:.1f}' for v in results[k])} | "
              f"{statistics.median(ratios[k]):.2f} | {statistics.median(ratios_n[k]):.2f} |")  # fmt: skip
    best = max((k for k in results if k.startswith("pipeline")), key=lambda k: statistics.median(ratios[k]))
    print(f"\nbest pipeline: {best}: {statistics.median(ratios[best]):.2f}x naive-fp32, "
          f"{statistics.median(ratios_n[best]):.2f}x naive")  # fmt: skip
    for k, v in checks.items():
        print(f"check {k}: {v:.5f}")
    print(f"load at end {load_avg()}")
    out = {"model": enc.model_id, "device": enc.device, "images": len(files), "results": results,
           "checks": checks, "loads": loads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # fmt: skip
    if args.omp_compare:
        b, w, th, mb, ew = grid[0]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        code = (
            f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); sys.argv=['x']; "
            f"import embed_throughput as e; "
            f"e.omp_child({min(args.n, 32)}, {args.model!r}, {args.device!r}, {b}, {w}, {th}, {mb}, {args.rounds}, {ew})"
        )
        child = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY_UNSET": "1"},
                               capture_output=True, text=True)  # fmt: skip
        print(child.stdout.strip() or child.stderr[-2000:])
        try:
            out["omp_default"] = json.loads(child.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


def omp_child(n, model, device, b, w, th, mb, rounds, ew=0) -> None:
    """naive-fp32 and one pipeline config under the default OMP_WAIT_POLICY (spinning threads)."""
    os.environ.pop("OMP_WAIT_POLICY", None)
    from medsearch.encoders.registry import load_encoder

    enc = load_encoder(model, device=device)
    files = pick_images(n)
    res = {"naive-fp32": [], "pipeline": []}
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        work = Path(tmp)
        template = make_catalog(files, work)
        naive(enc, files[:4], fp32=False)
        for _ in range(rounds):
            res["naive-fp32"].append(naive(enc, files, fp32=True)[0])
            res["pipeline"].append(pipeline(enc, template, work, b, w, th, mb, ew)[0])
    print(f"OMP_WAIT_POLICY unset (default): naive-fp32 {res['naive-fp32']}, pipeline b{b} w{w} t{th} mb{mb} "
          f"{res['pipeline']}  load {load_avg()}")  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()
