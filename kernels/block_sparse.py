"""Block-sparse attention: block tables, block selection, a pure-torch path, and the Triton kernels' entry.

Layout (this file): q [B, H, Lq, D], k and v [B, H, Lk, D]; any strides (the engine passes [B, L, H, D]
tensors transposed, as views). Queries are cut into blocks of `block_m` rows, keys into blocks of
`block_n` rows, counted from row 0; the last block of each may be short (ragged).

A `BlockTable` says which key blocks each query block attends to:
    kv_idx [B, H, NQB, MAXKB] int32  key-block ids, row r's valid entries are kv_idx[..., r, :kv_cnt[..., r]]
    kv_cnt [B, H, NQB]        int32  0 <= count <= MAXKB; a row may be short or empty
(B and H may be broadcast: size-1 dims are expanded, never copied.) Entries past the count are never read.
Ids must be distinct within a row; an id outside [0, NKB) is treated as a block with no keys. The order of
a row does not matter (selection returns ascending ids).

    out[b, h, i] = softmax_j(q_i . k_j * scale) v_j  over the keys j of the blocks in row block(i)
                 = 0 when the row is empty.

Implementations (`block_sparse_attention(..., impl=)`):
  "torch"  : gathers each query block's key blocks and runs a dense softmax over them (fp32 maths).
             The reference for the Triton kernels, differentiable through autograd, and the CPU path.
  "triton" : flash-attention style forward (online softmax over the table's blocks) and backward
             (dq per query block over its row; dk/dv per key block over the transposed table, no atomics).
             Compiled on CUDA; under TRITON_INTERPRET=1 on the CPU (slow: tests only).
`dense_masked_attention` is the obvious dense version (a [Lq, Lk] mask built from the table), for tests.

Block selection (`select_blocks`): mean-pool q per query block and k per key block, score every
(query block, key block) pair by the pooled dot product, keep the top-k key blocks per query block; blocks
in `keep` (the sink and the query's own chunk, in the engine) are always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import cdiv, triton_available


# ---- block tables ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BlockTable:
    kv_idx: torch.Tensor  # int32 [B|1, H|1, NQB, MAXKB]
    kv_cnt: torch.Tensor  # int32 [B|1, H|1, NQB]
    block_m: int
    block_n: int
    q_len: int
    k_len: int

    def __post_init__(self):
        if self.kv_idx.ndim != 4 or self.kv_cnt.ndim != 3:
            raise ValueError("kv_idx must be [B, H, NQB, MAXKB] and kv_cnt [B, H, NQB]")
        if self.kv_idx.shape[2] != self.nqb or self.kv_cnt.shape[2] != self.nqb:
            raise ValueError(f"table has {self.kv_idx.shape[2]} query-block rows, q_len={self.q_len} with "
                             f"block_m={self.block_m} needs {self.nqb}")
        if self.kv_idx.dtype != torch.int32 or self.kv_cnt.dtype != torch.int32:
            raise ValueError("kv_idx and kv_cnt must be int32")

    @property
    def nqb(self) -> int:
        return cdiv(self.q_len, self.block_m)

    @property
    def nkb(self) -> int:
        return cdiv(self.k_len, self.block_n)

    def expand(self, B: int, H: int) -> "BlockTable":
        idx = self.kv_idx.expand(B, H, -1, -1)
        cnt = self.kv_cnt.expand(B, H, -1)
        return BlockTable(idx, cnt, self.block_m, self.block_n, self.q_len, self.k_len)

    def block_mask(self) -> torch.Tensor:
        """bool [B, H, NQB, NKB]: True where a query block attends to a key block."""
        idx, cnt = self.kv_idx.long(), self.kv_cnt.long()
        nkb = self.nkb
        ok = (torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]) & (idx >= 0) & (idx < nkb)
        mask = torch.zeros(*idx.shape[:-1], nkb + 1, dtype=torch.bool, device=idx.device)
        mask.scatter_(-1, torch.where(ok, idx, nkb), True)  # invalid slots land in the extra column
        return mask[..., :nkb]

    def dense_mask(self) -> torch.Tensor:
        """bool [B, H, Lq, Lk] token mask (True = attend)."""
        m = self.block_mask()
        m = m.repeat_interleave(self.block_m, 2)[:, :, : self.q_len]
        return m.repeat_interleave(self.block_n, 3)[..., : self.k_len]

    def density(self) -> float:
        """Fraction of (query block, key block) pairs kept."""
        return self.block_mask().float().mean().item()

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_idx [B, H, NKB, NQB], q_cnt [B, H, NKB]) int32: for each key block, the query blocks using it."""
        return ordered_from_mask(self.block_mask().transpose(-1, -2))

    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_m: int, block_n: int, q_len: int, k_len: int):
        idx, cnt = ordered_from_mask(mask)
        return cls(idx, cnt, block_m, block_n, q_len, k_len)

    @classmethod
    def full(cls, q_len: int, k_len: int, block_m: int, block_n: int, device="cpu"):
        """Every query block attends to every key block (dense attention through the sparse machinery)."""
        nqb, nkb = cdiv(q_len, block_m), cdiv(k_len, block_n)
        idx = torch.arange(nkb, dtype=torch.int32, device=device).expand(1, 1, nqb, nkb)
        cnt = torch.full((1, 1, nqb), nkb, dtype=torch.int32, device=device)
        return cls(idx, cnt, block_m, block_n, q_len, k_len)


