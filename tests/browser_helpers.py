"""Headless Chromium for the web view's tests, driven over the W3C WebDriver protocol.

The browser and its driver are Debian's ``chromium`` and ``chromium-driver`` packages
(scripts/setup installs them); nothing is downloaded at run time. WebDriver is JSON over
HTTP, so this small client with ``urllib`` is all the tests need: open a page, run a
script in it, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from streamproc.dev.localkafka import free_port, terminate

T = TypeVar("T")
#: Where screenshots are copied as well, when set (CI keeps them as artifacts).
SCREENSHOT_DIR_ENV = "STREAMPROC_SCREENSHOT_DIR"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if chromium() is None or shutil.which("chromedriver") is None:
        return ("headless Chromium is not installed: apt-get install chromium chromium-driver "
                "(scripts/setup does)")
    return None


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One headless Chromium session (``with Browser(tmp) as b: ...``)."""

    def __init__(self, tmp: Path, width: int = 1400, height: int = 1000) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(tmp / "chromedriver.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(shutil.which("chromedriver")), f"--port={port}"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.session = ""
        try:
            self._wait_driver()
            args = ["--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--mute-audio",
                    f"--window-size={width},{height}", f"--user-data-dir={tmp / 'profile'}"]
            if os.geteuid() == 0:
                args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "pageLoadStrategy": "normal",
                "goog:chromeOptions": {"binary": chromium(), "args": args}}}}
            self.session = self._call("POST", "/session", caps, prefix=False)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _wait_driver(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/status", timeout=2) as r:
                    if json.load(r)["value"]["ready"]:
                        return
            except (OSError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise WebDriverError("chromedriver did not start: "
                                     + (self.tmp / "chromedriver.log").read_text()[-2000:])
            time.sleep(0.1)

    def _call(self, method: str, path: str, body: Any = None, prefix: bool = True,
              timeout: float = 60) -> Any:
        url = self.base + (f"/session/{self.session}" if prefix else "") + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise WebDriverError(f"{method} {path}: HTTP {e.code}: {detail}") from None

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def script(self, source: str, *args: Any) -> Any:
        """Run ``source`` as a function body in the page (``arguments[i]``); its return."""
        return self._call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        keep = os.environ.get(SCREENSHOT_DIR_ENV)
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    def wait(self, check: Callable[[], T | None], timeout: float, what: str,
             every: float = 0.25) -> T:
        """Poll ``check`` until it returns something truthy; fail naming ``what``."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = check()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"last seen: {last!r}")
            time.sleep(every)

    def close(self) -> None:
        if self.session:
            with contextlib.suppress(OSError, WebDriverError):
                self._call("DELETE", "", timeout=10)
            self.session = ""
        terminate(self.proc, 10)
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


#: The page's tiles as the tests read them, in one round trip.
TILES_JS = """
return [...document.querySelectorAll('#grid .tile')].map(t => ({
  stream: t.dataset.stream, label: t.dataset.label || '', tag: t.dataset.tag || '',
  window: Number(t.dataset.windowStart || 0), windows: Number(t.dataset.windows || 0),
  marks: Number(t.dataset.marks || 0), dead: Number(t.dataset.dead || 0),
  frameV: Number(t.dataset.frameV || 0), loads: Number(t.dataset.loads || 0),
  drawn: Number(t.dataset.drawn || 0),
  img: (i => ({w: i.naturalWidth, complete: i.complete}))(t.querySelector('img.frame')),
  shownLabel: t.querySelector('.label').textContent,
  badges: Object.fromEntries([...t.querySelectorAll('.badge')].map(b => [b.dataset.m, b.dataset.state])),
  words: t.querySelector('.words').textContent,
}));
"""

#: The dead-letter panel's rows and the health panel.
PANELS_JS = """
return {
  conn: document.getElementById('conn').dataset.state,
  deadTotal: document.getElementById('dl-total').textContent,
  deadRows: [...document.querySelectorAll('#dl-rows tr')].map(r => ({
    kind: r.dataset.kind, reason: r.querySelector('.reason').textContent,
    count: Number(r.querySelector('.count').textContent), stream: r.querySelector('.stream').textContent})),
  health: document.getElementById('health').dataset.status,
  healthText: document.getElementById('health').innerText,
  wps: document.getElementById('h-wps').textContent,
  lag: document.getElementById('h-lag').textContent,
  nodes: document.getElementsByTagName('*').length,
};
"""
