"""Triton kernels for block-sparse attention (see block_sparse.py for the semantics and the table format).

Forward  (grid NQB x B*H): one program per query block; online softmax (base 2) over the key blocks of its
          table row; stores O and the row log-sum-exp (base 2, +inf for an empty row) for the backward.
Backward: delta = rowsum(dO * O) in torch, then
          dq  (grid NQB x B*H): per query block, over its row: P = exp2(S - lse), dS = P (dO V^T - delta), dQ += dS K
          dkv (grid NKB x B*H): per key block, over the query blocks whose rows contain it (the transposed
          table, built in torch): dV += P^T dO, dK += dS^T Q. No atomics, so results are deterministic.
All accumulators are fp32; P and dS are cast to the input dtype before their matmuls (as FlashAttention).
Head dims that are not a power of two are padded (masked) to the next one.

Interpreter notes (TRITON_INTERPRET=1, CPU): bf16 `tl.dot` is wrong there, so bf16 inputs are upcast to
fp32 after loading when interpreting (UPCAST); fp32 dots are exact IEEE there while CUDA uses tf32 by default.
"""

from __future__ import annotations

import torch

from ._common import cdiv, import_triton, interpreting, new_empty, next_pow2

triton = import_triton()
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _bsa_fwd(Q, K, V, O, LSE, IDX, CNT,
             qk_scale, Lq, Lk, H, D,
             s_qb, s_qh, s_qm, s_qd,
             s_kb, s_kh, s_kn, s_kd,
             s_vb, s_vh, s_vn, s_vd,
             s_ob, s_oh, s_om, s_od,
             s_ib, s_ih, s_im, s_ik,
             s_cb, s_ch, s_cm,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(CNT + b * s_cb + h * s_ch + qb * s_cm)
    idx_row = IDX + b * s_ib + h * s_ih + qb * s_im
    # pointer tiles of key block 0; the loop only adds a scalar offset (few ops per iteration)
    k_tile = K + b * s_kb + h * s_kh + offs_n0[:, None] * s_kn + offs_d[None, :] * s_kd
    v_tile = V + b * s_vb + h * s_vh + offs_n0[:, None] * s_vn + offs_d[None, :] * s_vd
    for i in range(0, cnt):
        start = tl.load(idx_row + i * s_ik) * BLOCK_N
        n_ok = offs_n0 < tl.where(start >= 0, Lk - start, 0)  # an id out of range has no keys
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_tile + start * s_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_tile + start * s_vn, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.where(n_ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no valid key (bad id)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _bsa_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT,
                qk_scale, sm_scale, Lq, Lk, H, D,
                s_qb, s_qh, s_qm, s_qd,
                s_kb, s_kh, s_kn, s_kd,
                s_vb, s_vh, s_vn, s_vd,
                s_ob, s_oh, s_om, s_od,  # dO
                s_gb, s_gh, s_gm, s_gd,  # dQ
                s_ib, s_ih, s_im, s_ik,
                s_cb, s_ch, s_cm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    qm = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=qm, other=0.0)
    do = tl.load(DO + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=qm, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(CNT + b * s_cb + h * s_ch + qb * s_cm)
    idx_row = IDX + b * s_ib + h * s_ih + qb * s_im
    k_tile = K + b * s_kb + h * s_kh + offs_n0[:, None] * s_kn + offs_d[None, :] * s_kd
    v_tile = V + b * s_vb + h * s_vh + offs_n0[:, None] * s_vn + offs_d[None, :] * s_vd
    for i in range(0, cnt):
        start = tl.load(idx_row + i * s_ik) * BLOCK_N
        n_ok = offs_n0 < tl.where(start >= 0, Lk - start, 0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_tile + start * s_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_tile + start * s_vn, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd,
             dq.to(DQ.dtype.element_ty), mask=qm)


@triton.jit
def _bsa_bwd_dkv(Q, K, V, DO, DK, DV, LSE, DELTA, QIDX, QCNT,
                 qk_scale, sm_scale, Lq, Lk, H, D, NQB, NKB,
                 s_qb, s_qh, s_qm, s_qd,
                 s_kb, s_kh, s_kn, s_kd,
                 s_vb, s_vh, s_vn, s_vd,
                 s_ob, s_oh, s_om, s_od,  # dO
                 s_gkb, s_gkh, s_gkn, s_gkd,  # dK
                 s_gvb, s_gvh, s_gvn, s_gvd,  # dV
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(QCNT + bh * NKB + kb)
    row = QIDX + (bh * NKB + kb) * NQB
    q_tile = Q + b * s_qb + h * s_qh + offs_m0[:, None] * s_qm + offs_d[None, :] * s_qd
    do_tile = DO + b * s_ob + h * s_oh + offs_m0[:, None] * s_om + offs_d[None, :] * s_od
    lse_row = LSE + bh * Lq + offs_m0
    delta_row = DELTA + bh * Lq + offs_m0
    for i in range(0, cnt):
        start = tl.load(row + i) * BLOCK_M
        m_ok = offs_m0 < Lq - start
        qm = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_tile + start * s_qm, mask=qm, other=0.0)
        do = tl.load(do_tile + start * s_om, mask=qm, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_row + start, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_row + start, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse[:, None])  # rows past Lq: lse = +inf -> 0
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk = dk * sm_scale
    tl.store(DK + b * s_gkb + h * s_gkh + offs_n[:, None] * s_gkn + offs_d[None, :] * s_gkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * s_gvb + h * s_gvh + offs_n[:, None] * s_gvn + offs_d[None, :] * s_gvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# ---- launchers ------------------------------------------------------------------------------------

def _check_inputs(q, k, v, block_m, block_n):
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not interpreting():
        if not q.is_cuda:
            raise RuntimeError("the Triton kernels run on CUDA tensors (or on the CPU with TRITON_INTERPRET=1)")
        if min(block_m, block_n) < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
            raise ValueError(f"compiled Triton needs power-of-two blocks >= 16; got {block_m}x{block_n}")
    elif block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"blocks must be powers of two; got {block_m}x{block_n}")


def _launch_opts(block_m, block_d, num_warps=None, num_stages=None, default_stages=2):
    """Compile options (CUDA only). `python -m benchmarks.kernels_bench --sweep` times the forward over warps,
    stages and query-block sizes: on an H200 (bf16, D=128, 20% of 64-blocks) 4 warps for 64-row tiles and 8 for
    128-row ones were best, and 3 pipeline stages beat 2 by 4-7% (benchmarks/results/kernels-h200-cfb9e49.json).
    The backward kernels keep 2 stages (not swept)."""
    if interpreting():
        return {}
    return {"num_warps": num_warps or (8 if block_m * block_d >= 128 * 128 else 4),
            "num_stages": num_stages or default_stages}


def _fwd_stages(device) -> int:
    # 3 stages hold three K/V tiles in shared memory (up to 128 KB with the q tile at D=128): Hopper (measured) has
    # 228 KB; smaller parts keep 2
    return 3 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 else 2


def forward(q, k, v, kv_idx, kv_cnt, block_m, block_n, scale, num_warps=None, num_stages=None):
    """-> (o like q, lse2 [B, H, Lq] fp32 in base 2). num_warps / num_stages: compile options (None: defaults)."""
    _check_inputs(q, k, v, block_m, block_n)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = new_empty(None, like=q)
    lse = new_empty((B, H, Lq), dtype=torch.float32, device=q.device)
    bd = max(16, next_pow2(D))
    upcast = interpreting() and q.dtype == torch.bfloat16
    grid = (cdiv(Lq, block_m), B * H)
    _bsa_fwd[grid](q, k, v, o, lse, kv_idx, kv_cnt, scale * LOG2E, Lq, Lk, H, D,
                   *q.stride(), *k.stride(), *v.stride(), *o.stride(), *kv_idx.stride(), *kv_cnt.stride(),
                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, UPCAST=upcast,
                   **_launch_opts(block_m, bd, num_warps, num_stages, default_stages=_fwd_stages(q.device)))
    return o, lse


def backward(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_m, block_n, scale):
    """-> dq, dk, dv (like q, k, v). q_idx [B, H, NKB, NQB], q_cnt [B, H, NKB] contiguous int32."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    nqb, nkb = cdiv(Lq, block_m), cdiv(Lk, block_n)
    do = do.to(q.dtype)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, H, Lq]
    q_idx, q_cnt = q_idx.contiguous(), q_cnt.contiguous()
    dq, dk, dv = new_empty(None, like=q), new_empty(None, like=k), new_empty(None, like=v)
    bd = max(16, next_pow2(D))
    upcast = interpreting() and q.dtype == torch.bfloat16
    opts = _launch_opts(block_m, bd)
    _bsa_bwd_dq[(nqb, B * H)](q, k, v, do, dq, lse, delta, kv_idx, kv_cnt, scale * LOG2E, scale, Lq, Lk, H, D,
                              *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                              *kv_idx.stride(), *kv_cnt.stride(),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, UPCAST=upcast, **opts)
    _bsa_bwd_dkv[(nkb, B * H)](q, k, v, do, dk, dv, lse, delta, q_idx, q_cnt, scale * LOG2E, scale,
                               Lq, Lk, H, D, nqb, nkb,
                               *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, UPCAST=upcast, **opts)
    return dq, dk, dv
