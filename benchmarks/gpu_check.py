"""GPU check (issue 7): ViT-B/16 images/s (bf16) from decoded tensors and from PNG files through the
real pipeline, and batched search queries/s over 1M vectors. Run through ``gpu_check.sh``.

    python benchmarks/gpu_check.py            # on a CUDA host (< 8 min on one H200)
    python benchmarks/gpu_check.py --tiny     # anywhere: tiny ViT at 64 px, 20k vectors, same table

THROUGHPUT ONLY: the ViT-B/16 here has RANDOM weights (no weights can be downloaded). It is
written to a temporary checkpoint and loaded through the product's ``OpenClipEncoder`` (spec
``open_clip:ViT-B-16:/tmp/...pt``), so the figures exercise the real encoder code (uint8 input
normalised on the device, bf16 autocast); the vectors mean nothing. Without open_clip
installed, torchvision's ``vit_b_16`` (same shape: patch 16, width 768, 12 layers; random
weights) is used behind a benchmark-only adapter, and the table says so.

Rows:
  encode, tensors on GPU     model forward on GPU-resident batches (the compute ceiling)
  encode, decoded tensors    encoder.encode_image_batch(uint8 batch in pinned host memory): copy,
                             normalise, forward, vectors back to the host
  encode, PNG files          indexer.embed.embed_images over medpix-2.0 PNGs (repeated to
                             --png-repeat x 1,850 images) into a temporary catalog: decode workers,
                             pinned memory, uint8 hand-over, SQLite commits included
  search ...                 1M x 512-d synthetic vectors (benchmarks/synth.py), batches of
                             --query-batch: torch matmul+topk on the GPU (bf16 and fp32), faiss-gpu
                             flat when installed, faiss-cpu flat for comparison, and the product's
                             auto index (ivfpq; GPU k-means when faiss-gpu is present) if time allows
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
MEDPIX = REPO.parent / "shared" / "datasets" / "medpix-2.0"
T0 = time.monotonic()
ROWS: list[dict] = []
NOTES: list[str] = []

TINY_CONFIG = {  # a ViT small enough for a CPU smoke run, same code path as ViT-B-16
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def elapsed() -> float:
    return time.monotonic() - T0


def row(section: str, what: str, value: float, unit: str, note: str = "") -> None:
    ROWS.append({"section": section, "what": what, "value": round(value, 1), "unit": unit, "note": note})
    print(f"  {section:<8} {what:<44} {value:>12,.1f} {unit:<10} {note}", flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- encoders
def build_encoder(args, work: Path):
    """(encoder, description). open_clip through the product class, else the torchvision adapter."""
    import torch

    arch = "medsearch-tiny-vit" if args.tiny else "ViT-B-16"
    try:
        import open_clip

        from medsearch.encoders.openclip import OpenClipEncoder

        if args.tiny:
            cfg = work / "medsearch-tiny-vit.json"
            cfg.write_text(json.dumps(TINY_CONFIG))
            open_clip.add_model_config(cfg)
        model = open_clip.create_model(arch, pretrained=None)  # RANDOM weights: throughput only
        ckpt = work / f"{arch}-random-init-THROUGHPUT-ONLY.pt"
        torch.save(model.state_dict(), ckpt)
        del model
        enc = OpenClipEncoder(f"open_clip:{arch}:{ckpt}", device=args.device)
        return enc, f"open_clip {arch} (random init, throughput only) via OpenClipEncoder"
    except ImportError as e:
        NOTES.append(f"open_clip or a dependency is not importable ({e}); using torchvision vit_b_16")
    return TorchvisionViT(args.device, args.image_size), f"torchvision vit_b_16 @ {args.image_size}px (random init, throughput only)"


class TorchvisionViT:
    """Benchmark-only Encoder adapter over torchvision's ViT-B/16 with random weights."""

    model_id = "bench:torchvision-vit_b_16-random"
    weights_hash = "random-init-throughput-only"
    shared_space = True
    text_max_tokens = 77
    uint8_input = True

    def __init__(self, device: str, size: int) -> None:
        import torch
        import torchvision

        self.device = device
        self.size = size
        net = torchvision.models.vit_b_16(weights=None, image_size=size)
        net.heads = torch.nn.Identity()
        self.net = net.eval().requires_grad_(False).to(device)
        self.image_dim = self.text_dim = 768
        self._mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self._std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def preprocess_u8(self, image):
        import numpy as np
        import torch
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        s = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def preprocess(self, image):
        return self.preprocess_u8(image).float().div(255)

    def encode_image_batch(self, batch):
        import torch

        from medsearch.encoders.base import l2_normalize

        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") else torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=False)  # fmt: skip
        with torch.inference_mode(), ctx:
            x = batch.to(self.device, non_blocking=True)
            x = (x.float().div_(255) - self._mean) / self._std if x.dtype == torch.uint8 else x
            v = self.net(x)
        return l2_normalize(v.float().cpu().numpy())

    def encode_texts(self, texts):  # pragma: no cover - not used by this check
        raise NotImplementedError


