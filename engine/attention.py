"""Attention entry point, 3D RoPE, and the two non-cached self-attention contexts.

Glossary: B batch, F latent frames, N tokens per latent frame, L = F*N tokens, H heads, D head dim.
Tensors in this file are laid out [B, L, H, D] (diffusers' layout) unless stated otherwise.

A *context* decides what one self-attention layer attends to. The model calls
`ctx.attend(layer, q, k, v)` with the un-roped q, k, v of the tokens it is computing and gets the
attention output back. Three contexts exist:
  - `FullContext`    : every token sees every token (or a boolean mask); absolute frame positions.
                       Bidirectional mode (teacher-equivalent) and masked full forwards.
  - `ChunkedContext` : the slow, obvious reference for streaming: each query chunk sees an explicit
                       list of key chunks, positioned by their rank in that list.
  - `engine.cache.KVCache`: the streaming context (rolling window + sink), positions relative to the
                       live window.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from kernels.block_sparse import BlockTable, block_sparse_attention, ordered_from_mask

# ---- attention backends ---------------------------------------------------------------------------
# One entry point, `attention(q, k, v, mask)`; tests force a backend with `force_backend`.
# `mask` is None (full), a bool tensor broadcastable to [B, H, Lq, Lk] (True = attend), or a
# `kernels.block_sparse.BlockTable` (block-sparse: which key blocks each query block sees).
# Each backend says what it takes: a dense mask, a block table, or both. The entry point converts where it
# can (a table -> its dense token mask for a dense-only backend; no mask -> a full table for a table-only
# backend) and refuses otherwise.
#   sdpa     F.scaled_dot_product_attention                      dense mask       (default for dense calls)
#   math     fp32 einsum/softmax reference                       dense mask
#   gather   kernels.block_sparse torch path (gathers blocks)    table            (default for tables off CUDA)
#   triton   kernels.block_sparse Triton kernels (fwd + bwd)     table            (default for tables on CUDA)
#   flex     torch flex_attention (compiled on CUDA)             dense mask, table
#   flash    flash_attn.flash_attn_func (when installed)         no mask
#   xformers xformers memory_efficient_attention (when installed) dense mask

_BACKENDS = {}
_TAKES: dict[str, tuple[bool, bool]] = {}  # name -> (dense mask, block table)
_forced: str | None = None


def register_backend(name, *, dense_mask: bool = True, block_table: bool = False):
    def deco(fn):
        _BACKENDS[name] = fn
        _TAKES[name] = (dense_mask, block_table)
        return fn
    return deco


@register_backend("sdpa")
def _sdpa(q, k, v, mask):
    # q [B, Lq, H, D], k/v [B, Lk, H, D], mask [Lq, Lk] bool (True = attend) or None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@register_backend("math")
def _math(q, k, v, mask):
    # The obvious reference: softmax(q k^T / sqrt(D)) v in fp32.
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def _bhld(*xs):
    return [x.transpose(1, 2) for x in xs]  # [B, L, H, D] <-> [B, H, L, D], views


@register_backend("gather", dense_mask=False, block_table=True)
def _gather(q, k, v, table):
    return block_sparse_attention(*_bhld(q, k, v), table, impl="torch").transpose(1, 2)


@register_backend("triton", dense_mask=False, block_table=True)
def _triton(q, k, v, table):
    return block_sparse_attention(*_bhld(q, k, v), table, impl="triton").transpose(1, 2)


_flex_compiled = None


def flex_kernel_options(block_m: int, block_n: int) -> dict | None:
    """Tiles for compiled flex attention over a block mask of block_m x block_n blocks: its Triton tiles must
    divide the blocks, and its defaults (128) are wider than our tables' blocks (64 at Wan sizes). None when no
    tile of at least 16 (tl.dot's minimum) divides them: the caller falls back to a dense token mask."""
    g = math.gcd(block_m, block_n)
    tile = g & -g  # the largest power of two dividing both
    if tile < 16:
        return None
    fwd, bwd = min(tile, 128), min(tile, 64)
    return {"BLOCK_M": fwd, "BLOCK_N": fwd, "BLOCK_M1": bwd, "BLOCK_N1": bwd, "BLOCK_M2": bwd, "BLOCK_N2": bwd}


@register_backend("flex", dense_mask=True, block_table=True)
def _flex(q, k, v, mask):
    global _flex_compiled
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    B, Lq, H, _ = q.shape
    Lk = k.shape[1]
    compiled = q.is_cuda and q.shape[-1] >= 16  # the compiled kernel needs head dims of 16 or more (tl.dot)
    options = None
    if isinstance(mask, BlockTable) and compiled:
        options = flex_kernel_options(mask.block_m, mask.block_n)
        if options is None:  # blocks too small for the compiled kernel's tiles: their dense token mask
            mask = mask.expand(B, H).dense_mask()
    if isinstance(mask, BlockTable):
        t = mask.expand(B, H)
        blocks, bm, bn = t.block_mask(), t.block_m, t.block_n  # [B, H, NQB, NKB]

        def mask_mod(b, h, qi, ki):  # the eager (CPU) path applies only mask_mod: it must carry the sparsity
            return blocks[b, h, qi // bm, ki // bn] & (ki < Lk)

        idx, cnt = ordered_from_mask(blocks)
        block_mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(bm, bn), mask_mod=mask_mod, seq_lengths=(Lq, Lk))
    elif mask is not None:
        dense = mask.expand(B, H, Lq, Lk)
        block_mask = create_block_mask(lambda b, h, qi, ki: dense[b, h, qi, ki], B, H, Lq, Lk, device=q.device)
    else:
        block_mask = None
    if compiled:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    else:
        fn = flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(*_bhld(q, k, v), block_mask=block_mask, kernel_options=options)
    return out.transpose(1, 2)


if importlib.util.find_spec("flash_attn") is not None:
    @register_backend("flash", dense_mask=False)
    def _flash(q, k, v, mask):
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)  # [B, L, H, D], fp16/bf16 on CUDA


