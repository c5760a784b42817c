"""The HTTP API through TestClient on a small real index (the ``indexed_home`` fixture).

Every route, auth on and off, each 4xx path, oversized/non-image/bomb uploads, the audit log,
metrics, CORS, and the index hot swap (admin reindex and the file watch) while searches run.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import MEDPIX, make_slice
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.keys import KeyStore
from api.settings import ApiSettings, is_loopback
from medsearch.catalog import Catalog
from medsearch.errors import InvalidInput, NotFound


def png_bytes(size=(64, 64), mode="L", color=128) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def settings_for(home: Path, tmp: Path, **kw) -> ApiSettings:
    base = dict(home=home, device="cpu", watch_seconds=0, rate_per_minute=0, keys_file=tmp / "keys.json",
                audit_log=tmp / "audit.log")  # fmt: skip
    base.update(kw)
    return ApiSettings(**base)


@pytest.fixture(scope="module")
def tmp_mod(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def client(indexed_home, towers, tmp_mod):
    """Loopback server, no keys: anonymous callers get read access."""
    app = create_app(settings_for(indexed_home, tmp_mod), encoder=towers)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def catalog_rows(indexed_home):
    cat = Catalog.open(indexed_home / "catalog.db", create=False)
    try:
        img = cat.db.execute(
            "SELECT i.id, i.case_id, i.path, c.key FROM images i JOIN cases c ON c.id = i.case_id "
            "WHERE i.source = 'medpix-2.0' AND i.status = 'ok' ORDER BY i.id LIMIT 1"
        ).fetchone()
        counts = {s: cat.count_vectors("towers", s) for s in ("image", "text")}
        ct = cat.db.execute("SELECT count(*) FROM images WHERE modality_type = 'CT'").fetchone()[0]
    finally:
        cat.close()
    return {"image_id": img[0], "case_id": img[1], "path": img[2], "case_key": img[3], "counts": counts, "ct": ct}


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"] and body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]


# ---------------------------------------------------------------------------- service routes
def test_health_reports_model_indexes_and_counts(client, catalog_rows):
    r = client.get("/v1/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model"] == "towers" and h["shared_space"] is False
    assert {s: i["count"] for s, i in h["indexes"].items()} == catalog_rows["counts"]
    assert all(i["generation"] >= 1 for i in h["indexes"].values())
    assert h["catalog"]["images"] > 0 and h["auth_required"] is False


def test_facets_list_filter_values_with_counts(client, catalog_rows):
    f = client.get("/v1/facets").json()
    modalities = {v["value"]: v["count"] for v in f["modality"]}
    assert {"CT", "MR", "X-ray"} <= set(modalities)
    assert modalities["CT"] == catalog_rows["ct"]
    assert any(v["value"] == "Thorax" for v in f["body_region"])


def test_openapi_docs_and_web_page_are_local(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/search/text", "/v1/search/image", "/v1/cases/{case_ref}", "/v1/images/{image_id}",
                 "/v1/images/{image_id}/thumbnail", "/v1/drafts", "/v1/health", "/v1/admin/reindex", "/metrics"):  # fmt: skip
        assert path in spec["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="q"' in page.text and 'type="file"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in client.get("/static/app.js").text.split("\n", 2)[2].split("fetch(")[0]


def test_unknown_route_is_json_404(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"


# ---------------------------------------------------------------------------- text search
def test_text_search_returns_ranked_hits_one_per_case(client):
    r = client.post("/v1/search/text", json={"query": "ground glass opacities in both lungs", "k": 5})
    assert r.status_code == 200
    body = r.json()
    hits = body["hits"]
    assert body["count"] == len(hits) == 5 and body["model"] == "towers" and body["generation"]["text"] >= 1
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert len({h["case_id"] for h in hits}) == 5
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        assert h["thumbnail_url"] == f"/v1/images/{h['image_id']}/thumbnail"
        assert h["case_url"] == f"/v1/cases/{h['case_id']}"
        assert "path" not in h and "patient_key" not in h


def test_text_search_filters_and_report_target(client):
    r = client.post("/v1/search/text", json={"query": "brain mass", "k": 8, "filters": {"modality": ["CT"]}})
    assert r.status_code == 200 and r.json()["count"] > 0
    assert {h["modality_type"] for h in r.json()["hits"]} == {"CT"}
    r = client.post("/v1/search/text", json={"query": "brain mass", "k": 3, "filters": {"modality": "mr"}})
    assert {h["modality_type"] for h in r.json()["hits"]} == {"MR"}  # a single string and any case
    r = client.post("/v1/search/text", json={"query": "pneumonia", "k": 3, "target": "reports"})
    assert r.status_code == 200 and all(h["matched"] == "text" and h["excerpt"] for h in r.json()["hits"])


@pytest.mark.parametrize(
    "body, field",
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "k": 101}, "k"),
        ({"query": "x", "mode": "telepathy"}, "mode"),
        ({"query": "x", "filters": {"colour": ["red"]}}, "colour"),
        ({"query": "x", "surprise": 1}, "surprise"),
        ({"k": 3}, "query"),
    ],
)
def test_text_search_rejects_invalid_bodies(client, body, field):
    r = client.post("/v1/search/text", json=body)
    assert r.status_code == 422
    err = error_of(r)
    assert err["code"] == "invalid_input" and field in json.dumps(err["details"])


def test_text_search_rejects_non_json(client):
    r = client.post(
        "/v1/search/text", content=b"query=x", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 422


def test_cross_modal_mode_is_a_clear_409_for_the_towers(client):
    """A valid request the loaded model cannot serve: a conflict with the server's state, not bad input."""
    r = client.post("/v1/search/text", json={"query": "fracture", "mode": "image"})
    assert r.status_code == 409
    err = error_of(r)
    assert err["code"] == "not_supported_by_model" and "shared" in err["message"] and err["hint"]


