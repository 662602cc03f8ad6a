"""PreviewDecoder: a tiny, fast decoder from the engine's latents to frames, for live previews.

The full decoder is the Wan VAE's (engine/vae.py): causal 3D convolutions and an attention block, 41% of a chunk's
time at Wan2.1-1.3B size on an H200. This one is the design of TAEHV (madebyollin/taehv, "Tiny AutoEncoder for
Hunyuan Video", whose `taew2_1` weights decode Wan2.1 latents): per-frame 2D convolutions, where each memory block
also reads its own input of the previous time step (the only mixing in time), nearest-neighbour upsampling in
space, and 1x1 "time grow" convolutions that split one frame into several. It is cheaper and less faithful; the
benchmark reports both its speed and its oracle score.

    decoder indices (taehv's, so its weight files load as they are; `blocks` = 3):
      0 clamp   1 conv(z -> c0)   2 relu
      3..5 memory blocks (c0)  6 upsample  7 time grow  8 conv(c0 -> c1)
      9..11 memory blocks (c1) 12 upsample 13 time grow 14 conv(c1 -> c2)
      15..17 memory blocks (c2) 18 upsample 19 time grow 20 conv(c2 -> c3)
      21 relu   22 conv(c3 -> 3 p^2), then a pixel shuffle by p

It reads the same normalised latents as the transformer makes (no latent mean / std), and works in [0, 1] inside;
decode() returns [-1, 1] like VideoVAE. F latent frames make tF frames (t the time upscale), of which the first
t - 1 are dropped: 1 + t(F - 1), the Wan VAE's causal framing.

Streaming: a memory block's only state is its last input frame, so a chunk of latent frames is decoded in one
batched pass with that state carried from the previous chunk. Chunk by chunk equals the whole clip at once
(tests/test_preview.py, against a frame-at-a-time reference).

    python -m distill.train_preview --out runs/preview --steps 800     # train one for the Shapes model
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass(frozen=True)
class PreviewConfig:
    z_dim: int = 16                                     # latent channels (Wan2.1: 16)
    channels: tuple[int, ...] = (256, 128, 64, 64)      # c0..c3 above (taew2_1's)
    blocks: int = 3                                     # memory blocks per stage
    space_upscale: tuple[bool, ...] = (True, True, True)  # x2 after each stage
    time_upscale: tuple[bool, ...] = (False, True, True)  # x2 frames after each stage
    patch_size: int = 1                                 # final pixel shuffle

    def __post_init__(self):
        if len(self.channels) != 4 or len(self.space_upscale) != 3 or len(self.time_upscale) != 3:
            raise ValueError("PreviewConfig: 4 channel widths and 3 stages of space / time upscaling")
        if self.blocks < 1 or self.patch_size < 1 or min(self.channels) < 1:
            raise ValueError("PreviewConfig: blocks, patch_size and channels must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> "PreviewConfig":
        """From its JSON form (lists for the tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def spatial(self) -> int:
        return 2 ** sum(self.space_upscale) * self.patch_size

    @property
    def temporal(self) -> int:
        return 2 ** sum(self.time_upscale)

    @classmethod
    def for_vae(cls, vae_cfg, channels=(32, 32, 16, 16), blocks: int = 2) -> "PreviewConfig":
        """A preview decoder for a VAEConfig's latents: its spatial and temporal factors, upscaling late (the
        cheap end of the network works at the latent size as long as it can)."""
        s, t = vae_cfg.scale_factor_spatial.bit_length() - 1, vae_cfg.scale_factor_temporal.bit_length() - 1
        if not (0 <= s <= 3 and 0 <= t <= 3 and 2 ** s == vae_cfg.scale_factor_spatial
                and 2 ** t == vae_cfg.scale_factor_temporal):
            raise ValueError(f"no preview layout for spatial x{vae_cfg.scale_factor_spatial}, "
                             f"temporal x{vae_cfg.scale_factor_temporal}")
        late = lambda n: tuple(i >= 3 - n for i in range(3))  # noqa: E731
        return cls(z_dim=vae_cfg.z_dim, channels=tuple(channels), blocks=blocks, space_upscale=late(s),
                   time_upscale=late(t))


class Clamp(nn.Module):
    """Soft clamp of the latents to about +-3."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Three 3x3 convs over [this frame's input, the previous frame's input], plus a residual."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(n, n, 3, padding=1))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TGrow(nn.Module):
    """[N, C, H, W] -> [N * stride, C, H, W]: each frame becomes `stride` consecutive frames (1x1 conv)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        N, C, H, W = x.shape
        return self.conv(x).reshape(N * self.stride, C, H, W)


class PreviewDecoder(nn.Module):
    def __init__(self, cfg: PreviewConfig = PreviewConfig()):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        layers: list[nn.Module] = [Clamp(), nn.Conv2d(cfg.z_dim, c[0], 3, padding=1), nn.ReLU()]
        for i in range(3):
            layers += [MemBlock(c[i]) for _ in range(cfg.blocks)]
            layers += [nn.Upsample(scale_factor=2) if cfg.space_upscale[i] else nn.Identity(),
                       TGrow(c[i], 2 if cfg.time_upscale[i] else 1), nn.Conv2d(c[i], c[i + 1], 3, padding=1, bias=False)]
        layers += [nn.ReLU(), nn.Conv2d(c[3], 3 * cfg.patch_size ** 2, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    @property
    def device(self):
        return self.decoder[1].weight.device

    @property
    def dtype(self):
        return self.decoder[1].weight.dtype

    def run(self, z: torch.Tensor, memory: list | None = None) -> torch.Tensor:
        """z [B, F, z_dim, h, w] -> frames [B, tF, 3, H, W] in [0, 1], all F in one batched pass per layer.
        memory: one entry per memory block, its input at the previous time step [B, 1, C, h', w'] (None: zeros,
        a stream's start); updated in place. Gradients flow (training uses this)."""
        B, T = z.shape[:2]
        x = z.flatten(0, 1)
        m = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                xt = x.unflatten(0, (B, T))
                prev = memory[m] if memory is not None and memory[m] is not None else torch.zeros_like(xt[:, :1])
                past = torch.cat([prev, xt[:, :-1]], 1).flatten(0, 1)
                if memory is not None:
                    memory[m] = xt[:, -1:].detach()
                m += 1
                x = layer(x, past)
            else:
                x = layer(x)
                if isinstance(layer, TGrow):
                    T *= layer.stride
        x = F.pixel_shuffle(x, self.cfg.patch_size) if self.cfg.patch_size > 1 else x
        return x.clamp(0, 1).unflatten(0, (B, T))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z_dim, F, h, w] -> video [B, 3, 1 + t(F - 1), H, W] in [-1, 1] (differentiable)."""
        y = self.run(z.movedim(2, 1).to(self.dtype))[:, self.cfg.temporal - 1:]
        return y.movedim(1, 2) * 2 - 1

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self(z.to(self.device))

    def stream(self, frames_per_call: int | None = 1) -> "StreamingPreview":
        """A streaming decoder (frames_per_call is the VAE's option: this one always takes a chunk at once)."""
        return StreamingPreview(self)

    # ---- storage ----------------------------------------------------------------------------------

    def save(self, folder: str | Path, dtype=None):
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG).write_text(json.dumps({"format": "preview-decoder", **asdict(self.cfg)}, indent=2) + "\n")
        sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(folder / WEIGHTS))

    @classmethod
    def from_folder(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "PreviewDecoder":
        from .folder import ModelLoadError, _json, load_state

        folder = Path(folder)
        d = _json(folder / CONFIG)
        if d.pop("format", None) != "preview-decoder":
            raise ModelLoadError(f"{folder / CONFIG}: not a preview decoder")
        try:
            cfg = PreviewConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{folder / CONFIG}: {e}") from None
        model = cls(cfg)
        load_state(model, folder / WEIGHTS)
        return model.to(device, dtype).eval().requires_grad_(False)

    @classmethod
    def from_taehv(cls, file: str | Path, device="cpu", dtype=torch.float32,
                   space_upscale: tuple[bool, ...] = (True, True, True)) -> "PreviewDecoder":
        """TAEHV's weights (e.g. taew2_1.safetensors or .pth; the encoder's are ignored). The widths, block count,
        time upscaling and patch size are read off the tensors; space upscaling has no weights, so it is given."""
        from .folder import ModelLoadError, check_keys

        file = Path(file)
        sd = {k.removeprefix("decoder."): v for k, v in _read_weights(file).items() if k.startswith("decoder.")}
        grows = sorted(int(k.split(".")[0]) for k, v in sd.items() if k.endswith("conv.weight") and v.dim() == 4
                       and v.shape[2:] == (1, 1) and k.count(".") == 2)
        if len(grows) != 3 or "1.weight" not in sd:
            raise ModelLoadError(f"{file}: not a TAEHV decoder (expected decoder.1.weight and 3 time-grow convs)")
        c = [sd[f"{i}.conv.weight"].shape[1] for i in grows] + [sd[f"{grows[2] + 1}.weight"].shape[0]]
        last = sd.get(f"{grows[2] + 3}.weight")
        if last is None:
            raise ModelLoadError(f"{file}: missing key decoder.{grows[2] + 3}.weight")
        try:
            cfg = PreviewConfig(z_dim=sd["1.weight"].shape[1], channels=tuple(c), blocks=grows[0] - 4,
                                space_upscale=tuple(space_upscale),
                                time_upscale=tuple(sd[f"{i}.conv.weight"].shape[0] == 2 * sd[f"{i}.conv.weight"].shape[1]
                                                   for i in grows),
                                patch_size=round((last.shape[0] / 3) ** 0.5))
        except ValueError as e:
            raise ModelLoadError(f"{file}: {e}") from None
        model = cls(cfg)
        want = {k.removeprefix("decoder."): v for k, v in model.state_dict().items()}
        check_keys(file, {f"decoder.{k}": v for k, v in want.items()}, {f"decoder.{k}": v for k, v in sd.items()})
        model.decoder.load_state_dict({k: v for k, v in sd.items() if k in want}, strict=True)
        return model.to(device, dtype).eval().requires_grad_(False)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a .pth read with weights_only=True (never unpickling arbitrary objects)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .folder import ModelLoadError

    if not file.is_file():
        raise ModelLoadError(f"missing {file}")
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise ModelLoadError(f"corrupt or truncated weights {file}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ModelLoadError(f"{file}: expected a flat dict of tensors")
    return sd


def load_preview(path: str | Path, device="cpu", dtype=torch.float32) -> PreviewDecoder:
    """A preview decoder folder (config.json + model.safetensors), or a TAEHV weight file."""
    p = Path(path)
    return PreviewDecoder.from_folder(p, device, dtype) if p.is_dir() else PreviewDecoder.from_taehv(p, device, dtype)


class StreamingPreview:
    """Decodes latent chunks in order, as engine/vae.py StreamingDecoder does: the concatenated output equals
    PreviewDecoder.decode of the whole clip."""

    def __init__(self, model: PreviewDecoder):
        self.m = model
        self.reset()

    def reset(self):
        self.memory: list = [None] * (3 * self.m.cfg.blocks)
        self.to_drop = self.m.cfg.temporal - 1  # the causal framing's first frames

    # ---- sessions batched together (server/batching.py): the state is the memory, stacked along batch ----

    def phase(self) -> tuple:
        """Streams with equal phases can decode as one batch."""
        return self.to_drop, tuple(None if m is None else tuple(m.shape[1:]) for m in self.memory)

    @staticmethod
    def merge(streams: list["StreamingPreview"]) -> "StreamingPreview":
        merged = StreamingPreview(streams[0].m)
        merged.to_drop = streams[0].to_drop
        merged.memory = [None if ms[0] is None else torch.cat(ms) for ms in zip(*(s.memory for s in streams))]
        return merged

    def split(self, streams: list["StreamingPreview"]):
        """Write this merged stream's state back into `streams` (each its own copy)."""
        for i, s in enumerate(streams):
            s.memory = [None if m is None else m[i:i + 1].clone() for m in self.memory]
            s.to_drop = self.to_drop

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z_dim, F, h, w] (normalised) -> frames [B, 3, T, H, W] in [-1, 1]; T = tF (1 + t(F-1) at start)."""
        y = self.m.run(z.to(self.m.device, self.m.dtype).movedim(2, 1), self.memory)
        y, self.to_drop = y[:, self.to_drop:], max(0, self.to_drop - y.shape[1])
        return y.movedim(1, 2) * 2 - 1
