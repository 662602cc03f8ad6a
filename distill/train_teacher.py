"""Train the bidirectional Shapes teacher (and the Shapes text encoder with it) by flow matching.

    python -m distill.train_teacher --vae assets/shapes/vae --out runs/teacher --steps 3000
    python -m distill.train_teacher --out runs/teacher --export runs/teacher/export   # transformer + text_encoder
    python -m distill.train_teacher --out runs/teacher --eval 50                    # oracle adherence
    python -m distill.train_teacher --out assets/shapes-teacher --eval 50           # same, exported folder
    python -m distill.train_teacher --out runs/teacher2 --init assets/shapes-teacher  # go on from an export
    python -m distill.train_teacher --out assets/shapes-teacher --probe 24          # which prompt words it uses
    python -m distill.train_teacher --out assets/shapes-teacher --eval 30 --renoise 0 0.5 0.85 1  # where it loses
    python -m distill.train_teacher --out assets/shapes-teacher --eval 50 --context 1  # continuing a real first frame
    python -m distill.train_teacher --out assets/shapes-teacher --heldout 64        # loss on fresh clips
    python -m distill.train_teacher --out runs/t12 --init assets/shapes-teacher --grow-layers 12  # a deeper teacher

Data: `--clips` rendered clips encoded once by the VAE into `--latents` (made on first use). Each sample's
prompt is dropped to the empty prompt with probability `--p-uncond` (classifier-free guidance); sigma is
drawn uniformly and shifted by `--shift` (more weight on high noise, where layout and motion are decided).
`--latent-lengths` trains some batches on clip prefixes (the causal VAE makes them exact latents of shorter
clips): most of what a clip teaches is in its first frames, at a fraction of the tokens. `--image-batch N` adds
N images to every micro-batch (first latent frames of `--images`, e.g. a cache made with `--frames 1`): joint
image-video training. `--p-context` keeps the first latent frames of some samples clean (per-frame timesteps,
scored on the noisy rest): the streaming student's setting, where the motion words decide what comes next.
`--p-independent` gives the noisy frames of some samples a sigma each (Diffusion Forcing); `--motion-weight` weights
up the error's change between neighbouring frames (docs/shapes-training.md, "Two losses aimed at motion").
`--grow-layers` / `--grow-ffn` start a deeper or wider teacher from `--init` that computes what the init did
(distill.teacher.grow_transformer).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from engine.cli import OneLineParser, one_line_errors
from engine.config import get_preset
from engine.text import ShapesTextEncoder
from engine.vae import VideoVAE

from .data import LatentSet, ShapesClips, encode_clips, to_uint8
from .shapes import sample_prompt
from .teacher import TEXT_KINDS, Teacher, grow_transformer, sample, shift_sigma, sigma_schedule
from .trainer import (Trainer, add_train_args, config_from_args, load_weights, setup_distributed,
                      teardown_distributed)


class TeacherTask:
    """Flow matching on cached latents. With `lengths` (latent frames), each micro-batch trains on the first n
    latent frames of its clips, n taken from `lengths` in turn (a pure function of the ids: resume stays exact).
    The VAE encoder is causal, so a prefix of a clip's latents is exactly the latent of the clip's first
    1 + t (n - 1) frames (t the VAE's temporal compression): shorter clips for free, at a cost that falls with
    the token count.

    With `image_batch` N > 0, each micro-batch also trains on N images: the first latent frames of `images` (a
    latent cache; by the same causality the first latent frame is the latent of the first video frame alone),
    taken in order by micro-batch, with their own noise and prompt dropout; the loss is the clips' loss plus
    `image_weight` times the images' (joint image-video training, as Wan trains). An image costs about a ninth
    of a 9-latent-frame clip, and spatial detail (shape) is learnt per image, not per clip."""

    def __init__(self, data: LatentSet, tokenizer: ShapesTextEncoder, p_uncond: float, shift: float, device,
                 lengths: tuple[int, ...] = (), p_context: float = 0.0, images: LatentSet | None = None,
                 image_batch: int = 0, image_weight: float = 1.0, motion_weight: float = 0.0,
                 p_independent: float = 0.0):
        self.data, self.tok, self.p_uncond, self.shift, self.device = data, tokenizer, p_uncond, shift, device
        self.lengths, self.p_context, self.motion_weight = lengths, p_context, motion_weight
        self.p_independent = p_independent
        self.images = images if images is not None else data
        self.image_batch, self.image_weight = image_batch, image_weight

    def batch(self, ids):
        prompts, x0 = self.data.get(ids)
        k = int(ids[0]) // len(ids)  # the micro-batch's index: ids come in runs of the batch size
        if self.lengths:
            n = self.lengths[k % len(self.lengths)]  # micro-batches cycle through them
            x0 = x0[:, :, :n]
        if not self.image_batch:
            return prompts, x0
        ip, ix = self.images.get(range(k * self.image_batch, (k + 1) * self.image_batch))
        return prompts, x0, ip, ix[:, :, :1]

    def loss(self, model, batch, gen):
        loss = self._loss(model, *batch[:2], gen)
        if len(batch) == 2:
            return loss, {}
        image = self._loss(model, *batch[2:], gen)
        return loss + self.image_weight * image, {"clip_loss": loss.item(), "image_loss": image.item()}

    def _loss(self, model, prompts, x0, gen):
        B = x0.shape[0]
        drop = torch.rand(B, generator=gen) < self.p_uncond
        ids, lengths = self.tok._tokenize(["" if d else p for p, d in zip(prompts, drop.tolist())])
        sigma = shift_sigma(torch.rand(B, generator=gen), self.shift)
        eps = torch.randn(x0.shape, generator=gen)
        nf = x0.shape[2]
        if not (self.p_context or self.p_independent or self.motion_weight) or nf < 2:
            s = sigma.view(B, 1, 1, 1, 1)
            xt = ((1 - s) * x0 + s * eps).to(self.device)
            v = model(xt, (sigma * 1000).to(self.device), ids.to(self.device), lengths.to(self.device))
            return F.mse_loss(v, (eps - x0).to(self.device))
        # Clean context: a sample with probability p_context keeps its first n frames clean (sigma 0, n drawn
        # from 1..F-1) and is scored on the rest. Knowing where the objects were, the later frames depend on
        # the direction and speed words, a signal that whole-clip noise hardly gives (at high sigma the mean
        # over start positions is the same for every direction). It is also the student's streaming setting.
        n_ctx = torch.randint(1, nf, (B,), generator=gen) * (torch.rand(B, generator=gen) < self.p_context)
        sf = sigma[:, None] * (torch.arange(nf)[None, :] >= n_ctx[:, None])  # [B, F] per-frame sigma
        if self.p_independent:  # Diffusion Forcing: each noisy frame of these samples at a sigma of its own
            own = torch.rand(B, generator=gen) < self.p_independent
            each = shift_sigma(torch.rand(B, nf, generator=gen), self.shift)
            sf = torch.where(own[:, None] & (sf > 0), each, sf)
        return noisy_frames_loss(model, x0, eps, sf, ids, lengths, self.device, self.motion_weight)


def noisy_frames_loss(model, x0, eps, sf, ids, lengths, device="cpu", motion_weight: float = 0.0) -> torch.Tensor:
    """Flow-matching MSE at per-frame sigmas sf [B, F]: frames at sigma 0 go in clean and are not scored.

    motion_weight m adds m times the mean square of the error's change from one scored latent frame to the next
    (`--motion-weight`): an error that is the same in every frame (a whole clip off by the same amount) costs
    nothing there, one that changes from frame to frame (an object drawn still where it moves) costs more. Both
    terms are least at the same prediction (the data's mean velocity), so the target is unchanged; only the
    weighting of errors shifts towards the frame-to-frame change, the motion."""
    x0, eps, sf = x0.to(device), eps.to(device), sf.to(device)  # the batch may come from the CPU
    s = sf.view(*sf.shape[:1], 1, sf.shape[1], 1, 1)
    xt = (1 - s) * x0 + s * eps
    v = model(xt, sf * 1000, ids.to(device), lengths.to(device))
    w = (s > 0).to(v.dtype)
    e = v - (eps - x0)
    per_frame = x0.shape[1] * x0.shape[3] * x0.shape[4]
    loss = (e.square() * w).sum() / (w.sum() * per_frame)
    if motion_weight and x0.shape[2] > 1:
        wd = w[:, :, 1:] * w[:, :, :-1]  # pairs of neighbouring scored frames
        d = (e[:, :, 1:] - e[:, :, :-1]).square() * wd
        loss = loss + motion_weight * d.sum() / (wd.sum().clamp_min(1) * per_frame)
    return loss


def build(preset_name: str, seed: int = 0, text: str = "learned", model: dict | None = None) -> Teacher:
    """A fresh teacher of the preset's widths, `model` overriding some of them (a grown teacher's depth and
    feed-forward width)."""
    preset = get_preset(preset_name)
    if model:
        preset = preset.replace(model=dataclasses.replace(preset.model, **model))
    return Teacher.from_preset(preset, seed=seed, text=text)


def load_teacher(run: Path, preset_name: str, which: str = "ema") -> Teacher:
    """A teacher from a run folder (its `which` weights; its teacher.json says if it was grown) or from an
    exported folder (transformer/ + text_encoder/, what --export writes), in float32."""
    run = Path(run)
    if (run / "transformer" / "config.json").is_file():
        tr = WanTransformer3DModel.from_pretrained(str(run / "transformer")).float()
        t = Teacher(tr, ShapesTextEncoder.from_folder(run / "text_encoder").float())
    else:
        state = load_weights(run, which)
        t = build(preset_name, text="fixed" if "text.word_code" in state else "learned", model=run_model(run))
        t.load_state_dict(state, strict=True)
    return t.eval().requires_grad_(False)


def param_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def run_model(run: Path) -> dict:
    """The widths a run folder's teacher differs from its preset in ({} unless it was grown): its teacher.json."""
    f = Path(run) / "teacher.json"
    return json.loads(f.read_text()).get("model", {}) if f.is_file() else {}


def export_teacher(teacher: Teacher, out: Path, shard_mb: float | None = None, preset: str | None = None) -> None:
    """transformer/ (diffusers, fp16 safetensors: half the size, and the sampler runs in float32 anyway),
    text_encoder/ and, with `preset`, teacher.json naming the preset whose VAE latents it was trained on (so that
    its users pick the matching VAE and frame layout: `teacher_preset`). shard_mb splits the transformer's weights
    into files of at most that size (diffusers' sharded layout, which from_pretrained reads), e.g. to bring them
    back from a machine that returns small files only."""
    import copy

    kw = {"max_shard_size": int(shard_mb * 2**20)} if shard_mb else {}
    copy.deepcopy(teacher.transformer).half().save_pretrained(str(out / "transformer"), safe_serialization=True, **kw)
    teacher.text.save(out / "text_encoder")
    if preset:
        (out / "teacher.json").write_text(json.dumps({"preset": preset}) + "\n")


def teacher_preset(folder: str | Path) -> str | None:
    """The preset an exported teacher folder was trained for (its teacher.json), None if it does not say."""
    f = Path(folder) / "teacher.json"
    return json.loads(f.read_text())["preset"] if f.is_file() else None


@torch.no_grad()
def generate(teacher: Teacher, vae: VideoVAE, prompts: list[str], latent_frames: int, latent_hw, seed: int,
             steps: int, guidance: float, shift: float, batch: int = 10, guide: Teacher | None = None,
             autoguidance: float = 1.0) -> list:
    """uint8 videos [T, H, W, 3] (T = 1 + t (latent_frames - 1), t the VAE's temporal compression) from the
    teacher's multi-step sampler (autoguided by `guide` when autoguidance != 1)."""
    out = []
    for s in range(0, len(prompts), batch):
        ps = prompts[s:s + batch]
        g = torch.Generator().manual_seed(seed + s)
        noise = torch.randn((len(ps), teacher.transformer.config.in_channels, latent_frames, *latent_hw), generator=g)
        noise = noise.to(param_device(teacher))  # drawn on the CPU: the same clips on any device
        z = sample(teacher.transformer, teacher.text.encode(ps), teacher.text.encode([""] * len(ps)), noise,
                   steps, guidance, shift, **_guide_kw(guide, ps, autoguidance))
        out += list(to_uint8(vae.decode(z)))
    return out


def _guide_kw(guide: Teacher | None, prompts: list[str], autoguidance: float) -> dict:
    if guide is None or autoguidance == 1.0:
        return {}
    return {"guide": guide.transformer, "guide_cond": guide.text.encode(prompts), "autoguidance": autoguidance}


def evaluate(teacher: Teacher, vae: VideoVAE, preset, n: int, frames: int, steps: int, guidance: float,
             shift: float, seed: int = 1234, guide: Teacher | None = None, autoguidance: float = 1.0) -> dict:
    """Oracle adherence of the teacher on n random prompts (fresh seed), also split by still and moving clips, and
    the motion summary (motion_ratio: the median measured / asked speed of the moving objects)."""
    from benchmarks.oracle import motion_summary, score_video

    rng = random.Random(seed)
    prompts = [sample_prompt(rng) for _ in range(n)]
    videos = generate(teacher, vae, prompts, (frames - 1) // vae.temporal + 1, preset.latent_hw, seed, steps,
                      guidance, shift, guide=guide, autoguidance=autoguidance)
    reports = [score_video(v, p) for v, p in zip(videos, prompts)]
    return {**_summary(reports, prompts), **motion_summary(reports, prompts), "prompts": n, "frames": frames,
            "steps": steps, "guidance": guidance, "shift": shift,
            **({"autoguidance": autoguidance} if guide is not None and autoguidance != 1.0 else {})}


@torch.no_grad()
def renoise_eval(teacher: Teacher, vae: VideoVAE, preset, n: int, frames: int, sigmas, steps: int, guidance: float,
                 shift: float, seed: int = 1234, batch: int = 10, context: int = 0, guide: Teacher | None = None,
                 autoguidance: float = 1.0, history_guidance: float = 1.0) -> dict:
    """Where the teacher loses adherence: n fresh rendered clips (not the training clips' seed), encoded by the VAE,
    noised to each sigma and sampled from there by the teacher's sampler (sigma, then its grid's sigmas below it),
    with the clips' own prompts. Sigma 0 scores the VAE's reconstructions, sigma 1 ordinary sampling; a denoiser
    that knew the clip exactly would score sigma 0's adherence at every sigma. With `context` K the clips' first K
    latent frames stay clean (timestep 0, as --p-context trains it) and only the rest is noised and sampled: the
    teacher's continuation of where the objects were, which only the motion words can get right (`history_guidance`:
    the sampler's guidance towards that context, `sample`).
    -> {sigma: adherence, checks and the motion summary (speed ratio, frozen and copy rates)}."""
    from benchmarks.oracle import motion_summary, score_video

    prompts, video = ShapesClips(preset.width, preset.height, frames, seed=seed).videos(range(n))
    z0 = torch.cat([vae.encode(video[i:i + batch]) for i in range(0, n, batch)])
    z0 = z0.to(param_device(teacher))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
    grid = sigma_schedule(steps, shift)
    cond, uncond = teacher.text.encode(prompts), teacher.text.encode([""] * n)
    out = {}
    for sig in sigmas:
        x = (1 - sig) * z0 + sig * eps
        x[:, :, :context] = z0[:, :, :context]
        if sig > 0:
            tail = torch.cat([torch.tensor([float(sig)]), grid[grid < sig]])
            x = torch.cat([sample(teacher.transformer, cond[i:i + batch], uncond[i:i + batch], x[i:i + batch],
                                  guidance=guidance, sigmas=tail, context=context, history_guidance=history_guidance,
                                  **_guide_kw(guide, prompts[i:i + batch], autoguidance))
                           for i in range(0, n, batch)])
        videos = np.concatenate([to_uint8(vae.decode(x[i:i + batch])) for i in range(0, n, batch)])
        reports = [score_video(v, p) for v, p in zip(videos, prompts)]
        out[str(sig)] = {**_summary(reports, prompts), **motion_summary(reports, prompts)}
        if context:  # the sampled frames alone (the context's own frames pass the oracle by construction)
            start = 1 + vae.temporal * (context - 1)  # latent frame 0 is one video frame, the others vae.temporal
            sampled = [score_video(v[start:], p) for v, p in zip(videos, prompts)]
            out[str(sig)]["sampled_frames"] = {"from_frame": start, **_summary(sampled, prompts)}
    return out


def _summary(reports, prompts, split: bool = True) -> dict:
    """Oracle reports -> adherence and check means, and (split) the same for the clips whose objects all stand still
    and for the others (by_motion)."""
    from benchmarks.oracle import check_means

    out = {"adherence": sum(r.score for r in reports) / len(reports), "checks": check_means(reports)}
    if split:
        still = [not _moves(p) for p in prompts]
        parts = {"still": [r for r, s in zip(reports, still) if s],
                 "moving": [r for r, s in zip(reports, still) if not s]}
        out["by_motion"] = {k: {"clips": len(rs), **_summary(rs, None, split=False)} for k, rs in parts.items() if rs}
    return out


def _moves(prompt: str) -> bool:
    """Does any object of the prompt move (every motion but "standing still")?"""
    from .shapes import parse_prompt

    return any(o.motion != "still" for o in parse_prompt(prompt).objects)


@torch.no_grad()
def heldout_loss(teacher: Teacher, vae: VideoVAE, preset, n: int, frames: int, sigmas=(0.95, 0.8, 0.6, 0.3),
                 seed: int = 1234, batch: int = 10) -> dict:
    """The flow-matching loss on n fresh rendered clips (not the training seed; the clips of --eval's renoise) at
    fixed sigmas, with every latent frame noisy and with the first one clean (context), each with its own prompt and
    one fixed noise draw: a measure of fit far less noisy than the oracle on samples, comparable across runs. Also
    `continuation` (continuation_error): how well it predicts the moving clips' frames after a chunk of 3. Single
    frames (`frames` 1: images, the first latent frame alone) have no context rows: nothing would be left to score."""
    prompts, video = ShapesClips(preset.width, preset.height, frames, seed=seed).videos(range(n))
    z0 = torch.cat([vae.encode(video[i:i + batch]) for i in range(0, n, batch)])
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    device = param_device(teacher)
    out = {}
    for ctx in (0, 1) if z0.shape[2] > 1 else (0,):
        for sig in sigmas:
            sf = torch.full((n, z0.shape[2]), float(sig))
            sf[:, :ctx] = 0.0
            total = sum(float(noisy_frames_loss(teacher, z0[i:i + batch], eps[i:i + batch], sf[i:i + batch],
                                                *teacher.text._tokenize(prompts[i:i + batch]), device))
                        * len(z0[i:i + batch])
                        for i in range(0, n, batch))  # batch means, weighted by their clips
            out[f"{'context 1, ' if ctx else ''}sigma {sig}"] = round(total / n, 5)
    res = {"clips": n, "frames": frames, "loss": out}
    cont = continuation_error(teacher, z0, eps, prompts, batch=batch)
    if cont:
        res["continuation"] = cont
    return res


@torch.no_grad()
def continuation_error(teacher: Teacher, z0: torch.Tensor, eps: torch.Tensor, prompts: list[str], context: int = 3,
                       batch: int = 10) -> dict | None:
    """Does the teacher carry motion forward? On the clips with a moving object: the first `context` latent frames
    clean, the rest pure noise (sigma 1), its one-step clean estimate x0 = x_t - v of each later frame. At sigma 1
    the input holds nothing of those frames, and the Shapes world's motion is deterministic, so a model that had
    learnt it would predict them exactly: this is next-frame regression. Against the error of copying the last
    context frame (a model that stops every object), per later latent frame and as the ratio of the means.
    -> None when no clip moves or the clips are not longer than the context."""
    moving = [i for i, p in enumerate(prompts) if _moves(p)]
    if not moving or z0.shape[2] <= context:
        return None
    z, e, ps = z0[moving], eps[moving], [prompts[i] for i in moving]
    sf = torch.ones(len(moving), z.shape[2])
    sf[:, :context] = 0.0
    device = param_device(teacher)
    errs = []
    for i in range(0, len(moving), batch):
        zb, eb, sb = z[i:i + batch].to(device), e[i:i + batch].to(device), sf[i:i + batch].to(device)
        s = sb.view(len(zb), 1, -1, 1, 1)
        xt = (1 - s) * zb + s * eb
        ids, lengths = teacher.text._tokenize(ps[i:i + batch])
        v = teacher(xt, sb * 1000, ids.to(device), lengths.to(device))
        errs.append((xt - s * v - zb)[:, :, context:].square().mean((1, 3, 4)).cpu())  # [b, F - context]
    model = torch.cat(errs).mean(0)
    copy = (z[:, :, context - 1:context] - z[:, :, context:]).square().mean((0, 1, 3, 4))
    return {"context": context, "moving_clips": len(moving), "x0_error": [round(float(x), 4) for x in model],
            "copy_last_error": [round(float(x), 4) for x in copy], "ratio": round(float(model.mean() / copy.mean()), 4)}


@torch.no_grad()
def prompt_probe(teacher: Teacher, data: LatentSet, n: int = 24, sigmas=(0.9, 0.6, 0.3), seed: int = 0) -> dict:
    """Does the teacher use each word of the prompt? On n one-object clips that move left/right/up/down, its
    flow-matching loss at fixed sigmas with the clip's own prompt and with one word swapped (colour, shape,
    direction) or the empty prompt; also with the first latent frame clean (a context: where the object was),
    where a direction the model follows should matter most. A word it ignores leaves the loss unchanged."""
    from .shapes import DIRECTIONS, OBJECT_COLOURS, SHAPES, parse_prompt

    def swap(words, pool):  # the first word of `pool` in the prompt -> the next one in the pool
        w = next(w for w in words if w in pool)
        return [pool[(pool.index(w) + 1) % len(pool)] if x == w else x for x in words]

    ids = [i for i, p in enumerate(data.prompts)
           if len(parse_prompt(p).objects) == 1 and parse_prompt(p).objects[0].motion in DIRECTIONS][:n]
    prompts, x0 = data.get(ids)
    variants = {"right": prompts, "colour swapped": [], "shape swapped": [], "direction swapped": [],
                "empty": [""] * len(ids)}
    for p in prompts:
        w = p.split()
        variants["colour swapped"].append(" ".join(swap(w, list(OBJECT_COLOURS))))
        variants["shape swapped"].append(" ".join(swap(w, list(SHAPES))))
        variants["direction swapped"].append(" ".join(swap(w, list(DIRECTIONS))))
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    out = {}
    for ctx in (0, 1):
        for sig in sigmas:
            sf = torch.full((len(ids), x0.shape[2]), sig)
            sf[:, :ctx] = 0.0
            out[f"{'context 1, ' if ctx else ''}sigma {sig}"] = {
                name: round(float(noisy_frames_loss(teacher, x0, eps, sf, *teacher.text._tokenize(ps),
                                                    param_device(teacher))), 4)
                for name, ps in variants.items()}
    return {"clips": len(ids), "loss": out}


def _main(argv=None) -> int:
    p = OneLineParser(prog="python -m distill.train_teacher", description=__doc__.split("\n")[0])
    add_train_args(p, steps=3000, batch_size=16, lr=3e-4, warmup=100, ckpt_every=100, ema=0.999,
                   out="runs/teacher")
    p.add_argument("--preset", help="model widths and VAE layout (default: what --out's teacher.json says, else "
                                     "shapes)")
    p.add_argument("--vae", default="assets/shapes/vae", help="trained VAE folder (diffusers layout)")
    p.add_argument("--latents", default="runs/latents-shapes.safetensors")
    p.add_argument("--clips", type=int, default=4000, help="clips to render and encode when --latents is new")
    p.add_argument("--frames", type=int, default=33, help="video frames per clip (1 + 4k)")
    p.add_argument("--render-workers", type=int, default=0,
                   help="processes rendering clips when --latents is new (default 0: in this process)")
    p.add_argument("--latent-lengths", type=int, nargs="*", default=[], metavar="N",
                   help="train each batch on the first N latent frames of its clips, N taken from these in turn "
                        "(e.g. 5 5 9: two batches in three at 5 frames; default: whole clips)")
    p.add_argument("--image-batch", type=int, default=0, metavar="N",
                   help="also train each micro-batch on N images: the first latent frames of --images (joint "
                        "image-video training; default 0: clips only)")
    p.add_argument("--images", metavar="PATH",
                   help="latent cache the --image-batch images come from, e.g. one made with --frames 1 (default: "
                        "--latents, whose clips' first latent frames are images too)")
    p.add_argument("--image-weight", type=float, default=1.0, help="weight of the images' loss (default 1)")
    p.add_argument("--motion-weight", type=float, default=0.0, metavar="M",
                   help="add M times the mean square of the clips' error change between neighbouring latent frames "
                        "(weights motion errors up; the optimum is unchanged; default 0: off)")
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--p-context", type=float, default=0.0,
                   help="fraction of samples whose first 1..F-1 latent frames stay clean (context); the loss "
                        "counts the noisy rest (teaches the motion words)")
    p.add_argument("--p-independent", type=float, default=0.0,
                   help="fraction of samples whose noisy latent frames each get a sigma of their own (Diffusion "
                        "Forcing: a clearer frame beside a noisier one, tied by the motion)")
    p.add_argument("--init", metavar="DIR",
                   help="start from these weights (an exported teacher or a run folder's EMA) instead of random; "
                        "with a different --text, only the transformer's")
    p.add_argument("--grow-layers", type=int, metavar="N",
                   help="with --init: a deeper teacher of N blocks, the new ones copies of their neighbours that "
                        "start as the identity (so it starts as the init's function)")
    p.add_argument("--grow-ffn", type=int, metavar="N",
                   help="with --init: feed-forward width N, the new hidden units read by nothing at first")
    p.add_argument("--text", choices=TEXT_KINDS, default="learned",
                   help="text encoder: a small transformer trained with the teacher, or a fixed word code "
                        "(nothing to train; every word stays distinct)")
    p.add_argument("--export", metavar="DIR", help="write transformer/ and text_encoder/ folders")
    p.add_argument("--export-shard-mb", type=float, metavar="MB", help="with --export: weight files of at most MB each")
    p.add_argument("--eval", type=int, metavar="N", help="oracle adherence of N random prompts")
    p.add_argument("--renoise", type=float, nargs="+", metavar="SIGMA",
                   help="with --eval N: N fresh rendered clips noised to each SIGMA and sampled from there "
                        "(0: the VAE's reconstructions; 1: ordinary sampling): at which noise levels adherence is lost")
    p.add_argument("--context", type=int, default=0, metavar="K",
                   help="with --eval N: keep the first K latent frames of the fresh clips clean and sample the rest "
                        "from noise (or from each --renoise sigma): how well it continues a clip, motion words "
                        "included, apart from drawing its first frames")
    p.add_argument("--heldout", type=int, metavar="N",
                   help="flow-matching loss on N fresh rendered clips at fixed sigmas (a low-noise measure of fit)")
    p.add_argument("--probe", type=int, metavar="N",
                   help="loss with each prompt word swapped on N one-object clips of --latents: which words it uses")
    p.add_argument("--steps-sample", type=int, default=30)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where --eval, --heldout and --probe run (default cpu; training picks its own device)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of --eval's sampler")
    p.add_argument("--guide", metavar="DIR",
                   help="with --eval: a weaker teacher of the same latents (exported or a run folder, e.g. preset "
                        "shapes-t2-s) that autoguides the sampler")
    p.add_argument("--autoguidance", type=float, default=2.0,
                   help="with --guide: v + (W - 1)(v - v_guide), besides --guidance's CFG term (default 2)")
    p.add_argument("--history-guidance", type=float, default=1.0, metavar="W",
                   help="with --context: v + (W - 1)(v - v_alone), v_alone the sampled frames' prediction without the "
                        "context (guidance towards the history; default 1: off)")
    args = p.parse_args(argv)
    out = Path(args.out)
    trained_as = teacher_preset(out)  # a run folder or an export says which preset it was trained for
    if args.preset and trained_as and args.preset != trained_as:
        p.error(f"--preset {args.preset}: {out} was trained for preset {trained_as}")
    args.preset = args.preset or trained_as or "shapes"
    preset = get_preset(args.preset)
    if args.init and not Path(args.init).is_dir():
        p.error(f"--init {args.init}: no such folder")
    if (args.grow_layers is not None or args.grow_ffn is not None) and not args.init:
        p.error("--grow-layers / --grow-ffn grow the --init teacher: give --init DIR")
    t = preset.vae.scale_factor_temporal
    if args.frames < 1 or (args.frames - 1) % t:
        p.error(f"--frames {args.frames}: must be 1 + {t}k (the VAE's framing for preset {preset.name})")
    for flag, v in (("--clips", args.clips), ("--eval", args.eval), ("--probe", args.probe),
                    ("--heldout", args.heldout), ("--steps-sample", args.steps_sample)):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if not (args.shift > 0 and 0.0 <= args.p_uncond <= 1.0 and args.render_workers >= 0):
        p.error(f"--shift must be positive, --p-uncond in [0, 1] and --render-workers >= 0 (got {args.shift}, "
                f"{args.p_uncond} and {args.render_workers})")
    if args.image_batch < 0 or not args.image_weight >= 0 or (args.images and not args.image_batch):
        p.error(f"--image-batch {args.image_batch} / --image-weight {args.image_weight}: both must be >= 0, and "
                "--images needs --image-batch N > 0")
    if not args.motion_weight >= 0:
        p.error(f"--motion-weight {args.motion_weight}: must be >= 0")
    if not 0.0 <= args.p_context <= 1.0 or not 0.0 <= args.p_independent <= 1.0:
        p.error(f"--p-context {args.p_context} / --p-independent {args.p_independent}: must lie in [0, 1]")
    if args.images and not Path(args.images).is_file():
        p.error(f"--images {args.images}: no such latent cache (train_teacher --frames 1 --latents PATH makes one)")
    if args.guide:
        if not args.eval or not Path(args.guide).is_dir():
            p.error(f"--guide {args.guide}: needs --eval N, and a teacher folder")
        guide_preset = teacher_preset(args.guide) or args.preset
        gp = get_preset(guide_preset)
        if (gp.vae, gp.latent_hw, gp.model.in_channels) != (preset.vae, preset.latent_hw, preset.model.in_channels):
            p.error(f"--guide {args.guide}: trained for preset {guide_preset}, not {args.preset}'s latents")
    if args.renoise and (not args.eval or any(not 0.0 <= v <= 1.0 for v in args.renoise)):
        p.error(f"--renoise {' '.join(map(str, args.renoise))}: needs --eval N, and sigmas in [0, 1]")
    latent_frames = (args.frames - 1) // t + 1
    if args.context and (not args.eval or not 0 < args.context < latent_frames):
        p.error(f"--context {args.context}: needs --eval N, and 0 < K < {latent_frames} (the latent frames of "
                f"--frames {args.frames})")
    if args.history_guidance != 1.0 and not args.context:
        p.error(f"--history-guidance {args.history_guidance}: needs --context K (the history it guides towards)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.export or args.eval or args.probe or args.heldout:
        teacher = load_teacher(out, args.preset)
        if args.export:  # from the CPU copy, before the evaluations
            export_teacher(teacher, Path(args.export), args.export_shard_mb, args.preset)
            print(args.export)
        teacher = teacher.to(args.device)
        guide = load_teacher(Path(args.guide), guide_preset).to(args.device) if args.guide else None
        ag = {"guide": guide, "autoguidance": args.autoguidance}
        vae = VideoVAE.from_folder(args.vae, device=args.device) if args.eval or args.heldout else None
        if args.probe:
            print(json.dumps(prompt_probe(teacher, LatentSet(args.latents), args.probe)))
        if args.heldout:
            print(json.dumps(heldout_loss(teacher, vae, preset, args.heldout, args.frames)))
        if args.eval and (args.renoise or args.context):
            res = renoise_eval(teacher, vae, preset, args.eval, args.frames, args.renoise or [1.0], args.steps_sample,
                               args.guidance, args.shift, context=args.context,
                               history_guidance=args.history_guidance, **ag)
            print(json.dumps({"renoise": res, "prompts": args.eval, "guidance": args.guidance,
                              **({"autoguidance": args.autoguidance} if guide is not None else {}),
                              **({"history_guidance": args.history_guidance} if args.history_guidance != 1 else {}),
                              **({"context": args.context} if args.context else {})}))
        elif args.eval:
            print(json.dumps(evaluate(teacher, vae, preset, args.eval, args.frames, args.steps_sample, args.guidance,
                                      args.shift, **ag)))
        return 0
    rank, world, device = setup_distributed()
    lat = Path(args.latents)
    if not lat.exists():
        if rank == 0:
            vae = VideoVAE.from_folder(args.vae, device=device)
            encode_clips(vae, ShapesClips(preset.width, preset.height, args.frames, seed=args.seed),
                         args.clips, lat, quiet=args.quiet, workers=args.render_workers)
        if world > 1:
            torch.distributed.barrier()
    data = LatentSet(lat)
    if any(not 1 <= n <= data.latents.shape[2] for n in args.latent_lengths):
        p.error(f"--latent-lengths must lie in 1..{data.latents.shape[2]} (the cached clips' latent frames)")
    images = LatentSet(args.images) if args.images else None
    if images is not None and (images.latents.shape[1], *images.latents.shape[3:]) != \
            (data.latents.shape[1], *data.latents.shape[3:]):
        p.error(f"--images {args.images}: latents {tuple(images.latents.shape[1:])} do not match --latents' "
                f"{tuple(data.latents.shape[1:])} (channels and size must agree)")
    model = run_model(out)  # a resumed run's widths (a grown teacher's), else the preset's or the init's
    init = load_teacher(Path(args.init), args.preset) if args.init else None
    if init is not None:  # the init's widths, or what --grow-* asks
        cfg = init.transformer.config
        asked = {"num_layers": args.grow_layers, "ffn_dim": args.grow_ffn}
        grown = {k: cfg[k] if v is None else v for k, v in asked.items()}
        if any(grown[k] < cfg[k] for k in grown):
            p.error(f"--grow-layers / --grow-ffn: the init has {cfg.num_layers} blocks and feed-forward width "
                    f"{cfg.ffn_dim} already (a teacher only grows)")
        model = {k: v for k, v in grown.items() if v != getattr(preset.model, k)}
    teacher = build(args.preset, args.seed, args.text, model)
    if init is not None:  # the optimiser starts afresh: a new run folder, not a resume
        same_text = init.text.cfg.fixed == (args.text == "fixed")
        if same_text:
            teacher.text.load_state_dict(init.text.state_dict(), strict=True)
        grow_transformer(teacher.transformer, init.transformer.state_dict())  # a plain copy unless it grows
    teacher = teacher.to(device)
    if rank == 0:  # so --export, --eval and a resume know the preset (and a grown teacher's widths)
        out.mkdir(parents=True, exist_ok=True)
        (out / "teacher.json").write_text(json.dumps({"preset": args.preset, **({"model": model} if model else {})})
                                          + "\n")
    task = TeacherTask(data, teacher.text, args.p_uncond, args.shift, device, tuple(args.latent_lengths),
                       args.p_context, images, args.image_batch, args.image_weight, args.motion_weight,
                       args.p_independent)
    Trainer(teacher, task, config_from_args(args), out, device=device, resume=not args.no_resume,
            quiet=args.quiet).run()
    del teacher, task  # nothing may hold the (maybe sharded) model past the teardown: teardown_distributed
    teardown_distributed()
    return 0


main = one_line_errors(_main, "distill.train_teacher")

if __name__ == "__main__":
    sys.exit(main())
