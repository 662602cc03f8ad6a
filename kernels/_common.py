"""Helpers shared by the kernels: optional Triton import, output allocation (poisonable), small maths.

Triton is optional. `triton_available()` says whether the Triton paths can run here:
  - on a machine with CUDA, kernels are compiled as usual;
  - on a machine without a GPU driver, Triton can only run under its interpreter, so importing the kernel
    modules sets TRITON_INTERPRET=1 (unless the variable is already set) *before* `@triton.jit` runs:
    jit decides at decoration time whether it builds an interpreted function.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_POISON = False


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the Triton kernels can be launched (CUDA, or the CPU interpreter)."""
    try:
        import_triton()
    except ImportError:
        return False
    return True


def import_triton():
    """Import triton, first switching to the interpreter on a machine without CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # noqa: F401  (ImportError propagates: the caller decides)
    import triton.language as tl

    if interpreting() and type(tl.zeros).__name__ != "InterpretedFunction":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
                           "in the interpreter: set TRITON_INTERPRET=1 in the environment, or import `kernels` "
                           "before anything imports triton")
    return triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def poison_outputs(on: bool = True):
    """Within this block every kernel output (and gradient) buffer starts as NaN instead of garbage, so an
    element a kernel forgot to write fails a comparison. Tests only: it costs a fill per buffer."""
    global _POISON
    old, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = old


def new_empty(shape, *, like: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
    if like is not None and shape is None:
        out = torch.empty_like(like, dtype=dtype)  # keeps like's strides (a [B,L,H,D] view stays one)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan"))
    return out


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
