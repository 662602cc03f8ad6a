"""The bidirectional teacher: diffusers' `WanTransformer3DModel` + the Shapes text encoder, and its sampler.

Flow matching (Wan / SD3 convention): x_t = (1 - sigma) x_0 + sigma * eps, the model predicts v = eps - x_0
at timestep 1000 * sigma. The teacher's usual sampler is the deterministic Euler ODE over `steps` shifted
sigmas with classifier-free guidance; the unconditional branch is the empty prompt (all-zero text tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel

from engine.sampler import shift_sigma  # noqa: F401  (re-exported for the trainers)
from engine.text import ShapesTextConfig, ShapesTextEncoder


TEXT_KINDS = ("learned", "fixed")


class Teacher(nn.Module):
    """transformer (diffusers, bidirectional) + text (ShapesTextEncoder), trained together (a fixed-code
    encoder has no parameters, so only the transformer trains)."""

    def __init__(self, transformer: WanTransformer3DModel, text: ShapesTextEncoder):
        super().__init__()
        self.transformer, self.text = transformer, text

    @classmethod
    def from_preset(cls, preset, seed: int = 0, text: str = "learned") -> "Teacher":
        """text: "learned" (a small transformer trained with the teacher) or "fixed" (a fixed word code,
        nothing to train: see ShapesTextEncoder)."""
        if text not in TEXT_KINDS:
            raise ValueError(f"text must be one of {', '.join(TEXT_KINDS)}, not {text!r}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tr = WanTransformer3DModel(**preset.model.diffusers_kwargs())
        d = preset.model.text_dim
        cfg = ShapesTextConfig.fixed_code(dim=d) if text == "fixed" else ShapesTextConfig(dim=d)
        return cls(tr, ShapesTextEncoder(cfg, seed=seed))

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, C, F, h, w] noisy latents, t [B] or per frame [B, F] in 0..1000, ids/lengths from
        text._tokenize -> v [B, C, F, h, w]."""
        emb = self.text(ids, lengths)
        if t.ndim == 2:  # diffusers takes per-token timesteps [B, F * tokens per frame] (Wan 2.2's TI2V path)
            _, ph, pw = self.transformer.config.patch_size
            t = t.repeat_interleave((x.shape[3] // ph) * (x.shape[4] // pw), dim=1)
        return self.transformer(x, t, encoder_hidden_states=emb, return_dict=False)[0]


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0: exactly diffusers' FlowMatchEulerDiscreteScheduler(shift=shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    return sch.sigmas.float()


@torch.no_grad()
def sample(transformer, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int = 30,
           guidance: float = 4.0, shift: float = 3.0, return_trajectory: bool = False, sigmas=None):
    """Euler ODE from noise (sigma 1) to x_0. cond/uncond [B, L, text_dim]; noise [B, C, F, h, w].

    `sigmas` (decreasing, 1 -> 0) overrides steps/shift. With return_trajectory, also returns
    (sigmas [S + 1], states [S + 1, B, ...]) for ODE distillation.
    """
    sig = sigma_schedule(steps, shift) if sigmas is None else sigmas
    steps = len(sig) - 1
    x = noise
    states = [x] if return_trajectory else None
    emb = torch.cat([cond, uncond]) if guidance != 1.0 else cond
    for i in range(steps):
        t = torch.full((x.shape[0],), float(sig[i]) * 1000, device=x.device)
        xin = torch.cat([x, x]) if guidance != 1.0 else x
        tin = torch.cat([t, t]) if guidance != 1.0 else t
        v = transformer(xin, tin, encoder_hidden_states=emb, return_dict=False)[0]
        if guidance != 1.0:
            vc, vu = v.chunk(2)
            v = vu + guidance * (vc - vu)
        x = x + (sig[i + 1] - sig[i]) * v
        if return_trajectory:
            states.append(x)
    return (x, sig, torch.stack(states)) if return_trajectory else x
