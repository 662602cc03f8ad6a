"""python -m distill.train_preview: the fast preview decoder (engine/preview.py) for a model's VAE latents.

    python -m distill.train_preview --vae assets/shapes/vae --out runs/preview --steps 600
    python -m distill.train_preview --out runs/preview --export assets/shapes/preview     # + held-out evaluation

The VAE's encoder (frozen) turns rendered Shapes clips into the latents the transformer makes, and the preview
decoder learns to draw the original frames from them. The loss is train_vae's: L1 + MSE weighted towards the
objects and their edges, a term on frame-to-frame change, and scene cuts at latent-group boundaries. The export
writes the EMA weights as a preview folder; put it in a model folder as `preview/` and `--preview` uses it.

The encoder's latents are not quite what a generator makes. `--student MODEL` mixes in the student's own latents
(generated once through the streaming engine, cached in the run folder) with the VAE decoder's frames as their
targets, so that on a generator's latents the preview draws what the VAE's decoder would:

    python -m distill.train_preview --init assets/shapes/preview --student assets/shapes --out runs/preview-st
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.cli import OneLineParser, one_line_errors
from engine.preview import PreviewConfig, PreviewDecoder
from engine.vae import VideoVAE

from .data import ShapesClips, to_tensor, to_uint8
from .train_vae import VAETask, evaluate, evaluate_stream, psnr_db
from .trainer import Trainer, add_train_args, config_from_args, load_weights, setup_distributed

SETTINGS = "preview.json"  # the run's decoder config and VAE, for resume and export
STUDENT_SET = "student-latents.safetensors"  # --student: the student's latents and the VAE's frames of them


class PreviewWithLoss(nn.Module):
    """forward(video, student_z) -> the preview decoder's frames for [the VAE's latents of the first B - k clips of
    video, then student_z's k clips]. The VAE is held outside the module's state (not trained or saved)."""

    def __init__(self, preview: PreviewDecoder, vae: VideoVAE):
        super().__init__()
        self.preview = preview
        self.frozen = {"vae": vae}

    def forward(self, video: torch.Tensor, student_z: torch.Tensor | None = None) -> torch.Tensor:
        k = 0 if student_z is None else student_z.shape[0]
        zs = [student_z] if k else []
        if k < video.shape[0]:  # no gradient: the encoder is the model's, fixed
            zs.insert(0, self.frozen["vae"].encode(video[: video.shape[0] - k]))
        return self.preview(torch.cat(zs) if len(zs) > 1 else zs[0])


# ---- the student's own latents (--student) ----------------------------------------------------------------


@torch.no_grad()
def student_latents(model_path, count: int, latent_frames: int, seed: int, batch: int = 8,
                    quiet: bool = False) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """`count` clips of a model's own latents and the VAE decoder's frames of them: (prompts, latents fp16
    [N, C, F, h, w], frames uint8 [N, T, H, W, 3]). Streams of 2F latent frames are generated through the
    streaming engine (the model's cache and sampler, random prompts, `batch` streams at a time) and cut into
    halves, so that both a stream's first chunks and those after its window has filled are seen. Each half
    is decoded from a fresh decoder state, as the rendered clips are."""
    from distill.shapes import sample_prompt
    from engine.folder import load_model_folder
    from engine.stream import Stream

    model = load_model_folder(model_path)
    fpc = model.preset.cache.frames_per_chunk
    chunks = -(-2 * latent_frames // fpc)
    rng = random.Random(f"student-latents/{seed}")
    streams = -(-count // 2)
    prompts = [sample_prompt(rng) for _ in range(streams)]
    out_p, out_z, out_f = [], [], []
    for s in tqdm(range(0, streams, batch), desc="student latents", unit="batch", disable=quiet):
        ps = prompts[s: s + batch]
        stream = Stream(model.transformer, model.preset, batch=len(ps))
        stream.set_prompt(model.text.encode(ps))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        z = torch.cat([stream.next_chunk(gen) for _ in range(chunks)], dim=2)
        for half in (z[:, :, :latent_frames], z[:, :, latent_frames: 2 * latent_frames]):
            out_z.append(half.half())
            out_f.append(to_uint8(model.vae.decode(half)))
            out_p += ps
    return out_p[:count], torch.cat(out_z)[:count], np.concatenate(out_f)[:count]


def save_student_set(path: Path, prompts, z, frames, meta: dict):
    tmp = path.with_suffix(".tmp")
    save_file({"latents": z.contiguous(), "frames": torch.from_numpy(frames).contiguous()}, str(tmp),
              metadata={"prompts": json.dumps(prompts), **{k: json.dumps(v) for k, v in meta.items()}})
    tmp.replace(path)


class StudentSet:
    """A run's cached student clips: latents [N, C, F, h, w] (float32) and their VAE frames uint8 [N, T, H, W, 3]."""

    def __init__(self, path: Path):
        with safe_open(str(path), "pt") as f:
            self.prompts = json.loads(f.metadata()["prompts"])
        t = load_file(str(path))
        self.latents, self.frames = t["latents"].float(), t["frames"].numpy()

    def __len__(self) -> int:
        return len(self.prompts)


class PreviewTask(VAETask):
    """VAETask's rendered clips (encoded by the frozen VAE in the model's forward) mixed with the student's own
    latents: clip id i is a student clip when frac(i * golden ratio) < p_student (a pure function of the id, spread
    evenly over batches), drawn from the set in turn; its target is the VAE decoder's frames of it."""

    def __init__(self, clips: ShapesClips, device, student: StudentSet | None = None, p_student: float = 0.0,
                 **kw):
        super().__init__(clips, 0.0, device, **kw)
        self.student, self.p_student = student, p_student if student is not None else 0.0

    def is_student(self, i: int) -> bool:
        return (i * 0.6180339887498949) % 1.0 < self.p_student

    def batch(self, ids):
        """{"video": [the rendered clips (with scene cuts), then the student clips' targets], "z": the student
        clips' latents (None when there are none)}: [B, 3, T, H, W] and [k, C, F, h, w]."""
        own = [i for i in ids if self.is_student(i)]
        rendered = [i for i in ids if not self.is_student(i)]
        videos = [self.cut(self.clips.videos(rendered)[1], rendered)] if rendered else []
        if not own:
            return {"video": videos[0], "z": None}
        idx = [i % len(self.student) for i in own]
        videos.append(to_tensor(self.student.frames[idx]))
        return {"video": torch.cat(videos), "z": self.student.latents[idx]}

    def loss(self, model, batch, gen):
        video = batch["video"].to(self.device)
        rec = model(video, batch["z"])
        return self.pixel_loss(rec, video.new_zeros(()), video)


def as_vae(vae: VideoVAE, preview: PreviewDecoder):
    """The VAE's encoder with the preview decoder, for train_vae's evaluate() and evaluate_stream()."""
    return SimpleNamespace(encode=vae.encode, decode=preview.decode, stream=preview.stream)


def decode_ms_per_frame(decoder, z: torch.Tensor, repeats: int = 5) -> float:
    """Streaming decode time per frame of chunks like z [1, C, F, h, w] (after one warm-up chunk)."""
    dec = decoder.stream()
    dec.decode(z)
    t, frames = time.perf_counter(), 0
    for _ in range(repeats):
        frames += dec.decode(z).shape[2]
    return (time.perf_counter() - t) * 1000 / frames


def load_student_set(run: Path, st: dict, latent_frames: int, seed: int, rank: int, quiet: bool) -> StudentSet:
    """The run's student set, generated by rank 0 on first use (the others wait for it)."""
    path = run / STUDENT_SET
    if rank == 0 and not path.is_file():
        prompts, z, frames = student_latents(st["model"], st["clips"], latent_frames, seed, quiet=quiet)
        save_student_set(path, prompts, z, frames, {"model": st["model"], "seed": seed})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return StudentSet(path)


@torch.no_grad()
def evaluate_on_student(preview: PreviewDecoder, settings: dict, count: int, seed: int) -> dict:
    """Held-out clips of the student's own latents (another seed than training's): the preview's PSNR against the
    VAE decoder's frames of them, and the oracle's adherence and motion summary of both."""
    from benchmarks.oracle import motion_summary, score_video

    st = settings["student"]
    prompts, z, target = student_latents(st["model"], count, 9, 10_000 + seed, quiet=True)
    frames = np.concatenate([to_uint8(preview.decode(z[i: i + 8].float())) for i in range(0, len(z), 8)])
    res = {"clips": len(prompts), "psnr_db_vs_vae": psnr_db(target, frames)}
    for name, v in (("vae", target), ("preview", frames)):
        reports = [score_video(x, p) for x, p in zip(v, prompts)]
        res[name] = {"adherence": sum(r.score for r in reports) / len(reports), **motion_summary(reports, prompts)}
    return res


def export(run: Path, out: Path, dtype=None) -> PreviewDecoder:
    settings = json.loads((run / SETTINGS).read_text())
    cfg = PreviewConfig.from_dict(settings["config"])
    model = PreviewDecoder(cfg)
    weights = load_weights(run, "ema")
    model.load_state_dict({k.removeprefix("preview."): v for k, v in weights.items()}, strict=True)
    model.save(out, dtype=dtype)
    return PreviewDecoder.from_folder(out)


def _main(argv=None) -> int:
    p = OneLineParser(prog="python -m distill.train_preview", description=__doc__.split("\n")[0])
    add_train_args(p, steps=600, batch_size=8, lr=1e-3, warmup=50, ckpt_every=50, ema=0.99, out="runs/preview")
    p.add_argument("--vae", default="assets/shapes/vae", help="the VAE folder whose latents it decodes")
    p.add_argument("--channels", type=int, nargs=4, default=[32, 32, 16, 16], metavar="C",
                   help="widths of the three stages and of the last conv")
    p.add_argument("--blocks", type=int, default=2, help="memory blocks per stage")
    p.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("W", "H"), help="training clips' size")
    p.add_argument("--frames", type=int, default=17, help="frames per training clip (1 + 4k)")
    p.add_argument("--object-weight", type=float, default=10.0, help="extra loss weight on object pixels")
    p.add_argument("--halo-weight", type=float, default=4.0, help="extra weight on the background near objects")
    p.add_argument("--motion-weight", type=float, default=1.0, help="weight of the frame-to-frame change loss")
    p.add_argument("--p-cut", type=float, default=0.5, help="fraction of clips that cut to another clip")
    p.add_argument("--init", metavar="DIR", help="start from this preview folder's weights (e.g. a last, annealed phase)")
    p.add_argument("--student", metavar="MODEL", help="also train on this model folder's own latents, with the VAE "
                                                      "decoder's frames as targets (generated once into the run)")
    p.add_argument("--student-clips", type=int, default=1200, metavar="N", help="--student: clips in the set")
    p.add_argument("--p-student", type=float, default=0.5, metavar="F",
                   help="--student: fraction of the training clips that are the student's")
    p.add_argument("--export", metavar="DIR", help="write the EMA weights as a preview folder, then evaluate")
    p.add_argument("--eval", type=int, default=32, metavar="N", help="held-out clips to evaluate after --export")
    p.add_argument("--eval-stream", type=float, default=120.0, metavar="SECONDS",
                   help="after --export, also decode 2 streams this long chunk by chunk (0: skip)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (args.frames - 1) % 4 or args.frames < 5:
        p.error(f"--frames must be 1 + 4k and at least 5, got {args.frames}")
    if min(args.channels) < 1 or args.blocks < 1:
        p.error("--channels and --blocks must be positive")
    if args.eval < 0 or not args.eval_stream >= 0:
        p.error(f"--eval and --eval-stream must be >= 0 (0: skip), got {args.eval} and {args.eval_stream}")
    if args.student_clips < 1 or not 0.0 <= args.p_student <= 1.0:
        p.error(f"--student-clips must be >= 1 and --p-student in [0, 1] (got {args.student_clips} and "
                f"{args.p_student})")
    if args.export:
        if not (out / SETTINGS).is_file():
            raise FileNotFoundError(f"{out / SETTINGS}: not a train_preview run folder")
        settings = json.loads((out / SETTINGS).read_text())
        preview = export(out, Path(args.export))
        vae = VideoVAE.from_folder(settings["vae"])
        res: dict = {"export": args.export, "parameters": sum(t.numel() for t in preview.parameters())}
        if args.eval:
            held_out = ShapesClips(*settings["size"], 33, seed=10_000 + args.seed)
            res["preview"] = evaluate(as_vae(vae, preview), held_out, args.eval)
            res["vae"] = evaluate(vae, held_out, args.eval)
            if args.eval_stream:
                res["preview"]["stream"] = evaluate_stream(as_vae(vae, preview), args.eval_stream,
                                                           width=settings["size"][0], height=settings["size"][1])
            if settings.get("student"):
                res["student_latents"] = evaluate_on_student(preview, settings, min(args.eval, 32), args.seed)
            z = vae.encode(held_out.videos([0])[1])[:, :, :3]
            res["decode_ms_per_frame"] = {"preview": decode_ms_per_frame(preview, z),
                                          "vae": decode_ms_per_frame(vae, z)}
        print(json.dumps(res))
        return 0

    rank, world, device = setup_distributed()
    vae = VideoVAE.from_folder(args.vae, device=device)
    if min(args.size) < 1 or any(s % vae.spatial for s in args.size):
        p.error(f"--size {args.size[0]} {args.size[1]}: must be positive multiples of the VAE's stride {vae.spatial}")
    try:
        cfg = PreviewConfig.for_vae(SimpleNamespace(z_dim=vae.z_dim, scale_factor_spatial=vae.spatial,
                                                    scale_factor_temporal=vae.temporal),
                                    channels=tuple(args.channels), blocks=args.blocks)
    except ValueError as e:
        p.error(f"--vae {args.vae}: {e}")
    init = PreviewDecoder.from_folder(args.init) if args.init else None
    settings = {"vae": args.vae, "config": asdict(cfg), "size": list(args.size)}
    if args.student:
        settings["student"] = {"model": args.student, "clips": args.student_clips, "p": args.p_student}
    if (out / SETTINGS).is_file() and not args.no_resume:  # a resume keeps the run's own decoder
        settings = json.loads((out / SETTINGS).read_text())
        cfg = PreviewConfig.from_dict(settings["config"])
    else:
        if init is not None:  # its config is the run's
            cfg = init.cfg
            settings["config"] = asdict(cfg)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    torch.manual_seed(args.seed)
    preview = PreviewDecoder(cfg)
    if init is not None:  # a resume reads its checkpoint over these
        preview.load_state_dict(init.state_dict())
    model = PreviewWithLoss(preview, vae)
    clips = ShapesClips(*settings["size"], args.frames, seed=args.seed)
    student = None
    if st := settings.get("student"):
        student = load_student_set(out, st, 1 + (args.frames - 1) // vae.temporal, args.seed, rank, args.quiet)
        if student.latents.shape[1] != vae.z_dim:
            raise ValueError(f"{st['model']}: its latents have {student.latents.shape[1]} channels, the VAE "
                             f"{args.vae} {vae.z_dim}: the preview must decode the student's own VAE's latents")
        if student.frames.shape[1:4] != (args.frames, settings["size"][1], settings["size"][0]):
            raise ValueError(f"{out / STUDENT_SET}: clips of {student.frames.shape[1]} frames at "
                             f"{student.frames.shape[3]}x{student.frames.shape[2]}, the run trains on {args.frames} at "
                             f"{settings['size'][0]}x{settings['size'][1]}")
    task = PreviewTask(clips, device, student, st["p"] if st else 0.0, object_weight=args.object_weight,
                       p_cut=args.p_cut, motion_weight=args.motion_weight, halo_weight=args.halo_weight)
    Trainer(model, task, config_from_args(args), out, device=device, resume=not args.no_resume, quiet=args.quiet,
            ema_of="preview").run()
    return 0


main = one_line_errors(_main, "distill.train_preview")

if __name__ == "__main__":
    sys.exit(main())