def ordered_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., R, N] -> (idx [..., R, N] int32 with the True columns first, ascending; cnt [..., R] int32)."""
    n = mask.shape[-1]
    col = torch.arange(n, device=mask.device)
    key = torch.where(mask, col, col + n)  # True columns first, each group in column order
    idx = key.argsort(dim=-1)
    return idx.to(torch.int32), mask.sum(-1, dtype=torch.int32)


def key_blocks_covering(ranges, block_n: int, k_len: int, device="cpu") -> torch.Tensor:
    """bool [NKB]: key blocks that overlap any of the token ranges [(start, stop), ...]."""
    nkb = cdiv(k_len, block_n)
    keep = torch.zeros(nkb, dtype=torch.bool, device=device)
    for a, b in ranges:
        a, b = max(0, a), min(k_len, b)
        if b > a:
            keep[a // block_n: cdiv(b, block_n)] = True
    return keep


# ---- block selection ------------------------------------------------------------------------------

def _pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, H, L, D] -> mean over each block of rows [B, H, NB, D] (fp32; a short last block: its own mean).
    Sums in fp32 straight from x's dtype and strides: no fp32 or padded copy of x (the keys are most of the
    live cache, and selection runs in every layer of every forward)."""
    L = x.shape[2]
    full = L // block
    parts = []
    if full:
        parts.append(x[:, :, : full * block].unflatten(2, (full, block)).sum(3, dtype=torch.float32) / block)
    if L > full * block:
        parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=torch.float32) / (L - full * block))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, topk: float | int,
                  keep: torch.Tensor | None = None) -> BlockTable:
    """Top-k key blocks per query block from pooled q.k scores; `keep` blocks are always in.

    q [B, H, Lq, D], k [B, H, Lk, D]. topk: a float in (0, 1] is a fraction of the key blocks (rounded up),
    an int is a number of blocks. keep: bool [NKB] or broadcastable to [B, H, NQB, NKB]. Every row gets
    max(topk blocks, most kept blocks of any row) entries (so kept blocks are never crowded out), ascending.
    """
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    nqb, nkb = cdiv(Lq, block_m), cdiv(Lk, block_n)
    if isinstance(topk, float):
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk fraction {topk} must lie in (0, 1]")
        n = math.ceil(topk * nkb - 1e-9)
    else:
        n = int(topk)
    n = max(1, min(nkb, n))
    with torch.no_grad():
        score = _pool_blocks(q, block_m) @ _pool_blocks(k, block_n).transpose(-1, -2)  # [B, H, NQB, NKB]
        if keep is not None:
            n = max(n, int(keep.sum(-1).max()))  # no device sync when `keep` lives on the CPU (the cache's)
            score = score.masked_fill(keep.to(score.device).expand(B, H, nqb, nkb), float("inf"))
        if n == nkb:
            return BlockTable.full(Lq, Lk, block_m, block_n, q.device)
        idx = score.topk(n, dim=-1, sorted=False).indices.sort(-1).values.to(torch.int32)
    cnt = torch.full((1, 1, nqb), n, dtype=torch.int32, device=q.device)
    return BlockTable(idx, cnt, block_m, block_n, Lq, Lk)


# ---- implementations ------------------------------------------------------------------------------

