"""CausalWanModel: the Wan transformer, with the attention context made explicit.

Glossary: B batch, C latent channels, F latent frames, (h, w) latent size, (fh, fw) = (h, w) / patch,
N = fh*fw tokens per latent frame, L = F*N tokens, H heads, D head dim, dim = H*D.
A *chunk* is `frames_per_chunk` latent frames: bidirectional inside, causal across chunks.

Parameter names are exactly those of diffusers' `WanTransformer3DModel`, so teacher checkpoints load into
the student unchanged (and back). Who sees whom in self-attention is not decided here: each forward is
given a context (engine/attention.py, engine/cache.py):
  - no context           -> bidirectional over the whole input; equals `WanTransformer3DModel`.
  - `FullContext(mask)`  -> masked full forward (block-causal, teacher forcing).
  - `KVCache`            -> one chunk of a stream, attending to [sink | window | chunk].
Cross-attention K/V depend on the prompt only, so they are computed once per prompt (`text_kv`).
Timesteps are per sample [B] or per latent frame [B, F] (clean context frames at t = 0 beside noisy ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.linear_memory import MemoryProjection

from .attention import AttnContext, FullContext, attention
from .config import ModelConfig


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (Wan keeps norms and modulation in fp32)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [T] -> [T, dim] as [cos | sin] (diffusers' Timesteps(flip_sin_to_cos=True))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    emb = torch.cat([ang.cos(), ang.sin()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class MLP2(nn.Module):
    """linear_1 -> act -> linear_2 (the key names of diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, d_in, d_out, act):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(d_in, d_out), act, nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, dim, freq_dim, text_dim):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLP2(freq_dim, dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLP2(text_dim, dim, nn.GELU(approximate="tanh"))

    def time(self, t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # t [T] -> temb [T, dim], modulation [T, 6, dim]
        e = timestep_embedding(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(e).to(dtype)
        return temb, self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))


class Attention(nn.Module):
    """Wan attention projections (to_q/k/v, to_out.0, RMSNorm over all heads on q and k)."""

    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        # Linear-memory projection (CausalWanModel.enable_linear_memory); absent by default, so plain
        # checkpoints load strictly and the forward is unchanged.
        self.mem_proj: MemoryProjection | None = None

    def q(self, x):
        # x [B, L, dim] -> q [B, L, H, D] (un-roped)
        return self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))

    def qkv(self, x):
        # x [B, L, dim] -> q, k, v [B, L, H, D] (un-roped)
        return (self.q(x), *self.kv(x))

    def kv(self, ctx):
        # text [B, Lt, dim] -> k, v [B, Lt, H, D]
        return self.norm_k(self.to_k(ctx)).unflatten(2, (self.heads, -1)), self.to_v(ctx).unflatten(2, (self.heads, -1))

    def out(self, o):
        return self.to_out[0](o.flatten(2))


