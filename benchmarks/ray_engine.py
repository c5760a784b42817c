"""The Ray Data engine against the single-process pipeline on the same images, same run.

    .venv/bin/python benchmarks/ray_engine.py [--n 400] [--actors 0] [--rounds 2]

Both embed the first N medpix-2.0 images (towers model, CPU) into a fresh catalog each round:
``local`` = ``indexer.embed.embed_images`` with the product defaults; ``ray`` =
``indexer.distributed.embed_images_ray`` on a local Ray instance with every CPU of this host
(actor pool per device, vector shards merged by the writer). Images/s include start-up (Ray:
``ray.init``, actor start, model load in each actor), and the same figure after the first
images (steady state) is not separable for Ray, so the table says which is which. The stored
vectors of the two paths are compared (cosine).

On a 2-core host Ray cannot win: it is here to show its overhead and that the vectors agree;
the engine is for many machines (``--address`` of a Ray cluster, one actor per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"
from common import load_avg  # noqa: E402


def slice_dataset(dst: Path, n: int) -> int:
    """A JSONL-layout copy (metadata only, image files linked) of the cases holding the first n images."""
    dst.mkdir(parents=True)
    (dst / "images").symlink_to(MEDPIX / "images")
    keep: set[str] = set()
    count = 0
    with open(MEDPIX / "images.jsonl") as f, open(dst / "images.jsonl", "w") as out:
        for line in f:
            if count >= n:
                break
            row = json.loads(line)
            keep.add(row["case_id"])
            out.write(line)
            count += 1
    with open(MEDPIX / "reports.jsonl") as f, open(dst / "reports.jsonl", "w") as out:
        for line in f:
            if json.loads(line)["id"] in keep:
                out.write(line)
    return count


def vectors(cat) -> dict[int, object]:
    out = {}
    for ids, vecs in cat.iter_vectors("towers", "image"):
        for i, v in zip(ids.tolist(), vecs, strict=True):
            out[i] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--actors", type=int, default=0, help="Ray actors (0: the engine's default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import numpy as np
    import ray

    from indexer.distributed import embed_images_ray
    from indexer.embed import embed_images
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig
    from medsearch.encoders.registry import load_encoder

    print(f"# ray_engine  n {args.n}  rounds {args.rounds}  ray {ray.__version__}  load {load_avg()}", flush=True)
    enc = load_encoder("towers", device="cpu")
    rows: dict[str, list[float]] = {"local": [], "ray": []}
    cos_min = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "medpix-2.0"
        n = slice_dataset(data, args.n)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for r in range(args.rounds):
                got = {}
                for name in ("local", "ray"):
                    home = Path(tmp) / f"{name}-{r}"
                    cat = Catalog.open(home / "catalog.db")
                    ingest_path(cat, data)
                    t = time.perf_counter()
                    if name == "local":
                        s = embed_images(cat, enc, config=EmbedConfig(), progress=False)
                    else:
                        s = embed_images_ray(cat, enc, spec="towers", models_dir=None, shard_dir=home / "shards",
                                             config=EmbedConfig(), actors=args.actors, progress=False)  # fmt: skip
                    wall = time.perf_counter() - t
                    assert s.images_embedded == n and not s.images_failed, (name, s.images_embedded, s.images_failed)
                    rows[name].append(n / wall)
                    got[name] = vectors(cat)
                    cat.close()
                    print(f"   round {r + 1} {name}: {n} images in {wall:.1f}s = {n / wall:.1f} images/s  "
                          f"load {load_avg()}", flush=True)  # fmt: skip
                a = np.stack([got["local"][k] for k in sorted(got["local"])]).astype(np.float32)
                b = np.stack([got["ray"][k] for k in sorted(got["local"])]).astype(np.float32)
                cos_min = min(cos_min, float(np.min(np.sum(a * b, axis=1))))
        finally:
            ray.shutdown()
    med = {k: float(np.median(v)) for k, v in rows.items()}
    print()
    print(f"| engine | images/s (median of {args.rounds}) | per round | x local |")
    print("|---|---|---|---|")
    for k in ("local", "ray"):
        print(f"| {k} | {med[k]:.1f} | {' / '.join(f'{x:.1f}' for x in rows[k])} | {med[k] / med['local']:.2f} |")
    print(f"\nvectors: min cosine(ray, local) over {n} images = {cos_min:.5f}; load at end {load_avg()}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"n": n, "images_per_s": rows, "median": med, "cos_min": cos_min}, indent=1))


if __name__ == "__main__":
    main()
