"""The generation worker: one thread per device, continuous batching across sessions.

Each turn the worker picks every session that wants a chunk now (up to `max_batch`, least recently served
first, so the batch is fair and no session starves), advances all of them by one chunk in one
`backend.step` (which batches their forwards), encodes the frames, and hands each session its chunk on the
event loop (`loop.call_soon_threadsafe`). Sessions join and leave between turns: that is the continuous part.

The model never runs on the event loop; the event loop never waits for the model. A session that goes away
is dropped from the table at once, and its generation state with it (a turn in flight keeps a reference
until the turn ends, then discards its result).

Which sessions want a chunk (`Job.wants_chunk`):
  - pace "max": always, until its frame budget is spent;
  - pace "realtime": when the first frame of its next chunk is due within `lead_s` on its playout clock
    (so at most ~lead_s of video is generated ahead of playback); once some session needs a chunk, the
    real-time sessions that will need one within the next chunk's time join its batch early;
  - never while paused, closed or failed.
A session's first chunk gets a turn of its own (with any other newcomers), ahead of the others: it could not
share their forwards anyway, and it is what the viewer waits for after `start`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .backend import Backend, ChunkOut, SessionSpec, Work
from .protocol import encode_image, pack_frame

log = logging.getLogger("server")


@dataclass
class Delivery:
    chunk: ChunkOut  # frames already cut to the session's frame budget
    payloads: list[bytes]  # binary messages, one per frame
    final: bool  # the frame budget is spent: no more chunks will come


@dataclass(eq=False)
class Job:
    """One session as the worker sees it. The event loop writes the control fields (plain attributes or
    under the scheduler's lock); the worker writes `state`, `next_frame` and `last_served`."""

    id: str
    spec: SessionSpec
    fmt: str = "jpeg"
    quality: int = 85
    pace: str = "realtime"
    frames_limit: int = 0  # 0 = unbounded
    on_delivery: Callable[[Any], None] | None = None  # called on the event loop: Delivery or BaseException
    # control (event loop)
    paused: bool = False
    closed: bool = False
    pending_prompt: str | None = None
    due_next: Callable[[int], float | None] | None = None  # realtime: when frame k is due (None = now)
    # worker
    state: Any = None
    next_frame: int = 0  # frames generated so far
    finished: bool = False
    failed: bool = False
    last_served: float = 0.0
    chunks: int = 0
    _lead_s: float = field(default=1.0, repr=False)

    def wants_chunk(self, now: float, slack: float = 0.0) -> bool:
        """True when the session needs its next chunk now (or within `slack` seconds)."""
        if self.closed or self.failed or self.finished or self.paused:
            return False
        if self.pace == "max" or self.due_next is None:
            return True
        due = self.due_next(self.next_frame)
        return due is None or due - now < self._lead_s + slack

    def wake_at(self, now: float) -> float:
        """When a realtime job that does not want a chunk now will want one."""
        if self.due_next is None or self.paused or self.closed or self.finished or self.failed:
            return float("inf")
        due = self.due_next(self.next_frame)
        return now if due is None else due - self._lead_s


class Scheduler:
    def __init__(self, backend: Backend, *, max_batch: int = 8, lead_chunks: float = 1.5, loop=None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.backend = backend
        self.max_batch = max_batch
        info = backend.info
        self.lead_s = max(lead_chunks * info.frames_per_chunk / info.fps, 0.25)
        self.slack_s = info.frames_per_chunk / info.fps  # one chunk: see _pick
        self.loop = loop
        self.jobs: dict[str, Job] = {}
        self.cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # counters (read by /healthz and the benchmark)
        self.steps = 0
        self.batched_chunks = 0
        self.busy_s = 0.0

    # ---- event-loop side ------------------------------------------------------------------------------------------

    def add(self, job: Job):
        job._lead_s = self.lead_s
        with self.cond:
            self.jobs[job.id] = job
            self.cond.notify()

    def remove(self, job: Job):
        """Forget a session now: its generation state is released (at the end of a turn in flight)."""
        with self.cond:
            job.closed = True
            self.jobs.pop(job.id, None)
            job.state = None
            self.cond.notify()

    def switch_prompt(self, job: Job, prompt: str):
        with self.cond:
            job.pending_prompt = prompt
            self.cond.notify()

    def poke(self):
        with self.cond:
            self.cond.notify()

    @property
    def active(self) -> int:
        return len(self.jobs)

    # ---- worker thread --------------------------------------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _pick(self, now: float) -> list[tuple[Job, Work]]:
        ready = [j for j in self.jobs.values() if j.wants_chunk(now)]
        if not ready:
            return []
        fresh = [j for j in ready if j.chunks == 0]
        if fresh:
            # a new session's first chunk cannot share a forward with running sessions anyway (its cache is in
            # another phase): give it a short turn of its own now instead of a place in the next long one
            ready = fresh
        # real-time sessions that will want a chunk within one chunk's time ride along: they share this
        # forward instead of needing one of their own a moment later (their clocks fall into step)
        soon = [j for j in self.jobs.values() if j not in ready and j.wants_chunk(now, self.slack_s)
                and not fresh]
        ready.sort(key=lambda j: j.last_served)
        soon.sort(key=lambda j: j.last_served)
        picked = []
        for job in (ready + soon)[: self.max_batch]:
            if job.state is None:
                job.state = self.backend.open(job.spec)
            work = Work(job.state, job.pending_prompt)
            job.pending_prompt = None
            picked.append((job, work))
        return picked

    def _run(self):
        while True:
            with self.cond:
                if self._stop:
                    return
                now = time.monotonic()
                try:
                    picked = self._pick(now)
                except Exception as e:  # noqa: BLE001 - backend.open failed: fail those sessions, go on
                    log.exception("opening a session failed")
                    picked = []
                    for job in self.jobs.values():
                        if job.state is None and job.wants_chunk(now):
                            self._fail(job, e)
                if not picked:
                    wake = min((j.wake_at(now) for j in self.jobs.values()), default=float("inf"))
                    self.cond.wait(timeout=min(max(wake - now, 0.001), 0.05))
                    continue
            self._turn(picked)

    def _turn(self, picked: list[tuple[Job, Work]]):
        t0 = time.monotonic()
        try:
            results = self.backend.step([w for _, w in picked])
        except Exception as e:  # noqa: BLE001 - a backend bug: every session of the batch fails, server lives
            log.exception("backend step failed")
            results = [e] * len(picked)
        self.steps += 1
        self.batched_chunks += len(picked)
        for (job, _), res in zip(picked, results):
            job.last_served = t0
            if job.closed:
                continue  # the client went away during the turn: drop the result
            if isinstance(res, BaseException):
                log.error("session %s: generation failed: %r", job.id, res)
                self._fail(job, res)
                continue
            try:
                self._deliver(job, res)
            except Exception as e:  # noqa: BLE001 - encoding failed for this session only
                log.exception("session %s: encoding failed", job.id)
                self._fail(job, e)
        self.busy_s += time.monotonic() - t0
        picked.clear()  # drop references to finished sessions' states now

    def _deliver(self, job: Job, res: ChunkOut):
        frames = res.frames
        if job.frames_limit:
            frames = frames[: max(job.frames_limit - res.first_frame, 0)]
            res.frames = frames
        t0 = time.perf_counter()
        payloads = [pack_frame(res.first_frame + i, encode_image(f, job.fmt, job.quality))
                    for i, f in enumerate(frames)]
        res.timings_ms["encode"] = (time.perf_counter() - t0) * 1000
        job.next_frame = res.first_frame + len(frames)
        job.chunks += 1
        final = bool(job.frames_limit) and job.next_frame >= job.frames_limit
        if final:
            job.finished = True
        self._post(job, Delivery(res, payloads, final))

    def _fail(self, job: Job, exc: BaseException):
        job.failed = True
        self._post(job, exc)

    def _post(self, job: Job, item):
        if job.on_delivery is None:
            return
        if self.loop is None:
            job.on_delivery(item)
        else:
            try:
                self.loop.call_soon_threadsafe(job.on_delivery, item)
            except RuntimeError:  # the loop is closed (shutdown)
                pass
