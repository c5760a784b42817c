"""The image-embedding stage on Ray Data, for clusters (``medsearch index --engine ray``).

    driver: catalog -> Arrow table of (id, path, frame) for images without a vector
      -> ray.data.from_arrow(...).map_batches(EmbedActor, concurrency=N actors,
                                               num_gpus=1 per actor on CUDA, else num_cpus)
         each actor: load the encoder once (``load_encoder(spec, device, models_dir)``), then per
         batch: decode + preprocess + encode, and write one vector shard to ``shard_dir``:
             <name>.ids.npy   (n,) int64 catalog image ids
             <name>.vecs.npy  (n, d) float32 vectors
             <name>.json      model, weights hash, count, dim, sha256 of both .npy files, failed
                              images -- written last (temp file + rename): its presence marks
                              a complete shard
      -> driver (the only writer): verifies each shard's checksums and model, stores its
         vectors in one catalog transaction (``put_vectors``), marks failed images, deletes it.

Shards written before a crash are merged by the next run before anything is re-embedded, so
a rerun loses nothing a worker finished. ``shard_dir`` (default ``HOME/shards/<model>``) and
the image paths must be visible to every node (shared filesystem) on a real cluster; a local
Ray instance needs nothing more. The vectors are the same as the single-process path's: the
same encoder code on the same device (tests/test_distributed.py).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.catalog import Catalog
from medsearch.config import EmbedConfig, ImagingConfig
from medsearch.encoders.base import Encoder, image_preprocessor
from medsearch.errors import IndexInconsistent, MedsearchError, ModelNotAvailable
from medsearch.fileio import sha256_file, write_atomic

from .embed import EmbedSummary, resolve_batch_size


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` to ``path`` atomically (temp file, fsync, rename); returns the file's sha256."""
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))
    return sha256_file(path)


def write_shard(directory: Path, ids: np.ndarray, vecs: np.ndarray, *, model_id: str, weights_hash: str,
                failed: list[tuple[int, str]]) -> Path:  # fmt: skip
    """One complete shard (two .npy files, then its JSON manifest last). Returns the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    ids = np.ascontiguousarray(ids, dtype=np.int64)  # (n,)
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # (n, d)
    meta = {
        "model_id": model_id, "weights_hash": weights_hash, "count": int(len(ids)),
        "dim": int(vecs.shape[1]) if vecs.ndim == 2 else 0,
        "ids_sha256": _save_npy(directory / f"{name}.ids.npy", ids),
        "vecs_sha256": _save_npy(directory / f"{name}.vecs.npy", vecs),
        "failed": [[int(i), str(r)] for i, r in failed],
    }  # fmt: skip
    write_atomic(directory / f"{name}.json", lambda f: f.write(json.dumps(meta).encode()))
    return directory / f"{name}.json"


def read_shard(manifest: Path, *, model_id: str, weights_hash: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(ids, vecs, failed) of a complete shard, after checking its model and both checksums."""
    meta = json.loads(manifest.read_text())
    stem = manifest.name[: -len(".json")]
    ids_p, vecs_p = manifest.with_name(f"{stem}.ids.npy"), manifest.with_name(f"{stem}.vecs.npy")
    if meta.get("model_id") != model_id or meta.get("weights_hash") != weights_hash:
        raise IndexInconsistent(
            f"vector shard {manifest} was made by {meta.get('model_id')} ({meta.get('weights_hash')}), "
            f"not {model_id} ({weights_hash})",
            hint=f"delete {manifest.parent} or index with the model that wrote it",
        )
    if meta["count"] and (sha256_file(ids_p) != meta["ids_sha256"] or sha256_file(vecs_p) != meta["vecs_sha256"]):
        raise IndexInconsistent(f"vector shard {manifest} does not match its checksums",
                                hint=f"delete {stem}.* in {manifest.parent} and rerun `medsearch index`")  # fmt: skip
    if not meta["count"]:
        return np.zeros(0, np.int64), np.zeros((0, meta.get("dim", 0)), np.float32), meta["failed"]
    return np.load(ids_p), np.load(vecs_p), meta["failed"]


