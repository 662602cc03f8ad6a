"""python -m engine.generate: prompt -> MP4 / GIF / PNG folder, streamed chunk by chunk.

    python -m engine.generate --prompt "a red circle bouncing on a black background" --seconds 5
    python -m engine.generate --prompt "..." --prompt "..." --switch-at 48 --out clip.gif

Bad arguments, an unreadable model or an unwritable --out exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from .cli import OneLineParser

PROG = "engine.generate"



def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m {PROG}", description="Generate a video with the streaming engine.")
    p.add_argument("--prompt", action="append", required=True,
                   help="text prompt; repeat it with --switch-at to change the prompt mid-video")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--frames", type=int, help="number of video frames (default: 5 s at the model's fps)")
    n.add_argument("--seconds", type=float, help="length in seconds")
    p.add_argument("--seed", type=int, default=0, help="same seed + same settings = same video (default 0)")
    p.add_argument("--out", help=".mp4 (H.264), .gif, or a folder of PNGs (default: ./outputs/<prompt>.mp4)")
    p.add_argument("--model", help="model folder, or a name in assets/ (default: the shipped model)")
    p.add_argument("--switch-at", type=int, action="append", default=[], metavar="FRAME",
                   help="frame index where the next --prompt takes over (at the next chunk boundary)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sink", choices=["none", "static", "ema"], help="override the model's sink policy")
    p.add_argument("--window", type=int, metavar="LATENT_FRAMES", help="override the rolling window length")
    p.add_argument("--steps", type=int, help="denoising steps: the first of the model's timesteps, evenly spaced "
                                             "(default: all of them; a DMD student also runs at 2 or 1)")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 weights in the transformer blocks (engine/fp8.py): half of bf16's memory; FP8 matmuls "
                        "on GPUs of compute capability 8.9+ with --dtype bfloat16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks' tensor work, and on a GPU the VAE decoder (engine/accel.py; "
                        "costs seconds to a minute at start, cached by torch afterwards)")
    p.add_argument("--preview", nargs="?", const="", metavar="FILE",
                   help="decode with the fast preview decoder (engine/preview.py): the model's own (preview/), or "
                        "FILE, a preview folder or TAEHV weights such as taew2_1.safetensors for Wan2.1 latents")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "video"


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.frames is not None and a.frames <= 0:
        parser.error(f"--frames must be positive, got {a.frames}")
    if a.seconds is not None and not 0 < a.seconds < math.inf:  # nan and inf too
        parser.error(f"--seconds must be a positive, finite number, got {a.seconds}")
    if len(a.prompt) != len(a.switch_at) + 1:
        parser.error(f"{len(a.prompt)} prompts need {len(a.prompt) - 1} --switch-at frames, got {len(a.switch_at)}")
    if any(not p.strip() for p in a.prompt):
        parser.error("--prompt must not be empty")
    if a.switch_at != sorted(set(a.switch_at)) or any(f <= 0 for f in a.switch_at):
        parser.error("--switch-at frames must be positive and increasing")
    if a.threads is not None and a.threads <= 0:
        parser.error("--threads must be positive")

    import torch  # heavy imports after argument checks, so `--help` and bad flags answer at once

    from .folder import ModelLoadError, load_model_folder
    from .pipeline import VideoGenerator, attach_preview
    from .sampler import few_step_sampler
    from .video_io import open_writer

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = getattr(torch, a.dtype)

    t_load = time.perf_counter()
    try:
        model = load_model_folder(a.model, device=device, dtype=dtype)
    except ModelLoadError as e:
        parser.error(f"--model: {e}")
    preset = model.preset
    if a.preview is not None:
        try:
            attach_preview(model, a.preview, device, dtype)
        except ValueError as e:
            parser.error(f"--preview: {e}")
    overrides = {k: v for k, v in (("sink", a.sink), ("window_frames", a.window)) if v is not None}
    try:
        cache_cfg = replace(preset.cache, **overrides)
    except ValueError as e:
        parser.error(str(e))
    try:
        sampler_cfg = few_step_sampler(preset.sampler, a.steps) if a.steps is not None else None
    except ValueError as e:
        parser.error(f"--steps: {e}")

    frames = a.frames if a.frames is not None else round((a.seconds if a.seconds is not None else 5.0) * preset.fps)
    frames = max(frames, 1)
    if a.switch_at and a.switch_at[-1] >= frames:
        parser.error(f"--switch-at {a.switch_at[-1]} is past the last frame ({frames - 1})")
    out = Path(a.out) if a.out else Path("outputs") / f"{slug(a.prompt[0])}-seed{a.seed}.mp4"
    try:
        writer = open_writer(out, fps=preset.fps, width=preset.width, height=preset.height)
    except ValueError as e:
        parser.error(f"--out: {e}")

    if a.fp8:
        from .fp8 import quantize_fp8

        quantize_fp8(model.transformer)
    if a.compile:
        from .accel import compile_blocks, compile_decoder, decoder_gains_from_compile

        compile_blocks()
        if a.preview is None and decoder_gains_from_compile(model.vae):  # the preview decoder is cheap as it is
            compile_decoder(model.vae)
    gen = VideoGenerator(model, cache_cfg=cache_cfg, sampler_cfg=sampler_cfg, preview=a.preview is not None)
    gen.warmup()
    t_load = time.perf_counter() - t_load
    prompts = list(zip([0] + a.switch_at, a.prompt))
    bar = None
    if not a.quiet and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=frames, unit="frame", desc="generating", file=sys.stderr)
    stage: dict[str, float] = {}
    first_ms, first_stages, t0 = None, {}, time.perf_counter()
    with writer:
        for chunk in gen.run(prompts, frames, seed=a.seed):
            t_enc = time.perf_counter()
            writer.write(chunk.frames)
            chunk.timings_ms["encode"] = (time.perf_counter() - t_enc) * 1000
            if first_ms is None:
                first_ms = (time.perf_counter() - t0) * 1000
                first_stages = dict(chunk.timings_ms)
            for k, v in chunk.timings_ms.items():
                stage[k] = stage.get(k, 0.0) + v
            if bar:
                bar.update(len(chunk.frames))
    total = time.perf_counter() - t0
    if bar:
        bar.close()
    path = writer.close()
    print(path)
    per = ", ".join(f"{k} {v:.0f}" for k, v in stage.items())
    print(f"{frames} frames {preset.width}x{preset.height} in {total:.2f} s: {frames / total:.1f} frames/s "
          f"({frames / total / preset.fps:.2f}x real time), first chunk {first_ms:.0f} ms "
          f"({', '.join(f'{k} {v:.0f}' for k, v in first_stages.items())}); "
          f"stage totals ms: {per}; load + warm-up {t_load:.2f} s")
    return 0


def _one_line_warnings():
    """On the command line a warning for the user (an unknown prompt word, say) is one line, not Python's two (the
    second is the source line that raised it)."""
    import warnings

    warnings.showwarning = lambda message, category, *_, **__: print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    _one_line_warnings()
    sys.exit(main())