def model_of(enc):
    return getattr(enc, "_model", None) or enc.net


def forward(enc, x):
    m = model_of(enc)
    return m.encode_image(x) if hasattr(m, "encode_image") else m(x)


# ---------------------------------------------------------------------------- sections
def encode_from_tensors(enc, args) -> None:
    import torch

    dev, size, b = args.device, args.image_size, args.batch
    cuda = dev.startswith("cuda")
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    x_gpu = torch.randn(b, 3, size, size, device=dev)
    with torch.inference_mode(), ac:
        for _ in range(3):
            forward(enc, x_gpu)
        sync(dev)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.seconds:
            forward(enc, x_gpu)
            n += b
        sync(dev)
        rate = n / (time.perf_counter() - t)
    row("encode", f"tensors on {dev}, batch {b}, {'bf16' if cuda else 'fp32'}", rate, "images/s",
        "model forward only (ceiling)")  # fmt: skip
    host = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
    if cuda:
        host = host.pin_memory()
    enc.encode_image_batch(host)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < args.seconds:
        enc.encode_image_batch(host)  # copy + normalise + forward + vectors to host
        n += b
    rate = n / (time.perf_counter() - t)
    row("encode", f"decoded uint8 tensors (pinned host), batch {b}", rate, "images/s", "encoder.encode_image_batch")


def encode_from_png(enc, args, work: Path) -> None:
    from indexer.embed import embed_images, resolve_workers
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig

    files = sorted((MEDPIX / "images").glob("*.png"))[: args.png_limit or None]
    if not files:
        NOTES.append(f"no medpix PNGs under {MEDPIX}: PNG row skipped")
        return
    db = work / "catalog.db"
    cat = Catalog.open(db)
    t = time.perf_counter()
    for r in range(args.png_repeat):  # the same files under several sources: a longer, steady run
        folder = work / f"png{r}"
        folder.mkdir()
        for p in files:
            (folder / p.name).symlink_to(p)
        ingest_path(cat, folder, source=f"rep{r}")
    ingest_s = time.perf_counter() - t
    n_img = cat.counts()["images"]
    cfg = EmbedConfig(batch_size=args.batch if args.device.startswith("cuda") else 32, workers=args.workers)
    t = time.perf_counter()
    s = embed_images(cat, enc, config=cfg, progress=False)
    wall = time.perf_counter() - t
    cat.close()
    w = resolve_workers(cfg, enc.device)
    row("encode", f"PNG files -> catalog, {w} decode workers", s.images_embedded / wall, "images/s",
        f"{s.images_embedded} of {n_img} medpix PNGs (x{args.png_repeat}), real pipeline, whole call")  # fmt: skip
    t_first = s.stage_seconds.get("image_first_batch", 0.0)
    n_first = s.stage_seconds.get("image_first_batch_images", 0.0)
    if wall > t_first and s.images_embedded > n_first:
        row("encode", f"PNG files -> catalog, {w} decode workers, steady", (s.images_embedded - n_first) / (wall - t_first),
            "images/s", f"after the first batch (worker start-up {t_first:.1f}s excluded)")  # fmt: skip
    NOTES.append(f"PNG run: ingest {n_img} rows {ingest_s:.1f}s; embed stages {s.to_dict()['seconds']}; "
                 f"failed {len(s.images_failed)}")  # fmt: skip


