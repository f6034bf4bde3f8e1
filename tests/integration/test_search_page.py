"""The search page of `trainer.retrieve serve`, driven in a real headless browser (Debian's chromium through
selenium and chromedriver; `make install` installs both): a caption query shows pictures that load, an uploaded
or dropped picture shows captions, path traversal and out-of-range rows get 404, an oversized upload 413 and a long
query 400. Takes a screenshot of the answered query; with SEARCH_SCREENSHOT=docs/screenshots/search.png it refreshes the
README's picture (off by default, so a test run leaves the checkout clean). Without the browser the test FAILS
(the feature is untested otherwise), saying how to install it."""
import http.client
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from retrieval_run import REPO, clean_env, exported_index, first_test_picture

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# ../shared/ASSETS.md: without the networking flags chromium floods the closed network with refused connections
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,900")
pytestmark = pytest.mark.slow


def _browser(profile: Path):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"the search page test needs a real browser: {', '.join(missing)} missing; install it with "
                    f"`make install` (as root: apt-get install -y chromium chromium-driver)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _start_server(index_dir: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`serve --port 0` in its own process; the port from its 'serving ... on http://127.0.0.1:PORT/' line."""
    proc = subprocess.Popen([sys.executable, "-m", "trainer.retrieve", "serve", "--index", str(index_dir),
                             "--port", "0", "--max-upload-mb", "1"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            seen.append(line)
            match = re.search(r"serving the search page on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                return proc, int(match.group(1))
        if proc.poll() is not None:
            break
    proc.kill()
    log.write_text("".join(seen))
    pytest.fail(f"the server did not start; its output:\n{''.join(seen)[-3000:]}")


def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    """A request with the path exactly as written (a browser removes '..' segments before sending)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def test_search_page_in_a_real_browser(tiny_shards, tmp_path_factory, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    index_dir = exported_index(tmp_path_factory.getbasetemp(), tiny_shards)
    index_rows = [json.loads(line) for line in (index_dir / "images.jsonl").read_text().splitlines()]
    captions = {json.loads(line)["text"] for line in (index_dir / "captions.jsonl").read_text().splitlines()}
    server, port = _start_server(index_dir, tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}"
    driver = _browser(tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(base + "/")
        wait.until(lambda d: "pictures" in d.find_element(By.ID, "info").text)
        assert "32 pictures, 160 captions" in driver.find_element(By.ID, "info").text
        share = json.loads((index_dir / "index.json").read_text())["local_share"]  # the run's choice on validation
        assert f"score {1 - share:.2f} global + {share:.2f} local" in driver.find_element(By.ID, "info").text

        # A caption query: twelve result pictures, each loaded (naturalWidth > 0), with scores and captions.
        query = index_rows[5]["caption"]
        driver.find_element(By.ID, "q").send_keys(query)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit img")) == 12)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        widths = driver.execute_script("return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)")
        assert len(widths) == 12 and min(widths) > 0
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .caption")]
        assert len(shown) == 12 and set(shown) <= {r["caption"] for r in index_rows}
        scores = [float(e.text.split()[-1]) for e in driver.find_elements(By.CSS_SELECTOR, "#results .score")]
        assert scores == sorted(scores, reverse=True)
        assert driver.find_element(By.ID, "message").text == "top 12 pictures"
        screenshot = Path(os.environ.get("SEARCH_SCREENSHOT") or tmp_path / "search.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000

        # A picture uploaded through the page's file field ranks captions; their pictures load too.
        picture, _ = first_test_picture(tiny_shards, tmp_path)
        driver.find_element(By.ID, "file").send_keys(str(picture))
        wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("data-find") == "captions")
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .caption")]
        assert len(shown) == 12 and set(shown) <= captions
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))

        # An oversized upload (2 MB against --max-upload-mb 1) through the same field: 413, said on the page.
        big = tmp_path / "big.png"
        big.write_bytes(picture.read_bytes() + b"\0" * (2 << 20))
        driver.find_element(By.ID, "file").send_keys(str(big))
        wait.until(lambda d: "larger than 1 MB" in d.find_element(By.ID, "message").text)
        assert driver.find_element(By.ID, "message").get_attribute("class") == "error"
        status = driver.execute_async_script(
            "const done = arguments[0]; const form = new FormData();"
            "form.append('picture', new Blob([new Uint8Array(2 << 20)]), 'x.png');"
            "fetch('/api/search_image', {method: 'POST', body: form}).then(r => done(r.status), e => done(String(e)));")
        assert status == 413

        # A picture dropped on the drop zone (a real DragEvent carrying a File: the page's drop handler).
        driver.execute_async_script(
            "const done = arguments[0];"
            "fetch('/image/3').then(r => r.blob()).then(blob => {"
            "  const data = new DataTransfer(); data.items.add(new File([blob], 'dropped.png', {type: blob.type}));"
            "  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true,"
            "                                                                      cancelable: true}));"
            "  done(true); });")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .caption")) == 12)
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .caption")]
        assert set(shown) <= captions and driver.find_element(By.ID, "message").text == "top 12 captions"

        # Pictures only by row: traversal and out-of-range rows are 404 and never reveal a file.
        for path in ("/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2e%2e/%2e%2e/etc/passwd",
                     "/image/99999", "/image/-1", "/image/1.png", "/static/../trainer/retrieve.py"):
            driver.get(base + path)
            assert "root:" not in driver.page_source and "import" not in driver.page_source, path
            code, body = _raw_get(port, path)
            assert code == 404 and b"root:" not in body, (path, code, body[:200])
        assert b"out of range [0, 32)" in _raw_get(port, "/image/99999")[1]
        assert _raw_get(port, "/image/0")[0] == 200

        # A query longer than the bound is refused with its reason; an empty one too.
        status, body = _raw_get(port, "/api/search?q=" + "red+" * 600)
        assert status == 400 and "at most 1000" in json.loads(body)["error"]
        status, body = _raw_get(port, "/api/search?q=")
        assert status == 400 and "the query is empty" in json.loads(body)["error"]
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
