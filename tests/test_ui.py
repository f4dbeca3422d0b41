"""The search page (``ecsearch ui``, issue 17): a real gRPC server over a real index version,
the page's web app on a loopback port, driven over HTTP and in headless Chromium."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from server.ui.search_api import FACET_POOL
from tests.test_server_support import index_root, server_model, start_server, subset  # noqa: F401
from tests.ui_support import PageThread, chromium_driver, closed_port_target


@pytest.fixture(scope="module")
def grpc_server(index_root):
    server = start_server(index_root)
    server.wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(grpc_server, subset):
    page = PageThread(grpc_server.target, subset.fashion_dir).start()
    yield page
    page.stop()


def _get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET a raw (unnormalised) path, as an attacker would send it."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _post_search(url: str, **fields: str) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/api/search", data=urllib.parse.urlencode(fields).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_photo(url: str, photo: bytes, **fields: str) -> tuple[int, dict]:
    """POST /api/search as the page does (multipart/form-data with the photo as a file)."""
    boundary = "ecsearch-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                 f'Content-Type: image/jpeg\r\n\r\n'.encode() + photo + f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(url + "/api/search", data=b"".join(parts), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_photo_upload_finds_its_product_and_a_non_image_is_a_readable_400(page, subset):
    product = subset.products[3]
    status, body = _post_photo(page.url, Path(product.image).read_bytes(), top_k="3")
    assert status == 200 and body["hits"][0]["product_id"] == product.product_id
    assert body["timings_ms"]["decode"] > 0
    status, body = _post_photo(page.url, b"this is not a photo", text="red")
    assert status == 400 and "rejected the query" in body["error"] and "Traceback" not in body["error"]


def test_catalogue_photos_are_served_and_nothing_outside_them(page, subset):
    product = subset.products[0]
    status, body = _get(page.url, f"/images/{Path(product.image).name}")
    assert status == 200 and body == Path(product.image).read_bytes()
    assert (subset.fashion_dir / "styles.csv").is_file()  # a real file just outside the image folder
    for path in ("/images/../styles.csv", "/images/..%2Fstyles.csv", "/images/%2e%2e/styles.csv",
                 "/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images//etc/passwd", "/images/%2Fetc%2Fpasswd",
                 "/images/", "/images/no-such-photo.jpg", "/images/a%00b.jpg"):
        status, body = _get(page.url, path)
        assert status == 404, (path, status)
        assert b"root:" not in body and b"productDisplayName" not in body, path


def test_text_search_returns_hits_facets_timings(page, subset):
    status, body = _post_search(page.url, text="navy blue shirt", top_k="5")
    assert status == 200, body
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert all(h["image_url"].startswith("/images/") and h["title"] for h in body["hits"])
    assert body["index_version"] and body["timings_ms"]["total"] > 0
    gender = next(f for f in body["facets"] if f["field"] == "gender")
    # counted over every hit the server returned for the pool (IVF: can be fewer than asked for)
    assert sum(v["count"] for v in gender["values"]) == body["facet_pool"]
    assert 5 <= body["facet_pool"] <= min(FACET_POOL, len(subset.products))
    assert not {f["field"] for f in body["facets"]} & {"title", "image", "product_id"}


def test_bad_input_gets_a_readable_400(page):
    for fields, fragment in (({"text": "  "}, "Type a query"), ({"text": "shoes", "top_k": "0"}, "between 1 and"),
                             ({"text": "shoes", "top_k": "ten"}, "whole number"),
                             ({"text": "shoes", "filters": "[1]"}, "JSON object"),
                             ({"text": "shoes", "filters": '{"noSuchField": ["x"]}'}, "rejected the query"),
                             ({"text": "shoes", "image": "not-a-file.jpg"}, "uploaded file")):
        status, body = _post_search(page.url, **fields)
        assert status == 400 and fragment in body["error"], (fields, body)


def test_a_server_that_is_down_gives_a_readable_error(subset):
    down = PageThread(closed_port_target(), subset.fashion_dir).start()
    try:
        status, body = _post_search(down.url, text="black heels")
        assert status == 503
        assert "unavailable" in body["error"] and "ecsearch serve" in body["error"]
        assert "Traceback" not in body["error"]
        status, _ = _get(down.url, "/")
        assert status == 200  # the page itself still loads
    finally:
        down.stop()


def test_ecsearch_ui_command_serves_the_page_and_stops_on_sigterm(grpc_server, subset):
    """``ecsearch ui`` as ``make demo`` starts it: prints its URL, serves, exits 0 on SIGTERM;
    a missing catalogue is exit 2 with a one-line reason."""
    cmd = [sys.executable, "-m", "engine.cli", "ui", "--target", grpc_server.target, "--port", "0"]
    bad = subprocess.run(cmd + ["--catalog", str(subset.fashion_dir / "no-such-folder")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "catalogue not found" in bad.stderr
    bad = subprocess.run(cmd[:-2] + ["--port", "70000"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--port must be 0..65535" in bad.stderr
    proc = subprocess.Popen(cmd + ["--catalog", str(subset.fashion_dir)], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", proc.stderr.readline()).group(1)
        status, body = _get(url, "/")
        assert status == 200 and b"search-form" in body
        status, body = _post_search(url, text="black watch", top_k="3")
        assert status == 200 and len(body["hits"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _wait_search(driver, done_before: int, timeout_s: float = 60.0) -> None:
    """Wait until the page finished the search after ``done_before`` completed ones."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(
        lambda d: int(d.execute_script("return document.body.dataset.searches || 0")) > done_before
        and d.execute_script("return document.body.dataset.state") != "loading")