def test_bm25_mode_searches_report_words(client):
    r = client.post("/v1/search/text", json={"query": "pneumonia", "k": 3, "mode": "bm25"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and {h["matched"] for h in hits} == {"bm25"}


# ---------------------------------------------------------------------------- image search
def test_upload_of_a_catalog_image_finds_its_own_case_first(client, catalog_rows):
    data = Path(catalog_rows["path"]).read_bytes()
    r = client.post("/v1/search/image", files={"file": ("scan.png", data, "image/png")}, data={"k": "5"})
    assert r.status_code == 200
    body = r.json()
    assert body["hits"][0]["case_id"] == catalog_rows["case_id"] and body["hits"][0]["score"] > 0.99
    q = body["query_image"]
    assert q["image_id"] == catalog_rows["image_id"] and q["bytes"] == len(data) and len(q["sha256"]) == 64
    r = client.post("/v1/search/image", files={"file": ("scan.png", data, "image/png")},
                    data={"k": "5", "exclude_own_case": "true"})  # fmt: skip
    assert catalog_rows["case_id"] not in {h["case_id"] for h in r.json()["hits"]}


def test_image_search_by_id_with_filters(client, catalog_rows):
    r = client.post("/v1/search/image", data={"image_id": str(catalog_rows["image_id"]), "k": "4",
                                              "modality": ["CT", "X-ray"], "exclude_own_case": "true"})  # fmt: skip
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert 0 < len(hits) <= 4 and {h["modality_type"] for h in hits} <= {"CT", "X-ray"}


def test_new_pixels_are_encoded_not_looked_up(client):
    im = Image.open(MEDPIX / "images" / "MPX1007_synpic46719.png").convert("L").resize((300, 300))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    r = client.post("/v1/search/image", files={"file": ("x.jpg", buf.getvalue(), "image/jpeg")}, data={"k": "3"})
    assert r.status_code == 200 and r.json()["count"] == 3 and r.json()["query_image"]["image_id"] is None


def test_dicom_upload_is_accepted(client):
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    r = client.post("/v1/search/image", files={"file": ("ct", data, "application/dicom")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["query_image"]["width"] == 128
    r = client.post("/v1/search/image", files={"file": ("ct.dcm", data, "application/octet-stream")}, data={"k": "1"})
    assert r.status_code == 200  # browsers send .dcm files as octet-stream; the bytes decide


@pytest.mark.parametrize(
    "name, data, ctype, status, needle",
    [
        ("notes.txt", b"hello, not an image", "text/plain", 415, "text/plain"),
        ("a.gif", b"GIF89a" + b"\0" * 40, "image/gif", 415, "image/gif"),
        ("fake.png", b"<html>not a png</html>", "image/png", 415, "not a PNG, JPEG or DICOM"),
        ("mislabelled.png", b"\xff\xd8\xff\xe0" + b"\0" * 64, "image/png", 415, "declared as image/png"),
        ("empty.png", b"", "image/png", 415, "empty"),
        ("cut.png", png_bytes((256, 256), color=7)[:60], "image/png", 415, "upload"),
    ],
)
def test_bad_uploads_are_refused(client, name, data, ctype, status, needle):
    r = client.post("/v1/search/image", files={"file": (name, data, ctype)})
    assert r.status_code == status, r.text
    err = error_of(r)
    assert needle in err["message"] and err["hint"]
    assert name not in err["message"]  # the client's file name is not echoed


def test_decompression_bomb_is_refused_before_decoding(client):
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000), 0).save(buf, format="PNG", optimize=True)  # 144 Mpx in a few KB
    data = buf.getvalue()
    assert len(data) < 200_000
    r = client.post("/v1/search/image", files={"file": ("bomb.png", data, "image/png")})
    assert r.status_code == 413
    assert "144,000,000 pixels" in error_of(r)["message"]


def test_oversized_upload_is_413(indexed_home, towers, tmp_path):
    app = create_app(settings_for(indexed_home, tmp_path, max_upload_bytes=50_000), encoder=towers)
    big = Path(next((MEDPIX / "images").glob("*.png"))).read_bytes()
    while len(big) < 200_000:
        big += big
    with TestClient(app) as c:
        r = c.post("/v1/search/image", files={"file": ("big.png", big, "image/png")})
        assert r.status_code == 413 and error_of(r)["code"] == "too_large"

        def chunks():  # no Content-Length: the streamed byte count trips the cap
            for i in range(0, len(big), 16_384):
                yield big[i : i + 16_384]

        r = c.post("/v1/search/text", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/search/image", files={"file": ("ok.png", png_bytes(), "image/png")}).status_code == 200


@pytest.mark.parametrize(
    "data, files, status",
    [
        ({}, None, 400),  # neither file nor image_id
        ({"image_id": "1"}, {"file": ("a.png", png_bytes(), "image/png")}, 400),  # both
        ({"image_id": "99999999"}, None, 404),
        ({"image_id": "abc"}, None, 422),
        ({"image_id": str(2**70)}, None, 422),
        ({"image_id": "1", "k": "0"}, None, 422),
    ],
)
def test_image_search_argument_errors(client, data, files, status):
    r = client.post("/v1/search/image", data=data, files=files)
    assert r.status_code == status, r.text
    error_of(r)


@pytest.mark.parametrize("value", ["", "not a file"])
def test_a_text_file_field_counts_as_absent(client, catalog_rows, value):
    """A multipart `file` part that is text, not a file, is no file (the schema says so): with an
    image_id the answer is the image_id's; alone it is the usual "give exactly one" 400."""
    data = {"image_id": str(catalog_rows["image_id"]), "k": "3"}
    expected = client.post("/v1/search/image", data=data).json()["hits"]
    r = client.post("/v1/search/image", data={**data, "file": value})
    assert r.status_code == 200, r.text
    assert [(h["image_id"], h["score"]) for h in r.json()["hits"]] == [(h["image_id"], h["score"]) for h in expected]
    r = client.post("/v1/search/image", data={"file": value})
    assert r.status_code == 400 and "exactly one" in error_of(r)["message"]


# ---------------------------------------------------------------------------- cases and images
def test_case_by_id_and_key(client, catalog_rows):
    r = client.get(f"/v1/cases/{catalog_rows['case_id']}")
    assert r.status_code == 200
    c = r.json()
    assert c["case_key"] == catalog_rows["case_key"] and c["sections"] and c["images"]
    assert all(im["thumbnail_url"].endswith("/thumbnail") and "path" not in im for im in c["images"])
    assert client.get(f"/v1/cases/{catalog_rows['case_key']}").json()["case_id"] == catalog_rows["case_id"]


@pytest.mark.parametrize("ref, status", [("999999", 404), ("NOPE123", 404), ("a%20b", 422), ("..%2F..%2Fetc", 404),
                                         ("9" * 30, 404)])  # beyond SQLite's integers: not found, not a 500
def test_case_errors(client, ref, status):
    r = client.get(f"/v1/cases/{ref}")
    assert r.status_code == status
    error_of(r)


def test_image_and_thumbnail_are_png_by_id(client, catalog_rows):
    iid = catalog_rows["image_id"]
    full = client.get(f"/v1/images/{iid}")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    src = Image.open(catalog_rows["path"])
    assert Image.open(io.BytesIO(full.content)).size == src.size
    th = client.get(f"/v1/images/{iid}/thumbnail", params={"size": 96})
    im = Image.open(io.BytesIO(th.content))
    assert im.format == "PNG" and max(im.size) == 96
    again = client.get(
        f"/v1/images/{iid}/thumbnail", params={"size": 96}, headers={"If-None-Match": th.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize(
    "url, status",
    [("/v1/images/99999999", 404), ("/v1/images/abc", 422), ("/v1/images/0", 422), ("/v1/images/1/thumbnail?size=9999", 422),
     ("/v1/images/..%2F..%2Fetc%2Fpasswd", 404), ("/v1/images/1?max_side=1", 422),
     ("/v1/images/171152974709840142143532966948634624", 422)],
)  # fmt: skip
def test_image_errors(client, url, status):
    r = client.get(url)
    assert r.status_code == status
    error_of(r)


def test_damaged_file_is_415_without_a_path(indexed_home, towers, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(indexed_home, home, ignore=shutil.ignore_patterns("audit.log"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes((128, 128))[:70])
    cat = Catalog.open(home / "catalog.db")
    iid = cat.db.execute("SELECT id FROM images ORDER BY id LIMIT 1").fetchone()[0]
    gone = cat.db.execute("SELECT id FROM images ORDER BY id LIMIT 1 OFFSET 1").fetchone()[0]
    with cat.atomic():
        cat.db.execute("UPDATE images SET path = ? WHERE id = ?", [str(broken), iid])
        cat.db.execute("UPDATE images SET path = ? WHERE id = ?", [str(tmp_path / "missing.png"), gone])
    cat.close()
    with TestClient(create_app(settings_for(home, tmp_path), encoder=towers)) as c:
        r = c.get(f"/v1/images/{iid}")
        assert r.status_code == 415 and str(tmp_path) not in r.text and "broken" not in r.text
        r = c.get(f"/v1/images/{gone}/thumbnail")
        assert r.status_code == 404 and str(tmp_path) not in r.text


# ---------------------------------------------------------------------------- drafts
def test_draft_cites_only_its_evidence(client, catalog_rows):
    r = client.post("/v1/drafts", data={"image_id": str(catalog_rows["image_id"])})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["generator"] == "extractive" and d["sentences"] and d["evidence"]
    evidence = {e["n"]: e["case_id"] for e in d["evidence"]}
    assert catalog_rows["case_id"] not in evidence.values()  # own case never cited
    for s in d["sentences"]:
        for c in s["citations"]:
            assert evidence[c["n"]] == c["case_id"] and c["cite"] == f"C{c['n']}"
            assert c["case_url"] == f"/v1/cases/{c['case_id']}"


def test_draft_errors(client):
    r = client.post("/v1/drafts", data={"image_id": "1", "generator": "openai"})
    assert r.status_code == 400 and "not enabled" in error_of(r)["message"]
    r = client.post("/v1/drafts", files={"file": ("x.txt", b"text", "text/plain")})
    assert r.status_code == 415


def test_draft_is_501_without_the_rag_module(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "medsearch.rag", None)  # import medsearch.rag now raises ImportError
    r = client.post("/v1/drafts", data={"image_id": "1"})
    assert r.status_code == 501
    assert error_of(r)["code"] == "not_installed"


# ---------------------------------------------------------------------------- auth
@pytest.fixture(scope="module")
def keys(tmp_mod):
    store = KeyStore(tmp_mod / "auth-keys.json")
    read_info, read_key = store.add("read", "reader")
    admin_info, admin_key = store.add("admin", "ops")
    revoked_info, revoked_key = store.add("read", "old")
    store.revoke(revoked_info.id)
    return {"store": store, "read": read_key, "admin": admin_key, "revoked": revoked_key, "read_id": read_info.id}


@pytest.fixture(scope="module")
def secured(indexed_home, towers, tmp_mod, keys):
    s = settings_for(indexed_home, tmp_mod, auth="required", keys_file=keys["store"].path,
                     audit_log=tmp_mod / "secured-audit.log")  # fmt: skip
    with TestClient(create_app(s, encoder=towers)) as c:
        yield c


def test_keys_are_stored_hashed(keys):
    text = keys["store"].path.read_text()
    assert keys["read"] not in text and keys["admin"] not in text and "sha256:" in text
    assert oct(keys["store"].path.stat().st_mode & 0o777) == "0o600"
    assert keys["store"].verify(keys["read"]).scope == "read"
    assert keys["store"].verify(keys["read"][:-1] + ("A" if keys["read"][-1] != "A" else "B")) is None
    assert keys["store"].verify(keys["revoked"]) is None


def test_auth_required_refuses_missing_and_bad_keys(secured, keys):
    body = {"query": "brain", "k": 2}
    r = secured.post("/v1/search/text", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in error_of(r)["message"]
    for headers in ({"Authorization": "Bearer msk_00000000_" + "x" * 43}, {"X-API-Key": "nonsense"},
                    {"Authorization": f"Bearer {keys['revoked']}"}, {"Authorization": f"Basic {keys['read']}"}):  # fmt: skip
        assert secured.post("/v1/search/text", json=body, headers=headers).status_code == 401, headers
    for url in ("/v1/facets", "/v1/cases/1", "/v1/images/1/thumbnail", "/metrics"):
        assert secured.get(url).status_code == 401, url
    assert secured.get("/v1/health").status_code == 200  # liveness needs no key


@pytest.mark.parametrize("headers, needle", [({"X-API-Key": ""}, "X-API-Key header is empty"),
                                            ({"X-API-Key": "   "}, "X-API-Key header is empty"),
                                            ({"Authorization": ""}, "not a Bearer token"),
                                            ({"Authorization": "Bearer "}, "not a Bearer token")])  # fmt: skip
def test_an_empty_key_header_is_an_invalid_key_not_anonymous(client, headers, needle):
    """Even where anonymous reads are allowed (loopback), a key header that is there but empty is
    refused: a client whose key variable is unset learns it instead of silently reading anonymously."""
    assert client.get("/v1/facets").status_code == 200  # no header at all: anonymous read access
    r = client.get("/v1/facets", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    err = error_of(r)
    assert err["code"] == "unauthorized" and needle in err["message"] and "keys add" in err["hint"]


def test_read_key_reads_by_bearer_or_header_but_cannot_reindex(secured, keys):
    for headers in ({"Authorization": f"Bearer {keys['read']}"}, {"X-API-Key": keys["read"]}):
        assert secured.post("/v1/search/text", json={"query": "brain", "k": 2}, headers=headers).status_code == 200
        assert secured.get("/v1/images/1/thumbnail", headers=headers).status_code == 200
    r = secured.post("/v1/admin/reindex", headers={"X-API-Key": keys["read"]})
    assert r.status_code == 403 and "admin" in error_of(r)["message"]
    r = secured.post("/v1/admin/reindex", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert r.status_code == 200 and r.json()["swapped"] is True


def test_a_key_revoked_while_serving_is_refused(secured, tmp_mod, keys):
    info, key = keys["store"].add("read", "temp")
    headers = {"X-API-Key": key}
    assert secured.get("/v1/facets", headers=headers).status_code == 200
    time.sleep(0.01)  # a new mtime for the keys file
    keys["store"].revoke(info.id)
    assert secured.get("/v1/facets", headers=headers).status_code == 401


def test_audit_log_names_the_key_and_never_holds_the_image(secured, keys, tmp_mod, catalog_rows):
    data = Path(catalog_rows["path"]).read_bytes()
    headers = {"X-API-Key": keys["read"]}
    secured.post("/v1/search/text", json={"query": "audit me please", "k": 3}, headers=headers)
    secured.post("/v1/search/image", files={"file": ("s.png", data, "image/png")}, data={"k": "2"}, headers=headers)
    lines = [json.loads(x) for x in (tmp_mod / "secured-audit.log").read_text().splitlines()]
    text = [x for x in lines if x.get("query") == "audit me please"][-1]
    assert text["who"] == f"key:{keys['read_id']}" and text["name"] == "reader" and text["results"] == 3
    assert text["action"] == "search.text" and text["status"] == 200 and text["ts"].endswith("+00:00")
    img = [x for x in lines if x["action"] == "search.image"][-1]
    assert img["results"] == 2 and len(img["upload_sha256"]) == 64 and img["upload_bytes"] == len(data)
    raw = (tmp_mod / "secured-audit.log").read_text()
    assert keys["read"] not in raw and max(len(x) for x in raw.splitlines()) < 2000


def test_binding_beyond_loopback_requires_keys(indexed_home, tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    s = settings_for(indexed_home, tmp_path, host="0.0.0.0", auth="off")
    assert s.auth_required  # "off" cannot open a public port
    with pytest.raises(InvalidInput, match="no active key") as e:
        create_app(s)
    assert "keys add" in e.value.hint
    KeyStore(s.keys_path).add("read")
    create_app(s)  # builds once a key exists
    with pytest.raises(NotFound, match="no catalog"):
        create_app(settings_for(tmp_path / "empty-home", tmp_path))


def test_rate_limit_per_key(indexed_home, towers, tmp_path):
    store = KeyStore(tmp_path / "k.json")
    _, a = store.add("read", "a")
    _, b = store.add("read", "b")
    s = settings_for(indexed_home, tmp_path, auth="required", keys_file=store.path, rate_per_minute=6, rate_burst=3)
    with TestClient(create_app(s, encoder=towers)) as c:
        codes = [c.get("/v1/facets", headers={"X-API-Key": a}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/v1/facets", headers={"X-API-Key": a})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10
        assert error_of(r)["code"] == "rate_limited"
        assert c.get("/v1/facets", headers={"X-API-Key": b}).status_code == 200  # buckets are per key
        assert "medsearch_rate_limited_total 2.0" in c.get("/metrics", headers={"X-API-Key": b}).text


def test_cors_is_off_unless_configured(indexed_home, towers, tmp_path, client):
    origin = {"Origin": "https://pacs.example.org"}
    assert "access-control-allow-origin" not in client.get("/v1/health", headers=origin).headers
    s = settings_for(indexed_home, tmp_path, cors_origins=("https://pacs.example.org",))
    with TestClient(create_app(s, encoder=towers)) as c:
        r = c.get("/v1/health", headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://pacs.example.org"
        pre = c.options("/v1/search/text", headers={**origin, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization"})  # fmt: skip
        assert pre.status_code == 200
        other = c.get("/v1/health", headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------------------- metrics and errors
def test_metrics_count_routes_and_index_size(client, catalog_rows):
    client.post("/v1/search/text", json={"query": "metrics probe", "k": 2})
    client.get("/v1/cases/999999")
    text = client.get("/metrics").text
    assert 'medsearch_http_requests_total{method="POST",route="/v1/search/text",status="200"}' in text
    assert 'medsearch_http_requests_total{method="GET",route="/v1/cases/{case_ref}",status="404"}' in text
    assert 'medsearch_http_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/search/text"}' in text
    assert f'medsearch_index_vectors{{space="image"}} {float(catalog_rows["counts"]["image"])}' in text
    assert 'medsearch_index_generation{space="text"}' in text


def test_home_without_index_answers_409_without_paths(tmp_path, towers):
    home = tmp_path / "fresh"
    Catalog.open(home / "catalog.db").close()
    with TestClient(create_app(settings_for(home, tmp_path), encoder=towers)) as c:
        assert c.get("/v1/health").json()["status"] == "no_index"
        r = c.post("/v1/search/text", json={"query": "anything"})
        assert r.status_code == 409
        err = error_of(r)
        assert err["code"] == "index_not_built" and "medsearch index" in err["hint"]
        assert str(tmp_path) not in r.text and "/tmp" not in r.text


def test_unexpected_errors_are_bare_500s(indexed_home, towers, tmp_path):
    app = create_app(settings_for(indexed_home, tmp_path), encoder=towers)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app.state.ms.catalog.close()  # a real failure: the SQLite connection is gone
        r = c.get("/v1/cases/1")
        assert r.status_code == 500
        err = error_of(r)
        assert err == {"code": "internal", "message": "internal server error", "hint": err["hint"],
                       "request_id": r.headers["x-request-id"]}  # fmt: skip
        assert "Traceback" not in r.text and "sqlite" not in r.text.lower() and str(indexed_home) not in r.text


# ---------------------------------------------------------------------------- hot swap
def _add_medpix_case(home: Path, towers) -> None:
    """Ingest one more medpix case and embed it: a new index generation with more vectors."""
    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.config import EmbedConfig, Paths

    cat = Catalog.open(home / "catalog.db")
    have = {r[0] for r in cat.db.execute("SELECT key FROM cases WHERE source = 'medpix-2.0'")}
    extra = None
    with open(MEDPIX / "reports.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["id"] not in have and len(r["images"]) == 1:
                extra = r["id"]
                break
    data = make_slice(home.parent / "extra-case", MEDPIX, {extra})
    ingest_path(cat, data, source="medpix-2.0")
    run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=4, workers=0), progress=False)
    cat.close()


def test_reindex_swaps_generation_while_searches_run(indexed_home, towers, tmp_path, keys):
    home = tmp_path / "home"
    shutil.copytree(indexed_home, home, ignore=shutil.ignore_patterns("audit.log"))
    s = settings_for(home, tmp_path, auth="required", keys_file=keys["store"].path)
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    with TestClient(create_app(s, encoder=towers)) as c:
        before = c.get("/v1/health").json()["indexes"]
        results: list[tuple[int, dict]] = []
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                r = c.post("/v1/search/text", json={"query": "lesion", "k": 3}, headers=admin)
                results.append((r.status_code, r.json().get("generation", {})))

        t = threading.Thread(target=hammer)
        t.start()
        try:
            _add_medpix_case(home, towers)
            # the catalog now has more vectors than the loaded index: still serving, still consistent
            r = c.post("/v1/admin/reindex", headers=admin)
            assert r.status_code == 200, r.text
            time.sleep(0.3)
        finally:
            stop.set()
            t.join()
        after = c.get("/v1/health").json()["indexes"]
        assert after["image"]["generation"] == before["image"]["generation"] + 1
        assert after["image"]["count"] > before["image"]["count"]
        assert r.json()["indexes"]["image"] == after["image"]["count"]
        assert results and all(code == 200 for code, _ in results)
        gens = [g["image"] for _, g in results]
        assert gens == sorted(gens)  # no request went back to an old generation after the swap
        assert gens[-1] == after["image"]["generation"]


def test_failed_reload_keeps_serving_the_old_generation(indexed_home, towers, tmp_path, keys):
    home = tmp_path / "home"
    shutil.copytree(indexed_home, home, ignore=shutil.ignore_patterns("audit.log"))
    s = settings_for(home, tmp_path, auth="required", keys_file=keys["store"].path)
    admin = {"X-API-Key": keys["admin"]}
    with TestClient(create_app(s, encoder=towers)) as c:
        gen = c.get("/v1/health").json()["indexes"]["text"]["generation"]
        cat = Catalog.open(home / "catalog.db")
        extra = cat.db.execute("SELECT max(id) FROM texts").fetchone()[0]
        with cat.atomic():  # one stored vector more than the index holds: mid-`medsearch index`
            cat.db.execute(
                "INSERT INTO texts (case_id, section, kind, seq, text) VALUES (1, 'findings', 'sentence', 99, 'x')"
            )
            cat.put_vectors("towers", "text", [extra + 1], towers.encode_texts(["x"]))
        cat.close()
        # a generation that only lacks the newest vectors keeps serving (every id it holds exists)
        r = c.post("/v1/admin/reindex", headers=admin)
        assert r.status_code == 200, r.text
        h = c.get("/v1/health").json()
        assert h["status"] == "ok" and h["indexes"]["text"]["generation"] == gen
        assert h["indexes"]["text"]["behind"] == 1 and h["indexes"]["image"]["behind"] == 0
        assert c.post("/v1/search/text", json={"query": "lung", "k": 3}, headers=admin).status_code == 200
        cat = Catalog.open(home / "catalog.db")
        with cat.atomic():  # two vectors the index holds are gone from the catalog (removed data): refused
            cat.db.execute("DELETE FROM vectors WHERE space = 'text' AND item_id IN "
                           "(SELECT item_id FROM vectors WHERE space = 'text' ORDER BY item_id LIMIT 2)")  # fmt: skip
        cat.close()
        r = c.post("/v1/admin/reindex", headers=admin)
        assert r.status_code == 409 and error_of(r)["code"] == "index_inconsistent"
        h = c.get("/v1/health").json()
        assert h["status"] == "degraded" and h["indexes"]["text"]["generation"] == gen and h["last_reload_error"]
        assert c.post("/v1/search/text", json={"query": "lesion", "k": 2}, headers=admin).status_code == 200


def test_file_watch_picks_up_a_new_generation(indexed_home, towers, tmp_path):
    from indexer.embed import build_indexes
    from medsearch.config import Paths

    home = tmp_path / "home"
    shutil.copytree(indexed_home, home, ignore=shutil.ignore_patterns("audit.log"))
    with TestClient(create_app(settings_for(home, tmp_path, watch_seconds=0.2), encoder=towers)) as c:
        gen = c.get("/v1/health").json()["indexes"]["image"]["generation"]
        cat = Catalog.open(home / "catalog.db")
        build_indexes(cat, Paths(home), model_id="towers", weights_hash=towers.weights_hash,
                      dims={"image": towers.image_dim, "text": towers.text_dim}, force=True)  # fmt: skip
        cat.close()
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            seen.append({s: i["generation"] for s, i in c.get("/v1/health").json()["indexes"].items()})
            if seen[-1] != {"image": gen, "text": gen}:
                break
            time.sleep(0.05)
        # both spaces arrive in one swap (the watch waits for the manifests to settle)
        assert seen[-1] == {"image": gen + 1, "text": gen + 1}, seen
        assert 'medsearch_index_reloads_total{result="ok"} 2.0' in c.get("/metrics").text


# ---------------------------------------------------------------------------- routes in isolation
def test_reindex_scope_with_the_principal_overridden(indexed_home, towers, tmp_path):
    """The auth dependency replaced by a fixed caller: the route's own scope check and audit line."""
    from api.deps import get_principal
    from api.principal import Principal

    app = create_app(settings_for(indexed_home, tmp_path), encoder=towers)
    with TestClient(app) as c:
        app.dependency_overrides[get_principal] = lambda: Principal("key:test0001", "reader", "read", False)
        r = c.post("/v1/admin/reindex")
        assert r.status_code == 403 and error_of(r)["code"] == "forbidden"
        app.dependency_overrides[get_principal] = lambda: Principal("key:test0002", "ops", "admin", False)
        r = c.post("/v1/admin/reindex")
        assert r.status_code == 200 and r.json()["swapped"] is True
        assert c.get("/v1/cases/NOPE123").status_code == 404
        app.dependency_overrides.clear()
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    reindex = [x for x in lines if x["action"] == "admin.reindex"]
    assert [(x["who"], x["status"]) for x in reindex] == [("key:test0002", 200)]  # refused before the route ran
    case = [x for x in lines if x["action"] == "case.get"][-1]
    assert case["status"] == 404 and case["case"] == "NOPE123" and case["name"] == "ops"


def test_audit_records_the_status_an_error_ended_with(client, tmp_mod):
    assert client.post("/v1/search/text", json={"query": "fracture", "mode": "image"}).status_code == 409
    assert client.post("/v1/search/image", data={"image_id": "99999999"}).status_code == 404
    lines = [json.loads(x) for x in (tmp_mod / "audit.log").read_text().splitlines()]
    text = [x for x in lines if x["action"] == "search.text" and x.get("mode") == "image"][-1]
    assert text["status"] == 409 and text["results"] == 0 and text["query"] == "fracture"
    image = [x for x in lines if x["action"] == "search.image" and x.get("image_id") == 99999999][-1]
    assert image["status"] == 404 and image["who"].startswith("anon:")


def test_openapi_documents_every_error_status_with_core_codes(client):
    from medsearch.errors import error_codes

    spec = client.get("/openapi.json").json()
    documented = {(m, p): set(op["responses"]) for p, ops in spec["paths"].items() for m, op in ops.items()}
    must = {
        ("post", "/v1/search/text"): {"400", "401", "409", "413", "422", "429"},
        ("post", "/v1/search/image"): {"400", "401", "404", "409", "413", "415", "422", "429"},
        ("post", "/v1/drafts"): {"400", "401", "404", "409", "413", "415", "422", "429", "501", "502", "503"},
        ("get", "/v1/cases/{case_ref}"): {"401", "404", "422", "429"},
        ("get", "/v1/images/{image_id}"): {"304", "401", "404", "415", "422", "429"},
        ("post", "/v1/admin/reindex"): {"401", "403", "409", "429"},
        ("get", "/metrics"): {"401", "429"},
    }
    for op, statuses in must.items():
        assert statuses <= documented[op], (op, statuses - documented[op])
    assert "bm25" in spec["components"]["schemas"]["TextSearchRequest"]["properties"]["mode"]["enum"]
    for code in error_codes():
        assert f"`{code}`" in spec["info"]["description"], code


def test_api_draft_is_the_cli_draft_json_plus_urls(client, indexed_home, catalog_rows):
    """One draft JSON shape: POST /v1/drafts = `medsearch draft --json` (draft_to_dict) + URL fields."""
    from typer.testing import CliRunner

    from cli.main import app

    iid = catalog_rows["image_id"]
    api = client.post("/v1/drafts", data={"image_id": str(iid)}).json()
    r = CliRunner().invoke(app, ["draft", str(iid), "--home", str(indexed_home), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    extra = {"took_ms", "query_image"}
    assert set(api) == set(cli) | extra
    for side in (api, cli):
        side.pop("timings")
    for e in api["evidence"]:
        assert e.pop("case_url") == f"/v1/cases/{e['case_id']}" and e.pop("thumbnail_url").endswith("/thumbnail")
    for sent in api["sentences"]:
        for c in sent["citations"]:
            assert c.pop("case_url") == f"/v1/cases/{c['case_id']}"
    assert {k: v for k, v in api.items() if k not in extra} == cli


# ---------------------------------------------------------------------------- CLI
def test_cli_keys_and_serve_refusal(indexed_home, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    kf = tmp_path / "keys.json"
    r = runner.invoke(app, ["keys", "add", "--scope", "admin", "--name", "ops", "--keys-file", str(kf)])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[0]
    assert key.startswith("msk_") and KeyStore(kf).verify(key).scope == "admin"
    r = runner.invoke(app, ["keys", "list", "--keys-file", str(kf), "--json"])
    listed = json.loads(r.stdout)
    assert listed[0]["name"] == "ops" and "hash" not in listed[0] and key not in r.stdout
    assert runner.invoke(app, ["keys", "add", "--scope", "root", "--keys-file", str(kf)]).exit_code == 2
    r = runner.invoke(app, ["keys", "revoke", listed[0]["id"], "--keys-file", str(kf)])
    assert r.exit_code == 0 and KeyStore(kf).verify(key) is None
    r = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--home", str(indexed_home), "--keys-file", str(kf)])
    assert r.exit_code == 2 and "keys add" in r.output
    help_text = runner.invoke(app, ["serve", "--help"]).output
    assert "--max-upload-mb" in help_text and "--repeat-penalty" in help_text  # the shared LLM option block


def test_api_imports_the_core_only():
    """api -> medsearch; never the pipeline (indexer) or the CLI."""
    import ast

    root = Path(__file__).resolve().parents[1] / "api"
    offenders = []
    for p in root.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [f"{p.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("indexer", "cli")]
    assert not offenders, offenders
