"""VideoGenerator: prompt(s) -> decoded frames, chunk by chunk, with per-stage timings.

The one loop behind `python -m engine.generate`, the server and the benchmarks:
    text encode (once per prompt) -> Stream.sample_chunk (denoise) -> StreamingDecoder.decode -> frames out
    -> Stream.commit (clean pass: 'context'), done only when the next chunk is asked for, so a chunk's frames
       leave before its clean pass (the pass is needed by the next chunk, not by this one's frames).
A chunk of C latent frames decodes to 4C video frames (the very first to 4C - 3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .folder import LoadedModel
from .stream import Stream
from .video_io import frames_to_uint8


@dataclass
class Chunk:
    index: int
    first_frame: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str
    prompt_changed: bool
    timings_ms: dict = field(default_factory=dict)


def steady_chunks(cache_cfg) -> int:
    """Chunks a stream runs before every later chunk sees the same shapes: sink and window full, plus one."""
    return -(-(cache_cfg.sink_frames + cache_cfg.window_frames) // cache_cfg.frames_per_chunk) + 2


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_preview(model: LoadedModel):
    """A ValueError unless the model has a preview decoder that reads its VAE's latents at its VAE's scale."""
    pv, vae = model.preview, model.vae
    if pv is None:
        raise ValueError(f"{model.name} has no preview decoder ({model.path / 'preview'}): give one, e.g. "
                         "--preview taew2_1.safetensors for Wan2.1 latents")
    have = (pv.cfg.z_dim, pv.cfg.spatial, pv.cfg.temporal)
    if have != (vae.z_dim, vae.spatial, vae.temporal):
        raise ValueError(f"the preview decoder reads {have[0]} channels at x{have[1]} space and x{have[2]} time, "
                         f"the VAE {vae.z_dim} at x{vae.spatial} and x{vae.temporal}")


def attach_preview(model: LoadedModel, path: str, device="cpu", dtype=torch.float32):
    """The CLIs' --preview [FILE]: the model's own preview decoder (path "") or the one at `path`, checked against
    the VAE. A one-line ValueError (ModelLoadError is one) if it is missing, unreadable or does not fit."""
    if path:
        from .preview import load_preview

        model.preview = load_preview(path, device=device, dtype=dtype)
    check_preview(model)


class VideoGenerator:
    def __init__(self, model: LoadedModel, *, cache_cfg=None, sampler_cfg=None, recompute=False, decode=True,
                 cuda_graphs=False, decoder_frames_per_call=None, preview=False):
        """preview: decode with the model's fast preview decoder (engine/preview.py) instead of the VAE's."""
        self.m = model
        self.preset = model.preset
        self.device = model.transformer.proj_out.weight.device
        self.stream = Stream(model.transformer, model.preset, cache_cfg=cache_cfg, sampler_cfg=sampler_cfg,
                             recompute=recompute, cuda_graphs=cuda_graphs)
        self.decode = decode
        self.decoder_frames_per_call = decoder_frames_per_call  # engine/vae.py StreamingDecoder: None = a chunk a call
        self.decoder = model.vae
        if preview:
            check_preview(model)
            self.decoder = model.preview

    @property
    def fps(self) -> int:
        return self.preset.fps

    def frames_for_chunks(self, n: int) -> int:
        c = self.stream.cache_cfg.frames_per_chunk * self.m.vae.temporal
        return max(0, n * c - (self.m.vae.temporal - 1))

    def chunks_for_frames(self, frames: int) -> int:
        c = self.stream.cache_cfg.frames_per_chunk * self.m.vae.temporal
        return -(-(frames + self.m.vae.temporal - 1) // c)

    def embed(self, prompt: str) -> torch.Tensor:
        return self.m.text.encode([prompt])  # [1, Lt, text_dim]; umT5 keeps its own prompt cache

    @torch.no_grad()
    def warmup(self, steady: bool | None = None):
        """A throw-away pass through every stage, so one-time costs (allocator, kernel selection, compilation)
        are paid at load time rather than in the stream. One chunk, or with `steady` (default: when anything is
        compiled, engine/accel.py) enough chunks to fill the sink and window, so that the steady-state shapes
        (full cache, the decoder's whole-chunk calls) are compiled too. The stream is reset afterwards."""
        from . import accel

        if steady is None:
            steady = accel.is_compiled() or accel.decoder_compiled(self.m.vae)
        frames = self.frames_for_chunks(steady_chunks(self.stream.cache_cfg)) if steady else 1
        for _ in self.run([(0, "")], frames, seed=0):
            pass
        self.stream.reset()

    def run(self, prompts: list[tuple[int, str]], num_frames: int | None, seed: int = 0) -> Iterator[Chunk]:
        """prompts: [(first frame, prompt), ...] sorted, the first at frame 0. A switch takes effect at the
        first chunk that starts at or after its frame. num_frames None = forever. Yields decoded chunks."""
        gen = torch.Generator().manual_seed(seed)
        self.stream.reset()
        decoder = self.decoder.stream(self.decoder_frames_per_call)
        frame, index, pending, current, last = 0, 0, list(prompts), None, None
        while num_frames is None or frame < num_frames:
            t = {}
            changed = False
            if last is not None:  # write the previous chunk into the cache: this chunk's context
                t0 = time.perf_counter()
                self.stream.commit(last)
                _sync(self.device)
                t["context"] = time.perf_counter() - t0
            if pending and pending[0][0] <= frame:
                while len(pending) > 1 and pending[1][0] <= frame:
                    pending.pop(0)
                current = pending.pop(0)[1]
                t0 = time.perf_counter()
                emb = self.embed(current)
                t["text"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.stream.set_prompt(emb)  # re-caches the context when mid-stream
                _sync(self.device)
                if index:
                    t["recache"] = time.perf_counter() - t0
                changed = True
            t0 = time.perf_counter()
            clean = self.stream.sample_chunk(gen)
            _sync(self.device)
            t["denoise"] = time.perf_counter() - t0
            last = clean
            if self.decode:
                t0 = time.perf_counter()
                video = decoder.decode(clean)
                frames = frames_to_uint8(video[:1].float())
                t["decode"] = time.perf_counter() - t0
            else:
                n = self.frames_for_chunks(index + 1) - self.frames_for_chunks(index)
                frames = np.zeros((n, self.preset.height, self.preset.width, 3), np.uint8)
            if num_frames is not None:
                frames = frames[: num_frames - frame]
            yield Chunk(index, frame, frames, current, changed, {k: v * 1000 for k, v in t.items()})
            frame += len(frames)
            index += 1
