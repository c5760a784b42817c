"""A small DICOM Upper Layer acceptor for C-STORE and C-ECHO: one blocking thread per association.

    accept ─► A-ASSOCIATE-RQ ─► AC (presentation contexts: storage + verification) ─► P-DATA-TF ...
              per message: command set (implicit VR LE) [+ data set fragments] ─► on_store(...) ─► C-STORE-RSP
              A-RELEASE-RQ ─► RP, close;  A-ABORT or a protocol error ─► close (abort)

Why not pynetdicom's server: its reactor threads poll queues with 1 ms sleeps and it validates and
copies every PDU in Python; a no-op C-STORE handler cost ~6 CPU ms per 512 px instance there, which
caps one process (one GIL) below the listener's target. Here a thread blocks in ``recv_into`` on its
socket and a whole PDU is read in a few system calls (benchmarks/results/pacs_bench_listen.md).

What it implements of PS3.8/PS3.7: association negotiation (application context, presentation
contexts with the first proposed transfer syntax we support, maximum PDU length; role selection,
asynchronous operations and extended negotiation items are not answered, so the defaults apply: the
peer is the SCU, one operation at a time), P-DATA-TF with fragmented command and data sets, C-STORE
and C-ECHO, A-RELEASE and A-ABORT. Deflated Explicit VR Little Endian data sets are inflated here.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

log = logging.getLogger("medsearch.listen")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATASET = 0x0101
MAX_PDU_CAP = 64 << 20  # a peer's PDU larger than this is refused (abort) even when we announce "unlimited"
IMPLEMENTATION_VERSION = b"MEDSEARCH_LISTEN"  # 16 bytes at most (PS3.7 D.3.3.2)


@dataclass(frozen=True)
class StoreRequest:
    """One received C-STORE: the data set's bytes in ``transfer_syntax`` (inflated when it was deflated)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes
    calling_ae: str


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol: the association is aborted."""


class StoreServer:
    """Accepts associations on ``(host, port)`` and calls ``on_store`` for each C-STORE (in the association's
    thread; it returns the DIMSE status). ``abstract_syntaxes`` are the SOP classes accepted besides
    Verification; ``transfer_syntaxes`` those we decode, in no preferred order (the peer's order wins)."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        ae_title: str,
        abstract_syntaxes: Iterable[str],
        transfer_syntaxes: Iterable[str],
        on_store: Callable[[StoreRequest], int],
        max_pdu: int = 0,
        timeout: float = 60.0,
        implementation_uid: str = "",
        max_associations: int = 32,
    ) -> None:
        self.ae_title = ae_title
        self.abstract = set(abstract_syntaxes) | {VERIFICATION}
        self.transfer = set(transfer_syntaxes)
        self.on_store = on_store
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.implementation_uid = implementation_uid
        self.max_associations = max_associations  # more at once are rejected (transient, local limit exceeded)
        self._sock = socket.create_server(address, backlog=64)
        self.server_address = self._sock.getsockname()
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accept: threading.Thread | None = None

    def start(self) -> StoreServer:
        self._accept = threading.Thread(target=self._serve, name="medsearch-listen-accept", daemon=True)
        self._accept.start()
        return self

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                if not sel.select(timeout=0.2):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError:  # closed by shutdown()
                    break
                with self._lock:
                    busy = len(self._conns) >= self.max_associations
                t = threading.Thread(target=self._run, args=(conn, busy), name="medsearch-listen-assoc", daemon=True)
                with self._lock:
                    self._threads.add(t)
                    self._conns.add(conn)
                t.start()
        finally:
            sel.close()

    def _run(self, conn: socket.socket, busy: bool = False) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a response never waits for a delayed ACK
            conn.settimeout(self.timeout)
            _Association(self, conn).run(busy)
        except (OSError, ProtocolError) as e:
            log.warning("association aborted: %s", e if isinstance(e, ProtocolError) else type(e).__name__)
            _abort(conn)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def shutdown(self, wait: float = 30.0) -> None:
        """Stop accepting; let associations finish the message in hand, then close them."""
        self._stop.set()
        self._sock.close()
        if self._accept is not None:
            self._accept.join(timeout=5)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RD)  # a thread blocked in recv wakes; one in on_store finishes it first
            except OSError:
                pass
        for t in threads:
            t.join(timeout=wait)


