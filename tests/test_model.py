"""The student's bidirectional mode equals diffusers' WanTransformer3DModel on the same random weights."""

import dataclasses
import random

import pytest
import torch
from diffusers import WanTransformer3DModel

from engine.config import get_preset
from engine.model import CausalWanModel


def random_pair(seed, cfg):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():  # randomise everything, including zero/one-initialised parameters
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = CausalWanModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical parameter names, both ways
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seed,shape,text_len,patch,heads", [(0, (2, 4, 5, 8, 6), 7, (1, 2, 2), None),
                                                             (1, (1, 4, 3, 10, 14), 1, (1, 2, 2), None),
                                                             (2, (3, 4, 1, 4, 4), 13, (1, 2, 2), None),
                                                             (3, (2, 4, 3, 12, 8), 5, (1, 4, 4), None),  # shapes
                                                             (4, (2, 4, 7, 6, 10), 3, (1, 2, 2), (8, 16))])  # p2h8
def test_bidirectional_equals_diffusers(seed, shape, text_len, patch, heads):
    cfg = dataclasses.replace(get_preset("tiny").model, patch_size=patch)
    if heads:  # another cut of the width into heads: RoPE's split of a head's channels changes with it
        cfg = dataclasses.replace(cfg, num_attention_heads=heads[0], attention_head_dim=heads[1])
    ref, ours = random_pair(seed, cfg)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 1000
    e = torch.randn(shape[0], text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        want = ref(x, t, e, return_dict=False)[0]
        got = ours(x, t, e)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


def test_per_frame_timesteps_equal_diffusers_per_token_path():
    cfg = get_preset("tiny").model
    ref, ours = random_pair(5, cfg)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 4, 6, 8, generator=g)
    tf = torch.rand(2, 4, generator=g) * 1000  # one timestep per latent frame
    e = torch.randn(2, 9, cfg.text_dim, generator=g)
    tokens = (6 // 2) * (8 // 2)
    with torch.no_grad():
        want = ref(x, tf.repeat_interleave(tokens, 1), e, return_dict=False)[0]  # diffusers: per token
        got = ours(x, tf, e)
    assert rel_err(got, want) <= 1e-5


def test_wan_preset_builds_on_meta_with_real_widths():
    cfg = get_preset("wan2.1-1.3b").model
    with torch.device("meta"):
        m = CausalWanModel(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert 1.3e9 < n < 1.5e9  # Wan2.1-T2V-1.3B: ~1.42 B parameters
    with torch.device("meta"):
        ref = WanTransformer3DModel(**cfg.diffusers_kwargs())
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_features_at_returns_the_tokens_after_that_block():
    """features_at=i stops after block i: its tokens are what the full forward passes on (a hook on block i)."""
    preset = get_preset("tiny")
    torch.manual_seed(random.randrange(1 << 30))
    m = CausalWanModel(preset.model).eval()
    x = torch.randn(2, preset.model.in_channels, 3, 6, 4)
    t, text = torch.rand(2) * 1000, torch.randn(2, 5, preset.model.text_dim)
    for i in range(preset.model.num_layers):
        seen = []
        h = m.blocks[i].register_forward_hook(lambda mod, inp, out: seen.append(out))
        with torch.no_grad():
            m(x, t, text)
            feats = m(x, t, text, features_at=i)
        h.remove()
        assert feats.shape == (2, 3 * 3 * 2, preset.model.num_attention_heads * preset.model.attention_head_dim)
        torch.testing.assert_close(feats, seen[0], rtol=0, atol=0)
