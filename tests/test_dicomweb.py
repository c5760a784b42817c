"""Pull from a real Orthanc over DICOMweb: studies pushed with dcmtk's storescu come back over QIDO/WADO.

Marked ``pacs``: it starts Debian's Orthanc (with the DICOMweb plugin) on free loopback ports.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from orthanc import OrthancServer, available
from pacs_data import ct_series, planted_strings, write_series
from pydicom.uid import generate_uid

from medsearch.catalog import Catalog
from medsearch.errors import RemoteUnavailable

pytestmark = [pytest.mark.pacs, pytest.mark.slow]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    missing = available() or (None if shutil.which("storescu") else "dcmtk's storescu is not installed")
    if missing:
        pytest.fail(f"{missing}: scripts/test.sh installs orthanc, orthanc-dicomweb and dcmtk")
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def push(orthanc: OrthancServer, files: list[Path]) -> None:
    """Store files into Orthanc over DIMSE, as a modality would."""
    subprocess.run(["storescu", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip


def _home_text(home: Path) -> str:
    """Everything a home holds that is text: the catalog's rows and every non-image file."""
    parts = []
    con = sqlite3.connect(home / "catalog.db")
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in con.execute(f"SELECT * FROM {table}"):
            parts.append(" ".join(str(x) for x in row if not isinstance(x, bytes)))
    con.close()
    for p in home.rglob("*"):
        if p.is_file() and p.suffix not in (".png", ".db", ".faiss", ".npy") and "catalog.db" not in p.name:
            parts.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def test_sync_pulls_selected_slices_whole_studies_and_no_identifiers(orthanc, tmp_path):
    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb

    study_uid, series_uid = generate_uid(), generate_uid()
    series = ct_series(20, study_uid=study_uid, series_uid=series_uid)
    push(orthanc, write_series(series, tmp_path / "s1"))
    home = tmp_path / "home"
    home.mkdir()
    cat = Catalog.open(home / "catalog.db")
    url = f"dicomweb+{orthanc.dicomweb}"

    s = sync_dicomweb(cat, home, DicomwebConfig(url=url, slices=8))
    assert (s.studies_synced, s.instances_listed, s.instances_fetched, s.images_added) == (1, 20, 8, 8)
    assert cat.counts()["images"] == 8 and cat.counts()["cases"] == 1
    # the 8 fetched slices spread over the series' extent in z (both ends included), not by InstanceNumber
    zs = sorted(ds.ImagePositionPatient[2] for ds in series)
    rows = cat.db.execute("SELECT meta FROM images").fetchall()
    import json

    got = sorted(json.loads(r[0])["position"][2] for r in rows)
    assert got[0] == zs[0] and got[-1] == zs[-1] and len(set(got)) == 8
    # the series is recorded as a DICOM tree ingest records it: 20 slices in position order, 8 of them stored
    (case_id,) = cat.db.execute("SELECT id FROM cases").fetchone()
    (sr,) = cat.case_series(case_id)
    assert (sr["slice_count"], sr["ordered_by"], sr["plane"], len(sr["slices"])) == (20, "position", "Axial", 8)
    assert [sl["slice_index"] for sl in sr["slices"]] == sorted(sl["slice_index"] for sl in sr["slices"])
    assert sr["slices"][0]["slice_index"] == 0 and sr["slices"][-1]["slice_index"] == 19
    # display images are in the home, de-identified renderings; no DICOM file is kept
    pngs = list((home / "images").rglob("*.png"))
    assert len(pngs) == 8 and not list(home.rglob("*.dcm"))
    text = _home_text(home)
    for planted in planted_strings() + [study_uid, series_uid] + [ds.SOPInstanceUID for ds in series]:
        assert planted not in text, f"{planted!r} reached the home"

    # re-running asks nothing new of an unchanged study and adds nothing
    s2 = sync_dicomweb(cat, home, DicomwebConfig(url=url, slices=8))
    assert (s2.studies_unchanged, s2.instances_fetched, s2.images_added) == (1, 0, 0)

    # the study gains a series: the next sync fetches just that series' slices
    new_series = ct_series(5, study_uid=study_uid, series_uid=generate_uid(), series_number=2, z0=0.0)
    push(orthanc, write_series(new_series, tmp_path / "s2"))
    s3 = sync_dicomweb(cat, home, DicomwebConfig(url=url, slices=8))
    assert (s3.studies_synced, s3.instances_fetched, s3.images_added) == (1, 5, 5)
    assert cat.counts()["images"] == 13 and cat.counts()["cases"] == 1

    # --slices all adds the 12 slices of the first series that were left out
    s4 = sync_dicomweb(cat, home, DicomwebConfig(url=url, slices=None))
    assert s4.images_added == 12 and cat.counts()["images"] == 25

    # the report arrives as an SR in the PACS: the study gets its sections, scrubbed; the SR gets no vector
    from sr_fixtures import CLINICAL, PLANTED_WORDS, enhanced_sr

    sr = enhanced_sr(study_uid)
    sr.PatientID, sr.StudyDate = series[0].PatientID, series[0].StudyDate  # same patient and study in the PACS
    import io

    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    orthanc.upload(buf.getvalue())
    s5 = sync_dicomweb(cat, home, DicomwebConfig(url=url, slices=None))
    assert (s5.studies_synced, s5.reports_added, s5.images_added) == (1, 1, 0)
    case = cat.get_case(cat.db.execute("SELECT id FROM cases").fetchone()[0])
    report = " ".join(case.sections.values())
    assert "spiculated mass" in case.sections.get("findings", "") and case.sections.get("impression")
    assert sum(c in report for c in CLINICAL) >= 5
    for w in PLANTED_WORDS:
        assert w not in report, f"{w!r} reached the report text"
    assert cat.counts()["images"] == 25
    cat.close()
    assert not (home / "private").exists()  # the link back is off by default


