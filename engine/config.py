"""Frozen configs with named presets: one home for every default.

ModelConfig  - the transformer; field names are diffusers' `WanTransformer3DModel` kwargs, so a
               teacher is `WanTransformer3DModel(**cfg.diffusers_kwargs())` and weights load both ways.
CacheConfig  - the streaming layout: chunk size, rolling window, sink policy (all in latent frames);
               optional block-sparse attention and linear memory (Hybrid Forcing), off by default.
SamplerConfig- the few-step flow-matching schedule.
VAEConfig    - a diffusers `AutoencoderKLWan` configuration.
Preset       - all of the above plus the video geometry (pixels, fps) a model was built for.

Presets: `tiny` (tests), `shapes` (the first Shapes layout: CPU real time), `shapes-t2` (the built-in model's: the
same widths, a latent frame per 2 video frames), `shapes-p2` and `shapes-t2-p2` (2x2-patch candidates on the two
latent layouts), `shapes-t2-p2h8` (`shapes-t2-p2` in 8 heads of 16), `shapes-t2-s` (a small teacher: an autoguidance
guide), `wan2.1-1.3b` (real widths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SINK_POLICIES = ("none", "static", "ema")


@dataclass(frozen=True)
class ModelConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024  # kept for diffusers compatibility; our RoPE has no table limit

    def __post_init__(self):
        d = self.attention_head_dim
        hw = 2 * (d // 6)
        if (d - 2 * hw) % 2 or hw == 0:
            raise ValueError(f"attention_head_dim={d}: RoPE needs even t/h/w splits (t={d - 2 * hw}, h=w={hw})")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm_across_heads' (Wan) is supported")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class CacheConfig:
    frames_per_chunk: int = 3  # latent frames generated per chunk (bidirectional inside a chunk)
    window_frames: int = 6  # latent frames of rolling context before the current chunk
    sink: str = "ema"  # none | static | ema
    sink_frames: int = 3  # latent frames kept at the front of the context
    ema_alpha: float = 0.999  # ema sink: sink <- alpha * sink + (1 - alpha) * evicted
    # Hybrid Forcing's attention paths (off by default: the defaults are plain dense attention).
    sparse_topk: float | None = None  # block-sparse attention: fraction of the window's key blocks each query
    #                                   block sees, besides the sink's and its own chunk's (always kept)
    sparse_block: int = 64  # tokens per query / key block of the sparse path (Triton: a power of two >= 16)
    linear_memory: bool = False  # fold evicted chunks into a linear-attention state that every query reads

    def __post_init__(self):
        if self.sparse_topk is not None and not 0.0 < self.sparse_topk <= 1.0:
            raise ValueError(f"sparse_topk={self.sparse_topk}: expected None (dense) or a fraction in (0, 1]")
        if self.sparse_block < 1:
            raise ValueError("sparse_block must be >= 1")
        if self.sink not in SINK_POLICIES:
            raise ValueError(f"sink={self.sink!r}: expected one of {', '.join(SINK_POLICIES)}")
        if self.frames_per_chunk < 1:
            raise ValueError("frames_per_chunk must be >= 1")
        if self.window_frames < 0 or self.window_frames % self.frames_per_chunk:
            raise ValueError("window_frames must be a non-negative multiple of frames_per_chunk")
        if self.sink != "none":
            if self.sink_frames < 1 or self.sink_frames % self.frames_per_chunk:
                raise ValueError("sink_frames must be a positive multiple of frames_per_chunk")
            if self.window_frames == 0:
                raise ValueError("a sink needs window_frames > 0 (the sink is filled by evicted frames)")
        if self.sink == "ema" and self.sink_frames != self.frames_per_chunk:
            raise ValueError("sink='ema' folds one evicted chunk at a time: sink_frames must equal frames_per_chunk")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError("ema_alpha must lie in [0, 1]")

    @property
    def sink_size(self) -> int:
        """Latent frames reserved for the sink (0 when the policy is 'none')."""
        return 0 if self.sink == "none" else self.sink_frames


@dataclass(frozen=True)
class SamplerConfig:
    # Denoising timesteps on the 0..1000 scale before the shift warp (Self-Forcing's list).
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0  # sigma' = shift * s / (1 + (shift - 1) * s), the Wan/SD3 schedule shift
    num_train_timesteps: int = 1000
    # "renoise": x0 = x - sigma * v, then fresh noise to the next sigma (DMD students);
    # "euler":   x <- x + (sigma_next - sigma) * v (deterministic ODE step).
    mode: str = "renoise"

    def __post_init__(self):
        if not self.timesteps or any(not 0 < t <= self.num_train_timesteps for t in self.timesteps):
            raise ValueError(f"timesteps must lie in (0, {self.num_train_timesteps}]")
        if list(self.timesteps) != sorted(self.timesteps, reverse=True):
            raise ValueError("timesteps must be decreasing")
        if self.mode not in ("renoise", "euler"):
            raise ValueError(f"mode={self.mode!r}: expected 'renoise' or 'euler'")


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        # diffusers derives the strides from these lists; the scale factors must say the same
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("VAEConfig: temperal_downsample needs one entry per downsampling stage "
                             f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1})")
        if self.scale_factor_spatial != 2 ** len(self.temperal_downsample):
            raise ValueError(f"VAEConfig: scale_factor_spatial must be {2 ** len(self.temperal_downsample)}")
        if self.scale_factor_temporal != 2 ** sum(self.temperal_downsample):
            raise ValueError(f"VAEConfig: scale_factor_temporal must be {2 ** sum(self.temperal_downsample)}")

    @property
    def decoder_width(self) -> int:
        """The decoder's base width (diffusers: decoder_base_dim, None meaning base_dim)."""
        return self.decoder_base_dim or self.base_dim

    def diffusers_kwargs(self) -> dict:
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw["dim_mult"], kw["temperal_downsample"] = list(self.dim_mult), list(self.temperal_downsample)
        kw["latents_mean"], kw["latents_std"] = [0.0] * self.z_dim, [1.0] * self.z_dim
        return kw


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    cache: CacheConfig
    sampler: SamplerConfig
    vae: VAEConfig
    height: int  # pixels
    width: int
    fps: int = 16
    text_encoder: str = "shapes"  # shapes | umt5

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.vae.scale_factor_spatial
        return self.height // s, self.width // s

    def sparse_cache(self, topk: float | None = 0.2, linear_memory: bool = False) -> "CacheConfig":
        """This preset's cache with block-sparse window attention (and/or the linear memory). Blocks are at most
        one latent frame's tokens, so that on small grids a chunk still spans several blocks to choose from."""
        return dataclasses.replace(self.cache, sparse_topk=topk, linear_memory=linear_memory,
                                   sparse_block=min(self.cache.sparse_block, self.tokens_per_frame))

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.latent_hw
        _, ph, pw = self.model.patch_size
        return (h // ph) * (w // pw)

    def __post_init__(self):
        h, w = self.latent_hw
        _, ph, pw = self.model.patch_size
        if self.height % self.vae.scale_factor_spatial or self.width % self.vae.scale_factor_spatial:
            raise ValueError(f"{self.width}x{self.height} is not a multiple of the VAE stride")
        if h % ph or w % pw:
            raise ValueError(f"latent {w}x{h} is not a multiple of the patch size {pw}x{ph}")
        if self.model.in_channels != self.vae.z_dim:
            raise ValueError("model.in_channels must equal vae.z_dim")

    def replace(self, **kw) -> "Preset":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, Preset] = {
    # Test size: the widths of diffusers' own Wan test config.
    "tiny": Preset(
        name="tiny",
        model=ModelConfig(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                          text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2),
        cache=CacheConfig(frames_per_chunk=2, window_frames=4, sink="ema", sink_frames=2, ema_alpha=0.9),
        sampler=SamplerConfig(),
        vae=VAEConfig(base_dim=8, decoder_base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
        height=32, width=32,
    ),
    # The built-in Shapes model: 64x64 px, 16 fps, sized to stream faster than real time on a 2-core CPU.
    # The decoder is thin (decoder_base_dim 8) because on the CPU the VAE decode, not the transformer, dominates.
    # The VAE downsamples 4x in space (16x16x8 latents a 4-frame group, 24x compression): at 8x (8x8x8, 96x)
    # shapes of 4-8 px came back as coloured blobs. Patches of 4x4 keep the transformer at 16 tokens a frame.
    "shapes": Preset(
        name="shapes",
        model=ModelConfig(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=64, in_channels=8,
                          out_channels=8, text_dim=128, freq_dim=128, ffn_dim=1024, num_layers=8),
        cache=CacheConfig(frames_per_chunk=3, window_frames=6, sink="ema", sink_frames=3, ema_alpha=0.99),
        sampler=SamplerConfig(),
        vae=VAEConfig(base_dim=16, decoder_base_dim=8, z_dim=8, dim_mult=(1, 2, 2), num_res_blocks=1,
                      temperal_downsample=(True, True), scale_factor_spatial=4),
        height=64, width=64,
    ),
    # Wan2.1-T2V-1.3B widths (anchors §6), 832x480, LongLive/Reward-Forcing style cache.
    "wan2.1-1.3b": Preset(
        name="wan2.1-1.3b",
        model=ModelConfig(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                          text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
        cache=CacheConfig(frames_per_chunk=3, window_frames=6, sink="ema", sink_frames=3, ema_alpha=0.999),
        sampler=SamplerConfig(),
        vae=VAEConfig(),
        height=480, width=832, text_encoder="umt5",
    ),
}


# Candidate successor of `shapes` (issue 3), differing in patches and width: 2x2 patches, so a token covers
# 8x8 px and a frame has 64 tokens, at half the width (2.3 M parameters against 9.1 M). Its teacher reaches a lower
# flow-matching loss per second of CPU than the 4x4-patch one (docs/shapes-training.md); it
# replaces `shapes` once its teacher and student score higher.
PRESETS["shapes-p2"] = PRESETS["shapes"].replace(name="shapes-p2", model=dataclasses.replace(
    PRESETS["shapes"].model, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, ffn_dim=512))


# The built-in model's layout (assets/shapes). It differs from `shapes` in the VAE's temporal compression: 2 frames a
# latent frame instead of 4 (no temporal downsampling in the first stage, as in Wan2.1's own VAE). The 4x VAE draws
# the motion inside a latent group as steps and catches up at the next group (its reconstructions' speed check
# passes about 60% of the time); with 2-frame groups the steps halve. The transformer sees twice the tokens a second.
# The shipped VAE's decoder was then widened to base width 12 (`train_vae --decoder-base-dim 12`, the Makefile's last
# step): its folder's config says so, and loading reads the folder, not this preset.
PRESETS["shapes-t2"] = PRESETS["shapes"].replace(name="shapes-t2", vae=dataclasses.replace(
    PRESETS["shapes"].vae, temperal_downsample=(False, True), scale_factor_temporal=2))

# `shapes-p2`'s transformer on the built-in model's latents (assets/shapes/vae): the layout a GPU run tests next. The
# 4x4-patch teacher draws shape and direction at chance (docs/shapes-training.md, "What the teacher gets wrong"): a
# token there covers 16x16 px, so an object's whole motion across a chunk (1-8 px) lies inside one token, and only the
# output projection of that token's vector can draw it; with 2x2 patches it crosses tokens, which attention moves
# between. A hypothesis: a one-word test on this CPU drew direction at chance from noise with both, and continued a
# real first frame better with 4x4 patches in the same time (same file).
PRESETS["shapes-t2-p2"] = PRESETS["shapes-t2"].replace(name="shapes-t2-p2", model=PRESETS["shapes-p2"].model)

# `shapes-t2-p2` with its width cut into 8 heads of 16 instead of 2 of 64: the same parameters (a 2-head checkpoint
# loads), the same attention FLOPs. RoPE gives each head one preferred offset in (time, row, column), so a head can
# follow a moving object one frame back, not along its whole track. In a world of four prompts that differ in
# direction only, the 2-head teacher (16 heads in all) drew directions unrelated to the prompt and this one (64) the
# asked one, from the same weights and batches (docs/shapes-training.md, "More heads"). In the whole world, trained
# as the 2-head teacher was, it had not yet after 1,215 video steps ("An 8-head teacher in two stages").
PRESETS["shapes-t2-p2h8"] = PRESETS["shapes-t2-p2"].replace(name="shapes-t2-p2h8", model=dataclasses.replace(
    PRESETS["shapes-t2-p2"].model, num_attention_heads=8, attention_head_dim=16))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def preset_from_dict(d: dict) -> Preset:
    """Inverse of `to_dict(preset)` (tuples come back from JSON as lists)."""
    def tup(x):
        return tuple(x) if isinstance(x, list) else x

    def build(cls, sub):
        return cls(**{k: tup(v) for k, v in sub.items()})

    return Preset(name=d["name"], model=build(ModelConfig, d["model"]), cache=build(CacheConfig, d["cache"]),
                  sampler=build(SamplerConfig, d["sampler"]), vae=build(VAEConfig, d["vae"]),
                  height=d["height"], width=d["width"], fps=d.get("fps", 16),
                  text_encoder=d.get("text_encoder", "shapes"))

# A small teacher on the built-in model's latents: the guiding model of autoguidance (distill.teacher.sample's
# `guide`), which steers the shipped teacher away from where a weaker model of the same data errs. Half the width and
# depth of `shapes-t2` (4 blocks, dim 128, 1.3 M parameters against 9.1 M).
PRESETS["shapes-t2-s"] = PRESETS["shapes-t2"].replace(name="shapes-t2-s", model=dataclasses.replace(
    PRESETS["shapes-t2"].model, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, num_layers=4))