class _Association:
    def __init__(self, server: StoreServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: context id -> (abstract syntax, transfer syntax)
        self.peer_max = 0
        self.calling_ae = ""

    # -------------------------------------------------------------- PDUs
    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.conn.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionResetError("peer closed the connection")
            got += k
        return buf

    def _read_pdu(self, first: bool = False) -> tuple[int, bytearray] | None:
        head = bytearray()
        while len(head) < 6:
            chunk = self.conn.recv(6 - len(head))
            if not chunk:
                if first or not head:
                    return None  # closed between PDUs
                raise ConnectionResetError("peer closed the connection inside a PDU header")
            head += chunk
        kind, _, length = struct.unpack(">BBL", head)
        if kind == 0x04:
            cap = min(self.server.max_pdu + 6, MAX_PDU_CAP) if self.server.max_pdu else MAX_PDU_CAP
        else:
            cap = 1 << 20  # association, release and abort PDUs are small
        if kind not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07) or length > cap:
            raise ProtocolError(f"PDU type 0x{kind:02x} of {length} bytes")
        return kind, self._recv_exact(length)

    def _send(self, kind: int, body: bytes) -> None:
        self.conn.sendall(struct.pack(">BBL", kind, 0, len(body)) + body)

    # -------------------------------------------------------------- association
    def run(self, busy: bool = False) -> None:
        pdu = self._read_pdu(first=True)
        if pdu is None:
            return
        kind, body = pdu
        if kind != 0x01:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02x}")
        if busy:
            log.warning("association rejected: %d associations are open already", self.server.max_associations)
            self._send(0x03, bytes([0, 2, 3, 2]))  # rejected-transient, presentation provider: local limit exceeded
            return
        if not self._negotiate(body):
            return
        command = bytearray()
        dataset: list[memoryview] = []  # fragments (views into their PDUs), joined once when the last arrives
        fields: dict[int, bytes] | None = None
        while True:
            pdu = self._read_pdu()
            if pdu is None:
                return
            kind, body = pdu
            if kind == 0x05:  # A-RELEASE-RQ
                self._send(0x06, b"\0\0\0\0")
                return
            if kind == 0x07:  # A-ABORT
                return
            if kind != 0x04:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02x} in an association")
            for ctx, control, frag in _pdvs(body):
                if ctx not in self.contexts:
                    raise ProtocolError(f"presentation context {ctx} was not accepted")
                if control & 1:  # command fragment
                    command += frag
                    if control & 2:
                        fields = _elements(bytes(command))
                        command.clear()
                        if _us(fields, 0x0800) == NO_DATASET:
                            self._dispatch(ctx, fields, None)
                            fields = None
                else:
                    if fields is None:
                        raise ProtocolError("a data set fragment before its command")
                    dataset.append(frag)
                    if control & 2:
                        self._dispatch(ctx, fields, b"".join(dataset))
                        fields, dataset = None, []

    def _negotiate(self, body: bytearray) -> bool:
        if len(body) < 68:
            raise ProtocolError("A-ASSOCIATE-RQ too short")
        called, calling = bytes(body[4:20]), bytes(body[20:36])
        self.calling_ae = calling.decode("ascii", "replace").strip()
        app_ctx, proposed = "", []
        for kind, data in _items(body, 68):
            if kind == 0x10:
                app_ctx = _uid(data)
            elif kind == 0x20 and len(data) >= 4:
                abstract, transfers = "", []
                for sub, val in _items(data, 4):
                    if sub == 0x30:
                        abstract = _uid(val)
                    elif sub == 0x40:
                        transfers.append(_uid(val))
                proposed.append((data[0], abstract, transfers))
            elif kind == 0x50:
                for sub, val in _items(data, 0):
                    if sub == 0x51 and len(val) == 4:
                        (self.peer_max,) = struct.unpack(">L", val)
        if not struct.unpack(">H", body[0:2])[0] & 1:
            self._send(0x03, bytes([0, 1, 2, 2]))  # rejected-permanent, ACSE provider: protocol version
            return False
        if app_ctx != APPLICATION_CONTEXT:
            self._send(0x03, bytes([0, 1, 1, 2]))  # rejected-permanent, service user: application context
            return False
        items = [_item(0x10, APPLICATION_CONTEXT.encode())]
        for ctx, abstract, transfers in proposed:
            chosen = next((t for t in transfers if t in self.server.transfer), None)
            if abstract not in self.server.abstract:
                result = 3  # abstract syntax not supported
            elif chosen is None:
                result = 4  # transfer syntaxes not supported
            else:
                result = 0
                self.contexts[ctx] = (abstract, chosen)
            ts = chosen or (transfers[0] if transfers else IMPLICIT_LE)
            items.append(_item(0x21, bytes([ctx, 0, result, 0]) + _item(0x40, ts.encode())))
        user = [_item(0x51, struct.pack(">L", self.server.max_pdu)), _item(0x52, self.server.implementation_uid.encode()),
                _item(0x55, IMPLEMENTATION_VERSION)]  # fmt: skip
        items.append(_item(0x50, b"".join(user)))
        self._send(0x02, b"\0\x01\0\0" + called + calling + bytes(32) + b"".join(items))
        return True

    # -------------------------------------------------------------- DIMSE
    def _dispatch(self, ctx: int, fields: dict[int, bytes], dataset: bytes | None) -> None:
        field = _us(fields, 0x0100)
        msg_id = _us(fields, 0x0110)
        sop_class = _uid(fields.get(0x0002, b""))
        if field == C_ECHO_RQ:
            self._respond(ctx, C_ECHO_RSP, msg_id, sop_class, None, 0x0000)
        elif field == C_STORE_RQ:
            instance = _uid(fields.get(0x1000, b""))
            abstract, ts = self.contexts[ctx]
            if dataset is None:
                status = 0xC000  # a C-STORE without a data set: cannot understand
            else:
                data = dataset
                if ts == DEFLATED:
                    try:
                        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
                    except zlib.error:
                        data = b""
                req = StoreRequest(sop_class or abstract, instance, ts, data, self.calling_ae)
                try:
                    status = self.server.on_store(req)
                except Exception as e:  # a bug in the handler: the sender hears a failure, the association lives
                    log.error("C-STORE handler failed (%s); answered 0x0110", type(e).__name__)
                    status = 0x0110  # processing failure
            self._respond(ctx, C_STORE_RSP, msg_id, sop_class, instance, status)
        elif field == C_CANCEL_RQ:
            return  # nothing in progress to cancel: C-STOREs are answered one at a time
        else:
            raise ProtocolError(f"DIMSE command 0x{field:04x} is not served here")

    def _respond(self, ctx: int, field: int, msg_id: int, sop_class: str, instance: str | None, status: int) -> None:
        els = [(0x0002, _pad(sop_class.encode())), (0x0100, struct.pack("<H", field)),
               (0x0120, struct.pack("<H", msg_id)), (0x0800, struct.pack("<H", NO_DATASET)),
               (0x0900, struct.pack("<H", status))]  # fmt: skip
        if instance is not None:
            els.append((0x1000, _pad(instance.encode())))
        body = b"".join(struct.pack("<HHL", 0, tag, len(v)) + v for tag, v in els)
        command = struct.pack("<HHLL", 0, 0, 4, len(body)) + body  # (0000,0000) CommandGroupLength first
        pdv = struct.pack(">LBB", len(command) + 2, ctx, 0x03) + command  # command, last fragment
        self._send(0x04, pdv)


