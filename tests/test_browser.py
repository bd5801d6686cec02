"""The standalone app in a real browser: Playwright drives Debian's chromium (no browser download).

``python -m captioners ui`` runs in a subprocess on a free loopback port with the tiny model; the
page may not reach anything else (requests to other hosts are aborted).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from captioners.service import CaptionService, Host, Settings
from tests.app_logs import app_errors
from tests.webui_host import TINY, write_tiny_preset

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CAPTIONERS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 120_000  # two shared CPU cores: be patient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, icg_checkpoint, clip_overrides) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("browser") / "models", icg_checkpoint.path, clip_overrides)


@pytest.fixture(scope="module")
def app_url(models_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("app-log") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "captioners", "ui", "--models-dir", str(models_dir), "--model", TINY,
             "--device", "cpu", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    log_text = log_path.read_text()
    assert not app_errors(log_text), log_text[-3000:]


def test_app_errors_ignores_only_clients_that_left():
    gone = "Traceback (most recent call last):\n  File \"x\", line 1\nstarlette.websockets.WebSocketDisconnect: 1001\n"
    broken = "Traceback (most recent call last):\n  File \"y\", line 2\n    boom()\nValueError: bad caption\n"
    assert app_errors("INFO: started\n" + gone) == []
    assert app_errors(gone + "INFO: next\n" + broken) == ["ValueError: bad caption"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} not found (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: never pass by skipping there
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(app_url)
               else route.abort())
    page.goto(app_url)
    page.wait_for_selector("#captioners_caption_button")
    yield page
    context.close()


def open_tab(page, name: str) -> None:
    """A sub-tab of the Captioners tab: a button in gradio 3; role=tab later (gradio 6 also keeps
    hidden copies of the buttons for its overflow menu)."""
    from captioners.ui.compat import GRADIO_MAJOR

    button = "[role=tab]" if GRADIO_MAJOR >= 4 else ".tab-nav > button"
    page.locator(f"#captioners_tabs {button}:has-text('{name}')").first.click()


def test_upload_caption_edit(page, models_dir, photos):
    from playwright.sync_api import expect

    settings = Settings(models_dir=models_dir, model=TINY, device="cpu")
    expected = CaptionService(Host(lambda: settings)).caption([Image.open(photos[0])])[1][0]
    page.set_input_files("#captioners_image input[type=file]", str(photos[0]))
    page.wait_for_selector("#captioners_image img")
    page.click("#captioners_caption_button")
    caption = page.locator("#captioners_caption textarea")
    expect(caption).to_have_value(expected)
    expect(page.locator("#captioners_status textarea")).to_have_value(re.compile(rf"^{TINY} · [0-9.]+ s$"))
    caption.fill("a dog on the beach, my trigger word")
    caption.press("Tab")
    expect(caption).to_have_value("a dog on the beach, my trigger word")


def test_caption_a_region_given_as_a_box_then_painted(page, models_dir, photos):
    """The Caption tab's Region: a box in the x, y, w, h fields, the outside greyed out; then a stroke
    painted on the brush's copy of the image, which wins over the box."""
    from playwright.sync_api import expect

    from captioners.regions import Box, RegionOptions, crop_region
    from captioners.ui.compat import GRADIO_MAJOR

    settings = Settings(models_dir=models_dir, model=TINY, device="cpu")
    crop = crop_region(Image.open(photos[2]), Box(120, 80, 200, 150), RegionOptions(outside="grey"))
    expected = CaptionService(Host(lambda: settings)).caption([crop.image])[1][0]
    page.set_input_files("#captioners_image input[type=file]", str(photos[2]))
    page.wait_for_selector("#captioners_image img")
    page.locator("#captioners_region").get_by_text("Region: caption part of the image").first.click()
    # gradio 6 mounts an accordion's components when it opens; an edit made before their modules
    # have loaded reaches the page but not the app's state (x stayed 0 in about 1 run in 4 here).
    page.wait_for_load_state("networkidle")
    for name, value in zip("xywh", (120, 80, 200, 150)):
        field = page.locator(f"#captioners_region_{name} input[type=number]").first
        expect(field).to_have_value("0")
        field.fill(str(value))
        field.press("Tab")
    page.locator("#captioners_region_outside").get_by_text("grey", exact=True).click()
    page.click("#captioners_region_button")
    status = page.locator("#captioners_status textarea")
    expect(status).to_have_value(re.compile(rf" · region {crop.box}$"))
    expect(page.locator("#captioners_caption textarea")).to_have_value(expected)
    # Painting in a real browser is checked in gradio 3 (the sketch tool) and from gradio 5 on. This app's
    # gradio 3 mounts the editor when the accordion opens; A1111 and reForge keep it mounted while
    # hidden, where the copied image painted nothing before ui.region's redraw and compat.mask_editor_image's
    # brush radius (tried in both; test_region_tab checks that wiring). gradio 4.40's ImageMask did not
    # take this stroke (seen in CI under the Forge pins); the value shapes it sends are tested in
    # test_region_tab.
    if GRADIO_MAJOR == 4:
        return
    canvas = page.locator("#captioners_region_mask canvas").last  # the top canvas that takes strokes
    area = canvas.bounding_box()
    x, y = area["x"] + area["width"] * 0.5, area["y"] + area["height"] * 0.3
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y + 30, steps=10)
    page.mouse.up()
    page.click("#captioners_region_button")
    expect(status).not_to_have_value(re.compile(rf" · region {crop.box}$"))
    width, height = Image.open(photos[2]).size
    found = re.search(r" · region (\d+)x(\d+) at (\d+),(\d+)$", status.input_value())
    assert found, status.input_value()
    w, h, left, top = map(int, found.groups())
    assert 0 < w < width and 0 < h < height and left + w <= width and top + h <= height


