"""The page at / in a real headless browser (Debian's chromium, driven by Playwright), against the
real `neti-fast serve` command on 127.0.0.1: generate on tiny and see the images appear; train a
concept from the page and see it join the list.

In CI (CI=true) a missing browser or Playwright is a failure, never a silent skip."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from serve_util import SIZE, decode_png, make_concepts

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = os.environ.get("NETI_FAST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("CI: the page test needs the playwright package (the `test` extra installs it)")
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("CI: the page test needs Debian's chromium (.ci/run installs it with apt-get)")
        pytest.skip("no chromium on PATH (apt-get install chromium, or set NETI_FAST_CHROMIUM)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):  # tiny_model: the tiny folder is built in the test cache first
    _need_browser()
    import httpx
    tmp = tmp_path_factory.mktemp("serve-page")
    make_concepts(tmp / "concepts")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "neti_fast", "serve", "--model", "tiny", "--device", "cpu",
                             "--concepts", str(tmp / "concepts"), "--port", str(port), "--state-dir", str(tmp / "state"),
                             "--max-wait-ms", "20"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"neti-fast serve did not start:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.2)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page()
        pg.set_default_timeout(90_000)
        pg.goto(served[0] + "/")
        yield pg
        browser.close()


def test_page_generates(page, served):
    import httpx
    page.wait_for_selector("#concept option[value='cat']", state="attached")
    page.select_option("#concept", "cat")
    page.fill("#prompt", "a photo of {} on the beach")
    page.fill("#seeds", "4-5")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img.result').length === 2")
    assert page.eval_on_selector_all("#gallery img.result", "els => els.map(e => e.complete && e.naturalWidth)") == [SIZE, SIZE]
    assert page.inner_text("#gen-error") == ""
    src = page.get_attribute("#gallery img.result", "src")
    shown = decode_png(src.split(",", 1)[1])
    r = httpx.post(served[0] + "/sdapi/v1/txt2img", timeout=60, json={
        "prompt": "a photo of {} on the beach", "concept": "cat", "seed": 4, "steps": 2, "cfg_scale": 7.5,
        "width": SIZE, "height": SIZE, "sampler_name": "DPM++ 2M", "scheduler": "automatic"})
    want = decode_png(r.json()["images"][0])
    assert int(np.abs(shown.astype(int) - want.astype(int)).max()) <= 1  # the page shows the API's image
    assert page.get_attribute("#gallery a", "download").endswith(".png")


def test_page_truncation_sweep_with_progress(page):
    page.select_option("#concept", "dog")
    page.fill("#seeds", "1")
    page.fill("#steps", "30")  # long enough to see the progress bar move
    for value in ("0", "8"):
        page.fill("#truncation", value)
        page.click("#add-trunc")
    before = page.eval_on_selector_all("#gallery img.result", "els => els.length")
    page.click("#generate")
    page.wait_for_function("(() => { const b = document.getElementById('gen-progress'); "
                           "return !b.hidden && b.value > 0 && b.value < 1; })()", polling=50)
    page.wait_for_function(f"document.querySelectorAll('#gallery img.result').length === {before + 2}")
    rows = page.eval_on_selector_all("#gallery table:first-of-type th", "els => els.map(e => e.textContent)")
    assert "truncation full" in rows and "truncation 8" in rows


def test_page_uploads_a_concept(page, served):
    from neti_fast.concepts.concept import random_concept
    path = random_concept("neti", 32, 77, "<up>", True).save(served[1] / "uploaded-thing.safetensors")
    page.set_input_files("#concept-file", str(path))
    page.click("#upload")
    page.wait_for_selector("#concept option[value='uploaded-thing']", state="attached")
    assert page.inner_text("#upload-error") == "" and "uploaded-thing" in page.inner_text("#upload-msg")


def test_page_trains_a_concept(page, served):
    from neti_fast.demo import make_training_images
    folder = make_training_images(served[1] / "train-images", n=3, size=SIZE)
    page.set_input_files("#train-images", sorted(str(p) for p in folder.glob("*.png")))
    page.fill("#placeholder", "<blob>")
    page.fill("#init-word", "ball")
    page.fill("#train-steps", "12")
    page.click("#train")
    page.wait_for_function("(() => { const b = document.getElementById('train-progress'); "
                           "return !b.hidden && b.value > 0 && b.value < 1 && "
                           "/^step \\d+ \\/ 12/.test(document.getElementById('train-msg').textContent); })()",
                           polling=50, timeout=120_000)  # the live progress bar moves
    page.wait_for_function("document.getElementById('train-msg').textContent.startsWith('trained:') || "
                           "document.getElementById('train-error').textContent.length > 0", timeout=180_000)
    assert page.inner_text("#train-error") == ""
    page.wait_for_selector("#concept option[value='blob']", state="attached")
    assert page.eval_on_selector("#concept", "e => e.value") == "blob"
    assert (served[1] / "state" / "trained" / "blob.safetensors").is_file()


def test_page_errors_say_what_to_do(page):
    """A backwards seed range and a prompt without {} (here in a truncation sweep) say how to fix them."""
    page.select_option("#concept", "cat")
    page.fill("#prompt", "a photo on the beach")
    page.fill("#seeds", "5-2")
    page.click("#generate")
    assert "the range 5-2 is backwards (write 2-5)" in page.inner_text("#gen-error")
    page.fill("#seeds", "1")
    page.click("#generate")
    page.wait_for_function("document.getElementById('gen-error').textContent.length > 0")
    assert "add {} to the prompt" in page.inner_text("#gen-error")