def _searches(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.searches || 0"))


def _photos_loaded(driver) -> list[bool]:
    """Per card in grid order: its photo finished loading with real pixels (naturalWidth > 0)."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = "return [...document.querySelectorAll('#results .card img')].map(i => i.complete)"
    WebDriverWait(driver, 30).until(lambda d: all(d.execute_script(script)))
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .card img')].map(i => i.naturalWidth > 0)")


def test_the_page_in_headless_chromium(page, subset, tmp_path):
    """Type a query, upload a catalogue photo (its product comes back first, photo loaded),
    apply a facet (every hit honours it), open the product detail (GetProducts), screenshot;
    then the same browser on a page whose gRPC server is down shows a readable error."""
    from selenium.webdriver.common.by import By

    driver = chromium_driver()
    try:
        driver.get(page.url + "/")
        top_k = driver.find_element(By.ID, "top-k")
        top_k.clear()
        top_k.send_keys("8")
        driver.find_element(By.ID, "query-text").send_keys("navy blue shirt for men")
        done = _searches(driver)
        driver.find_element(By.ID, "search-button").click()
        _wait_search(driver, done)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        assert len(cards) == 8 and all(_photos_loaded(driver))
        assert "index version" in driver.find_element(By.ID, "stats").text

        product = subset.products[7]
        driver.find_element(By.ID, "query-text").clear()  # the photo alone: its product must come first
        done = _searches(driver)
        driver.find_element(By.ID, "photo-input").send_keys(str(Path(product.image).resolve()))
        _wait_search(driver, done)
        first = driver.find_element(By.CSS_SELECTOR, "#results .card")
        assert first.get_attribute("data-product-id") == product.product_id
        assert first.get_attribute("data-rank") == "1" and product.title in first.text
        assert _photos_loaded(driver)[0]

        facet = driver.find_element(By.CSS_SELECTOR, "fieldset[data-field='articleType'] input")
        value = facet.get_attribute("data-value")
        done = _searches(driver)
        facet.click()
        _wait_search(driver, done)
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .card dd[data-field='articleType']")]
        assert shown and all(v == value for v in shown), (value, shown)
        assert driver.find_element(By.CSS_SELECTOR, "fieldset[data-field='articleType'] input:checked")
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        driver.save_screenshot(str(tmp_path / "search-page.png"))
        assert (tmp_path / "search-page.png").stat().st_size > 10_000

        driver.find_element(By.CSS_SELECTOR, "#results .card").click()
        detail = driver.find_element(By.ID, "detail")
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(driver, 30).until(lambda d: detail.get_attribute("open") is not None)
        assert "articleType" in detail.text and value in detail.text

        down = PageThread(closed_port_target(), subset.fashion_dir).start()
        try:
            driver.get(down.url + "/")
            driver.find_element(By.ID, "query-text").send_keys("black heels")
            driver.find_element(By.ID, "search-button").click()
            _wait_search(driver, 0)
            error = driver.find_element(By.ID, "error")
            assert error.is_displayed() and "unavailable" in error.text, error.text
            assert "Traceback" not in driver.page_source
        finally:
            down.stop()
    finally:
        driver.quit()
