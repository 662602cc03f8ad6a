"""Model folders: what `--model` points at.

    <folder>/engine.json                      streaming settings: preset (cache, sampler, size, fps), notes
    <folder>/transformer/config.json          diffusers WanTransformer3DModel config
    <folder>/transformer/diffusion_pytorch_model.safetensors
    <folder>/vae/config.json + diffusion_pytorch_model.safetensors      (AutoencoderKLWan)
    <folder>/text_encoder/config.json + weights                          (engine/text.py)
    <folder>/preview/config.json + model.safetensors    optional fast preview decoder (engine/preview.py)

The transformer and VAE sub-folders are diffusers' own layout, so `WanTransformer3DModel.from_pretrained`
reads ours and a teacher saved by diffusers loads as a student. Weights are safetensors only.

`--model` also takes existing checkpoints directly (a diffusers or original Wan2.1 folder, the .pt files of
Self-Forcing, CausVid, Reward Forcing and LongLive, hub ids): `load_model_folder` hands anything that is not an
engine folder to engine/checkpoints.py, and `python -m engine.convert` writes it as an engine folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, Preset, preset_from_dict, to_dict
from .model import CausalWanModel
from .preview import PreviewDecoder
from .text import TextEncoder, load_text_encoder
from .vae import VideoVAE

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = "shapes"
FORMAT = "streamgen-model"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class ModelLoadError(ValueError):
    """A model folder that cannot be used; the message is one line naming the file."""


@dataclass
class LoadedModel:
    path: Path
    preset: Preset
    transformer: CausalWanModel
    vae: VideoVAE
    text: TextEncoder
    info: dict
    preview: PreviewDecoder | None = None  # the optional fast decoder (engine/preview.py)

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)


def resolve(model: str | Path | None) -> Path:
    """A folder path, or the name of a folder in assets/ (default: the shipped model); also a checkpoint file, or
    a Hugging Face hub id (`org/name`, `hf://org/name[/file]`: the local cache, else a download; a one-line error
    when offline)."""
    p = Path(model) if model else ASSETS / DEFAULT_MODEL
    if p.is_dir():
        return p
    if model and (ASSETS / str(model)).is_dir():
        return ASSETS / str(model)
    if model and p.is_file():
        return p
    if model:
        from . import checkpoints
        if checkpoints.is_hub_id(str(model)):
            try:
                return checkpoints.hub_path(str(model))
            except ModelLoadError as e:
                known = sorted(d.name for d in ASSETS.iterdir() if (d / "engine.json").exists()) \
                    if ASSETS.is_dir() else []
                raise ModelLoadError(f"{e} (built-in names: {', '.join(known) or 'none'})") from None
    known = sorted(d.name for d in ASSETS.iterdir() if (d / "engine.json").exists()) if ASSETS.is_dir() else []
    raise ModelLoadError(f"model folder not found: {p} (built-in names: {', '.join(known) or 'none'})")


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"missing {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"unreadable {path}: {e}") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return d


def transformer_config(d: dict, where: Path) -> ModelConfig:
    """ModelConfig from a diffusers transformer config.json (extra diffusers keys must be unset)."""
    known = {f for f in ModelConfig.__dataclass_fields__}
    extra = {k: v for k, v in d.items() if not k.startswith("_") and k not in known and v is not None}
    if extra:
        raise ModelLoadError(f"{where}: unsupported transformer options {sorted(extra)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: {e}") from None


def check_keys(file, want: dict, state: dict):
    """A one-line ModelLoadError naming `file` and the first key of `want` that `state` lacks or mis-shapes."""
    for k, v in want.items():
        if k not in state:
            raise ModelLoadError(f"{file}: missing key {k}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelLoadError(f"{file}: key {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")


def load_state(model: torch.nn.Module, file: Path):
    """Strict load with a one-line error naming the file and the first bad key."""
    try:
        sd = load_file(str(file))
    except FileNotFoundError:
        raise ModelLoadError(f"missing {file}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"corrupt or truncated weights {file}: {e}") from None
    want = model.state_dict()
    check_keys(file, want, sd)
    for k in sd:
        if k not in want:
            raise ModelLoadError(f"{file}: unexpected key {k}")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in sd.items()}, strict=True)


def save_transformer(model: CausalWanModel, folder: Path, dtype=None):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", **model.cfg.diffusers_kwargs()}
    cfg["patch_size"] = list(cfg["patch_size"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})


def _has_linear_memory(file: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return any(".attn1.mem_proj." in k for k in f.keys())
    except (SafetensorError, OSError, ValueError):
        return False  # load_state names the file


def load_transformer(folder: Path, device="cpu", dtype=torch.float32) -> CausalWanModel:
    cfg = transformer_config(_json(folder / "config.json"), folder / "config.json")
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model = model.to_empty(device="cpu")
    if _has_linear_memory(folder / WEIGHTS):  # a student distilled with the linear memory (Hybrid Forcing)
        model.enable_linear_memory()
    load_state(model, folder / WEIGHTS)
    return model.to(device, dtype).eval().requires_grad_(False)


def save_model_folder(path, preset: Preset, transformer: CausalWanModel, vae: VideoVAE, text, *,
                      weights_dtype=None, preview: PreviewDecoder | None = None, **info):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_transformer(transformer, path / "transformer", weights_dtype)
    vae.save(path / "vae")
    text.save(path / "text_encoder")
    if preview is not None:
        preview.save(path / "preview")
    meta = {"format": FORMAT, "version": 1, "name": path.name, **info, "preset": to_dict(preset)}
    (path / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")


def _is_foreign(model) -> bool:
    """Not an engine folder nor an assets/ name, but something engine/checkpoints.py loads."""
    p = Path(model)
    if (p / "engine.json").is_file() or (not p.exists() and (ASSETS / str(model)).is_dir()):
        return False
    from . import checkpoints
    if checkpoints.is_hub_id(str(model)):  # a hub repo may hold an engine folder too
        return not (resolve(model) / "engine.json").is_file()
    return checkpoints.claims(model)


def load_model_folder(model: str | Path | None = None, device="cpu", dtype=torch.float32,
                      text_offload: bool | None = None) -> LoadedModel:
    """An engine model folder (or, through engine/checkpoints.py, any supported checkpoint layout) -> LoadedModel.

    text_offload keeps a umT5 text encoder on the CPU and moves only its embeddings to `device` (None: the
    folder's engine.json "text_offload", default off)."""
    if model is not None and _is_foreign(model):
        from .checkpoints import load_checkpoint
        return load_checkpoint(model, device=device, dtype=dtype, text_offload=bool(text_offload))
    path = resolve(model)
    info = _json(path / "engine.json")
    if info.get("format") != FORMAT:
        raise ModelLoadError(f"{path / 'engine.json'}: not a model folder (format {info.get('format')!r})")
    try:
        preset = preset_from_dict(info["preset"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path / 'engine.json'}: bad preset: {e}") from None
    transformer = load_transformer(path / "transformer", device, dtype)
    preset = replace(preset, model=transformer.cfg)  # the weights' own config is the truth
    for f in (path / "vae" / "config.json", path / "vae" / WEIGHTS):
        if not f.is_file():  # checked here: diffusers would fall back to pickle weights
            raise ModelLoadError(f"missing {f}")
    try:
        vae = VideoVAE.from_folder(path / "vae", device=device, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"unreadable VAE in {path / 'vae'}: {str(e).splitlines()[0]}") from None
    preset = replace(preset, vae=vae.config())  # likewise (e.g. a decoder widened after the folder was made)
    offload = info.get("text_offload", False) if text_offload is None else text_offload
    try:
        text = load_text_encoder(path / "text_encoder", device=device, dtype=dtype,
                                 **({"offload": True} if offload else {}))
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(e).splitlines()[0]) from None
    preview = PreviewDecoder.from_folder(path / "preview", device, dtype) if (path / "preview").is_dir() else None
    return LoadedModel(path, preset, transformer, vae, text, info, preview)
