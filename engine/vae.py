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

CPU fast paths (`VideoVAE.fast_cpu`, on by default; each measured against what it replaces in `python -m benchmarks`,
row `engine[native-vae]`). They change no result beyond float rounding (tested):
- `conv3d`: for a float32 convolution with batch 1 and 3-wide kernels, PyTorch takes oneDNN only when
  N*C*D*H > 20480 (`use_mkldnn` in ATen's Convolution.cpp). The rule was written for 2-D inputs (N*C*H*W); on 5-D
  ones it never counts the width, so the Shapes decoder's full-resolution convs (12 channels, 4 frames, 66 rows:
  3,168) go to its slow im2col path, 2.5-4x slower than oneDNN on a 2-core CPU. Here every 3-D conv that PyTorch's
  rule leaves on that path, with a kernel wider than 1 and more than 20480 input elements (the same threshold,
  counting every element), goes to oneDNN, while nothing needs its gradient.
- `channel_rms_norm`: Wan's RMS norm normalises over the channel axis of [B, C, T, H, W] with `F.normalize`, whose
  vector norm over a non-last axis runs 15-20x slower on the CPU than a sum of squares over the same axis.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm, unpatchify

from .config import VAEConfig


ONEDNN_MIN_ELEMENTS = 20480  # PyTorch's size threshold for oneDNN, here counted over the whole input


def torch_picks_onednn(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """PyTorch's own rule for a float32 CPU convolution (`use_mkldnn`, less its clause for 1x1 kernels)."""
    return (groups > 1 or x.shape[0] > 1 or (weight.shape[-1] > 3 and weight.shape[-2] > 3)
            or x.shape[:4].numel() > ONEDNN_MIN_ELEMENTS)


def onednn_wins(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether `conv3d` sends this convolution to oneDNN where PyTorch would not: a float32 CPU conv with a kernel
    wider than 1x1x1 and more than ONEDNN_MIN_ELEMENTS input elements (measured: below it, or for 1x1x1 kernels,
    PyTorch's own path is as fast or faster), whose gradient nothing needs (inference only). Where PyTorch picks
    oneDNN itself (a batch, say), its own call is left alone: it was faster than this one (VAE encoding, batch 8)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 5
            and tuple(weight.shape[2:]) != (1, 1, 1) and x.numel() > ONEDNN_MIN_ELEMENTS
            and not torch_picks_onednn(x, weight, groups)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


# An op of its own, so that torch.compile keeps the oneDNN call (as an opaque kernel between the ones it fuses):
# dynamo cannot trace aten's mkldnn_convolution itself on its fake tensors, and without it Inductor's decoder ran a
# chunk in 115-136 ms against 74-78 with it (2-core CPU, 2026-11-28).
@torch.library.custom_op("streamgen::onednn_conv3d", mutates_args=())
def onednn_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, padding, stride, dilation,
                                             groups)


@onednn_conv3d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(3)]
    return x.new_empty((x.shape[0], weight.shape[0], *size))  # contiguous, as oneDNN returns it


def conv3d(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1):
    """F.conv3d (zero padding), through oneDNN where `onednn_wins` (the module doc says why)."""
    if onednn_wins(x, weight, groups):
        return onednn_conv3d(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def channel_rms_norm(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize(x, dim=1): x / max(||x||_2 over the channels, eps), as a sum of squares (the module doc says why)."""
    return x / x.square().sum(1, keepdim=True).sqrt().clamp_min(eps)


def _conv_forward(conv: nn.Conv3d, owner: "VideoVAE", x, weight, bias):
    if not owner.fast_cpu:
        return nn.Conv3d._conv_forward(conv, x, weight, bias)  # the class's own, as diffusers runs it
    return conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _norm_forward(norm: WanRMS_norm, owner: "VideoVAE", x):
    if not (owner.fast_cpu and norm.channel_first and x.device.type == "cpu" and x.dtype == torch.float32):
        return WanRMS_norm.forward(norm, x)
    return channel_rms_norm(x) * norm.scale * norm.gamma + norm.bias


class VideoVAE:
    def __init__(self, vae: AutoencoderKLWan, fast_cpu: bool = True):
        self.vae = vae.eval().requires_grad_(False)
        c = vae.config
        self.z_dim = c.z_dim
        self.temporal, self.spatial = c.scale_factor_temporal, c.scale_factor_spatial
        self._n_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.fast_cpu = fast_cpu  # the CPU fast paths of the module doc; False: diffusers' modules as they are
        for m in vae.modules():  # instance attributes: they shadow the class's methods for this VAE only
            if isinstance(m, nn.Conv3d) and m.padding_mode == "zeros":
                m._conv_forward = functools.partial(_conv_forward, m, self)
            elif isinstance(m, WanRMS_norm):
                m.forward = functools.partial(_norm_forward, m, self)

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

    def stream(self, frames_per_call: int | None = 1) -> "StreamingDecoder":
        return StreamingDecoder(self, frames_per_call)


class StreamingDecoder:
    """Decodes latent chunks in order; the concatenated output equals `VideoVAE.decode` of the whole clip.

    frames_per_call: latent frames per decoder call (the very first frame always goes alone, as diffusers
    decodes it); None: all the frames of a `decode` call in one decoder call (the engine's choice: a chunk). 1 is
    what diffusers does, and equals its full decode exactly; other groupings reorder float sums (rounding only).
    Larger calls are faster: a chunk of 3 latent frames decodes in 0.7x the time of 3 calls on a 2-core CPU (with
    `fast_cpu`) and 0.9x on an H200 (benchmarks/gpu.py, `fpc3`)."""

    def __init__(self, vae: VideoVAE, frames_per_call: int | None = 1):
        if frames_per_call is not None and frames_per_call < 1:
            raise ValueError("frames_per_call must be >= 1 (or None: a call's frames at once)")
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
            n = 1 if self.latent_frames == 0 else min(self.frames_per_call or x.shape[2], x.shape[2] - i)
            out = vae.decoder(x[:, :, i:i + n], feat_cache=self._feat, feat_idx=[0],
                              first_chunk=self.latent_frames == 0)
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            outs.append(out.clamp(-1.0, 1.0))
            self.latent_frames += n
            i += n
        return torch.cat(outs, dim=2)
