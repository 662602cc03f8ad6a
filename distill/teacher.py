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
        return self.transformer(x, per_token(self.transformer, t, x), encoder_hidden_states=emb, return_dict=False)[0]


def per_token(transformer, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timesteps [B] or per latent frame [B, F] as `transformer` takes them for x [B, C, F, h, w]: diffusers' takes
    per-frame ones per token, [B, F * tokens a frame] (Wan 2.2's TI2V path); the engine's CausalWanModel per frame."""
    config = getattr(transformer, "config", None)
    if t.ndim < 2 or config is None or not hasattr(config, "patch_size"):
        return t
    _, ph, pw = config.patch_size
    return t.repeat_interleave((x.shape[3] // ph) * (x.shape[4] // pw), dim=1)


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0: exactly diffusers' FlowMatchEulerDiscreteScheduler(shift=shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    return sch.sigmas.float()


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor | None = None, guidance: float = 1.0,
                    v_guide: torch.Tensor | None = None, autoguidance: float = 1.0) -> torch.Tensor:
    """v_uncond + guidance (v_cond - v_uncond) + (autoguidance - 1)(v_cond - v_guide).

    The first part is classifier-free guidance (away from the unconditional prediction); the last term is autoguidance
    (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): away from the conditional
    prediction of a weaker model of the same data, which errs where the strong one is still unsure. Each is off at
    a weight of 1 (its reference may then be None)."""
    v = v_cond if guidance == 1.0 else v_uncond + guidance * (v_cond - v_uncond)
    if autoguidance != 1.0:
        v = v + (autoguidance - 1.0) * (v_cond - v_guide)
    return v


@torch.no_grad()
def sample(transformer, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int = 30,
           guidance: float = 4.0, shift: float = 3.0, return_trajectory: bool = False, sigmas=None, context: int = 0,
           guide=None, guide_cond: torch.Tensor | None = None, autoguidance: float = 1.0,
           history_guidance: float = 1.0):
    """Euler ODE from noise (sigma 1) to x_0. cond/uncond [B, L, text_dim]; noise [B, C, F, h, w].

    `sigmas` (decreasing, 1 -> 0) overrides steps/shift. With return_trajectory, also returns
    (sigmas [S + 1], states [S + 1, B, ...]) for ODE distillation. With `context` K, the first K latent frames of
    `noise` are clean frames that stay as they are (timestep 0, as --p-context trains the teacher): the rest is
    sampled as their continuation. With `guide` (a weaker transformer of the same latents, its prompt embeddings
    `guide_cond`) and `autoguidance` w != 1, each step also extrapolates away from the guide's prediction
    (guided_velocity); with guidance 1 that is autoguidance alone. With `context` K and `history_guidance` h != 1, the
    sampled frames' velocity also moves (h - 1)(v_cond - v_alone) away from v_alone, the conditional prediction for
    those frames as a clip of their own (no context): guidance towards the history, as History-Guided Video Diffusion
    does (Song et al. 2025); it amplifies what the context says about how the clip goes on.
    """
    sig = sigma_schedule(steps, shift) if sigmas is None else sigmas
    steps = len(sig) - 1
    auto = autoguidance != 1.0
    if auto and (guide is None or guide_cond is None):
        raise ValueError("autoguidance needs a guide model and its prompt embeddings")
    if history_guidance != 1.0 and not 0 < context < noise.shape[2]:
        raise ValueError("history guidance needs a context of 1 .. F - 1 latent frames")
    x = noise
    states = [x] if return_trajectory else None
    emb = torch.cat([cond, uncond]) if guidance != 1.0 else cond
    for i in range(steps):
        t = torch.full((x.shape[0], x.shape[2]), float(sig[i]) * 1000, device=x.device)
        t[:, :context] = 0.0
        t = t if context else t[:, 0]
        xin = torch.cat([x, x]) if guidance != 1.0 else x
        tt = per_token(transformer, t, x)
        tin = torch.cat([tt, tt]) if guidance != 1.0 else tt
        v = transformer(xin, tin, encoder_hidden_states=emb, return_dict=False)[0]
        vc, vu = v.chunk(2) if guidance != 1.0 else (v, None)
        vg = guide(x, per_token(guide, t, x), encoder_hidden_states=guide_cond, return_dict=False)[0] if auto else None
        v = guided_velocity(vc, vu, guidance, vg, autoguidance)
        if history_guidance != 1.0:
            xs = x[:, :, context:]
            v_alone = transformer(xs, per_token(transformer, t[:, context:], xs), encoder_hidden_states=cond,
                                  return_dict=False)[0]
            v[:, :, context:] += (history_guidance - 1.0) * (vc[:, :, context:] - v_alone)
        v[:, :, :context] = 0.0  # the context stays clean
        x = x + (sig[i + 1] - sig[i]) * v
        if return_trajectory:
            states.append(x)
    return (x, sig, torch.stack(states)) if return_trajectory else x


# The output projections of a Wan block's three residual branches (self-attention, cross-attention, feed-forward): with
# these at zero a block passes its input through unchanged (its cross-attention has no gate, so all three are needed).
_RESIDUAL_OUTPUTS = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")


def grown_block_sources(old_layers: int, new_layers: int) -> list[tuple[int, bool]]:
    """Where each block of a deeper transformer comes from: (index of the old block, is it a new copy). The old
    blocks keep their order; the new_layers - old_layers copies follow evenly spaced ones (8 -> 12: after blocks 1,
    3, 5 and 7)."""
    if not 1 <= old_layers <= new_layers:
        raise ValueError(f"cannot grow {old_layers} blocks into {new_layers}")
    extra = new_layers - old_layers
    out = []
    for i in range(old_layers):  # block i is followed by its share of the copies
        out += [(i, False)] + [(i, True)] * ((i + 1) * extra // old_layers - i * extra // old_layers)
    return out


@torch.no_grad()
def grow_transformer(new: nn.Module, old: dict[str, torch.Tensor], scale: float = 0.1) -> None:
    """Loads a shallower and/or narrower-feed-forward transformer's state dict `old` into `new` (a diffusers
    `WanTransformer3DModel` with at least its blocks and feed-forward width, equal elsewhere) so that `new` computes
    exactly what `old` did, and can then learn with the extra capacity:
    - depth: the old blocks keep their order, and each new block is a copy of the one before it with its residual
      branches' output projections at zero, so it starts as the identity (as LLaMA Pro grows a model) and its copied
      attention and feed-forward weights are useful from the first update;
    - feed-forward width: the old hidden units take the leading slice; the new ones read the input through `scale` x
      their fresh initialisation, and nothing reads them yet (their output columns are zero)."""
    own = new.state_dict()
    old_layers = 1 + max(int(k.split(".")[1]) for k in old if k.startswith("blocks."))
    sources = grown_block_sources(old_layers, new.config.num_layers)
    for name, dst in own.items():
        copy = False
        src_name = name
        if name.startswith("blocks."):
            _, j, rest = name.split(".", 2)
            i, copy = sources[int(j)]
            src_name = f"blocks.{i}.{rest}"
        if src_name not in old:
            raise ValueError(f"grow: the smaller transformer has no {src_name}")
        src = old[src_name]
        ffn_grows = src.ndim == dst.ndim and all(a <= b for a, b in zip(src.shape, dst.shape))
        if copy and rest.startswith(_RESIDUAL_OUTPUTS):
            dst.zero_()
        elif src.shape == dst.shape:
            dst.copy_(src)
        elif ffn_grows and name.endswith(("ffn.net.0.proj.weight", "ffn.net.0.proj.bias")):  # hidden units: rows
            fresh = dst * scale if dst.ndim > 1 else torch.zeros_like(dst)
            fresh[: src.shape[0]] = src
            dst.copy_(fresh)
        elif ffn_grows and name.endswith("ffn.net.2.weight"):  # [dim, hidden]: the new hidden units' columns are zero
            dst.zero_()
            dst[:, : src.shape[1]] = src
        else:
            raise ValueError(f"grow: {name} is {tuple(src.shape)} in the smaller transformer and "
                             f"{tuple(dst.shape)} here; only depth and feed-forward width may grow")