def test_models_tab_lists_files(page):
    from playwright.sync_api import expect

    open_tab(page, "Models")
    table = page.locator("#captioners_models_table").first
    expect(table).to_contain_text(TINY)
    expect(table).to_contain_text("coco_weights.pt")
    log = page.locator("#captioners_models_log textarea")
    page.click("#captioners_unload")
    expect(log).to_have_value(re.compile(rf"^(Unloaded {TINY}\.|No model was loaded\.)$"))
    page.click("#captioners_unload")
    expect(log).to_have_value("No model was loaded.")


def make_images(folder: Path, count: int, size: int = 48) -> Path:
    """Small distinct PNGs (fast to write and to caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(folder / f"{i:04d}.png")
    return folder


def start_batch(page, folder: Path, batch_size: int) -> None:
    open_tab(page, "Batch")
    page.fill("#captioners_batch_inputs textarea", str(folder))
    size = page.locator("#captioners_batch_size input[type=number]").first
    size.fill(str(batch_size))
    size.press("Enter")
    page.click("#captioners_batch_start")


def test_batch_shows_progress_and_summary_then_interrupts_a_second_one(page, photos, tmp_path):
    from playwright.sync_api import expect

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).write_bytes(photo.read_bytes())
    start_batch(page, folder, 4)
    summary = page.locator("#captioners_batch_summary").first
    expect(summary).to_contain_text("Batch finished")
    expect(summary).to_contain_text(f"captioned {len(photos)}, skipped 0, failed 0")
    progress = page.locator("#captioners_batch_progress").first
    expect(progress).to_contain_text(f"{len(photos)}/{len(photos)}")
    expect(progress).to_contain_text("images/s")
    previews = page.locator("#captioners_batch_previews").first
    expect(previews).to_contain_text(photos[-1].name)  # the latest captions, not the first ones
    expect(previews).not_to_contain_text(photos[0].name)
    expect(progress).not_to_contain_text("ETA")  # the batch has ended
    expect(page.locator("#captioners_batch_failures").first).to_contain_text("No failures.")
    assert sorted(p.stem for p in folder.glob("*.txt")) == sorted(p.stem for p in photos)

    big = make_images(tmp_path / "big", 600)
    start_batch(page, big, 1)
    expect(progress).to_have_text(re.compile(r".*\b([1-9]\d*)/600\b.*"))  # under way, not done
    page.click("#captioners_batch_interrupt")
    expect(page.locator("#captioners_batch_notice").first).to_contain_text("Interrupt requested")
    expect(summary).to_contain_text("Batch interrupted")
    expect(progress).to_contain_text("Interrupted at")
    expect(progress).not_to_contain_text("ETA")  # it kept showing the last one
    written = len(list(big.glob("*.txt")))
    assert 0 < written < 600
    assert not list(big.glob("*.tmp*")), "an interrupted run leaves no partial files"


@pytest.fixture(scope="module")
def auth_app_url(models_dir, tmp_path_factory):
    """The app again, with ``--auth alice:secret --api``."""
    from tests.test_app_auth import running_app

    log_path = tmp_path_factory.mktemp("auth-app-log") / "app.log"
    with running_app(models_dir, log_path, "--auth", "alice:secret", "--api") as app:
        assert app.statuses == [401]
        yield app.url


def test_with_auth_the_browser_logs_in_and_captions(browser, auth_app_url, models_dir, photos):
    """HTTP basic auth in front of the whole app: the browser's credentials (a login prompt for a
    person) go with the page's every request, gradio's queue included, and a caption comes back."""
    from playwright.sync_api import expect

    from playwright.sync_api import Error

    anonymous = browser.new_context()  # no credentials: the browser gets the 401, never the page
    try:
        page = anonymous.new_page()
        try:
            response = page.goto(auth_app_url)
        except Error as exc:  # headless chromium under Playwright: the unanswered challenge fails the load
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
        else:
            assert response.status == 401
        assert page.locator("#captioners_caption_button").count() == 0
        response = anonymous.request.get(auth_app_url)
        assert response.status == 401 and 'realm="Captioners"' in response.headers["www-authenticate"]
    finally:
        anonymous.close()

    settings = Settings(models_dir=models_dir, model=TINY, device="cpu")
    expected = CaptionService(Host(lambda: settings)).caption([Image.open(photos[1])])[1][0]
    context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                  http_credentials={"username": "alice", "password": "secret"})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        statuses = []
        page.on("response", lambda response: statuses.append((response.status, response.url)))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(auth_app_url)
                   else route.abort())
        assert page.goto(auth_app_url).status == 200
        page.set_input_files("#captioners_image input[type=file]", str(photos[1]))
        page.wait_for_selector("#captioners_image img")
        page.click("#captioners_caption_button")
        expect(page.locator("#captioners_caption textarea")).to_have_value(expected)
        expect(page.locator("#captioners_status textarea")).to_have_value(re.compile(rf"^{TINY} · [0-9.]+ s$"))
        # Only the challenge answered by the credentials may be a 401; everything else got through.
        assert [url for status, url in statuses if status == 401] in ([], [auth_app_url])
        assert page.evaluate("async () => (await fetch('captioners/v1/models')).status") == 200
    finally:
        context.close()
