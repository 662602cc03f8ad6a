"""Train the bidirectional Shapes teacher (and the Shapes text encoder with it) by flow matching.

    python -m distill.train_teacher --vae assets/shapes/vae --out runs/teacher --steps 3000
    python -m distill.train_teacher --out runs/teacher --export runs/teacher/export   # transformer + text_encoder
    python -m distill.train_teacher --out runs/teacher --eval 50                    # oracle adherence
    python -m distill.train_teacher --out assets/shapes-teacher --eval 50           # same, exported folder
    python -m distill.train_teacher --out runs/teacher2 --init assets/shapes-teacher  # go on from an export

Data: `--clips` rendered clips encoded once by the VAE into `--latents` (made on first use). Each sample's
prompt is dropped to the empty prompt with probability `--p-uncond` (classifier-free guidance); sigma is
drawn uniformly and shifted by `--shift` (more weight on high noise, where layout and motion are decided).
`--latent-lengths` trains some batches on clip prefixes (the causal VAE makes them exact latents of shorter
clips): most of what a clip teaches is in its first frames, at a fraction of the tokens.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from engine.cli import OneLineParser, one_line_errors
from engine.config import get_preset
from engine.text import ShapesTextEncoder
from engine.vae import VideoVAE

from .data import LatentSet, ShapesClips, encode_clips, to_uint8
from .shapes import sample_prompt
from .teacher import Teacher, sample, shift_sigma
from .trainer import Trainer, add_train_args, config_from_args, load_weights, setup_distributed


class TeacherTask:
    """Flow matching on cached latents. With `lengths` (latent frames), each micro-batch trains on the first n
    latent frames of its clips, n taken from `lengths` in turn (a pure function of the ids: resume stays exact).
    The VAE encoder is causal, so a prefix of a clip's latents is exactly the latent of the clip's first
    1 + 4 (n - 1) frames: shorter clips for free, at a cost that falls with the token count."""

    def __init__(self, data: LatentSet, tokenizer: ShapesTextEncoder, p_uncond: float, shift: float, device,
                 lengths: tuple[int, ...] = ()):
        self.data, self.tok, self.p_uncond, self.shift, self.device = data, tokenizer, p_uncond, shift, device
        self.lengths = lengths

    def batch(self, ids):
        prompts, x0 = self.data.get(ids)
        if self.lengths:
            n = self.lengths[int(ids[0]) // len(ids) % len(self.lengths)]  # micro-batches cycle through them
            x0 = x0[:, :, :n]
        return prompts, x0

    def loss(self, model, batch, gen):
        prompts, x0 = batch
        B = x0.shape[0]
        drop = torch.rand(B, generator=gen) < self.p_uncond
        ids, lengths = self.tok._tokenize(["" if d else p for p, d in zip(prompts, drop.tolist())])
        sigma = shift_sigma(torch.rand(B, generator=gen), self.shift)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(B, 1, 1, 1, 1)
        xt = ((1 - s) * x0 + s * eps).to(self.device)
        v = model(xt, (sigma * 1000).to(self.device), ids.to(self.device), lengths.to(self.device))
        loss = F.mse_loss(v, (eps - x0).to(self.device))
        return loss, {}


def build(preset_name: str, seed: int = 0) -> Teacher:
    return Teacher.from_preset(get_preset(preset_name), seed=seed)


def load_teacher(run: Path, preset_name: str, which: str = "ema") -> Teacher:
    """A teacher from a run folder (its `which` weights) or from an exported folder (transformer/ +
    text_encoder/, what --export writes), in float32."""
    run = Path(run)
    if (run / "transformer" / "config.json").is_file():
        tr = WanTransformer3DModel.from_pretrained(str(run / "transformer")).float()
        t = Teacher(tr, ShapesTextEncoder.from_folder(run / "text_encoder").float())
    else:
        t = build(preset_name)
        t.load_state_dict(load_weights(run, which), strict=True)
    return t.eval().requires_grad_(False)


def export_teacher(teacher: Teacher, out: Path) -> None:
    """transformer/ (diffusers, fp16 safetensors: half the size, and the sampler runs in float32 anyway) and
    text_encoder/."""
    import copy

    copy.deepcopy(teacher.transformer).half().save_pretrained(str(out / "transformer"), safe_serialization=True)
    teacher.text.save(out / "text_encoder")


@torch.no_grad()
def generate(teacher: Teacher, vae: VideoVAE, prompts: list[str], latent_frames: int, latent_hw, seed: int,
             steps: int, guidance: float, shift: float, batch: int = 10) -> list:
    """uint8 videos [T, H, W, 3] (T = 1 + 4 (latent_frames - 1)) from the teacher's multi-step sampler."""
    out = []
    for s in range(0, len(prompts), batch):
        ps = prompts[s:s + batch]
        g = torch.Generator().manual_seed(seed + s)
        noise = torch.randn((len(ps), teacher.transformer.config.in_channels, latent_frames, *latent_hw), generator=g)
        z = sample(teacher.transformer, teacher.text.encode(ps), teacher.text.encode([""] * len(ps)), noise,
                   steps, guidance, shift)
        out += list(to_uint8(vae.decode(z)))
    return out


