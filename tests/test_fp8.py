"""engine/fp8.py: FP8 weights. Both ways of running (weight-only and torch._scaled_mm, which also runs on the
CPU) equal the float64 reference on random inputs of odd sizes; the quantization error is within e4m3's
rounding; a quantized model streams close to the original and its blocks' weights take a quarter of the
float32 bytes; the CLI flag works."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn as nn

from engine.config import get_preset
from engine.fp8 import FP8, FP8Linear, fp8_linear_reference, quantize_fp8, quantize_rows, weight_bytes
from engine.model import CausalWanModel
from engine.stream import Stream


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(2), "little")


def test_row_quantization_error_is_e4m3_rounding():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 53, generator=g) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scales
    w8, scale = quantize_rows(w)
    assert w8.dtype == FP8 and scale.shape == (37, 1)
    deq = w8.float() * scale
    # 3 mantissa bits: relative error <= 2^-4 in the normal range; absolute <= half the smallest subnormal step
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all(), f"seed={seed}"
    torch.testing.assert_close(deq.abs().amax(1, keepdim=True), w.abs().amax(1, keepdim=True), atol=0, rtol=1e-6,
                               msg="each row's largest value comes back (to float32 rounding)")


@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_equals_reference(bias):
    seed = fresh_seed()
    torch.manual_seed(seed)
    lin = nn.Linear(45, 71, bias=bias)
    q = FP8Linear(lin, "weight_only")
    x = torch.randn(3, 7, 45)
    want = fp8_linear_reference(x, q.weight8, q.weight_scale, lin.bias)
    torch.testing.assert_close(q(x).double(), want, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")
    # and it stays near the float32 layer: per-output error of a dot product of rounded weights
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.05, f"seed={seed}: {rel}"


@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_equals_reference_with_quantized_inputs(bias):
    seed = fresh_seed()
    torch.manual_seed(seed)
    lin = nn.Linear(48, 80, bias=bias)
    q = FP8Linear(lin, "scaled_mm")
    x = torch.randn(5, 9, 48).bfloat16()  # 45 tokens: no multiple of anything
    assert q.uses_scaled_mm(x)
    want = fp8_linear_reference(x.float(), q.weight8, q.weight_scale, lin.bias, quantize_input=True)
    got = q(x)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 9, 80)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=1e-2, msg=f"seed={seed}")  # bf16 output
    # not bf16 or not a multiple of 16: the weight-only path, exactly
    assert not q.uses_scaled_mm(x.float())
    odd = FP8Linear(nn.Linear(45, 80), "scaled_mm")
    assert not odd.uses_scaled_mm(torch.randn(2, 45).bfloat16())


def small_model(preset_name="tiny", dim_16=False, seed=0):
    preset = get_preset(preset_name)
    if dim_16:  # widths that _scaled_mm takes (multiples of 16)
        preset = preset.replace(model=dataclasses.replace(preset.model, attention_head_dim=16, ffn_dim=64))
    torch.manual_seed(seed)
    return preset, CausalWanModel(preset.model).eval().requires_grad_(False)


def stream(model, preset, text, n, seed):
    s = Stream(model, preset)
    s.set_prompt(text)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([s.next_chunk(g) for _ in range(n)], dim=2)


@pytest.mark.parametrize("mode,dtype", [("weight_only", torch.float32), ("scaled_mm", torch.bfloat16)])
def test_quantized_model_streams_close_to_the_original(mode, dtype):
    seed = fresh_seed()
    preset, model = small_model(dim_16=True, seed=seed)
    model = model.to(dtype)
    text = torch.randn(1, 5, preset.model.text_dim, dtype=dtype)
    want = stream(model, preset, text, 4, seed).float()
    before = weight_bytes(nn.ModuleList(model.blocks))
    linears = sum(isinstance(m, nn.Linear) for m in model.blocks.modules())
    assert quantize_fp8(model, mode) == linears == 10 * preset.model.num_layers
    assert all(m.mode == mode for m in model.modules() if isinstance(m, FP8Linear))
    after = weight_bytes(nn.ModuleList(model.blocks))
    assert after < before / (1.6 if dtype == torch.bfloat16 else 2.8), (before, after)  # norms, tables, scales stay
    got = stream(model, preset, text, 4, seed).float()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.1, f"seed={seed}: relative error {rel:.3f}"


def test_auto_mode_is_weight_only_on_the_cpu():
    _, model = small_model()
    quantize_fp8(model, "auto")
    assert {m.mode for m in model.modules() if isinstance(m, FP8Linear)} == {"weight_only"}
    with pytest.raises(ValueError, match="fp8 mode"):
        quantize_fp8(model, "fp4")


def test_generate_fp8_flag(tmp_path):
    import numpy as np
    from PIL import Image

    from engine.generate import main
    from engine.init_model import random_model_folder

    model = tmp_path / "m"
    random_model_folder("tiny", model, seed=0, weights_dtype=torch.float32)
    videos = {}
    for name, extra in (("fp32", []), ("fp8", ["--fp8"])):
        out = tmp_path / name
        assert main(["--prompt", "a red circle", "--frames", "13", "--model", str(model), "--out", str(out),
                     "--device", "cpu", "--quiet", *extra]) == 0
        videos[name] = np.stack([np.asarray(Image.open(f)) for f in sorted(out.glob("*.png"))]).astype(int)
    assert videos["fp8"].shape == videos["fp32"].shape == (13, 32, 32, 3)
    diff = np.abs(videos["fp8"] - videos["fp32"])
    assert 0 < diff.mean() < 4, diff.mean()  # changed (the weights are rounded), but only a little
