"""The web page end to end: real headless Debian Chromium (Playwright, no browser download)
against a real uvicorn server on 127.0.0.1, on the small indexed home.

Needs /usr/bin/chromium (`apt-get install -y chromium`; scripts/test.sh does it in CI).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import COVID

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(indexed_home, towers, tmp_path_factory):
    """A real uvicorn server in a thread: loopback, no keys (read access), no rate limit."""
    import uvicorn

    from api.app import create_app
    from api.settings import ApiSettings

    tmp = tmp_path_factory.mktemp("web")
    port = _free_port()
    settings = ApiSettings(home=indexed_home, device="cpu", port=port, watch_seconds=0, rate_per_minute=0,
                           keys_file=tmp / "keys.json", audit_log=tmp / "audit.log")  # fmt: skip
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, encoder=towers), host="127.0.0.1", port=port,
                                        log_level="warning", lifespan="on"))  # fmt: skip
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert t.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(15)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: scripts/test.sh installs it with apt-get")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's CSP forbids
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    pg = ctx.new_page()
    pg.set_default_timeout(180_000)  # generous: a loaded 2-core CI machine embeds uploads slowly
    errors: list[str] = []
    outside: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: None if r.url.startswith((server, "blob:", "data:")) else outside.append(r.url))
    yield pg
    ctx.close()
    assert not errors, errors
    assert not outside, f"the page fetched something off the server: {outside}"


def test_search_open_case_upload_and_draft(page, server, tmp_path):
    page.goto(server + "/")
    page.wait_for_function("document.querySelector('#health').textContent.includes('model towers')")
    # the filters come from /v1/facets
    page.wait_for_function("document.querySelectorAll('#modality option').length > 2")

    # ---- type a query, see results with thumbnails, scores and diagnoses
    page.fill("#q", "bilateral ground glass opacities")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li.card")
    cards = page.locator("#results li.card")
    assert cards.count() >= 5
    first = cards.first
    assert float(first.locator(".score").inner_text()) > 0
    assert first.locator(".dx").inner_text().strip()
    alt = first.locator("img.thumb").get_attribute("alt")
    assert alt and "from case" in alt
    page.wait_for_function(
        "[...document.querySelectorAll('#results img.thumb')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert "cases for" in page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "1-results.png"), full_page=True)

    # ---- open a case with the keyboard; the dialog shows the report and all its images
    key = first.get_attribute("data-case")
    first.locator("button.open").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog#case[open]")
    page.wait_for_function(
        "[...document.querySelectorAll('#case-images img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#case-report h3").count() >= 1
    assert page.locator("#case-images img").count() >= 1
    assert all(
        page.locator("#case-images img").nth(i).get_attribute("alt")
        for i in range(page.locator("#case-images img").count())
    )
    assert page.evaluate("document.activeElement.id") == "case-close"
    page.screenshot(path=str(tmp_path / "2-case.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog#case:not([open])", state="attached")
    assert page.evaluate("document.activeElement.closest('li.card')?.dataset.case") == key  # focus returns

    # ---- filter by modality: the search reruns
    page.select_option("#modality", "CT")
    page.wait_for_function(
        "[...document.querySelectorAll('#results li.card .meta')].length > 0 && "
        "[...document.querySelectorAll('#results li.card .meta')].every(m => m.textContent.startsWith('CT'))"
    )
    page.select_option("#modality", "")

    # ---- upload an image: similar cases, its own case first (the file is in the catalog)
    image = sorted((COVID / "images").glob("*.png"))[0]
    page.set_input_files("#file", str(image))
    page.wait_for_function(f"document.querySelector('#status').textContent.includes('cases for {image.name}')")
    page.wait_for_selector("#results li.card")
    assert page.is_visible("#query-preview")
    top = page.locator("#results li.card").first
    assert float(top.locator(".score").inner_text()) > 0.99
    page.wait_for_function("document.querySelector('#query-img').naturalWidth > 0")
    page.screenshot(path=str(tmp_path / "3-similar.png"), full_page=True)

    # ---- draft a report; a citation opens the cited case
    page.click("#draft-button")
    page.wait_for_selector("#draft button.cite")
    cite = page.locator("#draft button.cite").first
    cited = cite.get_attribute("aria-label")
    assert cited.startswith("Citation C")
    page.screenshot(path=str(tmp_path / "4-draft.png"), full_page=True)
    cite.click()
    page.wait_for_selector("dialog#case[open]")
    assert cited.split("open case ")[1] in page.inner_text("#case-title")
    page.keyboard.press("Escape")

    keep = os.environ.get("MEDSEARCH_SCREENSHOTS")  # copy them out for a person to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in tmp_path.glob("*.png"):
            shutil.copy(shot, Path(keep) / shot.name)


def test_key_prompt_when_the_server_requires_keys(browser, indexed_home, towers, tmp_path):
    """With auth required the page asks for a key, then works with it (thumbnails fetched with the key)."""
    import uvicorn

    from api.app import create_app
    from api.keys import KeyStore
    from api.settings import ApiSettings

    store = KeyStore(tmp_path / "keys.json")
    _, key = store.add("read", "browser")
    port = _free_port()
    settings = ApiSettings(home=indexed_home, device="cpu", port=port, auth="required", keys_file=store.path,
                           watch_seconds=0, audit_log=tmp_path / "audit.log")  # fmt: skip
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, encoder=towers), host="127.0.0.1", port=port,
                                        log_level="warning"))  # fmt: skip
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        while not srv.started:
            assert t.is_alive()
            time.sleep(0.05)
        ctx = browser.new_context(bypass_csp=True)
        pg = ctx.new_page()
        pg.set_default_timeout(180_000)  # generous: a loaded 2-core CI machine embeds uploads slowly
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.wait_for_selector("#key-form:not([hidden])")  # /v1/facets answered 401
        pg.fill("#key-input", key)
        pg.click("#key-form button[type=submit]")
        pg.wait_for_function("document.querySelectorAll('#modality option').length > 2")
        pg.fill("#q", "pneumonia")
        pg.keyboard.press("Enter")
        pg.wait_for_selector("#results li.card")
        pg.wait_for_function(
            "[...document.querySelectorAll('#results img.thumb')].slice(0, 2).every(i => i.complete && i.naturalWidth > 0)"
        )
        assert pg.locator("#results img.thumb").first.get_attribute("src").startswith("blob:")
        ctx.close()
    finally:
        srv.should_exit = True
        t.join(15)
