"""Train the Shapes VAE: a small diffusers `AutoencoderKLWan` on rendered Shapes clips.

    python -m distill.train_vae --out runs/vae --steps 1500            # train (resumes if runs/vae exists)
    python -m distill.train_vae --out runs/vae --export assets/shapes/vae   # latent stats + diffusers folder

Loss: L1 + MSE on pixels of a posterior sample's reconstruction, plus a small KL so the latent stays smooth
enough to diffuse. The export measures per-channel latent mean/std and writes them into the config
(`latents_mean` / `latents_std`, Wan's convention), so the transformer sees unit-scale latents.
Runs under torchrun like every trainer here (see distill/trainer.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from engine.config import get_preset
from engine.vae import VideoVAE

from .data import ShapesClips
from .trainer import Trainer, add_train_args, config_from_args, load_weights, setup_distributed


class VAEWithLoss(nn.Module):
    """forward(video, gen) -> (reconstruction, kl per element): one module so DDP sees every parameter."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, gen: torch.Generator):
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, dtype=x.dtype).to(x.device)
        rec = self.vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        return rec, kl


class VAETask:
    def __init__(self, clips: ShapesClips, kl_weight: float, device):
        self.clips, self.kl_weight, self.device = clips, kl_weight, device

    def batch(self, ids):
        return self.clips.videos(ids)[1]

    def loss(self, model, video, gen):
        video = video.to(self.device)
        rec, kl = model(video, gen)
        l1, mse = F.l1_loss(rec, video), F.mse_loss(rec, video)
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))  # signal range 2 -> peak^2 = 4
        return l1 + mse + self.kl_weight * kl, {"l1": l1.item(), "psnr": psnr, "kl": kl.item()}


@torch.no_grad()
def latent_stats(vae: VideoVAE, clips: ShapesClips, count: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the posterior means over `count` clips."""
    mus = [vae.vae.encode(clips.videos(range(i, i + 8))[1]).latent_dist.mean for i in range(0, count, 8)]
    mu = torch.cat(mus).transpose(0, 1).flatten(1)  # [z, N]
    return mu.mean(1).tolist(), mu.std(1).tolist()


def export(run: Path, out: Path, preset: str, clips: ShapesClips) -> VideoVAE:
    cfg = get_preset(preset).vae
    state = {k.removeprefix("vae."): v for k, v in load_weights(run, "ema").items()}
    vae = VideoVAE.from_config(cfg)
    vae.vae.load_state_dict(state, strict=True)
    mean, std = latent_stats(vae, clips)
    vae.vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save(out)
    return VideoVAE.from_folder(out)


@torch.no_grad()
def evaluate(vae: VideoVAE, clips: ShapesClips, count: int = 32) -> dict:
    """Reconstruction PSNR (dB, on uint8 frames) and oracle adherence of originals vs reconstructions."""
    from benchmarks.oracle import adherence

    from .data import to_uint8

    orig, recs, mses = [], [], []
    for i in range(0, count, 8):
        prompts, video = clips.videos(range(i, min(count, i + 8)))
        rec = vae.decode(vae.encode(video))
        a, b = to_uint8(video), to_uint8(rec)
        mses.append(((a.astype("float64") - b) ** 2).mean(axis=(1, 2, 3, 4)))
        orig += list(zip(a, prompts))
        recs += list(zip(b, prompts))
    mse = float(sum(m.sum() for m in mses) / count)
    return {"psnr_db": 10 * math.log10(255.0**2 / max(mse, 1e-12)), "clips": count,
            "oracle_original": adherence(orig), "oracle_reconstruction": adherence(recs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.train_vae", description=__doc__.split("\n")[0])
    add_train_args(p, steps=1500, batch_size=4, lr=1e-3, warmup=50, ckpt_every=100, ema=0.995, out="runs/vae")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--frames", type=int, default=17, help="frames per training clip (1 + 4k)")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--export", metavar="DIR", help="write the trained VAE (diffusers folder with latent stats)")
    p.add_argument("--eval", type=int, default=32, metavar="N", help="clips to evaluate after --export")
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    if (args.frames - 1) % 4:
        p.error("--frames must be 1 + 4k")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clips = ShapesClips(preset.width, preset.height, args.frames, seed=args.seed)
    if args.export:
        vae = export(Path(args.out), Path(args.export), args.preset, clips)
        held_out = ShapesClips(preset.width, preset.height, 33, seed=10_000 + args.seed)
        print(json.dumps(evaluate(vae, held_out, args.eval)))
        return 0
    rank, world, device = setup_distributed()
    model = VAEWithLoss(AutoencoderKLWan(**preset.vae.diffusers_kwargs())).to(device)
    trainer = Trainer(model, VAETask(clips, args.kl_weight, device), config_from_args(args), args.out,
                      device=device, resume=not args.no_resume, quiet=args.quiet)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
