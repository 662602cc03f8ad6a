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

from .shapes import MOTIONS, OBJECT_COLOURS, SHAPES, SIZES, SPEEDS, Scene, sample_spec


@dataclass(frozen=True)
class ShapesClips:
    width: int = 64
    height: int = 64
    num_frames: int = 45  # 1 + 4k: the VAE's causal framing
    two_objects: float = 0.3
    seed: int = 0

    def scene(self, i: int) -> tuple[Scene, int]:
        """Clip i's scene and its first frame's index in the scene's endless stream."""
        rng = random.Random(f"{self.seed}/{i}")
        spec = sample_spec(rng, self.two_objects)
        scene = Scene.sample(spec, self.width, self.height, seed=rng.randrange(2**31))
        return scene, rng.randrange(10_000)  # anywhere in an endless stream, not only its first frames

    def clip(self, i: int) -> tuple[str, np.ndarray]:
        """(prompt, frames uint8 [T, H, W, 3]) of clip i."""
        scene, start = self.scene(i)
        return scene.spec.text(), scene.render(self.num_frames, start=start)

    def videos(self, ids) -> tuple[list[str], torch.Tensor]:
        """Prompts and a batch [B, 3, T, H, W] float32 in [-1, 1]."""
        prompts, frames = zip(*(self.clip(int(i)) for i in ids))
        return list(prompts), to_tensor(np.stack(frames))


# What each object is, for `layout_targets`: one-hots of its words, then its velocity (in units of the fastest speed)
# and a 1 (so that the first feature of a token is how much of it the objects cover).
_WORDS = (tuple(OBJECT_COLOURS), SHAPES, tuple(SIZES), MOTIONS, tuple(SPEEDS))
LAYOUT_FEATURES = 1 + sum(len(w) for w in _WORDS) + 2


def _object_features(body, m: int) -> np.ndarray:
    o = body.spec
    hot = [np.eye(len(w), dtype=np.float32)[w.index(v)] for w, v in zip(_WORDS, (o.colour, o.shape, o.size, o.motion,
                                                                                   o.speed))]
    vel = np.array([body.vx, body.vy], dtype=np.float32) / (max(SPEEDS.values()) * m)
    return np.concatenate([np.ones(1, np.float32), *hot, vel])


def layout_targets(clips: ShapesClips, ids, latent_frames: int, temporal: int, grid: tuple[int, int]) -> torch.Tensor:
    """What the renderer knows about each transformer token of each clip: [B, latent_frames, gh, gw,
    LAYOUT_FEATURES], the sum over objects of (the fraction of the token's pixels and frames the object covers) x
    (the object's features: 1, one-hots of its colour, shape, size, motion and speed words, its velocity). Latent
    frame 0 stands for video frame 0 and latent frame k > 0 for frames t (k - 1) + 1 .. t k (the causal VAE's
    framing), a token for an H / gh x W / gw block of pixels. A target for an auxiliary head on the teacher's
    hidden states: where each object is and what it is, which the flow-matching loss rewards only faintly."""
    gh, gw = grid
    out = np.zeros((len(ids), latent_frames, gh, gw, LAYOUT_FEATURES), np.float32)
    frames = 1 + temporal * (latent_frames - 1)
    for b, i in enumerate(ids):
        scene, start = clips.scene(int(i))
        cover = scene.coverage(frames, start, supersample=1)  # [objects, T, H, W]
        n, T, H, W = cover.shape
        first, rest = cover[:, :1], cover[:, 1:].reshape(n, latent_frames - 1, temporal, H, W).mean(axis=2)
        cover = np.concatenate([first, rest], axis=1)  # [objects, latent_frames, H, W]
        cover = cover.reshape(n, latent_frames, gh, H // gh, gw, W // gw).mean(axis=(3, 5))
        for body, c in zip(scene.bodies, cover):
            out[b] += c[..., None] * _object_features(body, min(H, W))
    return torch.from_numpy(out)


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

    @property
    def temporal(self) -> int:
        """Video frames per latent frame after the first (the VAE's temporal compression)."""
        return (self.clips.num_frames - 1) // max(1, self.latents.shape[2] - 1)

    def get(self, ids) -> tuple[list[str], torch.Tensor]:
        idx = [int(i) % len(self) for i in ids]
        return [self.prompts[i] for i in idx], self.latents[idx]
