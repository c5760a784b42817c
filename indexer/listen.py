"""A DICOM C-STORE receiver (SCP, with C-ECHO) that modalities or the PACS push to.

    medsearch listen [--host 127.0.0.1] [--port 11112] [--ae-title MEDSEARCH] [--index-every 30]

    C-STORE (indexer.dimse: a thread per association) ─► decode ─► de-identify, check header
        ─► spool entry (write, fsync, rename) ─► status 0x0000
             │ every --index-every seconds, oldest first, ``batch`` entries at a time until the spool is empty:
             └► render display PNGs ─► ingest with series rows (one transaction) ─► delete entries ─► index
                (a published generation per batch)

What each C-STORE gets back:
    0x0000  success: the instance is de-identified and durably spooled (it survives a SIGKILL)
    0x0122  refused, SOP class not supported: a storage object that is neither an image nor a text SR
    0xC000  error, cannot understand: a data set that does not decode, has no pixels or no UIDs
    0xA700  refused, out of resources: the spool cannot be written (disk full)
    0x0110  processing failure: the handler raised (a bug; logged by exception type, the association lives)

The spool (``HOME/spool/<ae-title>/``) holds one entry per received instance (``<key>.spool``):
a JSON line with the de-identified catalog items (pseudonymous keys, whitelisted header fields)
and, for an image, a data set of just its pixel module and LUTs (``instances.PIXEL_KEYWORDS``, cut
from the received bytes: ``dimse.pixel_slices``); never a UID, a name, a date or the original file.
An entry is written to a temp file, fsynced and renamed before the C-STORE is answered, so after a
SIGKILL (or, with ``fsync``, a power loss) a restarted listener replays exactly the entries that were
acknowledged: ingest is idempotent by key and content hash, so nothing is lost or doubled. Parallel
associations fsync in parallel, and the kernel commits them together.

The sender waits only for decode, de-identify and the spool write. Rendering the display PNG
(window, 8-bit, PNG encode: most of the CPU of an instance) happens in the ingest round, which
also gives pushed slices the same study and series rows as a DICOM tree or DICOMweb ingest: each
round re-orders a series over its slices from earlier rounds and the new ones.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsearch.catalog import Catalog
from medsearch.config import ImagingConfig, Paths
from medsearch.records import CaseRecord, ImageRecord

from .dimse import pixel_slices
from .sources.instances import StudyItems, add_instance, display_dir, pixel_payload, received_series, render_payload

log = logging.getLogger("medsearch.listen")

SUCCESS, UNSUPPORTED, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0x0122, 0xC000, 0xA700


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "MEDSEARCH"
    index_every: float = 30.0  # seconds between ingest+index rounds
    source: str | None = None  # catalog source name; default "listen-<ae title>"
    max_pdu: int = 0  # 0 = unlimited
    link_back: bool = False  # keep pseudonym -> Study Instance UID in HOME/private/links.db (admin viewer links)
    fsync: bool = True  # fsync each spool entry before answering (survives power loss; False: a kill only)
    batch: int = 64  # spool entries per ingest+index batch, each published before the next; 0 = all at once
    engine: str = "native"  # "native": indexer.dimse (blocking thread per association); "pynetdicom": its AE server


@dataclass
class ListenStats:
    received: int = 0
    spooled: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    ingested: int = 0
    rounds: int = 0
    last_round_seconds: float = 0.0
    last_round_stages: dict[str, float] = field(default_factory=dict)  # render, fsync, store, index (seconds)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # the same, summed over every batch
    last_indexed_at: float | None = None

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


MAGIC = b"MEDSEARCH-SPOOL 1\n"


@dataclass
class SpoolEntry:
    items: StudyItems
    transfer_syntax: str | None = None  # of ``pixels``
    pixels: bytes | None = None  # instances.pixel_payload: the pixel module of the one image, to render


class Spool:
    """Crash-safe queue of de-identified instances, one file each, named by instance key.

    ``<key>.spool`` = MAGIC, one JSON line (the items), then the pixel payload's bytes. Entries a
    listener before the render-in-round change wrote (``<key>.json``, PNG already rendered) replay too.
    """

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = Path(folder)
        self.fsync = fsync
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a write killed before its rename was never acknowledged
            stale.unlink(missing_ok=True)

    def put(self, key: str, items: StudyItems, pixels: tuple[str, bytes | list[memoryview]] | None = None) -> None:
        """Write ``key``'s entry: the items and the pixel payload (bytes, or the buffers that joined make it)."""
        entry = {"case": _fields(items.case) if items.case else None,
                 "images": [_fields(i) for i in items.images], "sections": items.sections,
                 "transfer_syntax": pixels[0] if pixels else None}  # fmt: skip
        head = json.dumps(entry, separators=(",", ":")).encode()  # no raw newline inside: JSON escapes them
        path = self.folder / f"{key}.spool"
        # one writer per name at a time: a thread owns its temp name (two associations may spool one key)
        tmp = self.folder / f".{path.name}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                data = pixels[1] if pixels else b""
                parts = [MAGIC + head + b"\n", *([data] if isinstance(data, bytes | bytearray) else data)]
                n = os.writev(fd, parts)
                rest = memoryview(b"".join(parts))[n:] if n < sum(len(x) for x in parts) else b""
                while rest:  # writev may write less than asked
                    rest = rest[os.write(fd, rest) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def entries(self) -> list[Path]:
        found = [*self.folder.glob("*.spool"), *self.folder.glob("*.json")]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    @staticmethod
    def load(path: Path) -> SpoolEntry:
        raw = path.read_bytes()
        pixels = None
        if path.suffix == ".spool":
            if not raw.startswith(MAGIC) or b"\n" not in raw[len(MAGIC):]:
                raise ValueError("not a spool entry")
            head, _, pixels = raw[len(MAGIC):].partition(b"\n")
            raw = head
        d = json.loads(raw)
        items = StudyItems(case=CaseRecord(**d["case"]) if d["case"] else None,
                           images=[ImageRecord(**i) for i in d["images"]], sections=d.get("sections") or {})  # fmt: skip
        ts = d.get("transfer_syntax")
        return SpoolEntry(items, ts, pixels if ts and pixels else None)

    def __len__(self) -> int:
        return len(self.entries())


class Listener:
    """The SCP and its ingest loop. ``start()`` returns once the port is bound; ``stop()`` drains."""

    def __init__(
        self,
        home: Path,
        config: ListenConfig = ListenConfig(),
        *,
        index: Callable[[Catalog], Any] | None = None,
        imaging: ImagingConfig = ImagingConfig(),
    ) -> None:
        self.home = Path(home)
        self.paths = Paths(self.home)
        self.config = config
        self.source = config.source or f"listen-{config.ae_title.strip().lower()}"
        self.index = index
        self.imaging = imaging
        self.stats = ListenStats()
        self.spool = Spool(self.home / "spool" / _safe(config.ae_title), fsync=config.fsync)
        self.out_dir = display_dir(self.home, self.source)
        cat = Catalog.open(self.paths.catalog)
        self.salt = cat.salt
        cat.close()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._server: Any = None
        self._loop: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._links = None
        if config.link_back:
            from medsearch.catalog.links import LinkStore

            self._links = LinkStore.open(self.home, create=True)
            self._links_lock = threading.Lock()

    # ------------------------------------------------------------------ SCP
    def start(self) -> Listener:
        from pynetdicom import AllStoragePresentationContexts

        storage = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        if self.config.engine == "pynetdicom":
            self._server = self._start_pynetdicom(storage)
        elif self.config.engine == "native":
            from pydicom.uid import generate_uid

            from .dimse import StoreServer

            self._server = StoreServer((self.config.host, self.config.port), ae_title=self.config.ae_title,
                                       abstract_syntaxes=storage, transfer_syntaxes=ALL_TRANSFER_SYNTAXES,
                                       on_store=self._on_request, max_pdu=self.config.max_pdu,
                                       implementation_uid=generate_uid(entropy_srcs=["medsearch listen"])).start()  # fmt: skip
        else:
            from medsearch.errors import InvalidInput

            raise InvalidInput(f"listen engine {self.config.engine!r} is unknown", hint="use 'native' or 'pynetdicom'")
        self._loop = threading.Thread(target=self._run_loop, name="medsearch-listen-ingest", daemon=True)
        self._loop.start()
        log.info("listening on %s:%d as %s; spool %s", self.config.host, self.port, self.config.ae_title,
                 self.spool.folder)  # fmt: skip
        return self

    def _start_pynetdicom(self, storage: list[str]) -> Any:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        for uid in storage:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            def decode() -> tuple[Any, None]:
                ds = event.dataset
                ds.file_meta = event.file_meta
                return ds, None

            return self._store(decode)

        handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_CONN_OPEN, _no_delay)]  # fmt: skip
        return ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.port

    def _on_request(self, req: Any) -> int:
        """A C-STORE from ``indexer.dimse``: its data set decoded there, then ``_store``."""
        from .dimse import decode_dataset

        return self._store(lambda: (decode_dataset(req), req.dataset))

    def _count(self, what: str = "", why: str = "") -> None:
        with self._stats_lock:  # associations run in parallel threads
            if why:
                self.stats.refuse(why)
            else:
                setattr(self.stats, what, getattr(self.stats, what) + 1)

    def _store(self, decode: Callable[[], tuple[Any, bytes | None]]) -> int:
        """Decode, de-identify, spool one received instance; the DIMSE status to answer. ``decode`` gives
        the data set and, when there is one, the buffer it was read from (the pixel module is cut from it)."""
        self._count("received")
        try:
            ds, buf = decode()
            slices = pixel_slices(ds, buf) if buf is not None else None  # before add_instance converts elements
            sop_class = str(ds.get("SOPClassUID") or "")
            has_pixels = "PixelData" in ds or "FloatPixelData" in ds
        except Exception:  # the data set does not decode
            self._count(why="cannot understand")
            log.warning("C-STORE refused: data set does not decode")
            return CANNOT_UNDERSTAND
        from .sources.instances import is_sr

        if not is_sr(ds) and not has_pixels:
            why = "unsupported SOP class" if sop_class else "cannot understand"
            self._count(why=why)
            log.warning("C-STORE refused (%s): SOP class %s", why, _sop_name(sop_class))
            return UNSUPPORTED if sop_class else CANNOT_UNDERSTAND
        items = StudyItems()
        name = f"{self.source}:#{ds.get('InstanceNumber', '?')}"
        add_instance(items, ds, source=self.source, salt=self.salt, out_dir=self.out_dir, name=name,
                     config=self.imaging, render=False)  # fmt: skip
        if items.case is None or (not items.images and not items.sections):
            self._count(why="cannot understand")
            why = items.skipped[0].reason if items.skipped else "nothing usable"
            log.warning("C-STORE refused (cannot understand): %s", why)
            return CANNOT_UNDERSTAND
        key = items.images[0].key if items.images else _instance_key(ds, self.salt)
        try:
            if not items.images:
                pixels = None
            elif slices is not None and buf is not None:  # the pixel module's elements as received
                view = memoryview(buf)
                pixels = (str(ds.file_meta.TransferSyntaxUID), [view[a:b] for a, b in slices])  # written as they are
            else:
                pixels = pixel_payload(ds)
        except Exception as e:  # an element pydicom cannot write back (a malformed value)
            self._count(why="cannot understand")
            log.warning("C-STORE refused (cannot understand): pixel module not readable (%s)", type(e).__name__)
            return CANNOT_UNDERSTAND
        try:
            self.spool.put(key, items, pixels)
        except OSError:
            self._count(why="out of resources")
            log.error("C-STORE refused: cannot write the spool (disk full?)")
            return OUT_OF_RESOURCES
        if self._links is not None:
            with self._links_lock:
                self._links.put(self.source, items.case.key, str(ds.StudyInstanceUID))
        self._count("spooled")
        return SUCCESS

    # ------------------------------------------------------------------ ingest loop
    def _run_loop(self) -> None:
        next_round = 0.0  # replay a spool left by a killed listener at once
        while not self._stop.is_set():
            wait = max(0.0, next_round - time.monotonic())
            self._wake.wait(wait)
            self._wake.clear()
            try:
                self.ingest_round(until_stopped=True)
            except Exception:  # keep receiving; the entries stay in the spool for the next round
                log.exception("ingest round failed; its entries stay spooled")
            next_round = time.monotonic() + self.config.index_every

    def ingest_round(self, *, until_stopped: bool = False) -> int:
        """Ingest and index the spool, oldest entries first, ``config.batch`` at a time: each batch is
        published (indexed) before the next is rendered, so a long push becomes searchable as it arrives.
        Runs until the spool is empty (``until_stopped``: or ``stop()`` was called). Returns entries ingested."""
        total = 0
        while not (until_stopped and self._stop.is_set()):
            with self._lock:
                entries = self.spool.entries()
                if not entries:
                    break
                total += self._ingest_batch(entries[: self.config.batch] if self.config.batch > 0 else entries)
        return total

    def _ingest_batch(self, entries: list[Path]) -> int:
        """Render, ingest ``entries`` in one transaction, delete them, then index (the caller holds the lock)."""
        from indexer.ingest import ingest_items

        t0 = time.perf_counter()
        inodes = {p: _inode(p) for p in entries}  # a re-push during the round replaces a file: keep that one
        studies: dict[str, StudyItems] = {}
        from concurrent.futures import ThreadPoolExecutor

        # render on every core: PNG encoding and the numpy window run without the GIL; one entry's
        # pixels per thread in memory at a time
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            loaded = list(pool.map(self._load_and_render, entries))
        stages = {"render": time.perf_counter() - t0}
        for p, it in zip(entries, loaded, strict=True):
            if it is None:
                log.error("spool entry %s is unreadable; moved aside", p.name)
                p.rename(p.with_suffix(".bad"))
                continue
            s = studies.setdefault(it.case.key, StudyItems(case=it.case)) if it.case else None
            if s is not None:
                s.images.extend(it.images)
                s.skipped.extend(it.skipped)
                for k, v in it.sections.items():
                    s.sections[k] = f"{s.sections[k]}\n{v}" if k in s.sections and v not in s.sections[k] else v
        for st in studies.values():
            st.written = [Path(im.path) for im in st.images]
            st.sync_files()  # the display images are durable before the catalog names them
        stages["fsync"] = time.perf_counter() - t0 - sum(stages.values())
        cat = Catalog.open(self.paths.catalog)
        try:
            with cat.atomic():
                for st in studies.values():
                    earlier = self._series_of(cat, st)
                    items = st.items()
                    if st.sections:  # keep report text already stored for the study
                        items[0] = _merge_sections(cat, items[0])
                    ingest_items(cat, items, path=f"listen:{self.config.ae_title}", layout="c-store",
                                 imaging=self.imaging, chunk=1 << 30)  # fmt: skip
                    _relink(cat, st, earlier)
            for p in entries:
                if _inode(p) == inodes[p]:
                    p.unlink(missing_ok=True)
            stages["store"] = time.perf_counter() - t0 - sum(stages.values())
            if self.index is not None:
                self.index(cat)
                self.stats.last_indexed_at = time.time()
                stages["index"] = time.perf_counter() - t0 - sum(stages.values())
        finally:
            cat.close()
        self.stats.last_round_stages = stages
        for k, v in stages.items():
            self.stats.stage_seconds[k] = self.stats.stage_seconds.get(k, 0.0) + v
        self.stats.ingested += len(entries)
        self.stats.rounds += 1
        self.stats.last_round_seconds = time.perf_counter() - t0
        log.info("ingested %d spooled instances in %.2f s", len(entries), self.stats.last_round_seconds)
        return len(entries)

    def _load_and_render(self, path: Path) -> StudyItems | None:
        """A spool entry's items, its display PNG written; None when the entry cannot be read."""
        try:
            entry = Spool.load(path)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None
        if entry.pixels is not None and entry.items.images:
            self._render(entry)
        return entry.items

    def _render(self, entry: SpoolEntry) -> None:
        """Write the display PNG of a spooled image; pixels that do not render make it a skip (logged)."""
        from medsearch.errors import MedsearchError
        from medsearch.records import Skipped

        im = entry.items.images[0]
        name = f"{self.source}:{im.key[:12]}"
        try:
            render_payload(entry.transfer_syntax or "", entry.pixels or b"", Path(im.path), name, self.imaging)
        except MedsearchError as e:
            entry.items.images = []
            entry.items.skipped.append(Skipped(name, e.message.removeprefix(f"{name}: ")))
            log.warning("received instance %s not rendered: %s", name, e.message)

    def _series_of(self, cat: Catalog, st: StudyItems) -> dict[str, list[tuple[int, str, dict, str]]]:
        """Give ``st`` one series record per series of its new images, over the slices earlier rounds
        stored and the new ones; returns the earlier slices (image id, key, meta, status) per series."""
        from medsearch.catalog.pacs import series_slices

        by_series: dict[str, list[ImageRecord]] = {}
        for im in st.images:
            if im.meta.get("series_key"):
                by_series.setdefault(str(im.meta["series_key"]), []).append(im)
        earlier: dict[str, list[tuple[int, str, dict, str]]] = {}
        for skey, ims in by_series.items():
            new = {im.key for im in ims}
            old = [r for r in series_slices(cat, self.source, st.case.key, skey) if r[1] not in new] if st.case else []
            earlier[skey] = old
            slices = [(k, m) for _, k, m, _ in old] + [(im.key, im.meta) for im in ims]
            st.series.append(received_series(self.source, st.case.key if st.case else "", skey, slices))
        return earlier

    def stop(self, drain: bool = True) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join(timeout=60)
        if drain:
            self.ingest_round()
        if self._links is not None:
            self._links.close()
            self._links = None

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _relink(cat: Catalog, st: StudyItems, earlier: dict[str, list[tuple[int, str, dict, str]]]) -> None:
    """Slices stored by earlier rounds take their place in the series as it is now (new slices may sort between)."""
    if st.case is None:
        return
    case_id = cat.case_id_for_key(st.case.key, st.case.source)
    for rec in st.series:
        old = earlier.get(rec.key) or []
        if case_id is None or not old:
            continue
        refs = {r.key: r for r in rec.slices}
        series_id, _ = cat.upsert_series(rec, case_id)
        cat.link_slices(series_id, [(iid, refs[k], status) for iid, k, _, status in old if k in refs])


