"""Pull studies from a PACS over DICOMweb (QIDO-RS to find, WADO-RS to fetch, STOW-RS to send back).

    medsearch ingest dicomweb+http://HOST:PORT/dicom-web [--since YYYYMMDD] [--modality CT]... [--slices N]

Per study, in this order and without touching pixels until the last step:

1. QIDO-RS lists studies (StudyDate >= since, ModalitiesInStudy), paged. A study whose instance
   count and slice setting match its ``sync_state`` row is skipped with no further request.
2. QIDO-RS lists its series; WADO-RS series *metadata* gives each instance's SOP class,
   position and number. Slices are chosen from that metadata (``select_slices``): N spread over
   the series' extent along its normal, or all of them; instances the catalog already holds are
   not fetched again; SR documents of the study are always fetched (they become its report).
3. WADO-RS fetches just those instances into memory; each is de-identified and rendered to a
   display PNG (``indexer.sources.instances``), and the whole study is stored in one transaction
   together with its sync record: a study goes in whole or not at all. With an ``encoder``, each
   rendered slice is embedded from its pixels in memory while the next ones are fetched
   (``indexer.embed_stream``), and its vector is stored in the same transaction.

Re-running adds only what is new: the high-water mark ``dicomweb:<source>:since`` (the newest
StudyDate synced) bounds the QIDO query, and the catalog's keys and sync records skip the rest;
a killed sync resumes at the first study that was not committed. A study that gained a series
since its last sync has a new instance count, so its new series is fetched. Studies older than
the high-water mark that change later need ``--since`` to be looked at again.

Errors: an unreachable, slow or failing server raises ``RemoteUnavailable`` naming the URL and
the remedy after retries with exponential backoff (connection errors, 429, 5xx). Credentials
(``--token`` / ``MEDSEARCH_DICOMWEB_TOKEN`` bearer, or ``user:password@`` in the URL for basic
auth) are never logged or stored; neither are UIDs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from medsearch.catalog import Catalog, now
from medsearch.catalog.pacs import existing_image_keys, series_slices, set_sync_state, sync_state
from medsearch.config import ImagingConfig
from medsearch.deid import pseudonym
from medsearch.errors import InvalidInput, RemoteUnavailable
from medsearch.studies import SeriesRecord

from .dicom import _int  # the DICOM reader's tolerant integer parse
from .instances import StudyItems, add_instance, display_dir
from .sr import TEXT_SR_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from indexer.embed_stream import StreamEmbedder
    from medsearch.encoders.base import Encoder

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
_TAG = {  # DICOM JSON tags read from QIDO / metadata answers
    "StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016", "Modality": "00080060", "StudyDate": "00080020",
    "NumberOfStudyRelatedInstances": "00201208", "ImagePositionPatient": "00200032",
    "ImageOrientationPatient": "00200037", "InstanceNumber": "00200013", "SeriesNumber": "00200011",
    "BodyPartExamined": "00180015", "SliceThickness": "00180050", "WindowCenter": "00281050",
    "WindowWidth": "00281051",
}  # fmt: skip


def is_dicomweb(path: str) -> bool:
    return str(path).startswith(SCHEMES)


@dataclass(frozen=True)
class DicomwebConfig:
    """What to pull and how: the URL as given (``dicomweb+http(s)://...``), filters, slices, retries."""

    url: str
    since: str | None = None  # YYYYMMDD; default: the source's high-water mark
    modalities: tuple[str, ...] = ()
    slices: int | None = 8  # None = all
    token: str | None = None
    timeout: float = 30.0
    retries: int = 4
    backoff: float = 0.5  # seconds; doubles per retry
    page: int = 100  # studies per QIDO page
    source: str | None = None
    link_back: bool = False  # keep pseudonym -> Study Instance UID in HOME/private/links.db (admin viewer links)
    embed_threads: int = 0  # with an encoder: torch threads of the embedding thread (0: torch's default, one per core)


@dataclass
class SyncSummary:
    """Counts of one sync; ``skipped`` names inputs by pseudonymous key or position, never by UID."""

    url: str
    source: str
    studies_seen: int = 0
    studies_synced: int = 0
    studies_unchanged: int = 0
    instances_listed: int = 0
    instances_fetched: int = 0
    images_added: int = 0
    images_embedded: int = 0  # vectors stored during the sync (``encoder``)
    reports_added: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # where the time went: metadata (QIDO, series metadata), fetch (waiting for WADO instances beyond what the
    # fetch thread had ready), render (de-identify + display PNG), fsync (the PNGs), embed_wait (for the
    # embedding thread to finish the study's slices), store (the transaction)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, since: float) -> float:
        now_ = time.perf_counter()
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now_ - since
        return now_

    @property
    def counts(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("skipped", "notes", "url", "stage_seconds")} | {
            "skipped": len(self.skipped)}  # fmt: skip


def http_url(url: str) -> tuple[str, str | None, str | None]:
    """``dicomweb+http://user:pw@host:port/root`` -> (``http://host:port/root``, user, password)."""
    if not is_dicomweb(url):
        raise InvalidInput(f"{url!r} is not a DICOMweb source", hint="write dicomweb+http://HOST:PORT/dicom-web")
    parts = urlsplit(url.removeprefix("dicomweb+"))
    if not parts.hostname:
        raise InvalidInput(f"{redact(url)} names no host", hint="write dicomweb+http://HOST:PORT/dicom-web")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), parts.username, parts.password


