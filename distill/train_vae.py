"""Train the Shapes VAE: a small diffusers `AutoencoderKLWan` on rendered Shapes clips.

    python -m distill.train_vae --out runs/vae                          # train (resumes if runs/vae exists)
    python -m distill.train_vae --out runs/vae --export assets/shapes/vae   # latent stats + diffusers folder
    python -m distill.train_vae --out runs/vae-dec --init assets/shapes/vae --freeze-encoder   # decoder only

Loss: L1 + MSE on pixels of the reconstruction of the posterior mean, weighted towards the objects, plus a
small KL that keeps the latent's scale in check. What it took to train (the recipe in the Makefile's `assets`):
- From scratch, learning rates of 5e-4 and up collapse this small VAE into a decoder that ignores its latent
  and outputs the mean colour; 2e-4 escapes that within ~200 steps, and a trained VAE then takes 5e-4 to 8e-4.
- Clip lengths mixed per batch (9/17/33): trained on one short length, the causal conv caches drift beyond it.
- Scene cuts (`--p-cut`): without them the decoder redraws frame 0 from its caches and ignores every later
  latent, so objects freeze where they started (replacing latents 1.. by latent 0 changed the output by 0.005).
The export measures per-channel latent mean/std and writes them into the config (`latents_mean` /
`latents_std`, Wan's convention), so the transformer sees unit-scale latents. `--freeze-encoder` fine-tunes
the decoder alone, so latents already encoded for a teacher stay valid. Runs under torchrun like every trainer
here (see distill/trainer.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from engine.cli import OneLineParser, one_line_errors
from engine.config import VAEConfig, get_preset
from engine.vae import VideoVAE

from .data import ShapesClips, to_tensor
from .trainer import Trainer, add_train_args, config_from_args, load_weights, setup_distributed


class VAEWithLoss(nn.Module):
    """forward(video, gen) -> (reconstruction, kl per element): one module so DDP sees every parameter.

    noise: scale of the posterior sample's noise (1 = a plain VAE). At initialisation the encoder's means are
    tiny next to unit posterior noise and the decoder learns to ignore the latent (it outputs the mean colour),
    so the default decodes the posterior mean; the KL term still keeps the latent's scale in check.
    """

    def __init__(self, vae: AutoencoderKLWan, noise: float = 0.0):
        super().__init__()
        self.vae, self.noise = vae, noise

    def forward(self, x: torch.Tensor, gen: torch.Generator):
        post = self.vae.encode(x).latent_dist
        z = post.mean
        if self.noise:
            z = z + self.noise * post.std * torch.randn(post.mean.shape, generator=gen, dtype=x.dtype).to(x.device)
        rec = self.vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        return rec, kl


class VAETask:
    """Pixel loss weighted towards the objects: they cover a few percent of a frame, and an unweighted loss is
    content with a blurred background colour long before the shapes are sharp."""

    def __init__(self, clips: ShapesClips, kl_weight: float, device, object_weight: float = 10.0,
                 lengths: tuple[int, ...] = (), p_cut: float = 0.0, motion_weight: float = 0.0,
                 halo_weight: float = 0.0, halo_px: int = 3):
        self.clips, self.kl_weight, self.device, self.object_weight = clips, kl_weight, device, object_weight
        self.lengths, self.p_cut, self.motion_weight = lengths, p_cut, motion_weight
        self.halo_weight, self.halo_px = halo_weight, halo_px

    def batch(self, ids):
        """Clips of `clips.num_frames` frames; with `lengths`, each batch draws one of those lengths (from its
        first id, so it stays a pure function of the ids) and keeps the frame count per batch about constant:
        the causal conv caches must stay stable over more latent frames than one short clip has."""
        if not self.lengths:
            return self.cut(self.clips.videos(ids)[1], ids)
        n = self.lengths[int(ids[0]) // len(ids) % len(self.lengths)]
        keep = max(1, len(ids) * self.clips.num_frames // n)
        return self.cut(dataclasses.replace(self.clips, num_frames=n).videos(ids[:keep])[1], ids)

    def cut(self, video: torch.Tensor, ids) -> torch.Tensor:
        """Scene cuts: with probability p_cut a clip continues, from a latent-group boundary (frame 1 + 4k) on,
        with the next clip of the batch. Without them the decoder learns to redraw frame 0 from its causal
        caches and ignores every later latent (objects freeze where they started); after a cut only the later
        latents know the picture. Streams cut like this too, at prompt switches."""
        B, _, T = video.shape[:3]
        if not self.p_cut or B < 2 or T < 5:
            return video
        g = torch.Generator().manual_seed(int(ids[0]) * 7919 + 17)
        out = video.clone()
        for b in range(B):
            if torch.rand((), generator=g) < self.p_cut:
                c = 1 + 4 * int(torch.randint(0, (T - 1) // 4, (), generator=g))
                out[b, :, c:] = video[(b + 1) % B, :, c:]
        return out

    def weights(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, H, W]: 1 on the background (each frame's median colour), 1 + object_weight on objects, and
        1 + halo_weight on the background within halo_px pixels of an object. A blurred or ringing edge costs
        little under the plain weights (a few background pixels), but it is what makes the oracle read a small
        shape as medium: its region is every pixel more than 30 levels from the background."""
        bg = video.flatten(3).median(dim=3).values[..., None, None]
        obj = (video - bg).abs().amax(dim=1, keepdim=True) > 0.1
        w = 1.0 + self.object_weight * obj.float()
        if self.halo_weight:
            r = self.halo_px
            near = F.max_pool3d(obj.float(), (1, 2 * r + 1, 2 * r + 1), stride=1, padding=(0, r, r)) > 0
            w = w + self.halo_weight * (near & ~obj).float()
        return w

    def loss(self, model, video, gen):
        video = video.to(self.device)
        rec, kl = model(video, gen)
        return self.pixel_loss(rec, kl, video)

    def pixel_loss(self, rec: torch.Tensor, kl: torch.Tensor, video: torch.Tensor):
        """(loss, logs) of a reconstruction rec of video, both [B, 3, T, H, W] in [-1, 1]; kl the model's term."""
        w = self.weights(video)
        err = rec - video
        l1 = (w * err.abs()).mean() / w.mean()
        wmse = (w * err.pow(2)).mean() / w.mean()
        psnr = 10 * math.log10(4.0 / max(err.pow(2).mean().item(), 1e-12))  # signal range 2 -> peak^2 = 4
        logs = {"l1": l1.item(), "psnr": psnr, "kl": kl.item()}
        loss = l1 + wmse + self.kl_weight * kl
        if self.motion_weight:
            # frame-to-frame change of the reconstruction vs the original's, where either frame has an object.
            # A decoder unsure of the motion inside a 4-frame latent group draws the object near the group's
            # mean position and jumps at the next group (steppy motion, measured as too slow); pixel losses
            # punish that weakly, this term directly.
            wt = torch.maximum(w[:, :, 1:], w[:, :, :-1])
            mot = (wt * (err[:, :, 1:] - err[:, :, :-1]).abs()).mean() / wt.mean()
            loss = loss + self.motion_weight * mot
            logs["motion"] = mot.item()
        return loss, logs


