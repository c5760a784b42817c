"""The embedding pipeline's modes give the same vectors: main-process decode, decode workers with
uint8 hand-over, and CPU workers that decode *and* encode; memory stays bounded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medsearch.catalog import Catalog
from medsearch.config import EmbedConfig

N = 12


@pytest.fixture(scope="module")
def template(tmp_path_factory, towers):
    """A file catalog holding N medpix images (image-folder layout of symlinks), not embedded."""
    from conftest import MEDPIX

    from indexer.ingest import ingest_path

    root = tmp_path_factory.mktemp("embed")
    folder = root / "images"
    folder.mkdir()
    with open(MEDPIX / "images.jsonl") as f:
        for line in list(f)[:N]:
            p = MEDPIX / json.loads(line)["file"]
            (folder / p.name).symlink_to(p)
    cat = Catalog.open(root / "template.db")
    ingest_path(cat, folder, source="t")
    cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cat.close()
    return root / "template.db"


def _run(template, tmp_path, towers, **cfg):
    from indexer.embed import embed_images

    db = tmp_path / f"c{len(list(tmp_path.iterdir()))}.db"
    shutil.copy(template, db)
    cat = Catalog.open(db)
    s = embed_images(cat, towers, config=EmbedConfig(batch_size=5, **cfg), progress=False)
    assert s.images_embedded == N and not s.images_failed
    ids, vecs = zip(*cat.iter_vectors(towers.model_id, "image"), strict=True)
    cat.close()
    return np.concatenate(ids), np.concatenate(vecs)


def test_pipeline_modes_store_identical_vectors(template, tmp_path, towers):
    ids0, ref = _run(template, tmp_path, towers, workers=0, uint8_transfer=False)
    assert np.allclose(np.linalg.norm(ref, axis=1), 1.0, atol=2e-3)
    for cfg in ({"workers": 1, "encode_in_workers": False}, {"workers": 2, "encode_in_workers": True}):
        ids, vecs = _run(template, tmp_path, towers, **cfg)
        np.testing.assert_array_equal(ids, ids0)
        # Same encoder code and micro-batches; a worker process runs its own torch thread pool, whose
        # reduction order can move a float16-stored value by one ulp (seen on bf16-capable CPUs).
        np.testing.assert_allclose(vecs.astype(np.float32), ref.astype(np.float32), rtol=0, atol=2e-4)
        a, b = vecs.astype(np.float32), ref.astype(np.float32)
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert float(cos.min()) > 0.99999


def test_uint8_preprocessing_equals_float(towers):
    import torch
    from conftest import MEDPIX
    from PIL import Image

    with open(MEDPIX / "images.jsonl") as f:
        path = MEDPIX / json.loads(f.readline())["file"]
    with Image.open(path) as im:
        u8, fl = towers.preprocess_u8(im), towers.preprocess(im)
    assert u8.dtype == torch.uint8 and u8.shape == fl.shape == (3, 224, 224)
    np.testing.assert_array_equal(towers.encode_image_batch(u8[None]), towers.encode_image_batch(fl[None]))


def test_release_free_memory_is_safe_to_call():
    from indexer.embed import release_free_memory

    release_free_memory()
    release_free_memory()


def test_resolve_auto_settings():
    from indexer.embed import resolve_batch_size, resolve_workers

    auto = EmbedConfig()
    assert resolve_batch_size(auto, "cuda") == 256 and resolve_batch_size(auto, "cpu") >= 1
    assert 1 <= resolve_workers(auto, "cuda") <= 16
    assert resolve_workers(EmbedConfig(workers=3), "cpu") == 3
