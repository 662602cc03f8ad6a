"""python -m engine.convert: an existing checkpoint -> the engine's model folder format (engine/folder.py).

    python -m engine.convert wan_models/Wan2.1-T2V-1.3B-Diffusers --out models/wan-1.3b
    python -m engine.convert checkpoints/self_forcing_dmd.pt --base wan_models/Wan2.1-T2V-1.3B --out models/sf
    python -m engine.convert longlive_models --out models/longlive          # longlive_base.pt + lora.pt, merged
    python -m engine.convert hf://gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt --out models/sf

SRC is anything `--model` takes (see engine/checkpoints.py): a diffusers Wan2.1 folder, the original Wan2.1
folder, a Self-Forcing / CausVid / Reward Forcing / LongLive checkpoint (+ its Wan2.1 base folder for the VAE
and text encoder), or a hub id. The output loads with `--model DIR` and needs nothing else.

Progress goes to stderr, the output folder to stdout. Bad arguments or an unusable source exit with status 2
and one line on stderr; the output folder is written atomically (nothing is left behind on failure).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from .cli import OneLineParser

PROG = "engine.convert"
LAYOUT_CHOICES = ("auto", "diffusers", "wan", "self-forcing", "causvid", "reward-forcing", "longlive")
DTYPES = ("keep", "float32", "bfloat16", "float16")
_HUB_LIKE = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$|^hf://.+")  # engine/checkpoints.py HUB_REPO / HUB_URL



def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m {PROG}", description="Convert an existing checkpoint to an engine model folder.")
    p.add_argument("src", metavar="SRC",
                   help="folder, .pt/.safetensors file or hub id; 'SRC+BASE' / 'SRC+LORA' as with --model")
    p.add_argument("--out", required=True, help="the engine model folder to write")
    p.add_argument("--layout", default="auto", choices=LAYOUT_CHOICES,
                   help="source layout (default: detected from the files and their names)")
    p.add_argument("--base", help="Wan2.1 base folder or hub id for the VAE and text encoder of a causal checkpoint "
                                  "(default: looked up next to the checkpoint, then in the hub cache)")
    p.add_argument("--lora", help="a LoRA file to merge into the transformer (LongLive's lora.pt)")
    p.add_argument("--lora-alpha", type=float,
                   help="LoRA alpha (scale = alpha / rank; default: adapter_config.json, else alpha = rank)")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "generator"),
                   help="which weights of a training checkpoint: generator_ema, generator, or auto (EMA when "
                        "present, except under a LoRA, which was trained on 'generator')")
    p.add_argument("--dtype", default="keep", choices=DTYPES,
                   help="storage dtype of the transformer weights (default: as in the source)")
    p.add_argument("--preview", metavar="FILE",
                   help="also write a fast preview decoder into the folder (preview/, used by --preview): TAEHV's "
                        "weights for these latents (taew2_1.safetensors or .pth for Wan2.1) or a preview folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.src.strip():
        parser.error("SRC must not be empty")
    if not a.out.strip():
        parser.error("--out must not be empty")
    if a.lora_alpha is not None and not 0 < a.lora_alpha < float("inf"):
        parser.error(f"--lora-alpha must be a positive number, got {a.lora_alpha}")
    head = a.src if Path(a.src).exists() else re.sub(rf"^({'|'.join(LAYOUT_CHOICES[1:])}):", "", a.src).split("+")[0]
    if not Path(head).expanduser().exists() and not _HUB_LIKE.match(head):  # answered before torch loads
        parser.error(f"model not found: {head} (not a local path, nor a hub id like org/name or hf://org/name/file)")

    import torch  # heavy imports after argument checks

    from .checkpoints import convert
    from .folder import ModelLoadError

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        if not a.quiet:
            sys.stderr.write(f"[{time.perf_counter() - t0:6.1f} s] {msg}\n")
            sys.stderr.flush()

    dtype = None if a.dtype == "keep" else getattr(torch, a.dtype)
    preview = None
    if a.preview:  # read before the conversion: a bad file costs nothing
        from .preview import load_preview

        try:
            preview = load_preview(a.preview)
        except ModelLoadError as e:
            parser.error(f"--preview: {e}")
    try:
        out = convert(a.src, a.out, layout=a.layout, base=a.base, lora=a.lora, lora_alpha=a.lora_alpha,
                      weights=a.weights, dtype=dtype, overwrite=a.overwrite, progress=progress)
    except ModelLoadError as e:
        parser.error(str(e))
    except OSError as e:  # e.g. --out not writable, disk full
        parser.error(f"--out {a.out}: {e.strerror or e}")
    if preview is not None:
        z = json.loads((Path(out) / "vae" / "config.json").read_text())["z_dim"]
        if preview.cfg.z_dim != z:
            parser.error(f"--preview {a.preview}: it reads {preview.cfg.z_dim} latent channels, the VAE makes {z} "
                         f"({out} was written without it)")
        preview.save(Path(out) / "preview", dtype=dtype)
        progress(f"preview decoder: {a.preview} -> {Path(out) / 'preview'}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
