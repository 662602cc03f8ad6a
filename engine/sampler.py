"""Few-step flow-matching sampler (Wan convention).

x_t = (1 - sigma) * x0 + sigma * noise, the model predicts the flow v = noise - x0, and the timestep it is
given is 1000 * sigma. The schedule is a short list of timesteps warped by the usual shift
    sigma(s) = shift * s / (1 + (shift - 1) * s),    s = t / 1000,
so (1000, 750, 500, 250) with shift 5 becomes sigmas (1.0, 0.9375, 0.8333, 0.625).

Per step: x0 = x - sigma * v; then either re-noise x0 to the next sigma with fresh noise (DMD students,
Self-Forcing's sampler) or take the Euler ODE step x <- x + (sigma_next - sigma) * v.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import SamplerConfig


def shift_sigma(s: float, shift: float) -> float:
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigmas(cfg: SamplerConfig) -> list[float]:
    """The warped noise levels of the schedule, one per denoising step (decreasing, > 0)."""
    return [shift_sigma(t / cfg.num_train_timesteps, cfg.shift) for t in cfg.timesteps]


def sample(denoise: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, cfg: SamplerConfig,
           randn: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the schedule from pure noise. denoise(x, t) -> v, with t = 1000 * sigma. Returns x0.

    randn() draws the fresh noise of the re-noising steps (default: torch.randn_like, unseeded).
    """
    sig = sigmas(cfg)
    x = noise  # the first sigma is taken as pure noise (exact for t = 1000)
    for i, s in enumerate(sig):
        v = denoise(x, s * cfg.num_train_timesteps)
        x0 = x - s * v
        if i + 1 == len(sig):
            return x0
        s_next = sig[i + 1]
        if cfg.mode == "euler":
            x = x + (s_next - s) * v
        else:
            fresh = randn() if randn is not None else torch.randn_like(x)
            x = (1.0 - s_next) * x0 + s_next * fresh
    raise AssertionError("unreachable")


def few_step_sampler(cfg: SamplerConfig, steps: int) -> SamplerConfig:
    """The schedule cut to `steps` of its timesteps, evenly spaced and always starting at the first (pure noise):
    a 4-step student's (1000, 750, 500, 250) gives (1000, 500) at 2 steps and (1000,) at 1. A student trained by
    self-forcing DMD predicts x0 from any of its timesteps, so it runs on a subset."""
    import dataclasses

    n = len(cfg.timesteps)
    if not 1 <= steps <= n:
        raise ValueError(f"steps must lie in 1..{n} (the model's schedule has {n}), not {steps}")
    return dataclasses.replace(cfg, timesteps=tuple(cfg.timesteps[i * n // steps] for i in range(steps)))