def redact(url: str) -> str:
    """The URL without credentials, for messages and logs."""
    parts = urlsplit(url.removeprefix("dicomweb+"))
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def default_source(url: str) -> str:
    """A stable source name for a PACS: ``pacs-HOST-PORT``."""
    parts = urlsplit(url.removeprefix("dicomweb+"))
    return f"pacs-{parts.hostname}-{parts.port or (443 if parts.scheme == 'https' else 80)}"


class DicomwebClient:
    """QIDO/WADO/STOW over one HTTP session with retries and backoff; errors name the URL and a remedy."""

    def __init__(self, config: DicomwebConfig) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.config = config
        self.base, user, password = http_url(config.url)
        self.shown = redact(config.url)
        session = requests.Session()
        retry = Retry(total=config.retries, connect=config.retries, read=config.retries, status=config.retries,
                      backoff_factor=config.backoff, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=None, raise_on_status=False)  # fmt: skip
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if config.token:
            session.headers["Authorization"] = f"Bearer {config.token}"
        elif user is not None:
            session.auth = (user, password or "")
        self.client = DICOMwebClient(self.base, session=session, timeout=config.timeout)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one DICOMweb call, turning transport and HTTP failures into ``RemoteUnavailable``."""
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else "?"
            hint = {401: "pass --token (or MEDSEARCH_DICOMWEB_TOKEN) or user:password@ in the URL",
                    403: "the credentials are not allowed to read this server",
                    404: "check the DICOMweb root in the URL (e.g. /dicom-web)"}.get(status, "check the server's log; retry later")  # fmt: skip
            raise RemoteUnavailable(f"{self.shown}: {what} answered HTTP {status}", hint=hint) from None
        except (requests.ConnectionError, requests.Timeout) as e:
            kind = "timed out" if isinstance(e, requests.Timeout) else "cannot be reached"
            raise RemoteUnavailable(
                f"{self.shown}: {what} {kind} after {self.config.retries} retries",
                hint="check that the PACS is up and the host/port are right; --timeout for a slow server",
            ) from None
        except requests.RequestException as e:
            raise RemoteUnavailable(f"{self.shown}: {what} failed ({type(e).__name__})", hint="retry later") from None

    def studies(self, since: str | None, modalities: Sequence[str]) -> Iterator[dict[str, Any]]:
        """QIDO-RS studies, paged; one query per modality (ModalitiesInStudy matches one value)."""
        fields = ["StudyInstanceUID", "StudyDate", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]
        seen: set[str] = set()
        for modality in list(modalities) or [None]:
            filters: dict[str, Any] = {}
            if since:
                filters["StudyDate"] = f"{since}-"
            if modality:
                filters["ModalitiesInStudy"] = modality
            offset = 0
            while True:
                page = self.call("QIDO-RS /studies", self.client.search_for_studies, search_filters=filters,
                                 fields=fields, limit=self.config.page, offset=offset)  # fmt: skip
                for s in page:
                    uid = value(s, "StudyInstanceUID")
                    if uid and uid not in seen:
                        seen.add(uid)
                        yield s
                if len(page) < self.config.page:
                    break
                offset += len(page)

    def series(self, study_uid: str) -> list[dict[str, Any]]:
        return self.call("QIDO-RS /series", self.client.search_for_series, study_uid)

    def series_metadata(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        return self.call("WADO-RS series metadata", self.client.retrieve_series_metadata, study_uid, series_uid)

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        return self.call("WADO-RS instance", self.client.retrieve_instance, study_uid, series_uid, sop_uid)

    def whole_series(self, study_uid: str, series_uid: str) -> Iterator[Dataset]:
        """The instances of a series as they arrive (one streamed multipart answer, 1 MB reads)."""
        parts = self.call("WADO-RS series", self.client.iter_series, study_uid, series_uid)
        while True:
            try:
                ds = self.call("WADO-RS series", next, parts)
            except StopIteration:
                return
            yield ds

    def store(self, datasets: Sequence[Dataset]) -> Any:
        return self.call("STOW-RS", self.client.store_instances, list(datasets))


def value(obj: dict[str, Any], keyword: str) -> Any:
    """First value of a DICOM JSON attribute (by keyword), or None."""
    v = obj.get(_TAG[keyword], {}).get("Value")
    return v[0] if v else None


def values(obj: dict[str, Any], keyword: str) -> list[Any] | None:
    v = obj.get(_TAG[keyword], {}).get("Value")
    return list(v) if v else None


def sync_dicomweb(
    catalog: Catalog,
    home: Path,
    config: DicomwebConfig,
    *,
    imaging: ImagingConfig = ImagingConfig(),
    progress: Callable[[str, int], None] | None = None,
    client: DicomwebClient | None = None,
    encoder: Encoder | Callable[[], Encoder] | None = None,
) -> SyncSummary:
    """Sync new studies, series and instances from a DICOMweb server into the catalog (see module doc).

    ``encoder`` (or a function that loads it, called in the embedding thread while the first metadata is
    fetched): embed each rendered slice during the sync, from its pixels in memory, and store the vectors
    in the study's transaction (``indexer.embed_stream``); ``medsearch index`` then only builds the indexes.
    """
    if encoder is None:
        return _sync(catalog, home, config, imaging, progress, client, None)
    from indexer.embed_stream import StreamEmbedder

    with StreamEmbedder(encoder, torch_threads=config.embed_threads) as embedder:
        return _sync(catalog, home, config, imaging, progress, client, embedder)


def _sync(
    catalog: Catalog, home: Path, config: DicomwebConfig, imaging: ImagingConfig,
    progress: Callable[[str, int], None] | None, client: DicomwebClient | None, embedder: StreamEmbedder | None,
) -> SyncSummary:  # fmt: skip
    from indexer.ingest import ingest_items

    t0 = time.perf_counter()
    source = config.source or default_source(config.url)
    client = client or DicomwebClient(config)
    summary = SyncSummary(url=client.shown, source=source)
    mark = f"dicomweb:{source}:since"
    since = config.since or catalog.get_meta(mark)
    slices_mode = "all" if config.slices is None else str(config.slices)
    out_dir = display_dir(home, source)
    newest = catalog.get_meta(mark) or ""
    weights_checked = False
    links = None
    if config.link_back:
        from medsearch.catalog.links import LinkStore

        links = LinkStore.open(home, create=True)
    for study in client.studies(since, config.modalities):
        summary.studies_seen += 1
        uid = value(study, "StudyInstanceUID")
        n_instances = int(value(study, "NumberOfStudyRelatedInstances") or 0)
        study_key = pseudonym(uid, catalog.salt, "StudyInstanceUID")
        if sync_state(catalog, source, study_key) == (n_instances, slices_mode):
            summary.studies_unchanged += 1
            newest = max(newest, str(value(study, "StudyDate") or ""))
            continue
        on_image = None if embedder is None else (lambda rec, pixels: embedder.submit(rec.key, pixels))
        items = _fetch_study(client, catalog, uid, study_key, source, config, out_dir, imaging, summary, on_image)
        try:
            t = time.perf_counter()
            items.sync_files()  # the display images are durable before the catalog names them
            t = summary.timed("fsync", t)
            vectors: dict[Any, Any] = {}
            if embedder is not None and items.images:
                vectors = embedder.take(im.key for im in items.images)
                if not weights_checked:  # vectors of other weights of this model id go, as `medsearch index` does
                    from indexer.embed import check_weights

                    check_weights(catalog, embedder.ready())
                    weights_checked = True
                t = summary.timed("embed_wait", t)
            with catalog.atomic():
                s = ingest_items(catalog, items.items(), path=client.shown, layout="dicomweb", imaging=imaging,
                                 chunk=1 << 30)  # fmt: skip
                if vectors:
                    summary.images_embedded += _put_vectors(catalog, source, study_key, items, vectors,
                                                            embedder.ready().model_id)  # type: ignore[union-attr]  # fmt: skip
                set_sync_state(catalog, source, study_key, n_instances, slices_mode, now())
            summary.timed("store", t)
        except BaseException:
            _remove_unreferenced(items)
            raise
        if links is not None:
            links.put(source, study_key, uid)
        summary.studies_synced += 1
        summary.images_added += s.images_added + s.images_updated
        summary.reports_added += int(bool(items.sections))
        summary.skipped.extend((x.item, x.reason) for x in s.skipped)
        newest = max(newest, str(value(study, "StudyDate") or ""))
        if newest:
            catalog.set_meta(mark, newest)
        if progress:
            progress("study", 1)
    if links is not None:
        links.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _put_vectors(catalog: Catalog, source: str, study_key: str, items: StudyItems, vectors: dict[Any, Any],
                 model_id: str) -> int:  # fmt: skip
    """Store the vectors of the study's new images (inside its transaction); how many were stored."""
    import numpy as np

    ids: dict[str, int] = {}
    for series_key in {im.meta.get("series_key") for im in items.images}:
        ids.update((key, image_id) for image_id, key, _meta, status in
                   series_slices(catalog, source, study_key, str(series_key)) if status == "ok")  # fmt: skip
    keys = [k for k in vectors if k in ids]
    if keys:
        catalog.put_vectors(model_id, "image", [ids[k] for k in keys], np.stack([vectors[k] for k in keys]))
    return len(keys)


