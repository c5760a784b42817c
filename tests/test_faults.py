"""Faults against a real `medsearch serve` (the CLI in a subprocess on a free loopback port):

- 1,000 concurrent slow clients (sockets that open and trickle header or body bytes) take no
  threads and normal requests still answer; a socket slower than --header-timeout is closed;
  beyond --limit-concurrency a request gets 503 at once, and service comes back when they go;
- a client that disconnects in the middle of an upload leaves no temp file (on disk or open)
  and the server keeps serving;
- a key revoked while its requests (text, image upload, draft) are in flight: every request that
  starts after the revocation gets 401, none gets a 5xx.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving import free_port, server_process

from api.keys import KeyStore

REPO = Path(__file__).resolve().parents[1]
LIMIT = 1200  # --limit-concurrency: above the 1,000 slow clients plus the normal ones
HEADER_TIMEOUT = 20  # long enough for the normal requests below on a busy host
pytestmark = pytest.mark.slow


class Server:
    def __init__(self, proc: subprocess.Popen, base: str, port: int, spool: Path, home: Path) -> None:
        self.proc, self.base, self.port, self.spool, self.home = proc, base, port, spool, home

    def threads(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads line")

    def spool_fds(self) -> list[str]:
        """Open descriptors of the server that point into its temp folder (spooled uploads)."""
        out = []
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(self.spool)):
                out.append(target)
        return out

    def search(self, q: str = "brain infarct", key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.base}/v1/search/text", json={"query": q, "k": 5}, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server(small_home, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    home = d / "home"
    shutil.copytree(small_home, home)
    spool = d / "tmp"  # the server's TMPDIR: where spooled uploads would land
    spool.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "serve", "--home", str(home), "--port", str(port), "--device", "cpu",
           "--rate-limit", "0", "--watch", "0", "--log-level", "warning", "--limit-concurrency", str(LIMIT),
           "--header-timeout", str(HEADER_TIMEOUT), "--timeout-keep-alive", "5", "--backlog", "2048"]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(spool), "PYTHONPATH": str(REPO)}
    base = f"http://127.0.0.1:{port}"
    ready = lambda: httpx.get(f"{base}/v1/health", timeout=2).json().get("status") == "ok"  # noqa: E731
    with server_process(cmd, d / "server.log", ready, timeout=300, env=env) as proc:
        srv = Server(proc, base, port, spool, home)
        assert srv.search().status_code == 200  # warm: the first request loads lazily built parts
        yield srv


def _png_bytes(n: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + os.urandom(n - 8)


def _multipart_head(port: int, length: int, boundary: str = "soakb0undary") -> bytes:
    return (f"POST /v1/search/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()  # fmt: skip


def _open(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setblocking(False)
        out.append(s)
    return out


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1024) == b""
    except BlockingIOError:
        return False  # still open, nothing to read
    except ConnectionResetError:
        return True


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def test_1000_slow_clients_take_no_threads_and_normal_requests_answer(server):
    threads_before = server.threads()
    t_open = time.perf_counter()
    header_slow = _open(server.port, 700)  # trickle a request head, a byte at a time, never finishing it
    body_slow = _open(server.port, 300)  # a complete head, then an upload body a few bytes a second
    try:
        for s in header_slow:
            s.send(b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for s in body_slow:
            s.send(_multipart_head(server.port, 5_000_000))
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                for s in header_slow + body_slow:
                    try:
                        s.send(b"a")
                    except OSError:
                        pass  # closed by the server: expected for the header tricklers
                stop.wait(0.5)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        time.sleep(1.0)
        statuses: list[int] = []
        lock = threading.Lock()

        def normal(i: int) -> None:
            for j in range(3):
                r = server.search(f"lung opacity {i} {j}")
                with lock:
                    statuses.append(r.status_code)
                    first_ok.append(time.perf_counter() - t_open)

        first_ok: list[float] = []
        workers = [threading.Thread(target=normal, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        threads_during = server.threads()
        for w in workers:
            w.join(timeout=180)
        assert statuses == [200] * 12, statuses
        assert min(first_ok) < HEADER_TIMEOUT  # answered while all 1,000 slow sockets were open
        # no thread per connection: the 1,000 sockets wait in the event loop (anyio's pool is 40 threads)
        assert threads_during < threads_before + 60, (threads_before, threads_during)
        assert server.threads() < threads_before + 60
        # past the header timeout the server closes the header tricklers, never a request whose head arrived
        time.sleep(max(0.0, HEADER_TIMEOUT + 3 - (time.perf_counter() - t_open)))
        closed = sum(_closed_by_server(s) for s in header_slow)
        assert closed == len(header_slow), f"{closed} of {len(header_slow)} slow-header sockets closed"
        assert not any(_closed_by_server(s) for s in body_slow)  # uploads in progress are left alone
        stop.set()
        t.join(timeout=10)
    finally:
        _close(header_slow + body_slow)
    assert server.search().status_code == 200
    assert server.threads() < threads_before + 60


def test_over_the_connection_limit_is_503_then_service_returns(server):
    idle = _open(server.port, LIMIT + 20)  # silent sockets: every slot taken
    try:
        time.sleep(1.0)
        t0 = time.perf_counter()
        r = server.search()
        assert r.status_code == 503, r.text  # refused at once, not queued
        assert time.perf_counter() - t0 < 30
        assert r.headers.get("connection") == "close"
        # the silent sockets are closed after --header-timeout, freeing the slots
        deadline = time.time() + HEADER_TIMEOUT + 30
        while time.time() < deadline and not all(_closed_by_server(s) for s in idle[:50]):
            time.sleep(0.5)
        assert all(_closed_by_server(s) for s in idle[:50])
        r = server.search()
        assert r.status_code == 200, r.text
    finally:
        _close(idle)


def test_disconnect_mid_upload_leaves_no_temp_file(server):
    size = 6_000_000  # above starlette's 1 MiB spool size: the part goes to a temp file
    tail = b"\r\n--soakb0undary--\r\n"
    body = _png_bytes(size)
    head = _multipart_head(server.port, len(body) + len(tail))
    for attempt in range(2):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(head + body[: size // 2])  # half the upload, then the client goes away
        deadline = time.time() + 30
        while time.time() < deadline and not server.spool_fds():
            time.sleep(0.1)
        assert server.spool_fds(), "the half upload never reached a temp file (test would prove nothing)"
        if attempt == 0:
            s.close()  # a clean FIN
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # a reset (RST), as when a client crashes
        deadline = time.time() + 30
        while time.time() < deadline and server.spool_fds():
            time.sleep(0.2)
        assert server.spool_fds() == [], server.spool_fds()
        assert list(server.spool.iterdir()) == []
        assert server.search().status_code == 200  # and the server keeps serving
    # a whole upload of the same size still works (the disconnect handling did not break uploads)
    r = httpx.post(f"{server.base}/v1/search/image", files={"file": ("q.png", body, "image/png")}, timeout=120)
    assert r.status_code in (400, 415), r.text  # random bytes after a PNG signature: refused by name, no 5xx
    deadline = time.time() + 10  # the form's files are closed just after the response is sent
    while time.time() < deadline and server.spool_fds():
        time.sleep(0.1)
    assert server.spool_fds() == [] and list(server.spool.iterdir()) == []


def test_key_revoked_while_its_requests_are_in_flight(server):
    from PIL import Image

    store = KeyStore(server.home / "api_keys.json")
    info, key = store.add("read", "busy-client")
    buf = __import__("io").BytesIO()
    Image.new("L", (192, 192), 90).save(buf, format="PNG")
    png = buf.getvalue()
    results: list[tuple[str, float, float, int]] = []  # (kind, start, end, status)
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        kind = ("text", "image", "draft")[i % 3]
        with httpx.Client(base_url=server.base, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    if kind == "text":
                        r = c.post("/v1/search/text", json={"query": f"mass {i}", "k": 5})
                    elif kind == "image":
                        r = c.post("/v1/search/image", files={"file": ("q.png", png, "image/png")}, data={"k": "5"})
                    else:
                        r = c.post("/v1/drafts", files={"file": ("q.png", png, "image/png")})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                with lock:
                    results.append((kind, t0, time.perf_counter(), status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 240
    while {k for k, _, _, s in list(results) if s == 200} != {"text", "image", "draft"}:
        assert time.time() < deadline, f"not every kind answered 200 before the revocation: {results[-10:]}"
        time.sleep(0.05)
    t_revoke = time.perf_counter()
    store.revoke(info.id)  # as `medsearch keys revoke` does, from another process's file
    t_done = time.perf_counter()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    statuses = {s for *_, s in results}
    assert statuses <= {200, 401}, sorted(results, key=lambda r: r[1])[-20:]  # no 5xx, no dropped connection
    in_flight = [r for r in results if r[1] < t_revoke < r[2]]
    assert in_flight, "no request was in flight at the revocation"
    after = [(k, s) for k, t0, _, s in results if t0 > t_done]
    assert {k for k, _ in after} == {"text", "image", "draft"}, after
    assert {s for _, s in after} == {401}, after  # every request that started after the revocation is refused
    other = KeyStore(store.path).add("read", "other-client")[1]
    assert server.search(key=other).status_code == 200  # other keys keep working
