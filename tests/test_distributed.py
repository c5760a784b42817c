"""The Ray Data engine: a local Ray on 2 CPUs embeds covid-chestxray into vector shards that the
writer merges; the stored vectors equal the single-process pipeline's. Shards are checksummed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medsearch.catalog import Catalog
from medsearch.config import EmbedConfig, Paths
from medsearch.errors import IndexInconsistent

# A local Ray Data pipeline once stalled on a 2-core machine when the actors reserved every CPU
# (Ray Data's own tasks could not be scheduled); actors now leave one CPU free. CI runs this test;
# should it ever stall again, the watchdog below ends the run with every thread's stack instead
# of hanging CI.
RAY_WATCHDOG_S = 900


def _vectors_by_key(cat: Catalog, model: str) -> dict[str, np.ndarray]:
    keys = dict(cat.db.execute("SELECT id, key FROM images").fetchall())
    out = {}
    for ids, vecs in cat.iter_vectors(model, "image"):
        for i, v in zip(ids.tolist(), vecs, strict=True):
            out[keys[i]] = v
    return out


@pytest.mark.slow
def test_ray_engine_matches_single_process(tmp_path, covid_dir, towers):
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the ray extra is missing: scripts/test.sh installs it (pip install -e '.[ray]')")
        pytest.skip("the ray extra is not installed (pip install -e '.[ray]')")
    import faulthandler

    faulthandler.dump_traceback_later(RAY_WATCHDOG_S, exit=True)
    try:
        _ray_engine_matches_single_process(tmp_path, covid_dir, towers)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _ray_engine_matches_single_process(tmp_path, covid_dir, towers):
    from indexer.distributed import ray_image_stage
    from indexer.embed import embed_images, run_index
    from indexer.ingest import ingest_path

    local = Catalog.open(tmp_path / "local" / "catalog.db")
    ingest_path(local, covid_dir)
    embed_images(local, towers, config=EmbedConfig(batch_size=16, workers=0), progress=False)
    want = _vectors_by_key(local, towers.model_id)
    assert len(want) == local.counts()["images"] > 0

    home = tmp_path / "ray"
    cat = Catalog.open(home / "catalog.db")
    ingest_path(cat, covid_dir)
    shards = home / "shards" / "towers"
    stage = ray_image_stage(spec="towers", models_dir=None, shard_dir=shards, actors=2, num_cpus=2)
    summary = run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=16), progress=False, image_stage=stage)
    assert summary.images_embedded == len(want) and not summary.images_failed
    got = _vectors_by_key(cat, towers.model_id)
    assert got.keys() == want.keys()
    a = np.stack([want[k] for k in sorted(want)])
    b = np.stack([got[k] for k in sorted(want)])
    # same encoder, same device; only the batch composition differs (bf16 kernels may round differently)
    assert np.min(np.sum(a * b, axis=1)) > 0.999
    assert np.max(np.abs(a - b)) < 0.02
    assert summary.indexes["image"]["count"] == len(want)
    assert not list(shards.glob("shard-*")), "merged shards are deleted"


def test_shards_merge_once_and_refuse_tampering(tmp_path):
    from indexer.distributed import merge_shards, write_shard

    cat = Catalog.open(None)
    rng = np.random.default_rng(0)
    v = rng.standard_normal((5, 8)).astype(np.float32)
    write_shard(tmp_path, np.arange(1, 6), v, model_id="m", weights_hash="w", failed=[(9, "bad png")])
    s = merge_shards(cat, tmp_path, model_id="m", weights_hash="w")
    assert s.images_embedded == 5 and s.images_failed == [(9, "bad png")]
    assert cat.count_vectors("m", "image") == 5 and not list(tmp_path.iterdir())
    np.testing.assert_allclose(cat.get_vectors("m", "image", [3])[3], v[2], atol=1e-2)
    assert merge_shards(cat, tmp_path, model_id="m", weights_hash="w").images_embedded == 0

    man = write_shard(tmp_path, np.arange(10, 12), v[:2], model_id="m", weights_hash="w", failed=[])
    vecs = man.with_name(man.name.replace(".json", ".vecs.npy"))
    raw = bytearray(vecs.read_bytes())
    raw[-1] ^= 0xFF
    vecs.write_bytes(bytes(raw))
    with pytest.raises(IndexInconsistent, match="checksums"):
        merge_shards(cat, tmp_path, model_id="m", weights_hash="w")
    assert cat.count_vectors("m", "image") == 5  # nothing from the bad shard
    with pytest.raises(IndexInconsistent, match="made by"):
        merge_shards(cat, tmp_path, model_id="other", weights_hash="w")


def test_merge_while_actors_write_keeps_their_temp_files(tmp_path):
    """The driver merges while actors still write: a live temp file must survive (it was deleted once,
    and the actor's rename failed with FileNotFoundError); only a final merge clears leftovers."""
    from indexer.distributed import merge_shards, write_shard

    cat = Catalog.open(None)
    v = np.ones((2, 4), np.float32)
    write_shard(tmp_path, np.arange(1, 3), v, model_id="m", weights_hash="w", failed=[])
    live = tmp_path / ".shard-x.ids.npy.abc.tmp"  # another actor's file, half written
    live.write_bytes(b"partial")
    s = merge_shards(cat, tmp_path, model_id="m", weights_hash="w", clean_tmp=False)
    assert s.images_embedded == 2 and live.exists()
    merge_shards(cat, tmp_path, model_id="m", weights_hash="w")  # after the job: a crash leftover
    assert not live.exists()
