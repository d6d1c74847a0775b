"""Open a page in headless Chromium and record what it did: console errors, uncaught
exceptions, network requests, a full-page screenshot.

Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (NUL-separated JSON
on file descriptors 3 and 4), so it needs nothing but the ``chromium`` binary: no
websocket client, no Selenium or Playwright. Used by tests/test_html_report.py.
"""

from __future__ import annotations

__all__ = ["Browser", "PageResult", "find_chromium"]

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    url: str
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL but the page's own
    screenshot: bytes | None = None
    height: int = 0


class Browser:
    """One headless Chromium process; ``open(url)`` loads a page in a fresh tab."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("chromium")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="gcomp-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
            f"--user-data-dir={self._profile}",
            "about:blank",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox

        def fds():  # the protocol's pipes must be fds 3 (read) and 4 (write) in the child
            read, write = (
                os.dup(to_browser_r),
                os.dup(from_browser_w),
            )  # copies first: no clobbering
            os.dup2(read, 3)
            os.dup2(write, 4)

        # close_fds would close 3 and 4 after preexec_fn; os.pipe() fds are close-on-exec
        # anyway (PEP 446), so nothing else leaks into the browser.
        self._proc = subprocess.Popen(
            args,
            preexec_fn=fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []

    # ------------------------------------------------------------------ protocol
    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._receive(deadline)
            if msg.get("id") == self._next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._events.append(msg)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            for ev in self._events:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return
            self._events.append(self._receive(deadline))

    # ------------------------------------------------------------------ pages
    def open(
        self,
        url: str,
        *,
        width: int = 1280,
        screenshot: bool = True,
        settle: float = 0.3,
        script: str | None = None,
    ) -> PageResult:
        """Load ``url``; collect console errors, exceptions and requests until the load event
        (plus ``settle`` seconds); run ``script`` (its value is ignored); screenshot the page."""
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self._events.clear()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._send(f"{domain}.enable", session=session)
        self._send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self._send("Page.navigate", {"url": url}, session)
        self._wait_for("Page.loadEventFired", session)
        if script:
            self._send("Runtime.evaluate", {"expression": script, "awaitPromise": True}, session)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            try:
                self._events.append(self._receive(end))
            except TimeoutError:
                break
        result = PageResult(url)
        for ev in self._events:
            if ev.get("sessionId") != session:
                continue
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.console_errors.append(
                    " ".join(
                        str(a.get("value", a.get("description", "")))
                        for a in params.get("args", [])
                    )
                )
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                result.console_errors.append(params["entry"].get("text", ""))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                result.exceptions.append(
                    details.get("exception", {}).get("description") or details.get("text", "")
                )
            elif method == "Network.requestWillBeSent":
                req_url = params.get("request", {}).get("url", "")
                if req_url != url:
                    result.requests.append(req_url)
        if screenshot:
            metrics = self._send("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics.get("contentSize")
            result.height = int(size["height"])
            self._send(
                "Emulation.setDeviceMetricsOverride",
                {
                    "width": width,
                    "height": min(result.height, 16000),
                    "deviceScaleFactor": 1,
                    "mobile": False,
                },
                session,
            )
            import base64

            shot = self._send(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session
            )
            result.screenshot = base64.b64decode(shot["data"])
        self._send("Target.closeTarget", {"targetId": target})
        return result

    def regions(
        self, url: str, tops: list[int], *, width: int = 1280, height: int = 900
    ) -> list[bytes]:
        """Screenshots of ``height``-pixel bands starting at each of ``tops`` (for reading a
        long page at full resolution)."""
        import base64

        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self._send("Page.enable", session=session)
        self._events.clear()
        self._send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self._send("Page.navigate", {"url": url}, session)
        self._wait_for("Page.loadEventFired", session)
        shots = []
        for top in tops:
            clip = {"x": 0, "y": top, "width": width, "height": height, "scale": 1}
            shot = self._send(
                "Page.captureScreenshot",
                {"format": "png", "clip": clip, "captureBeyondViewport": True},
                session,
            )
            shots.append(base64.b64decode(shot["data"]))
        self._send("Target.closeTarget", {"targetId": target})
        return shots

    def evaluate(self, url: str, expression: str) -> object:
        """Load ``url`` and return the value of ``expression`` (JSON-serialisable)."""
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self._send("Page.enable", session=session)
        self._events.clear()
        self._send("Page.navigate", {"url": url}, session)
        self._wait_for("Page.loadEventFired", session)
        value = self._send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        self._send("Target.closeTarget", {"targetId": target})
        return value.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except Exception:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
