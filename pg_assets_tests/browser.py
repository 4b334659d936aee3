"""Debian's chromium, headless, driven over the DevTools protocol: enough to click what a user
clicks and read what is on the screen (no browser downloads, no driver package)."""

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium")


class Browser:
    def __init__(self, profile: Path, width: int = 1400, height: int = 900) -> None:
        assert CHROMIUM, "chromium is not installed"
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port = self._port(profile / "DevToolsActivePort", 60)
            targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = next(t for t in targets if t["type"] == "page")
            self._conn = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
            self.ws = self._conn.__enter__()  # websockets wants its context-manager protocol
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count(1)

    def _port(self, path: Path, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            assert self.proc.poll() is None, "chromium exited"
            time.sleep(0.1)
        raise AssertionError("chromium did not open its DevTools port")

    def call(self, method: str, timeout_s: float = 60, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to {method} in {timeout_s} s"
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out.get("result", {}).get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, *needles: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            assert time.monotonic() < deadline, f"{needles} not on the page:\n{text[:2000]}"
            time.sleep(0.25)

    def click_button(self, label: str) -> bool:
        """Click the first visible button whose text is `label`; False if there is none."""
        script = (
            "(() => { const b = [...document.querySelectorAll('button')].find("
            f"e => e.innerText.trim() === {json.dumps(label)} && e.offsetParent !== null);"
            " if (!b) return false; b.click(); return true; })()"
        )
        return bool(self.js(script))

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.__exit__(None, None, None)
        self.proc.kill()
        self.proc.wait(10)
