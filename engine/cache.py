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

Hybrid Forcing's paths (CacheConfig; both off by default, which is exactly the dense path above):
- `sparse_topk`: each query block (`sparse_block` tokens) attends to the blocks holding the sink and the current
  chunk, always, and to the top fraction of the window's key blocks by pooled q.k score (block-sparse attention
  inside the window; kernels/block_sparse.py; Triton on CUDA, a torch gather path on the CPU).
- `linear_memory`: every chunk that leaves the live context (evicted from the window and not taken into the
  sink) is folded into a per-layer, per-head state (sum phi(k) v^T, sum phi(k)) of un-roped keys;
  `memory_readout` gives each query its read-out, which the model adds to the softmax output through its
  zero-initialised projection (kernels/linear_memory.py, CausalWanModel.enable_linear_memory).
`switch_attention` turns both on for a model and a cache config (the trainer's dense -> sparse/linear switch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import torch

from kernels.block_sparse import key_blocks_covering, select_blocks
from kernels.linear_memory import fold, readout

from .attention import apply_rope, attention, kernel_impl, rope_range
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
        if cfg.linear_memory:  # fp32 state [num_layers, B, H, D, D] and normaliser [num_layers, B, H, D]
            self.mem_M = torch.zeros(num_layers, batch, heads, head_dim, head_dim, device=device)
            self.mem_z = torch.zeros(num_layers, batch, heads, head_dim, device=device)
        self.reset()

    # ---- state ----------------------------------------------------------------------------------

    def reset(self):
        """Forget everything (a new stream). Buffers are kept; nothing is reallocated."""
        self.sink_frames = 0  # live sink frames (0 or S)
        self.memory_chunks = 0  # chunks folded into the linear memory (kept by reset_window)
        if self.cfg.linear_memory:
            self.mem_M, self.mem_z = torch.zeros_like(self.mem_M), torch.zeros_like(self.mem_z)
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
        mem = self.mem_M.nbytes + self.mem_z.nbytes if self.cfg.linear_memory else 0
        return self.k.nbytes + self.v.nbytes + mem

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
        if torch.is_grad_enabled():  # autograd would save views of the buffers, which later layers write in place
            keys, values = keys.clone(), values.clone()
        cos, sin = rope_range(self.head_dim, self.live_frames, *self.hw, str(q.device))
        nq = q.shape[1]
        q, keys = apply_rope(q, cos[-nq:], sin[-nq:]), apply_rope(keys, cos, sin)
        if self.cfg.sparse_topk is None:
            return attention(q, keys, values)
        return attention(q, keys, values, self.block_table(q, keys))

    def block_table(self, q, keys):
        """Block-sparse table for roped q [B, Lq, H, D] against the live keys [B, Lk, H, D]: the sink's and the
        current chunk's key blocks, plus the top `sparse_topk` fraction (rounded up) of the window's blocks by
        pooled q.k score. The fraction is of the window, not of all live keys: sink and chunk are half the live
        keys of a typical cache (3 + 6 + 3 frames), so a fraction of all blocks would leave the window nothing."""
        bs, nq, nk = self.cfg.sparse_block, q.shape[1], keys.shape[1]
        keep = _kept_blocks(self.sink_frames * self.n, nq, nk, bs)  # sink + current chunk, on the CPU
        kept = int(keep.sum())
        n = kept + math.ceil(self.cfg.sparse_topk * (keep.numel() - kept) - 1e-9)
        return select_blocks(q.transpose(1, 2), keys.transpose(1, 2), bs, bs, n, keep)

    def memory_readout(self, layer: int, q):
        """Linear-memory read-out for the current chunk's un-roped q [B, Lq, H, D] -> [B, Lq, H, D] (q's dtype),
        or None when the memory is off or still empty."""
        if not self.cfg.linear_memory or self.memory_chunks == 0:
            return None
        return readout(q.transpose(1, 2), self.mem_M[layer], self.mem_z[layer], impl=kernel_impl()).transpose(1, 2)

    def memory_state(self):
        """(M, z, chunks) of the linear memory (None when off), e.g. to carry it across a reset()."""
        return (self.mem_M, self.mem_z, self.memory_chunks) if self.cfg.linear_memory else None

    def set_memory_state(self, state):
        if state is not None:
            self.mem_M, self.mem_z, self.memory_chunks = state

    def detach_(self):
        """Drop the autograd history of every buffer. Training rollouts (distill/self_forcing.py) call it after each
        chunk: a gradient then stays inside the forward that made it, and the context is a constant to later chunks."""
        self.k, self.v = self.k.detach(), self.v.detach()
        if self.cfg.linear_memory:
            self.mem_M, self.mem_z = self.mem_M.detach(), self.mem_z.detach()

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
        if self.cfg.linear_memory and not (policy != "none" and self.sink_frames < self.S):
            self._fold(k, v)  # leaves the live context (chunks that fill the sink stay visible: not folded)
        if policy == "none":
            return
        if self.sink_frames < self.S:  # the first evicted frames fill the sink (static and ema alike)
            dst = self._frames(self.sink_frames, self.sink_frames + self.C)
            self.k[:, :, dst], self.v[:, :, dst] = k, v
            self.sink_frames += self.C
        elif policy == "ema":
            self.ema_update(self.k[:, :, : self.S * self.n], k, self.cfg.ema_alpha)
            self.ema_update(self.v[:, :, : self.S * self.n], v, self.cfg.ema_alpha)

    def _fold(self, k, v):
        # k, v [num_layers, B, T, H, D] -> all layers at once as a batch of num_layers * B
        L, B = k.shape[:2]
        M, z = fold(self.mem_M.flatten(0, 1), self.mem_z.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                    v.flatten(0, 1).transpose(1, 2), impl=kernel_impl())
        self.mem_M, self.mem_z = M.unflatten(0, (L, B)), z.unflatten(0, (L, B))  # a new state: autograd-safe
        self.memory_chunks += 1

    @staticmethod
    def ema_update(sink: torch.Tensor, evicted: torch.Tensor, alpha: float):
        """In place: sink <- alpha * sink + (1 - alpha) * evicted."""
        sink.mul_(alpha).add_(evicted, alpha=1.0 - alpha)


@functools.lru_cache(maxsize=256)
def _kept_blocks(sink_tokens: int, nq: int, nk: int, block: int) -> torch.Tensor:
    """bool [NKB] (CPU): key blocks overlapping the sink [0, sink_tokens) or the current chunk [nk - nq, nk)."""
    return key_blocks_covering([(0, sink_tokens), (nk - nq, nk)], block, nk)


def switch_attention(model, cache_cfg: CacheConfig, *, sparse_topk: float | None = 0.2,
                     linear_memory: bool = True, sparse_block: int | None = None):
    """Hybrid Forcing's decoupled schedule: after the dense phase, switch a model and its cache config to
    block-sparse window attention and/or the linear memory (or back: sparse_topk=None, linear_memory=False).

    Adds the model's zero-initialised memory projections when `linear_memory` (so the model's outputs do not
    change at the switch) and returns (the new CacheConfig, the newly created parameters): add those to the
    optimizer. Caches built from the new config (KVCache(new_cfg, ...)) use the new paths.
    """
    new_params = model.enable_linear_memory() if linear_memory else []
    cfg = dataclasses.replace(cache_cfg, sparse_topk=sparse_topk, linear_memory=linear_memory,
                              sparse_block=sparse_block or cache_cfg.sparse_block)
    return cfg, new_params
