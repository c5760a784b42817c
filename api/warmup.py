"""Encoder warm-up: run a few queries through a newly loaded encoder before it serves."""

from __future__ import annotations

import weakref
from typing import Any

_WARMED: weakref.WeakSet[Any] = weakref.WeakSet()  # encoders already warmed up in this process


def warm_encoder(enc: Any) -> None:
    """The first forward passes in a process are several times slower than later ones (towers on
    CPU, 20 text queries: p50 409 ms in a fresh process, 54 ms on the second pass), so the first
    users would pay for it. Once per encoder object and process."""
    if enc in _WARMED:
        return
    from PIL import Image

    from medsearch.encoders.base import encode_images

    texts = [" ".join(["opacity"] * n) for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)]
    for t in texts:
        enc.encode_texts([t])
    for _ in range(2):
        encode_images(enc, [Image.new("L", (256, 256), 100)])
    _WARMED.add(enc)
