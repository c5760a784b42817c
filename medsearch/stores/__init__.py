"""Vector stores: FAISS (``faiss.py``, the embedded default; ``ann.py`` picks its index type) and
Milvus (``milvus.py``: Milvus Lite in the home, or a Milvus server/cluster). ``base.py`` holds
the manifest and ``open_store``, which loads whichever store a home's manifest names.

Nothing heavy is imported here: faiss and pymilvus load when a store is opened.
"""

from .base import FORMAT_VERSION, STORES, Manifest, VectorStore, open_store, read_manifest

__all__ = ["FORMAT_VERSION", "STORES", "Manifest", "VectorStore", "open_store", "read_manifest"]
