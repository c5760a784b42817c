"""A fast lossless PNG writer for 8-bit display images (grey or RGB).

Pillow's PNG encoder tries all five row filters on every row and keeps the cheapest (libpng's
heuristic); on a 512 px CT slice that filtering costs more than the compression. Rendered slices are
smooth along columns, so one filter for every row, Up (the byte above), then zlib's run-length strategy
gives files of about Pillow's size at level 3 in a third of the time (benchmarks/results/pacs_bench_sync.md:
512 px test slices 39 vs 41 KB, 1.9 vs 5.6 ms; medpix CT/MR 30 vs 30 KB, 1.1 vs 4.0 ms). Any PNG reader
decodes it; the pixels are the array's, bit for bit.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # PNG filter type 2: each byte minus the byte above it (mod 256)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(arr: np.ndarray) -> bytes:
    """``(h, w)`` grey or ``(h, w, 3)`` RGB uint8 -> PNG bytes (8 bit, Up filter, zlib Z_RLE)."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        raise ValueError(f"encode_png takes (h, w) or (h, w, 3) uint8, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    rows = np.ascontiguousarray(arr).reshape(h, -1)  # (h, w * channels) bytes per row
    filtered = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)  # (h, 1 + row bytes): filter byte, then data
    filtered[:, 0] = _UP
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG wants
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = z.compress(filtered.data) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
