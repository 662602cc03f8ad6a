"""Attention kernels: block-sparse attention and the linear-attention memory (see kernels/README.md).

Triton on a machine without CUDA only runs under its interpreter, and `@triton.jit` (triton's own
`triton.language` helpers included) decides at import time whether it builds interpreted functions. So on
such a machine this package sets TRITON_INTERPRET=1 (unless already set) when it is imported, before anything
imports triton (torch's eager flex_attention does). Set TRITON_INTERPRET yourself to override.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
