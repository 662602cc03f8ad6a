"""Per-session send side, as pure state with an injected clock: the bounded outbox and the playout clock.

Outbox: what a session has yet to send. Control messages (errors, stats) jump the queue; chunks keep their
order (their header messages -- `prompt_applied`, `chunk` -- go right before their first frame). The number of
queued frames is bounded: pushing past the bound drops the oldest frames and counts them, so a client that
stops reading costs a bounded amount of memory, whatever the pace.

PlayoutClock (pace "realtime"): frame k is due at anchor_t + (k - anchor_k) / fps. The clock follows the wall,
not the client: a slow client does not slow generation down (its frames pile up and the oldest are dropped).
It is re-anchored when generation falls behind (a chunk arrives after its first frame was due) and on resume.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class ChunkEntry:
    headers: list[tuple[str, str]]  # (message type, JSON text), sent before the chunk's first frame
    frames: deque  # (index, payload bytes), oldest first
    started: bool = False  # headers sent


@dataclass(slots=True)
class Outbox:
    max_frames: int
    max_control: int = 64
    control: deque = field(default_factory=deque)  # [kind, JSON text], sent before any pending frame
    chunks: deque = field(default_factory=deque)  # ChunkEntry, oldest first
    frames: int = 0  # frames queued
    dropped: int = 0  # frames dropped because the queue was full
    control_dropped: int = 0

    def push_control(self, text: str, *, stats: bool = False):
        if stats:  # one pending stats message is enough: a newer one replaces it in place
            for entry in self.control:
                if entry[0] == "stats":
                    entry[1] = text
                    return
        if len(self.control) >= self.max_control:
            self.control.popleft()
            self.control_dropped += 1
        self.control.append(["stats" if stats else "msg", text])

    def pop_control(self) -> str | None:
        return self.control.popleft()[1] if self.control else None

    def push_chunk(self, headers: list[tuple[str, str]], frames: list[tuple[int, bytes]]) -> int:
        """Queue a chunk; returns how many frames were dropped to make room."""
        self.chunks.append(ChunkEntry(list(headers), deque(frames)))
        self.frames += len(frames)
        before = self.dropped
        while self.frames > self.max_frames and self._drop_oldest():
            pass
        return self.dropped - before

    def _drop_oldest(self) -> bool:
        found = False
        for entry in self.chunks:
            if entry.frames:
                entry.frames.popleft()
                self.frames -= 1
                self.dropped += 1
                found = True
                break
        # chunks left without frames whose headers were never sent are dropped whole, except the newest one
        # (its headers may carry a prompt_applied the client must still see)
        while len(self.chunks) > 1 and not self.chunks[0].frames and not self.chunks[0].started:
            gone = self.chunks.popleft()
            keep = [h for h in gone.headers if h[0] == "prompt_applied"]
            if keep:
                self.chunks[0].headers[:0] = keep
        return found

    def next_frame_index(self) -> int | None:
        for entry in self.chunks:
            if entry.frames:
                return entry.frames[0][0]
        return None

    def pop_headers(self) -> list[str]:
        """Headers of the next chunk, if they are due before its first frame (marks them sent)."""
        while self.chunks and not self.chunks[0].frames and self.chunks[0].started:
            self.chunks.popleft()
        if not self.chunks or self.chunks[0].started:
            return []
        self.chunks[0].started = True
        return [text for _, text in self.chunks[0].headers]

    def pop_frame(self) -> tuple[int, bytes] | None:
        while self.chunks:
            entry = self.chunks[0]
            if not entry.started and entry.headers:
                return None  # headers first (pop_headers)
            entry.started = True
            if entry.frames:
                self.frames -= 1
                item = entry.frames.popleft()
                if not entry.frames:
                    self.chunks.popleft()
                return item
            self.chunks.popleft()
        return None

    def clear(self):
        self.chunks.clear()
        self.frames = 0

    def empty(self) -> bool:
        return not self.control and not self.chunks


@dataclass(slots=True)
class PlayoutClock:
    fps: float
    anchor: tuple[float, int] | None = None  # (time, frame index) of a frame due at that time

    def due(self, index: int) -> float | None:
        if self.anchor is None:
            return None
        t, k = self.anchor
        return t + (index - k) / self.fps

    def on_chunk(self, first_frame: int, now: float):
        """A chunk arrived: anchor the clock on it if it is the first one or if it is late."""
        d = self.due(first_frame)
        if d is None or d < now:
            self.anchor = (now, first_frame)

    def restart(self, index: int | None, now: float):
        """After a pause: the next frame to play is due now (None: anchor on the next chunk)."""
        self.anchor = None if index is None else (now, index)

    def wait(self, index: int, now: float) -> float:
        d = self.due(index)
        return 0.0 if d is None else max(0.0, d - now)
