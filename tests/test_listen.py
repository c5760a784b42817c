"""The C-STORE receiver against real DICOM peers: dcmtk's echoscu/storescu push to it as a modality would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from orthanc import free_port
from pacs_data import ct_series, planted_strings, write_series
from pydicom.uid import generate_uid

from medsearch.catalog import Catalog

pytestmark = [pytest.mark.pacs, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _dcmtk():
    if not shutil.which("storescu"):
        pytest.fail("dcmtk's storescu is not installed: scripts/test.sh installs dcmtk")


def storescu(port: int, files: list[Path], ae: str = "MEDSEARCH") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-v", "-aec", ae, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    Catalog.open(home / "catalog.db").close()
    return home


def test_echo_store_statuses_and_ingest_rounds(tmp_path):
    from indexer.listen import ListenConfig, Listener

    home = _home(tmp_path)
    study = ct_series(6, study_uid=generate_uid(), series_uid=generate_uid())
    files = write_series(study, tmp_path / "in")
    indexed: list[int] = []
    cfg = ListenConfig(port=free_port(), index_every=3600)
    with Listener(home, cfg, index=lambda cat: indexed.append(cat.counts()["images"])) as lis:
        echo = subprocess.run(["echoscu", "-aec", "MEDSEARCH", "127.0.0.1", str(lis.port)], capture_output=True,
                              timeout=30)  # fmt: skip
        assert echo.returncode == 0, echo.stderr
        r = storescu(lis.port, files)
        assert r.returncode == 0, r.stderr
        assert lis.stats.spooled == 6 and len(lis.spool) == 6
        # an object that is not an image nor a text SR: refused with 0x0122, the listener keeps running
        import pydicom
        from pydicom.data import get_testdata_file

        rtplan = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
        rt = tmp_path / "rtplan.dcm"
        rtplan.save_as(rt)
        r = storescu(lis.port, [rt])
        assert "Refused: SOPClassNotSupported" in r.stderr, r.stderr
        assert lis.stats.refused.get("unsupported SOP class") == 1
        # an image whose pixel data is cut short: "cannot understand" (0xC000), the listener keeps running
        bad = study[0].copy()
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        bad.PixelData = bad.PixelData[:100]
        bad_file = tmp_path / "bad.dcm"
        bad.save_as(bad_file, enforce_file_format=True)
        r = storescu(lis.port, [bad_file])
        assert "Error: CannotUnderstand" in r.stderr or "0xc000" in r.stderr.lower(), r.stderr
        assert lis.stats.refused.get("cannot understand") == 1
        # pushing the same study again spools the same entries (keyed by instance), nothing doubles
        assert storescu(lis.port, files).returncode == 0
        assert len(lis.spool) == 6
        assert lis.ingest_round() == 6
        assert indexed == [6] and len(lis.spool) == 0
    cat = Catalog.open(home / "catalog.db")
    assert cat.counts()["images"] == 6 and cat.counts()["cases"] == 1
    text = json.dumps(cat.db.execute("SELECT * FROM images").fetchall()) + json.dumps(
        cat.db.execute("SELECT * FROM cases").fetchall())
    cat.close()
    for planted in planted_strings() + [study[0].StudyInstanceUID] + [d.SOPInstanceUID for d in study]:
        assert planted not in text
    assert not list(home.rglob("*.dcm"))


LISTEN_SCRIPT = """
import sys
from pathlib import Path
from indexer.listen import ListenConfig, Listener, serve_forever
serve_forever(Listener(Path(sys.argv[1]), ListenConfig(port=int(sys.argv[2]), index_every=float(sys.argv[3]))))
"""


def _start(home: Path, port: int, every: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", LISTEN_SCRIPT, str(home), str(port), str(every)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = subprocess.run(["echoscu", "-aec", "MEDSEARCH", "127.0.0.1", str(port)], capture_output=True)
        if r.returncode == 0:
            return p
        if p.poll() is not None:
            raise AssertionError(p.stdout.read().decode())
        time.sleep(0.3)
    p.kill()
    raise AssertionError("listener did not answer C-ECHO within 60 s")


def test_sigkill_after_ack_replays_the_spool_with_nothing_lost_or_doubled(tmp_path):
    home = _home(tmp_path)
    a = write_series(ct_series(5, study_uid=generate_uid(), series_uid=generate_uid()), tmp_path / "a")
    b = write_series(ct_series(4, study_uid=generate_uid(), series_uid=generate_uid(), series_number=3), tmp_path / "b")
    port = free_port()
    p = _start(home, port, every=3600)  # no ingest round before the kill
    try:
        assert storescu(port, a).returncode == 0
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert len(list((home / "spool" / "MEDSEARCH").glob("*.spool"))) == 5  # acknowledged = durably spooled
    p = _start(home, port, every=0.5)  # the restarted listener replays the spool at once
    try:
        assert storescu(port, b + a[:2]).returncode == 0  # new instances plus two already spooled
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cat = Catalog.open(home / "catalog.db", readonly=True)
            n = cat.counts()["images"]
            cat.close()
            if n == 9 and not list((home / "spool" / "MEDSEARCH").glob("*.spool")):
                break
            time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    cat = Catalog.open(home / "catalog.db")
    assert cat.counts()["images"] == 9 and cat.counts()["cases"] == 2
    cat.close()
    assert not list((home / "spool" / "MEDSEARCH").glob("*"))  # no entries, no temp files


def test_cli_listen_makes_pushed_studies_searchable_within_index_every(tmp_path):
    """`medsearch listen --index-every 2`: pushed slices are embedded and indexed with no other command."""
    from medsearch.config import Paths

    home = _home(tmp_path)
    files = write_series(ct_series(3, study_uid=generate_uid(), series_uid=generate_uid()), tmp_path / "in")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "listen", "--home", str(home), "--port", str(port),
                          "--index-every", "2", "--model", "towers", "--quiet"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # model load on a loaded 2-core machine
        while subprocess.run(["echoscu", "-aec", "MEDSEARCH", "127.0.0.1", str(port)], capture_output=True).returncode:
            assert p.poll() is None and time.monotonic() < deadline, p.stdout.read().decode() if p.poll() else "no C-ECHO"
            time.sleep(0.5)
        assert storescu(port, files).returncode == 0
        pushed = time.monotonic()
        manifest = Paths(home).index_dir("towers") / "image.json"
        while time.monotonic() - pushed < 2 + 60:
            if manifest.exists() and json.loads(manifest.read_text()).get("count") == 3:
                break
            time.sleep(0.3)
        took = time.monotonic() - pushed
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    assert manifest.exists() and json.loads(manifest.read_text())["count"] == 3, p.stdout.read().decode()
    assert took < 2 + 60  # the bound is --index-every + 10 s on a quiet machine; this one is shared


SERIES_FIELDS = ("number", "modality", "body_part", "body_region", "plane", "orientation", "slice_count", "thickness",
                 "spacing", "position_min", "position_max", "ordered_by", "order_note", "window_center",
                 "window_width", "preset")  # fmt: skip


def test_pushed_slices_get_the_study_and_series_rows_a_tree_ingest_gives(tmp_path):
    """Slices pushed over two ingest rounds end up in one series row, in position order, as `ingest FOLDER` gives."""
    import numpy as np
    from PIL import Image

    from indexer.ingest import ingest_path
    from indexer.listen import ListenConfig, Listener
    from medsearch.imaging import dicom_to_uint8

    series = ct_series(7, study_uid=generate_uid(), series_uid=generate_uid(), series_number=4)
    files = write_series(series, tmp_path / "in")
    (tmp_path / "t").mkdir()
    tree = _home(tmp_path / "t")
    cat = Catalog.open(tree / "catalog.db")
    ingest_path(cat, tmp_path / "in", slices=None)
    ((want,),) = [cat.case_series(c) for (c,) in cat.db.execute("SELECT id FROM cases")]
    cat.close()

    home = _home(tmp_path)
    with Listener(home, ListenConfig(port=free_port(), index_every=3600)) as lis:
        # every other slice first, then the rest: the second round's slices sort between the first round's
        assert storescu(lis.port, files[::2]).returncode == 0
        assert lis.ingest_round() == 4
        assert storescu(lis.port, files[1::2]).returncode == 0
        assert lis.ingest_round() == 3
    cat = Catalog.open(home / "catalog.db")
    (case_id,) = cat.db.execute("SELECT id FROM cases").fetchone()
    (got,) = cat.case_series(case_id)
    assert {k: got[k] for k in SERIES_FIELDS} == {k: want[k] for k in SERIES_FIELDS}
    assert (got["slice_count"], got["ordered_by"], got["number"]) == (7, "position", 4)
    assert [s["slice_index"] for s in got["slices"]] == list(range(7))
    assert [s["position"] for s in got["slices"]] == [s["position"] for s in want["slices"]]
    assert all(s["status"] == "ok" for s in got["slices"])
    assert cat.counts()["images"] == 7
    # the display PNG rendered in the ingest round from the spooled pixel module is the original's rendering
    by_z = sorted(series, key=lambda d: d.ImagePositionPatient[2])
    paths = dict(cat.db.execute("SELECT slice_index, path FROM images").fetchall())
    cat.close()
    for i, ds in enumerate(by_z):
        assert np.array_equal(np.asarray(Image.open(paths[i])), dicom_to_uint8(ds)), i
    assert not list((home / "spool").rglob("*.spool"))


# ---------------------------------------------------------------------------- the native acceptor (indexer.dimse)
def _request(ds, ts: str):
    """What the acceptor hands the listener for ``ds`` sent in transfer syntax ``ts``: the data set's bytes."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    from indexer.dimse import StoreRequest

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = UID(ts).is_little_endian, UID(ts).is_implicit_VR
    write_dataset(fp, ds)
    return StoreRequest(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, bytearray(fp.getvalue()), "SCU")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                                  "JPEG2000.dcm", "SC_rgb_rle.dcm"])  # fmt: skip
