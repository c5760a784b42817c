"""Embedding pipeline: catalog rows without vectors -> encoder -> stored vectors -> FAISS.

    reader (DataLoader workers: decode + preprocess)  ->  encoder (device, bf16 on CUDA)
        ->  writer (catalog.put_vectors, one transaction per ``commit_every`` vectors)
    then: FAISS index per space rebuilt from the stored vectors, saved atomically.

Resumable by construction: only rows with no vector for the model are read, and vectors are
committed in chunks, so a rerun after a crash continues where the last commit left off.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.catalog import Catalog
from medsearch.config import EmbedConfig, ImagingConfig, IndexConfig, Paths
from medsearch.encoders.base import Encoder, image_preprocessor
from medsearch.errors import MedsearchError
from medsearch.stores import choose_store
from medsearch.stores.base import recall_summary
from medsearch.stores.faiss import VectorIndex, read_manifest, saved_files


@dataclass
class EmbedSummary:
    model_id: str
    images_embedded: int = 0
    texts_embedded: int = 0
    images_failed: list[tuple[int, str]] = field(default_factory=list)
    image_seconds: float = 0.0
    text_seconds: float = 0.0
    index_seconds: float = 0.0
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images_embedded / self.image_seconds if self.image_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "images_embedded": self.images_embedded,
            "images_per_s": round(self.images_per_s, 1),
            "texts_embedded": self.texts_embedded,
            "images_failed": [{"image_id": i, "reason": r} for i, r in self.images_failed],
            "seconds": {
                "images": round(self.image_seconds, 2),
                "texts": round(self.text_seconds, 2),
                "index": round(self.index_seconds, 2),
                **{k: round(v, 2) for k, v in self.stage_seconds.items()},
            },
            "indexes": self.indexes,
        }


class _ImageDataset:
    """Map-style dataset over image ids; decoding runs in DataLoader workers.

    Holds only the (n,) int64 ids; each worker opens its own read-only catalog connection and
    looks paths up per item, so memory does not grow with the archive (8 bytes per image).
    An in-memory catalog (no file to reopen) passes its (id, path, frame) rows instead.
    ``preprocess`` is the encoder's uint8 preprocessing when it has one (``preprocess_u8``:
    4x less to copy between processes and to the GPU, normalised on the device), else its
    float preprocessing.
    """

    def __init__(self, ids: np.ndarray, encoder: Encoder, imaging: ImagingConfig, *, db_path: Path | None = None,
                 rows: dict[int, tuple[str, int | None]] | None = None, uint8: bool = False) -> None:  # fmt: skip
        self.ids = ids
        self.preprocess = image_preprocessor(encoder, uint8)
        self.imaging = imaging
        self.db_path = db_path
        self.rows = rows
        self._catalog: Catalog | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _source(self, image_id: int) -> tuple[str, int | None]:
        if self.rows is not None:
            return self.rows[image_id]
        if self._catalog is None:  # first item in this process (a worker, or the main one with workers=0)
            self._catalog = Catalog.open(self.db_path, readonly=True)
        return self._catalog.image_source(image_id)

    def __getitem__(self, i: int):
        from medsearch.imaging import load_image

        image_id = int(self.ids[i])
        try:
            path, frame = self._source(image_id)
            img = load_image(path, frame=frame, config=self.imaging)
            return image_id, self.preprocess(img), None
        except MedsearchError as e:
            return image_id, None, e.message
        except Exception as e:  # a decoder bug must not stop an overnight run
            return image_id, None, f"{type(e).__name__}: {e}"

    def __getstate__(self):  # a worker process opens its own connection
        return {**self.__dict__, "_catalog": None}


def _collate(batch):
    import torch

    ok = [(i, x) for i, x, err in batch if x is not None]
    failed = [(i, err) for i, x, err in batch if x is None]
    ids = np.array([i for i, _ in ok], dtype=np.int64)
    xs = torch.stack([x for _, x in ok]) if ok else None
    return ids, xs, failed


class _EncodingDataset(_ImageDataset):
    """CPU data parallelism: one item is a whole batch of positions, decoded *and encoded* in a
    DataLoader worker (each worker runs the encoder single-threaded, so N workers use N cores
    without OpenMP barriers between them). Workers are forked and share the model's memory."""

    def __init__(self, *args: Any, encoder: Encoder, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.encoder = encoder

    def __getitem__(self, positions):  # type: ignore[override]
        ids, xs, failed = _collate([super(_EncodingDataset, self).__getitem__(i) for i in positions])
        if xs is None:
            return ids, None, failed
        return ids, self.encoder.encode_image_batch(xs), failed  # (b, d) float32


def _unbatched(x):
    return x


def resolve_workers(config: EmbedConfig, device: str) -> int:
    """DataLoader workers: the configured number, or for ``-1`` (auto): on CUDA one decode worker
    per CPU core but one (up to 16); on CPU one worker per core (up to 16) that decodes *and*
    encodes (``encode_in_workers``; 1 if that is off, decoding beside the encoding process)."""
    if config.workers >= 0:
        return config.workers
    import os

    cores = os.cpu_count() or 2
    if str(device).startswith("cuda"):
        return max(1, min(16, cores - 1))
    return max(1, min(16, cores)) if config.encode_in_workers else 1


def resolve_batch_size(config: EmbedConfig, device: str) -> int:
    """Images per DataLoader batch: the configured size, or for ``0`` (auto) 256 on a GPU and 16 on CPU."""
    if config.batch_size > 0:
        return config.batch_size
    return 256 if str(device).startswith("cuda") else 16


def check_weights(catalog: Catalog, encoder: Encoder) -> bool:
    """Drop stored vectors made by other weights of the same model id. True if any were dropped."""
    key = f"weights:{encoder.model_id}"
    old = catalog.get_meta(key)
    if old == encoder.weights_hash:
        return False
    with catalog.atomic():
        dropped = False
        if old is not None:
            catalog.drop_model_vectors(encoder.model_id)
            dropped = True
        catalog.set_meta(key, encoder.weights_hash)
    return dropped


_LIBC: Any = None


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``); no-op elsewhere.

    Between batches the pipeline frees MBs of tensors; glibc keeps freed heap chunks mapped,
    and with a DataLoader worker feeding the main process the heap fragmented: RSS grew by
    ~0.45 MB per image (1.1 GB after 3,000 images, in 5 of 8 runs) and stayed there
    (benchmarks/memory_bench.py). Trimming after every batch keeps RSS flat in N. (A fixed
    128 KiB mmap threshold also kept RSS flat but made every forward pass ~3.5x slower:
    each activation buffer became a fresh mmap with page faults.)
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        import sys

        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.malloc_trim  # noqa: B018  (glibc only)
                _LIBC = lib
            except (OSError, AttributeError):
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)


