"""Self-forcing DMD: the causal student distilled by distribution matching on its own streaming rollouts.

    python -m distill.self_forcing --student assets/shapes --teacher assets/shapes-teacher --out runs/dmd --steps 400
    python -m distill.self_forcing --out runs/dmd --export runs/dmd-model --eval 50     # student folder + oracle

One optimizer step (`DMDNets.forward`):
1. Rollout (self forcing). The generator (the student) makes a video chunk by chunk through the engine's own
   KVCache and sampler: the same chunking, window, sink policy and attention options as at inference. In each
   chunk one denoising step, drawn at random, is the exit: its x0 is the chunk's output and its forward is the only
   one that keeps a gradient. The steps before it run without one, and so does the clean pass that writes the
   chunk's context, so gradients never cross chunks. A rollout may run longer than sink + window
   (`--rollout-chunks`): the student then learns to go on after eviction, with the sink in play. Its last
   `--dmd-chunks` chunks are scored. The length and the exit steps are drawn once per step, the same on every
   rank (and every micro-batch).
2. DMD, on generator steps (one step in `--ttur`). x_t = (1 - s) x + s eps at a random shifted sigma s. The real
   score is the teacher with CFG, the fake score is the critic. grad = (x0_fake - x0_real) / mean|x - x0_real|,
   and the loss 0.5 |x - sg(x - grad)|^2 moves x toward where the teacher puts mass and away from where the student
   does. Re-DMD (`--reward-beta` b > 0) weights each rollout's loss by exp(b r) / (the batch mean of exp(b r)).
   Here r is the mean of the oracle's motion checks (direction, speed, frozen / copying) on the decoded rollout.
3. Critic, every step. Flow matching on the detached rollouts, so that it tracks the student's distribution (TTUR:
   `--ttur` critic updates per generator update).
4. GAN (DMD2, `--gan-weight` > 0). A head on a middle critic block learns, with the critic, to tell noised real
   clips (rendered Shapes clips, a latent cache made on first use) from noised rollouts; the generator also descends
   its non-saturating loss, the one signal that does not come through the teacher.

Hybrid Forcing's decoupled schedule: with `--sparse-topk` and / or `--linear-memory`, rollouts switch at step
`--hybrid-from` from the dense cache to block-sparse window attention and the linear memory of evicted chunks. The
generator's zero-initialised memory projections exist from the start, unused (no gradient) until the switch, so
the optimizer, checkpoints and resume see one set of parameters; the export carries the hybrid cache settings.

Adam betas are (0, 0.999), and the generator's weights keep an EMA (the critic's would never be used); it counts
trainer steps, critic-only ones included. Exact resume, accumulation, torchrun and the logs come from
distill/trainer.py; with `--fsdp` the generator, critic, their optimizer state, the EMA and the frozen teacher are
all sharded over the ranks. In log.jsonl, `dmd` is 0 on critic-only steps and `gen` is 1 on generator steps, so
dmd / gen is the mean DMD loss of generator steps.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.cache import KVCache
from engine.cli import OneLineParser, one_line_errors
from engine.config import CacheConfig, SamplerConfig
from engine.folder import load_model_folder, save_model_folder
from engine.model import CausalWanModel
from engine.sampler import shift_sigma, sigmas

from .shapes import sample_prompt
from .trainer import (Trainer, add_train_args, config_from_args, latest_checkpoint, load_weights, micro_seed,
                      setup_distributed, teardown_distributed)


@dataclass(frozen=True)
class DMDConfig:
    guidance: float = 4.0  # CFG of the real score (the teacher's own sampler uses 4)
    ttur: int = 5  # critic updates per generator update (DMD2's two time-scale rule; Self-Forcing uses 5)
    rollout_chunks: tuple[int, ...] = (3, 6)  # chunks per rollout, one drawn per step; > (sink + window) / chunk: eviction
    dmd_chunks: int = 3  # the last this many chunks are scored (the teacher sees them as one clip)
    t_min: float = 0.02  # DMD / critic timesteps: uniform in [t_min, t_max], then shifted (Self-Forcing: 20..980)
    t_max: float = 0.98
    shift: float = 5.0
    reward_beta: float = 0.0  # Re-DMD: rollout weights exp(beta * r); 0 is plain DMD
    gan_weight: float = 0.0  # DMD2's GAN term: the generator's non-saturating loss on a head over the critic; 0 is off
    disc_weight: float = 0.01  # weight of the head's real-vs-student classification loss in the critic's update
    gan_layer: int = -1  # the critic block whose tokens the head reads (-1: the middle one, DMD2's bottleneck)
    gan_shift: float = 1.0  # the GAN's noise levels: uniform in [t_min, t_max], shifted by this (1: not shifted;
    # at the DMD's shift 5 most samples are so noisy that real and student clips look alike)
    context_frames: int = 0  # up to this many latent frames before the scored chunks go to the teacher and the
    # critic clean (timestep 0, as the teacher's --p-context trains it): the real score is then the teacher's
    # continuation of the rollout so far, not its joint generation of the scored chunks alone (0: off)

    def __post_init__(self):
        if self.ttur < 1 or self.dmd_chunks < 1:
            raise ValueError("ttur and dmd_chunks must be >= 1")
        if not self.rollout_chunks or min(self.rollout_chunks) < self.dmd_chunks:
            raise ValueError(f"every rollout length {list(self.rollout_chunks)} must be >= dmd_chunks {self.dmd_chunks}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {self.context_frames}")
        if self.gan_weight < 0 or self.disc_weight <= 0 or self.gan_shift <= 0:
            raise ValueError(f"need gan_weight >= 0, disc_weight > 0 and gan_shift > 0, got {self.gan_weight}, "
                             f"{self.disc_weight}, {self.gan_shift}")


# ---- the rollout --------------------------------------------------------------------------------------


def rollout(model: CausalWanModel, text_kv, cache_cfg: CacheConfig, sampler_cfg: SamplerConfig,
            chunk_shape: tuple[int, ...], exits: list[int], gen: torch.Generator, grad_chunks: int = 0) -> list[torch.Tensor]:
    """Generate len(exits) chunks through a fresh KVCache, as engine.stream.Stream does. chunk_shape is
    [B, C, frames_per_chunk, h, w]. Chunk c stops at denoising step exits[c] and its x0 there is its output.
    With grad enabled, the exit forward of each of the last `grad_chunks` chunks keeps its gradient; every other
    forward runs without one. All noise comes from `gen` (CPU) in the engine's order, so with every exit at the
    last step this is `Stream.next_chunk`, chunk for chunk. Returns the chunks' x0, each [B, C, F, h, w]."""
    B = chunk_shape[0]
    p = next(model.parameters())
    _, ph, pw = model.cfg.patch_size
    cache = KVCache(cache_cfg, num_layers=model.cfg.num_layers, batch=B, heads=model.cfg.num_attention_heads,
                    head_dim=model.cfg.attention_head_dim, grid_hw=(chunk_shape[3] // ph, chunk_shape[4] // pw),
                    device=p.device, dtype=p.dtype)
    sig, T = sigmas(sampler_cfg), sampler_cfg.num_train_timesteps
    grad = torch.is_grad_enabled()

    def randn():
        return torch.randn(chunk_shape, generator=gen).to(p.device, p.dtype)

    outs = []
    for c, exit in enumerate(exits):
        if not 0 <= exit < len(sig):
            raise ValueError(f"exit step {exit} outside the {len(sig)}-step schedule")
        x = randn()
        for i in range(exit + 1):
            keep = grad and i == exit and c >= len(exits) - grad_chunks
            with torch.set_grad_enabled(keep):
                v = model(x, torch.full((B,), sig[i] * T, device=p.device), text_kv=text_kv, ctx=cache)
                x0 = x - sig[i] * v
            if i < exit:
                s_next = sig[i + 1]
                x = x + (s_next - sig[i]) * v if sampler_cfg.mode == "euler" else (1 - s_next) * x0 + s_next * randn()
        outs.append(x0)
        with torch.no_grad():  # the clean pass: the context later chunks see (a constant to them)
            model(x0.detach(), torch.zeros(B, device=p.device), text_kv=text_kv, ctx=cache)
        cache.commit()
        cache.detach_()
    return outs


# ---- the losses ---------------------------------------------------------------------------------------


def _bcast(s: torch.Tensor) -> torch.Tensor:
    return s.view(-1, 1, 1, 1, 1)


def predict_v(model, xt: torch.Tensor, sigma: torch.Tensor, text_kv, context: torch.Tensor | None = None):
    """The model's flow prediction for xt [B, C, F, h, w] at sigma [B]. With `context` [B, C, Fc, h, w], those clean
    frames go first at timestep 0 (per-frame timesteps, the teacher's --p-context setting) and only xt's
    prediction is returned: the continuation of the context."""
    t = sigma * 1000
    if context is None:
        return model(xt, t, text_kv=text_kv)
    fc = context.shape[2]
    tf = torch.cat([torch.zeros_like(t)[:, None].expand(-1, fc), t[:, None].expand(-1, xt.shape[2])], dim=1)
    return model(torch.cat([context.to(xt.dtype), xt], dim=2), tf, text_kv=text_kv)[:, :, fc:]


@torch.no_grad()
def dmd_direction(x: torch.Tensor, teacher: CausalWanModel, critic: CausalWanModel, cond_kv, uncond_kv, critic_kv,
                  sigma: torch.Tensor, eps: torch.Tensor, guidance: float, context: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """DMD's gradient for the samples x [B, C, F, h, w] (DMD eq. 8 with its normalisation): noised to sigma [B],
    (x0_fake - x0_real) / mean|x - x0_real| per sample. Descending it moves x toward the teacher's distribution
    (with `context`, clean frames before x: its distribution of what follows them)."""
    s = _bcast(sigma)
    xt = (1 - s) * x + s * eps
    v_c, v_u = (predict_v(teacher, xt, sigma, kv, context) for kv in (cond_kv, uncond_kv))
    x0_real = xt - s * (v_u + guidance * (v_c - v_u))
    x0_fake = xt - s * predict_v(critic, xt, sigma, critic_kv, context)
    norm = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def dmd_loss(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 |x - sg(x - direction)|^2 (mean over elements) [B]: its gradient in x is direction / numel."""
    return 0.5 * (x - (x - direction).detach()).pow(2).flatten(1).mean(1)


def flow_loss(model: CausalWanModel, x: torch.Tensor, text_kv, sigma: torch.Tensor, eps: torch.Tensor,
              context: torch.Tensor | None = None) -> torch.Tensor:
    """Flow matching on samples x (the critic learns the student's distribution): |v - (eps - x)|^2; with `context`
    (clean frames before x), of x given them."""
    s = _bcast(sigma)
    return F.mse_loss(predict_v(model, (1 - s) * x + s * eps, sigma, text_kv, context), eps - x)


def motion_rewards(vae, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Re-DMD's reward per rollout [B] in [0, 1]: the mean of the oracle's motion checks (direction, speed and the
    temporal check: frozen, copied or drifting frames) on the decoded latents x [B, C, F, h, w]. A clip where no
    object is found has no motion checks and gets 0."""
    from benchmarks.oracle import score_video
    from engine.video_io import frames_to_uint8

    video = vae.decode(x.detach().to(vae.dtype))
    out = []
    for i, prompt in enumerate(prompts):
        checks = score_video(frames_to_uint8(video[i].float()), prompt).checks
        motion = [v for k, v in checks.items() if k.endswith(("motion", "speed", "temporal"))]
        out.append(sum(motion) / len(motion) if motion else 0.0)
    return torch.tensor(out, device=x.device)


class DiscHead(nn.Module):
    """DMD2's GAN classifier on the critic: tokens [B, L, dim] of one critic block -> a real-vs-student logit [B]
    (a per-token MLP, averaged over the tokens). The critic reads the prompt, so the head judges a clip with it."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.float()).mean(dim=(1, 2))


def gan_logits(critic: CausalWanModel, head: DiscHead, layer: int, x: torch.Tensor, text_kv, sigma: torch.Tensor,
               eps: torch.Tensor) -> torch.Tensor:
    """The head's logits [B] for clips x [B, C, F, h, w] noised to sigma [B] (DMD2 classifies noised samples, at
    the critic's own timesteps)."""
    s = _bcast(sigma)
    return head(critic((1 - s) * x + s * eps, sigma * 1000, text_kv=text_kv, features_at=layer))


def gan_gradient(critic: CausalWanModel, head: DiscHead, layer: int, x: torch.Tensor, text_kv, sigma: torch.Tensor,
                 eps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The generator's GAN gradient: d mean softplus(-logit) / dx for the samples x, taken through the critic and the
    head without touching their gradients (the generator's loss must not train its judge). Returns (gradient, loss)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        loss = F.softplus(-gan_logits(critic, head, layer, xg, text_kv, sigma, eps)).mean()
        (g,) = torch.autograd.grad(loss, xg)
    return g, loss.item()


def reward_weights(r: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(beta r), normalised to mean 1 over the batch so the loss keeps its scale (beta 0: all ones)."""
    w = torch.exp(beta * (r - r.max()))  # shifted for range; the normalisation cancels it
    return w / w.mean()


# ---- the trained module and the task ------------------------------------------------------------------


class DMDNets(nn.Module):
    """The two networks DMD trains, as one module so the Trainer (checkpoints, EMA, DDP) sees both: `generator`
    (the causal student) and `critic` (the fake score: bidirectional, started from the teacher). The frozen teacher
    and the VAE are held outside the module's state: not trained, saved or averaged (the Trainer moves the teacher
    to the device, or shards it under FSDP: its `frozen`). forward() is one step's loss."""

    def __init__(self, generator: CausalWanModel, critic: CausalWanModel, teacher: CausalWanModel, cfg: DMDConfig,
                 cache_cfg: CacheConfig, sampler_cfg: SamplerConfig, latent_hw: tuple[int, int], vae=None,
                 hybrid_cache_cfg: CacheConfig | None = None):
        super().__init__()
        self.generator, self.critic = generator, critic
        self.frozen = {"teacher": teacher.eval().requires_grad_(False), "vae": vae}  # a dict: not submodules
        self.cfg, self.cache_cfg, self.sampler_cfg, self.latent_hw = cfg, cache_cfg, sampler_cfg, latent_hw
        self.hybrid_cache_cfg = hybrid_cache_cfg  # the sparse / linear-memory cache of the second phase
        if cfg.reward_beta and vae is None:
            raise ValueError("Re-DMD (reward_beta > 0) needs the VAE to decode rollouts for the oracle")
        if cfg.gan_weight:  # trained with the critic (its lr group); absent without the GAN term
            n = critic.cfg.num_layers
            self.gan_layer = n // 2 if cfg.gan_layer == -1 else cfg.gan_layer
            if not 0 <= self.gan_layer < n:
                raise ValueError(f"gan_layer {cfg.gan_layer}: the critic has blocks 0..{n - 1}")
            with torch.random.fork_rng(devices=[]):  # the same start on every run and rank (the global RNG varies)
                torch.manual_seed(0)
                self.disc_head = DiscHead(critic.cfg.dim)

    def _sigma(self, n: int, gen: torch.Generator, device, shift: float | None = None) -> torch.Tensor:
        u = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.rand(n, generator=gen, dtype=torch.float64)
        return shift_sigma(u, self.cfg.shift if shift is None else shift).float().to(device)

    def plan(self, gen: torch.Generator) -> list[int]:
        """A rollout's length and exit steps: the exit step of each chunk. Drawn once per optimizer step for every
        rank and micro-batch alike (Self-Forcing broadcasts its exit step): under FSDP every rank must run the same
        forwards, or their all-gathers would wait on each other."""
        n_chunks = self.cfg.rollout_chunks[int(torch.randint(len(self.cfg.rollout_chunks), (1,), generator=gen))]
        return torch.randint(len(self.sampler_cfg.timesteps), (n_chunks,), generator=gen).tolist()

    def forward(self, emb: torch.Tensor, teacher_emb: torch.Tensor, uncond_emb: torch.Tensor, prompts: list[str],
                exits: list[int], gen: torch.Generator, generator_step: bool, hybrid: bool = False,
                real: torch.Tensor | None = None, real_emb: torch.Tensor | None = None):
        """emb: the student's prompt embeddings [B, Lt, text_dim]; teacher_emb / uncond_emb the teacher's (the
        critic reads teacher_emb too); exits: plan(); hybrid: roll out through the sparse / linear-memory cache;
        real / real_emb (the GAN term): latents of real clips [B, C, >= len(exits) * frames_per_chunk, h, w] and
        the teacher's embeddings of their prompts. Returns (loss, metrics)."""
        cfg, B = self.cfg, emb.shape[0]
        cache_cfg = self.hybrid_cache_cfg if hybrid else self.cache_cfg
        teacher, dev = self.frozen["teacher"], emb.device
        fpc = self.cache_cfg.frames_per_chunk
        shape = (B, self.generator.cfg.in_channels, fpc, *self.latent_hw)
        with torch.set_grad_enabled(generator_step):
            gen_kv = self.generator.text_kv(emb)
            chunks = rollout(self.generator, gen_kv, cache_cfg, self.sampler_cfg, shape, exits, gen,
                             grad_chunks=cfg.dmd_chunks if generator_step else 0)
        x = torch.cat(chunks[-cfg.dmd_chunks:], dim=2)  # [B, C, dmd_chunks * fpc, h, w]
        # the rollout before the scored chunks, its last context_frames latent frames (a constant: no gradient)
        earlier = chunks[:-cfg.dmd_chunks]
        context = (torch.cat(earlier, dim=2)[:, :, -cfg.context_frames:].detach()
                   if cfg.context_frames and earlier else None)
        critic_kv = self.critic.text_kv(teacher_emb)

        # the critic: flow matching on the student's (detached) samples, every step
        c_loss = flow_loss(self.critic, x.detach(), critic_kv, self._sigma(B, gen, dev),
                           torch.randn(x.shape, generator=gen).to(dev, x.dtype), context)
        metrics = {"critic": c_loss.item(), "gen": float(generator_step), "dmd": 0.0, "reward": 0.0, "hybrid": float(hybrid),
                   "exit": sum(exits[-cfg.dmd_chunks:]) / cfg.dmd_chunks}
        if cfg.gan_weight:  # the head learns real clips from the student's, every step, beside the critic
            if real is None:
                raise ValueError("the GAN term needs real clips (DMDTask with real latents)")
            end = len(exits) * fpc  # the real clips' frames at the scored chunks' place in the stream
            r = real[:, :, end - x.shape[2]:end].to(dev, x.dtype)
            sig = self._sigma(B, gen, dev, cfg.gan_shift)
            args = (self.critic, self.disc_head, self.gan_layer)
            real_logit = gan_logits(*args, r, self.critic.text_kv(real_emb), sig,
                                    torch.randn(r.shape, generator=gen).to(dev, x.dtype))
            fake_logit = gan_logits(*args, x.detach(), critic_kv, sig, torch.randn(x.shape, generator=gen).to(dev, x.dtype))
            d_loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
            c_loss = c_loss + cfg.disc_weight * d_loss
            d_acc = 0.5 * ((real_logit > 0).float().mean() + (fake_logit < 0).float().mean())
            metrics.update(disc=d_loss.item(), d_acc=d_acc.item(), gan=0.0)
        if not generator_step:
            return c_loss, metrics

        sigma, eps = self._sigma(B, gen, dev), torch.randn(x.shape, generator=gen).to(dev, x.dtype)
        with torch.no_grad():
            kv = teacher.text_kv(torch.cat([teacher_emb, uncond_emb.expand_as(teacher_emb)]))
        cond_kv, uncond_kv = [[(k[:B], v[:B]) for k, v in kv], [(k[B:], v[B:]) for k, v in kv]]
        direction = dmd_direction(x, teacher, self.critic, cond_kv, uncond_kv, critic_kv, sigma, eps, cfg.guidance,
                                  context)
        per = dmd_loss(x, direction)  # [B]
        if cfg.reward_beta:
            r = motion_rewards(self.frozen["vae"], x, prompts)
            w = reward_weights(r, cfg.reward_beta)
            metrics["reward"] = r.mean().item()
        else:
            w = torch.ones_like(per)
        g_loss = (w * per).mean()
        metrics["dmd"] = per.mean().item()
        if cfg.gan_weight:  # a surrogate whose gradient in x is the GAN gradient: the generator alone learns from it
            g, metrics["gan"] = gan_gradient(self.critic, self.disc_head, self.gan_layer, x, critic_kv,
                                             self._sigma(B, gen, dev, cfg.gan_shift),
                                             torch.randn(x.shape, generator=gen).to(dev, x.dtype))
            g_loss = g_loss + cfg.gan_weight * (x * g).sum()
        return g_loss + c_loss, metrics


class DMDTask:
    """A batch is random Shapes prompts (a pure function of the sample ids), embedded by the student's and the
    teacher's text encoders (cached per prompt); with `real` (the GAN term) also real clips' latents and their
    prompts (clip i for sample i). TTUR: step s trains the generator when s % ttur == 0."""

    def __init__(self, student_text, teacher_text, ttur: int, seed: int = 0, hybrid_from: int | None = None,
                 real=None):
        self.student_text, self.teacher_text, self.ttur, self.seed = student_text, teacher_text, ttur, seed
        self.hybrid_from, self.hybrid, self.real = hybrid_from, False, real
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.uncond = teacher_text.encode([""])
        self.generator_step = True

    def begin_step(self, step: int):
        self.generator_step = step % self.ttur == 0
        self.hybrid = self.hybrid_from is not None and step >= self.hybrid_from  # Hybrid Forcing's decoupled switch
        self.step_gen = torch.Generator().manual_seed(micro_seed(self.seed, step, -1))  # DMDNets.plan: all ranks

    def prompt(self, i: int) -> str:
        return sample_prompt(random.Random(self.seed * 1_000_003 + i))

    def _embed(self, prompts: list[str]):
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            self.cache.update(zip(new, zip(self.student_text.encode(new), self.teacher_text.encode(new))))

    def batch(self, ids):
        prompts = [self.prompt(i) for i in ids]
        self._embed(prompts)
        out = {"emb": torch.stack([self.cache[p][0] for p in prompts]),
               "teacher_emb": torch.stack([self.cache[p][1] for p in prompts]),
               "uncond": self.uncond, "prompts": prompts}
        if self.real is not None:
            real_prompts, out["real"] = self.real.get(ids)
            self._embed(real_prompts)
            out["real_emb"] = torch.stack([self.cache[p][1] for p in real_prompts])
        return out

    def loss(self, model, batch, gen):
        nets = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        exits = nets.plan(torch.Generator().set_state(self.step_gen.get_state()))  # every micro-batch: the same plan
        return model(batch["emb"], batch["teacher_emb"], batch["uncond"], batch["prompts"], exits, gen,
                     self.generator_step, self.hybrid, batch.get("real"), batch.get("real_emb"))


# ---- building, export and the CLI ---------------------------------------------------------------------


def cache_with_sink(cache: CacheConfig, sink: str | None) -> CacheConfig:
    """The student's cache with another sink policy (the ablation's none / static / ema); sink frames = one chunk."""
    if sink is None or sink == cache.sink:
        return cache
    return dataclasses.replace(cache, sink=sink, sink_frames=cache.frames_per_chunk)


def run_caches(preset, settings: dict) -> tuple[CacheConfig, CacheConfig | None]:
    """(the dense cache, the hybrid one or None) of a run: the student's, with the run's sink, and with Hybrid
    Forcing's block-sparse window (`sparse_topk`) and / or linear memory from step `hybrid_from` on."""
    dense = cache_with_sink(preset.cache, settings.get("sink"))
    h = settings.get("hybrid")
    if not h:
        return dense, None
    return dense, preset.replace(cache=dense).sparse_cache(h["sparse_topk"], h["linear_memory"])


def _as_causal(transformer) -> CausalWanModel:
    """A diffusers WanTransformer3DModel (or a CausalWanModel) as a float32 CausalWanModel with the same weights and
    its own config: the bidirectional mode of the engine's model equals diffusers' (tests/test_model.py), and is
    leaner."""
    from engine.folder import transformer_config

    cfg = transformer.cfg if isinstance(transformer, CausalWanModel) else \
        transformer_config(dict(transformer.config), Path("transformer/config.json"))
    m = CausalWanModel(cfg)
    m.load_state_dict(transformer.state_dict(), strict=True)
    return m.float()


def _check_scores(student: CausalWanModel, nets: dict[str, CausalWanModel], teacher_text, critic_text,
                  critic: str | None):
    """The teacher and the critic may be any size (a 14B teacher, a 1.3B critic), but they score the student's
    latents, and the critic reads the teacher's prompt embeddings."""
    s = student.cfg
    for name, m in nets.items():
        if (m.cfg.in_channels, m.cfg.out_channels) != (s.in_channels, s.out_channels):
            raise ValueError(f"the {name} takes {m.cfg.in_channels} latent channels and the student "
                             f"{s.in_channels}: they must share the VAE's latent space")
        if m.cfg.text_dim != nets["teacher"].cfg.text_dim:
            raise ValueError(f"the {name} reads {m.cfg.text_dim}-wide prompt embeddings, the teacher's text encoder "
                             f"gives {nets['teacher'].cfg.text_dim}")
    if critic is not None:
        probe = ["a red circle moving left on a black background"]
        with torch.no_grad():
            a, b = teacher_text.encode(probe), critic_text.encode(probe)
        if a.shape != b.shape or not torch.allclose(a.float(), b.float().to(a.device), atol=1e-4):
            raise ValueError(f"--critic {critic}: its text encoder is not the teacher's (the critic reads the "
                             "teacher's prompt embeddings)")


def load_real_score(path: str, preset) -> tuple[nn.Module, object]:
    """(transformer, text encoder) of the teacher: a Shapes teacher (an exported folder with teacher.json, or a
    distill.train_teacher run folder), else anything `--model` loads (an engine folder, a diffusers Wan2.1 folder
    with its umT5, ...): engine/folder.py."""
    from .train_teacher import load_teacher, teacher_preset

    p = Path(path)
    if teacher_preset(p) is not None or (p / "checkpoints").is_dir():
        t = load_teacher(p, preset.name)
        return t.transformer, t.text
    m = load_model_folder(path)
    return m.transformer, m.text


class PromptFile:
    """Prompts from a text file, one a line (blank lines and # comments skipped): the data of a domain other than
    Shapes (Self-Forcing trains on VidProM prompts). Sample i is line i mod the count."""

    def __init__(self, path: str):
        lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
        self.prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        if not self.prompts:
            raise ValueError(f"{path}: no prompts (one a line)")

    def __call__(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]


def build(settings: dict, device, quiet: bool = False) -> tuple[DMDNets, DMDTask, object]:
    """DMDNets and DMDTask from a run's settings (dmd.json): the student folder, the teacher, the DMD options."""
    student = load_model_folder(settings["student"])
    preset = student.preset
    teacher, teacher_text = load_real_score(settings["teacher"], preset)
    cfg = DMDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["dmd"].items()})
    if cfg.reward_beta and settings.get("prompts"):
        raise ValueError("--reward-beta: the motion reward is the Shapes oracle's, which needs Shapes prompts "
                         "(leave out --prompts)")
    if cfg.gan_weight and settings.get("prompts"):
        raise ValueError("--gan-weight: the real clips are rendered Shapes clips, which need Shapes prompts "
                         "(leave out --prompts)")
    cache_cfg, hybrid_cfg = run_caches(preset, settings)
    critic_from, critic_text = (teacher, teacher_text) if not settings.get("critic") else \
        load_real_score(settings["critic"], preset)
    teacher_net = _as_causal(teacher)
    critic = _as_causal(critic_from).requires_grad_(True)
    del teacher, critic_from  # the float32 copies above are the ones used
    generator = student.transformer.float().requires_grad_(True).train()
    _check_scores(generator, {"teacher": teacher_net, "critic": critic}, teacher_text, critic_text,
                  settings.get("critic"))
    if hybrid_cfg is not None and hybrid_cfg.linear_memory:
        generator.enable_linear_memory()  # zero-initialised from the start: unused (no gradient) until the switch
    if cfg.reward_beta:
        student.vae.vae.to(device)
    nets = DMDNets(generator, critic, teacher_net, cfg, cache_cfg, preset.sampler, preset.latent_hw,
                   vae=student.vae if cfg.reward_beta else None, hybrid_cache_cfg=hybrid_cfg)
    real = None
    if cfg.gan_weight:
        frames = max(cfg.rollout_chunks) * cache_cfg.frames_per_chunk
        real = real_clips(settings["real"]["path"], settings["real"]["clips"], student, frames, quiet)
    task = DMDTask(student.text, teacher_text, cfg.ttur, seed=settings.get("seed", 0),
                   hybrid_from=settings["hybrid"]["from_step"] if settings.get("hybrid") else None, real=real)
    if settings.get("prompts"):
        task.prompt = PromptFile(settings["prompts"])
    return nets, task, student


def real_clips(path: str, count: int, student, latent_frames: int, quiet: bool = False):
    """The GAN term's real data: `count` rendered Shapes clips (seed 0, clip i anywhere in an endless stream) encoded
    by the student's VAE into a latent cache at `path`, made on first use (by rank 0; the others wait), each at
    least `latent_frames` latent frames long (a rollout's). Returns a LatentSet."""
    import torch.distributed as dist

    from .data import LatentSet, ShapesClips, encode_clips

    p, pre = Path(path), student.preset
    if not p.is_file() and (not dist.is_initialized() or dist.get_rank() == 0):
        frames = 1 + 4 * -(-pre.vae.scale_factor_temporal * (latent_frames - 1) // 4)  # the encoder takes 1 + 4k
        encode_clips(student.vae, ShapesClips(pre.width, pre.height, frames), count, p, quiet=quiet)
    if dist.is_initialized():
        dist.barrier()
    real = LatentSet(p)
    have = tuple(real.latents.shape[1:])
    want = (pre.model.in_channels, latent_frames, *pre.latent_hw)
    if have[0] != want[0] or have[2:] != want[2:] or have[1] < latent_frames:
        raise ValueError(f"{p}: latents of shape {list(have)}, the student's rollouts need {list(want)} "
                         "(another VAE or size, or shorter clips: delete it to re-encode)")
    return real


def export(run: Path, out: Path) -> Path:
    """The generator's EMA weights as an engine model folder, with the run's cache (sink) settings."""
    settings = json.loads((run / "dmd.json").read_text())
    student = load_model_folder(settings["student"])
    dense, hybrid = run_caches(student.preset, settings)
    preset = student.preset.replace(cache=hybrid or dense)
    weights = load_weights(run, "ema")
    gen = CausalWanModel(preset.model)
    if hybrid is not None and hybrid.linear_memory:
        gen.enable_linear_memory()
    gen.load_state_dict({k.removeprefix("generator."): v for k, v in weights.items() if k.startswith("generator.")},
                        strict=True)
    ckpt = run if (run / "state.json").exists() else latest_checkpoint(run)
    save_model_folder(out, preset, gen, student.vae, student.text, weights_dtype=torch.float16, placeholder=False,
                      preview=student.preview,
                      description=f"Shapes student: self-forcing DMD from {settings['student']} against the teacher "
                                  f"{settings['teacher']} ({ckpt.name} of {run}, EMA weights; sink {preset.cache.sink}, "
                                  f"Re-DMD beta {settings['dmd']['reward_beta']})")
    return out


def _main(argv=None) -> int:
    from .ode_init import evaluate_engine

    p = OneLineParser(prog="python -m distill.self_forcing", description=__doc__.split("\n")[0])
    add_train_args(p, steps=400, batch_size=8, lr=5e-5, ckpt_every=50, log_every=5, ema=0.99, out="runs/dmd")
    p.add_argument("--student", default="assets/shapes",
                   help="the student to start from, an engine model folder (make assets: the ODE student)")
    p.add_argument("--teacher", default="assets/shapes-teacher",
                   help="the real score: a Shapes teacher folder or run, or any model folder --model loads")
    p.add_argument("--critic", metavar="DIR",
                   help="start the critic (fake score) from this model instead of the teacher, e.g. the 1.3B base "
                        "beside a 14B teacher, as Self-Forcing does; its text encoder must be the teacher's")
    p.add_argument("--prompts", metavar="FILE", help="train on these prompts, one a line (default: random Shapes "
                                                       "prompts)")
    p.add_argument("--sink", choices=("none", "static", "ema"), help="sink policy in training and in the export "
                                                                      "(default: the student's)")
    d = DMDConfig()
    p.add_argument("--guidance", type=float, default=d.guidance, help="CFG of the real score")
    p.add_argument("--ttur", type=int, default=d.ttur, help="critic updates per generator update")
    p.add_argument("--critic-lr-scale", type=float, default=1.0, help="critic lr = this x --lr")
    p.add_argument("--rollout-chunks", type=int, nargs="+", default=list(d.rollout_chunks), metavar="N",
                   help="chunks per rollout, one length drawn per step (longer than sink + window: eviction)")
    p.add_argument("--dmd-chunks", type=int, default=d.dmd_chunks, help="the last this many chunks are scored")
    p.add_argument("--dmd-context", type=int, default=d.context_frames, metavar="N",
                   help="show the teacher and the critic up to N latent frames of the rollout before the scored "
                        "chunks, clean: the real score is the teacher's continuation (0: the scored chunks alone)")
    p.add_argument("--reward-beta", type=float, default=d.reward_beta, help="Re-DMD: weight rollouts by exp(beta r)")
    p.add_argument("--gan-weight", type=float, default=d.gan_weight,
                   help="DMD2's GAN term: weight of the generator's loss from a real-vs-student head on the critic "
                        "(0: off); it trains on rendered clips, so the student can learn what the teacher gets wrong")
    p.add_argument("--disc-weight", type=float, default=d.disc_weight,
                   help="--gan-weight: weight of the head's classification loss in the critic's update")
    p.add_argument("--disc-lr-scale", type=float, default=20.0, metavar="F",
                   help="--gan-weight: lr of the head = F x --lr (it starts from nothing, the critic from the teacher)")
    p.add_argument("--gan-shift", type=float, default=d.gan_shift,
                   help="--gan-weight: shift of the GAN's noise levels (1: uniform; the DMD's own is 5)")
    p.add_argument("--gan-layer", type=int, default=d.gan_layer,
                   help="--gan-weight: the critic block the head reads (-1: the middle one)")
    p.add_argument("--real", metavar="FILE", default="runs/real-latents.safetensors",
                   help="--gan-weight: latent cache of the real clips (made on first use with the student's VAE)")
    p.add_argument("--real-clips", type=int, default=2000, metavar="N", help="--gan-weight: clips in a new --real cache")
    p.add_argument("--sparse-topk", type=float, metavar="F",
                   help="Hybrid Forcing: block-sparse window attention keeping this fraction of the window's key "
                        "blocks (the sink's and the current chunk's are always kept)")
    p.add_argument("--linear-memory", action="store_true",
                   help="Hybrid Forcing: fold evicted chunks into a linear-attention memory the generator reads")
    p.add_argument("--hybrid-from", type=int, default=0, metavar="STEP",
                   help="dense rollouts before this step, sparse / linear after it (the decoupled schedule)")
    p.add_argument("--memory-lr-scale", type=float, default=1.0, metavar="F",
                   help="--linear-memory: lr of the generator's zero-initialised memory projections = F x --lr")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each block's feed-forward and projections in the backward (memory at scale)")
    p.add_argument("--export", metavar="DIR", help="write the generator (EMA) as an engine model folder")
    p.add_argument("--eval", type=int, metavar="N", help="oracle adherence of N prompts through the engine")
    p.add_argument("--stream-seconds", type=float, default=120.0, help="--eval: length of the long streams")
    p.add_argument("--streams", type=int, default=2, help="--eval: long streams (first and last 10 s scored)")
    p.add_argument("--eval-steps", type=int, help="--eval with the first N of the sampler's steps (e.g. 2 or 1)")
    p.add_argument("--eval-preview", action="store_true",
                   help="--eval decoding with the model's preview decoder (engine/preview.py) instead of the VAE's")
    args = p.parse_args(argv)
    out = Path(args.out)
    counts = [v for v in (args.eval, args.eval_steps) if v is not None]
    if args.streams < 0 or not args.stream_seconds >= 0 or any(v < 1 for v in counts):
        p.error(f"--streams and --stream-seconds must be >= 0, --eval and --eval-steps >= 1 (got {args.streams}, "
                f"{args.stream_seconds}, {args.eval} and {args.eval_steps})")
    if args.export or args.eval:
        if args.export:
            if not (out / "dmd.json").is_file():
                raise FileNotFoundError(f"{out / 'dmd.json'}: not a self_forcing run folder")
            print(export(out, Path(args.export)))
        if args.eval:
            print(json.dumps(evaluate_engine(args.export or args.student, args.eval, stream_seconds=args.stream_seconds,
                                             streams=args.streams, steps=args.eval_steps, quiet=args.quiet,
                                             preview=args.eval_preview)))
        return 0

    dmd = DMDConfig(guidance=args.guidance, ttur=args.ttur, rollout_chunks=tuple(args.rollout_chunks),
                    dmd_chunks=args.dmd_chunks, reward_beta=args.reward_beta, gan_weight=args.gan_weight,
                    disc_weight=args.disc_weight, gan_layer=args.gan_layer, gan_shift=args.gan_shift,
                    context_frames=args.dmd_context)
    if args.real_clips < 1 or args.disc_lr_scale <= 0:
        p.error(f"--real-clips {args.real_clips} / --disc-lr-scale {args.disc_lr_scale}: must be >= 1 / positive")
    if args.sparse_topk is not None and not 0.0 < args.sparse_topk <= 1.0:
        p.error(f"--sparse-topk {args.sparse_topk}: must lie in (0, 1]")
    if args.memory_lr_scale <= 0:
        p.error(f"--memory-lr-scale {args.memory_lr_scale}: must be positive")
    hybrid = ({"sparse_topk": args.sparse_topk, "linear_memory": args.linear_memory, "from_step": args.hybrid_from}
              if args.sparse_topk is not None or args.linear_memory else None)
    if hybrid is not None and args.linear_memory and args.memory_lr_scale != 1.0:
        hybrid["memory_lr_scale"] = args.memory_lr_scale
    settings = {"student": args.student, "teacher": args.teacher, **({"critic": args.critic} if args.critic else {}),
                "sink": args.sink, "seed": args.seed, "prompts": args.prompts, "hybrid": hybrid,
                "dmd": dmd_settings(dmd), "critic_lr_scale": args.critic_lr_scale}
    if dmd.gan_weight:
        settings["real"] = {"path": args.real, "clips": args.real_clips}
        settings["disc_lr_scale"] = args.disc_lr_scale
    settings = json.loads(json.dumps(settings))  # as dmd.json reads back (tuples as lists), to compare on resume
    if (out / "dmd.json").is_file() and not args.no_resume:  # a resume keeps the run's own settings
        old = json.loads((out / "dmd.json").read_text())
        # a key missing from an older run's dmd.json reads as None, the value it had then
        if changed := sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k)):
            sys.stderr.write(f"distill.self_forcing: resuming {out} with its own settings (ignoring changed "
                             f"{', '.join(changed)})\n")
        settings = old
    rank, world, device = setup_distributed()
    if args.checkpoint_activations:
        from engine.accel import checkpoint_blocks

        checkpoint_blocks()
    nets, task, _ = build(settings, device, quiet=args.quiet)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dmd.json").write_text(json.dumps(settings, indent=2) + "\n")
    cfg = dataclasses.replace(config_from_args(args), betas=(0.0, 0.999))
    # the EMA follows the generator only (the export reads it; a critic's average is never used), and the frozen
    # teacher is moved to the device by the Trainer, or sharded over the ranks with --fsdp
    trainer = Trainer(nets, task, cfg, out, device=device, resume=not args.no_resume, quiet=args.quiet,
                      groups=param_groups(settings), ddp_kwargs={"find_unused_parameters": True},
                      ema_of="generator", frozen=(nets.frozen["teacher"],))
    if trainer.fsdp and not args.quiet and rank == 0:
        sys.stderr.write(f"distill.self_forcing: FSDP over {world} processes: {sharding(nets)}\n")
    trainer.run()
    del trainer, nets, task  # nothing may hold the (maybe sharded) model past the teardown: teardown_distributed
    teardown_distributed()
    return 0


def sharding(nets: DMDNets) -> str:
    """What this rank holds of the generator, the critic and the frozen teacher: 'generator 50% of 1,234,567
    parameters, ...' (FSDP splits each tensor on dim 0, so about 1 / world each)."""
    from .trainer import _local

    def held(name, m):
        mine, total = sum(_local(p).numel() for p in m.parameters()), sum(p.numel() for p in m.parameters())
        return f"{name} {mine / total:.0%} of {total:,} parameters"

    return ", ".join(held(n, m) for n, m in [("generator", nets.generator), ("critic", nets.critic),
                                              ("teacher", nets.frozen["teacher"])]) + " on each rank"


def dmd_settings(dmd: DMDConfig) -> dict:
    """dmd.json's "dmd": the GAN fields only when the term is on, the context only when set (runs from before them
    resume unchanged)."""
    d = dataclasses.asdict(dmd)
    if not dmd.context_frames:
        del d["context_frames"]
    return d if dmd.gan_weight else {k: v for k, v in d.items() if not k.startswith(("gan_", "disc_"))}


MEMORY_PARAMS = "generator.*.mem_proj.*"  # the generator's linear-memory projections (enable_linear_memory)


def param_groups(settings: dict) -> dict[str, float]:
    """Trainer groups (name prefix or pattern -> lr scale; first match wins): the generator, its linear-memory
    projections when they have their own lr (new, zero-initialised, and trained only after the switch), the critic."""
    h = settings.get("hybrid") or {}
    memory = {MEMORY_PARAMS: h["memory_lr_scale"]} if h.get("memory_lr_scale", 1.0) != 1.0 else {}
    head = {"disc_head.": settings["disc_lr_scale"]} if settings.get("dmd", {}).get("gan_weight") else {}
    return {**memory, "generator.": 1.0, "critic.": settings["critic_lr_scale"], **head}

main = one_line_errors(_main, "distill.self_forcing")

if __name__ == "__main__":
    sys.exit(main())