# ------------------------------------------------------------------ encoding helpers
def _items(data: bytes | bytearray, start: int):
    """(item type, value) of the UL items from ``start``: type (1), reserved (1), length (2, big endian)."""
    i = start
    while i + 4 <= len(data):
        kind, length = data[i], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if i + 4 + length > len(data):
            raise ProtocolError("an association item runs past its PDU")
        yield kind, data[i + 4 : i + 4 + length]
        i += 4 + length


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _pdvs(body: bytearray):
    """(context id, message control header, fragment) of each PDV item of a P-DATA-TF PDU."""
    view, i = memoryview(body), 0
    while i < len(body):
        if i + 6 > len(body):
            raise ProtocolError("a PDV item header runs past its PDU")
        (length,) = struct.unpack(">L", view[i : i + 4])
        if length < 2 or i + 4 + length > len(body):
            raise ProtocolError("a PDV item runs past its PDU")
        yield body[i + 4], body[i + 5], view[i + 6 : i + 4 + length]
        i += 4 + length


def _elements(command: bytes) -> dict[int, bytes]:
    """Element number -> value of a command set (group 0000, implicit VR little endian)."""
    out, i = {}, 0
    while i + 8 <= len(command):
        group, elem, length = struct.unpack("<HHL", command[i : i + 8])
        if group != 0 or i + 8 + length > len(command):
            raise ProtocolError("malformed command set")
        out[elem] = command[i + 8 : i + 8 + length]
        i += 8 + length
    if 0x0100 not in out:
        raise ProtocolError("a command set without CommandField")
    return out


