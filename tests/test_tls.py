"""TLS and keys: `medsearch serve` over https with a certificate made here (openssl), plain http beyond
loopback refused, key rotation with an overlap, and a key revoked while its requests are in flight.

The server is the real CLI in a subprocess on a free loopback port; clients are httpx over TLS
that trust only the test certificate.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from serving import free_port, server_process
from typer.testing import CliRunner

from api.keys import KeyStore, parse_duration
from cli.main import app
from medsearch.audit import verify
from medsearch.errors import InvalidInput, NotFound

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made now."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=medsearch-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)  # fmt: skip
    return crt, key


@pytest.fixture(scope="module")
def home(small_home, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tls-home") / "home"
    shutil.copytree(small_home, dst)
    return dst


@pytest.fixture(scope="module")
def server(home, cert):
    """`medsearch serve` over https with keys required; yields (base url, ssl context, store, admin key)."""
    store = KeyStore(home / "api_keys.json")
    _, admin = store.add("admin", "operator")
    port = free_port()
    crt, key = cert
    cmd = [sys.executable, "-m", "cli.main", "serve", "--home", str(home), "--port", str(port), "--device", "cpu",
           "--auth", "required", "--rate-limit", "0", "--watch", "0", "--ssl-certfile", str(crt),
           "--ssl-keyfile", str(key), "--log-level", "warning"]  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(crt))
    base = f"https://127.0.0.1:{port}"
    ready = lambda: httpx.get(f"{base}/v1/health", verify=ctx, timeout=2).status_code == 200  # noqa: E731
    with server_process(cmd, home.parent / "server.log", ready, timeout=240):
        yield base, ctx, store, admin


def test_https_health_with_the_test_certificate(server, cert):
    base, ctx, _, _ = server
    r = httpx.get(f"{base}/v1/health", verify=ctx, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["auth_required"] is True
    port = int(base.rsplit(":", 1)[1])
    presented = ssl.get_server_certificate(("127.0.0.1", port))
    assert ssl.PEM_cert_to_DER_cert(presented) == ssl.PEM_cert_to_DER_cert(cert[0].read_text())
    with pytest.raises(httpx.HTTPError):  # plain http to the TLS port gets no answer
        httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate refuses it
        httpx.get(f"{base}/v1/health", timeout=5)


def test_plain_http_beyond_loopback_is_refused(home, cert, tmp_path):
    keys = tmp_path / "keys.json"
    KeyStore(keys).add("admin", "ops")  # keys are there: the refusal below is about TLS
    r = runner.invoke(app, ["serve", "--home", str(home), "--host", "0.0.0.0", "--port", str(free_port()),
                            "--keys-file", str(keys)])  # fmt: skip
    assert r.exit_code == 2 and "refusing to serve plain http on 0.0.0.0" in r.output, r.output
    assert "--ssl-certfile" in r.output and "--insecure" in r.output
    r = runner.invoke(app, ["serve", "--home", str(home), "--host", "::", "--keys-file", str(keys)])
    assert r.exit_code == 2 and "refusing to serve plain http on ::" in r.output, r.output
    from cli.commands.server import _tls_options

    assert _tls_options("0.0.0.0", None, None, True) == {}  # --insecure: plain http allowed (a TLS proxy in front)
    assert _tls_options("127.0.0.1", None, None, False) == {}  # loopback needs no TLS
    assert _tls_options("0.0.0.0", cert[0], cert[1], False) == {"ssl_certfile": str(cert[0]),
                                                                 "ssl_keyfile": str(cert[1])}  # fmt: skip
    r = runner.invoke(app, ["serve", "--home", str(home), "--ssl-certfile", str(cert[0])])
    assert r.exit_code == 2 and "both --ssl-certfile and --ssl-keyfile" in r.output
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    r = runner.invoke(app, ["serve", "--home", str(home), "--ssl-certfile", str(cert[0]), "--ssl-keyfile", str(bad)])
    assert r.exit_code == 2 and "cannot load the TLS certificate" in r.output, r.output
    r = runner.invoke(app, ["serve", "--home", str(home), "--ssl-certfile", str(bad), "--ssl-keyfile", str(cert[1])])
    assert r.exit_code == 2 and "cannot load the TLS certificate" in r.output, r.output


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def test_rotation_overlap_then_expiry(tmp_path):
    clock = Clock()
    store = KeyStore(tmp_path / "keys.json", clock=clock)
    info, old = store.add("read", "ris")
    rotated, new = store.rotate(info.id, overlap=timedelta(hours=1))
    assert rotated.id == info.id and rotated.name == "ris" and rotated.scope == "read" and new != old
    assert new not in store.path.read_text() and old not in store.path.read_text()
    assert "previous_hash" not in rotated.public() and "hash" not in rotated.public()
    other = KeyStore(store.path, clock=clock)  # another process (a server) reading the same file
    assert other.verify(new).id == info.id and other.verify(old).id == info.id  # inside the overlap
    clock.now += timedelta(minutes=59)
    assert other.verify(old) is not None
    clock.now += timedelta(minutes=2)
    assert other.verify(old) is None and other.verify(new) is not None  # the old secret expired
    _, newer = store.rotate(info.id, overlap=timedelta(hours=1))
    assert other.verify(newer) and other.verify(new) and other.verify(old) is None
    _, newest = store.rotate(info.id, overlap=timedelta(hours=1))  # again inside the overlap
    assert other.verify(newest) and other.verify(newer) and other.verify(new) is None  # one previous at a time
    store.revoke(info.id)
    assert other.verify(newest) is None and other.verify(newer) is None  # revoking ends both
    with pytest.raises(InvalidInput, match="revoked"):
        store.rotate(info.id)
    with pytest.raises(NotFound):
        store.rotate("ffffffff")
    with pytest.raises(InvalidInput, match="negative"):
        store.rotate(store.add("read")[0].id, overlap=timedelta(seconds=-1))


def test_parse_duration():
    assert parse_duration("24h") == timedelta(hours=24) and parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("15m") == timedelta(minutes=15) and parse_duration("7d") == timedelta(days=7)
    assert parse_duration("0") == timedelta(0) and parse_duration("1.5h") == timedelta(minutes=90)
    for bad in ("", "a day", "-1h", "5w"):
        with pytest.raises(InvalidInput):
            parse_duration(bad)


def test_cli_rotate(tmp_path):
    keys = tmp_path / "keys.json"
    r = runner.invoke(app, ["keys", "add", "--keys-file", str(keys), "--json"])
    first = json.loads(r.output)
    r = runner.invoke(app, ["keys", "rotate", first["id"], "--keys-file", str(keys), "--overlap", "0", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["id"] == first["id"] and out["key"] != first["key"] and out["previous_expires_at"] is None
    store = KeyStore(keys)
    assert store.verify(out["key"]) and store.verify(first["key"]) is None  # no overlap: the old one is gone now
    r = runner.invoke(app, ["keys", "rotate", first["id"], "--keys-file", str(keys), "--overlap", "2h"])
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith(f"msk_{first['id']}_")
    r = runner.invoke(app, ["keys", "list", "--keys-file", str(keys)])
    assert "rotated" in r.output and "old secret until" in r.output, r.output
    r = runner.invoke(app, ["keys", "rotate", first["id"], "--keys-file", str(keys), "--overlap", "soon"])
    assert r.exit_code == 2 and "cannot read the duration" in r.output


def _search(base: str, ctx: ssl.SSLContext, key: str, q: str = "pneumonia") -> int:
    r = httpx.post(f"{base}/v1/search/text", json={"query": q, "k": 5}, headers={"Authorization": f"Bearer {key}"},
                   verify=ctx, timeout=60)  # fmt: skip
    return r.status_code


def test_rotation_against_the_running_server(server):
    base, ctx, store, _ = server
    info, old = store.add("read", "rotating-client")
    assert _search(base, ctx, old) == 200
    _, new = store.rotate(info.id, overlap=timedelta(hours=24))
    assert _search(base, ctx, new) == 200 and _search(base, ctx, old) == 200  # both during the overlap
    _, newer = store.rotate(info.id, overlap=timedelta(0))
    assert _search(base, ctx, newer) == 200
    assert _search(base, ctx, new) == 401 and _search(base, ctx, old) == 401  # ended at once


def test_key_revoked_while_its_requests_are_in_flight(server, home):
    base, ctx, store, _ = server
    info, key = store.add("read", "busy-client")
    results: list[tuple[float, float, int]] = []  # (start, end, status)
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(verify=ctx, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = c.post(f"{base}/v1/search/text", json={"query": f"lung opacity {i}", "k": 10}).status_code
                except httpx.HTTPError:
                    status = -1
                with lock:
                    results.append((t0, time.perf_counter(), status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while sum(1 for r in results if r[2] == 200) < 8:
        time.sleep(0.05)
    t_revoke = time.perf_counter()
    KeyStore(home / "api_keys.json").revoke(info.id)  # as `medsearch keys revoke` does, from another process
    t_done = time.perf_counter()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    statuses = {s for _, _, s in results}
    assert statuses <= {200, 401}, results  # no 5xx, no dropped connection
    in_flight = [r for r in results if r[0] < t_revoke < r[1]]
    assert in_flight and all(s in (200, 401) for _, _, s in in_flight)
    after = [s for t0, _, s in results if t0 > t_done]
    assert after and set(after) == {401}  # every request that started after the revocation is refused
    assert any(s == 200 for t0, _, s in results if t0 < t_revoke)
    v = verify(home / "audit.log")  # the server's audit log stayed one chain throughout
    assert v.ok, v.problem