def _check(q, k, v, table: BlockTable):
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B,H,Lq,D], k/v [B,H,Lk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[2] != table.q_len or k.shape[2] != table.k_len:
        raise ValueError(f"table is for Lq={table.q_len}, Lk={table.k_len}; got {q.shape[2]}, {k.shape[2]}")


def block_sparse_attention_torch(q, k, v, table: BlockTable, scale: float | None = None,
                                 max_elems: int = 1 << 25) -> torch.Tensor:
    """Gather path (fp32 maths, output in q's dtype): each query block's key blocks are gathered into one
    contiguous run and attended with SDPA (query blocks as the "heads"); groups of query blocks bound memory."""
    _check(q, k, v, table)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    bm, bn = table.block_m, table.block_n
    nqb, nkb = table.nqb, table.nkb
    scale = D ** -0.5 if scale is None else scale
    t = table.expand(B, H)
    idx, cnt = t.kv_idx.long(), t.kv_cnt.long()
    K = idx.shape[-1]
    slot_ok = (torch.arange(K, device=q.device) < cnt[..., None]) & (idx >= 0) & (idx < nkb)
    idx = torch.where(slot_ok, idx, 0)
    qf = F.pad(q.float(), (0, 0, 0, nqb * bm - Lq)).reshape(B * H, nqb, bm, D)
    # key/value blocks as rows of one [B*H*NKB, bn*D] matrix: a gather is one index_select
    kf = F.pad(k.float(), (0, 0, 0, nkb * bn - Lk)).reshape(B * H * nkb, bn * D)
    vf = F.pad(v.float(), (0, 0, 0, nkb * bn - Lk)).reshape(B * H * nkb, bn * D)
    key_ok = (torch.arange(nkb * bn, device=q.device) < Lk).view(nkb, bn)
    ok = (slot_ok[..., None] & key_ok[idx]).flatten(3, 4).view(B * H, nqb, 1, K * bn)  # valid gathered keys
    rows = (idx + torch.arange(B * H, device=q.device).view(B, H, 1, 1) * nkb).view(B * H, nqb, K)
    masked = not bool(ok.all())  # (a host sync only off the CPU; the Triton path is used there)
    group = max(1, max_elems // max(1, B * H * K * bn * max(bm, D)))
    outs = []
    for s in range(0, nqb, group):
        e = min(nqb, s + group)
        r = rows[:, s:e].reshape(-1)
        kg = kf.index_select(0, r).view(B * H, e - s, K * bn, D)
        vg = vf.index_select(0, r).view(B * H, e - s, K * bn, D)
        if not masked:
            outs.append(F.scaled_dot_product_attention(qf[:, s:e], kg, vg, scale=scale))
            continue
        m = ok[:, s:e]
        row_ok = m.any(-1, keepdim=True)  # [B*H, G, 1, 1]: an empty row attends to all, then gives 0
        o = F.scaled_dot_product_attention(qf[:, s:e], kg, vg, attn_mask=m | ~row_ok, scale=scale)
        outs.append(o * row_ok)
    out = torch.cat(outs, 1).view(B, H, nqb * bm, D)[:, :, :Lq]
    return out.to(q.dtype)


def dense_masked_attention(q, k, v, table: BlockTable, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with the table's token mask, fp32; empty rows give 0."""
    _check(q, k, v, table)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = table.dense_mask()
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    row_ok = mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~row_ok, 0.0)
    return ((s.softmax(-1) * row_ok) @ v.float()).to(q.dtype)


class _TritonBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_idx, kv_cnt, table: BlockTable, scale: float):
        from . import block_sparse_triton as tri

        o, lse = tri.forward(q, k, v, kv_idx, kv_cnt, table.block_m, table.block_n, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.table, ctx.scale = table, scale
        return o

    @staticmethod
    def backward(ctx, do):
        from . import block_sparse_triton as tri

        q, k, v, o, lse = ctx.saved_tensors
        B, H = q.shape[:2]
        table = ctx.table.expand(B, H)
        q_idx, q_cnt = table.transpose()
        dq, dk, dv = tri.backward(q, k, v, o, lse, do, table.kv_idx, table.kv_cnt, q_idx, q_cnt,
                                  table.block_m, table.block_n, ctx.scale)
        return dq, dk, dv, None, None, None, None


def block_sparse_attention(q, k, v, table: BlockTable, scale: float | None = None,
                           impl: str | None = None) -> torch.Tensor:
    """Block-sparse attention [B, H, Lq, D] (see the module doc). impl: "torch", "triton" or None (Triton on
    CUDA when installed, else torch)."""
    _check(q, k, v, table)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl is None:
        impl = "triton" if q.is_cuda and triton_available() else "torch"
    if impl == "torch":
        return block_sparse_attention_torch(q, k, v, table, scale)
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
        B, H = q.shape[:2]
        t = table.expand(B, H)
        return _TritonBlockSparse.apply(q, k, v, t.kv_idx, t.kv_cnt, table, scale)
    raise ValueError(f"unknown impl {impl!r}: expected 'torch' or 'triton'")