def _us(fields: dict[int, bytes], elem: int) -> int:
    v = fields.get(elem, b"")
    return struct.unpack("<H", v[:2])[0] if len(v) >= 2 else -1


def _uid(v: bytes | bytearray | memoryview) -> str:
    return bytes(v).decode("ascii", "replace").rstrip("\0 ")


def _pad(v: bytes) -> bytes:
    return v + b"\0" if len(v) % 2 else v


# ------------------------------------------------------------------ what the listener reads of a request
def decode_dataset(req: StoreRequest) -> Any:
    """The request's data set as a pydicom Dataset (elements decoded when read), with the file meta a
    receiver knows: transfer syntax, SOP class and instance. Raises for bytes that do not parse."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    ts = UID(req.transfer_syntax)
    ds = read_dataset(DicomBytesIO(req.dataset), ts.is_implicit_VR, ts.is_little_endian)  # bytes: shared, not copied
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = req.sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = req.sop_instance_uid
    return ds


_LONG_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))


def pixel_slices(ds: Any, buf: bytes) -> list[tuple[int, int]] | None:
    """(start, end) in ``buf`` of each ``PIXEL_KEYWORDS`` element of ``ds`` as it was received, in tag
    order: joined, they are ``pixel_payload``'s data set without re-encoding it. None when an element is
    not a raw one read from ``buf`` (a sequence, say); the caller then re-encodes with ``pixel_payload``."""
    from pydicom.dataelem import RawDataElement

    out = []
    for tag in _pixel_tags():
        if tag not in ds:
            continue
        e = ds.get_item(tag, keep_deferred=True)
        if not isinstance(e, RawDataElement) or e.value is None:
            return None
        head = 8 if e.is_implicit_VR or e.VR not in _LONG_VRS else 12
        start = e.value_tell - head
        end = e.value_tell + (len(e.value) + 8 if e.length == 0xFFFFFFFF else e.length)  # + sequence delimiter
        if start < 0 or end > len(buf) or struct.unpack_from("<HH" if e.is_little_endian else ">HH", buf, start) != (
            tag >> 16, tag & 0xFFFF):  # fmt: skip
            return None
        out.append((start, end))
    return out


@cache
def _pixel_tags() -> tuple[int, ...]:
    from pydicom.datadict import tag_for_keyword

    from .sources.instances import PIXEL_KEYWORDS

    return tuple(sorted(t for t in (tag_for_keyword(k) for k in PIXEL_KEYWORDS) if t is not None))


def _abort(conn: socket.socket) -> None:
    try:
        conn.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 0))  # A-ABORT, source: service provider
    except OSError:
        pass