def _fetch_study(
    client: DicomwebClient, catalog: Catalog, study_uid: str, study_key: str, source: str,
    config: DicomwebConfig, out_dir: Path, imaging: ImagingConfig, summary: SyncSummary,
    on_image: Callable[[Any, Any], None] | None = None,
) -> StudyItems:  # fmt: skip
    """Series metadata first, then only the chosen instances: the study's items, its series records included."""
    items = StudyItems()
    t = time.perf_counter()
    for series in client.series(study_uid):
        series_uid = value(series, "SeriesInstanceUID")
        meta = client.series_metadata(study_uid, series_uid)
        t = summary.timed("metadata", t)
        summary.instances_listed += len(meta)
        if not meta:
            continue
        sr = {i for i, m in enumerate(meta) if value(m, "SOPClassUID") in TEXT_SR_CLASSES or value(m, "Modality") == "SR"}
        images = [i for i in range(len(meta)) if i not in sr]
        keys = {i: pseudonym(value(meta[i], "SOPInstanceUID"), catalog.salt, "SOPInstanceUID") for i in range(len(meta))}
        picked: list[int] = sorted(sr)
        if images:
            rec, chosen = _series_record(meta, images, keys, series_uid, study_key, source, catalog.salt,
                                         config.slices)  # fmt: skip
            items.series.append(rec)
            picked += chosen
            if rec.order_note:
                summary.notes.append(f"series {rec.number if rec.number is not None else '?'} ({rec.key[:12]}): "
                                     f"{rec.slice_count} slices ordered by InstanceNumber ({rec.order_note})")  # fmt: skip
        have = existing_image_keys(catalog, source, [keys[i] for i in picked])
        todo = [i for i in picked if keys[i] not in have or i in sr]
        if config.slices is None and len(todo) == len(meta) and len(todo) > 1:
            datasets: Iterator[Dataset] = prefetch(client.whole_series(study_uid, series_uid))
        else:  # a few requests in flight at once: the PACS reads and sends one while the next is asked for
            datasets = fetch_each(client.instance, [(study_uid, series_uid, value(meta[i], "SOPInstanceUID"))
                                                    for i in todo])  # fmt: skip
        t = summary.timed("metadata", t)
        for ds in datasets:
            t = summary.timed("fetch", t)
            summary.instances_fetched += 1
            name = f"{source}:{study_key[:12]}/{pseudonym(series_uid, catalog.salt, 'SeriesInstanceUID')[:12]}" \
                   f"#{ds.get('InstanceNumber', '?')}"  # fmt: skip
            add_instance(items, ds, source=source, salt=catalog.salt, out_dir=out_dir, name=name, config=imaging,
                         on_image=on_image)  # fmt: skip
            t = summary.timed("render", t)
    return items  # no case record when nothing new was fetched: the study is complete in the catalog


