"""Searcher: the one use case both shells call.

    text  -> images/cases  (cross-modal image index when the model has one shared space;
                            report and caption text through the text index and BM25;
                            fused by RRF; ``mode`` picks one of them: image, text, bm25)
    image -> images/cases  (image index; the query is a file, a PIL image or a catalog image)
    text  -> reports       (text index, grouped by case)

Filters (modality, body_region, split, source, plane) become a FAISS ID selector built from
the catalog. ``per_case`` keeps the best image of each case. Indexes are loaded once and
checked against their manifest and the catalog before any query is served.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import Catalog
from .config import ImagingConfig, Paths, SearchConfig
from .encoders.registry import default_model
from .errors import IndexInconsistent, IndexNotBuilt, InvalidInput, MedsearchError
from .records import Hit
from .vectors import VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .encoders.base import Encoder

TEXT_MODES = ("auto", "hybrid", "image", "text", "bm25")


@dataclass(frozen=True)
class Filters:
    """Metadata filters; each is a value or a list of values (case-insensitive)."""

    modality: str | Sequence[str] | None = None
    body_region: str | Sequence[str] | None = None
    split: str | Sequence[str] | None = None
    source: str | Sequence[str] | None = None
    plane: str | Sequence[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def empty(self) -> bool:
        return all(v in (None, "", []) for v in self.as_dict().values())


def rrf(rankings: Sequence[Sequence[Any]], k: int = 60) -> list[tuple[Any, float]]:
    """Reciprocal rank fusion: score(x) = sum over rankings of 1 / (k + rank), rank from 1."""
    scores: dict[Any, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


class Searcher:
    """Search one medsearch home with one model.

    ``encoder`` may be given (tests, the API's lifespan); otherwise it is loaded on first use
    from the model recorded by the last ``medsearch index``.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        model: str | None = None,
        encoder: Encoder | None = None,
        device: str = "auto",
        config: SearchConfig = SearchConfig(),
        imaging: ImagingConfig = ImagingConfig(),
        catalog: Catalog | None = None,
    ) -> None:
        self.paths = Paths(Path(home).expanduser().resolve())
        self.catalog = catalog or Catalog.open(self.paths.catalog, create=False)
        self.config = config
        self.imaging = imaging
        self.device = device
        self._encoder = encoder
        self.model_id = model or (encoder.model_id if encoder else None) or default_model(self.paths, self.catalog)
        if not self.model_id:
            raise IndexNotBuilt(f"no index has been built in {self.paths.home}", hint="run `medsearch index` first")
        self._indexes: dict[str, VectorIndex] = {}
        self._bm25: Any = None  # medsearch.bm25.BM25 once loaded
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            from .encoders.registry import load_encoder

            self._encoder = load_encoder(self.model_id, device=self.device, models_dir=self.paths.models)
        return self._encoder

    def index(self, space: str) -> VectorIndex:
        """The loaded index of a space, checked against its manifest and the catalog."""
        with self._lock:
            idx = self._indexes.get(space)
            if idx is None:
                idx = VectorIndex.load(self.paths.index_dir(self.model_id), space, model_id=self.model_id)
                stored = self.catalog.count_vectors(self.model_id, space)
                if stored != idx.ntotal:
                    raise IndexInconsistent(
                        f"the {space} index of {self.model_id} holds {idx.ntotal} vectors but the catalog stores {stored}",
                        hint="run `medsearch index` to bring it up to date, or `medsearch check --repair`",
                    )
                self._indexes[space] = idx
            return idx

    def has_index(self, space: str) -> bool:
        try:
            self.index(space)
            return True
        except IndexNotBuilt:
            return False

    def reload(self) -> None:
        """Drop loaded indexes; the next query loads the newest generation."""
        with self._lock:
            self._indexes = {}
            self._bm25 = None

    def warm(self) -> dict[str, VectorIndex]:
        """Load the encoder and every built index now and check they match (server start-up, hot swap).

        Returns the loaded indexes by space; raises IndexNotBuilt when no index is built, and
        IndexInconsistent/IndexMismatch when one cannot be used as it is on disk.
        """
        loaded = {space: self.index(space) for space in ("image", "text") if self.has_index(space)}
        if not loaded:
            raise IndexNotBuilt(f"no index of model {self.model_id} in {self.paths.home}", hint="run `medsearch index`")
        # BM25 too: it is checked against the catalog's texts when loaded, so loading it lazily on the
        # first hybrid query of a server that has since ingested more would refuse that query
        self.has_bm25()
        self._check_encoder()
        return loaded

    def loaded_indexes(self) -> dict[str, VectorIndex]:
        """The indexes loaded so far, by space."""
        with self._lock:
            return dict(self._indexes)

    def _check_encoder(self) -> None:
        for space, idx in list(self._indexes.items()):
            if idx.manifest.weights_hash != self.encoder.weights_hash:
                raise MedsearchError(
                    f"the {space} index was built with other weights of {self.model_id}",
                    hint="run `medsearch index --rebuild`",
                )

    # ------------------------------------------------------------------ queries
    def search_text(
        self,
        query: str,
        k: int | None = None,
        filters: Filters = Filters(),
        *,
        per_case: bool | None = None,
        mode: str = "auto",
    ) -> list[Hit]:
        """Text -> images (one per case by default), best first."""
        query = (query or "").strip()
        if not query:
            raise InvalidInput("the query text is empty", hint='give a text such as "left lower lobe consolidation"')
        if mode not in TEXT_MODES:
            raise InvalidInput(f"unknown mode {mode!r}", hint=f"use one of: {', '.join(TEXT_MODES)}")
        k = k or self.config.k
        per_case = self.config.per_case if per_case is None else per_case
        enc = self.encoder
        shared = bool(enc.shared_space)
        if mode == "image" and not shared:
            raise InvalidInput(
                f"model {self.model_id} has no shared image-text space, so text cannot search images directly",
                hint="use --mode text, or train the cross-modal model with `medsearch train`",
            )
        q = enc.encode_texts([query]) if mode != "bm25" else None  # (1, text_dim)
        rankings: list[list[int]] = []
        best: dict[int, tuple[float, str, str | None]] = {}  # image_id -> (score, matched, excerpt)
        fetch = k * self.config.oversample
        if mode in ("auto", "hybrid", "image") and shared and self.has_index("image"):
            ids, scores = self._search_space("image", q, fetch, filters)
            rankings.append(list(ids))
            for i, s in zip(ids, scores, strict=True):
                best.setdefault(int(i), (float(s), "image", None))
        if mode in ("auto", "hybrid", "text") and self.has_index("text"):
            img_ids, img_scores, excerpts = self._text_to_images(q, fetch, filters)
            rankings.append(img_ids)
            for i, s, e in zip(img_ids, img_scores, excerpts, strict=True):
                if i not in best or best[i][1] == "image" and len(rankings) == 1:
                    best[i] = (s, "text", e)
                elif best[i][2] is None:
                    best[i] = (best[i][0], best[i][1], e)
        if mode == "bm25" or (mode in ("auto", "hybrid") and self.has_bm25()):
            img_ids, img_scores, excerpts = self._bm25_to_images(query, fetch, filters)
            rankings.append(img_ids)
            for i, s, e in zip(img_ids, img_scores, excerpts, strict=True):
                if i not in best:
                    best[i] = (s, "bm25", e)
                elif best[i][2] is None:
                    best[i] = (best[i][0], best[i][1], e)
        if not rankings:
            raise IndexNotBuilt(f"no index to answer text queries for {self.model_id}", hint="run `medsearch index`")
        if len(rankings) == 1:
            ordered = [(i, best[i][0]) for i in rankings[0]]
            matched = {i: best[i][1] for i, _ in ordered}
        else:
            ordered = rrf(rankings, k=self.config.rrf_k)
            matched = {i: "fused" for i, _ in ordered}
        return self._hits(ordered, k, per_case, matched=matched, excerpts={i: best[i][2] for i, _ in ordered})

    def similar(
        self,
        image: str | Path | int | Image.Image,
        k: int | None = None,
        filters: Filters = Filters(),
        *,
        per_case: bool | None = None,
        exclude_same_case: bool = False,
        exclude_same_patient: bool = False,
    ) -> list[Hit]:
        """Image -> similar images (one per case by default), best first.

        ``image`` is a file path, a PIL image, or a catalog image id/key (its stored vector is
        used, nothing is re-encoded). A file that is byte-identical to a catalog image counts
        as that image for the exclusions.
        """
        k = k or self.config.k
        per_case = self.config.per_case if per_case is None else per_case
        q, own = self.image_query_vector(image)
        exclude_cases: set[int] = set()
        exclude_patient: str | None = None
        if own is not None:
            if exclude_same_case:
                exclude_cases.add(own["case_id"])
            if exclude_same_patient and own.get("patient_key"):
                exclude_patient = own["patient_key"]
        fetch = (k + 1) * self.config.oversample
        ids, scores = self._search_space("image", q, fetch, filters)
        ordered = list(zip((int(i) for i in ids), (float(s) for s in scores), strict=True))
        return self._hits(
            ordered, k, per_case, matched={i: "image" for i, _ in ordered}, exclude_cases=exclude_cases,
            exclude_patient=exclude_patient,
        )  # fmt: skip

    def image_query_vector(self, image: str | Path | int | Image.Image) -> tuple[np.ndarray, dict[str, Any] | None]:
        """(1, image_dim) query vector and the catalog row it matches (or None)."""
        from .encoders.base import encode_images

        own: dict[str, Any] | None = None
        if isinstance(image, int) or (isinstance(image, str) and not Path(image).exists()):
            own = self.catalog.find_image(image)
            vec = self.catalog.get_vectors(self.model_id, "image", [own["image_id"]]).get(own["image_id"])
            if vec is None:
                raise IndexNotBuilt(f"image {image!r} has no vector yet", hint="run `medsearch index`")
            return vec[None, :].astype(np.float32), own
        if isinstance(image, (str, Path)):
            from .imaging import load_image

            path = Path(image)
            own = self._own_by_hash(path)
            pil = load_image(path, config=self.imaging)
        else:
            pil = image
        return encode_images(self.encoder, [pil]), own

    def _own_by_hash(self, path: Path) -> dict[str, Any] | None:
        import hashlib

        try:
            h = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        return self.catalog.image_by_sha(h)

    def search_reports(self, query: str, k: int | None = None, filters: Filters = Filters()) -> list[Hit]:
        """Text -> cases by their report/caption text; the excerpt is the best matching sentence."""
        query = (query or "").strip()
        if not query:
            raise InvalidInput("the query text is empty", hint="give a text to search reports for")
        k = k or self.config.k
        q = self.encoder.encode_texts([query])
        fetch = k * self.config.oversample * 2
        ids, scores = self._search_space("text", q, fetch, filters)
        rows = self.catalog.text_rows(ids.tolist())
        best: dict[int, tuple[float, dict[str, Any]]] = {}
        for i, s in zip(ids, scores, strict=True):
            r = rows.get(int(i))
            if r and r["case_id"] not in best:
                best[r["case_id"]] = (float(s), r)
        cases = list(best.items())[:k]
        imgs = self.catalog.case_images([c for c, _ in cases])
        first = {c: (v[0] if v else None) for c, v in imgs.items()}
        img_rows = self.catalog.image_rows([i for i in first.values() if i is not None])
        hits = []
        for case_id, (score, trow) in cases:
            iid = first.get(case_id)
            row = img_rows.get(iid) if iid else None
            if row is None:
                cv = self.catalog.get_case(case_id)
                row = dict(case_id=case_id, case_key=cv.case_key, source=cv.source, modality_type=None, modality=None,
                           body_region=None, plane=None, split=cv.split, diagnosis=cv.diagnosis, title=cv.title,
                           image_id=None, image_key=None)  # fmt: skip
            hits.append(_hit(row, score, trow["text"], "text"))
        return hits

    # ------------------------------------------------------------------ internals
    def _search_space(self, space: str, q: np.ndarray, fetch: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        idx = self.index(space)
        self._check_encoder()
        f = filters.as_dict()
        allowed = self.catalog.image_ids_where(f) if space == "image" else self.catalog.text_ids_where(f)
        fetch = min(fetch, idx.ntotal) if allowed is None else min(fetch, len(allowed))
        if fetch <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        D, I = idx.search(q, fetch, allowed=allowed)  # (1, fetch) each
        keep = I[0] >= 0
        return I[0][keep], D[0][keep]

    def _text_to_images(
        self, q: np.ndarray, fetch: int, filters: Filters
    ) -> tuple[list[int], list[float], list[str | None]]:
        """Text-space hits mapped to images: a caption -> its image; report text -> its case's images."""
        ids, scores = self._search_space("text", q, fetch * 2, filters)
        return self._texts_to_images(ids, scores, filters)

    def bm25(self) -> Any:
        """The BM25 index over report/caption text, checked against the catalog (loaded once)."""
        from .bm25 import BM25, catalog_docs

        with self._lock:
            if self._bm25 is None:
                bm, man = BM25.load(self.paths.index_dir(self.model_id))
                if man.get("fingerprint") != catalog_docs(self.catalog)[2]:
                    raise IndexInconsistent(
                        f"the BM25 index of {self.model_id} does not match the catalog's texts",
                        hint="run `medsearch index` to bring it up to date, or `medsearch check --repair`",
                    )
                self._bm25 = bm
            return self._bm25

    def has_bm25(self) -> bool:
        try:
            self.bm25()
            return True
        except IndexNotBuilt:
            return False

    def _bm25_to_images(
        self, query: str, fetch: int, filters: Filters
    ) -> tuple[list[int], list[float], list[str | None]]:
        """BM25 hits over report/caption text mapped to images like the text-space hits."""
        ids, scores = self.bm25().search(query, fetch * 2, allowed=self.catalog.text_ids_where(filters.as_dict()))
        return self._texts_to_images(ids, scores, filters)

    def _texts_to_images(
        self, ids: np.ndarray, scores: np.ndarray, filters: Filters
    ) -> tuple[list[int], list[float], list[str | None]]:
        """(text ids, scores) best first -> (image ids, scores, excerpts): a caption -> its image, a report
        text -> its case's images; each image once, at its best text."""
        rows = self.catalog.text_rows(ids.tolist())
        case_only = [r["case_id"] for r in rows.values() if r["image_id"] is None]
        case_imgs = self.catalog.case_images(case_only)
        allowed = self.catalog.image_ids_where(filters.as_dict())
        allowed_set = None if allowed is None else set(allowed.tolist())
        out_ids: list[int] = []
        out_scores: list[float] = []
        out_ex: list[str | None] = []
        seen: set[int] = set()
        for i, s in zip(ids, scores, strict=True):
            r = rows.get(int(i))
            if r is None:
                continue
            targets = [r["image_id"]] if r["image_id"] is not None else case_imgs.get(r["case_id"], [])
            for t in targets:
                if t in seen or (allowed_set is not None and t not in allowed_set):
                    continue
                seen.add(t)
                out_ids.append(t)
                out_scores.append(float(s))
                out_ex.append(r["text"])
        return out_ids, out_scores, out_ex

    def _hits(
        self,
        ordered: list[tuple[int, float]],
        k: int,
        per_case: bool,
        *,
        matched: dict[int, str],
        excerpts: dict[int, str | None] | None = None,
        exclude_cases: set[int] = frozenset(),  # type: ignore[assignment]
        exclude_patient: str | None = None,
    ) -> list[Hit]:
        rows = self.catalog.image_rows([i for i, _ in ordered])
        hits: list[Hit] = []
        seen_cases: set[int] = set()
        for image_id, score in ordered:
            row = rows.get(image_id)
            if row is None or row["case_id"] in exclude_cases:
                continue
            if exclude_patient and row.get("patient_key") == exclude_patient:
                continue
            if per_case:
                if row["case_id"] in seen_cases:
                    continue
                seen_cases.add(row["case_id"])
            ex = (excerpts or {}).get(image_id) or row.get("caption") or _opening(row.get("sections") or {})
            hits.append(_hit(row, score, ex, matched.get(image_id, "image")))
            if len(hits) >= k:
                break
        return hits


def _opening(sections: dict[str, str], n: int = 200) -> str | None:
    for s in ("findings", "impression", "history"):
        if sections.get(s):
            t = " ".join(sections[s].split())
            return t if len(t) <= n else t[: n - 1] + "…"
    return None


def _hit(row: dict[str, Any], score: float, excerpt: str | None, matched: str) -> Hit:
    return Hit(
        score=round(float(score), 6),
        case_id=row["case_id"],
        case_key=row["case_key"],
        image_id=row.get("image_id"),
        image_key=row.get("image_key"),
        source=row["source"],
        modality_type=row.get("modality_type"),
        modality=row.get("modality"),
        body_region=row.get("body_region"),
        plane=row.get("plane"),
        split=row.get("split"),
        diagnosis=row.get("diagnosis"),
        title=row.get("title"),
        excerpt=excerpt,
        matched=matched,
    )
