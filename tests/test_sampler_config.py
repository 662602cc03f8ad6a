"""Sampler schedule and steps; config validation."""

import pytest
import torch

from engine.config import PRESETS, CacheConfig, SamplerConfig, get_preset, preset_from_dict, to_dict
from engine.sampler import few_step_sampler, sample, sigmas


def test_shifted_schedule_matches_self_forcing_warp():
    got = sigmas(SamplerConfig(timesteps=(1000.0, 750.0, 500.0, 250.0), shift=5.0))
    assert got == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])
    assert sigmas(SamplerConfig(shift=1.0)) == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("mode", ["renoise", "euler"])
def test_oracle_denoiser_recovers_x0(mode):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 5, generator=g)
    noise = torch.randn(2, 3, 5, generator=g)
    seen = []

    def oracle(x, t):  # the exact flow towards the known x0: v = (x - x0) / sigma
        seen.append(t)
        return (x - x0) / (t / 1000.0)

    cfg = SamplerConfig(mode=mode)
    out = sample(oracle, noise, cfg, randn=lambda: torch.randn(2, 3, 5, generator=g))
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert seen == pytest.approx([s * 1000 for s in sigmas(cfg)])


def test_euler_is_deterministic_and_renoise_uses_fresh_noise():
    x0 = torch.ones(4)
    calls = []

    def denoise(x, t):
        calls.append(x.clone())
        return x - x0  # an imperfect model: v = x - x0 (not divided by sigma)

    noise = torch.zeros(4)
    sample(denoise, noise, SamplerConfig(mode="renoise"), randn=lambda: torch.full((4,), 7.0))
    s = sigmas(SamplerConfig())
    # step 2 input: x0_pred re-noised with the fresh noise (7) at sigma_2
    x0_pred = noise - s[0] * (noise - x0)
    torch.testing.assert_close(calls[1], (1 - s[1]) * x0_pred + s[1] * torch.full((4,), 7.0))


@pytest.mark.parametrize("kw,msg", [
    (dict(sink="bogus"), "sink"),
    (dict(window_frames=5, frames_per_chunk=3), "window_frames"),
    (dict(sink="static", sink_frames=2, frames_per_chunk=3), "sink_frames"),
    (dict(sink="ema", sink_frames=6, frames_per_chunk=3), "ema"),
    (dict(sink="static", window_frames=0), "window"),
    (dict(ema_alpha=1.5), "ema_alpha"),
])
def test_cache_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CacheConfig(**kw)


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError):
        SamplerConfig(timesteps=(250.0, 500.0))
    with pytest.raises(ValueError):
        SamplerConfig(timesteps=(0.0,))
    with pytest.raises(ValueError):
        SamplerConfig(mode="heun")


def test_presets_round_trip_through_json_dicts():
    for name, p in PRESETS.items():
        assert preset_from_dict(to_dict(p)) == p
        assert p.tokens_per_frame > 0
    assert get_preset("wan2.1-1.3b").tokens_per_frame == 1560  # 480x832 -> 60x104 latent -> 30x52 tokens
    with pytest.raises(ValueError, match="tiny"):
        get_preset("nope")


def test_few_step_sampler_cuts_the_schedule_from_pure_noise():
    cfg = SamplerConfig()
    assert few_step_sampler(cfg, 4) == cfg
    assert few_step_sampler(cfg, 2).timesteps == (1000.0, 500.0)
    assert few_step_sampler(cfg, 1).timesteps == (1000.0,)
    assert few_step_sampler(cfg, 3).timesteps == (1000.0, 750.0, 500.0)
    assert sigmas(few_step_sampler(cfg, 2)) == [sigmas(cfg)[0], sigmas(cfg)[2]]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1..4"):
            few_step_sampler(cfg, bad)
