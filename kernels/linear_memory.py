"""Linear-attention memory for tokens evicted from the attention window (Hybrid Forcing's linear branch).

Per (batch, head), a state of fixed size holds everything folded in so far:
    M = sum_j phi(k_j) v_j^T   [D, D] fp32        z = sum_j phi(k_j)   [D] fp32
    fold:     M <- decay * M + phi(K)^T V,  z <- decay * z + sum_j phi(k_j)      (decay 1: plain sums)
    read-out: r_i = phi(q_i)^T M / max(phi(q_i)^T z, eps)                          (0 while the state is empty)
phi(x) = elu(x) + 1 (positive, so the normaliser is positive once anything has been folded in).
The engine folds un-roped keys and reads out with un-roped queries: the memory is position-free.

Layout (this file): q, k, v [B, H, L, D] with any strides; M [B, H, D, D], z [B, H, D] fp32 contiguous.
The read-out comes back in q's dtype.

Implementations (`fold(..., impl=)`, `readout(..., impl=)`):
  "torch"  : einsums in fp32; the reference, differentiable through autograd, and the CPU path.
  "triton" : fold  fwd (grid D/BLOCK_DV x B*H, loop over tokens) and bwd (grid T/BLOCK_T x B*H);
             read-out fwd (grid L/BLOCK_M x B*H) and bwd (grid NSPLIT x B*H, each program loops over a
             share of the query blocks and writes a partial dM, dz that torch sums: no atomics).

`MemoryProjection` is the model side: a zero-initialised Linear(D, D), shared by the heads of a layer, whose
output is added to the softmax attention output (before the layer's output projection). Zero-initialised,
so switching the memory on leaves a trained dense model's outputs unchanged until it is trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import triton_available

EPS = 1e-6


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


# ---- torch reference ------------------------------------------------------------------------------

def fold_torch(M, z, k, v, decay: float = 1.0):
    fk = phi(k.float())
    return decay * M + torch.einsum("bhtd,bhte->bhde", fk, v.float()), decay * z + fk.sum(2)


def readout_torch(q, M, z, eps: float = EPS):
    fq = phi(q.float())
    num = torch.einsum("bhld,bhde->bhle", fq, M)
    den = torch.einsum("bhld,bhd->bhl", fq, z)
    return (num / den.clamp_min(eps)[..., None]).to(q.dtype)


# ---- Triton (autograd) ----------------------------------------------------------------------------

class _TritonFold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, z, k, v, decay):
        from . import linear_memory_triton as tri

        ctx.save_for_backward(k, v)
        ctx.decay = decay
        return tri.fold_forward(M, z, k, v, decay)

    @staticmethod
    def backward(ctx, dM, dz):
        from . import linear_memory_triton as tri

        k, v = ctx.saved_tensors  # (autograd materialises an unused output's gradient as zeros)
        dk, dv = tri.fold_backward(k, v, dM.float().contiguous(), dz.float().contiguous())
        return ctx.decay * dM, ctx.decay * dz, dk, dv, None


class _TritonReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, M, z, eps):
        from . import linear_memory_triton as tri

        ctx.save_for_backward(q, M, z)
        ctx.eps = eps
        return tri.readout_forward(q, M, z, eps)

    @staticmethod
    def backward(ctx, do):
        from . import linear_memory_triton as tri

        q, M, z = ctx.saved_tensors
        dq, dM, dz = tri.readout_backward(q, M, z, do, ctx.eps)
        return dq, dM, dz, None


def _impl(x: torch.Tensor, impl: str | None) -> str:
    if impl is None:
        return "triton" if x.is_cuda and triton_available() else "torch"
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if impl not in ("torch", "triton"):
        raise ValueError(f"unknown impl {impl!r}: expected 'torch' or 'triton'")
    return impl


def fold(M, z, k, v, decay: float = 1.0, impl: str | None = None):
    """New state (M', z') with the tokens k, v [B, H, T, D] folded into (M [B, H, D, D], z [B, H, D])."""
    if _impl(k, impl) == "torch":
        return fold_torch(M, z, k, v, decay)
    return _TritonFold.apply(M.float().contiguous(), z.float().contiguous(), k, v, float(decay))


def readout(q, M, z, eps: float = EPS, impl: str | None = None):
    """Read-out [B, H, L, D] (q's dtype) for queries q [B, H, L, D] from the state (M, z)."""
    if _impl(q, impl) == "torch":
        return readout_torch(q, M, z, eps)
    return _TritonReadout.apply(q, M.float().contiguous(), z.float().contiguous(), float(eps))


# ---- model side -----------------------------------------------------------------------------------

class MemoryProjection(nn.Linear):
    """Zero-initialised Linear(D, D) applied to each head's read-out [..., H, D]; its output is added to the
    softmax attention output of the same layer."""

    def __init__(self, head_dim: int, device=None, dtype=None):
        super().__init__(head_dim, head_dim, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
