"""python -m benchmarks.server_bench: the websocket server under load, continuous batching vs one at a time.

    python -m benchmarks.server_bench                         # shapes model, 1/2/4/8 sessions
    python -m benchmarks.server_bench --quick --json out.json
    python -m benchmarks.server_bench --model PATH --sessions 1,4 --seconds 20

Measured end to end over real websockets on loopback (server and clients in one process, clients only count
bytes): N clients start at once with pace "max" (frames leave as fast as they are generated), JPEG frames,
different seeds. After `--warmup-seconds` every frame that arrives in the next `--seconds` is counted:
  aggregate_fps    frames/s summed over the sessions
  per_session_fps  mean / min / max over the sessions
  frames_per_cpu_s frames per CPU-second of this process (all threads): the work per frame, which does not
                   depend on how much of a shared machine the process got (`cores_used` says how much)
for two schedulers on the same model:
  batched          the server's continuous batching (max_batch = N): one forward for all N sessions
  one_by_one       max_batch = 1: each session's chunk runs alone, round robin (N x the single-stream cost)
plus the time from `start` to the first binary frame: on an idle server (pace "realtime", as a viewer would
start; median of --first-frame-runs) and for a session that joins while N-1 others stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from websockets.asyncio.client import connect

from benchmarks.__main__ import device_info, git_sha, peak_rss_mb
from engine.cli import OneLineParser
from engine.folder import ModelLoadError, load_model_folder
from server.app import App, Config
from server.batching import EngineBackend

PROMPTS = ["a red circle bouncing on a black background",
           "a large yellow square moving left quickly on a navy background",
           "a small cyan triangle standing still and a magenta circle moving up slowly on a gray background",
           "a green triangle moving right on a white background"]


class Client:
    """One session: counts frames by arrival time."""

    def __init__(self, url: str, i: int, pace: str = "max"):
        self.url, self.i, self.pace = url, i, pace
        self.arrivals: list[float] = []
        self.t_start = self.t_first = None
        self.error = None

    async def run(self, stop_at: float):
        msg = {"type": "start", "prompt": PROMPTS[self.i % len(PROMPTS)], "seed": self.i, "format": "jpeg",
               "pace": self.pace}
        async with connect(self.url, max_size=None, compression=None, open_timeout=60) as ws:
            self.t_start = time.perf_counter()
            await ws.send(json.dumps(msg))
            while (left := stop_at - time.perf_counter()) > 0:
                try:
                    m = await asyncio.wait_for(ws.recv(), left)
                except TimeoutError:
                    break
                if isinstance(m, bytes):
                    now = time.perf_counter()
                    self.arrivals.append(now)
                    if self.t_first is None:
                        self.t_first = now
                elif json.loads(m).get("type") == "error":
                    self.error = json.loads(m)
            await ws.send(json.dumps({"type": "stop"}))
            try:
                async for _ in ws:
                    pass
            except Exception:  # noqa: BLE001 - closing
                pass

    @property
    def first_frame_ms(self):
        return None if self.t_first is None else (self.t_first - self.t_start) * 1000


class Server:
    """The real App on this process's event loop (the model runs in its worker thread, as in production)."""

    def __init__(self, backend, max_batch: int, max_sessions: int = 16):
        self.app = App(backend, Config(port=0, max_batch=max_batch, max_sessions=max_sessions, stats_interval=1.0))

    async def __aenter__(self):
        await self.app.start()
        return self

    async def __aexit__(self, *exc):
        await self.app.shutdown()

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.app.port}/v1/stream"


async def cpu_seconds(lo: float, hi: float) -> float:
    """CPU time this process (model, server and clients, all threads) uses between two perf_counter times."""
    await asyncio.sleep(max(lo - time.perf_counter(), 0))
    c0 = time.process_time()
    await asyncio.sleep(max(hi - time.perf_counter(), 0))
    return time.process_time() - c0