def merge_shards(catalog: Catalog, directory: Path, *, model_id: str, weights_hash: str,
                 summary: EmbedSummary | None = None, clean_tmp: bool = True) -> EmbedSummary:  # fmt: skip
    """Store every complete shard of ``directory`` in the catalog (one transaction each), then delete it.

    ``clean_tmp`` also removes half-written temp files, which only a crashed writer leaves: pass
    False while actors may be writing (their temp files are live, and renamed when complete).
    """
    summary = summary or EmbedSummary(model_id)
    if not directory.is_dir():
        return summary
    for manifest in sorted(directory.glob("shard-*.json")):
        ids, vecs, failed = read_shard(manifest, model_id=model_id, weights_hash=weights_hash)
        with catalog.atomic():
            if len(ids):
                catalog.put_vectors(model_id, "image", ids.tolist(), vecs)
            for image_id, reason in failed:
                catalog.mark_image_failed(int(image_id), reason)
        summary.images_embedded += len(ids)
        summary.images_failed.extend((int(i), r) for i, r in failed)
        stem = manifest.name[: -len(".json")]
        manifest.unlink()  # the manifest first: a crash now leaves orphan .npy files, never a half shard
        for suffix in (".ids.npy", ".vecs.npy"):
            manifest.with_name(stem + suffix).unlink(missing_ok=True)
    if clean_tmp:
        for stale in directory.glob(".shard-*.tmp"):
            stale.unlink(missing_ok=True)
    return summary


