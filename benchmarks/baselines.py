"""What a user would run instead of the engine: diffusers' `WanPipeline` with the bidirectional Shapes teacher.

Same architecture (the student is the teacher's architecture made causal), resolution and frame count as the
engine's side-by-side run; the teacher's usual sampler (30 Euler steps with classifier-free guidance, shift 3,
the `FlowMatchEulerDiscreteScheduler` that `distill.teacher.sample` is tested equal to). Prompts are encoded
by the Shapes text encoder and handed to the pipeline as `prompt_embeds` (the pipeline's own tokenizer and
umT5 slots stay empty). The pipeline returns nothing until the whole clip is done, so its first frame comes
at the end of the call.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def load_wan_pipeline(teacher: str | Path | None, vae, preset_name: str, shift: float = 3.0):
    """(WanPipeline, text encoder). `teacher`: an exported teacher folder (transformer/ + text_encoder/) or a
    teacher run folder; None builds a random teacher of the preset (speed does not depend on the values).
    `vae`: the engine's VideoVAE (its diffusers AutoencoderKLWan is what the pipeline decodes with)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from distill.teacher import Teacher
    from distill.train_teacher import load_teacher
    from engine.config import get_preset

    t = Teacher.from_preset(get_preset(preset_name)) if teacher is None else load_teacher(Path(teacher), preset_name)
    t = t.eval().requires_grad_(False)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.vae, transformer=t.transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe, t.text


@torch.no_grad()
def wan_pipeline_system(pipe, text, prompt: str, frames: int, width: int, height: int, steps: int = 30,
                        guidance: float = 4.0, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Time one warm call of the pipeline for `frames` frames (rounded up to 1 + 4k, as the pipeline needs).
    Returns (timings in the benchmark's schema, uint8 frames [T, H, W, 3])."""
    tt = pipe.vae_scale_factor_temporal
    frames = (frames - 1 + tt - 1) // tt * tt + 1
    decode_ms = []
    orig = pipe.vae.decode

    def timed_decode(*args, **kw):
        t0 = time.perf_counter()
        out = orig(*args, **kw)
        decode_ms.append((time.perf_counter() - t0) * 1000)
        return out

    pipe.vae.decode = timed_decode
    try:
        def call(n_frames, n_steps, s):
            t0 = time.perf_counter()
            cond, uncond = text.encode([prompt]), text.encode([""])
            text_ms = (time.perf_counter() - t0) * 1000
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width,
                       num_frames=n_frames, num_inference_steps=n_steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(s), output_type="np").frames[0]
            return out, text_ms, (time.perf_counter() - t0) * 1000

        call(1 + tt, 1, seed)  # warm-up: allocator, kernels, lazy imports
        decode_ms.clear()
        video, text_ms, total_ms = call(frames, steps, seed)
    finally:
        del pipe.vae.decode  # back to the class's method
    video = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    seconds = total_ms / 1000
    dec = sum(decode_ms)
    res = {"fps": frames / seconds, "frames": frames, "seconds": seconds, "first_frame_ms": total_ms,
           "chunk_ms": {"p50": total_ms, "p95": total_ms},  # one call: the whole clip is its only "chunk"
           "stage_ms": {"text": text_ms, "denoise": total_ms - text_ms - dec, "decode": dec},
           "fps_without_decode": frames / max(seconds - dec / 1000, 1e-9),
           "steps": steps, "guidance": guidance, "forwards_per_step": 2 if guidance != 1.0 else 1}
    return res, video