def evaluate(teacher: Teacher, vae: VideoVAE, preset, n: int, frames: int, steps: int, guidance: float,
             shift: float, seed: int = 1234) -> dict:
    """Oracle adherence of the teacher on n random prompts (fresh seed)."""
    from benchmarks.oracle import score_video

    rng = random.Random(seed)
    prompts = [sample_prompt(rng) for _ in range(n)]
    videos = generate(teacher, vae, prompts, (frames - 1) // vae.temporal + 1, preset.latent_hw, seed, steps,
                      guidance, shift)
    scores = [score_video(v, p).score for v, p in zip(videos, prompts)]
    return {"adherence": sum(scores) / n, "prompts": n, "frames": frames, "steps": steps, "guidance": guidance,
            "shift": shift}


def _main(argv=None) -> int:
    p = OneLineParser(prog="python -m distill.train_teacher", description=__doc__.split("\n")[0])
    add_train_args(p, steps=3000, batch_size=16, lr=3e-4, warmup=100, ckpt_every=100, ema=0.999,
                   out="runs/teacher")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--vae", default="assets/shapes/vae", help="trained VAE folder (diffusers layout)")
    p.add_argument("--latents", default="runs/latents-shapes.safetensors")
    p.add_argument("--clips", type=int, default=4000, help="clips to render and encode when --latents is new")
    p.add_argument("--frames", type=int, default=33, help="video frames per clip (1 + 4k)")
    p.add_argument("--latent-lengths", type=int, nargs="*", default=[], metavar="N",
                   help="train each batch on the first N latent frames of its clips, N taken from these in turn "
                        "(e.g. 5 5 9: two batches in three at 5 frames; default: whole clips)")
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--init", metavar="DIR",
                   help="start from these weights (an exported teacher or a run folder's EMA) instead of random")
    p.add_argument("--export", metavar="DIR", help="write transformer/ and text_encoder/ folders")
    p.add_argument("--eval", type=int, metavar="N", help="oracle adherence of N random prompts")
    p.add_argument("--steps-sample", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    out = Path(args.out)
    if args.init and not Path(args.init).is_dir():
        p.error(f"--init {args.init}: no such folder")
    if args.export or args.eval:
        teacher = load_teacher(out, args.preset)
        if args.export:
            export_teacher(teacher, Path(args.export))
            print(args.export)
        if args.eval:
            print(json.dumps(evaluate(teacher, VideoVAE.from_folder(args.vae), preset, args.eval, args.frames,
                                      args.steps_sample, args.guidance, args.shift)))
        return 0
    rank, world, device = setup_distributed()
    lat = Path(args.latents)
    if not lat.exists():
        if rank == 0:
            vae = VideoVAE.from_folder(args.vae)
            encode_clips(vae, ShapesClips(preset.width, preset.height, args.frames, seed=args.seed), args.clips, lat,
                         quiet=args.quiet)
        if world > 1:
            torch.distributed.barrier()
    data = LatentSet(lat)
    if any(not 1 <= n <= data.latents.shape[2] for n in args.latent_lengths):
        p.error(f"--latent-lengths must lie in 1..{data.latents.shape[2]} (the cached clips' latent frames)")
    teacher = build(args.preset, args.seed)
    if args.init:  # the optimiser starts afresh: a new run folder, not a resume
        teacher.load_state_dict(load_teacher(Path(args.init), args.preset).state_dict(), strict=True)
    teacher = teacher.to(device)
    task = TeacherTask(data, teacher.text, args.p_uncond, args.shift, device, tuple(args.latent_lengths))
    Trainer(teacher, task, config_from_args(args), out, device=device, resume=not args.no_resume,
            quiet=args.quiet).run()
    return 0


main = one_line_errors(_main, "distill.train_teacher")

if __name__ == "__main__":
    sys.exit(main())