def embed_images(
    catalog: Catalog,
    encoder: Encoder,
    *,
    config: EmbedConfig = EmbedConfig(),
    imaging: ImagingConfig = ImagingConfig(),
    progress: bool = True,
    limit: int | None = None,
    summary: EmbedSummary | None = None,
) -> EmbedSummary:
    """Embed every ok image that has no vector for this encoder yet.

    DataLoader workers decode and preprocess (uint8 when the encoder can normalise on its
    device); the main process encodes batches (bf16 autocast, channels_last on CUDA, pinned
    memory and non-blocking copies) and commits vectors every ``commit_every``.
    """
    import torch
    from torch.utils.data import DataLoader

    summary = summary or EmbedSummary(encoder.model_id)
    ids = catalog.image_ids_to_embed(encoder.model_id, limit=limit)  # (n,) int64
    if len(ids) == 0:
        return summary
    on_cuda = str(encoder.device).startswith("cuda")
    workers = resolve_workers(config, encoder.device)
    batch_size = resolve_batch_size(config, encoder.device)
    uint8 = config.uint8_transfer and bool(getattr(encoder, "uint8_input", False))
    encode_in_workers = config.encode_in_workers and workers > 0 and str(encoder.device) == "cpu"
    rows = None
    if catalog.path is None:  # in-memory catalog: workers cannot reopen it, so pass the rows
        rows = {int(i): (p, f) for i, p, f in catalog.images_to_embed(encoder.model_id, limit=limit)}
    if encode_in_workers:
        from torch.utils.data import BatchSampler, SequentialSampler

        dataset = _EncodingDataset(ids, encoder, imaging, db_path=catalog.path, rows=rows, uint8=uint8,
                                   encoder=encoder)  # fmt: skip
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(SequentialSampler(range(len(ids))), batch_size, drop_last=False),
            num_workers=workers,
            collate_fn=_unbatched,
            prefetch_factor=max(1, config.prefetch // 2),
            persistent_workers=False,
        )
    else:
        dataset = _ImageDataset(ids, encoder, imaging, db_path=catalog.path, rows=rows, uint8=uint8)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=on_cuda,
            prefetch_factor=config.prefetch if workers else None,
            persistent_workers=False,
        )
    threads_before = torch.get_num_threads()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    rows_total = len(ids)
    del ids
    bar = _bar(rows_total, "embed images", "img", progress)
    t0 = time.perf_counter()
    buf_ids: list[np.ndarray] = []
    buf_vecs: list[np.ndarray] = []
    buffered = 0
    t_enc = t_write = 0.0
    try:
        first = True
        for ids, xs, failed in loader:
            if first:  # start-up (worker processes, first decode) vs steady state, for benchmarks
                summary.stage_seconds["image_first_batch"] = time.perf_counter() - t0
                summary.stage_seconds["image_first_batch_images"] = float(len(ids) + len(failed))
                first = False
            for image_id, reason in failed:
                catalog.mark_image_failed(int(image_id), reason)
                summary.images_failed.append((int(image_id), reason))
            if xs is not None:
                te = time.perf_counter()
                vecs = xs if encode_in_workers else encoder.encode_image_batch(xs)  # (b, image_dim) float32
                t_enc += time.perf_counter() - te
                buf_ids.append(ids)
                buf_vecs.append(vecs)
                buffered += len(ids)
            if buffered >= config.commit_every:
                tw = time.perf_counter()
                _flush(catalog, encoder.model_id, "image", buf_ids, buf_vecs)
                t_write += time.perf_counter() - tw
                summary.images_embedded += buffered
                buf_ids, buf_vecs, buffered = [], [], 0
            bar.update(len(ids) + len(failed))
            del xs
            if config.trim_memory:
                release_free_memory()
        if buffered:
            _flush(catalog, encoder.model_id, "image", buf_ids, buf_vecs)
            summary.images_embedded += buffered
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
    del torch
    summary.image_seconds += time.perf_counter() - t0
    summary.stage_seconds["image_encode"] = summary.stage_seconds.get("image_encode", 0.0) + t_enc
    summary.stage_seconds["image_write"] = summary.stage_seconds.get("image_write", 0.0) + t_write
    return summary


