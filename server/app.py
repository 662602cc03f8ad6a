"""The server: one port, `GET /` (the demo page), `GET /healthz`, `WS /v1/stream`.

HTTP and websocket I/O run on one asyncio event loop (websockets' asyncio server; plain HTTP requests are
answered from its `process_request` hook). Generation runs in the scheduler's worker thread.

Handshake checks, in order, before any model work: the path, the `Origin` (same-origin pages, non-browser
clients without an Origin, and the configured `--allowed-origin`s pass; others get 403), the token (401).
Then a connection over `max_sessions` gets `busy` and close 1013.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import protocol as P
from .backend import Backend
from .scheduler import Scheduler
from .session import Session

log = logging.getLogger("server")

STATIC = Path(__file__).resolve().parent / "static"
WS_PATH = "/v1/stream"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 8
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()  # "*" allows any
    limits: P.Limits = field(default_factory=P.Limits)
    max_batch: int = 8
    queue_frames: int = 0  # per-session send queue bound; 0 = automatic (lead + 3 chunks)
    start_timeout: float = 60.0  # a connection must send `start` within this (0 = no limit)
    pause_timeout: float = 600.0  # a session may stay paused this long (0 = no limit)
    max_session_s: float = 0.0  # generation time limit per session (0 = none)
    stats_interval: float = 1.0
    shutdown_grace_s: float = 5.0


class _Connection(ServerConnection):
    """A connection that says `too_large` before websockets closes it with 1009 for an oversized message
    (websockets refuses such a message from its header, before reading the payload: memory stays bounded)."""

    def __init__(self, protocol, server, **kw):
        super().__init__(protocol, server, **kw)
        fail = protocol.fail

        def fail_saying_why(code, reason=""):
            if code == CloseCode.MESSAGE_TOO_BIG and protocol.state is State.OPEN:
                limit = protocol.max_message_size
                try:
                    protocol.send_text(P.dumps(P.error(P.TOO_LARGE, f"message over the {limit}-byte limit")).encode())
                except Exception:  # noqa: BLE001 - best effort, the close follows anyway
                    pass
            fail(code, reason)

        protocol.fail = fail_saying_why


def _same_origin(origin: str, host: str | None) -> bool:
    if not host:
        return False
    try:
        return urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


class App:
    def __init__(self, backend: Backend, cfg: Config | None = None):
        self.backend = backend
        self.cfg = cfg or Config()
        info = backend.info
        self.scheduler = Scheduler(backend, max_batch=self.cfg.max_batch)
        lead_frames = int(self.scheduler.lead_s * info.fps) + 1
        # room for what a real-time session holds at most (lead + one chunk of slack + the chunk just made)
        self.queue_frames = self.cfg.queue_frames or lead_frames + 3 * info.frames_per_chunk
        self.sessions: set[Session] = set()
        self.server = None
        self.port: int | None = None
        self._closing = False
        self._static = {f"/{p.relative_to(STATIC).as_posix()}": p for p in STATIC.rglob("*") if p.is_file()}

    # ---- lifecycle --------------------------------------------------------------------------------------------

    async def start(self):
        self.scheduler.loop = asyncio.get_running_loop()
        self.scheduler.start()
        self.server = await serve(
            self._handle, self.cfg.host, self.cfg.port, process_request=self._process_request,
            create_connection=_Connection, compression=None, max_size=self.cfg.limits.max_message_bytes,
            server_header="streamgen", ping_interval=20, ping_timeout=20, close_timeout=5)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("serving %s on http://%s:%d/ (ws %s), max %d sessions", self.backend.info.name, self.cfg.host,
                 self.port, WS_PATH, self.cfg.max_sessions)

    async def shutdown(self):
        """Graceful: stop accepting, every session gets `done` (reason "stop") and close 1000, then stop."""
        if self._closing:
            return
        self._closing = True
        log.info("shutting down: %d sessions", len(self.sessions))
        if self.server is not None:
            self.server.server.close()  # no new connections; open ones stay until they got their `done`
        sessions = list(self.sessions)
        for s in sessions:
            s.end_reason = "shutdown"
            s.finish([s._done("stop", shutdown=True)])
        if sessions:
            await asyncio.wait([asyncio.create_task(s.ended.wait()) for s in sessions],
                               timeout=self.cfg.shutdown_grace_s)
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), self.cfg.shutdown_grace_s)
            except TimeoutError:
                log.warning("connections still open after %.0f s; stopping anyway", self.cfg.shutdown_grace_s)
        await asyncio.to_thread(self.scheduler.stop)

    # ---- HTTP -------------------------------------------------------------------------------------------------

    def _process_request(self, conn: ServerConnection, req: Request) -> Response | None:
        url = urlsplit(req.path)
        path = url.path
        if path == WS_PATH:
            origin = req.headers.get("Origin")
            if origin is not None and not self._origin_ok(origin, req.headers.get("Host")):
                return _text(http.HTTPStatus.FORBIDDEN, f"origin not allowed: {origin}\n")
            if self.cfg.token and not self._token_ok(req, url.query):
                r = _text(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
                r.headers["WWW-Authenticate"] = 'Bearer realm="streamgen"'
                return r
            if "upgrade" not in req.headers.get("Connection", "").lower():
                return _text(http.HTTPStatus.UPGRADE_REQUIRED, f"{WS_PATH} is a websocket endpoint\n")
            return None  # the websocket handshake goes on
        if path == "/healthz":
            return _body(http.HTTPStatus.OK, json.dumps(self.health()).encode(), "application/json")
        if path == "/":
            path = "/index.html"
        file = self._static.get(path)
        if file is None:
            return _text(http.HTTPStatus.NOT_FOUND, "not found\n")
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        return _body(http.HTTPStatus.OK, file.read_bytes(), ctype, cache="no-cache")

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        allowed = self.cfg.allowed_origins
        return "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed} or _same_origin(origin, host)

    def _token_ok(self, req: Request, query: str) -> bool:
        want = self.cfg.token.encode()
        auth = req.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), want):
            return True
        return any(hmac.compare_digest(t.encode(), want) for t in parse_qs(query).get("token", []))

    def health(self) -> dict:
        s = self.scheduler
        return {"status": "stopping" if self._closing else "ok", "model": self.backend.info.name,
                "sessions": len(self.sessions), "max_sessions": self.cfg.max_sessions,
                "generating": s.active, "steps": s.steps,
                "mean_batch": round(s.batched_chunks / s.steps, 3) if s.steps else 0.0}

    # ---- websocket --------------------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection):
        if self._closing:
            await ws.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        if len(self.sessions) >= self.cfg.max_sessions:
            await ws.send(P.dumps(P.error(P.BUSY, f"the server is at its limit of {self.cfg.max_sessions} sessions")))
            await ws.close(P.CLOSE_BUSY, "busy")
            return
        session = Session(self, ws)
        self.sessions.add(session)
        await session.run()


def _body(status: http.HTTPStatus, body: bytes, ctype: str, cache: str = "no-store") -> Response:
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", cache),
                       ("X-Content-Type-Options", "nosniff")])
    return Response(status.value, status.phrase, headers, body)


def _text(status: http.HTTPStatus, text: str) -> Response:
    return _body(status, text.encode(), "text/plain; charset=utf-8")