def test_pixel_module_cut_from_the_received_bytes_is_what_pixel_payload_writes(name):
    """The spool's pixel module is sliced out of the received data set (no re-encoding); read back it holds
    the same elements and values as ``pixel_payload``'s re-encoded data set, encapsulated pixel data included."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file

    from indexer.dimse import decode_dataset, pixel_slices
    from indexer.sources.instances import PIXEL_KEYWORDS, pixel_payload

    src = pydicom.dcmread(get_testdata_file(name))
    req = _request(src, str(src.file_meta.TransferSyntaxUID))
    ds = decode_dataset(req)
    slices = pixel_slices(ds, req.dataset)
    assert slices, name
    cut = b"".join(bytes(req.dataset[a:b]) for a, b in slices)
    ts, written = pixel_payload(decode_dataset(req))
    a, b = (pydicom.dcmread(io.BytesIO(x), force=True) for x in (cut, written))
    assert [e.keyword for e in a] == [e.keyword for e in b]
    assert {e.keyword for e in a} == {k for k in PIXEL_KEYWORDS if k in src}
    for kw in (e.keyword for e in b):
        assert a[kw].value == b[kw].value, (name, kw)
    assert ts == str(src.file_meta.TransferSyntaxUID)
    assert b"PatientName" not in cut and str(src.get("PatientName", "@@")).encode() not in cut


def test_parallel_associations_deflate_and_junk_peers(tmp_path):
    """Four storescu processes at once (one association each), one proposing Deflated Explicit VR LE, and
    peers that send junk or hang up mid-PDU: every instance spooled once, the listener keeps answering."""
    import socket

    import numpy as np
    from PIL import Image

    from indexer.listen import ListenConfig, Listener
    from medsearch.imaging import dicom_to_uint8

    home = _home(tmp_path)
    series = ct_series(12, study_uid=generate_uid(), series_uid=generate_uid())
    files = write_series(series, tmp_path / "in")
    with Listener(home, ListenConfig(port=free_port(), index_every=3600, batch=5)) as lis:
        for junk in (b"\x01\x00\x00\x00\x00\x04abcd", b"\x09\x00\x00\x00\x00\x00", b"\x01\x00\x00\x00\x10\x00",
                     b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x07\x03ab", b""):  # fmt: skip
            with socket.create_connection(("127.0.0.1", lis.port), timeout=10) as s:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                s.recv(64)  # an A-ABORT or the close
        pushes = [subprocess.Popen(["storescu", *(["-xd"] if i == 0 else []), "-aec", "MEDSEARCH", "127.0.0.1",
                                    str(lis.port), *map(str, files[i::4])], stderr=subprocess.PIPE, text=True)
                  for i in range(4)]  # fmt: skip
        for p in pushes:
            assert p.wait(timeout=120) == 0, p.stderr.read()
        assert subprocess.run(["echoscu", "-aec", "MEDSEARCH", "127.0.0.1", str(lis.port)]).returncode == 0
        assert lis.stats.spooled == 12 and len(lis.spool) == 12 and not lis.stats.refused
        assert lis.ingest_round() == 12 and lis.stats.rounds == 3  # batches of 5, 5, 2
    cat = Catalog.open(home / "catalog.db")
    paths = dict(cat.db.execute("SELECT slice_index, path FROM images").fetchall())
    cat.close()
    assert len(paths) == 12
    for i, ds in enumerate(sorted(series, key=lambda d: d.ImagePositionPatient[2])):
        assert np.array_equal(np.asarray(Image.open(paths[i])), dicom_to_uint8(ds)), i


def test_pynetdicom_engine_still_receives(tmp_path):
    """``ListenConfig(engine="pynetdicom")``, the server the benchmark compares against, spools the same entries."""
    from indexer.listen import ListenConfig, Listener

    home = _home(tmp_path)
    files = write_series(ct_series(3, study_uid=generate_uid(), series_uid=generate_uid()), tmp_path / "in")
    with Listener(home, ListenConfig(port=free_port(), index_every=3600, engine="pynetdicom")) as lis:
        assert storescu(lis.port, files).returncode == 0
        assert lis.stats.spooled == 3 and lis.ingest_round() == 3
    cat = Catalog.open(home / "catalog.db")
    assert cat.counts()["images"] == 3
    cat.close()


def test_native_acceptor_against_pynetdicom_as_the_sender():
    """A second, independent DICOM implementation as the SCU: C-ECHO, C-STORE with the handler's status and
    the request as sent (SOP class/instance, transfer syntax, the data set's bytes), the association limit."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from indexer.dimse import StoreServer, decode_dataset
    from indexer.listen import ALL_TRANSFER_SYNTAXES

    got = []

    def on_store(req):
        got.append(req)
        return 0xB000 if len(got) == 2 else 0x0000  # the second answered with a warning status

    ds = ct_series(2, study_uid=generate_uid(), series_uid=generate_uid())
    server = StoreServer(("127.0.0.1", 0), ae_title="MEDSEARCH", abstract_syntaxes=[CTImageStorage],
                         transfer_syntaxes=ALL_TRANSFER_SYNTAXES, on_store=on_store, max_associations=1,
                         implementation_uid="1.2.3.4").start()  # fmt: skip
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.5")  # RT Plan: not offered, so refused in negotiation
        port = server.server_address[1]
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEARCH")
        assert assoc.is_established
        assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {CTImageStorage, Verification}
        assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == ["1.2.840.10008.5.1.4.1.1.481.5"]
        second = ae.associate("127.0.0.1", port, ae_title="MEDSEARCH")  # over max_associations
        assert second.is_rejected
        assert assoc.send_c_echo().Status == 0x0000
        assert [assoc.send_c_store(d).Status for d in ds] == [0x0000, 0xB000]
        assoc.release()
        assert assoc.is_released
    finally:
        server.shutdown()
    want = [(CTImageStorage, d.SOPInstanceUID, ImplicitVRLittleEndian) for d in ds]
    assert [(r.sop_class_uid, r.sop_instance_uid, r.transfer_syntax) for r in got] == want
    back = decode_dataset(got[0])
    assert back.SOPInstanceUID == ds[0].SOPInstanceUID and back.PixelData == ds[0].PixelData