def embed_texts(
    catalog: Catalog,
    encoder: Encoder,
    *,
    config: EmbedConfig = EmbedConfig(),
    progress: bool = True,
    summary: EmbedSummary | None = None,
) -> EmbedSummary:
    """Embed every stored text (captions, report sections and sentences) that has no vector yet."""
    summary = summary or EmbedSummary(encoder.model_id)
    total = catalog.count_texts() - catalog.count_vectors(encoder.model_id, "text")
    if total <= 0:
        return summary
    bar = _bar(total, "embed texts", "txt", progress)
    t0 = time.perf_counter()
    chunk = max(1, min(config.text_batch_size * 8, config.commit_every))  # texts per encode call and commit
    for ids, texts in _batched(catalog.texts_to_embed(encoder.model_id), chunk):
        vecs = encoder.encode_texts(texts)  # (b, text_dim) float32
        catalog.put_vectors(encoder.model_id, "text", ids, vecs)
        summary.texts_embedded += len(ids)
        bar.update(len(ids))
    bar.close()
    summary.text_seconds += time.perf_counter() - t0
    return summary


def build_indexes(
    catalog: Catalog,
    paths: Paths,
    *,
    model_id: str,
    weights_hash: str,
    dims: dict[str, int],
    config: IndexConfig = IndexConfig(),
    force: bool = False,
    store: str | None = None,
    milvus_uri: str | None = None,
    milvus_token: str | None = None,
) -> dict[str, dict[str, Any]]:
    """(Re)build the FAISS index of each space from stored vectors; skip spaces already in sync.

    ``store`` milvus (or the store this home recorded last) syncs a Milvus collection instead
    (``medsearch.stores.milvus_sync.index_space``).

    An index that only lacks newly stored vectors is updated in place (``VectorIndex.sync``:
    new vectors added, no rebuild) when its kind is still the right one; anything else (a
    vector replaced or removed, other weights, ``force``) rebuilds it from stored vectors.
    """
    out: dict[str, dict[str, Any]] = {}
    directory = paths.index_dir(model_id)
    store = choose_store(catalog, store, milvus_uri, milvus_token)
    for space, dim in dims.items():
        if store == "milvus":
            from medsearch.stores.milvus_sync import index_space

            if (done := index_space(catalog, directory, model_id=model_id, weights_hash=weights_hash, space=space,
                                    dim=dim, config=config, force=force)) is not None:  # fmt: skip
                out[space] = done
            continue
        count = catalog.count_vectors(model_id, space)
        mpath = directory / f"{space}.json"
        generation = 1
        man = None
        if mpath.exists():
            try:
                man = read_manifest(mpath)
                generation = man.generation + 1
                # Same count, same weights and no rows changed since the build -> in sync.
                if (
                    not force
                    and man.count == count
                    and man.weights_hash == weights_hash
                    and not catalog.is_dirty(model_id, space)
                    and all(f.exists() for f in saved_files(directory, space) or [directory / f"{space}.faiss"])
                    and (config.kind in ("auto", man.kind))
                ):
                    out[space] = {"count": man.count, "kind": man.kind, "generation": man.generation, "rebuilt": False}
                    continue
            except MedsearchError:
                man = None
        if count == 0:
            continue
        # re-iterable (ivfpq samples a first pass); blocks of ~32 MB of float32 whatever the dim
        # (65,536 rows of 1280-d towers vectors were 335 MB, plus the float16 copies)
        rows = max(1024, (32 << 20) // (4 * dim))
        blocks = functools.partial(catalog.iter_vectors, model_id, space, rows)
        if not force and man is not None and man.weights_hash == weights_hash and man.dim == dim and count > man.count:
            added = _try_sync(directory, space, model_id, weights_hash, man, count, config, blocks, generation)
            if added is not None:
                idx, n_added = added
                catalog.mark_dirty(model_id, space)
                idx.save(directory)
                catalog.mark_clean(model_id, space)
                out[space] = {"count": idx.ntotal, "kind": idx.manifest.kind, "generation": generation,
                              "rebuilt": False, "added": n_added}  # fmt: skip
                continue
        idx = VectorIndex.from_blocks(
            blocks, model_id=model_id, weights_hash=weights_hash, space=space,
            dim=dim, count=count, config=config, generation=generation,
        )  # fmt: skip
        # dirty until the save is complete: a crash between the .faiss and the manifest swap
        # (same count, e.g. --rebuild) must not look "in sync" to the next run
        catalog.mark_dirty(model_id, space)
        idx.save(directory)
        catalog.mark_clean(model_id, space)
        out[space] = {"count": idx.ntotal, "kind": idx.manifest.kind, "generation": generation, "rebuilt": True,
                      **recall_summary(idx.manifest.params)}  # fmt: skip
    catalog.set_meta("default_model", model_id)
    return out


def _try_sync(directory: Path, space: str, model_id: str, weights_hash: str, man: Any, count: int,
              config: IndexConfig, blocks: Any, generation: int) -> tuple[VectorIndex, int] | None:  # fmt: skip
    """Load the saved index and add the new stored vectors to it; None when a rebuild is due."""
    if config.kind == "auto":
        # keep the built kind unless the collection crossed the exact-search threshold
        if (man.kind == "flat") != (count <= config.flat_max):
            return None
    elif config.kind != man.kind:
        return None
    try:
        idx = VectorIndex.load(directory, space, model_id=model_id, weights_hash=weights_hash)
    except MedsearchError:
        return None
    # IVF lists trained on the old vectors stop fitting when the collection more than doubles
    added = idx.sync(blocks, generation=generation, max_new_fraction=1.0 if man.kind == "ivfpq" else float("inf"))
    return None if added is None else (idx, added)


def run_index(
    catalog: Catalog,
    encoder: Encoder,
    paths: Paths,
    *,
    config: EmbedConfig = EmbedConfig(),
    imaging: ImagingConfig = ImagingConfig(),
    index_config: IndexConfig = IndexConfig(),
    progress: bool = True,
    rebuild: bool = False,
    image_stage: Callable[..., EmbedSummary] | None = None,
    store: str | None = None,
    milvus_uri: str | None = None,
    milvus_token: str | None = None,
) -> EmbedSummary:
    """The whole ``medsearch index`` step: embed images and texts, then build the indexes.

    ``image_stage`` replaces ``embed_images`` (same arguments), e.g. the Ray Data engine of
    ``indexer.distributed``; texts and indexes are always done here.
    """
    check_weights(catalog, encoder)
    if rebuild:  # retry images that failed to decode last time
        catalog.retry_failed_images()
    summary = EmbedSummary(encoder.model_id)
    before = {s: catalog.count_vectors(encoder.model_id, s) for s in ("image", "text")}
    (image_stage or embed_images)(catalog, encoder, config=config, imaging=imaging, progress=progress, summary=summary)
    embed_texts(catalog, encoder, config=config, progress=progress, summary=summary)
    for s in ("image", "text"):
        if catalog.count_vectors(encoder.model_id, s) != before[s]:
            catalog.mark_dirty(encoder.model_id, s)
    t0 = time.perf_counter()
    summary.indexes = build_indexes(
        catalog, paths, model_id=encoder.model_id, weights_hash=encoder.weights_hash,
        dims={"image": encoder.image_dim, "text": encoder.text_dim}, config=index_config, force=rebuild,
        store=store, milvus_uri=milvus_uri, milvus_token=milvus_token,
    )  # fmt: skip
    from medsearch.bm25 import build_bm25_index  # BM25 over report/caption text, beside the vector indexes

    summary.indexes["bm25"] = {"kind": "bm25", **build_bm25_index(catalog, paths.index_dir(encoder.model_id), force=rebuild)}
    summary.index_seconds = time.perf_counter() - t0
    return summary


def _flush(catalog: Catalog, model: str, space: str, ids: list[np.ndarray], vecs: list[np.ndarray]) -> None:
    catalog.put_vectors(model, space, np.concatenate(ids).tolist(), np.concatenate(vecs))


def _batched(rows: Iterator[tuple[int, str]], n: int) -> Iterator[tuple[list[int], list[str]]]:
    ids: list[int] = []
    texts: list[str] = []
    for i, t in rows:
        ids.append(i)
        texts.append(t)
        if len(ids) >= n:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)