def search(args) -> None:
    import numpy as np
    import torch
    from synth import Synth

    n, d, qb, k = args.vectors, 512, args.query_batch, 10
    dev = args.device
    t = time.perf_counter()
    synth = Synth(d)
    xb = synth.matrix(n)  # (n, d) float32, unit rows
    xq = synth.queries(qb * 4)  # (4*qb, d)
    NOTES.append(f"search data: {n:,} x {d} synthetic vectors generated in {time.perf_counter() - t:.1f}s")
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xb)
    cpu.search(xq[:8], k)
    t = time.perf_counter()
    _, gt = cpu.search(xq[:qb], k)
    rate = qb / (time.perf_counter() - t)
    row("search", f"faiss-cpu flat, {n:,} x {d}, batch {qb}", rate, "queries/s", f"exact, {os.cpu_count()} threads")
    del cpu

    def recall(I):
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I, gt, strict=True)]))

    if dev.startswith("cuda"):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            xb_t = torch.from_numpy(xb).to(dev, dtype=dtype)
            xq_t = torch.from_numpy(xq).to(dev, dtype=dtype)

            def topk(q, xb_t=xb_t):
                return torch.topk(q @ xb_t.T, k, dim=1)  # (b, n) scores -> (b, k)

            topk(xq_t[:qb])
            sync(dev)
            t, done = time.perf_counter(), 0
            while time.perf_counter() - t < args.seconds:
                for s in range(0, len(xq_t), qb):
                    topk(xq_t[s : s + qb])
                    done += qb
            sync(dev)
            rate = done / (time.perf_counter() - t)
            I = topk(xq_t[:qb]).indices.cpu().numpy()
            row("search", f"torch matmul+topk on GPU ({name}), batch {qb}", rate, "queries/s",
                f"recall@10 vs exact {recall(I):.4f}")  # fmt: skip
            del xb_t, xq_t
            torch.cuda.empty_cache()
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu > 0:
        res = faiss.StandardGpuResources()
        gidx = faiss.GpuIndexFlatIP(res, d)
        gidx.add(xb)
        gidx.search(xq[:qb], k)
        t, done = time.perf_counter(), 0
        while time.perf_counter() - t < args.seconds:
            gidx.search(xq[:qb], k)
            done += qb
        row("search", f"faiss-gpu flat, batch {qb}", done / (time.perf_counter() - t), "queries/s", "exact")
        del gidx
        from medsearch.config import IndexConfig
        from medsearch.stores.faiss import VectorIndex

        vi = VectorIndex.from_blocks(functools.partial(synth.blocks, n), model_id="bench", weights_hash="-", space="image",
                                     dim=d, count=n, config=IndexConfig(kind="flat"))  # fmt: skip
        if vi.to_gpu():
            vi.search(xq[:qb], k)
            t, done = time.perf_counter(), 0
            while time.perf_counter() - t < args.seconds:
                vi.search(xq[:qb], k)
                done += qb
            _, I = vi.search(xq[:qb], k)
            row("search", f"product VectorIndex.to_gpu() flat, batch {qb}", done / (time.perf_counter() - t),
                "queries/s", f"recall@10 vs exact {recall(I - 1):.4f}")  # fmt: skip
        else:
            NOTES.append("VectorIndex.to_gpu() declined (see medsearch/vectors.py)")
        del vi
    else:
        NOTES.append("faiss-gpu not installed (faiss.get_num_gpus() == 0): torch top-k is the GPU search path")
    if args.skip_ivf or elapsed() > args.budget - args.ivf_reserve:
        NOTES.append(f"product auto index (ivfpq) skipped (elapsed {elapsed():.0f}s of {args.budget}s budget)")
        return
    from medsearch.config import IndexConfig
    from medsearch.stores.faiss import VectorIndex

    t = time.perf_counter()
    idx = VectorIndex.from_blocks(functools.partial(synth.blocks, n), model_id="bench", weights_hash="-", space="image", dim=d,
                                  count=n, config=IndexConfig())  # fmt: skip
    build = time.perf_counter() - t
    _, I = idx.search(xq[:qb], k)
    t = time.perf_counter()
    _, I = idx.search(xq[:qb], k)
    rate = qb / (time.perf_counter() - t)
    lat = []
    for i in range(200):
        ts = time.perf_counter()
        idx.search(xq[i : i + 1], k)
        lat.append(time.perf_counter() - ts)
    p = idx.manifest.params
    row("search", f"faiss-cpu {idx.manifest.kind} (auto), batch {qb}", rate, "queries/s",
        f"recall@10 {recall(I - 1):.4f}; built {build:.0f}s; nprobe {p.get('nprobe')}; "
        f"single p50 {np.percentile(lat, 50) * 1e3:.2f} ms; GPU k-means {p.get('kmeans_on_gpu')}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny ViT at 64 px, 20k vectors: a CPU smoke run")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 512 on CUDA, 16 --tiny)")
    ap.add_argument("--workers", type=int, default=-1, help="decode workers for the PNG run (-1 = auto)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per timed loop (default 10, --tiny 2)")
    ap.add_argument("--png-repeat", type=int, default=None, help="medpix PNG list repeats (default 8, --tiny 1)")
    ap.add_argument("--png-limit", type=int, default=None, help="use only the first N PNGs (default all, --tiny 64)")
    ap.add_argument("--vectors", type=int, default=None, help="search database size (default 1M, --tiny 20k)")
    ap.add_argument("--query-batch", type=int, default=1024)
    ap.add_argument("--skip-ivf", action="store_true")
    ap.add_argument("--budget", type=float, default=450, help="seconds; later sections are skipped past it")
    ap.add_argument("--ivf-reserve", type=float, default=150, help="seconds the ivfpq build needs")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.image_size = 64 if args.tiny else 224
    args.batch = args.batch or (16 if args.tiny else 512)
    args.seconds = args.seconds or (2.0 if args.tiny else 10.0)
    args.png_repeat = args.png_repeat or (1 if args.tiny else 8)
    args.png_limit = args.png_limit if args.png_limit is not None else (64 if args.tiny else 0)
    args.vectors = args.vectors or (20_000 if args.tiny else 1_000_000)
    if args.tiny:
        args.query_batch = min(args.query_batch, 256)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# gpu_check  python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
          f"gpu {gpu}  device {args.device}  cpus {os.cpu_count()}  load {os.getloadavg()[0]:.1f}  tiny {args.tiny}",
          flush=True)  # fmt: skip
    print(f"# argv: {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="medsearch-gpucheck-"))
    try:
        enc, desc = build_encoder(args, work)
        print(f"  model: {desc}; image size {args.image_size}; dim {enc.image_dim}", flush=True)
        for name, fn in (("tensors", lambda: encode_from_tensors(enc, args)),
                         ("png", lambda: encode_from_png(enc, args, work)),
                         ("search", lambda: search(args))):  # fmt: skip
            if elapsed() > args.budget:
                NOTES.append(f"{name} skipped: past the {args.budget}s budget")
                continue
            try:
                fn()
            except ImportError as e:
                NOTES.append(f"{name} skipped: missing module ({e})")
            if name == "png":
                del enc
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| section | measurement | value | unit | note |\n|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['section']} | {r['what']} | {r['value']:,.1f} | {r['unit']} | {r['note']} |")
    for n in NOTES:
        print(f"note: {n}")
    print(f"total {elapsed():.0f}s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": ROWS, "notes": NOTES, "model": desc}, indent=2))


if __name__ == "__main__":
    main()
