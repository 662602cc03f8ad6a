"""Block-sparse attention: torch path = dense masked attention; Triton = torch path (values and gradients);
block selection; the engine's attention entry point over every backend.

Triton runs compiled on CUDA, or under TRITON_INTERPRET=1 on the CPU (importing `kernels` sets it there);
tests that launch it are skipped only when triton is not installed. Seeds are fresh each run
(KERNEL_TEST_SEED=N reproduces a failure); kernel outputs and gradients start as NaN (poison_outputs), so an
element a kernel does not write fails the comparison.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.attention import attention, available_backends, force_backend
from kernels._common import poison_outputs
from kernels.block_sparse import (BlockTable, block_sparse_attention, block_sparse_attention_torch,
                                  dense_masked_attention, key_blocks_covering, select_blocks)
from kernels.testing import DEVICE, DTYPES, DTYPE_IDS, HAS_TRITON, TOL, bhld, fresh_seed, random_table

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


# ---- torch path (the reference) -------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(B=2, H=3, Lq=29, Lk=53, D=16, bm=8, bn=4),
    dict(B=1, H=2, Lq=64, Lk=64, D=12, bm=16, bn=16),
    dict(B=2, H=1, Lq=7, Lk=101, D=8, bm=4, bn=8),
])
def test_torch_path_equals_dense_masked_attention(case):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D, bm, bn = (case[x] for x in ("B", "H", "Lq", "Lk", "D", "bm", "bn"))
    table = random_table(g, B, H, Lq, Lk, bm, bn, empty_rows=2)
    q, k, v = (bhld(g, B, H, L, D, strided=s).requires_grad_() for L, s in ((Lq, False), (Lk, True), (Lk, False)))
    got = block_sparse_attention_torch(q, k, v, table, max_elems=4096)  # small groups: the loop is exercised
    want = dense_masked_attention(q, k, v, table)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed={seed}: {m}")
    do = torch.randn(got.shape, generator=g).to(DEVICE)
    for a, b in zip(grads(got, (q, k, v), do), grads(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed={seed}: {m}")
    # and the plain definition, row by row: softmax over the keys of the row's blocks, or 0
    mask = table.dense_mask()
    for b in range(B):
        for h in range(H):
            for i in range(0, Lq, max(1, Lq // 5)):
                keys = mask[b, h, i].nonzero()[:, 0]
                if len(keys) == 0:
                    assert got[b, h, i].abs().max() == 0
                    continue
                p = (q[b, h, i] @ k[b, h, keys].T / math.sqrt(D)).softmax(-1)
                torch.testing.assert_close(got[b, h, i], p @ v[b, h, keys], atol=1e-5, rtol=1e-5)


def test_dense_backends_agree_with_the_table_reference():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D = 1, 2, 21, 40, 12
    table = random_table(g, B, H, Lq, Lk, 8, 8, empty_rows=1)
    q, k, v = bhld(g, B, H, Lq, D), bhld(g, B, H, Lk, D), bhld(g, B, H, Lk, D)
    want = block_sparse_attention_torch(q, k, v, table)
    mask = table.dense_mask()
    ok = mask.any(-1, keepdim=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~ok)  # empty rows: anything, then 0
    torch.testing.assert_close(sdpa * ok, want, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")


# ---- Triton = torch path ----------------------------------------------------------------------------

TRITON_CASES = [
    # odd lengths, ragged last blocks, non-power-of-two head dim, strided (engine-layout) k/v
    dict(B=1, H=2, Lq=37, Lk=77, D=24, bm=16, bn=16, strided=True),
    dict(B=2, H=1, Lq=50, Lk=33, D=16, bm=32, bn=16, strided=False),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(TRITON_CASES)))
def test_triton_forward_and_backward_equal_torch_path(dtype, case):
    c = TRITON_CASES[case]
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D, bm, bn = (c[x] for x in ("B", "H", "Lq", "Lk", "D", "bm", "bn"))
    table = random_table(g, B, H, Lq, Lk, bm, bn, empty_rows=1)
    q = bhld(g, B, H, Lq, D, dtype).requires_grad_()
    k = bhld(g, B, H, Lk, D, dtype, strided=c["strided"]).requires_grad_()
    v = bhld(g, B, H, Lk, D, dtype, strided=c["strided"]).requires_grad_()
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE, dtype)
    with poison_outputs():
        got = block_sparse_attention(q, k, v, table, impl="triton")
        g_got = grads(got, (q, k, v), do)
    want = block_sparse_attention(q, k, v, table, impl="torch")
    g_want = grads(want, (q, k, v), do)
    tol = TOL[dtype]
    msg = lambda what: lambda m: f"seed={seed} {what}: {m}"  # noqa: E731
    assert got.stride() == q.stride()
    torch.testing.assert_close(got, want, **tol, msg=msg("out"))
    for name, a, b in zip("qkv", g_got, g_want):
        torch.testing.assert_close(a, b, **tol, msg=msg(f"d{name}"))
    # key blocks that no row uses get exact zero gradients (written, not left as poison)
    used = table.block_mask().any(2)  # [B, H, NKB]
    unused = (~used).repeat_interleave(bn, -1)[..., :Lk]
    assert (g_got[1][unused] == 0).all() and (g_got[2][unused] == 0).all()


@needs_triton
def test_triton_bf16_in_the_interpreter_upcasts():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D = 1, 1, 20, 40, 16
    table = random_table(g, B, H, Lq, Lk, 16, 16, empty_rows=0)
    q, k, v = (bhld(g, B, H, L, D, torch.bfloat16) for L in (Lq, Lk, Lk))
    with poison_outputs():
        got = block_sparse_attention(q, k, v, table, impl="triton")
    want = block_sparse_attention(q, k, v, table, impl="torch")
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16], msg=f"seed={seed}")


@needs_triton
def test_triton_full_table_equals_sdpa():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q, k, v = bhld(g, 1, 2, 45, 16), bhld(g, 1, 2, 70, 16), bhld(g, 1, 2, 70, 16)
    with poison_outputs():
        got = block_sparse_attention(q, k, v, BlockTable.full(45, 70, 32, 32, DEVICE), impl="triton")
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32],
                               msg=f"seed={seed}")


# ---- block selection ----------------------------------------------------------------------------------

def test_select_blocks_top_k_by_pooled_scores_with_kept_blocks():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D, bs = 2, 2, 24, 90, 8, 8
    q, k = bhld(g, B, H, Lq, D), bhld(g, B, H, Lk, D)
    nqb, nkb = 3, 12
    keep = key_blocks_covering([(0, 10), (Lk - Lq, Lk)], bs, Lk)  # a "sink" and the "current chunk"
    assert keep.tolist() == [True, True] + [False] * 6 + [True] * 4
    t = select_blocks(q, k, bs, bs, 0.5, keep)
    assert t.kv_cnt.expand(B, H, nqb).eq(6).all()  # ceil(0.5 * 12)
    blocks = t.block_mask()
    assert blocks[..., keep].all(), f"seed={seed}: kept blocks missing"
    # the rest are the best-scoring others: brute force over pooled means (last key block is short)
    pq = torch.stack([q[:, :, i * bs:(i + 1) * bs].mean(2) for i in range(nqb)], 2)
    pk = torch.stack([k[:, :, j * bs:(j + 1) * bs].mean(2) for j in range(nkb)], 2)
    score = (pq @ pk.transpose(-1, -2)).masked_fill(keep.to(pq.device), float("-inf"))
    best = score.topk(6 - int(keep.sum()), -1).indices
    assert torch.zeros_like(blocks).scatter_(-1, best, True)[..., ~keep].eq(blocks[..., ~keep]).all(), f"seed={seed}"
    # ascending ids; more kept blocks than top-k: every kept block stays in
    assert (t.kv_idx[..., 1:] > t.kv_idx[..., :-1]).all()
    t2 = select_blocks(q, k, bs, bs, 2, keep)
    assert t2.kv_cnt.eq(int(keep.sum())).all() and t2.block_mask()[..., keep].all()
    # full density: the full table
    t3 = select_blocks(q, k, bs, bs, 1.0, keep)
    assert t3.block_mask().all()


def test_pooling_reads_strided_and_half_inputs_as_they_are():
    """_pool_blocks sums straight from its input's strides and dtype (the engine passes [B, L, H, D] caches
    transposed, in bf16): the same means as an fp32 copy, for a ragged last block too."""
    from kernels.block_sparse import _pool_blocks

    g = torch.Generator().manual_seed(fresh_seed())
    for L, bs in ((37, 8), (32, 8), (5, 8)):
        x = torch.randn(2, L, 3, 6, generator=g).to(torch.bfloat16).transpose(1, 2)  # [B, H, L, D], a view
        want = torch.stack([x[:, :, i:i + bs].float().mean(2) for i in range(0, L, bs)], 2)
        got = _pool_blocks(x, bs)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), L


def test_table_helpers():
    g = torch.Generator().manual_seed(0)
    t = random_table(g, 2, 2, 30, 45, 8, 8, empty_rows=2)
    mask = t.block_mask()
    assert mask.sum(-1).eq(t.kv_cnt).all()
    q_idx, q_cnt = t.transpose()
    assert q_cnt.eq(mask.sum(2)).all()
    for b, h, j in [(0, 0, 0), (1, 1, 3), (0, 1, 5)]:
        rows = q_idx[b, h, j, : q_cnt[b, h, j]].tolist()
        assert rows == mask[b, h, :, j].nonzero()[:, 0].tolist()
    back = BlockTable.from_block_mask(mask, 8, 8, 30, 45)
    assert back.block_mask().eq(mask).all()
    with pytest.raises(ValueError):
        BlockTable(t.kv_idx.long(), t.kv_cnt, 8, 8, 30, 45)
    with pytest.raises(ValueError):
        BlockTable(t.kv_idx, t.kv_cnt, 16, 8, 30, 45)


# ---- the engine's entry point -----------------------------------------------------------------------

def test_entry_point_every_backend_agrees_on_a_table():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, Lk, D = 1, 2, 40, 61, 16
    table = random_table(g, B, H, Lq, Lk, 16, 16, empty_rows=1)
    # engine layout [B, L, H, D]
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(DEVICE) for L in (Lq, Lk, Lk))
    want = block_sparse_attention_torch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), table)
    names = ["sdpa", "math", "gather", "flex"] + (["triton"] if HAS_TRITON else [])
    assert set(names) <= set(available_backends())
    try:
        for name in names:
            force_backend(name)
            with poison_outputs():
                got = attention(q, k, v, table)
            torch.testing.assert_close(got.transpose(1, 2), want, **TOL[torch.float32],
                                       msg=lambda m: f"seed={seed} backend={name}: {m}")
        # no mask through the table-only backends = full attention
        force_backend(None)
        full = attention(q, k, v)
        for name in ["gather", "flex"] + (["triton"] if HAS_TRITON else []):
            force_backend(name)
            torch.testing.assert_close(attention(q, k, v), full, **TOL[torch.float32], msg=f"backend={name}")
        # a dense mask: flex takes it, table-only backends refuse it
        mask = torch.rand(Lq, Lk, generator=g).to(DEVICE) < 0.7
        mask[:, 0] = True
        force_backend("math")
        want_masked = attention(q, k, v, mask)
        force_backend("flex")
        torch.testing.assert_close(attention(q, k, v, mask), want_masked, **TOL[torch.float32])
        force_backend("gather")
        with pytest.raises(ValueError):
            attention(q, k, v, mask)
    finally:
        force_backend(None)
    with pytest.raises(ValueError):
        force_backend("nope")
