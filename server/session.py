"""One websocket connection = one generation session, on the event loop.

Three tasks share a Session: the receive loop (`run`, client messages), the sender (`_send_loop`: control
messages first, then frames, paced by the playout clock for pace "realtime"), and a ticker (`_tick_loop`:
`stats` every second, time limits). Generation happens in the scheduler's worker thread; its chunks arrive
through `_on_delivery`, already encoded.

Ending: every way out goes through `finish(messages, code)`: the sender drops pending frames, flushes
pending control messages, sends the final ones (`done` or `error`) and closes with `code`. Whatever the
way out, `_release` removes the session from the scheduler, which frees its generation state at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .backend import SessionSpec
from .outbox import Outbox, PlayoutClock
from .scheduler import Delivery, Job

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("server")


class Session:
    def __init__(self, app: App, ws):
        self.app, self.ws = app, ws
        self.id = secrets.token_hex(6)
        self.cfg = app.cfg
        self.info = app.backend.info
        self.outbox = Outbox(max_frames=app.queue_frames)
        self.clock: PlayoutClock | None = None
        self.job: Job | None = None
        self.wake = asyncio.Event()
        self.connected_at = time.monotonic()
        self.started_at: float | None = None
        self.paused_since: float | None = None
        self.final = False  # the frame budget is generated: done follows once the outbox is empty
        self.ending: tuple[list, int] | None = None  # final messages (dicts or callables) and close code
        self.end_reason = "disconnect"
        self.sent = 0
        self.generated = 0
        self.last_batch = 0
        self.latencies: deque[float] = deque(maxlen=64)  # per-chunk generation time, ms
        self.sent_times: deque[float] = deque()  # send times within the fps window
        self.ended = asyncio.Event()

    # ---- the receive loop -------------------------------------------------------------------------------------

    async def run(self):
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.id}")
        ticker = asyncio.create_task(self._tick_loop(), name=f"tick-{self.id}")
        try:
            async for message in self.ws:
                if self.ending is None:
                    self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            self._release()
            for t in (sender, ticker):
                t.cancel()
            await asyncio.gather(sender, ticker, return_exceptions=True)
            self.ended.set()

    def _release(self):
        if self.job is not None:
            self.app.scheduler.remove(self.job)
        self.outbox.clear()
        self.app.sessions.discard(self)
        if self.started_at is not None:
            dur = time.monotonic() - self.started_at
            log.info("session %s end: %s, %d frames sent (%d generated, %d dropped) in %.1f s", self.id,
                     self.end_reason, self.sent, self.generated, self.outbox.dropped, dur)

    def _on_message(self, data):
        try:
            msg = P.parse_message(data, self.cfg.limits)
        except P.ProtocolError as e:
            if e.code == P.TOO_LARGE:
                self.end_reason = "too_large"
                self.finish([P.error(e.code, e.message)], P.CLOSE_TOO_LARGE)
            else:
                self.send_control(P.error(e.code, e.message))
            return
        if isinstance(msg, P.Start):
            if self.job is not None:
                self.send_control(P.error(P.ALREADY_STARTED, "'start' may be sent only once per connection"))
            else:
                self._start(msg)
            return
        if isinstance(msg, P.Stop):
            self.end_reason = "stop"
            self.finish([self._done("stop")])
            return
        if self.job is None:
            kind = type(msg).__name__.lower()
            self.send_control(P.error(P.NOT_STARTED, f"'{kind}' before 'start'"))
            return
        if isinstance(msg, P.Prompt):
            self._check_words(msg.prompt)
            self.app.scheduler.switch_prompt(self.job, msg.prompt)
        elif isinstance(msg, P.Pause):
            if not self.job.paused:
                self.job.paused = True
                self.paused_since = time.monotonic()
                self._send_stats()
        elif isinstance(msg, P.Resume):
            if self.job.paused:
                if self.clock is not None:
                    self.clock.restart(self.outbox.next_frame_index(), time.monotonic())
                self.job.paused = False
                self.paused_since = None
                self.app.scheduler.poke()
                self._send_stats()
        self.wake.set()

    def _start(self, msg: P.Start):
        self.started_at = time.monotonic()
        job = Job(self.id, SessionSpec(msg.prompt, msg.seed), fmt=msg.format, quality=msg.quality, pace=msg.pace,
                  frames_limit=msg.frames, on_delivery=self._on_delivery)
        if msg.pace == "realtime":
            self.clock = PlayoutClock(self.info.fps)
            job.due_next = self.clock.due
        self.job = job
        i = self.info
        self.send_control({"type": "ready", "session": self.id, "width": i.width, "height": i.height, "fps": i.fps,
                           "frames_per_chunk": i.frames_per_chunk, "model": i.name, "seed": msg.seed,
                           "format": msg.format, "pace": msg.pace, "frames": msg.frames})
        self._check_words(msg.prompt)
        self.app.scheduler.add(job)
        log.info("session %s start: %r seed %d, %s, %s pace, %s frames", self.id, msg.prompt[:200], msg.seed,
                 msg.format, msg.pace, msg.frames or "unbounded")

    def _check_words(self, prompt: str):
        """A `warning` (not an error: the prompt is used, each unknown word read as <unk>) when the model's text
        encoder has a closed vocabulary and the prompt leaves it, with the words it knows, so a typo is seen."""
        check = getattr(self.app.backend, "unknown_words", None)
        found = check(prompt) if check is not None else None
        if found and found[0]:
            words, known = found
            self.send_control({"type": "warning", "code": "unknown_words", "words": words, "known": known,
                               "message": f"the model does not know {', '.join(map(repr, words))}: read as unknown "
                                          f"(it knows: {', '.join(known)})"})

    # ---- from the worker (scheduled on the event loop) ----------------------------------------------------------

    def _on_delivery(self, item):
        if self.ending is not None or self.job is None or self.job.closed:
            return
        if isinstance(item, BaseException):
            self.end_reason = "internal"
            name = type(item).__name__
            self.finish([P.error(P.INTERNAL, f"generation failed ({name}: {str(item)[:200]})")], P.CLOSE_INTERNAL)
            return
        assert isinstance(item, Delivery)
        c = item.chunk
        headers = []
        if c.prompt_changed:
            headers.append(("prompt_applied", P.dumps({"type": "prompt_applied", "prompt": c.prompt,
                                                       "frame": c.first_frame})))
        timings = {k: round(float(v), 3) for k, v in c.timings_ms.items()}
        headers.append(("chunk", P.dumps({"type": "chunk", "index": c.index, "first_frame": c.first_frame,
                                          "frames": len(c.frames), "prompt": c.prompt, "timings_ms": timings,
                                          "batch": c.batch})))
        self.outbox.push_chunk(headers, [(c.first_frame + k, p) for k, p in enumerate(item.payloads)])
        self.generated = c.first_frame + len(c.frames)
        self.last_batch = c.batch
        self.latencies.append(sum(timings.values()))
        if self.clock is not None:
            self.clock.on_chunk(c.first_frame, time.monotonic())
        if item.final:
            self.final = True
        self.wake.set()

    # ---- sending ----------------------------------------------------------------------------------------------

    def send_control(self, msg: dict):
        self.outbox.push_control(P.dumps(msg))
        self.wake.set()

    def _done(self, reason: str, **extra):
        """A `done` message, built when it is sent (so its counts are final)."""
        return lambda: P.done(self.sent, reason, generated=self.generated, dropped=self.outbox.dropped, **extra)

    def finish(self, messages: list, code: int = P.CLOSE_NORMAL):
        """End the session: pending frames are dropped, `messages` are sent last, then the close `code`."""
        if self.ending is None:
            self.ending = (messages, code)
            if self.job is not None:
                self.app.scheduler.remove(self.job)
            self.wake.set()

    async def _wait(self, timeout: float | None = None):
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            pass
        self.wake.clear()

    async def _send_loop(self):
        ws, box = self.ws, self.outbox
        try:
            while self.ending is None:
                text = box.pop_control()
                if text is not None:
                    await ws.send(text)
                    continue
                if self.job is None or self.job.paused:
                    await self._wait()
                    continue
                index = box.next_frame_index()
                if index is None:
                    for h in box.pop_headers():  # a chunk whose frames were all dropped (tiny queues only)
                        await ws.send(h)
                    if self.final and box.empty():
                        self.end_reason = "frames"
                        self.finish([self._done("frames")])
                        continue
                    await self._wait()
                    continue
                if self.clock is not None:
                    wait = self.clock.wait(index, time.monotonic())
                    if wait > 0:
                        await self._wait(wait)
                        continue
                for h in box.pop_headers():
                    await ws.send(h)
                item = box.pop_frame()
                if item is None:
                    continue
                await ws.send(item[1])
                self.sent += 1
                self.sent_times.append(time.monotonic())
            # ending: drop frames, flush control messages, then the final ones and the close code
            messages, code = self.ending
            box.clear()
            while (text := box.pop_control()) is not None:
                await ws.send(text)
            for m in messages:
                await ws.send(P.dumps(m() if callable(m) else m))
            await ws.close(code)
        except ConnectionClosed:
            pass
        except Exception:  # a bug here must not leave the connection hanging
            log.exception("session %s: sender failed", self.id)
            await ws.close(P.CLOSE_INTERNAL)

    # ---- stats and time limits ----------------------------------------------------------------------------------

    def _stats(self) -> dict:
        now = time.monotonic()
        window = 2.0
        while self.sent_times and self.sent_times[0] < now - window:
            self.sent_times.popleft()
        span = min(window, now - (self.started_at or now)) or 1.0
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"type": "stats", "fps": round(len(self.sent_times) / span, 2), "frames": self.sent,
                "dropped": self.outbox.dropped,
                "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                               "p95": round(float(np.percentile(lat, 95)), 2)},
                "generated": self.generated, "queued": self.outbox.frames, "batch": self.last_batch,
                "paused": bool(self.job and self.job.paused), "sessions": len(self.app.sessions)}

    def _send_stats(self):
        if self.job is not None and self.ending is None:
            self.outbox.push_control(P.dumps(self._stats()), stats=True)
            self.wake.set()

    async def _tick_loop(self):
        cfg = self.cfg
        while self.ending is None:
            await asyncio.sleep(cfg.stats_interval)
            now = time.monotonic()
            if self.job is None:
                if cfg.start_timeout and now - self.connected_at > cfg.start_timeout:
                    self.end_reason = "timeout"
                    self.finish([P.done(0, "timeout", message="no 'start' in time")])
                continue
            if self.paused_since is not None and cfg.pause_timeout and now - self.paused_since > cfg.pause_timeout:
                self.end_reason = "timeout"
                self.finish([self._done("timeout", message="paused for too long")])
                continue
            if cfg.max_session_s and now - self.started_at > cfg.max_session_s:
                self.end_reason = "timeout"
                self.finish([self._done("timeout", message="session time limit")])
                continue
            self._send_stats()
