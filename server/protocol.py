"""The wire protocol (../shared/specs/stream-protocol.md, v1): typed client messages, validated on receipt,
server messages, error and close codes, the binary frame layout, and frame encoding.

Pure functions and frozen dataclasses: nothing here touches a socket, a thread or the model.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---- error codes (stream-protocol.md "Errors and limits") -------------------------------------------------------

BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
BAD_PROMPT = "bad_prompt"
NOT_STARTED = "not_started"
ALREADY_STARTED = "already_started"
BUSY = "busy"
TOO_LARGE = "too_large"
INTERNAL = "internal"

# ---- close codes ------------------------------------------------------------------------------------------------

CLOSE_NORMAL = 1000
CLOSE_TOO_LARGE = 1009
CLOSE_INTERNAL = 1011
CLOSE_BUSY = 1013  # "try again later"

FORMATS = ("jpeg", "png", "rgb")
PACES = ("realtime", "max")
DONE_REASONS = ("frames", "stop", "timeout")
MAX_SEED = 2**63 - 1
MAX_FRAMES = 2**40  # "unbounded" in practice; larger values are a client bug
DEFAULT_QUALITY = 85


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 64 * 1024
    max_prompt_chars: int = 2000


class ProtocolError(Exception):
    """A rejected client message: becomes one `error` message; the session lives on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ---- client -> server -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int = 0
    frames: int = 0  # 0 = unbounded
    format: str = "jpeg"
    quality: int = DEFAULT_QUALITY
    pace: str = "realtime"


@dataclass(frozen=True)
class Prompt:
    prompt: str


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Message = Start | Prompt | Pause | Resume | Stop


def _int(d: dict, field: str, default: int, lo: int, hi: int) -> int:
    v = d.get(field, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        # JSON has one number type: accept 7.0 for 7, refuse 7.5
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ProtocolError(BAD_MESSAGE, f"field '{field}' must be an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise ProtocolError(BAD_MESSAGE, f"field '{field}' must lie in [{lo}, {hi}], got {v}")
    return v


def _choice(d: dict, field: str, default: str, choices: tuple[str, ...]) -> str:
    v = d.get(field, default)
    if v is None:
        return default
    if not isinstance(v, str) or v not in choices:
        raise ProtocolError(BAD_MESSAGE, f"field '{field}' must be one of {', '.join(choices)}, got "
                                         f"{json.dumps(v)[:40]}")
    return v


def _prompt(d: dict, limits: Limits) -> str:
    if "prompt" not in d:
        raise ProtocolError(BAD_MESSAGE, "field 'prompt' is required")
    p = d["prompt"]
    if not isinstance(p, str):
        raise ProtocolError(BAD_MESSAGE, f"field 'prompt' must be a string, got {type(p).__name__}")
    if not p.strip():
        raise ProtocolError(BAD_PROMPT, "field 'prompt' is empty")
    if len(p) > limits.max_prompt_chars:
        raise ProtocolError(BAD_PROMPT, f"field 'prompt' has {len(p)} characters, the limit is "
                                        f"{limits.max_prompt_chars}")
    return p.strip()


def parse_message(data: str | bytes, limits: Limits = Limits()) -> Message:
    """One client message -> a typed message, or ProtocolError naming what is wrong (and which field)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_JSON, "expected a JSON text message, got a binary message")
    if len(data.encode("utf-8", "surrogatepass")) > limits.max_message_bytes:
        raise ProtocolError(TOO_LARGE, f"message over the {limits.max_message_bytes}-byte limit")
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(BAD_JSON, f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ProtocolError(BAD_JSON, f"expected a JSON object, got {type(d).__name__}")
    if "type" not in d:
        raise ProtocolError(BAD_MESSAGE, "field 'type' is required")
    kind = d["type"]
    if not isinstance(kind, str):
        raise ProtocolError(BAD_MESSAGE, "field 'type' must be a string")
    if kind == "start":
        return Start(
            prompt=_prompt(d, limits),
            seed=_int(d, "seed", 0, 0, MAX_SEED),
            frames=_int(d, "frames", 0, 0, MAX_FRAMES),
            format=_choice(d, "format", "jpeg", FORMATS),
            quality=_int(d, "quality", DEFAULT_QUALITY, 1, 100),
            pace=_choice(d, "pace", "realtime", PACES),
        )
    if kind == "prompt":
        return Prompt(_prompt(d, limits))
    if kind == "pause":
        return Pause()
    if kind == "resume":
        return Resume()
    if kind == "stop":
        return Stop()
    raise ProtocolError(BAD_MESSAGE, f"field 'type': unknown message type {json.dumps(kind)[:40]} "
                                     f"(expected start, prompt, pause, resume or stop)")


# ---- server -> client -------------------------------------------------------------------------------------------


def dumps(msg: dict[str, Any]) -> str:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False)


def error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}


def done(frames: int, reason: str, **extra) -> dict:
    assert reason in DONE_REASONS, reason
    return {"type": "done", "frames": frames, "reason": reason, **extra}


FRAME_HEADER = struct.Struct("<Q")  # bytes 0-7: frame index, unsigned 64-bit little-endian


def pack_frame(index: int, image: bytes) -> bytes:
    return FRAME_HEADER.pack(index) + image


def unpack_frame(data: bytes) -> tuple[int, bytes]:
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"binary frame of {len(data)} bytes is shorter than its 8-byte header")
    return FRAME_HEADER.unpack_from(data)[0], bytes(data[FRAME_HEADER.size:])


def encode_image(frame: np.ndarray, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 [H, W, 3] -> JPEG / PNG file bytes, or raw row-major RGB (`rgb`)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
    if fmt == "rgb":
        return np.ascontiguousarray(frame).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(frame, "RGB")
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()
