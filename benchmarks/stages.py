"""Stage timings beyond generation: each denoising forward, frame encoding (JPEG, H.264), websocket transport on
loopback, and process memory. Used by `python -m benchmarks`.

Delivery stages are timed on the engine's own decoded frames, after the stream (so they do not share the CPU
with it): a server pays them per chunk on top of generation, `engine.generate` pays H.264.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class ForwardTimer:
    """Wraps a Stream's `denoise` and records each forward's wall time by its role in the chunk: the sampler's
    steps (`step_1` .. `step_N`, in order) and the clean pass (`clean`, the forward at t = 0 that commits)."""

    def __init__(self, stream, steps: int, sync=lambda: None):
        self.stream, self.steps, self.sync = stream, steps, sync
        self.times: dict[str, list[float]] = {}
        self._k = 0
        self._inner = stream.denoise
        stream.denoise = self  # instance attribute: shadows the method for this stream only

    def __call__(self, x, t):
        t0 = time.perf_counter()
        out = self._inner(x, t)
        self.sync()
        ms = (time.perf_counter() - t0) * 1000
        if float(torch.as_tensor(t).reshape(-1)[0]) == 0.0:  # a float or a [B] tensor
            name = "clean"
        else:
            name = f"step_{self._k % self.steps + 1}"
            self._k += 1
        self.times.setdefault(name, []).append(ms)
        return out

    def remove(self):
        del self.stream.denoise  # back to the class's method

    def summary(self) -> dict:
        """{role: mean ms}, steps first."""
        keys = sorted((k for k in self.times if k != "clean"), key=lambda k: int(k.split("_")[1]))
        keys += ["clean"] if "clean" in self.times else []
        return {k: float(np.mean(self.times[k])) for k in keys}


def _stats(ms: list[float]) -> dict:
    return {"mean": float(np.mean(ms)), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}


def jpeg_ms(chunks: list[np.ndarray], quality: int = 75) -> tuple[list[float], int]:
    """Per-chunk time to JPEG-encode every frame (the server's default format), and the total bytes."""
    from server.protocol import encode_image

    out, size = [], 0
    for c in chunks:
        t0 = time.perf_counter()
        size += sum(len(encode_image(f, "jpeg", quality)) for f in c)
        out.append((time.perf_counter() - t0) * 1000)
    return out, size


def h264_ms(chunks: list[np.ndarray], fps: int) -> tuple[list[float], int]:
    """Per-chunk time to H.264-encode (libx264, the MP4 writer `engine.generate` uses), and the file's bytes.
    The last chunk's time includes flushing the encoder."""
    from engine.video_io import Mp4Writer

    h, w = chunks[0].shape[1:3]
    out = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.mp4"
        writer = Mp4Writer(path, fps, w, h)
        for i, c in enumerate(chunks):
            t0 = time.perf_counter()
            writer.write(c)
            if i == len(chunks) - 1:
                writer.close()
            out.append((time.perf_counter() - t0) * 1000)
        size = path.stat().st_size
    return out, size


def websocket_ms(chunks: list[np.ndarray], quality: int = 75) -> list[float]:
    """Per-chunk loopback transport: the chunk's JPEG frames sent as the protocol's binary messages (8-byte
    index + image) to a websockets server on 127.0.0.1, until the server acknowledges the chunk's last byte."""
    return asyncio.run(_websocket_ms(chunks, quality))


async def _websocket_ms(chunks, quality):
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    from server.protocol import encode_image, pack_frame

    payloads = [[pack_frame(i, encode_image(f, "jpeg", quality)) for i, f in enumerate(c)] for c in chunks]

    async def sink(ws):
        n = 0
        async for m in ws:
            if isinstance(m, str):  # end of a chunk: acknowledge with the frame count received
                await ws.send(str(n))
            else:
                n += 1

    out = []
    async with serve(sink, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            sent = 0
            for frames in payloads:
                t0 = time.perf_counter()
                for p in frames:
                    await ws.send(p)
                await ws.send("end")
                sent += len(frames)
                if int(await ws.recv()) != sent:
                    raise RuntimeError("websocket benchmark: frames lost on loopback")
                out.append((time.perf_counter() - t0) * 1000)
    return out


def delivery(chunks: list[np.ndarray], fps: int) -> dict:
    """Frame encode and transport timings of one stream's chunks ([T, H, W, 3] uint8 each)."""
    jp, jpeg_bytes = jpeg_ms(chunks)
    h2, h264_bytes = h264_ms(chunks, fps)
    ws = websocket_ms(chunks)
    frames = sum(len(c) for c in chunks)
    return {"jpeg_encode": _stats(jp), "h264_encode": _stats(h2), "websocket": _stats(ws),
            "jpeg_kb_per_frame": jpeg_bytes / frames / 1024, "h264_kbit_per_s": h264_bytes * 8 / 1000 / (frames / fps)}


# ---- memory ---------------------------------------------------------------------------------------


def _status(field: str) -> float:
    """A /proc/self/status field in MB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb() -> float:
    """Resident memory now."""
    return _status("VmRSS")


def reset_peak() -> bool:
    """Resets the process's peak resident memory (Linux: clear_refs 5), so peak_mb() covers what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident memory since the last reset_peak() (or process start)."""
    return _status("VmHWM")


def available_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")
