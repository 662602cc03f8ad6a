"""FP8 weights for the transformer blocks: `quantize_fp8(model)`.

Each nn.Linear inside the blocks (self- and cross-attention projections, the feed-forward) is replaced by an
FP8Linear: its weight W [out, in] stored as float8_e4m3fn with one float32 scale per output row,
W ~= W8 * scale[:, None] (the row's absolute maximum maps to 448, e4m3's largest value). That halves the
blocks' weight memory against bf16. The patch embedding, the condition embedders, the norms, the modulation
tables and the output projection stay in the model's dtype, as the usual FP8 recipes keep the first and last
layers and everything that is not a large matmul.

Two ways to run it (`mode`):
- "scaled_mm": activations are quantized too, one scale per token (row), and `torch._scaled_mm` multiplies
  the two FP8 matrices with both scales in its epilogue: Hopper's FP8 tensor cores. Needs bf16 activations
  and in / out features divisible by 16; anything else runs the weight-only way.
- "weight_only": W8 * scale is dequantized to the activation dtype and F.linear runs as usual (saves memory,
  not time; the CPU default).
"auto" picks scaled_mm on a CUDA device of compute capability 8.9 or higher, else weight_only.

The slow, obvious reference is `fp8_linear_reference` (float64); tests compare both modes with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MODES = ("auto", "scaled_mm", "weight_only")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (x8 [..., n] float8_e4m3fn, scale [..., 1] float32) with x ~= x8 * scale, per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear_reference(x, w8, w_scale, bias=None, quantize_input: bool = False) -> torch.Tensor:
    """The obvious FP8 linear in float64: dequantize everything, multiply. quantize_input: round x through
    per-row FP8 first (what scaled_mm does). Returns float64."""
    if quantize_input:
        x8, xs = quantize_rows(x)
        x = x8.double() * xs.double()
    y = x.double() @ (w8.double() * w_scale.double()).T
    return y if bias is None else y + bias.double()


class FP8Linear(nn.Module):
    """nn.Linear with an FP8 weight (see the module doc). weight8 / weight_scale are buffers: saved in a
    state dict, moved by .to(device), never trained."""

    def __init__(self, linear: nn.Linear, mode: str = "weight_only"):
        super().__init__()
        if mode not in ("scaled_mm", "weight_only"):
            raise ValueError(f"FP8Linear mode must be 'scaled_mm' or 'weight_only', not {mode!r}")
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        w8, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight8", w8)  # [out, in]
        self.register_buffer("weight_scale", scale)  # [out, 1] float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight8.to(torch.float32) * self.weight_scale).to(dtype)

    def uses_scaled_mm(self, x: torch.Tensor) -> bool:
        return (self.mode == "scaled_mm" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0
                and self.out_features % 16 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_scaled_mm(x):
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x8, xs = quantize_rows(x.reshape(-1, self.in_features))  # [M, in], [M, 1]
        # weight8.T is a column-major view, the layout _scaled_mm wants for its second operand
        y = torch._scaled_mm(x8, self.weight8.T, scale_a=xs, scale_b=self.weight_scale.T, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def resolve_mode(mode: str, device: torch.device | str) -> str:
    if mode not in MODES:
        raise ValueError(f"fp8 mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "scaled_mm"
    return "weight_only"


def quantize_fp8(model: nn.Module, mode: str = "auto") -> int:
    """Replace every nn.Linear under model.blocks (a CausalWanModel) by an FP8Linear, in place; returns how
    many. The linear-memory projection, if any, stays as it is (it is small and may still train)."""
    mode = resolve_mode(mode, next(model.parameters()).device)
    n = 0
    for blk in model.blocks:
        for name, m in list(blk.named_modules()):
            if isinstance(m, nn.Linear) and ".mem_proj" not in f".{name}":
                parent, _, attr = name.rpartition(".")
                owner = blk.get_submodule(parent) if parent else blk
                setattr(owner, attr, FP8Linear(m, mode))
                n += 1
    return n


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what the weights cost in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