def _series_record(
    meta: list[dict[str, Any]], images: list[int], keys: dict[int, str], series_uid: str, study_key: str,
    source: str, salt: str, slices: int | None,
) -> tuple[SeriesRecord, list[int]]:  # fmt: skip
    """The series as the DICOM tree reader records it (same ordering and spread rules), and the chosen indices."""
    from indexer.sources.dicom import _body_region, _plane
    from medsearch.imaging.windows import preset_for
    from medsearch.studies import SliceRef, median_spacing, order_slices, spread

    def floats(m: dict[str, Any], kw: str, n: int) -> tuple[float, ...] | None:
        v = values(m, kw)
        try:
            return tuple(float(x) for x in v) if v and len(v) == n else None
        except (TypeError, ValueError):
            return None

    sub = [meta[i] for i in images]
    so = order_slices([floats(m, "ImageOrientationPatient", 6) for m in sub],
                      [floats(m, "ImagePositionPatient", 3) for m in sub],
                      [_int(value(m, "InstanceNumber")) for m in sub])  # fmt: skip
    chosen_ranks = set(spread(len(sub), slices, so.positions))
    refs = tuple(SliceRef(keys[images[idx]], rank, so.positions[rank] if so.positions else None, rank in chosen_ranks)
                 for rank, idx in enumerate(so.order))  # fmt: skip
    head = sub[so.order[0]]
    modality = str(value(head, "Modality") or "").upper() or None
    body_part = str(value(head, "BodyPartExamined") or "").strip().upper() or None
    orientation = floats(head, "ImageOrientationPatient", 6)
    wc, ww = _first_float(head, "WindowCenter"), _first_float(head, "WindowWidth")
    window = (wc, ww) if wc is not None and ww is not None and ww > 0 else None
    sorted_pos = so.positions
    rec = SeriesRecord(
        source=source, key=pseudonym(series_uid, salt, "SeriesInstanceUID"), case_key=study_key,
        number=_int(value(head, "SeriesNumber")), modality=modality, body_part=body_part,
        body_region=_body_region(body_part), plane=_plane({"orientation": list(orientation)} if orientation else {}),
        orientation=orientation if sorted_pos else None, slice_count=len(sub),
        thickness=_first_float(head, "SliceThickness"), spacing=median_spacing(sorted_pos),
        position_range=(sorted_pos[0], sorted_pos[-1]) if sorted_pos else None, ordered_by=so.ordered_by,
        order_note=so.note, window=window, preset=preset_for(body_part) if modality == "CT" and window is None else None,
        slices=refs,
    )  # fmt: skip
    return rec, [images[so.order[r]] for r in sorted(chosen_ranks)]



