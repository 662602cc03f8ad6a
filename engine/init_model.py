"""python -m engine.init_model: write a randomly initialised model folder for a preset.

    python -m engine.init_model --preset shapes --out assets/shapes

This is how the placeholder default model in assets/ is built until trained weights replace it
(distill/ writes trained folders in the same format). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import PRESETS, get_preset
from .folder import save_model_folder
from .model import CausalWanModel
from .text import ShapesTextConfig, ShapesTextEncoder
from .vae import VideoVAE


def random_model_folder(preset_name: str, out, seed: int = 0, weights_dtype=torch.float16, note: str = ""):
    preset = get_preset(preset_name)
    if preset.text_encoder != "shapes":
        raise ValueError(f"preset {preset_name!r} uses {preset.text_encoder}: bring real weights (engine.convert)")
    torch.manual_seed(seed)
    transformer = CausalWanModel(preset.model)
    vae = VideoVAE.from_config(preset.vae, seed=seed)
    text = ShapesTextEncoder(ShapesTextConfig(dim=preset.model.text_dim), seed=seed)
    save_model_folder(out, preset, transformer, vae, text, weights_dtype=weights_dtype, placeholder=True,
                      description=note or f"randomly initialised {preset_name} model (seed {seed}): a placeholder "
                                          "with the real architecture and speed, not trained weights")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.init_model", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shapes", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of the transformer weights (float16 keeps assets/ small)")
    p.add_argument("--description", default="", help="engine.json description (default: says it is a placeholder)")
    a = p.parse_args(argv)
    try:
        random_model_folder(a.preset, a.out, a.seed, getattr(torch, a.weights_dtype), a.description)
    except ValueError as e:
        p.error(str(e))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