class EmbedActor:
    """A Ray Data actor: one encoder per actor (per device), decode + encode + write a shard per batch."""

    def __init__(self, spec: str, device: str, models_dir: str | None, shard_dir: str, imaging: ImagingConfig,
                 torch_threads: int) -> None:  # fmt: skip
        if torch_threads > 0:
            import torch

            torch.set_num_threads(torch_threads)
        from medsearch.encoders.registry import load_encoder

        self.encoder = load_encoder(spec, device=device, models_dir=Path(models_dir) if models_dir else None)
        self.shard_dir = Path(shard_dir)
        self.imaging = imaging
        self.preprocess = image_preprocessor(self.encoder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from medsearch.imaging import load_image

        enc = self.encoder
        ok_ids, xs, failed = [], [], []
        for image_id, path, frame in zip(batch["id"], batch["path"], batch["frame"], strict=True):
            try:
                img = load_image(str(path), frame=None if int(frame) < 0 else int(frame), config=self.imaging)
                xs.append(self.preprocess(img))
                ok_ids.append(int(image_id))
            except MedsearchError as e:
                failed.append((int(image_id), e.message))
            except Exception as e:  # a decoder bug must not stop the job
                failed.append((int(image_id), f"{type(e).__name__}: {e}"))
        if xs:
            vecs = enc.encode_image_batch(torch.stack(xs))  # (b, d) float32
        else:
            vecs = np.zeros((0, enc.image_dim), np.float32)
        manifest = write_shard(self.shard_dir, np.asarray(ok_ids, np.int64), vecs, model_id=enc.model_id,
                               weights_hash=enc.weights_hash, failed=failed)  # fmt: skip
        return {"shard": np.array([manifest.name]), "count": np.array([len(ok_ids)]), "failed": np.array([len(failed)])}


def _rows_table(catalog: Catalog, model_id: str, limit: int | None):
    """Arrow table (id int64, path string, frame int64; -1 = none) of images to embed."""
    import pyarrow as pa

    ids, paths, frames = [], [], []
    for image_id, path, frame in catalog.images_to_embed(model_id, limit=limit):
        ids.append(image_id)
        paths.append(path)
        frames.append(-1 if frame is None else frame)
    return pa.table({"id": pa.array(ids, pa.int64()), "path": pa.array(paths, pa.string()),
                     "frame": pa.array(frames, pa.int64())})  # fmt: skip


def embed_images_ray(
    catalog: Catalog,
    encoder: Encoder,
    *,
    spec: str,
    models_dir: Path | None,
    shard_dir: Path,
    config: EmbedConfig = EmbedConfig(),
    imaging: ImagingConfig = ImagingConfig(),
    actors: int = 0,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    limit: int | None = None,
    summary: EmbedSummary | None = None,
) -> EmbedSummary:
    """Embed every ok image without a vector on Ray Data; vectors reach the catalog via shards.

    ``encoder`` is the driver's copy (its id and weights hash name the shards; it does not
    encode here); actors load ``spec`` themselves. ``actors``: pool size (0 = one per GPU on
    CUDA, else one per 2 CPUs of the cluster, at least 1). ``address``: an existing cluster
    (``ray://...`` or ``auto``); None starts a local instance with ``num_cpus``.
    """
    try:
        import ray
    except ImportError as e:
        raise ModelNotAvailable("the ray engine needs Ray Data", hint='pip install "medsearch[ray]"') from e
    summary = summary or EmbedSummary(encoder.model_id)
    t0 = time.perf_counter()
    # shards a crashed run left behind are stored first: nothing finished is embedded twice
    merge_shards(catalog, shard_dir, model_id=encoder.model_id, weights_hash=encoder.weights_hash, summary=summary)
    table = _rows_table(catalog, encoder.model_id, limit)
    if table.num_rows == 0:
        summary.image_seconds += time.perf_counter() - t0
        return summary
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        on_cuda = str(encoder.device).startswith("cuda")
        res = ray.cluster_resources()
        cpus = float(res.get("CPU", 1))
        if actors <= 0:
            actors = int(res.get("GPU", 0)) if on_cuda else max(1, int(cpus) // 2)
        # Keep one CPU free for Ray Data's own tasks: actors holding every CPU of a small (local)
        # cluster can starve the executor. The reservation is for scheduling; each CPU actor runs
        # torch with as many threads as whole CPUs it reserved (at least 1).
        if on_cuda:
            actor_cpus = 1.0
        elif cpus > actors:
            actor_cpus = max(0.25, (cpus - 1.0) / actors)
        else:
            actor_cpus = max(0.25, cpus / actors / 2)
        batch = resolve_batch_size(config, encoder.device)
        # several blocks per actor (slices of the table, no shuffle), so every actor gets work at once
        n_blocks = max(1, min(table.num_rows, max(2 * actors, -(-table.num_rows // batch))))
        step = -(-table.num_rows // n_blocks)
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
        out = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "spec": spec, "device": encoder.device, "models_dir": str(models_dir) if models_dir else None,
                "shard_dir": str(shard_dir), "imaging": imaging,
                "torch_threads": config.torch_threads or max(1, int(actor_cpus)),
            },  # fmt: skip
            batch_size=batch,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=1 if on_cuda else 0,
            num_cpus=actor_cpus,
        )
        written = 0
        for row in out.iter_rows():  # streaming: shards are merged while later batches are encoded
            written += int(row["count"]) + int(row["failed"])
            # other actors are still writing: leave their temp files alone
            merge_shards(catalog, shard_dir, model_id=encoder.model_id, weights_hash=encoder.weights_hash,
                         summary=summary, clean_tmp=False)  # fmt: skip
        summary.stage_seconds["ray_actors"] = float(actors)
    finally:
        if started:
            ray.shutdown()
    merge_shards(catalog, shard_dir, model_id=encoder.model_id, weights_hash=encoder.weights_hash, summary=summary)
    summary.image_seconds += time.perf_counter() - t0
    return summary


def ray_image_stage(*, spec: str, models_dir: Path | None, shard_dir: Path, actors: int = 0,
                    address: str | None = None, num_cpus: int | None = None):  # fmt: skip
    """An ``image_stage`` for ``indexer.embed.run_index`` that runs ``embed_images_ray``."""

    def stage(catalog: Catalog, encoder: Encoder, *, config: EmbedConfig, imaging: ImagingConfig, progress: bool,
              summary: EmbedSummary) -> EmbedSummary:  # fmt: skip
        return embed_images_ray(
            catalog, encoder, spec=spec, models_dir=models_dir, shard_dir=shard_dir, config=config, imaging=imaging,
            actors=actors, address=address, num_cpus=num_cpus, progress=progress, summary=summary,
        )  # fmt: skip

    return stage
