"""ODE initialisation of the causal student (CausVid / Self-Forcing stage 1).

    python -m distill.ode_init --teacher runs/teacher --out runs/ode --steps 1500     # pairs made on first use
    python -m distill.ode_init --teacher runs/teacher --out runs/ode --export assets/shapes
    python -m distill.ode_init --out runs/ode --eval 50 --model assets/shapes        # oracle, through the engine

1. Pairs: the teacher (CFG, Euler) integrates its ODE from noise on a grid that passes exactly through the
   student's sigmas; the states there plus the end point x_0 are stored (`--pairs` file, fp16).
2. Regression: the student starts from the teacher's weights (same architecture) and learns to map the state
   at sigma_k of each chunk straight to x_0, with a random k per chunk. Its context is what the engine gives it
   at inference: the clean (t = 0) pass of the earlier chunks. `teacher_forcing_forward` builds that in one
   forward: [clean frames | noisy frames], block-causal over chunks, with the noisy copy at the same positions
   (tests/test_distill.py checks it equals the streaming engine chunk by chunk).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from engine.attention import FullContext
from engine.cli import OneLineParser, one_line_errors
from engine.config import ModelConfig, SamplerConfig, get_preset
from engine.folder import load_model_folder, save_model_folder
from engine.model import CausalWanModel
from engine.sampler import few_step_sampler
from engine.vae import VideoVAE

from .shapes import sample_prompt
from .teacher import sample, shift_sigma
from .trainer import Trainer, add_train_args, config_from_args, setup_distributed, teardown_distributed


# ---- teacher trajectories -----------------------------------------------------------------------------


def trajectory_grid(sampler: SamplerConfig, substeps: int) -> tuple[torch.Tensor, list[int]]:
    """Teacher sigmas from 1 to 0 through every student sigma, `substeps` Euler steps between neighbours
    (uniform before the shift). Returns (sigmas, indices of the student sigmas in it)."""
    u = [t / sampler.num_train_timesteps for t in sampler.timesteps] + [0.0]
    grid, idx = [], []
    for a, b in zip(u[:-1], u[1:]):
        idx.append(len(grid))
        grid += [a + (b - a) * i / substeps for i in range(substeps)]
    grid.append(0.0)
    return shift_sigma(torch.tensor(grid, dtype=torch.float64), sampler.shift).float(), idx


@torch.no_grad()
def make_pairs(teacher, count: int, latent_shape: tuple[int, ...], sampler: SamplerConfig, out: Path, *,
               substeps: int = 6, guidance: float = 4.0, batch: int = 16, seed: int = 0, quiet: bool = False):
    """Writes prompts and states [N, K + 1, C, F, h, w] (K student sigmas, then x_0) to a safetensors file."""
    sig, idx = trajectory_grid(sampler, substeps)
    rng = random.Random(seed)
    prompts = [sample_prompt(rng) for _ in range(count)]
    states = []
    for s in tqdm(range(0, count, batch), desc="teacher ODE pairs", unit="batch", disable=quiet):
        ps = prompts[s:s + batch]
        noise = torch.randn((len(ps), *latent_shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + s))
        cond, uncond = teacher.text.encode(ps), teacher.text.encode([""] * len(ps))
        _, _, traj = sample(teacher.transformer, cond, uncond, noise, guidance=guidance, sigmas=sig,
                            return_trajectory=True)
        states.append(traj[idx + [len(sig) - 1]].transpose(0, 1).half())  # [B, K + 1, ...]
    meta = {"prompts": json.dumps(prompts), "sigmas": json.dumps([float(sig[i]) for i in idx]),
            "guidance": str(guidance), "substeps": str(substeps)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({"states": torch.cat(states)}, str(tmp), metadata=meta)
    tmp.replace(out)


class Pairs:
    def __init__(self, path: Path):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            self.states = f.get_tensor("states").float()
        self.prompts = json.loads(meta["prompts"])
        self.sigmas = json.loads(meta["sigmas"])


# ---- the student's training forward -------------------------------------------------------------------


def teacher_forcing_forward(model: CausalWanModel, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                            text_kv, frames_per_chunk: int) -> torch.Tensor:
    """Flow prediction for every chunk of `noisy` [B, C, F, h, w] at per-frame timesteps t [B, F], each chunk
    seeing the clean (t = 0) pass of the earlier chunks of `clean` and itself, as in streaming (no eviction:
    F must fit in sink + window + chunk). Returns v for the noisy frames [B, C, F, h, w]."""
    B, _, nf, h, w = clean.shape
    _, ph, pw = model.cfg.patch_size
    n = (h // ph) * (w // pw)  # tokens per frame
    chunk = torch.arange(nf, device=clean.device) // frames_per_chunk
    fc = torch.cat([chunk, chunk])  # chunk id of each frame of [clean | noisy]
    is_noisy = torch.arange(2 * nf, device=clean.device) >= nf
    # clean frame -> clean frames of chunks <= its own; noisy frame -> clean of earlier chunks + noisy of its own
    see = torch.where(is_noisy[:, None],
                      (~is_noisy[None, :] & (fc[None, :] < fc[:, None])) | (is_noisy[None, :] & (fc[None, :] == fc[:, None])),
                      ~is_noisy[None, :] & (fc[None, :] <= fc[:, None]))
    mask = see.repeat_interleave(n, 0).repeat_interleave(n, 1)
    pos = torch.cat([torch.arange(nf), torch.arange(nf)]).to(clean.device)
    ctx = FullContext((2 * nf, h // ph, w // pw), model.cfg.attention_head_dim, clean.device, frame_pos=pos, mask=mask)
    tt = torch.cat([torch.zeros_like(t), t], dim=1)
    v = model(torch.cat([clean, noisy], dim=2), tt, text_kv=text_kv, ctx=ctx)
    return v[:, :, nf:]


class TeacherForced(torch.nn.Module):
    """The student under training: forward = teacher_forcing_forward (one module, so DDP sees the call)."""

    def __init__(self, model: CausalWanModel, frames_per_chunk: int):
        super().__init__()
        self.model, self.fpc = model, frames_per_chunk

    def forward(self, clean, noisy, t, text):
        return teacher_forcing_forward(self.model, clean, noisy, t, self.model.text_kv(text), self.fpc)


class ODETask:
    def __init__(self, pairs: Pairs, text, frames_per_chunk: int, device):
        self.pairs, self.text, self.fpc, self.device = pairs, text, frames_per_chunk, device
        self.embeds: dict[str, torch.Tensor] = {}  # prompt -> frozen embedding (the teacher's text encoder)

    def batch(self, ids):
        i = [int(j) % len(self.pairs.prompts) for j in ids]
        prompts = [self.pairs.prompts[j] for j in i]
        missing = [p for p in dict.fromkeys(prompts) if p not in self.embeds]
        if missing:
            self.embeds.update(zip(missing, self.text.encode(missing)))
        return torch.stack([self.embeds[p] for p in prompts]), self.pairs.states[i]

    def loss(self, model, batch, gen):
        emb, states = batch  # states [B, K + 1, C, F, h, w]: K student steps, then x_0
        B, K1, _, nf = states.shape[:4]
        k = torch.randint(0, K1 - 1, (B, nf // self.fpc), generator=gen).repeat_interleave(self.fpc, 1)  # [B, F]
        noisy = states[torch.arange(B)[:, None], k, :, torch.arange(nf)[None, :]]  # [B, F, C, h, w]
        noisy = noisy.permute(0, 2, 1, 3, 4).to(self.device)
        sig = torch.tensor(self.pairs.sigmas)[k].to(self.device)  # [B, F]
        x0 = states[:, -1].to(self.device)
        v = model(x0, noisy, sig * 1000, emb.to(self.device))
        pred = noisy - sig[:, None, :, None, None] * v  # the student's x_0
        return F.mse_loss(pred, x0), {}


# ---- evaluation through the engine --------------------------------------------------------------------


def windows_report(frames, prompt: str, window: int = 32):
    """(mean adherence of the windows of a stretch of stream, the windows' oracle reports)."""
    from benchmarks.oracle import score_windows

    reps = score_windows(frames, prompt, window=window)
    return sum(r.score for r in reps) / len(reps), reps


def evaluate_engine(model_path, n: int = 50, seconds: float = 2.0, stream_seconds: float = 0.0, seed: int = 4321,
                    quiet: bool = False, sparse_topk: float | None = None, streams: int = 1,
                    steps: int | None = None, preview: bool = False) -> dict:
    """Oracle adherence of a model folder generating through the streaming engine (its preset's cache and
    sampler): n random prompts of `seconds` each, with the motion summary (benchmarks/oracle.py motion_summary).
    With stream_seconds, `streams` long streams (the first prompts) scored over their first and last 10 s.
    sparse_topk: block-sparse window attention at that density instead (Preset.sparse_cache). steps: the first
    this many of the sampler's timesteps (fewer denoising steps). preview: decode with the model's preview decoder
    (engine/preview.py) instead of the VAE's."""
    import numpy as np

    from benchmarks.oracle import check_means, motion_summary, score_video
    from engine.pipeline import VideoGenerator

    model = load_model_folder(model_path)
    cache = model.preset.cache if sparse_topk is None else model.preset.sparse_cache(sparse_topk)
    sampler = model.preset.sampler
    if steps is not None:
        sampler = few_step_sampler(sampler, steps)
    gen = VideoGenerator(model, cache_cfg=cache, sampler_cfg=sampler, preview=preview)
    rng = random.Random(seed)
    prompts = [sample_prompt(rng) for _ in range(n)]

    def video(prompt, frames, s):
        return np.concatenate([c.frames for c in gen.run([(0, prompt)], frames, seed=s)])

    reports = [score_video(video(p, int(seconds * gen.fps), seed + i), p)
               for i, p in enumerate(tqdm(prompts, desc="eval prompts", disable=quiet))]
    res = {"model": str(model_path), "prompts": n, "seconds": seconds, "steps": len(gen.stream.sampler_cfg.timesteps),
           "adherence": sum(r.score for r in reports) / max(n, 1),
           "adherence_se": float(np.std([r.score for r in reports], ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
           "checks": check_means(reports),
           **motion_summary(reports, prompts), "sparse_topk": cache.sparse_topk, "sink": cache.sink,
           "decoder": "preview" if preview else "vae"}
    if stream_seconds and streams > 0:  # long streams: the first and the last 10 s, and how the last one moves
        w, firsts, lasts, tails = 10 * gen.fps, [], [], []
        for i, p in enumerate(prompts[:streams]):
            v = video(p, int(stream_seconds * gen.fps), seed + i)
            firsts.append(windows_report(v[:w], p)[0])
            last, tail = windows_report(v[-w:], p)
            lasts.append(last)
            tails += [(r, p) for r in tail]
        res.update(stream_prompts=prompts[:streams], stream_seconds=stream_seconds,
                   stream_first_10s=sum(firsts) / len(firsts), stream_last_10s=sum(lasts) / len(lasts),
                   stream_last_10s_each=lasts,
                   stream_last_10s_motion=motion_summary([r for r, _ in tails], [p for _, p in tails]))
    return res


def teacher_model_config(teacher) -> ModelConfig:
    """The student's widths: its teacher's, whose weights it starts from (the preset's unless the teacher was grown)."""
    from engine.folder import transformer_config

    return transformer_config(dict(teacher.transformer.config), Path("teacher transformer"))


def export(run: Path, teacher_run: Path, vae: Path, out: Path, preset_name: str, sampler: SamplerConfig):
    from .train_teacher import load_teacher
    from .trainer import load_weights

    teacher = load_teacher(teacher_run, preset_name)
    preset = get_preset(preset_name).replace(sampler=sampler, model=teacher_model_config(teacher))
    student = CausalWanModel(preset.model)
    student.load_state_dict({k.removeprefix("model."): v for k, v in load_weights(run, "ema").items()}, strict=True)
    text = teacher.text
    from .trainer import latest_checkpoint

    ckpt = run if (run / "state.json").exists() else latest_checkpoint(run)
    save_model_folder(out, preset, student, VideoVAE.from_folder(vae), text, weights_dtype=torch.float16,
                      placeholder=False, description=f"Shapes student: ODE-initialised from the Shapes teacher "
                                                     f"({teacher_run}), {ckpt.name} of {run} (EMA weights), "
                                                     f"{len(sampler.timesteps)} steps")


def _main(argv=None) -> int:
    p = OneLineParser(prog="python -m distill.ode_init", description=__doc__.split("\n")[0])
    add_train_args(p, steps=1500, batch_size=16, lr=1e-4, warmup=50, ckpt_every=100, ema=0.99, out="runs/ode")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--teacher", default="runs/teacher", help="teacher run folder (distill.train_teacher)")
    p.add_argument("--vae", default="assets/shapes/vae")
    p.add_argument("--pairs", default="runs/ode-pairs-shapes.safetensors")
    p.add_argument("--num-pairs", type=int, default=1000)
    p.add_argument("--latent-frames", type=int, default=9)
    p.add_argument("--substeps", type=int, default=6, help="teacher Euler steps between student sigmas")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--export", metavar="DIR", help="write the student as an engine model folder")
    p.add_argument("--eval", type=int, metavar="N", help="oracle adherence of N prompts through the engine")
    p.add_argument("--model", help="model folder for --eval (default: --export or assets/shapes)")
    p.add_argument("--stream-seconds", type=float, default=120.0)
    p.add_argument("--eval-sparse", type=float, metavar="F",
                   help="--eval with block-sparse window attention keeping this fraction of the window's key "
                        "blocks (e.g. 0.2)")
    args = p.parse_args(argv)
    if args.eval_sparse is not None and not 0.0 < args.eval_sparse <= 1.0:
        p.error(f"--eval-sparse {args.eval_sparse}: must lie in (0, 1]")
    for flag, v in (("--eval", args.eval), ("--num-pairs", args.num_pairs), ("--latent-frames", args.latent_frames),
                    ("--substeps", args.substeps)):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if not args.stream_seconds >= 0:
        p.error(f"--stream-seconds must be >= 0, got {args.stream_seconds}")
    preset = get_preset(args.preset)
    sampler = preset.sampler
    if args.export:
        export(Path(args.out), Path(args.teacher), Path(args.vae), Path(args.export), args.preset, sampler)
        print(args.export)
    if args.eval:
        print(json.dumps(evaluate_engine(args.model or args.export or "assets/shapes", args.eval,
                                         stream_seconds=args.stream_seconds, quiet=args.quiet,
                                         sparse_topk=args.eval_sparse)))
    if args.export or args.eval:
        return 0
    from .train_teacher import load_teacher

    rank, world, device = setup_distributed()
    teacher = load_teacher(Path(args.teacher), args.preset)
    pairs = Path(args.pairs)
    if not pairs.exists():
        if rank == 0:
            shape = (preset.model.in_channels, args.latent_frames, *preset.latent_hw)
            make_pairs(teacher, args.num_pairs, shape, sampler, pairs, substeps=args.substeps,
                       guidance=args.guidance, seed=args.seed, quiet=args.quiet)
        if world > 1:
            torch.distributed.barrier()
    student = CausalWanModel(teacher_model_config(teacher))  # the teacher's widths (a grown teacher's too)
    student.load_state_dict(teacher.transformer.state_dict(), strict=True)  # same architecture, diffusers names
    task = ODETask(Pairs(pairs), teacher.text, preset.cache.frames_per_chunk, device)
    Trainer(TeacherForced(student, preset.cache.frames_per_chunk).to(device), task, config_from_args(args),
            args.out, device=device, resume=not args.no_resume, quiet=args.quiet).run()
    del student, task  # nothing may hold the (maybe sharded) model past the teardown: teardown_distributed
    teardown_distributed()
    return 0


main = one_line_errors(_main, "distill.ode_init")

if __name__ == "__main__":
    sys.exit(main())