async def throughput(backend, n: int, max_batch: int, seconds: float, warmup: float) -> dict:
    async with Server(backend, max_batch) as srv:
        t0 = time.perf_counter()
        clients = [Client(srv.url, i) for i in range(n)]
        lo, hi = t0 + warmup, t0 + warmup + seconds
        *_, cpu_s = await asyncio.gather(*(c.run(hi) for c in clients), cpu_seconds(lo, hi))
        s = srv.app.scheduler
        mean_batch = s.batched_chunks / s.steps if s.steps else 0.0
    per = [sum(lo <= t < hi for t in c.arrivals) / seconds for c in clients]
    errors = [c.error for c in clients if c.error]
    firsts = [c.first_frame_ms for c in clients if c.first_frame_ms is not None] or [float("nan")]
    return {"sessions": n, "max_batch": max_batch, "aggregate_fps": round(sum(per), 2),
            "per_session_fps": {"mean": round(float(np.mean(per)), 2), "min": round(min(per), 2),
                                "max": round(max(per), 2)},
            "first_frame_ms": {"p50": round(float(np.median(firsts)), 1), "max": round(max(firsts), 1)},
            "sessions_without_frames": sum(c.t_first is None for c in clients),
            "mean_batch": round(mean_batch, 2),
            # robust to a shared machine: work per frame, whatever share of the CPU the process got
            "cpu_s": round(cpu_s, 2), "cores_used": round(cpu_s / seconds, 2),
            "frames_per_cpu_s": round(sum(per) * seconds / cpu_s, 2) if cpu_s > 0 else None,
            "errors": errors}


async def first_frame_once(url: str, i: int) -> float:
    """Start a session, wait for its first frame, stop it."""
    async with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "start", "prompt": PROMPTS[i % len(PROMPTS)], "seed": 100 + i}))
        while True:
            m = await ws.recv()
            if isinstance(m, bytes):
                ms = (time.perf_counter() - t0) * 1000
                break
        await ws.send(json.dumps({"type": "stop"}))
        try:
            async for _ in ws:
                pass
        except Exception:  # noqa: BLE001
            pass
    return ms


async def first_frame(backend, runs: int, busy: int) -> list[float]:
    """Time to first frame for a new session on a server that streams `busy` other sessions (pace max)."""
    out = []
    async with Server(backend, 8) as srv:
        stop = time.perf_counter() + 3600
        others = [Client(srv.url, 50 + i) for i in range(busy)]
        tasks = [asyncio.create_task(c.run(stop)) for c in others]
        if busy:
            while not all(c.t_first for c in others):
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
        for i in range(runs):
            out.append(await first_frame_once(srv.url, i))
            await asyncio.sleep(0.3)
        for t in tasks:  # end the background sessions
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


def model_info(model, backend) -> dict:
    p = model.preset
    return {"preset": p.name, "path": str(model.path), "placeholder": bool(model.info.get("placeholder")),
            "parameters": sum(x.numel() for x in model.transformer.parameters()),
            "resolution": [p.width, p.height], "fps": p.fps,
            "latent_frames_per_chunk": backend.cache_cfg.frames_per_chunk,
            "video_frames_per_chunk": backend.info.frames_per_chunk, "steps": len(backend.sampler_cfg.timesteps),
            "window_frames": backend.cache_cfg.window_frames, "sink": backend.cache_cfg.sink}


