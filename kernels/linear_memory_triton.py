"""Triton kernels for the linear-attention memory (see linear_memory.py for the maths and layouts).

fold fwd     grid (cdiv(D, BLOCK_DV), B*H, NSPLIT): each program loops over its run of the T folded tokens,
             acc[D, BLOCK_DV] += phi(K)^T V, into a partial sum; torch adds the partials (fixed order),
             z += colsum(phi(K)); M' = decay*M + sum of partials, z' likewise (a new state: autograd-safe).
fold bwd     grid (cdiv(T, BLOCK_T), B*H): dV = phi(K) dM, dK = (V dM^T + dz) * phi'(K).
             (dM_in = decay*dM, dz_in = decay*dz are done in torch.)
read-out fwd grid (cdiv(L, BLOCK_M * ROW_BLOCKS), B*H, cdiv(D, BLOCK_DV)): r = (phi(Q) M) / max(phi(Q) z, eps),
             a slice of r's columns and ROW_BLOCKS blocks of rows a program (the state slice loaded once).
read-out bwd grid (NSPLIT, B*H): each program takes query blocks s, s+NSPLIT, ...; dQ per block, and a
             partial dM = sum phi(Q)^T dnum, dz = sum phi(Q) dden written per program and summed in torch.
Inputs are loaded and upcast to fp32 (the state is fp32; fp32 also keeps the interpreter's bf16 problems
away). The fold uses IEEE fp32 dots (its result accumulates over the whole stream); the read-out the
default precision (tf32 on CUDA).
"""

from __future__ import annotations

import torch

from ._common import cdiv, import_triton, interpreting, new_empty, next_pow2

triton = import_triton()
import triton.language as tl  # noqa: E402


@triton.jit
def _phi(x):
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _dphi(x):
    return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _fold_fwd(K, V, P, PZ, T, H, D, T_PER,
              s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # program (pv, bh, ps): columns pv of phi(K)^T V over tokens [ps * T_PER, (ps + 1) * T_PER) -> P[ps, bh]
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    ps = tl.program_id(2)
    nbh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    offs_t0 = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_D)
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_ok = offs_k < D
    v_ok = offs_v < D
    acc = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    zacc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_end = tl.minimum(T, (ps + 1) * T_PER)
    for t0 in range(ps * T_PER, t_end, BLOCK_T):
        offs_t = t0 + offs_t0
        t_ok = offs_t < t_end
        km = t_ok[:, None] & k_ok[None, :]
        k = tl.load(K + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_k[None, :] * s_kd, mask=km, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vt + offs_v[None, :] * s_vd,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        fk = tl.where(km, _phi(k.to(tl.float32)), 0.0)
        acc += tl.dot(tl.trans(fk), v.to(tl.float32), input_precision="ieee")
        zacc += tl.sum(fk, 0)
    sm = k_ok[:, None] & v_ok[None, :]
    part = ps * nbh + bh
    tl.store(P + part * D * D + offs_k[:, None] * D + offs_v[None, :], acc, mask=sm)
    tl.store(PZ + part * D + offs_k, zacc, mask=k_ok & (pv == 0))


@triton.jit
def _fold_bwd(K, V, DM, DZ, DK, DV, T, H, D,
              s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
              s_gkb, s_gkh, s_gkt, s_gkd, s_gvb, s_gvh, s_gvt, s_gvd,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    tm = t_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + offs_t[:, None] * s_kt + offs_d[None, :] * s_kd, mask=tm, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vt + offs_d[None, :] * s_vd, mask=tm, other=0.0)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    dm = tl.load(DM + bh * D * D + offs_d[:, None] * D + offs_d[None, :],
                 mask=d_ok[:, None] & d_ok[None, :], other=0.0)  # [DK, DV]
    dz = tl.load(DZ + bh * D + offs_d, mask=d_ok, other=0.0)
    fk = tl.where(tm, _phi(k), 0.0)
    dfk = tl.dot(v, tl.trans(dm), input_precision="ieee") + dz[None, :]
    dk = dfk * _dphi(k)
    dv = tl.dot(fk, dm, input_precision="ieee")
    tl.store(DK + b * s_gkb + h * s_gkh + offs_t[:, None] * s_gkt + offs_d[None, :] * s_gkd,
             dk.to(DK.dtype.element_ty), mask=tm)
    tl.store(DV + b * s_gvb + h * s_gvh + offs_t[:, None] * s_gvt + offs_d[None, :] * s_gvd,
             dv.to(DV.dtype.element_ty), mask=tm)


@triton.jit
def _readout_fwd(Q, M, Z, O, eps, L, H, D,
                 s_qb, s_qh, s_ql, s_qd, s_ob, s_oh, s_ol, s_od,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    # program (pm, bh, pv): ROW_BLOCKS blocks of BLOCK_M rows of the output from pm on, columns pv (BLOCK_DV of
    # them: a [D, BLOCK_DV] slice of the state in registers instead of all D x D, which spills at D = 128). The
    # state slice is loaded once per program, so more row blocks a program read it fewer times in all; the
    # denominator is recomputed per slice
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    pv = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    v_ok = offs_v < D
    mst = tl.load(M + bh * D * D + offs_d[:, None] * D + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :],
                  other=0.0)
    z = tl.load(Z + bh * D + offs_d, mask=d_ok, other=0.0)
    for r in range(ROW_BLOCKS):
        offs_m = (pm * ROW_BLOCKS + r) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        qm = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd, mask=qm, other=0.0)
        fq = tl.where(qm, _phi(q.to(tl.float32)), 0.0)
        num = tl.dot(fq, mst)
        den = tl.sum(fq * z[None, :], 1)
        out = num / tl.maximum(den, eps)[:, None]
        tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_v[None, :] * s_od,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


