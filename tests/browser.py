"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the tests
that look at the dashboard as a person would: open a page, read what it shows, type, click,
take a screenshot. Synchronous (websocket-client); everything polls with a deadline."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from tests.procs import wait_until


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, profile: Path, width: int = 1440, height: int = 900) -> None:
        exe = chromium_path()
        if exe is None:
            raise BrowserError("no chromium on PATH (scripts/test.sh installs Debian's)")
        profile.mkdir(parents=True, exist_ok=True)
        self.log_path = profile.parent / f"{profile.name}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self._ids = itertools.count(1)
        port_file = profile / "DevToolsActivePort"
        try:
            wait_until(lambda: self._alive() and port_file.exists()
                       and port_file.read_text().strip(), 30, "chromium's DevTools port")
            port = int(port_file.read_text().split()[0])
            page = wait_until(lambda: self._page_target(port), 30, "chromium's first page")
            self.ws = websocket.create_connection(page, timeout=30, suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise BrowserError(f"chromium exited with {self.proc.returncode}: "
                               + self.log_path.read_text(errors="replace")[-2000:])
        return True

    @staticmethod
    def _page_target(port: int) -> str | None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
            targets = json.loads(resp.read())
        pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
        return pages[0] if pages else None

    # -- the protocol -------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]

    def evaluate(self, expression: str) -> Any:
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in out:
            raise BrowserError(f"{expression[:80]}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        return wait_until(lambda: self.evaluate(expression), timeout, what or expression,
                          interval=0.1)

    # -- a person's actions -------------------------------------------------------------------
    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'", 30, f"{url} loaded")

    def click(self, selector: str) -> None:
        box = self.wait(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); if (!el) return null;"
            " const r = el.getBoundingClientRect(); return r.width ? [r.x + r.width / 2,"
            " r.y + r.height / 2] : null; })()", 10, f"{selector} on screen")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        """Focus the field, select what it holds, and type over it."""
        self.wait(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                  " if (!el) return false; el.focus(); el.select && el.select();"
                  " return document.activeElement === el; })()", 10, f"{selector} focused")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        """The whole page, however long, as PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": size["width"],
                               "height": size["height"], "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            with contextlib.suppress(OSError):
                ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