def _vectors_by_z(cat: Catalog, model: str) -> dict[float, object]:
    """Stored image vectors by the slice's z (each home has its own salt, so its own instance keys)."""
    import json

    z = {i: float(json.loads(m)["position"][2]) for i, m in cat.db.execute("SELECT id, meta FROM images")}
    return {z[i]: v for ids, vecs in cat.iter_vectors(model, "image") for i, v in zip(ids.tolist(), vecs, strict=True)}


def test_sync_embeds_from_memory_the_vectors_medsearch_index_computes(orthanc, tmp_path, towers):
    """``sync_dicomweb(encoder=...)`` embeds each slice from its rendered pixels and stores the vectors in the
    study's transaction; they are the vectors `medsearch index` computes from the stored display PNGs."""
    import io
    import json

    import numpy as np
    import pydicom
    import torch
    from PIL import Image

    from indexer.embed import run_index
    from indexer.embed_stream import StreamEmbedder
    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb
    from indexer.sources.instances import render_array
    from medsearch.config import EmbedConfig, Paths
    from medsearch.encoders.towers import IMAGE_SIZE, pil_to_rgb
    from medsearch.imaging import load_image

    # a study dated after every other study of this module's Orthanc, so --since picks it alone
    series = ct_series(10, study_uid=generate_uid(), series_uid=generate_uid(), size=96, body_part="HEAD",
                       study_date="20250601")  # fmt: skip
    for ds in series:
        orthanc.upload(_dicom(ds))
    url = f"dicomweb+{orthanc.dicomweb}"
    stored = {}
    for how in ("sync", "index"):
        home = tmp_path / how
        home.mkdir()
        cat = Catalog.open(home / "catalog.db")
        loader = (lambda: towers) if how == "sync" else None  # a loader: called in the embedding thread
        s = sync_dicomweb(cat, home, DicomwebConfig(url=url, slices=None, since="20250601"), encoder=loader)
        assert s.images_added == 10 and s.images_embedded == (10 if how == "sync" else 0)
        assert len(cat.image_ids_to_embed(towers.model_id)) == (0 if how == "sync" else 10)
        e = run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=4, workers=0), progress=False)
        assert e.images_embedded == (0 if how == "sync" else 10)  # the index pass had nothing left to embed
        stored[how] = _vectors_by_z(cat, towers.model_id)
        rows = cat.db.execute("SELECT key, path, meta FROM images").fetchall()
        cat.close()
    assert set(stored["sync"]) == set(stored["index"]) and len(stored["sync"]) == 10
    for k in stored["sync"]:  # float16 in the catalog, from both
        np.testing.assert_allclose(stored["sync"][k], stored["index"][k], atol=1e-3, rtol=0)

    # float32, before storage: the pixels handed over are the display PNG's, and the vectors are its vectors
    by_z = {float(ds.ImagePositionPatient[2]): ds for ds in series}
    keys, pngs = [], []
    with StreamEmbedder(towers, batch=3) as emb:
        for key, path, meta in rows:
            ds = pydicom.dcmread(io.BytesIO(_dicom(by_z[float(json.loads(meta)["position"][2])])))
            arr, _ = render_array(ds, key)
            png = load_image(path)
            assert np.array_equal(np.asarray(png), arr)  # lossless
            keys.append(key)
            pngs.append(png)
            emb.submit(key, arr)
        got = emb.take(keys)
    want = towers.encode_image_batch(torch.stack([towers.preprocess_u8(p) for p in pngs]))  # (10, 1280)
    for j, k in enumerate(keys):
        np.testing.assert_allclose(got[k], want[j], atol=1e-5, rtol=0)
    # a grey image is resized as one band: the same bytes as resizing the replicated RGB image
    img = pngs[0].resize((130, 97))
    rgb = pil_to_rgb(img).resize((round(130 * IMAGE_SIZE / 97), IMAGE_SIZE), Image.Resampling.BICUBIC)
    left = (rgb.width - IMAGE_SIZE) // 2
    want_u8 = np.asarray(rgb.crop((left, 0, left + IMAGE_SIZE, IMAGE_SIZE))).transpose(2, 0, 1)
    assert np.array_equal(towers.preprocess_u8(img).numpy(), want_u8)


