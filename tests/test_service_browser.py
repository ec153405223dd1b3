"""The search page in a real headless Chromium (Debian's, driven by Playwright) against a real
`engine serve` on a free loopback port: unlock with the token, upload, see the grid, hover,
click a result, refine, screenshot."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from playwright import sync_api

from engine.service.client import ServiceClient
from tests.test_service import MARKUP_NAME, N_PHOTOS, ServiceProcess, build_library, service_env

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
TOKEN = "browser-t0k"
THUMB_SRC = re.compile(r"/api/images/(\d+)/thumbnail\?size=\d+$")


def chromium_path() -> str | None:
    """Debian's chromium (Playwright's own browser download needs the network)."""
    for name in (os.environ.get("ENGINE_CHROMIUM"), "chromium", "chromium-browser"):
        found = name and shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, engine_command):
    home, photos = build_library(tmp_path_factory.mktemp("browser"), tiny_model)
    process = ServiceProcess(engine_command, home, service_env(), "--token", TOKEN)
    yield process, photos
    process.stop()


@pytest.fixture()
def page(tmp_path):
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 860})
        tab = context.new_page()
        tab.set_default_timeout(20_000)
        yield tab
        context.close()


def _thumbnails_loaded(page) -> None:
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('.card img')];"
                           " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")


def test_upload_grid_click_refine_screenshot(server, page, tmp_path):
    process, photos = server
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(process.url + "/")

    # Locked: the page asks for the token once, then keeps it.
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", TOKEN)
    page.click("#token-dialog button[type=submit]")
    page.wait_for_function(f"() => document.querySelector('#library').textContent === '{N_PHOTOS + 1} photos'")

    # Upload a photo: a grid of thumbnails with scores.
    page.set_input_files("input[type=file]", str(photos / "img_004.png"))
    page.wait_for_selector(".card img")
    _thumbnails_loaded(page)  # the <img> GETs pass the token gate through the page's cookie
    cards = page.locator(".card")
    assert cards.count() == N_PHOTOS + 1
    sources = [img.get_attribute("src") for img in page.locator(".card img").all()]
    assert all(THUMB_SRC.search(src) for src in sources), sources
    assert page.locator("#query-img").is_visible()
    assert "most similar of" in page.inner_text("#status")
    # In the service's order (a library that expands queries ranks by the expanded query, so
    # the scores shown, the plain query's, need not fall monotonically).
    client = ServiceClient(process.address, TOKEN)
    status, answer = client.search((photos / "img_004.png").read_bytes(), N_PHOTOS + 1, None)
    client.close()
    assert status == 200
    scores = page.locator(".card .score").all_inner_texts()
    assert scores == [f"{h['score']:.3f}" for h in answer["hits"]]
    assert page.locator(".card .name").first.inner_text() == "img_004.png"

    # The file name with markup is shown as text, never run or parsed.
    markup = page.locator(".card", has_text=MARKUP_NAME)
    assert markup.count() == 1
    markup.hover()
    page.wait_for_selector("#tip:not([hidden])")
    assert MARKUP_NAME in page.inner_text("#tip")
    assert page.locator("img[src='x']").count() == 0 and not dialogs

    # Click a result: search from it.
    second = page.locator(".card img").nth(1)
    clicked_id = THUMB_SRC.search(second.get_attribute("src")).group(1)
    second.click()
    page.wait_for_function(f"() => document.querySelector('.card')?.dataset.id === '{clicked_id}'")
    assert page.locator(".card.self .badge").inner_text() == "query"
    assert clicked_id in page.get_attribute("#query-img", "src")
    _thumbnails_loaded(page)

    # Mark one result more like this, one less like this, refine.
    less_id = page.locator(".card").nth(1).get_attribute("data-id")
    page.locator(".card").nth(3).hover()
    page.locator(".card").nth(3).locator(".mark.more").click()
    page.locator(".card").nth(1).hover()
    page.locator(".card").nth(1).locator(".mark.less").click()
    assert page.inner_text("#n-pos") == "1" and page.inner_text("#n-neg") == "1"
    page.click("#refine")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Refined')")
    ids = [c.get_attribute("data-id") for c in page.locator(".card").all()]
    assert less_id not in ids and len(ids) == N_PHOTOS
    assert page.locator(".card.marked-more").count() == 1
    _thumbnails_loaded(page)

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not dialogs
