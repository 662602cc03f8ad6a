"""Stream: one generation session in latent space (the model, its KV cache, its prompt, its history).

Per chunk (C latent frames):
    noise -> few-step sampler, each step one forward of the chunk through the cache -> clean latents x0
    -> clean pass: one forward of x0 at t = 0, whose K/V the cache commits (this is the context the
       next chunks see; Self-Forcing, CausVid, LongLive all do this).

Prompt switch = KV re-cache (LongLive): the clean latents of the frames in the cache are run again,
under the new prompt, so the video continues without a cut. With an `ema` sink the sink itself has no
latents behind it (it is a running summary of everything evicted): it is kept, and the window is
re-cached under the new prompt next to it.

`recompute=True` is the baseline without a cache: every forward runs the whole history (clean frames at
t = 0, block-causal) plus the current chunk. Its cost grows with the stream; the cached stream's does not.
"""

from __future__ import annotations

from collections import deque

import torch

from .attention import FullContext
from .cache import KVCache
from .config import Preset
from .model import CausalWanModel
from .sampler import sample


class Stream:
    def __init__(self, model: CausalWanModel, preset: Preset, *, batch: int = 1, recompute: bool = False,
                 cache_cfg=None, sampler_cfg=None, cuda_graphs: bool = False):
        self.model, self.preset = model, preset
        self.cache_cfg = cache_cfg or preset.cache
        self.sampler_cfg = sampler_cfg or preset.sampler
        self.batch, self.recompute = batch, recompute
        p = model.parameters().__next__()
        self.device, self.dtype = p.device, p.dtype
        h, w = preset.latent_hw
        _, ph, pw = model.cfg.patch_size
        self.chunk_shape = (batch, model.cfg.in_channels, self.cache_cfg.frames_per_chunk, h, w)
        self.cache = None if recompute else KVCache(
            self.cache_cfg, num_layers=model.cfg.num_layers, batch=batch, heads=model.cfg.num_attention_heads,
            head_dim=model.cfg.attention_head_dim, grid_hw=(h // ph, w // pw), device=self.device, dtype=self.dtype)
        self.text_kv = None
        # CUDA-graph replay of the steady-state forward (engine/accel.py); a no-op off CUDA
        self.graphs = None
        if cuda_graphs and self.cache is not None and self.device.type == "cuda":
            from .accel import GraphedForward

            self.graphs = GraphedForward(self)
        self.reset()

    def reset(self):
        """Start a new video (the prompt is kept)."""
        if self.cache is not None:
            self.cache.reset()
        self.sink_latents: list[torch.Tensor] = []  # static sink: the chunks that sit in the sink
        self.window_latents: deque[torch.Tensor] = deque()  # the chunks in the window, oldest first
        self.history: list[torch.Tensor] = []  # recompute mode: every clean chunk so far
        self.chunks = 0

    # ---- prompt ---------------------------------------------------------------------------------

    def set_prompt(self, text_embeds: torch.Tensor):
        """text_embeds [B or 1, Lt, text_dim]. Mid-stream this re-caches the context under the new prompt."""
        if text_embeds.shape[0] == 1 and self.batch > 1:
            text_embeds = text_embeds.expand(self.batch, -1, -1)
        with torch.no_grad():
            self.text_kv = self.model.text_kv(text_embeds.to(self.device))
        if self.chunks and self.cache is not None:
            self.recache()

    def recache(self):
        """Rebuild the cache from the clean latents it holds, under the current prompt."""
        if self.cache_cfg.sink == "ema" and self.cache.sink_frames:
            replay = list(self.window_latents)
            self.cache.reset_window()
        else:
            replay = self.sink_latents + list(self.window_latents)
            memory = self.cache.memory_state()  # the linear memory holds what left the context: keep it
            self.cache.reset()
            self.cache.set_memory_state(memory)
        self.sink_latents, self.window_latents = [], deque()
        chunks = self.chunks
        for clean in replay:
            self.commit(clean)
        self.chunks = chunks  # a re-cache does not advance the video

    def prime(self, clean_chunks):
        """Fill the context from given clean latent chunks, each [B, C, F, h, w] (as if generated)."""
        for clean in clean_chunks:
            self.commit(clean)

    # ---- one chunk ------------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """One forward of the current chunk x [B, C, F, h, w] at timestep t -> flow prediction v."""
        if self.text_kv is None:
            raise RuntimeError("set_prompt() before generating")
        if self.graphs is not None and self.graphs.usable(x, t):
            return self.graphs(x, t)
        tt = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(self.batch)
        if self.cache is not None:
            return self.model(x, tt, text_kv=self.text_kv, ctx=self.cache)
        return self._recompute_forward(x, tt)

    @torch.no_grad()
    def commit(self, clean: torch.Tensor):
        """Clean pass (t = 0): write the chunk's K/V into the context and advance the stream."""
        if self.cache is not None:
            self.denoise(clean, 0.0)
            self.cache.commit()
            self._track(clean)
        else:
            self.history.append(clean)
        self.chunks += 1

    def sample_chunk(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise the next chunk from noise -> clean latents [B, C, F, h, w] (not yet committed).

        All noise is drawn from `generator` on the CPU, so a seed gives the same video on every device.
        """
        def randn():
            return torch.randn(self.chunk_shape, generator=generator).to(self.device, self.dtype)

        return sample(self.denoise, randn(), self.sampler_cfg, randn)

    def next_chunk(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """sample_chunk, then commit it: one step of the stream."""
        clean = self.sample_chunk(generator)
        self.commit(clean)
        return clean

    # ---- internals ------------------------------------------------------------------------------

    def _track(self, clean):
        # Mirror the cache's eviction on the latents, so a re-cache can replay exactly what it holds.
        c = self.cache_cfg
        self.window_latents.append(clean)
        if len(self.window_latents) * c.frames_per_chunk > c.window_frames:
            old = self.window_latents.popleft()
            if c.sink == "static" and len(self.sink_latents) * c.frames_per_chunk < c.sink_frames:
                self.sink_latents.append(old)

    def _recompute_forward(self, x, t):
        hist = self.history
        seq = torch.cat(hist + [x], dim=2) if hist else x
        nc = len(hist) + 1
        cpf = self.cache_cfg.frames_per_chunk
        tf = torch.zeros(self.batch, nc * cpf, device=self.device)
        tf[:, -cpf:] = t[:, None]
        _, _, nf, h, w = seq.shape
        _, ph, pw = self.model.cfg.patch_size
        n = (h // ph) * (w // pw) * cpf  # tokens per chunk
        cid = torch.arange(nc, device=self.device).repeat_interleave(n)
        mask = cid[:, None] >= cid[None, :]  # block-causal
        ctx = FullContext((nf, h // ph, w // pw), self.model.cfg.attention_head_dim, self.device, mask=mask)
        return self.model(seq, tf, text_kv=self.text_kv, ctx=ctx)[:, :, -cpf:]
