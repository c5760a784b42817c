"""Searcher: the one use case both shells call.

    text  -> images/cases  (cross-modal image index when the model has one shared space;
                            report and caption text through the text index and BM25;
                            fused by RRF; ``mode`` picks one of them: image, text, bm25)
    image -> images/cases  (image index; the query is a file, a PIL image or a catalog image)
    text | image -> reports (text index, grouped by case; an image only in a shared space)

A query image is resolved once by ``Searcher.image_query`` into an ``ImageQuery`` (its vector and
the catalog image it is): a catalog image, or a file byte-identical to one, uses its stored vector,
so the CLI (a path) and the API (an upload) score the same image the same way. Callers that need
the image twice (drafting: image->image and image->text) pass the ``ImageQuery`` on. Own-case and
own-patient exclusion is one rule (``_Exclusion``) for every query kind.

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

from .catalog import CaseRow, Catalog, ImageRow, TextRow
from .config import ImagingConfig, Paths, SearchConfig
from .encoders.registry import default_model
from .errors import IndexNotBuilt, InvalidInput, MedsearchError, NotFound, NotSupportedByModel
from .freshness import check_bm25, vectors_behind
from .records import Hit, report_opening
from .stores import VectorStore, open_store
from .understand import Understanding, Understood

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
        self._indexes: dict[str, VectorStore] = {}
        self.behind: dict[str, int] = {}  # space -> vectors the catalog stores that the loaded index lacks
        self._bm25: Any = None  # medsearch.bm25.BM25 once loaded
        self._understanding: Understanding | None = None  # built on first use
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            from .encoders.registry import load_encoder

            self._encoder = load_encoder(self.model_id, device=self.device, models_dir=self.paths.models)
        return self._encoder

    def index(self, space: str) -> VectorStore:
        """The loaded index of a space, checked against its manifest and the catalog."""
        with self._lock:
            idx = self._indexes.get(space)
            if idx is None:
                idx = open_store(self.paths.index_dir(self.model_id), space, model_id=self.model_id,
                                 milvus_token=self.catalog.get_meta("milvus_token"))  # the store the manifest names
                self.behind[space] = vectors_behind(self.catalog, self.model_id, space, idx)
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
            self.behind = {}
            self._bm25 = None
            self._understanding = None

    def warm(self) -> dict[str, VectorStore]:
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

    def loaded_indexes(self) -> dict[str, VectorStore]:
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
        understand: bool | Understood = True,
    ) -> list[Hit]:
        """Text -> images (one per case by default), best first.

        ``understand``: True parses the query (``medsearch.understand``) and boosts images whose
        metadata matches (never a filter); an :class:`Understood` from :meth:`understand` is used as is.
        """
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
            raise NotSupportedByModel(
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
        u = understand if isinstance(understand, Understood) else self.understand(query) if understand else None
        if u is not None and not u.empty:
            if self._understanding is None:  # an Understood made elsewhere: build the metadata table
                self.understand(query)
            ordered = self._understanding.rerank(ordered, u, fused=len(rankings) > 1, rrf_k=self.config.rrf_k,
                                                 weight=self.config.understand_weight)  # fmt: skip
        return self._hits(ordered, k, per_case, matched=matched, excerpts={i: best[i][2] for i, _ in ordered})

    def understand(self, query: str) -> Understood:
        """What ``query`` says about image metadata (rules on the catalog's values + the caption model)."""
        with self._lock:
            if self._understanding is None:
                from .catalog.scalars import stored_ids

                ids = stored_ids(self.catalog, self.model_id, "image")
                self._understanding = Understanding(self.catalog, ids, use_model=self.config.understand_model)
            und = self._understanding
        return und.parse(query, min_confidence=self.config.understand_confidence)

    def similar(
        self,
        image: str | Path | int | Image.Image | ImageQuery,
        k: int | None = None,
        filters: Filters = Filters(),
        *,
        per_case: bool | None = None,
        exclude_same_case: bool = False,
        exclude_same_patient: bool = False,
    ) -> list[Hit]:
        """Image -> similar images (one per case by default), best first.

        ``image`` is anything :meth:`image_query` takes, or what it returned (then nothing is
        resolved again). The exclusions apply when the query is a catalog image or a file
        byte-identical to one.
        """
        q = self.image_query(image)
        k = k or self.config.k
        per_case = self.config.per_case if per_case is None else per_case
        exclude = _Exclusion.of(q, exclude_same_case, exclude_same_patient)
        fetch = (k + 1) * self.config.oversample
        ids, scores = self._search_space("image", q.vector, fetch, filters)
        ordered = list(zip((int(i) for i in ids), (float(s) for s in scores), strict=True))
        return self._hits(ordered, k, per_case, matched={i: "image" for i, _ in ordered}, exclude=exclude)

    def similar_study(
        self,
        images: Sequence[str | Path | int | Image.Image],
        k: int | None = None,
        filters: Filters = Filters(),
        *,
        own_study_key: str | None = None,
        exclude_same_patient: bool = False,
    ) -> list[Hit]:
        """Whole study (its query slices) -> one hit per prior study, best first; the query's own study excluded.

        Score: mean over query slices of the best cosine similarity to any slice of the prior study
        (``medsearch.studies``); the hit's image is that study's best-matching slice.
        """
        from .study_search import similar_study

        return similar_study(self, images, k=k, filters=filters, own_study_key=own_study_key,
                             exclude_same_patient=exclude_same_patient)  # fmt: skip


    def image_query(self, image: str | Path | int | Image.Image | ImageQuery, *, sha256: str | None = None) -> ImageQuery:
        """Resolve a query image once: its (1, image_dim) vector and the catalog image it is.

        - an ``int``, or a string that is no existing file but a catalog image id, key or
          ``source:key``: that image's stored vector (nothing is decoded or encoded);
        - a file (path or string): when its sha256 matches a single-frame catalog image, that
          image's stored vector; otherwise it is decoded and encoded once (a byte-identical frame
          of a multi-frame file still counts as its catalog image for the exclusions);
        - a PIL image: encoded; ``sha256`` (of the bytes it was decoded from, e.g. an upload)
          lets a byte-identical catalog image use its stored vector as a file does.

        A string that looks like a file path but names no file and no catalog image raises
        NotFound naming the path.
        """
        if isinstance(image, ImageQuery):
            return image
        if isinstance(image, bool):
            raise InvalidInput(f"{image!r} is not an image", hint="give an image file, a catalog image id or key")
        if isinstance(image, int):
            return self._stored_query(self.catalog.find_image(image), f"image {image}")
        if isinstance(image, str):
            path = Path(image).expanduser()
            if not path.exists():
                row = self.catalog.image_by_ref(image)
                if row is not None:
                    return self._stored_query(row, f"image {image}")
                if _looks_like_path(image):
                    raise NotFound(
                        f"no file {image} (and no catalog image with that key)",
                        hint="check the path (relative paths start at the current folder), "
                        "or give a catalog image id or key from `medsearch search`",
                    )
                return self._stored_query(self.catalog.find_image(image), f"image {image}")  # raises NotFound
            image = path
        if isinstance(image, Path):
            return self._file_query(image)
        row = self.catalog.image_by_sha(sha256) if sha256 else None
        if row is not None and row.frame is None:
            stored = self._stored_vector(row)
            if stored is not None:
                return ImageQuery(stored, row, "the query image", stored=True)
        return ImageQuery(self._encode(image), row, "the query image", stored=False)

    def _file_query(self, path: Path) -> ImageQuery:
        from .fileio import sha256_file
        from .imaging import load_image

        try:
            row = self.catalog.image_by_sha(sha256_file(path))
        except OSError:  # unreadable: load_image names the file and the problem
            row = None
        if row is not None and row.frame is None:
            stored = self._stored_vector(row)
            if stored is not None:
                return ImageQuery(stored, row, path.name, stored=True)
        return ImageQuery(self._encode(load_image(path, config=self.imaging)), row, path.name, stored=False)

    def _stored_query(self, row: ImageRow, name: str) -> ImageQuery:
        vec = self._stored_vector(row)
        if vec is None:
            raise IndexNotBuilt(f"{name} has no {self.model_id} vector yet", hint="run `medsearch index`")
        return ImageQuery(vec, row, name, stored=True)

    def _stored_vector(self, row: ImageRow) -> np.ndarray | None:
        vec = self.catalog.get_vectors(self.model_id, "image", [row.image_id]).get(row.image_id)
        return None if vec is None else vec[None, :].astype(np.float32)  # (1, d)

    def _encode(self, pil: Image.Image) -> np.ndarray:
        from .encoders.base import encode_images

        return encode_images(self.encoder, [pil])  # (1, d)

    def search_reports(
        self,
        query: str | ImageQuery,
        k: int | None = None,
        filters: Filters = Filters(),
        *,
        sections: Sequence[str] | None = None,
        fetch: int | None = None,
        exclude_same_case: bool = False,
        exclude_same_patient: bool = False,
    ) -> list[Hit]:
        """Text or image -> cases by their report/caption text; the excerpt is the best matching text.

        A text query is encoded with the text tower; an :class:`ImageQuery` searches the text index
        with its image vector, which needs a shared image-text space. ``sections`` keeps only texts
        of those sections (captions are section ``caption``); ``fetch`` is how many texts to score.
        The hit's image is the case's first image (None for a case without one).
        """
        k = k or self.config.k
        if isinstance(query, ImageQuery):
            if not self.encoder.shared_space:
                raise InvalidInput(
                    f"model {self.model_id} has no shared image-text space, so an image cannot search report text",
                    hint="use `medsearch similar`, or train the cross-modal model with `medsearch train`",
                )
            q, exclude = query.vector, _Exclusion.of(query, exclude_same_case, exclude_same_patient)
        else:
            text = (query or "").strip()
            if not text:
                raise InvalidInput("the query text is empty", hint="give a text to search reports for")
            q, exclude = self.encoder.encode_texts([text]), _Exclusion()
        ids, scores = self._search_space("text", q, fetch or k * self.config.oversample * 2, filters)
        rows = self.catalog.text_rows(ids.tolist())
        keep = set(sections) if sections is not None else None
        patients = self._patients(exclude, {r.case_id for r in rows.values()})
        best: dict[int, tuple[float, TextRow]] = {}
        for i, s in zip(ids, scores, strict=True):
            r = rows.get(int(i))
            if r is None or r.case_id in best or (keep is not None and r.section not in keep):
                continue
            if exclude.drops(r.case_id, patients.get(r.case_id)):
                continue
            best[r.case_id] = (float(s), r)
        cases = list(best.items())[:k]
        first = {c: v[0] for c, v in self.catalog.case_images([c for c, _ in cases]).items() if v}
        img_rows = self.catalog.image_rows(list(first.values()))
        no_image = self.catalog.case_rows([c for c, _ in cases if first.get(c) not in img_rows])
        return [
            _hit(img_rows.get(first.get(c, -1)) or no_image[c], score, trow.text, "text") for c, (score, trow) in cases
        ]

    # ------------------------------------------------------------------ internals
    def _search_space(self, space: str, q: np.ndarray, fetch: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        idx = self.index(space)
        self._check_encoder()
        f = filters.as_dict()
        if idx.engine_filters:  # Milvus: the filters become an expression evaluated inside the engine
            D, I = idx.search(q, min(fetch, max(idx.ntotal, 1)), filters=f)
            keep = I[0] >= 0
            return I[0][keep], D[0][keep]
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
        from .bm25 import BM25

        with self._lock:
            if self._bm25 is None:
                bm, man = BM25.load(self.paths.index_dir(self.model_id))
                check_bm25(self.catalog, self.model_id, bm, man)
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
        case_only = [r.case_id for r in rows.values() if r.image_id is None]
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
            targets = [r.image_id] if r.image_id is not None else case_imgs.get(r.case_id, [])
            for t in targets:
                if t in seen or (allowed_set is not None and t not in allowed_set):
                    continue
                seen.add(t)
                out_ids.append(t)
                out_scores.append(float(s))
                out_ex.append(r.text)
        return out_ids, out_scores, out_ex

    def _patients(self, exclude: _Exclusion, case_ids: set[int]) -> dict[int, str | None]:
        """Patient key of each case, read only when a patient is to be excluded."""
        if exclude.patient_key is None or not case_ids:
            return {}
        return {c: r.patient_key for c, r in self.catalog.case_rows(sorted(case_ids)).items()}

    def _hits(
        self,
        ordered: list[tuple[int, float]],
        k: int,
        per_case: bool,
        *,
        matched: dict[int, str],
        excerpts: dict[int, str | None] | None = None,
        exclude: _Exclusion | None = None,
    ) -> list[Hit]:
        exclude = exclude or _Exclusion()
        rows = self.catalog.image_rows([i for i, _ in ordered])
        hits: list[Hit] = []
        seen_cases: set[int] = set()
        for image_id, score in ordered:
            row = rows.get(image_id)
            if row is None or exclude.drops(row.case_id, row.patient_key):
                continue
            if per_case:
                if row.case_id in seen_cases:
                    continue
                seen_cases.add(row.case_id)
            ex = (excerpts or {}).get(image_id) or row.caption or report_opening(row.sections or {})
            hits.append(_hit(row, score, ex, matched.get(image_id, "image")))
            if len(hits) >= k:
                break
        return hits


@dataclass(frozen=True)
class ImageQuery:
    """A query image resolved once (:meth:`Searcher.image_query`): pass it on instead of the image."""

    vector: np.ndarray  # (1, image_dim) float32
    row: ImageRow | None  # the catalog image it is (by id/key, or a byte-identical file), else None
    name: str  # for messages: the file name, "image <ref>" or "the query image"
    stored: bool  # True: the catalog's stored vector was used (nothing decoded or encoded)


@dataclass(frozen=True)
class _Exclusion:
    """The one own-case / own-patient rule: which hits a query must not return."""

    case_id: int | None = None
    patient_key: str | None = None

    @classmethod
    def of(cls, q: ImageQuery, same_case: bool, same_patient: bool) -> _Exclusion:
        if q.row is None:
            return cls()
        return cls(q.row.case_id if same_case else None, (q.row.patient_key or None) if same_patient else None)

    def drops(self, case_id: int, patient_key: str | None) -> bool:
        return case_id == self.case_id or (self.patient_key is not None and patient_key == self.patient_key)


_PATH_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def _looks_like_path(ref: str) -> bool:
    """A reference meant as a file: a folder separator, a leading ~ or ., or an image file suffix."""
    return "/" in ref or "\\" in ref or ref.startswith(("~", ".")) or ref.lower().endswith(_PATH_SUFFIXES)


def _hit(row: ImageRow | CaseRow, score: float, excerpt: str | None, matched: str) -> Hit:
    img = row if isinstance(row, ImageRow) else None
    return Hit(
        score=round(float(score), 6),
        case_id=row.case_id,
        case_key=row.case_key,
        image_id=img.image_id if img else None,
        image_key=img.image_key if img else None,
        source=row.source,
        modality_type=img.modality_type if img else None,
        modality=img.modality if img else None,
        body_region=img.body_region if img else None,
        plane=img.plane if img else None,
        split=row.split,
        diagnosis=row.diagnosis,
        title=row.title,
        excerpt=excerpt,
        matched=matched,
    )
