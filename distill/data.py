"""Shapes training data: seeded clips rendered on the fly, and cached VAE latents for the diffusion stages.

Clip `i` of a `ShapesClips` is a pure function of (seed, i): the trainers' exact-resume contract (the data of
a step depends on its sample ids only) holds with no data-loader state to save.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .shapes import Scene, sample_spec


@dataclass(frozen=True)
class ShapesClips:
    width: int = 64
    height: int = 64
    num_frames: int = 45  # 1 + 4k: the VAE's causal framing
    two_objects: float = 0.3
    seed: int = 0

    def clip(self, i: int) -> tuple[str, np.ndarray]:
        """(prompt, frames uint8 [T, H, W, 3]) of clip i."""
        rng = random.Random(f"{self.seed}/{i}")
        spec = sample_spec(rng, self.two_objects)
        scene = Scene.sample(spec, self.width, self.height, seed=rng.randrange(2**31))
        start = rng.randrange(10_000)  # anywhere in an endless stream, not only its first frames
        return spec.text(), scene.render(self.num_frames, start=start)

    def videos(self, ids) -> tuple[list[str], torch.Tensor]:
        """Prompts and a batch [B, 3, T, H, W] float32 in [-1, 1]."""
        prompts, frames = zip(*(self.clip(int(i)) for i in ids))
        return list(prompts), to_tensor(np.stack(frames))


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., T, H, W, 3] -> float32 [..., 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -4)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3]."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).cpu().numpy()


# ---- cached latents -----------------------------------------------------------------------------------


@torch.no_grad()
def encode_clips(vae, clips: ShapesClips, count: int, out: str | Path, batch: int = 8, quiet: bool = False,
                 workers: int = 0) -> Path:
    """Encodes clips 0..count-1 with `vae` (a VideoVAE: normalised latents) into one safetensors file (fp16).
    workers > 0 renders in that many processes (on a GPU host the renderer, not the encoder, is the slow part);
    the file is the same either way."""
    out = Path(out)
    lat, prompts = [], []
    groups = [range(s, min(count, s + batch)) for s in range(0, count, batch)]
    loader = torch.utils.data.DataLoader(groups, batch_size=None, num_workers=workers, collate_fn=clips.videos)
    for p, video in tqdm(loader, desc="encode latents", unit="batch", disable=quiet):
        lat.append(vae.encode(video).half().cpu())
        prompts += p
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    meta = {"prompts": json.dumps(prompts), "clips": json.dumps(clips.__dict__)}
    save_file({"latents": torch.cat(lat)}, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


class LatentSet:
    """Cached latents [N, z, F, h, w] (float32 on load) with their prompts."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no latent cache "
                                    "(python -m distill.train_teacher --vae DIR --latents PATH makes it)")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        self.latents = load_file(str(path))["latents"].float()
        self.prompts: list[str] = json.loads(meta["prompts"])
        self.clips = ShapesClips(**json.loads(meta["clips"]))

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, ids) -> tuple[list[str], torch.Tensor]:
        idx = [int(i) % len(self) for i in ids]
        return [self.prompts[i] for i in idx], self.latents[idx]
