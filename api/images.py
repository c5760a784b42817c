"""Catalog images as PNG bytes for the image routes, with an in-memory LRU of thumbnails.

Images are served by catalog id only; the file path comes from the catalog, never from a client.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from medsearch.config import ImagingConfig
from medsearch.errors import InvalidImage, MedsearchError, NotFound


class ThumbnailCache:
    """LRU of encoded PNG bytes keyed by (image id, file stamp, size)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def image_png(catalog: Any, image_id: int, *, max_side: int | None, cache: ThumbnailCache,
              imaging: ImagingConfig) -> tuple[bytes, str]:  # fmt: skip
    """PNG bytes of a catalog image (optionally shrunk to ``max_side``) and its ETag."""
    rows = catalog.image_rows([image_id])
    row = rows.get(image_id)
    if row is None:
        raise NotFound(f"no image with id {image_id}", hint="use an image_id from a search result or a case")
    path = Path(row.path)
    try:
        st = path.stat()
    except OSError:
        raise NotFound(
            f"the file of image {image_id} is no longer available", hint="re-ingest the dataset it came from"
        ) from None
    key = (image_id, str(path), row.frame, st.st_mtime_ns, st.st_size, max_side)
    etag = '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'
    cached = cache.get(key)
    if cached is not None:
        return cached, etag
    from medsearch.imaging import load_image

    try:
        im = load_image(path, frame=row.frame, config=imaging)
    except MedsearchError as e:
        raise InvalidImage(
            f"image {image_id} cannot be decoded", hint="run `medsearch check`; the stored file may be damaged"
        ) from e
    if max_side and max(im.size) > max_side:
        from PIL import Image

        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6 if max_side and max_side <= 512 else 3)
    data = buf.getvalue()
    if max_side and max_side <= 512:  # cache thumbnails, not full images
        cache.put(key, data)
    return data, etag
