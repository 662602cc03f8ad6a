"""python -m server: the websocket streaming server and the browser demo (stream-protocol.md v1).

    python -m server                                  # the shipped model on http://127.0.0.1:8765/
    python -m server --model PATH --port 9000 --max-sessions 4 --token SECRET
    python -m server --stub                           # synthetic frames, no model (UI work, protocol tests)

Logs one line per session start and end on stderr. SIGTERM / SIGINT shut down gracefully: every session gets
`done` and close 1000, then the process exits 0. Bad arguments or an unreadable model exit 2 with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from engine.cli import OneLineParser

PROG = "server"



def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m {PROG}", description="Serve the streaming engine over websockets, with a demo page.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument("--model", help="model folder, or a name in assets/ (default: the shipped model)")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent connections (default 8)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or ?token=TOKEN) on the websocket")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="an Origin allowed besides same-origin pages (repeatable; '*' allows any)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch", type=int, default=8,
                   help="sessions per batched forward (default 8; 1 = one session at a time)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-prompt-chars", type=int, default=2000)
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024)
    p.add_argument("--queue-frames", type=int, default=0,
                   help="per-session send queue bound in frames; the oldest are dropped beyond it (0 = automatic)")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds a connection may wait before 'start'")
    p.add_argument("--pause-timeout", type=float, default=600.0, help="seconds a session may stay paused")
    p.add_argument("--max-session-seconds", type=float, default=0.0, help="generation time limit (0 = none)")
    p.add_argument("--stub", action="store_true", help="synthetic frames instead of a model")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass at start-up")
    p.add_argument("--fp8", action="store_true", help="FP8 weights in the transformer blocks, as for engine.generate")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks' tensor work (engine/accel.py): faster forwards on a "
                        "GPU, seconds to minutes of compilation before the server listens")
    p.add_argument("--preview", nargs="?", const="", metavar="FILE",
                   help="decode with the fast preview decoder, as for engine.generate: the model's own, or FILE")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def engine_backend(a: argparse.Namespace, parser: argparse.ArgumentParser):
    """The model's batched backend from parsed arguments: load, compile (--compile), warm up (unless --no-warmup).
    Errors go through parser.error (exit 2, one line)."""
    import torch  # heavy imports after argument checks, so bad flags answer at once

    from engine.folder import ModelLoadError, load_model_folder

    from .batching import EngineBackend

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        model = load_model_folder(a.model, device=device, dtype=getattr(torch, a.dtype))
    except ModelLoadError as e:
        parser.error(f"--model: {e}")
    if a.preview is not None:
        from engine.pipeline import attach_preview

        try:
            attach_preview(model, a.preview, device, getattr(torch, a.dtype))
        except ValueError as e:
            parser.error(f"--preview: {e}")
    if a.fp8:
        from engine.fp8 import quantize_fp8

        quantize_fp8(model.transformer)
    if a.compile:
        from engine import accel

        accel.compile_blocks()  # global: every session's forward goes through the compiled block halves
    backend = EngineBackend(model, preview=a.preview is not None)
    if not a.no_warmup:
        backend.warmup()  # with --compile this is where compilation happens, before the first client
    return backend


async def _serve(app) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await app.start()
    print(f"http://{app.cfg.host}:{app.port}/", flush=True)
    await stopping.wait()
    await app.shutdown()
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    minimum = (("--port", a.port, 0), ("--max-sessions", a.max_sessions, 1), ("--max-batch", a.max_batch, 1),
               ("--max-prompt-chars", a.max_prompt_chars, 1), ("--max-message-bytes", a.max_message_bytes, 256),
               ("--queue-frames", a.queue_frames, 0))
    for flag, v, lo in minimum:
        if v < lo:
            parser.error(f"{flag} must be >= {lo}, got {v}")
    if a.port > 65535:
        parser.error(f"--port must be <= 65535, got {a.port}")
    if a.threads is not None and a.threads <= 0:
        parser.error("--threads must be positive")
    for flag, v in (("--start-timeout", a.start_timeout), ("--pause-timeout", a.pause_timeout)):
        if not v > 0:  # also nan; 0 would close every connection at once
            parser.error(f"{flag} must be a positive number of seconds, got {v}")
    if not a.max_session_seconds >= 0:
        parser.error(f"--max-session-seconds must be >= 0 (0 = no limit), got {a.max_session_seconds}")
    if a.stub and a.compile:
        parser.error("--compile needs a model: it cannot go with --stub")
    if a.stub and a.fp8:
        parser.error("--fp8 needs a model: it cannot go with --stub")
    if a.stub and a.preview is not None:
        parser.error("--preview needs a model: it cannot go with --stub")
    if a.token is not None and not a.token.strip():
        parser.error("--token must not be empty")
    for o in a.allowed_origin:
        if o != "*" and not o.startswith(("http://", "https://")):
            parser.error(f"--allowed-origin {o!r}: expected a URL such as https://example.com, or '*'")

    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)

    from .app import App, Config
    from .protocol import Limits

    if a.stub:
        from .backend import StubBackend

        backend = StubBackend(width=64, height=64, fps=16, frames_per_chunk=12, first_chunk_frames=9, delay_s=0.05)
    else:
        backend = engine_backend(a, parser)

    cfg = Config(host=a.host, port=a.port, max_sessions=a.max_sessions, token=a.token,
                 allowed_origins=tuple(a.allowed_origin),
                 limits=Limits(max_message_bytes=a.max_message_bytes, max_prompt_chars=a.max_prompt_chars),
                 max_batch=a.max_batch, queue_frames=a.queue_frames, start_timeout=a.start_timeout,
                 pause_timeout=a.pause_timeout, max_session_s=a.max_session_seconds)
    app = App(backend, cfg)
    try:
        return asyncio.run(_serve(app))
    except OSError as e:  # e.g. the port is taken
        parser.error(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
