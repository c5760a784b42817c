"""Peak memory while ingesting and indexing N synthetic images: must stay flat in N apart from the vectors.

    .venv/bin/python benchmarks/memory_bench.py --sizes 1000,10000,100000 --towers-max 1000

Items: N small synthetic PNGs (64x64 grey, seeded shapes, each its own case) generated into a
temporary image folder. Each (N, encoder) runs in a fresh child process that does exactly what
``medsearch ingest`` + ``medsearch index`` do (``indexer.ingest.ingest_path``, then
``indexer.embed.run_index``: DataLoader workers, catalog commits, FAISS build + save, BM25).
A sampler thread records peak RSS of the child and of the child + its DataLoader workers.

Encoders: ``standin`` is a BENCHMARK-ONLY cheap encoder (the real towers preprocessing to
224x224, then a fixed seeded random projection of an 8x8 average pool to 256-d): the towers
run ~40 images/s on these 2 shared cores, so 100k items would take ~40 minutes. ``towers``
(the real model) runs for N <= --towers-max to show the real model's fixed footprint.

Reported: peak RSS (MB), the vector bytes (N x dim x 4, what an in-memory flat index must
hold), MB per 1k items above the N=smallest run, and the same with the vector bytes removed:
the latter is what must stay ~0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import load_avg  # noqa: E402


def make_pngs(folder: Path, n: int, start: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(start, n):
        rng = np.random.default_rng(i)
        cx, cy, r = rng.integers(10, 54, 2).tolist() + [int(rng.integers(4, 20))]
        a = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r) * 180 + rng.integers(0, 60, (64, 64))
        sub = folder / f"d{i // 1000:04d}"  # 1,000 files per folder, like a real archive tree
        sub.mkdir(exist_ok=True)
        Image.fromarray(a.astype(np.uint8), mode="L").save(sub / f"img{i:07d}.png", optimize=False)


class StandIn:
    """BENCHMARK-ONLY encoder: real preprocessing, a cheap seeded random projection as the 'model'."""

    model_id = "bench:standin-avgpool-projection"
    weights_hash = "standin-seed0"
    image_dim = text_dim = 256
    shared_space = False
    text_max_tokens = 256
    device = "cpu"
    uint8_input = True

    def __init__(self) -> None:
        import numpy as np

        from medsearch.encoders.towers import TowersPreprocess

        self.transform = TowersPreprocess()
        self.proj = np.random.default_rng(0).standard_normal((3 * 8 * 8, 256)).astype(np.float32)

    def preprocess(self, image):
        return self.transform(image)

    def preprocess_u8(self, image):
        return self.transform.to_uint8(image)

    def encode_image_batch(self, batch):
        import torch

        from medsearch.encoders.base import l2_normalize

        x = batch.float()
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8).reshape(len(x), -1).numpy()  # (b, 192)
        return l2_normalize(pooled @ self.proj)

    def encode_texts(self, texts):
        import numpy as np

        return np.zeros((len(texts), 256), np.float32)


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak_self = self.peak_tree = 0
        self.stop = threading.Event()

    def sample(self) -> None:
        import psutil

        rss = self.proc.memory_info().rss
        tree = rss
        for c in self.proc.children(recursive=True):
            try:
                tree += c.memory_info().rss
            except psutil.Error:
                pass
        self.peak_self, self.peak_tree = max(self.peak_self, rss), max(self.peak_tree, tree)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.05)

    def reset(self) -> None:
        self.peak_self = self.peak_tree = 0
        self.sample()


def child(folder: Path, home: Path, encoder: str, workers: int) -> None:
    """One measured run; prints a JSON line."""
    import torch  # noqa: F401  (imported before the baseline, like the CLI)

    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    if encoder == "towers":
        from medsearch.encoders.registry import load_encoder

        enc = load_encoder("towers", device="cpu")
    else:
        enc = StandIn()
    s = Sampler()
    s.start()
    time.sleep(0.2)
    base = s.proc.memory_info().rss
    s.reset()
    cat = Catalog.open(home / "catalog.db")
    t = time.perf_counter()
    ing = ingest_path(cat, folder, source="mem")
    t_ingest = time.perf_counter() - t
    s.sample()
    ingest_peak = s.peak_self
    s.reset()
    t = time.perf_counter()
    summ = run_index(cat, enc, Paths(home), config=EmbedConfig(workers=workers), progress=False)
    t_index = time.perf_counter() - t
    s.sample()
    s.stop.set()
    cat.close()
    n = ing.images_added
    print(json.dumps({
        "n": n, "encoder": encoder, "baseline_mb": base / 2**20, "ingest_peak_mb": ingest_peak / 2**20,
        "index_peak_mb": s.peak_self / 2**20, "index_peak_with_workers_mb": s.peak_tree / 2**20,
        "vector_mb": n * enc.image_dim * 4 / 2**20, "ingest_s": t_ingest, "index_s": t_index,
        "images_per_s": summ.images_per_s, "index_kind": summ.indexes.get("image", {}).get("kind"),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--towers-max", type=int, default=1000, help="also run the real towers up to this N")
    ap.add_argument("--workers", type=int, default=-1, help="EmbedConfig.workers (-1: the product default)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "HOME", "ENCODER"))
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2], args.workers)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# memory_bench  sizes {sizes}  workers {args.workers}  load at start {load_avg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mem-bench-") as tmp:
        tmp = Path(tmp)
        made = 0
        for n in sorted(sizes):
            t = time.perf_counter()
            make_pngs(tmp / "all", n, start=made)
            made = n
            folder = tmp / f"n{n}"  # the first n images: symlinks to the shared pool
            folder.mkdir()
            for sub in sorted((tmp / "all").iterdir()):
                files = sorted(sub.iterdir())
                if int(sub.name[1:]) * 1000 >= n:
                    break
                (folder / sub.name).mkdir()
                for f in files[: n - int(sub.name[1:]) * 1000]:
                    (folder / sub.name / f.name).symlink_to(f)
            print(f"## n={n:,}: PNGs ready in {time.perf_counter() - t:.0f}s", flush=True)
            for enc in ["standin"] + (["towers"] if n <= args.towers_max else []):
                home = tmp / f"home-{n}-{enc}"
                home.mkdir()
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(folder), str(home), enc, "--workers", str(args.workers)],
                    capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"child failed for n={n} {enc}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["load"] = load_avg()
                rows.append(r)
                print("   " + json.dumps(r), flush=True)
    print()
    print("| encoder | N | ingest s | index s | baseline MB | ingest peak MB | index peak MB | + workers MB | "
          "vectors MB | MB per 1k items (index peak) | MB per 1k items, vectors removed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for enc in ("standin", "towers"):
        mine = [r for r in rows if r["encoder"] == enc]
        if not mine:
            continue
        ref = mine[0]
        for r in mine:
            if r is ref:
                per, per_nv = "-", "-"
            else:
                dn = (r["n"] - ref["n"]) / 1000
                d = r["index_peak_mb"] - ref["index_peak_mb"]
                per = f"{d / dn:.3f}"
                per_nv = f"{(d - (r['vector_mb'] - ref['vector_mb'])) / dn:.3f}"
            print(f"| {enc} | {r['n']:,} | {r['ingest_s']:.1f} | {r['index_s']:.1f} | {r['baseline_mb']:.0f} | "
                  f"{r['ingest_peak_mb']:.0f} | {r['index_peak_mb']:.0f} | {r['index_peak_with_workers_mb']:.0f} | "
                  f"{r['vector_mb']:.1f} | {per} | {per_nv} |")  # fmt: skip
    print(f"\nload at end {load_avg()}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