class GELUProj(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        # 1. Self-attention
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, eps)
        # 2. Cross-attention
        self.attn2 = Attention(dim, cfg.num_attention_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        # 3. Feed-forward
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    fsdp_forward_methods = ("text_kv",)  # called from outside forward(): FSDP must gather the block for it too

    def text_kv(self, ctx):
        """Cross-attention K/V of the projected prompt ctx [B, Lt, dim] -> (k, v) [B, Lt, H, D]."""
        return self.attn2.kv(ctx)

    def forward(self, x, mod, text_kv, ctx: AttnContext, layer: int):
        # x [B, L, dim]; mod [B, L or 1, 6, dim] fp32; text_kv = (k, v) [B, Lt, H, D]
        # The attention context (cache bookkeeping, RoPE, the attention call) runs between two pure tensor
        # functions, which `engine.accel.compile_blocks` may swap for compiled versions.
        q, k, v, mods = _STAGES["pre"](self, x, mod)
        o = ctx.attend(layer, q, k, v)
        if self.attn1.mem_proj is not None and hasattr(ctx, "memory_readout"):
            r = ctx.memory_readout(layer, q)  # linear memory of evicted tokens, or None while it is empty
            if r is not None:
                o = o + self.attn1.mem_proj(r.type_as(o))
        return _STAGES["post"](self, x, o, mods, text_kv)


def block_pre(blk: Block, x, mod):
    """Modulated norm and self-attention projections -> un-roped q, k, v [B, L, H, D] and the other modulations."""
    shift, scale, gate, c_shift, c_scale, c_gate = (blk.scale_shift_table.unsqueeze(0) + mod.float()).unbind(2)
    h = (blk.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    q, k, v = blk.attn1.qkv(h)
    return q, k, v, (gate, c_shift, c_scale, c_gate)


def block_post(blk: Block, x, o, mods, text_kv):
    """Self-attention output projection, cross-attention to the prompt (K/V cached per prompt), feed-forward."""
    gate, c_shift, c_scale, c_gate = mods
    a = blk.attn1.out(o.type_as(x))
    x = (x.float() + a * gate).type_as(x)
    h = blk.norm2(x.float()).type_as(x)
    x = x + blk.attn2.out(attention(blk.attn2.q(h), *text_kv).type_as(h))
    h = (blk.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    return (x.float() + blk.ffn(h).float() * c_gate).type_as(x)


_STAGES = {"pre": block_pre, "post": block_post}  # engine.accel.compile_blocks replaces these


class CausalWanModel(nn.Module):
    fsdp_forward_methods = ("text_kv",)  # a sharded teacher's text_kv is called on its own: FSDP gathers for it

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        # 1. Patch embedding (RoPE has no parameters; see attention.py)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # 2. Condition embeddings
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        # 3. Blocks
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        # 4. Output norm & projection
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @property
    def dtype(self):
        return self.proj_out.weight.dtype

    @property
    def has_linear_memory(self) -> bool:
        return self.blocks[0].attn1.mem_proj is not None

    def enable_linear_memory(self) -> list[nn.Parameter]:
        """Give every self-attention its zero-initialised memory projection (Hybrid Forcing's linear branch);
        returns the parameters created (none if already enabled). Outputs are unchanged until they train.
        A checkpoint saved after this has `blocks.{i}.attn1.mem_proj.*` keys: enable before loading it."""
        new = []
        for blk in self.blocks:
            if blk.attn1.mem_proj is None:
                blk.attn1.mem_proj = MemoryProjection(self.cfg.attention_head_dim, device=self.proj_out.weight.device,
                                                      dtype=self.dtype)
                new += list(blk.attn1.mem_proj.parameters())
        return new

    def text_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prompt embeddings [B, Lt, text_dim] -> per layer cross-attention (k, v), each [B, Lt, H, D]."""
        ctx = self.condition_embedder.text_embedder(text.to(self.dtype))
        return [blk.text_kv(ctx) for blk in self.blocks]

    def forward(self, x, timestep, encoder_hidden_states=None, *, text_kv=None, ctx: AttnContext | None = None,
                features_at: int | None = None):
        """x [B, C, F, h, w], timestep [B] or [B, F] (0..1000) -> flow prediction [B, C, F, h, w].

        Without `ctx` this is the bidirectional model, call-compatible with WanTransformer3DModel. With
        `features_at=i` it stops after block i and returns its tokens [B, L, dim] instead (what a discriminator
        head reads: distill/self_forcing.py's GAN term).
        """
        B, _, nf, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        gf, gh, gw = nf // pt, h // ph, w // pw
        if text_kv is None:
            text_kv = self.text_kv(encoder_hidden_states)
        if ctx is None:
            ctx = FullContext((gf, gh, gw), self.cfg.attention_head_dim, x.device)

        # 1. Patchify: [B, C, F, h, w] -> [B, L, dim]
        x = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()

        # 2. Timestep modulation, per sample [B, 1, ...] or per token [B, L, ...]
        t = timestep.to(x.device)
        if t.ndim == 0:
            t = t.expand(B)
        temb, mod = self.condition_embedder.time(t.flatten(), x.dtype)
        if t.ndim == 2:  # per latent frame -> per token
            temb = temb.unflatten(0, (B, -1)).repeat_interleave(gh * gw, dim=1)  # [B, L, dim]
            mod = mod.unflatten(0, (B, -1)).repeat_interleave(gh * gw, dim=1)  # [B, L, 6, dim]
        else:
            temb, mod = temb[:, None], mod[:, None]  # [B, 1, dim], [B, 1, 6, dim]

        # 3. Blocks
        for i, blk in enumerate(self.blocks):
            x = blk(x, mod, text_kv[i], ctx, i)
            if i == features_at:
                return x

        # 4. Output norm, projection, unpatchify
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # [B, L, C*pt*ph*pw]
        x = x.reshape(B, gf, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, -1, gf * pt, gh * ph, gw * pw)
