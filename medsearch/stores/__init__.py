"""Vector stores: FAISS (``faiss.py``, the embedded default; ``ann.py`` picks its index type) and
Milvus (``milvus.py``: Milvus Lite in the home, or a Milvus server/cluster). ``base.py`` holds
the manifest and ``open_store``, which loads whichever store a home's manifest names.

Nothing heavy is imported here: faiss and pymilvus load when a store is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsearch.errors import IndexNotBuilt, InvalidInput

from .base import FORMAT_VERSION, STORES, Manifest, VectorStore, manifest_path, read_manifest

__all__ = ["FORMAT_VERSION", "STORES", "Manifest", "VectorStore", "choose_store", "open_store", "read_manifest"]


def open_store(
    directory: Path, space: str, *, model_id: str | None = None, weights_hash: str | None = None,
    milvus_token: str | None = None,
) -> VectorStore:  # fmt: skip
    """Load the store the manifest of ``space`` in ``directory`` names (IndexNotBuilt when there is none)."""
    mpath = manifest_path(directory, space)
    if not mpath.exists():
        raise IndexNotBuilt(f"no {space} index in {directory}", hint="run `medsearch index` to build it")
    man = read_manifest(mpath)
    if man.store == "milvus":
        from .milvus import MilvusStore

        return MilvusStore.load(directory, space, model_id=model_id, weights_hash=weights_hash, token=milvus_token)
    from .faiss import VectorIndex

    return VectorIndex.load(directory, space, model_id=model_id, weights_hash=weights_hash)


def choose_store(catalog: Any, store: str | None, milvus_uri: str | None = None, milvus_token: str | None = None) -> str:
    """The store to index into: ``store`` when given (then recorded in the catalog with the Milvus
    URI and token, so later runs and every reader use it), else the recorded one, else faiss."""
    if store is None:
        return catalog.get_meta("store") or "faiss"
    if store not in STORES:
        raise InvalidInput(f"unknown store {store!r}", hint=f"use one of: {', '.join(STORES)}")
    with catalog.atomic():
        catalog.set_meta("store", store)
        if milvus_uri is not None:
            catalog.set_meta("milvus_uri", milvus_uri)
        if milvus_token is not None:
            catalog.set_meta("milvus_token", milvus_token)
    return store
