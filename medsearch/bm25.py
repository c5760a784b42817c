"""BM25 over report and caption text (bm25s), built at ``medsearch index`` time.

Documents are the catalog's ``texts`` rows of kind ``caption`` (one image) and ``section``
(a whole report section of a case); their catalog ids are the document ids, so a hit maps to
images exactly like a hit of the text vector index. Tokens: lower-case words of 2+ characters,
English stop words removed, Snowball (PyStemmer) stems when PyStemmer is installed.

On disk, beside the vector indexes of a model (``HOME/indexes/<model>/``):

    bm25.json           manifest: count, fingerprint of (id, text), folder, tokenizer, built_at
    bm25-<gen>/         the bm25s files and ids.npy

A new generation is written to its own folder; the manifest is swapped in last (atomic
``os.replace``), then older folders are removed. A reader only follows the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import IndexInconsistent, IndexNotBuilt

if TYPE_CHECKING:  # pragma: no cover
    from .catalog import Catalog

DOC_KINDS = ("caption", "section")
MANIFEST = "bm25.json"
FORMAT_VERSION = 1


def _stemmer():
    try:
        import Stemmer

        return Stemmer.Stemmer("english")
    except ImportError:  # optional: plain words still work
        return None


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Texts -> token lists (lower case, stop words out, stemmed)."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)


class BM25:
    """A BM25 index over documents with integer ids (default: positions)."""

    def __init__(self, retriever: Any, ids: np.ndarray) -> None:
        self.retriever = retriever
        self.ids = np.asarray(ids, dtype=np.int64)  # (n_docs,)

    @classmethod
    def build(cls, texts: Sequence[str], ids: Sequence[int] | None = None) -> BM25:
        """Index ``texts`` (ids default to 0..n-1)."""
        import bm25s

        retriever = bm25s.BM25()
        if len(texts):
            retriever.index(tokenize(texts), show_progress=False)
        return cls(retriever, np.arange(len(texts)) if ids is None else np.asarray(ids))

    def __len__(self) -> int:
        return int(len(self.ids))

    def scores(self, query: str) -> np.ndarray:
        """(n_docs,) float32 BM25 score of every document for ``query`` (0 = no shared term)."""
        if not len(self.ids):
            return np.zeros(0, dtype=np.float32)
        toks = tokenize([query])[0]
        if not toks:
            return np.zeros(len(self.ids), dtype=np.float32)
        return np.asarray(self.retriever.get_scores(toks), dtype=np.float32)

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids (m,), scores (m,)) with a positive score, best first; ``allowed`` restricts ids."""
        s = self.scores(query)
        if allowed is not None:
            s = np.where(np.isin(self.ids, allowed), s, 0.0)
        pos = np.flatnonzero(s > 0)
        if not len(pos):
            return np.empty(0, np.int64), np.empty(0, np.float32)
        top = pos[np.lexsort((pos, -s[pos]))][:k]
        return self.ids[top], s[top]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path, manifest: dict[str, Any]) -> Path:
        """Write a new generation folder, then swap the manifest in; drop older folders."""
        from .stores.base import write_json_atomic

        directory.mkdir(parents=True, exist_ok=True)
        old = read_manifest(directory)
        gen = int(old.get("generation", 0)) + 1 if old else 1
        folder = directory / f"bm25-{gen}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        if len(self.ids):
            self.retriever.save(str(folder), show_progress=False)
        np.save(folder / "ids.npy", self.ids)
        man = {**manifest, "generation": gen, "folder": folder.name, "count": len(self),
               "format_version": FORMAT_VERSION, "stemmer": "snowball-english" if _stemmer() else None}  # fmt: skip
        write_json_atomic(directory / MANIFEST, man)
        for f in directory.glob("bm25-*"):
            if f.is_dir() and f.name != folder.name:
                shutil.rmtree(f, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, directory: Path) -> tuple[BM25, dict[str, Any]]:
        """(index, manifest) from ``directory``; IndexNotBuilt when there is none."""
        import bm25s

        man = read_manifest(directory)
        if not man:
            raise IndexNotBuilt(f"no BM25 index in {directory}", hint="run `medsearch index` to build it")
        folder = directory / man["folder"]
        try:
            ids = np.load(folder / "ids.npy")
            if len(ids):
                retriever = bm25s.BM25.load(str(folder), show_progress=False)
            else:
                retriever = bm25s.BM25()
        except (OSError, ValueError, KeyError) as e:
            raise IndexInconsistent(
                f"the BM25 index in {folder} is unreadable: {e}", hint="run `medsearch index --rebuild`"
            ) from e
        if len(ids) != man["count"]:
            raise IndexInconsistent(
                f"the BM25 index in {folder} holds {len(ids)} documents, its manifest says {man['count']}",
                hint="run `medsearch index --rebuild`",
            )
        return cls(retriever, ids), man


def read_manifest(directory: Path) -> dict[str, Any]:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise IndexInconsistent(f"unreadable BM25 manifest {p}: {e}", hint="run `medsearch index --rebuild`") from e


def catalog_docs(catalog: Catalog) -> tuple[list[int], list[str], str]:
    """(text ids, texts, fingerprint) of the catalog's caption and section texts, in id order."""
    ids, texts = catalog.texts_of_kinds(DOC_KINDS)
    return ids, texts, fingerprint(ids, texts)


def fingerprint(ids: Sequence[int], texts: Sequence[str]) -> str:
    """What a BM25 generation was built from: a hash of its (id, text) pairs in id order."""
    h = hashlib.sha256()
    for i, t in zip(ids, texts, strict=True):
        h.update(f"{i}\t".encode() + t.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def build_bm25_index(catalog: Catalog, directory: Path, *, force: bool = False) -> dict[str, Any]:
    """Build (or keep, when the texts are unchanged) the BM25 index of ``catalog`` in ``directory``."""
    from .stores.base import save_lock

    directory.mkdir(parents=True, exist_ok=True)
    with save_lock(directory):  # one writer per folder, as for the vector indexes
        # a killed writer's temp manifest: no other writer can be in flight under the lock, and an
        # unchanged index returns below without writing (which would be the only other clean-up)
        for stale in directory.glob(f".{MANIFEST}.*.tmp"):
            stale.unlink(missing_ok=True)
        return _build_locked(catalog, directory, force)


def _build_locked(catalog: Catalog, directory: Path, force: bool) -> dict[str, Any]:
    ids, texts, fp = catalog_docs(catalog)
    man = read_manifest(directory)
    if man and not force and man.get("fingerprint") == fp and (directory / man.get("folder", "")).is_dir():
        return {"count": man["count"], "generation": man["generation"], "rebuilt": False}
    from datetime import datetime, timezone

    BM25.build(texts, ids).save(
        directory,
        {
            "fingerprint": fp,
            "kinds": list(DOC_KINDS),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },  # fmt: skip
    )
    man = read_manifest(directory)
    return {"count": man["count"], "generation": man["generation"], "rebuilt": True}