def load_matching(model: nn.Module, state: dict) -> list[str]:
    """Loads every tensor of `state` whose name and shape `model` has (e.g. a VAE with another temporal
    compression: only its time convs differ); returns the names of `model`'s tensors left as they were."""
    own = model.state_dict()
    hit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(hit, strict=False)
    return [k for k in own if k not in hit]


@torch.no_grad()
def widen_decoder(vae: AutoencoderKLWan, old: dict, scale: float = 0.1) -> list[str]:
    """Loads a narrower decoder's tensors (`old`, a VAE state dict) into `vae`'s wider decoder so that it
    decodes (nearly) as the narrow one did; returns the names of the decoder's tensors that were widened.

    Every tensor's old values go into its leading slice (per group where a tensor stacks several: to_qkv's
    q, k, v rows, and an upsampler's time_conv, whose rows are the two frames' channels). The new channels read
    the old ones through `scale` x their fresh initialisation, and nothing reads them yet (their columns start
    at zero), so they begin small and learn. Tensors `old` lacks are left as they are. Two corrections keep the
    function: Wan's RMS norm multiplies by sqrt(channels), so every gamma is scaled by sqrt(old / new); attention
    divides q.k by sqrt(channels), so the old q rows are scaled by sqrt(new / old). With scale 0 the wide decoder
    equals the narrow one exactly (tested)."""
    own = vae.decoder.state_dict()
    widened = []
    for name, new in own.items():
        src = old.get("decoder." + name)
        if src is None or src.shape == new.shape:  # absent: stays fresh; same shape: load_matching's
            continue
        if src.ndim != new.ndim or any(a > b for a, b in zip(src.shape, new.shape)):
            raise ValueError(f"decoder.{name}: {tuple(src.shape)} does not fit into {tuple(new.shape)}")
        groups = 3 if "to_qkv" in name else 2 if "time_conv" in name else 1
        if name.endswith("gamma"):
            g = torch.ones_like(new)
            g[: src.shape[0]] = src
            new.copy_(g * math.sqrt(src.shape[0] / new.shape[0]))
        else:
            out = new * scale if new.ndim > 1 else torch.zeros_like(new)  # weights: small fresh rows; biases: 0
            if new.ndim > 1:
                out[:, src.shape[1]:] = 0.0  # the new input channels are read by nothing yet
            o, n = src.shape[0] // groups, new.shape[0] // groups
            for g in range(groups):
                out[(slice(g * n, g * n + o),) + tuple(slice(0, d) for d in src.shape[1:])] = src[g * o:(g + 1) * o]
            if groups == 3:  # the q rows
                out[:o] *= math.sqrt(n / o)
            new.copy_(out)
        widened.append(name)
    return widened