async def bench(a) -> dict:
    model = load_model_folder(a.model)
    backend = EngineBackend(model)
    t = time.perf_counter()
    backend.warmup()
    sizes = [int(x) for x in a.sessions.split(",")]
    # pay one-time per-shape costs (kernel selection for each batch size) before anything is timed
    for n in sizes:
        await throughput(backend, n, n, 1.0, 2.0)
    warm_s = time.perf_counter() - t
    load0 = os.getloadavg()
    results = {"batched": [], "one_by_one": []}
    for n in sizes:
        for mode, mb in (("batched", n), ("one_by_one", 1)):
            r = await throughput(backend, n, mb, a.seconds, a.warmup_seconds)
            results[mode].append(r)
            print(f"{mode:>10} {n} sessions: {r['aggregate_fps']:7.1f} frames/s aggregate, "
                  f"{r['per_session_fps']['mean']:6.1f} per session (min {r['per_session_fps']['min']:.1f}), "
                  f"mean batch {r['mean_batch']:.2f}, {r['frames_per_cpu_s']} frames per CPU-second "
                  f"({r['cores_used']} cores)", file=sys.stderr, flush=True)
    idle = await first_frame(backend, a.first_frame_runs, 0)
    busy_n = max(sizes) - 1
    busy = await first_frame(backend, a.first_frame_runs, busy_n) if busy_n > 0 else []
    print(f"first frame: idle p50 {np.median(idle):.0f} ms; with {busy_n} streaming sessions p50 "
          f"{np.median(busy) if busy else float('nan'):.0f} ms", file=sys.stderr)
    speedup = {str(b["sessions"]): round(b["aggregate_fps"] / o["aggregate_fps"], 3) if o["aggregate_fps"] else None
               for b, o in zip(results["batched"], results["one_by_one"])}
    cpu_speedup = {str(b["sessions"]): round(b["frames_per_cpu_s"] / o["frames_per_cpu_s"], 3)
                   if b["frames_per_cpu_s"] and o["frames_per_cpu_s"] else None
                   for b, o in zip(results["batched"], results["one_by_one"])}
    return {
        "git_sha": git_sha(),
        "device": device_info(str(backend.device.type), backend.dtype),
        "model": model_info(model, backend),
        "settings": {"seconds": a.seconds, "warmup_seconds": a.warmup_seconds, "pace": "max", "format": "jpeg",
                     "sessions": sizes, "first_frame_runs": a.first_frame_runs, "transport": "websockets, loopback",
                     "niceness": os.nice(0), "loadavg_before": [round(x, 2) for x in load0],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()], "warmup_s": round(warm_s, 1)},
        "batched": results["batched"],
        "one_by_one": results["one_by_one"],
        "batched_speedup": speedup,  # aggregate frames/s, batched / one by one
        "batched_speedup_per_cpu_s": cpu_speedup,  # frames per CPU-second, batched / one by one
        "first_frame_ms": {"idle": {"p50": round(float(np.median(idle)), 1), "runs": [round(x, 1) for x in idle]},
                           f"with_{busy_n}_streaming": {"p50": round(float(np.median(busy)), 1) if busy else None,
                                                        "runs": [round(x, 1) for x in busy]}},
        "peak_memory_mb": round(peak_rss_mb(), 1),
    }


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m benchmarks.server_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or name in assets/ (default: the shipped model)")
    p.add_argument("--sessions", default="1,2,4,8", help="comma-separated session counts (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=12.0, help="measured seconds per configuration")
    p.add_argument("--warmup-seconds", type=float, default=3.0, help="seconds before counting starts")
    p.add_argument("--first-frame-runs", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="1,4 sessions, 5 s each")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.sessions, a.seconds, a.warmup_seconds, a.first_frame_runs = "1,4", 5.0, 2.0, 3
    try:
        sizes = [int(x) for x in a.sessions.split(",")]
    except ValueError:
        p.error(f"--sessions: expected comma-separated integers, got {a.sessions!r}")
    if (not sizes or min(sizes) < 1 or not a.seconds > 0 or not a.warmup_seconds >= 0 or a.first_frame_runs < 1
            or (a.threads is not None and a.threads < 1)):
        p.error("--sessions must be positive, --seconds > 0, --warmup-seconds >= 0, --first-frame-runs >= 1, "
                "--threads >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        out = asyncio.run(bench(a))
    except ModelLoadError as e:
        p.error(f"--model: {e}")
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
        print(a.json)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
