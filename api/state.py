"""What the app holds between requests: the catalog, the current Searcher, keys, limits, caches.

The parts live in their own modules (principal, ratelimit, audit, images, warmup); this one owns
the searcher and its hot swap.

Hot swap: ``reload()`` builds a *new* Searcher, loads and checks every index it will use,
and only then replaces ``self.searcher`` (one reference assignment under a lock). A request
takes the reference once at its start (``current()``), so it never sees a half-loaded index:
it finishes on the generation it started with while later requests use the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from medsearch.audit import AuditLog
from medsearch.catalog import Catalog, now
from medsearch.config import ImagingConfig, Paths
from medsearch.encoders.registry import default_model
from medsearch.errors import IndexInconsistent, IndexNotBuilt, MedsearchError
from medsearch.search import Searcher

from . import images
from .drafts import available as drafts_available
from .keys import KeyStore
from .metrics import Metrics
from .ratelimit import RateLimiter
from .settings import ApiSettings
from .warmup import warm_encoder

log = logging.getLogger("medsearch.api")
SPACES = ("image", "text")


class AppState:
    """Opened once in the app's lifespan; routes reach it through ``request.app.state.ms``."""

    def __init__(self, settings: ApiSettings, *, encoder: Any = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.paths = Paths(Path(settings.home).expanduser().resolve())
        self.catalog = Catalog.open(self.paths.catalog, create=False)
        self.keys = KeyStore(settings.keys_path)
        self.limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst)
        self.audit = AuditLog(settings.audit_path)  # hash-chained, rotates by size (medsearch.audit)
        self.metrics = metrics or Metrics()
        self.thumbs = images.ThumbnailCache(settings.thumbnail_cache)
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
        self.drafts_available = drafts_available()

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
                warm_encoder(enc)
            except MedsearchError as e:
                self.last_reload_error = e.message
                self.unusable_index = not isinstance(e, IndexNotBuilt)  # built, but failed its checks
                self.metrics.reloads.labels(result="failed").inc()
                raise
            self.searcher = new  # the swap: one reference assignment
            self.loaded_at = now()
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
        return images.image_png(self.catalog, image_id, max_side=max_side, cache=self.thumbs, imaging=self.imaging)

    def close(self) -> None:
        self.audit.close()
        self.catalog.close()