@torch.no_grad()
def latent_stats(vae: VideoVAE, clips: ShapesClips, count: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the posterior means over `count` clips."""
    mus = [vae.vae.encode(clips.videos(range(i, i + 8))[1]).latent_dist.mean for i in range(0, count, 8)]
    mu = torch.cat(mus).transpose(0, 1).flatten(1)  # [z, N]
    return mu.mean(1).tolist(), mu.std(1).tolist()


VAE_CONFIG = "vae.json"  # in the run folder: the VAE's widths when they differ from the preset's


def run_vae_config(run: Path, preset: str) -> VAEConfig:
    """The VAE configuration a run trains: the preset's, with the overrides the run folder records."""
    cfg = get_preset(preset).vae
    path = run / VAE_CONFIG
    return dataclasses.replace(cfg, **json.loads(path.read_text())) if path.is_file() else cfg


def export(run: Path, out: Path, preset: str, clips: ShapesClips) -> VideoVAE:
    cfg = run_vae_config(run, preset)
    state = {k.removeprefix("vae."): v for k, v in load_weights(run, "ema").items()}
    vae = VideoVAE.from_config(cfg)
    vae.vae.load_state_dict(state, strict=True)
    mean, std = latent_stats(vae, clips)
    vae.vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save(out)
    return VideoVAE.from_folder(out)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 frames."""
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    return 10 * math.log10(255.0**2 / max(float(mse), 1e-12))


@torch.no_grad()
def evaluate(vae: VideoVAE, clips: ShapesClips, count: int = 32) -> dict:
    """Reconstruction PSNR (dB, on uint8 frames) and oracle adherence of originals vs reconstructions."""
    from benchmarks.oracle import adherence

    from .data import to_uint8

    orig, recs = [], []
    for i in range(0, count, 8):
        prompts, video = clips.videos(range(i, min(count, i + 8)))
        rec = vae.decode(vae.encode(video))
        a, b = to_uint8(video), to_uint8(rec)
        orig += list(zip(a, prompts))
        recs += list(zip(b, prompts))
    psnr = psnr_db(np.stack([v for v, _ in orig]), np.stack([v for v, _ in recs]))  # over all clips' pixels
    return {"psnr_db": psnr, "clips": count,
            "oracle_original": adherence(orig), "oracle_reconstruction": adherence(recs)}


@torch.no_grad()
def evaluate_stream(vae: VideoVAE, seconds: float = 120.0, count: int = 2, fps: int = 16, seed: int = 20_000,
                    width: int = 64, height: int = 64) -> dict:
    """Long-stream stability: `count` clips of `seconds` encoded whole, then decoded chunk by chunk (3 latent
    frames, as the engine does) through one streaming decoder; PSNR and oracle in the first and last 10 s."""
    from benchmarks.oracle import score_windows

    from .data import to_uint8

    n = 1 + 4 * round(seconds * fps / 4)
    clips = ShapesClips(width, height, n, seed=seed)
    w = 10 * fps
    res = {"seconds": (n - 1) / fps, "clips": count, "first_10s_psnr_db": 0.0, "last_10s_psnr_db": 0.0,
           "first_10s_oracle": 0.0, "last_10s_oracle": 0.0}
    for i in range(count):
        prompt, frames = clips.clip(i)
        z = vae.encode(to_tensor(frames[None]))
        dec = vae.stream()
        rec = to_uint8(torch.cat([dec.decode(c) for c in z.split(3, dim=2)], dim=2))[0]
        for name, sl in (("first", slice(0, w)), ("last", slice(-w, None))):
            res[f"{name}_10s_psnr_db"] += psnr_db(frames[sl], rec[sl]) / count
            reps = score_windows(rec[sl], prompt)
            res[f"{name}_10s_oracle"] += sum(r.score for r in reps) / len(reps) / count
    return res


def _main(argv=None) -> int:
    p = OneLineParser(prog="python -m distill.train_vae", description=__doc__.split("\n")[0])
    add_train_args(p, steps=1500, batch_size=8, lr=2e-4, warmup=50, ckpt_every=50, ema=0.995, out="runs/vae")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--frames", type=int, default=9, help="frames per training clip (1 + 4k)")
    p.add_argument("--lengths", type=int, nargs="*", default=[9, 17, 33],
                   help="clip lengths drawn per batch (1 + 4k each); --frames sets the frames a batch holds per clip")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--object-weight", type=float, default=10.0, help="extra loss weight on object pixels")
    p.add_argument("--motion-weight", type=float, default=0.0,
                   help="weight of an L1 loss on frame-to-frame changes (sharpens motion inside latent groups)")
    p.add_argument("--halo-weight", type=float, default=0.0,
                   help="extra loss weight on background pixels within --halo-px of an object (sharper edges)")
    p.add_argument("--halo-px", type=int, default=3)
    p.add_argument("--p-cut", type=float, default=0.5,
                   help="fraction of clips that cut to another clip at a latent-group boundary")
    p.add_argument("--posterior-noise", type=float, default=0.0, help="scale of the posterior sample's noise")
    p.add_argument("--init", metavar="DIR", help="start from this VAE folder's weights (e.g. assets/shapes/vae)")
    p.add_argument("--decoder-base-dim", type=int, metavar="N",
                   help="the decoder's base width instead of the preset's (default: --init's, else the preset's); "
                        "with --init from a narrower decoder, that decoder is widened (it decodes as before, and "
                        "the new channels learn)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only (with --init): latents already encoded for a teacher stay valid")
    p.add_argument("--export", metavar="DIR", help="write the trained VAE (diffusers folder with latent stats)")
    p.add_argument("--eval", type=int, default=32, metavar="N", help="clips to evaluate after --export")
    p.add_argument("--eval-stream", type=float, default=120.0, metavar="SECONDS",
                   help="after --export, also decode 2 streams this long chunk by chunk (0: skip)")
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    if any((n - 1) % 4 for n in [args.frames, *args.lengths]):
        p.error("--frames and --lengths must be 1 + 4k")
    if args.eval < 0 or not args.eval_stream >= 0:
        p.error(f"--eval and --eval-stream must be >= 0 (0: skip), got {args.eval} and {args.eval_stream}")
    if args.halo_px < 1 or args.halo_weight < 0:
        p.error(f"--halo-px must be >= 1 and --halo-weight >= 0 (got {args.halo_px} and {args.halo_weight})")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clips = ShapesClips(preset.width, preset.height, args.frames, seed=args.seed)
    if args.export:
        vae = export(Path(args.out), Path(args.export), args.preset, clips)
        held_out = ShapesClips(preset.width, preset.height, 33, seed=10_000 + args.seed)
        res = evaluate(vae, held_out, args.eval) if args.eval else {"export": args.export}
        if args.eval and args.eval_stream:
            res["stream"] = evaluate_stream(vae, args.eval_stream, width=preset.width, height=preset.height,
                                            fps=preset.fps)
        print(json.dumps(res))
        return 0
    if args.decoder_base_dim is not None and args.decoder_base_dim < 1:
        p.error(f"--decoder-base-dim must be >= 1, got {args.decoder_base_dim}")
    rank, world, device = setup_distributed()
    run = Path(args.out)
    cfg = run_vae_config(run, args.preset)
    init = VideoVAE.from_folder(args.init) if args.init else None
    width = args.decoder_base_dim
    if width is None and init is not None and not (run / VAE_CONFIG).is_file():
        if init.config().decoder_width != cfg.decoder_width:
            width = init.config().decoder_width  # --init's decoder as it is (the shipped one is wider)
    if width is not None:
        if (run / VAE_CONFIG).is_file() and cfg.decoder_width != width:
            p.error(f"{run} trains a decoder of base width {cfg.decoder_width}, not {width}")
        cfg = dataclasses.replace(cfg, decoder_base_dim=width)
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            (run / VAE_CONFIG).write_text(json.dumps({"decoder_base_dim": width}))
    vae = AutoencoderKLWan(**cfg.diffusers_kwargs())
    if init is not None:  # latent stats live in the config, not the weights: the export measures them afresh
        state = init.vae.state_dict()
        fresh = load_matching(vae, state)
        if any(k.startswith("decoder.") and k in state for k in fresh):  # a narrower decoder
            try:
                widened = widen_decoder(vae, state)
            except ValueError as e:
                p.error(f"--init {args.init}: its decoder does not fit this one ({e})")
            fresh = [k for k in fresh if k.removeprefix("decoder.") not in widened]
        if fresh and rank == 0 and not args.quiet:
            print(f"--init {args.init}: {len(fresh)} tensors start fresh (other shapes or names): "
                  f"{', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}", file=sys.stderr)
    if args.freeze_encoder:
        if not args.init:
            p.error("--freeze-encoder needs --init (a trained encoder to keep)")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    model = VAEWithLoss(vae, args.posterior_noise).to(device)
    trainer = Trainer(model, VAETask(clips, args.kl_weight, device, args.object_weight, tuple(args.lengths),
                                    args.p_cut, args.motion_weight, args.halo_weight, args.halo_px),
                      config_from_args(args), args.out,
                      device=device, resume=not args.no_resume, quiet=args.quiet)
    trainer.run()
    return 0


main = one_line_errors(_main, "distill.train_vae")

if __name__ == "__main__":
    sys.exit(main())