def _fields(record: Any) -> dict[str, Any]:
    """A record's fields for JSON (shallow: their values are plain JSON types; ``asdict`` deep-copies)."""
    return dict(record.__dict__)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _no_delay(event: Any) -> None:
    """TCP_NODELAY on each accepted connection: a C-STORE response never waits for the peer's delayed ACK."""
    import socket

    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket (or already closed): nothing to tune
        pass


def _merge_sections(cat: Catalog, case: CaseRecord) -> CaseRecord:
    from dataclasses import replace

    from medsearch.errors import NotFound

    try:
        have = cat.get_case(f"{case.source}:{case.key}").sections
    except NotFound:
        return case
    return replace(case, sections={**have, **case.sections})


def _instance_key(ds: Any, salt: str) -> str:
    from medsearch.deid import safe_metadata

    return str(safe_metadata(ds, salt).get("instance_key") or "sr")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip()) or "_"


def _sop_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(uid).name or uid
    except Exception:
        return uid


# Every transfer syntax pydicom can decode (compressed ones need the `dicom` extra's decoders).
ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]  # fmt: skip


def serve_forever(listener: Listener, *, on_tick: Callable[[ListenStats], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop receiving and ingest what is spooled."""
    import signal

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listener.start()
    try:
        while not done.wait(5.0):
            if on_tick:
                on_tick(listener.stats)
    finally:
        listener.stop()
    os.sync()
