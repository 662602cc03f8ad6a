"""VideoVAE: diffusers' AutoencoderKLWan behind a small API, with a streaming decoder.

Latents seen by the transformer are normalised: z = (mu - latents_mean) / latents_std (Wan convention).
With temporal compression t (`scale_factor_temporal`: 4 in Wan, 2 in the shapes-t2 preset), a video of
T = 1 + 4k frames (Wan's encoder reads 4-frame groups after the first frame) has 1 + (T - 1) / t latent
frames; decoding latent frame 0 gives 1 frame, every later latent frame gives t.

Streaming decode: Wan's decoder is causal in time; each causal conv needs the last 2 frames of its input
from the previous call. diffusers threads those through a flat list (`feat_cache`) and a cursor
(`feat_idx`). `StreamingDecoder` owns one such list per stream, so several streams can share one VAE and
the caller never sees the list. Decoding latent frames one at a time through it equals a full decode
exactly (this is what diffusers' own decode loop does). Relies on diffusers' private decoder signature:
diffusers is pinned in pyproject.toml.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from .config import VAEConfig


class VideoVAE:
    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae.eval().requires_grad_(False)
        c = vae.config
        self.z_dim = c.z_dim
        self.temporal, self.spatial = c.scale_factor_temporal, c.scale_factor_spatial
        self._n_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())

    # ---- construction / storage -------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: VAEConfig, seed: int = 0) -> "VideoVAE":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(AutoencoderKLWan(**cfg.diffusers_kwargs()))

    def config(self) -> VAEConfig:
        """The architecture, read off the diffusers config (the truth for a loaded folder)."""
        c = self.vae.config
        return VAEConfig(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim,
                         dim_mult=tuple(c.dim_mult), num_res_blocks=c.num_res_blocks,
                         temperal_downsample=tuple(c.temperal_downsample),
                         scale_factor_temporal=c.scale_factor_temporal, scale_factor_spatial=c.scale_factor_spatial)

    @classmethod
    def from_folder(cls, path, device="cpu", dtype=torch.float32) -> "VideoVAE":
        from pathlib import Path

        if not (Path(path) / "config.json").is_file():  # else diffusers would take it for a hub id
            raise FileNotFoundError(f"{path}: not a VAE folder (no config.json)")
        return cls(AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True).to(device))

    def save(self, path):
        """Writes diffusers' layout: config.json + diffusion_pytorch_model.safetensors."""
        import json
        from pathlib import Path

        self.vae.save_pretrained(str(path), safe_serialization=True)
        cfg = Path(path) / "config.json"  # a VAE read from a folder would record that folder's local path
        d = json.loads(cfg.read_text())
        if d.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @property
    def device(self):
        return self.vae.post_quant_conv.weight.device

    @property
    def dtype(self):
        return self.vae.post_quant_conv.weight.dtype

    def _stats(self, ref: torch.Tensor):
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    # ---- whole clips ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalised latents [B, z, 1 + (T-1)/t, H/s, W/s]
        (the posterior mean; t, s the temporal and spatial compression)."""
        mu = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mean
        mean, std = self._stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, F, h, w] -> video [B, 3, 1 + t(F-1), H, W] in [-1, 1]."""
        z = z.to(self.device, self.dtype)
        mean, std = self._stats(z)
        return self.vae.decode(z * std + mean).sample

    def stream(self, frames_per_call: int = 1) -> "StreamingDecoder":
        return StreamingDecoder(self, frames_per_call)


class StreamingDecoder:
    """Decodes latent chunks in order; the concatenated output equals `VideoVAE.decode` of the whole clip.

    frames_per_call: latent frames per decoder call (the very first frame always goes alone, as diffusers
    decodes it). 1 is what diffusers does; more gives the GPU larger convolutions (benchmarks/gpu.py times
    both); on a CPU 1 is faster."""

    def __init__(self, vae: VideoVAE, frames_per_call: int = 1):
        if frames_per_call < 1:
            raise ValueError("frames_per_call must be >= 1")
        self.v = vae
        self.frames_per_call = frames_per_call
        self.reset()

    def reset(self):
        self._feat: list = [None] * self.v._n_convs  # per causal conv: its last input frames
        self.latent_frames = 0

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z_dim, F, h, w] (normalised) -> frames [B, 3, T, H, W] in [-1, 1]; T = tF (1 + t(F-1) at start)."""
        vae = self.v.vae
        z = z.to(self.v.device, self.v.dtype)
        mean, std = self.v._stats(z)
        x = vae.post_quant_conv(z * std + mean)  # 1x1x1 conv: per frame
        outs, i = [], 0
        while i < x.shape[2]:
            n = 1 if self.latent_frames == 0 else min(self.frames_per_call, x.shape[2] - i)
            out = vae.decoder(x[:, :, i:i + n], feat_cache=self._feat, feat_idx=[0],
                              first_chunk=self.latent_frames == 0)
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            outs.append(out.clamp(-1.0, 1.0))
            self.latent_frames += n
            i += n
        return torch.cat(outs, dim=2)