def prefetch(items: Iterator[Any], depth: int = 8) -> Iterator[Any]:
    """``items`` produced in a thread, at most ``depth`` ahead: the next instances arrive over HTTP while
    this one is de-identified and rendered. An error of the producer is raised here, in order."""
    import queue
    import threading

    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put((True, x), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((False, None))
        except BaseException as e:  # handed to the consumer
            q.put((False, e))

    t = threading.Thread(target=produce, name="medsearch-dicomweb-fetch", daemon=True)
    t.start()
    try:
        while True:
            ok, x = q.get()
            if not ok:
                if x is not None:
                    raise x
                return
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


def fetch_each(fetch: Callable[..., Any], calls: list[tuple[Any, ...]], workers: int = 4) -> Iterator[Any]:
    """``fetch(*args)`` for each of ``calls``, up to ``workers`` at once on one HTTP session, yielded in
    order; the first error is raised in order, and the requests not yet started are dropped."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if not calls:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(calls))), thread_name_prefix="medsearch-wado")
    pending: deque[Any] = deque()
    todo = iter(calls)
    try:
        for args in todo:
            pending.append(pool.submit(fetch, *args))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fetch, *nxt))
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _first_float(m: dict[str, Any], kw: str) -> float | None:
    v = value(m, kw)
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _remove_unreferenced(items: StudyItems) -> None:
    """After a failed store, delete the display PNGs this study wrote (the catalog has none of them)."""
    for im in items.images:
        Path(im.path).unlink(missing_ok=True)


def stow(url: str, datasets: Sequence[Dataset], *, token: str | None = None, timeout: float = 30.0) -> int:
    """Send datasets to a PACS over STOW-RS; returns how many were sent."""
    client = DicomwebClient(DicomwebConfig(url=url if is_dicomweb(url) else f"dicomweb+{url}", token=token,
                                           timeout=timeout))  # fmt: skip
    client.store(datasets)
    return len(datasets)
