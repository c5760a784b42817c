"""CPU cost of the image tower alone (EfficientNet-Lite0, 224 px): what bounds an end-to-end DICOM
sync at ``--slices all`` on a CPU host (issue 12). Prints wall img/s and CPU ms per image for each
torch thread count and batch size, side by side, in one process.

    python benchmarks/tower_cpu.py [--batches 16,64] [--threads 1,2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import torch

    from medsearch.encoders.registry import load_encoder

    enc = load_encoder("towers", device="cpu")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| torch threads | batch | img/s wall | CPU ms per image |")
    print("| --- | --- | --- | --- |")
    for b in (int(x) for x in args.batches.split(",")):
        x = torch.rand(b, 3, 224, 224)
        for th in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(th)
            enc.encode_image_batch(x)  # warm-up at this thread count
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.repeats):
                enc.encode_image_batch(x)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = b * args.repeats
            print(f"| {th} | {b} | {n / wall:.0f} | {1000 * cpu / n:.1f} |", flush=True)
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
