"""Whether a loaded index may answer for the catalog as it is now.

An index equal to the catalog is served. One that is only *behind* it (an ``index`` run in flight,
or one killed before it saved) is served too: every id it holds is still stored, so its hits name
rows that exist and miss only the newest. An index that holds ids the catalog no longer has, or
BM25 texts that changed, is refused: removed data must never come back, and a stale text must not
be matched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import IndexInconsistent

if TYPE_CHECKING:
    from .catalog import Catalog
    from .stores import VectorStore

_HINT = "run `medsearch index` to bring it up to date, or `medsearch check --repair`"


def vectors_behind(catalog: Catalog, model_id: str, space: str, idx: VectorStore) -> int:
    """How many stored vectors of (model, space) ``idx`` lacks; raises IndexInconsistent when it may not serve."""
    stored = catalog.count_vectors(model_id, space)
    if stored == idx.ntotal:
        return 0
    item_ids = getattr(idx, "item_ids", None)  # stores that can list their ids cheaply (FAISS)
    if item_ids is None or idx.ntotal > stored or not bool(np.isin(item_ids(), catalog.vector_ids(model_id, space)).all()):
        raise IndexInconsistent(
            f"the {space} index of {model_id} holds {idx.ntotal} vectors but the catalog stores {stored}", hint=_HINT
        )
    return stored - idx.ntotal


def check_bm25(catalog: Catalog, model_id: str, bm: Any, manifest: dict[str, Any]) -> None:
    """Refuse a BM25 generation unless its texts are the catalog's texts for the ids it holds."""
    from .bm25 import catalog_docs, fingerprint

    ids, texts, now = catalog_docs(catalog)
    if manifest.get("fingerprint") != now:  # behind: fingerprint the catalog's texts of the ids it holds
        held = np.isin(np.asarray(ids, dtype=np.int64), bm.ids)
        kept = [i for i, h in zip(ids, held, strict=True) if h]
        now = fingerprint(kept, [t for t, h in zip(texts, held, strict=True) if h]) if len(kept) == len(bm) else ""
    if manifest.get("fingerprint") != now:
        raise IndexInconsistent(f"the BM25 index of {model_id} does not match the catalog's texts", hint=_HINT)
