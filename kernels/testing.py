"""Helpers for the kernel tests: fresh seeds, tolerances, random inputs and random block tables."""

from __future__ import annotations

import importlib.util
import os

import torch

from ._common import cdiv
from .block_sparse import BlockTable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Kernel dtypes under test: the interpreter (CPU) handles fp32 and fp16; compiled Triton (CUDA) bf16 too.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
DTYPE_IDS = ["fp32", "fp16", "bf16"][: len(DTYPES)]

# The interpreter's fp32 dots are exact IEEE; CUDA's default fp32 dot is tf32.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5) if DEVICE == "cpu" else dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def fresh_seed() -> int:
    """A new seed every run (KERNEL_TEST_SEED=N reproduces one); put it in every failure message."""
    s = os.environ.get("KERNEL_TEST_SEED")
    return int(s) if s else int.from_bytes(os.urandom(4), "little")


def bhld(g, B, H, L, D, dtype=torch.float32, strided=False) -> torch.Tensor:
    """Random [B, H, L, D] on DEVICE; strided=True: a transposed view of a [B, L, H, D] tensor (the engine's)."""
    if strided:
        return torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype)


def random_table(g, B, H, Lq, Lk, bm, bn, *, empty_rows: int = 1) -> BlockTable:
    """Rows of distinct key-block ids in random order with random counts (at least `empty_rows` rows empty),
    and garbage past each count (in-range ids included) that must never be read."""
    nqb, nkb = cdiv(Lq, bm), cdiv(Lk, bn)
    idx = torch.randint(0, nkb, (B, H, nqb, nkb + 1), generator=g, dtype=torch.int32)
    cnt = torch.randint(0, nkb + 1, (B, H, nqb), generator=g, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for r in range(nqb):
                c = int(cnt[b, h, r])
                idx[b, h, r, :c] = torch.randperm(nkb, generator=g)[:c].to(torch.int32)
    flat = cnt.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:empty_rows]] = 0
    return BlockTable(idx.to(DEVICE), cnt.to(DEVICE), bm, bn, Lq, Lk)
