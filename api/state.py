"""What the app holds between requests: the catalog, the current Searcher, keys, limits, caches.

Hot swap: ``reload()`` builds a *new* Searcher, loads and checks every index it will use,
and only then replaces ``self.searcher`` (one reference assignment under a lock). A request
takes the reference once at its start (``current()``), so it never sees a half-loaded index:
it finishes on the generation it started with while later requests use the new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsearch.catalog import Catalog
from medsearch.config import ImagingConfig, Paths
from medsearch.encoders.registry import default_model
from medsearch.errors import IndexInconsistent, IndexNotBuilt, MedsearchError
from medsearch.fileio import utc_now as _now
from medsearch.search import Searcher

from .keys import KeyStore
from .metrics import Metrics
from .settings import ApiSettings

log = logging.getLogger("medsearch.api")
SPACES = ("image", "text")
_WARMED: weakref.WeakSet[Any] = weakref.WeakSet()  # encoders already warmed up in this process


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key (by id and name) or an anonymous client (by address)."""

    id: str
    name: str
    scope: str  # read, admin
    anonymous: bool

    def allows(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope


class RateLimiter:
    """Token bucket per caller: ``per_minute`` tokens refill continuously, up to ``burst``."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, who: str) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until a token is free."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                if len(self._buckets) > 10_000:  # forget callers whose bucket is full again
                    self._buckets = {
                        k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst
                    }
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate


class AuditLog:
    """One JSON line per query: who, what, when, result count. Never the image, only its hash."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self._logger = logging.getLogger("medsearch.audit")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, **fields: Any) -> None:
        line = json.dumps({"ts": _now(), **fields}, ensure_ascii=False, default=str, separators=(",", ":"))
        if self._file is None:
            self._logger.info(line)
            return
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


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


class AppState:
    """Opened once in the app's lifespan; routes reach it through ``request.app.state.ms``."""

    def __init__(self, settings: ApiSettings, *, encoder: Any = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.paths = Paths(Path(settings.home).expanduser().resolve())
        self.catalog = Catalog.open(self.paths.catalog, create=False)
        self.keys = KeyStore(settings.keys_path)
        self.limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst)
        self.audit = AuditLog(settings.audit_path)
        self.metrics = metrics or Metrics()
        self.thumbs = ThumbnailCache(settings.thumbnail_cache)
        self.imaging = ImagingConfig()
        self.upload_imaging = ImagingConfig(
            max_pixels=settings.max_upload_pixels, max_file_bytes=settings.max_upload_bytes
        )
        self._encoder = encoder
        self._swap_lock = threading.Lock()  # one reload at a time
        self.searcher: Searcher | None = None
        self.loaded_at: str | None = None
        self.loaded_stamp: tuple[Any, ...] | None = None
        self.last_reload_error: str | None = None
        self.unusable_index = False  # the last reload found an index that failed its checks
        self._failed_stamp: tuple[Any, ...] | None = None
        self._pending_stamp: tuple[Any, ...] | None = None
        from .drafts import available

        self.drafts_available = available()

    # ------------------------------------------------------------------ searcher
    def current(self) -> Searcher:
        """The Searcher of the current generation (take it once per request)."""
        s = self.searcher
        if s is None and self.unusable_index and self.last_reload_error is not None:
            raise IndexInconsistent(
                f"the index cannot be served: {self.last_reload_error}",
                hint="run `medsearch check` to see why and `medsearch check --repair` to fix it; "
                "the server picks the repaired index up without a restart",
            )
        if s is None:
            raise IndexNotBuilt(
                "no index has been built in this home yet",
                hint="run `medsearch index`; the server picks the new index up without a restart",
            )
        return s

    def model_id(self) -> str | None:
        return self.settings.model or default_model(self.paths, self.catalog)

    def _stamp(self, model_id: str | None) -> tuple[Any, ...]:
        """What changes when `medsearch index` writes a new generation: the manifests' mtimes."""
        if not model_id:
            return (None,)
        out: list[Any] = [model_id]
        d = self.paths.index_dir(model_id)
        for space in SPACES:
            try:
                st = (d / f"{space}.json").stat()
                out.append((space, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append((space, None))
        return tuple(out)

    def _encoder_for(self, model_id: str) -> Any:
        if self._encoder is not None and self._encoder.model_id == model_id:
            return self._encoder
        from medsearch.encoders.registry import load_encoder

        return load_encoder(model_id, device=self.settings.device, models_dir=self.paths.models)

    def reload(self) -> dict[str, Any]:
        """Build a new Searcher on the newest generation, check it, then swap it in.

        Raises (and keeps serving the old generation) when the new one cannot be loaded whole.
        """
        with self._swap_lock:
            t0 = time.perf_counter()
            model_id = self.model_id()
            if not model_id:
                raise IndexNotBuilt("no index has been built in this home yet", hint="run `medsearch index` first")
            stamp = self._stamp(model_id)
            try:
                enc = self._encoder_for(model_id)
                new = Searcher(self.paths.home, model=model_id, encoder=enc, catalog=self.catalog)
                loaded = new.warm()  # every index loaded, checksum- and count-checked, before the swap
                self._warm_encoder(enc)
            except MedsearchError as e:
                self.last_reload_error = e.message
                self.unusable_index = not isinstance(e, IndexNotBuilt)  # built, but failed its checks
                self.metrics.reloads.labels(result="failed").inc()
                raise
            self.searcher = new  # the swap: one reference assignment
            self.loaded_at = _now()
            self.loaded_stamp = stamp
            self.last_reload_error = None
            self.metrics.reloads.labels(result="ok").inc()
            for space, idx in loaded.items():
                self.metrics.index_vectors.labels(space=space).set(idx.ntotal)
                self.metrics.index_generation.labels(space=space).set(idx.manifest.generation)
            took = (time.perf_counter() - t0) * 1000
            log.info("loaded %s generation %s in %.0f ms", model_id, self.generations(new), took)
            return {
                "model": model_id,
                "generation": self.generations(new),
                "indexes": {s: i.ntotal for s, i in loaded.items()},
                "took_ms": round(took, 1),
            }

    def _warm_encoder(self, enc: Any) -> None:
        """Run a few queries through a newly loaded encoder before it serves.

        The first forward passes in a process are several times slower than later ones (towers on
        CPU, 20 text queries: p50 409 ms in a fresh process, 54 ms on the second pass), so the first
        users would pay for it.
        """
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

    def maybe_reload(self) -> bool:
        """The file watch: reload once the manifests changed and then stayed unchanged for one poll.

        Waiting for a quiet poll means a `medsearch index` that writes the image and then the text
        index is picked up as one swap, not as two. Returns True when it swapped.
        """
        stamp = self._stamp(self.model_id())
        if stamp == self.loaded_stamp or stamp == (None,):
            self._pending_stamp = None
            return False
        if stamp != self._pending_stamp:
            self._pending_stamp = stamp  # changed since the last poll: wait until it settles
            return False
        if stamp == self._failed_stamp:
            return False  # already failed on exactly these files; wait for the next write
        try:
            self.reload()
            return True
        except MedsearchError as e:
            self._failed_stamp = stamp
            log.warning("index reload failed, still serving the previous generation: %s", e)
            return False

    @staticmethod
    def generations(searcher: Searcher) -> dict[str, int]:
        return {space: idx.manifest.generation for space, idx in searcher.loaded_indexes().items()}

    # ------------------------------------------------------------------ images
    def image_png(self, image_id: int, *, max_side: int | None = None) -> tuple[bytes, str]:
        """PNG bytes of a catalog image (optionally shrunk to ``max_side``) and its ETag."""
        from medsearch.errors import NotFound

        rows = self.catalog.image_rows([image_id])
        row = rows.get(image_id)
        if row is None:
            raise NotFound(f"no image with id {image_id}", hint="use an image_id from a search result or a case")
        path = Path(row["path"])
        try:
            st = path.stat()
        except OSError:
            raise NotFound(
                f"the file of image {image_id} is no longer available", hint="re-ingest the dataset it came from"
            ) from None
        key = (image_id, str(path), row["frame"], st.st_mtime_ns, st.st_size, max_side)
        etag = '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'
        cached = self.thumbs.get(key)
        if cached is not None:
            return cached, etag
        from medsearch.errors import InvalidImage
        from medsearch.imaging import load_image

        try:
            im = load_image(path, frame=row["frame"], config=self.imaging)
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
            self.thumbs.put(key, data)
        return data, etag

    def close(self) -> None:
        self.audit.close()
        self.catalog.close()
