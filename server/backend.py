"""What the scheduler drives: a Backend advances a batch of sessions by one chunk each.

    backend.step([Work(state, new_prompt), ...]) -> [ChunkOut | Exception, ...]   (same order)

A Backend owns the per-session generation state (`open` makes it; dropping the last reference frees it) and
decides how to batch. A failure is reported per session (an Exception in its slot), so one session's fault
never takes its batch-mates down. Two implementations:
  - `server.batching.EngineBackend`: the real model, continuous batching across sessions;
  - `StubBackend` (here): deterministic synthetic frames after a configurable delay, for protocol tests and
    UI work without a model (`python -m server --stub`).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    name: str
    width: int
    height: int
    fps: int
    frames_per_chunk: int  # video frames of a steady-state chunk (the very first chunk may have fewer)


@dataclass(frozen=True)
class SessionSpec:
    prompt: str
    seed: int = 0


@dataclass
class ChunkOut:
    index: int  # chunk counter of the session, from 0
    first_frame: int  # index of its first video frame over the whole session
    frames: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str  # the prompt the chunk was generated under
    prompt_changed: bool  # True when a switch the client asked for took effect at this chunk
    timings_ms: dict = field(default_factory=dict)
    batch: int = 1  # sessions in the forward that made it (largest of its stages)


@dataclass
class Work:
    state: Any  # what Backend.open returned
    new_prompt: str | None = None  # a prompt switch (asked for by the client) to apply at this chunk boundary


class Backend(Protocol):
    info: ModelInfo

    def open(self, spec: SessionSpec) -> Any: ...

    def step(self, work: list[Work]) -> list[ChunkOut | BaseException]: ...

    def warmup(self) -> None: ...

    # Optional: the prompt's words the model's text encoder does not know, and the words it does, or None where its
    # vocabulary is open (umT5). Sessions tell the client with a `warning` message (README, "Server").
    # def unknown_words(self, prompt: str) -> tuple[list[str], list[str]] | None: ...


# ---- the stub -----------------------------------------------------------------------------------------------------


class InjectedFault(RuntimeError):
    pass


@dataclass
class StubState:
    spec: SessionSpec
    prompt: str
    chunks: int = 0
    frame: int = 0


class StubBackend:
    """Synthetic frames, deterministic in (seed, prompt, frame index): a colour from the prompt and a bar whose
    position moves with the frame index, so a prompt switch and motion are both visible.

    `delay_s` per step (plus `per_session_s` per session in it) stands in for the model's cost. A prompt that
    contains `fault_word` raises InjectedFault in that session's step (fault-injection tests).
    """

    def __init__(self, *, width=32, height=32, fps=16, frames_per_chunk=8, first_chunk_frames=None,
                 delay_s=0.0, per_session_s=0.0, fault_word="FAULT", name="stub", vocabulary=None):
        self.info = ModelInfo(name, width, height, fps, frames_per_chunk)
        self.first = frames_per_chunk if first_chunk_frames is None else first_chunk_frames
        self.delay_s, self.per_session_s, self.fault_word = delay_s, per_session_s, fault_word
        self.steps: list[int] = []  # batch size of every step (tests look at it)
        self.vocabulary = sorted(vocabulary) if vocabulary is not None else None  # None: any word is known

    def open(self, spec: SessionSpec) -> StubState:
        return StubState(spec, spec.prompt)

    def warmup(self) -> None:
        pass

    def unknown_words(self, prompt: str):
        if self.vocabulary is None:
            return None
        return [w for w in dict.fromkeys(prompt.lower().split()) if w not in self.vocabulary], self.vocabulary

    def step(self, work: list[Work]) -> list[ChunkOut | BaseException]:
        self.steps.append(len(work))
        time.sleep(self.delay_s + self.per_session_s * len(work))
        out: list[ChunkOut | BaseException] = []
        for w in work:
            st: StubState = w.state
            try:
                changed = w.new_prompt is not None
                if w.new_prompt is not None:
                    st.prompt = w.new_prompt
                if self.fault_word and self.fault_word in st.prompt:
                    raise InjectedFault(f"injected fault for prompt {st.prompt!r}")
                n = self.first if st.chunks == 0 else self.info.frames_per_chunk
                frames = np.stack([self.frame(st.spec.seed, st.prompt, st.frame + i) for i in range(n)])
                out.append(ChunkOut(st.chunks, st.frame, frames, st.prompt, changed,
                                    {"denoise": self.delay_s * 1000, "decode": 0.0}, batch=len(work)))
                st.chunks += 1
                st.frame += n
            except Exception as e:  # noqa: BLE001 - reported per session
                out.append(e)
        return out

    def frame(self, seed: int, prompt: str, index: int) -> np.ndarray:
        h, w = self.info.height, self.info.width
        c = zlib.crc32(f"{seed}:{prompt}".encode())
        img = np.empty((h, w, 3), np.uint8)
        img[:] = (c & 0xFF, (c >> 8) & 0xFF, (c >> 16) & 0xFF)
        x = index % w
        img[:, x] = 255 - img[:, x]
        return img
