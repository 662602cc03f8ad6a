"""KVCache: the streaming self-attention context, preallocated once per stream.

Per layer, keys and values live in one buffer of (S + W + C) frames, n tokens each:

    [ sink: S frames | window: W frames | current chunk: C frames ]      S = sink_frames (0 for 'none')

- Every forward of the current chunk (each denoising step, the clean pass) writes its K/V into the
  `current` slot and attends to [live sink | live window | current]. Nothing is allocated per step.
- `commit()` after the clean pass (t = 0) appends the current slot to the window: the window is kept
  right-aligned (newest frames next to the current slot), so the live region is one contiguous slice
  in steady state. When the window is full, its oldest chunk is *evicted*: it goes to the eviction
  hooks (a later linear-attention memory plugs in there) and to the sink policy:
    none   - dropped;
    static - the first evicted frames fill the sink and stay forever;
    ema    - the first evicted chunk initialises the sink, later ones fold in:
             sink <- alpha * sink + (1 - alpha) * evicted    (alpha = 1 is 'static').
- Keys are stored *without* RoPE. At attention time the live frames get positions 0, 1, ... in
  [sink, window, current] order, so positions never grow however long the stream runs.

Memory and per-chunk work are constant: the buffers are the only state, and the live region is at most
S + W + C frames. Bookkeeping is plain Python ints (no host syncs).
"""

from __future__ import annotations

from typing import Callable

import torch

from .attention import apply_rope, attention, rope_range
from .config import CacheConfig

# hook(k_evicted, v_evicted), each [num_layers, B, frames_per_chunk * n, H, D], called on every eviction
EvictHook = Callable[[torch.Tensor, torch.Tensor], None]


class KVCache:
    def __init__(self, cfg: CacheConfig, *, num_layers: int, batch: int, heads: int, head_dim: int,
                 grid_hw: tuple[int, int], device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.hw = grid_hw  # (fh, fw) tokens per latent frame, after patching
        self.n = grid_hw[0] * grid_hw[1]  # tokens per latent frame
        self.S, self.W, self.C = cfg.sink_size, cfg.window_frames, cfg.frames_per_chunk
        self.head_dim = head_dim
        shape = (num_layers, batch, (self.S + self.W + self.C) * self.n, heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.evict_hooks: list[EvictHook] = []
        self.reset()

    # ---- state ----------------------------------------------------------------------------------

    def reset(self):
        """Forget everything (a new stream). Buffers are kept; nothing is reallocated."""
        self.sink_frames = 0  # live sink frames (0 or S)
        self.reset_window()

    def reset_window(self):
        """Forget the window but keep the sink (prompt switch with an EMA sink)."""
        self.window_frames = 0  # live window frames, right-aligned against the current slot
        self.chunks_committed = 0

    @property
    def live_frames(self) -> int:
        """Frames one forward of the current chunk attends to (sink + window + chunk)."""
        return self.sink_frames + self.window_frames + self.C

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def _frames(self, a: int, b: int) -> slice:
        return slice(a * self.n, b * self.n)

    # ---- attention ------------------------------------------------------------------------------

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Live keys/values of one layer, [B, live_frames * n, H, D], in [sink | window | current] order."""
        S, W = self.S, self.W
        tail = self._frames(S + W - self.window_frames, S + W + self.C)  # window (right-aligned) + current
        if self.sink_frames == 0:  # warm-up (and no-sink streams): one slice
            return self.k[layer, :, tail.start:], self.v[layer, :, tail.start:]
        if self.sink_frames == S and self.window_frames == W:  # steady state: the whole buffer
            return self.k[layer], self.v[layer]
        # a gap between the live sink and the live window (sink still filling, or after reset_window())
        sink = self._frames(0, self.sink_frames)
        return (torch.cat([self.k[layer, :, sink], self.k[layer, :, tail]], 1),
                torch.cat([self.v[layer, :, sink], self.v[layer, :, tail]], 1))

    def attend(self, layer: int, q, k, v):
        """Self-attention of the current chunk: q, k, v [B, C*n, H, D] un-roped -> [B, C*n, H, D]."""
        cur = self._frames(self.S + self.W, self.S + self.W + self.C)
        if k.shape[1] != cur.stop - cur.start:
            raise ValueError(f"chunk has {k.shape[1]} tokens, the cache expects {cur.stop - cur.start}")
        self.k[layer, :, cur] = k
        self.v[layer, :, cur] = v
        keys, values = self.context(layer)
        cos, sin = rope_range(self.head_dim, self.live_frames, *self.hw, str(q.device))
        nq = q.shape[1]
        return attention(apply_rope(q, cos[-nq:], sin[-nq:]), apply_rope(keys, cos, sin), values)

    # ---- the chunk boundary ---------------------------------------------------------------------

    def commit(self):
        """Append the current slot (the clean pass's K/V) to the window, evicting the oldest chunk if full."""
        S, W, C = self.S, self.W, self.C
        if W == 0:  # no context at all: every chunk is independent
            self.chunks_committed += 1
            return
        new = min(self.window_frames + C, W)
        evicted = self.window_frames + C - new  # 0 or C frames
        if evicted:
            old = self._frames(S, S + C)
            self._evict(self.k[:, :, old].clone(), self.v[:, :, old].clone())
        # shift [window | current] left by C frames; the source is cloned because the ranges overlap
        src, dst = self._frames(S + W + C - new, S + W + C), self._frames(S + W - new, S + W)
        self.k[:, :, dst] = self.k[:, :, src].clone()
        self.v[:, :, dst] = self.v[:, :, src].clone()
        self.window_frames = new
        self.chunks_committed += 1

    def _evict(self, k, v):
        for hook in self.evict_hooks:
            hook(k, v)
        policy = self.cfg.sink
        if policy == "none":
            return
        if self.sink_frames < self.S:  # the first evicted frames fill the sink (static and ema alike)
            dst = self._frames(self.sink_frames, self.sink_frames + self.C)
            self.k[:, :, dst], self.v[:, :, dst] = k, v
            self.sink_frames += self.C
        elif policy == "ema":
            self.ema_update(self.k[:, :, : self.S * self.n], k, self.cfg.ema_alpha)
            self.ema_update(self.v[:, :, : self.S * self.n], v, self.cfg.ema_alpha)

    @staticmethod
    def ema_update(sink: torch.Tensor, evicted: torch.Tensor, alpha: float):
        """In place: sink <- alpha * sink + (1 - alpha) * evicted."""
        sink.mul_(alpha).add_(evicted, alpha=1.0 - alpha)
