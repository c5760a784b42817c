"""Milvus store: one collection per (home, model, space) on Milvus Lite (a file in the home) or a
Milvus server/cluster (``http://host:19530`` + token).

Rows: ``id`` = catalog row id (primary key), ``vec`` (dim,) float32, ``vhash`` (a 64-bit hash of
the stored float16 vector), ``case_id``, and the filter fields (modality, body_region, plane,
split, source) as ``|hex(v1)|hex(v2)|`` strings: an image row holds its own values, a text row
those of every image of its case. Filters become ``field like "%|hex|%"`` expressions that the
engine evaluates (hex: no quoting or LIKE wildcard can appear in a value; Milvus Lite answered
an ARRAY ``array_contains_any`` filter in ~0.5 s at 20k rows, a VARCHAR ``like`` in ~16 ms).

``milvus_sync.sync_store`` brings a collection in line with the catalog's stored vectors: it compares
(id, vhash) pairs from Milvus with the catalog, inserts what is missing, upserts what changed and
deletes ids the catalog no longer stores, so a killed ``index`` is finished by the next one. The
index type is chosen from the collection size (``choose_kind``), its search knob tuned to the
target recall@10 on stored vectors used as queries (each query's own id left out), and the
measured recall goes into the manifest with an order-independent checksum of (id, vhash).

Every call passes ``consistency_level`` explicitly (left at its default a call cost ~2 s).

Engines: the ``milvus`` extra pins Milvus Lite 2.5.1, the C++ engine in a subprocess (FLAT exact,
22 ms per query at 100k); it ignores a request's ef / nprobe (``LITE2_KINDS``), so ``auto`` keeps
FLAT there and an explicit ``ivf_flat`` is measured, not tuned. A Milvus server (``http://``) and
Milvus Lite 3.x (pure Python, O(rows) per query) build and tune every kind of ``KINDS``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.catalog.scalars import SCALAR_FIELDS
from medsearch.config import IndexConfig
from medsearch.errors import IndexInconsistent, IndexMismatch, IndexNotBuilt, InvalidInput, StorageError

from .ann import ivf_shape
from .base import FORMAT_VERSION, Manifest, manifest_path, read_manifest, values_of, write_json_atomic

# what Milvus Lite 3.2 and a Milvus server build (Lite 3.2 refuses IVF_PQ: "reserved for a future phase")
KINDS = {"flat": "FLAT", "hnsw": "HNSW", "ivf_flat": "IVF_FLAT", "ivf_sq8": "IVF_SQ8"}
# Milvus Lite 2.x (the C++ engine: segcore + knowhere) accepts only these in local mode ("local mode only
# support FLAT IVF_FLAT"). It keeps a collection in one growing segment: create_index only records the
# index, and a search runs on segcore's interim IVF index (its own nlist/nprobe, built in the background
# per filled chunk) and exactly over the rest, so the nprobe a request names is ignored (100k x 32-d
# isotropic: recall@10 0.498 at nprobe 1 and 128 alike). Its ivf_flat cannot be tuned: `auto` stays FLAT.
LITE2_KINDS = ("flat", "ivf_flat")
LITE_SUFFIX = ".db"  # pymilvus starts Milvus Lite only for a file URI with this suffix
EF_MAX = 4096  # a selective filter widens ef up to this (1% filter, ef 16 -> 1600: recall 0.21 -> 1.0 at 5k)
SELECTIVITY_CACHE = 1024
# an IVF search under a filter matching at most this many rows probes every list (exact over the
# matches, as FAISS answers them); above it nprobe grows by 1 / selectivity. Engines that tune only:
# Milvus Lite 2.x ignores the nprobe sent (its 0.83 for a 1% filter at 100k was its interim index)
EXACT_FILTERED = 32768
CONSISTENCY = "Strong"
DEFAULT_DB = "milvus.db"
MAX_TOPK = 16384
BATCH = 2048  # rows per insert/upsert call
FIELD_LEN = 4096
TUNE_K = 10
HNSW_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
IVF_NPROBE = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)

_CLIENTS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


# ---------------------------------------------------------------------------- connection
def is_server_uri(uri: str) -> bool:
    return bool(re.match(r"^(https?|tcp|grpc|unix)://", uri or ""))


def resolve_uri(home: Path, uri: str | None) -> str:
    """The URI to connect to: a server URI as given; a file (Milvus Lite) resolved; None -> HOME/milvus.db."""
    if not uri:
        return str(Path(home) / DEFAULT_DB)
    return uri if is_server_uri(uri) else str(Path(uri).expanduser().resolve())


def connect(uri: str, token: str | None = None) -> Any:
    """A ``MilvusClient`` for ``uri`` (one per process and URI; Milvus Lite starts its server here)."""
    if not is_server_uri(uri) and not uri.endswith(LITE_SUFFIX):
        raise InvalidInput(f"the Milvus Lite file {uri} does not end in {LITE_SUFFIX}",
                           hint=f"name a file like {Path(uri).with_suffix(LITE_SUFFIX)}, or a server as http://host:19530")  # fmt: skip
    key = (uri, token or "")
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            try:
                from pymilvus import MilvusClient
            except ImportError as e:
                raise StorageError(
                    "the milvus store needs the pymilvus and milvus-lite packages",
                    hint="pip install 'medsearch[milvus]', or index with --store faiss",
                ) from e
            if not is_server_uri(uri):
                if Path(uri).is_dir() and 0 < lite_major() < 3:
                    raise StorageError(f"{uri} is a Milvus Lite 3.x store (a folder); milvus-lite {lite_major()} keeps one file",
                                       hint="move the folder away and run `medsearch index --store milvus`: the collections "
                                            "are rebuilt from the catalog's stored vectors, nothing is re-embedded")  # fmt: skip
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                with warnings.catch_warnings():  # milvus-lite 2.5 imports pkg_resources, which warns on every start
                    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
                    client = MilvusClient(uri=uri, token=token or "")
            except Exception as e:  # pymilvus raises MilvusException, grpc errors, OSError
                hint = ("start the Milvus server, or check --milvus-uri/--milvus-token" if is_server_uri(uri) else
                        "another process holds this Milvus Lite file (one process per file: a running `medsearch "
                        "serve`?): stop it, use its API (DELETE /v1/cases/{id}), or move to a Milvus server")  # fmt: skip
                raise StorageError(f"cannot open Milvus at {uri}: {str(e)[:300]}", hint=hint) from e
            _CLIENTS[key] = client
            # Milvus Lite has no server-side MVCC timestamp for iterators: pymilvus warns on every one
            logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
        return client


def close_clients() -> None:
    """Close every client this process opened and stop the Milvus Lite servers they started
    (pymilvus 3 leaves a Lite server running until the process exits, even after ``close``)."""
    with _LOCK:
        for (uri, _), client in _CLIENTS.items():
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not raise
                pass
            if not is_server_uri(uri):
                _stop_lite(uri)
        _CLIENTS.clear()


def _stop_lite(path: str) -> None:
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # a Lite without a server process (3.x runs in this process)
        return
    try:
        server_manager_instance.release_server(path)  # releases the file lock: the server exits
    except Exception:  # noqa: BLE001 - a server that died already must not fail the close
        pass


def collection_name(model_id: str, space: str, salt: str) -> str:
    """``medsearch_<model>_<space>_<tag>``: the tag (from the home's secret salt) keeps two homes
    on one Milvus server apart without revealing anything about the home."""
    safe = re.sub(r"[^0-9A-Za-z_]", "_", model_id)[:80]
    tag = hashlib.sha256(f"{salt}|{model_id}|{space}".encode()).hexdigest()[:10]
    return f"medsearch_{safe}_{space}_{tag}"


def home_of(directory: Path) -> Path:
    """HOME from HOME/indexes/<model>."""
    return Path(directory).resolve().parent.parent


# ---------------------------------------------------------------------------- hashes
_MIX = (np.random.default_rng(0x5EED5).integers(1, 2**63, size=1 << 14, dtype=np.uint64) | np.uint64(1))


def _fmix(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, elementwise on uint64 (wrapping)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def vector_hashes(vecs: np.ndarray) -> np.ndarray:
    """(n, d) vectors -> (n,) int64 hash of their float16 bytes (the catalog's stored form)."""
    b = np.ascontiguousarray(vecs, dtype=np.float16).view(np.uint8).reshape(len(vecs), -1)
    pad = (-b.shape[1]) % 8
    if pad:
        b = np.pad(b, ((0, 0), (0, pad)))
    w = np.ascontiguousarray(b).view(np.uint64)  # (n, words)
    if w.shape[1] > len(_MIX):
        raise IndexMismatch(f"vectors of dim {vecs.shape[1]} are too wide for the milvus store")
    with np.errstate(over="ignore"):
        return _fmix((w * _MIX[: w.shape[1]]).sum(axis=1, dtype=np.uint64)).view(np.int64)


def _sums(ids: np.ndarray, hashes: np.ndarray) -> tuple[int, int]:
    """Order-independent (sum of mixed ids, sum of mixed (id, hash)) mod 2**64."""
    u = np.asarray(ids, dtype=np.int64).view(np.uint64)
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        a = int(_fmix(u ^ np.uint64(0x9E3779B97F4A7C15)).sum(dtype=np.uint64))
        b = int(_fmix(_fmix(u) ^ h).sum(dtype=np.uint64))
    return a, b


def checksum(n: int, sums: tuple[int, int]) -> str:
    return f"n={n};ids={sums[0]:016x};vectors={sums[1]:016x}"


def _add(a: tuple[int, int], b: tuple[int, int], sign: int = 1) -> tuple[int, int]:
    m = (1 << 64) - 1
    return (a[0] + sign * b[0]) & m, (a[1] + sign * b[1]) & m


# ---------------------------------------------------------------------------- filters
def _hex(value: str) -> str:
    return value.encode("utf-8").hex()


def encode_field(values: set[str] | None) -> str:
    """Filter values of one row as ``|hex|hex|`` (sorted; values past FIELD_LEN are dropped)."""
    out = "|"
    for v in sorted(values or ()):
        piece = _hex(v) + "|"
        if len(out) + len(piece) > FIELD_LEN:
            break
        out += piece
    return out if len(out) > 1 else ""


def filter_expression(filters: dict[str, Any] | None, allowed: np.ndarray | None = None) -> str | None:
    """A Milvus boolean expression for the filters (and ``allowed`` ids); "" = no filter, None = nothing matches."""
    parts = []
    for name, value in (filters or {}).items():
        vals = values_of(value)
        if not vals:
            continue
        if name not in SCALAR_FIELDS:
            raise InvalidInput(f"unknown filter {name!r}", hint=f"use one of: {', '.join(SCALAR_FIELDS)}")
        parts.append("(" + " or ".join(f'{name} like "%|{_hex(v)}|%"' for v in vals) + ")")
    if allowed is not None:
        a = np.asarray(allowed, dtype=np.int64)
        if len(a) == 0:
            return None
        parts.append(f"id in [{','.join(map(str, a.tolist()))}]")
    return " and ".join(parts)


# ---------------------------------------------------------------------------- index choice
def lite_major() -> int:
    """The major version of the installed milvus-lite (0 when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("milvus-lite").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


def engine_kinds(uri: str | None) -> tuple[str, ...]:
    """Index kinds the engine behind ``uri`` builds: a server all of KINDS; Milvus Lite 2.x (C++)
    flat and ivf_flat; Milvus Lite 3.x (pure Python) all of KINDS."""
    if uri and is_server_uri(uri):
        return tuple(KINDS)
    return LITE2_KINDS if 0 < lite_major() < 3 else tuple(KINDS)


def engine_tunes(uri: str | None) -> bool:
    """Whether the engine behind ``uri`` searches with the ef / nprobe a request names: a server and
    Milvus Lite 3.x do; Milvus Lite 2.x does not (its interim index has its own; see LITE2_KINDS)."""
    if uri and is_server_uri(uri):
        return True
    return not 0 < lite_major() < 3


def choose_kind(n: int, config: IndexConfig, kinds: tuple[str, ...] = tuple(KINDS), tunes: bool = True) -> str:
    """The configured kind, or exact FLAT up to ``flat_max`` vectors and above it HNSW (IVF_FLAT
    where the engine has no HNSW). ``kinds``: what the engine builds (``engine_kinds``); an engine
    that ignores the search knob (``tunes`` False: Milvus Lite 2.x) stays FLAT at every size, as
    an ANN index there could not be held to the target recall."""
    if config.kind == "auto":
        if n <= config.flat_max or not tunes:
            return "flat"
        return "hnsw" if "hnsw" in kinds else "ivf_flat"
    if config.kind not in KINDS:
        raise InvalidInput(f"unknown milvus index kind {config.kind!r}", hint="use one of: auto, " + ", ".join(KINDS))
    if config.kind not in kinds:
        raise InvalidInput(f"milvus-lite {lite_major()} cannot build a {config.kind} index",
                           hint="use one of: auto, " + ", ".join(kinds) + ", or a Milvus server (--milvus-uri http://...)")  # fmt: skip
    return config.kind


def build_params(kind: str, n: int, dim: int, config: IndexConfig) -> dict[str, Any]:
    if kind == "hnsw":
        return {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}
    if kind in ("ivf_flat", "ivf_sq8", "ivfpq"):
        nlist, m = ivf_shape(max(n, 39), dim, config)
        return {"nlist": nlist, "m": m, "nbits": 8} if kind == "ivfpq" else {"nlist": nlist}
    return {}


def _knob(kind: str) -> str | None:
    return "ef" if kind == "hnsw" else ("nprobe" if kind.startswith("ivf") else None)


def default_search_params(kind: str, config: IndexConfig) -> dict[str, Any]:
    knob = _knob(kind)
    if knob is None:
        return {}
    return {knob: config.hnsw_ef_search if knob == "ef" else config.ivf_nprobe}


# ---------------------------------------------------------------------------- the store
class MilvusStore:
    """A Milvus collection with its manifest; ``search`` returns (D, I) like FAISS."""

    engine_filters = True  # filters arrive as a dict and run inside Milvus

    def __init__(self, client: Any, manifest: Manifest, *, consistency: str = CONSISTENCY) -> None:
        self.client = client
        self.manifest = manifest
        self.consistency = consistency
        self._matches: dict[str, int] = {}  # filter expression -> rows it matches (this generation)

    @property
    def collection(self) -> str:
        return str(self.manifest.params["collection"])

    @property
    def ntotal(self) -> int:
        return int(self.manifest.count)

    @classmethod
    def load(
        cls, directory: Path, space: str, *, model_id: str | None = None, weights_hash: str | None = None,
        token: str | None = None,
    ) -> MilvusStore:  # fmt: skip
        """Connect to the collection the manifest names and check it against the manifest."""
        mpath = manifest_path(directory, space)
        if not mpath.exists():
            raise IndexNotBuilt(f"no {space} index in {directory}", hint="run `medsearch index` to build it")
        man = read_manifest(mpath)
        if man.store != "milvus":
            raise IndexMismatch(f"the {space} index in {directory} is a {man.store} index, not a Milvus collection")
        if man.format_version != FORMAT_VERSION:
            raise IndexMismatch(f"{mpath} has index format {man.format_version}, this medsearch reads {FORMAT_VERSION}",
                                hint="rebuild with `medsearch index --rebuild`")  # fmt: skip
        if model_id is not None and man.model_id != model_id:
            raise IndexMismatch(f"the {space} index in {directory} was built with model {man.model_id!r}, not {model_id!r}",
                                hint=f"query with --model {man.model_id}, or run `medsearch index --model {model_id}`")  # fmt: skip
        if weights_hash is not None and man.weights_hash != weights_hash:
            raise IndexMismatch(f"the {space} index was built with other weights of {man.model_id}",
                                hint="run `medsearch index --rebuild` to re-embed with the current weights")  # fmt: skip
        client = connect(resolve_uri(home_of(directory), man.params.get("uri")), token)
        coll = man.params.get("collection", "")
        if not client.has_collection(coll):
            raise IndexInconsistent(f"the Milvus collection {coll} of the {space} index is missing",
                                    hint="run `medsearch check --repair` to rebuild it from stored vectors")  # fmt: skip
        client.load_collection(coll)
        n = count_rows(client, coll)
        if n != man.count:
            raise IndexInconsistent(
                f"the Milvus collection {coll} holds {n} vectors, its manifest says {man.count}",
                hint="run `medsearch index` to bring it up to date, or `medsearch check --repair`",
            )
        return cls(client, man)

    def search(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None, filters: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product inside Milvus; ``filters`` and ``allowed`` become one boolean expression.

        xq: (nq, dim) float32 -> D (nq, k) float32, I (nq, k) int64 catalog ids (-1 = none).
        """
        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        if xq.shape[1] != self.manifest.dim:
            raise IndexMismatch(
                f"query has dim {xq.shape[1]} but the {self.manifest.space} index of {self.manifest.model_id} "
                f"has dim {self.manifest.dim}",
                hint="query with the model the index was built with",
            )
        k = max(1, min(int(k), max(self.ntotal, 1), MAX_TOPK))
        D = np.full((len(xq), k), -np.inf, np.float32)
        I = np.full((len(xq), k), -1, np.int64)
        expr = filter_expression(filters, allowed)
        if expr is None or self.ntotal == 0:
            return D, I
        params = dict(self.manifest.params.get("search_params", {}))
        if expr and params:  # an ANN index under a filter: widen its knob by the filter's selectivity
            matches = self.matches(expr)
            if matches == 0:
                return D, I
            frac = matches / max(1, self.ntotal)
            if "ef" in params:
                params["ef"] = int(min(max(EF_MAX, params["ef"]), max(params["ef"], k, np.ceil(params["ef"] / frac))))
            if "nprobe" in params:  # few matches: every list (exact over the matches, as FAISS answers them)
                nlist = int(self.manifest.params.get("build_params", {}).get("nlist", params["nprobe"]))
                wide = nlist if matches <= EXACT_FILTERED else np.ceil(params["nprobe"] / frac)
                params["nprobe"] = int(min(nlist, max(params["nprobe"], wide)))
        res = self.client.search(
            self.collection, data=xq, limit=k, filter=expr, anns_field="vec", output_fields=[],
            search_params={"metric_type": "IP", "params": params}, consistency_level=self.consistency,
        )  # fmt: skip
        for qi, hits in enumerate(res):
            for j, h in enumerate(hits[:k]):
                I[qi, j] = int(h["id"])
                D[qi, j] = float(h["distance"])
        return D, I

    def matches(self, expr: str) -> int:
        """Rows a filter expression matches (one count query, then cached for this generation)."""
        n = self._matches.get(expr)
        if n is None:
            res = self.client.query(self.collection, filter=expr, output_fields=["count(*)"], consistency_level=self.consistency)
            n = int(res[0]["count(*)"])
            if len(self._matches) >= SELECTIVITY_CACHE:
                self._matches.pop(next(iter(self._matches)))
            self._matches[expr] = n
        return n

    def save_manifest(self, directory: Path) -> None:
        write_json_atomic(manifest_path(directory, self.manifest.space), asdict(self.manifest))


def count_rows(client: Any, coll: str) -> int:
    res = client.query(coll, filter="", output_fields=["count(*)"], consistency_level=CONSISTENCY)
    return int(res[0]["count(*)"])


def milvus_ids(client: Any, coll: str) -> tuple[np.ndarray, np.ndarray]:
    """All (id, vhash) of a collection, sorted by id: (n,) int64 each."""
    ids: list[int] = []
    hashes: list[int] = []
    it = client.query_iterator(coll, batch_size=16384, filter="", output_fields=["id", "vhash"],
                               consistency_level=CONSISTENCY)  # fmt: skip
    try:
        while True:
            batch = it.next()
            if not batch:
                break
            ids.extend(int(r["id"]) for r in batch)
            hashes.extend(int(r["vhash"]) for r in batch)
    finally:
        it.close()
    a, h = np.array(ids, dtype=np.int64), np.array(hashes, dtype=np.int64)
    order = np.argsort(a, kind="stable")
    return a[order], h[order]
