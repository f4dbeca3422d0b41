"""Shared pieces of the search page tests (no tests here): the page's web app on a free
loopback port, served by uvicorn in a background thread, and a headless Chromium."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

BROWSER_MISSING = ("headless Chromium not available ({what}); install Debian's chromium and chromium-driver "
                   "(`apt-get install -y chromium chromium-driver`, which .ci/run does when it runs as root)")


class PageThread:
    """``ecsearch ui``'s app for ``target`` served on a free loopback port in a thread."""

    def __init__(self, target: str, catalog: Path | None):
        from server.ui.app import create_app
        from server.ui.cli import bind_socket, ui_server
        from server.ui.images import image_folder

        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = ui_server(create_app(target, image_folder(catalog), timeout_s=30.0), self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="test-ui", daemon=True)

    def start(self) -> "PageThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the page's web server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the page's web server did not stop"


def closed_port_target() -> str:
    """``127.0.0.1:PORT`` where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def chromium_driver():
    """A headless Chromium WebDriver (Debian's chromium + chromedriver, never a download);
    skips the test with the reason when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.chrome.service import Service

    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(BROWSER_MISSING.format(what="no chromium" if browser is None else "no chromedriver"))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