def _dicom(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def keys_case(ref: str) -> str:
    return ref.split(":", 1)[1]


def test_link_back_maps_pseudonyms_to_uids_in_a_private_file(orthanc, tmp_path):
    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb
    from medsearch.catalog.links import LinkStore, link_status, viewer_url

    study_uid = generate_uid()
    push(orthanc, write_series(ct_series(3, study_uid=study_uid, series_uid=generate_uid()), tmp_path / "s"))
    home = tmp_path / "home"
    home.mkdir()
    cat = Catalog.open(home / "catalog.db")
    cfg = DicomwebConfig(url=f"dicomweb+{orthanc.dicomweb}", slices=2, link_back=True, source="pacs")
    sync_dicomweb(cat, home, cfg)
    key = cat.db.execute("SELECT key FROM cases WHERE key IN (SELECT key FROM cases)").fetchall()
    cat.close()
    store = LinkStore.open(home)
    keys_found = [k for (k,) in key if store.uid("pacs", k) == study_uid]
    assert len(keys_found) == 1
    assert (home / "private" / "links.db").stat().st_mode & 0o077 == 0
    assert study_uid not in (home / "catalog.db").read_bytes().decode("latin-1")
    store.close()
    assert link_status(home)["exists"] is True and link_status(home)["studies"] >= 1
    assert viewer_url("https://pacs/viewer?StudyInstanceUIDs={uid}", "1.2.3") == "https://pacs/viewer?StudyInstanceUIDs=1.2.3"
    # backups leave the link out unless asked; the display images of the PACS studies go in
    from medsearch.backup import backup

    backup(home, tmp_path / "b1")
    assert not (tmp_path / "b1" / "private").exists() and list((tmp_path / "b1" / "images").rglob("*.png"))
    backup(home, tmp_path / "b2", with_links=True)
    assert (tmp_path / "b2" / "private" / "links.db").is_file()
    # the API shows the viewer URL to admin keys only
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.keys import KeyStore
    from api.settings import ApiSettings

    keys = tmp_path / "keys.json"
    _, admin = KeyStore(keys).add("admin", "ops")
    _, reader = KeyStore(keys).add("read", "viewer")
    app = create_app(ApiSettings(home=home, keys_file=keys, viewer_url="https://pacs/viewer?StudyInstanceUIDs={uid}",
                                 watch_seconds=0))  # fmt: skip
    with TestClient(app) as c:
        case = f"pacs:{keys_found[0]}"
        got = c.get(f"/v1/cases/{keys_case(case)}", headers={"X-API-Key": admin}).json()
        assert got["viewer_url"] == f"https://pacs/viewer?StudyInstanceUIDs={study_uid}"
        assert c.get(f"/v1/cases/{keys_case(case)}", headers={"X-API-Key": reader}).json()["viewer_url"] is None


def test_unreachable_pacs_names_the_url_and_stores_nothing(tmp_path):
    from orthanc import free_port

    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb

    home = tmp_path / "home"
    home.mkdir()
    cat = Catalog.open(home / "catalog.db")
    url = f"dicomweb+http://alice:secret@127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(RemoteUnavailable) as e:
        sync_dicomweb(cat, home, DicomwebConfig(url=url, retries=1, backoff=0.01, timeout=2))
    assert "127.0.0.1" in e.value.message and "secret" not in str(e.value) and "alice" not in str(e.value)
    assert "cannot be reached" in e.value.message and e.value.hint
    assert cat.counts()["cases"] == 0
    cat.close()


def test_wrong_root_is_a_clear_http_error(orthanc, tmp_path):
    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb

    home = tmp_path / "home"
    home.mkdir()
    cat = Catalog.open(home / "catalog.db")
    with pytest.raises(RemoteUnavailable) as e:
        sync_dicomweb(cat, home, DicomwebConfig(url=f"dicomweb+{orthanc.url}/not-dicom-web", retries=0))
    assert "HTTP 404" in e.value.message and "/dicom-web" in e.value.hint
    cat.close()


def test_cli_pull_index_draft_and_stow_back(orthanc, tmp_path):
    """The commands a user runs: ingest from the PACS, index, draft with --sr/--stow into the query study."""
    import json

    import pydicom
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    study_uid = generate_uid()
    series = ct_series(12, study_uid=study_uid, series_uid=generate_uid())
    files = write_series(series, tmp_path / "s")
    push(orthanc, files)
    import io

    from sr_fixtures import enhanced_sr

    report = enhanced_sr(study_uid)  # the study's report, as the reporting system stored it in the PACS
    report.PatientID, report.StudyDate = series[0].PatientID, series[0].StudyDate
    buf = io.BytesIO()
    report.save_as(buf, enforce_file_format=True)
    orthanc.upload(buf.getvalue())
    home = tmp_path / "home"
    url = f"dicomweb+{orthanc.dicomweb}"
    r = runner.invoke(app, ["ingest", url, "--home", str(home), "--slices", "4", "--embed", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["studies_synced"] >= 1 and out["instances_fetched"] >= 4
    assert out["images_embedded"] == out["images_added"] >= 4  # --embed: every new slice has its vector
    r = runner.invoke(app, ["ingest", url, "--home", str(home), "--slices", "0"])
    assert r.exit_code == 2 and "--slices" in r.output
    r = runner.invoke(app, ["index", "--home", str(home), "--model", "towers", "-q"])
    assert r.exit_code == 0, r.output
    query = tmp_path / "query"
    qfiles = write_series(ct_series(2, study_uid=generate_uid(), series_uid=generate_uid(), series_number=5), query)
    for f in qfiles:
        orthanc.upload(f.read_bytes())
    sr = tmp_path / "draft.dcm"
    r = runner.invoke(app, ["draft", str(qfiles[0]), "--home", str(home), "--sr", str(sr), "--stow", url])
    assert r.exit_code == 0, r.output
    ds = pydicom.dcmread(sr)
    assert ds.StudyInstanceUID == pydicom.dcmread(qfiles[0]).StudyInstanceUID and ds.VerificationFlag == "UNVERIFIED"
    listed = orthanc.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series?Modality=SR")
    assert len(listed) == 1
    r = runner.invoke(app, ["draft", str(tmp_path / "missing.png"), "--home", str(home), "--sr", str(sr)])
    assert r.exit_code == 2 and "missing.png" in r.output


def test_sigkill_mid_sync_then_rerun_stores_every_study_whole_once(tmp_path):
    """SIGKILL `medsearch ingest dicomweb+...` while it syncs; the rerun completes it, and every study is in
    the catalog whole (its case, series row and all its slices) exactly once, with no display image left over."""
    import io
    import os
    import signal
    import sys
    import time

    missing = available()
    if missing:
        pytest.fail(f"{missing}: scripts/test.sh installs orthanc and orthanc-dicomweb")
    n_studies, n_slices = 10, 6
    with OrthancServer(tmp_path / "orthanc") as o:
        for i in range(n_studies):
            for ds in ct_series(n_slices, study_uid=generate_uid(), series_uid=generate_uid(),
                                patient={"PatientID": f"P{i:03d}"}):  # fmt: skip
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                o.upload(buf.getvalue())
        home = tmp_path / "home"
        cmd = [sys.executable, "-m", "cli.main", "ingest", f"dicomweb+{o.dicomweb}", "--home", str(home),
               "--slices", "all", "--quiet"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        killed_at = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if (home / "catalog.db").exists():
                try:
                    con = sqlite3.connect(f"file:{home / 'catalog.db'}?mode=ro", uri=True, timeout=0.2)
                    n = con.execute("SELECT count(*) FROM cases").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:  # schema not created yet
                    n = 0
                if n >= 2:
                    p.send_signal(signal.SIGKILL)
                    killed_at = n
                    break
            time.sleep(0.02)
        p.wait(timeout=60)
        assert killed_at is not None, f"the sync ended before the kill: {p.stdout.read().decode()[-2000:]}"

        def check_whole() -> int:
            cat = Catalog.open(home / "catalog.db")
            cases = [c for (c,) in cat.db.execute("SELECT id FROM cases")]
            for c in cases:
                (sr,) = cat.case_series(c)
                n_img = cat.db.execute("SELECT count(*) FROM images WHERE case_id = ?", [c]).fetchone()[0]
                assert (sr["slice_count"], len(sr["slices"]), n_img) == (n_slices, n_slices, n_slices)
            from medsearch.catalog.pacs import synced_studies

            assert synced_studies(cat, f"pacs-127.0.0.1-{o.http_port}") == len(cases)
            cat.close()
            return len(cases)

        committed = check_whole()  # what the killed sync committed is whole; the rest is absent
        assert killed_at <= committed < n_studies
        cat = Catalog.open(home / "catalog.db")
        stored = {p for (p,) in cat.db.execute("SELECT path FROM images")}
        cat.close()
        in_flight = {str(Path(p).parent) for p in map(str, (home / "images").rglob("*.png")) if p not in stored}
        assert len(in_flight) <= 1  # display images of the one study being fetched at the kill, not in the catalog
        r = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        import json

        out = json.loads(r.stdout)
        assert out["studies_synced"] == n_studies - committed and out["studies_unchanged"] == committed
        assert check_whole() == n_studies
        cat = Catalog.open(home / "catalog.db")
        assert cat.counts()["images"] == n_studies * n_slices and cat.counts()["cases"] == n_studies
        paths = {p for (p,) in cat.db.execute("SELECT path FROM images")}
        cat.close()
        assert {str(p) for p in (home / "images").rglob("*.png")} == paths  # no display image of a half study
        assert not list(home.rglob("*.tmp"))
        r = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
        assert json.loads(r.stdout)["studies_unchanged"] == n_studies  # a third run adds nothing


def test_folded_image_tower_gives_the_vectors_of_the_tower(towers):
    """The towers encode on CPU with BatchNorm folded into the convolutions (``fold_batchnorm``): unit vectors
    within 1e-5 of the unfolded tower's on real slices, and a copy remade when the tower is trained in place."""
    import numpy as np
    import torch
    from pacs_data import ct_pixels
    from PIL import Image

    from medsearch.encoders.base import l2_normalize
    from medsearch.encoders.towers import fold_batchnorm

    x = torch.stack([towers.preprocess_u8(Image.fromarray(a)) for a in ct_pixels(6, 256)])  # (6, 3, 224, 224) uint8
    xf = towers.transform.normalize(x).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        plain = towers._image_net.extract_features(xf).mean(dim=(2, 3)).numpy()  # (6, 1280), no folding
        folded_net = fold_batchnorm(towers._image_net)
        folded = folded_net.extract_features(xf).mean(dim=(2, 3)).numpy()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded_net.modules())
    assert np.abs(plain - folded).max() < 1e-4 * np.abs(plain).max()
    np.testing.assert_allclose(l2_normalize(folded), l2_normalize(plain), atol=1e-5, rtol=0)
    np.testing.assert_allclose(towers.encode_image_batch(x), l2_normalize(plain), atol=1e-5, rtol=0)
    first = towers._folded[1]
    with torch.no_grad():  # training that updates the tower in place: the folded copy must follow
        towers._image_net._bn1.bias.add_(0.0)
    towers.encode_image_batch(x[:1])
    assert towers._folded[1] is not first
