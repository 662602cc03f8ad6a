"""A minimal Chrome DevTools Protocol driver for headless Chromium, over the `websockets` package the project
already depends on (no browser-automation dependency, nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--mute-audio", "--remote-debugging-port=0"]


def find_chromium() -> str | None:
    exe = os.environ.get("STREAMGEN_CHROMIUM")
    if exe:
        return exe if os.path.exists(exe) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium with one page. `evaluate(js)` returns the value of a JS expression."""

    def __init__(self, exe: str, user_data_dir: str, timeout: float = 60.0):
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url, lines, end = None, [], time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            lines.append(line)
            if "DevTools listening on " in line:
                url = line.split("DevTools listening on ", 1)[1].strip()
                break
        if url is None:
            self.close()
            raise RuntimeError("chromium did not start:\n" + "".join(lines[-20:]))
        # keep reading stderr so the browser never blocks on a full pipe
        import threading

        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        self.ws = connect(url, max_size=2**26, open_timeout=30).__enter__()
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 30.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        end = time.monotonic() + timeout
        while True:
            m = json.loads(self.ws.recv(timeout=max(end - time.monotonic(), 0.01)))
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def navigate(self, url: str):
        self.call("Page.navigate", session=True, url=url)
        self.wait("document.readyState === 'complete'")

    def evaluate(self, js: str):
        r = self.call("Runtime.evaluate", session=True, expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {js!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, js: str, timeout: float = 60.0, what: str | None = None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.evaluate(js)
            if v:
                return v
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or js}")

    def exceptions(self) -> list[str]:
        return [json.dumps(e["params"]["exceptionDetails"])[:300] for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"]

    def close(self):
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.call("Browser.close", timeout=5)
                except Exception:  # noqa: BLE001 - it closes the socket as it goes
                    pass
                self.ws.close()
        finally:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