@triton.jit
def _readout_bwd(Q, M, Z, DO, DQ, DM_PART, DZ_PART, eps, L, H, D, NSPLIT,
                 s_qb, s_qh, s_ql, s_qd, s_ob, s_oh, s_ol, s_od, s_gb, s_gh, s_gl, s_gd,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    ps = tl.program_id(0)
    bh = tl.program_id(1)
    nbh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    sm = d_ok[:, None] & d_ok[None, :]
    mst = tl.load(M + bh * D * D + offs_d[:, None] * D + offs_d[None, :], mask=sm, other=0.0)
    z = tl.load(Z + bh * D + offs_d, mask=d_ok, other=0.0)
    dm = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(ps * BLOCK_M, L, NSPLIT * BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        qm = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                    mask=qm, other=0.0).to(tl.float32)
        do = tl.load(DO + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
                     mask=qm, other=0.0).to(tl.float32)
        fq = tl.where(qm, _phi(q), 0.0)
        num = tl.dot(fq, mst)
        den = tl.sum(fq * z[None, :], 1)
        dc = tl.maximum(den, eps)
        out = num / dc[:, None]
        dnum = do / dc[:, None]
        dden = tl.where(den >= eps, -tl.sum(do * out, 1) / dc, 0.0)
        dfq = tl.dot(dnum, tl.trans(mst)) + dden[:, None] * z[None, :]
        dq = dfq * _dphi(q)
        tl.store(DQ + b * s_gb + h * s_gh + offs_m[:, None] * s_gl + offs_d[None, :] * s_gd,
                 dq.to(DQ.dtype.element_ty), mask=qm)
        dm += tl.dot(tl.trans(fq), dnum)
        dz += tl.sum(fq * dden[:, None], 0)
    part = ps * nbh + bh
    tl.store(DM_PART + part * D * D + offs_d[:, None] * D + offs_d[None, :], dm, mask=sm)
    tl.store(DZ_PART + part * D + offs_d, dz, mask=d_ok)


# ---- launchers ------------------------------------------------------------------------------------

def _check(x):
    if not interpreting() and not x.is_cuda:
        raise RuntimeError("the Triton kernels run on CUDA tensors (or on the CPU with TRITON_INTERPRET=1)")


def _opts(warps=4):
    return {} if interpreting() else {"num_warps": warps}


def fold_forward(M, z, k, v, decay, nsplit: int | None = None):
    """The tokens are split into `nsplit` runs, one program each (per head and column block), whose partial
    sums are added in a fixed order (deterministic): one evicted chunk is thousands of tokens and only B*H
    heads, too few programs to fill a GPU without the split."""
    _check(k)
    B, H, T, D = k.shape
    if T == 0:
        return decay * M, decay * z
    bd = max(16, next_pow2(D))
    bdv = min(bd, 64)
    bt = 32
    ndv = cdiv(D, bdv)
    if nsplit is None:  # about 4 programs per multiprocessor of an H100 (132); one on the interpreter
        nsplit = 1 if interpreting() else max(1, min(cdiv(T, bt), cdiv(528, ndv * B * H)))
    t_per = cdiv(cdiv(T, nsplit), bt) * bt
    nsplit = max(1, cdiv(T, t_per))
    part = new_empty((nsplit, B, H, D, D), dtype=torch.float32, device=k.device)
    part_z = new_empty((nsplit, B, H, D), dtype=torch.float32, device=k.device)
    _fold_fwd[(ndv, B * H, nsplit)](k, v, part, part_z, T, H, D, t_per, *k.stride(), *v.stride(),
                                    BLOCK_T=bt, BLOCK_D=bd, BLOCK_DV=bdv, **_opts())
    return decay * M + part.sum(0), decay * z + part_z.sum(0)


def fold_backward(k, v, dM, dz):
    B, H, T, D = k.shape
    bd = max(16, next_pow2(D))
    dk, dv = new_empty(None, like=k), new_empty(None, like=v)
    bt = 32
    _fold_bwd[(cdiv(T, bt), B * H)](k, v, dM, dz, dk, dv, T, H, D, *k.stride(), *v.stride(),
                                    *dk.stride(), *dv.stride(), BLOCK_T=bt, BLOCK_D=bd, **_opts(8 if bd >= 128 else 4))
    return dk, dv


def readout_forward(q, M, z, eps, block_m=None, block_dv=None, num_warps=None, row_blocks=None):
    """block_m (query rows a block), row_blocks (blocks a program, each reading the state slice it loaded once),
    block_dv (output columns a program; D's power of two: untiled) and num_warps are launch settings, None for
    the defaults (1 block a program; otherwise untuned: `benchmarks.kernels_bench --sweep` times them)."""
    _check(q)
    B, H, L, D = q.shape
    bd = max(16, next_pow2(D))
    bm = block_m or (64 if bd <= 64 else 32)
    bdv = min(bd, block_dv or bd)
    rows = row_blocks or 1
    o = new_empty(None, like=q)
    _readout_fwd[(cdiv(L, bm * rows), B * H, cdiv(D, bdv))](q, M, z, o, eps, L, H, D, *q.stride(), *o.stride(),
                                                            BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, ROW_BLOCKS=rows,
                                                            **_opts(num_warps or 4))
    return o


def readout_backward(q, M, z, do, eps, nsplit: int | None = None):
    B, H, L, D = q.shape
    bd = max(16, next_pow2(D))
    bm = 64 if bd <= 64 else 32
    nqb = cdiv(L, bm)
    if nsplit is None:
        nsplit = 1 if interpreting() else max(1, min(nqb, 16))
    do = do.to(q.dtype)
    dq = new_empty(None, like=q)
    dm_part = new_empty((nsplit, B, H, D, D), dtype=torch.float32, device=q.device)
    dz_part = new_empty((nsplit, B, H, D), dtype=torch.float32, device=q.device)
    _readout_bwd[(nsplit, B * H)](q, M, z, do, dq, dm_part, dz_part, eps, L, H, D, nsplit,
                                  *q.stride(), *do.stride(), *dq.stride(), BLOCK_M=bm, BLOCK_D=bd,
                                  **_opts(8 if bd >= 128 else 4))
    return dq, dm_part.sum(0), dz_part.sum(0)
