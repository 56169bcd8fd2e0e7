"""Drive headless Chromium through the DevTools protocol (no Selenium): open a page, click, read
the text, check images, take a screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from .service_helpers import free_port, wait_for

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-allow-origins=*"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with a fresh profile; ``with Browser() as b: b.open(url) ...``."""

    def __init__(self, width: int = 1400, height: int = 1800):
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="sbipipe-chromium-")
        self.proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={self.profile}",
                                      f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._id = 0
        self.size = (width, height)

    def __enter__(self) -> Browser:
        pages = wait_for(self._pages, timeout=60, what="chromium's DevTools endpoint")
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26, open_timeout=30)
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def _pages(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
            return pages or None
        except OSError:
            return None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, fragment: str, timeout: float = 60) -> str:
        return wait_for(lambda: self.text() if fragment in self.text() else None, timeout=timeout, every=0.5,
                        what=f"{fragment!r} on the page")

    def click_text(self, text: str) -> bool:
        """Click the innermost visible element whose text is exactly ``text``."""
        return bool(self.js(
            "(() => { const all = [...document.querySelectorAll('button, a, [role=tab], li, span, div')]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);"
            " if (!all.length) return false; all[all.length - 1].click(); return true; })()"))

    def loaded_data_images(self) -> int:
        """How many data-URI PNG images have rendered (natural width > 0)."""
        return int(self.js("[...document.images].filter(i => i.src.startsWith('data:image/png')"
                           " && i.complete && i.naturalWidth > 0).length") or 0)

    def screenshot(self, path: Path) -> Path:
        height = int(self.js("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)") or 0)
        clip = {"x": 0, "y": 0, "width": self.size[0], "height": max(self.size[1], min(height, 8000)), "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def settle(seconds: float = 1.0) -> None:
    time.sleep(seconds)