if importlib.util.find_spec("xformers") is not None:
    @register_backend("xformers", dense_mask=True)
    def _xformers(q, k, v, mask):
        from xformers.ops import memory_efficient_attention

        bias = None
        if mask is not None:
            B, Lq, H, _ = q.shape
            Lk = k.shape[1]
            # the bias' last dim must be 8-aligned in memory: allocate padded, pass a slice
            bias = q.new_zeros(B, H, Lq, Lk + (-Lk) % 8)[..., :Lk]
            bias.masked_fill_(~mask.expand(B, H, Lq, Lk), float("-inf"))
        return memory_efficient_attention(q, k, v, attn_bias=bias)


def force_backend(name: str | None):
    """Force one backend for every attention call (tests); None restores automatic choice."""
    global _forced
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(_BACKENDS)}")
    _forced = name


def forced_backend() -> str | None:
    return _forced


def available_backends() -> list[str]:
    return list(_BACKENDS)


def kernel_impl() -> str | None:
    """Implementation for the other kernels (the linear memory): 'triton' while the triton backend is forced,
    'torch' while another is, None (automatic: Triton on CUDA when installed) otherwise."""
    return None if _forced is None else ("triton" if _forced == "triton" else "torch")


def _auto(q, mask) -> str:
    if isinstance(mask, BlockTable):
        from kernels._common import triton_available

        return "triton" if q.is_cuda and triton_available() else "gather"
    return "sdpa"


def attention(q, k, v, mask=None):
    """softmax attention, [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D].

    mask: None, a bool tensor broadcastable to [B, H, Lq, Lk] (True = attend), or a BlockTable.
    """
    name = _forced or _auto(q, mask)
    dense_ok, table_ok = _TAKES[name]
    empty_rows = None
    if isinstance(mask, BlockTable):
        if not table_ok:
            if not dense_ok:
                raise ValueError(f"attention backend {name!r} takes no mask")
            mask = mask.expand(q.shape[0], q.shape[2]).dense_mask()
            empty_rows = ~mask.any(-1)  # [B, H, Lq]: a row with no key gives 0, as the block-sparse paths do
    elif mask is None:
        if table_ok and not dense_ok:
            mask = BlockTable.full(q.shape[1], k.shape[1], 64, 64, q.device)
    elif not dense_ok:
        raise ValueError(f"attention backend {name!r} takes no dense mask")
    out = _BACKENDS[name](q, k, v, mask)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows.transpose(1, 2)[..., None], 0.0)
    return out


