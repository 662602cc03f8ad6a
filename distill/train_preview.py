"""python -m distill.train_preview: the fast preview decoder (engine/preview.py) for a model's VAE latents.

    python -m distill.train_preview --vae assets/shapes/vae --out runs/preview --steps 600
    python -m distill.train_preview --out runs/preview --export assets/shapes/preview     # + held-out evaluation

The VAE's encoder (frozen) turns rendered Shapes clips into the latents the transformer makes, and the preview
decoder learns to draw the original frames from them. The loss is train_vae's: L1 + MSE weighted towards the
objects and their edges, a term on frame-to-frame change, and scene cuts at latent-group boundaries. The export
writes the EMA weights as a preview folder; put it in a model folder as `preview/` and `--preview` uses it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from engine.cli import OneLineParser, one_line_errors
from engine.preview import PreviewConfig, PreviewDecoder
from engine.vae import VideoVAE

from .data import ShapesClips
from .train_vae import VAETask, evaluate, evaluate_stream
from .trainer import Trainer, add_train_args, config_from_args, load_weights, setup_distributed

SETTINGS = "preview.json"  # the run's decoder config and VAE, for resume and export


class PreviewWithLoss(nn.Module):
    """What VAETask trains: forward(video, gen) -> (the preview decoder's reconstruction, 0 as the KL term).
    The VAE is held outside the module's state (not trained or saved)."""

    def __init__(self, preview: PreviewDecoder, vae: VideoVAE):
        super().__init__()
        self.preview = preview
        self.frozen = {"vae": vae}

    def forward(self, video: torch.Tensor, gen: torch.Generator):
        z = self.frozen["vae"].encode(video)  # no gradient: the encoder is the model's, fixed
        return self.preview(z), video.new_zeros(())


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
            z = vae.encode(held_out.videos([0])[1])[:, :, :3]
            res["decode_ms_per_frame"] = {"preview": decode_ms_per_frame(preview, z),
                                          "vae": decode_ms_per_frame(vae, z)}
        print(json.dumps(res))
        return 0

    rank, world, device = setup_distributed()
    vae = VideoVAE.from_folder(args.vae, device=device)
    try:
        cfg = PreviewConfig.for_vae(SimpleNamespace(z_dim=vae.z_dim, scale_factor_spatial=vae.spatial,
                                                    scale_factor_temporal=vae.temporal),
                                    channels=tuple(args.channels), blocks=args.blocks)
    except ValueError as e:
        p.error(f"--vae {args.vae}: {e}")
    init = PreviewDecoder.from_folder(args.init) if args.init else None
    settings = {"vae": args.vae, "config": asdict(cfg), "size": list(args.size)}
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
    task = VAETask(clips, 0.0, device, args.object_weight, p_cut=args.p_cut, motion_weight=args.motion_weight,
                   halo_weight=args.halo_weight)
    Trainer(model, task, config_from_args(args), out, device=device, resume=not args.no_resume, quiet=args.quiet,
            ema_of="preview").run()
    return 0


main = one_line_errors(_main, "distill.train_preview")

if __name__ == "__main__":
    sys.exit(main())
