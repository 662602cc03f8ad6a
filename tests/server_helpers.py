"""Helpers for the server tests: the real App on its own event loop in a thread, and a small sync client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.app import App, Config
from server.protocol import unpack_frame

PROMPT = "a red circle bouncing on a black background"
OTHER = "a large blue square moving left on a navy background"


class ServerThread:
    """`with ServerThread(backend, max_sessions=2) as srv:` -> srv.url, srv.ws_url, srv.app (port 0)."""

    def __init__(self, backend, **cfg):
        cfg.setdefault("port", 0)
        self.app = App(backend, Config(**cfg))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.app.start())
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    def __enter__(self):
        self._thread.start()
        self._started.wait(30)
        if self._error:
            raise self._error
        return self

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def shutdown(self):
        if self.loop.is_running():
            self.call(self.app.shutdown())

    def __exit__(self, *exc):
        try:
            self.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.app.port}/v1/stream"

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/healthz", timeout=10) as r:
            return json.loads(r.read())

    def wait(self, pred, timeout=10.0, what="condition"):
        t = time.monotonic() + timeout
        while time.monotonic() < t:
            if pred():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Frame:
    index: int
    data: bytes


class Client:
    """A blocking protocol client. recv() -> dict (text message) or Frame; ConnectionClosed at the end."""

    def __init__(self, url, **kw):
        kw.setdefault("max_size", 2**24)
        kw.setdefault("compression", None)
        kw.setdefault("max_queue", None)  # never stop reading: closing mid-stream must not wait on backpressure
        self.ws = connect(url, open_timeout=30, **kw).__enter__()
        self.texts: list[dict] = []
        self.frames: list[Frame] = []
        self.close_code: int | None = None

    def send(self, obj):
        self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    def start(self, prompt=PROMPT, **kw):
        self.send({"type": "start", "prompt": prompt, **kw})

    def recv(self, timeout=30.0):
        try:
            m = self.ws.recv(timeout=timeout)
        except ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd is not None else None
            raise
        if isinstance(m, bytes):
            f = Frame(*unpack_frame(m))
            self.frames.append(f)
            return f
        d = json.loads(m)
        self.texts.append(d)
        return d

    def until(self, pred, timeout=30.0):
        """Receive until pred(message) is true; returns that message."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; last texts: {self.texts[-5:]}")
            m = self.recv(timeout=left)
            if pred(m):
                return m

    def until_type(self, kind, timeout=30.0):
        return self.until(lambda m: isinstance(m, dict) and m.get("type") == kind, timeout)

    def drain(self, timeout=30.0) -> int | None:
        """Receive everything until the server closes; returns the close code."""
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                self.recv(timeout=max(end - time.monotonic(), 0.01))
        except ConnectionClosed:
            return self.close_code
        except TimeoutError:
            pass
        raise AssertionError(f"the server did not close in {timeout} s; last texts: {self.texts[-5:]}")

    def of_type(self, kind) -> list[dict]:
        return [t for t in self.texts if t.get("type") == kind]

    def close(self):
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ws.close()