# ---- 3D rotary position embedding ----------------------------------------------------------------
# Wan splits D into t/h/w parts (h = w = 2*(D//6), t = the rest), each rotated by its own axis position.
# Unlike a precomputed table, positions here are computed on demand, so a stream never runs out of them
# (and the cache keeps them small anyway: they are relative to the live window).

def rope_split(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_freqs(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    # float64 like diffusers' table, so the angles are bit-identical to its rope.
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim))
    return torch.outer(pos.to(torch.float64), inv)  # [P, dim/2]


def rope_tables(head_dim: int, frame_pos: torch.Tensor, h: int, w: int):
    """cos, sin of shape [F*h*w, 1, D/2] for tokens on an (F, h, w) grid with the given frame positions."""
    dt, dh, dw = rope_split(head_dim)
    dev = frame_pos.device
    ft = _axis_freqs(dt, frame_pos)  # [F, dt/2]
    fh = _axis_freqs(dh, torch.arange(h, device=dev))
    fw = _axis_freqs(dw, torch.arange(w, device=dev))
    nf = ft.shape[0]
    ang = torch.cat([
        ft[:, None, None, :].expand(nf, h, w, -1),
        fh[None, :, None, :].expand(nf, h, w, -1),
        fw[None, None, :, :].expand(nf, h, w, -1),
    ], dim=-1).reshape(nf * h * w, 1, head_dim // 2)
    return ang.cos().float(), ang.sin().float()


@functools.lru_cache(maxsize=64)
def rope_range(head_dim: int, n_frames: int, h: int, w: int, device: str):
    """Tables for frame positions 0..n_frames-1 (the cache's case), memoised."""
    return rope_tables(head_dim, torch.arange(n_frames, device=device), h, w)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, L, H, D]; pairs (x[2i], x[2i+1]) rotate by angle i; math in fp32, result in x's dtype.
    return _ROPE["fn"](x, cos, sin)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


_ROPE = {"fn": rope_reference}  # engine.accel.compile_blocks swaps in a compiled (fused) version


# ---- contexts ------------------------------------------------------------------------------------

class AttnContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class FullContext:
    """All tokens of one forward attend to each other (optionally through a bool mask [L, L]).

    frame_pos: [F] frame positions (default 0..F-1, as diffusers); grid = (F, h, w) after patching.
    """

    def __init__(self, grid: tuple[int, int, int], head_dim: int, device, frame_pos=None, mask=None):
        nf, h, w = grid
        if frame_pos is None:
            self.cos, self.sin = rope_range(head_dim, nf, h, w, str(device))
        else:
            self.cos, self.sin = rope_tables(head_dim, frame_pos.to(device), h, w)
        self.mask = mask

    def attend(self, layer, q, k, v):
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        return attention(q, k, v, self.mask)


class ChunkedContext:
    """Reference for streaming: the sequence is a list of chunks of equal token count; query chunk i
    attends to the chunks `visible[i]` (in that order), whose frame positions are their ranks 0, 1, ...

    This is deliberately slow (one attention per query chunk, keys re-roped per query chunk).
    """

    def __init__(self, visible: list[list[int]], frames_per_chunk: int, hw: tuple[int, int], head_dim: int):
        self.visible, self.fpc, self.hw, self.head_dim = visible, frames_per_chunk, hw, head_dim

    def attend(self, layer, q, k, v):
        n = self.fpc * self.hw[0] * self.hw[1]  # tokens per chunk
        out = torch.empty_like(q)
        for i, keys in enumerate(self.visible):
            assert keys and keys[-1] == i, "a chunk must see itself, last"
            cos, sin = rope_range(self.head_dim, self.fpc * len(keys), *self.hw, str(q.device))
            kk = torch.cat([k[:, j * n:(j + 1) * n] for j in keys], 1)
            vv = torch.cat([v[:, j * n:(j + 1) * n] for j in keys], 1)
            qi = apply_rope(q[:, i * n:(i + 1) * n], cos[-n:], sin[-n:])
            out[:, i * n:(i + 1) * n] = attention(qi, apply_rope(kk, cos, sin), vv)
        return out
