"""Embed images while they are produced: the DICOMweb sync hands over each slice it renders, in memory.

    producer (fetch, de-identify, render)  --submit(key, pixels)-->  queue  -->  embedding thread
        (preprocess as ``medsearch index`` does, encoder in batches)  -->  take(keys) -> {key: vector}

The pixels are the display image's, bit for bit (the PNG is lossless), and preprocessing is the encoder's
own (``preprocess_u8`` when it has one, as ``embed_images`` uses), so a vector is the one ``medsearch index``
computes from the stored PNG (tests/test_dicomweb.py compares them). What is saved: reading and decoding
the PNG again, a second pass over the catalog, and the start of the DataLoader worker processes.

The encoder may be given as a loader: it is then loaded in the embedding thread, while the producer is
still asking the PACS for metadata. Torch releases the GIL, so on 2 cores the embedding thread runs
beside the producer's thread. An image whose preprocessing or encoding fails gets no vector here;
``medsearch index`` retries it and records why it failed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np

from medsearch.encoders.base import Encoder, image_preprocessor


class StreamEmbedder:
    """A background thread that embeds submitted ``(key, pixels)`` and hands vectors back by key."""

    def __init__(self, encoder: Encoder | Callable[[], Encoder], *, batch: int = 16, depth: int = 64,
                 torch_threads: int = 0) -> None:  # fmt: skip
        self._load = (lambda: encoder) if hasattr(encoder, "encode_image_batch") else encoder
        self.batch = max(1, batch)
        self.torch_threads = torch_threads  # > 0: torch.set_num_threads in the embedding thread (process-wide)
        self.encoder: Encoder | None = None
        self._preprocess: Callable[[Any], Any] | None = None  # the encoder's, chosen once it is loaded
        self._q: queue.Queue[tuple[Hashable, np.ndarray] | None] = queue.Queue(maxsize=max(1, depth))
        self._cv = threading.Condition()
        self._open: set[Hashable] = set()  # submitted, not yet embedded (or failed)
        self._vectors: dict[Hashable, np.ndarray] = {}
        self._error: BaseException | None = None
        self._loaded = threading.Event()
        self.seconds: dict[str, float] = {"load": 0.0, "preprocess": 0.0, "encode": 0.0}
        self.embedded = 0
        self._thread = threading.Thread(target=self._run, name="medsearch-embed", daemon=True)
        self._thread.start()

    # ---- producer side
    def submit(self, key: Hashable, pixels: np.ndarray) -> None:
        """Queue one display image, ``(h, w)`` or ``(h, w, 3)`` uint8 (blocks while the queue is full)."""
        self._raise()
        with self._cv:
            self._open.add(key)
        while True:
            try:
                self._q.put((key, pixels), timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def take(self, keys: Iterable[Hashable]) -> dict[Hashable, np.ndarray]:
        """Wait until every one of ``keys`` is embedded (or failed); their vectors, ``(d,)`` float32 each."""
        keys = list(keys)
        with self._cv:
            while any(k in self._open for k in keys) and self._error is None:
                self._cv.wait(timeout=0.5)
            self._raise()
            return {k: self._vectors.pop(k) for k in keys if k in self._vectors}

    def ready(self) -> Encoder:
        """The encoder, once loaded (raises what loading raised)."""
        while not self._loaded.wait(timeout=0.5):
            self._raise()
        self._raise()
        assert self.encoder is not None
        return self.encoder

    def close(self) -> None:
        """Stop the thread (what was submitted and not taken is dropped)."""
        if self._thread.is_alive():
            while True:
                try:
                    self._q.put(None, timeout=0.5)
                    break
                except queue.Full:
                    try:
                        self._q.get_nowait()
                    except queue.Empty:
                        pass
            self._thread.join(timeout=30)

    def __enter__(self) -> StreamEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # ---- the embedding thread
    def _run(self) -> None:
        t = time.perf_counter()
        try:
            if self.torch_threads > 0:
                import torch

                torch.set_num_threads(self.torch_threads)
            self.encoder = self._load()
            self._preprocess = image_preprocessor(self.encoder)
        except BaseException as e:  # ModelNotAvailable and the like: raised to the producer
            with self._cv:
                self._error = e
                self._cv.notify_all()
            self._loaded.set()
            return
        self.seconds["load"] = time.perf_counter() - t
        self._loaded.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._embed(batch)
                    return
                batch.append(nxt)
            self._embed(batch)

    def _embed(self, batch: list[tuple[Hashable, np.ndarray]]) -> None:
        import torch
        from PIL import Image

        enc, pre = self.encoder, self._preprocess
        assert enc is not None and pre is not None
        t = time.perf_counter()
        keys, xs = [], []
        for key, pixels in batch:
            try:
                xs.append(pre(Image.fromarray(pixels)))  # (3, H, W): what embed_images gets from the PNG
                keys.append(key)
            except Exception:  # left to `medsearch index`, which records the reason
                pass
        t2 = time.perf_counter()
        vecs: Any = None
        if xs:
            try:
                vecs = enc.encode_image_batch(torch.stack(xs))  # (b, d) float32
            except Exception:
                vecs = None
        self.seconds["preprocess"] += t2 - t
        self.seconds["encode"] += time.perf_counter() - t2
        with self._cv:
            if vecs is not None:
                for key, v in zip(keys, vecs, strict=True):
                    self._vectors[key] = v
                self.embedded += len(keys)
            for key, _ in batch:
                self._open.discard(key)
            self._cv.notify_all()
