"""Existing checkpoints -> the engine: layout detection, safe reading and key mapping.

What `--model` (and `python -m engine.convert`) accepts besides the engine's own model folders:

  layout           what it is                                                  where VAE + text encoder come from
  ---------------  ----------------------------------------------------------  -----------------------------------
  diffusers        a diffusers Wan2.1 pipeline folder (Wan-AI/Wan2.1-T2V-1.3B-  the same folder (vae/, text_encoder/,
                   Diffusers): model_index.json, transformer/ (sharded or not)  tokenizer/)
  wan              the original Wan2.1 release (Wan-AI/Wan2.1-T2V-1.3B):        the same folder (Wan2.1_VAE.pth,
                   config.json (WanModel), diffusion_pytorch_model*.safetensors models_t5_umt5-xxl-enc-bf16.pth,
                                                                                google/umt5-xxl/)
  self-forcing     guandeh17/Self-Forcing checkpoints/self_forcing_dmd.pt        a Wan2.1 base folder (wan or
  causvid          tianweiy/CausVid autoregressive_checkpoint/model.pt           diffusers layout): given after a
  reward-forcing   JaydenLyh/Reward-Forcing rewardforcing.pt                     '+', or found where the peers'
  longlive         NVlabs/LongLive longlive_base.pt (+ lora.pt, merged)          READMEs put it, or in the hub cache

Spec grammar: `[LAYOUT:]SOURCE[+EXTRA]...`. SOURCE is a local folder or file, or a Hugging Face hub id
(`org/name`, `hf://org/name`, or `hf://org/name/path/in/repo.pt` for one file of a repo; a bare `a/b/c` is a
local path). Each EXTRA is a folder (the Wan2.1 base for
a causal checkpoint) or a file (a LoRA to merge into the transformer). A path that exists as written is never split.

Key facts (read from the peers' code; see the README section "Using existing checkpoints"):
  - The causal checkpoints are `torch.save`d dicts {"generator", "critic"[, "generator_ema"], ...} (Self-Forcing,
    CausVid, LongLive trainers) or a bare generator state dict (Reward Forcing's rewardforcing.pt). The generator is
    a `WanDiffusionWrapper`, so every key carries a `model.` prefix over the original Wan names
    (`model.blocks.0.self_attn.q.weight`). FSDP/activation-checkpoint/torch.compile wrappers may leave
    `_fsdp_wrapped_module.` / `_checkpoint_wrapped_module.` / `_orig_mod.` segments (LongLive strips the first one
    from EMA weights); DDP leaves `module.`. All are removed here.
  - Which weights: Self-Forcing's README runs `--use_ema` (generator_ema); CausVid and LongLive load "generator"
    (LongLive's LoRA was trained on top of "generator"). Default here: generator_ema when present unless a LoRA is
    merged, else generator, else model, else the bare dict.
  - LongLive ships LoRA (peft, rank 256, alpha 256 on every Linear of each attention block): lora.pt holds
    {"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight", ...}, "critic_lora", "step"}.
    It is merged: W += (alpha / r) * B @ A. Other adapter kinds (DoRA, embedding LoRA, LoRA biases) are refused.
  - Original Wan -> diffusers names (diffusers' scripts/convert_wan_to_diffusers.py): time_embedding.{0,2} ->
    condition_embedder.time_embedder.linear_{1,2}, text_embedding.{0,2} -> condition_embedder.text_embedder.linear_
    {1,2}, time_projection.1 -> condition_embedder.time_proj, self_attn/cross_attn -> attn1/attn2, q/k/v/o ->
    to_q/to_k/to_v/to_out.0, blocks.N.norm3 (the affine cross-attention norm) -> blocks.N.norm2, ffn.{0,2} ->
    ffn.net.0.proj / ffn.net.2, blocks.N.modulation -> blocks.N.scale_shift_table, head.head -> proj_out,
    head.modulation -> scale_shift_table. No tensor changes shape.
  - Wan2.1_VAE.pth -> AutoencoderKLWan names (diffusers' convert_wan_vae_to_diffusers): conv1/conv2 ->
    quant_conv/post_quant_conv, {en,de}coder.conv1 -> conv_in, head.{0,2} -> norm_out/conv_out, middle.{0,1,2} ->
    mid_block.{resnets.0, attentions.0, resnets.1}, residual.{0,2,3,6} -> norm1/conv1/norm2/conv2, shortcut ->
    conv_shortcut, encoder.downsamples.i -> encoder.down_blocks.i, decoder.upsamples.i regrouped into
    up_blocks.b.resnets.r / up_blocks.b.upsamplers.0.
  - models_t5_umt5-xxl-enc-bf16.pth (Wan's own T5Encoder, umt5_xxl: vocab 256384, dim 4096, 24 layers, 64 heads,
    ffn 10240, 32 buckets, a relative position table per layer) -> transformers UMT5EncoderModel:
    token_embedding -> shared / encoder.embed_tokens, blocks.i.attn.{q,k,v,o} -> encoder.block.i.layer.0.
    SelfAttention.{q,k,v,o}, blocks.i.pos_embedding.embedding -> ...SelfAttention.relative_attention_bias,
    norm1/norm2 -> layer.0/layer.1 .layer_norm, ffn.gate.0/fc1/fc2 -> DenseReluDense.wi_0/wi_1/wo, norm ->
    encoder.final_layer_norm.

Only safetensors and `torch.load(weights_only=True)` are used: a pickle holding anything but tensors and plain
containers is refused, never executed. Every failure is a one-line `ModelLoadError` naming the file (and, for
bad weights, the first bad key as the file spells it).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import CacheConfig, ModelConfig, Preset, SamplerConfig, VAEConfig, get_preset, to_dict
from .folder import FORMAT, WEIGHTS, LoadedModel, ModelLoadError, _json, check_keys, transformer_config

LAYOUTS = ("diffusers", "wan", "self-forcing", "causvid", "reward-forcing", "longlive")
CAUSAL = ("self-forcing", "causvid", "reward-forcing", "longlive")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
HEAD_DIM = 128  # Wan2.1's attention head width at every size (1.3B: 12 x 128, 14B: 40 x 128)
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = Path("google") / "umt5-xxl"
# The 16-channel latent statistics of the Wan2.1 VAE (diffusers' AutoencoderKLWan defaults; Self-Forcing's
# utils/wan_wrapper.py WanVAEWrapper has the same numbers).
WAN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# Where the peers' READMEs put the Wan2.1 base, relative to a folder above the checkpoint, then the hub cache.
BASE_DIRS = ("wan_models/Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B-Diffusers",
             "checkpoints/Wan2.1-T2V-1.3B", "wan_models/Wan2.1-T2V-1.3B-Diffusers")
BASE_HUB_IDS = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B")
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
HUB_URL = re.compile(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(/[^+]+)?$")  # hf://org/name[/path/in/repo]


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ==============================================================================================================
# Streaming settings of each peer (engine.json preset). local_attn_size counts sink + rolling + current chunk.
# ==============================================================================================================

_RELEASE_SAMPLER = SamplerConfig(timesteps=(1000.0, 750.0, 500.0, 250.0), shift=5.0)
PEER_SETTINGS: dict[str, tuple[CacheConfig, SamplerConfig, str]] = {
    # configs/self_forcing_dmd.yaml: num_frame_per_block 3, local_attn_size -1 (a 21-frame cache, no sink),
    # denoising_step_list [1000, 750, 500, 250] with warp_denoising_step, timestep_shift 5.
    "self-forcing": (CacheConfig(frames_per_chunk=3, window_frames=18, sink="none"), _RELEASE_SAMPLER,
                     "Self-Forcing: chunks of 3 latent frames over a 21-frame cache (window 18, no sink), 4 steps"),
    # configs/wan_causal_dmd.yaml: num_frame_per_block 3, steps [1000, 757, 522] used as is (warp_denoising_step
    # false), full causal attention over 21 frames.
    "causvid": (CacheConfig(frames_per_chunk=3, window_frames=18, sink="none"),
                SamplerConfig(timesteps=(1000.0, 757.0, 522.0), shift=1.0),
                "CausVid: chunks of 3 latent frames over a 21-frame cache, 3 steps (1000, 757, 522) unwarped"),
    # configs/reward_forcing.yaml: local_attn_size 9, sink_size 3, EMA sink (compression_alpha 0.999).
    "reward-forcing": (CacheConfig(frames_per_chunk=3, window_frames=3, sink="ema", sink_frames=3, ema_alpha=0.999),
                       _RELEASE_SAMPLER,
                       "Reward Forcing: 9-frame cache = EMA sink 3 + window 3 + chunk 3 (alpha 0.999), 4 steps"),
    # configs/longlive_inference.yaml (v1.0): local_attn_size 12, sink_size 3 (frame sink), 4 steps.
    "longlive": (CacheConfig(frames_per_chunk=3, window_frames=6, sink="static", sink_frames=3), _RELEASE_SAMPLER,
                 "LongLive: 12-frame cache = static sink 3 + window 6 + chunk 3, 4 steps"),
}
BIDIRECTIONAL_NOTE = ("a bidirectional Wan2.1 model (a teacher): it loads and runs, but it was not trained to "
                      "stream chunk by chunk; distill it or use a causal checkpoint")


# ==============================================================================================================
# Safe reading
# ==============================================================================================================


def read_tensors(file: Path) -> object:
    """A weights file -> its contents: a flat {name: tensor} (safetensors) or the unpickled object (torch.save,
    weights_only). Errors are one line naming the file (and the first cut-off tensor of a truncated file)."""
    file = Path(file)
    if not file.is_file():
        raise ModelLoadError(f"missing {file}")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            bad = _safetensors_first_bad(file)
            raise ModelLoadError(f"corrupt or truncated {file}: {bad or _first_line(e)}") from None
    return _torch_load(file)


def _torch_load(file: Path) -> object:
    def load(mmap):
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return load(False)  # a legacy (non-zip) torch.save file cannot be memory-mapped
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            what = next((ln.strip() for ln in msg.splitlines() if "unsupported" in ln.lower()), "see torch.load")
            raise ModelLoadError(f"refused to load {file}: it pickles objects other than tensors and plain containers "
                                 f"(only torch.load(weights_only=True) is used; {what})") from None
        raise ModelLoadError(f"{file} is not a torch checkpoint or safetensors file ({_first_line(e)})") from None
    except (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:
        # the legacy (non-zip) reader fed with something that is not a pickle
        what = f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{file} is not a torch checkpoint or safetensors file ({what})") from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as e:
        bad = _pt_first_bad(file)
        raise ModelLoadError(f"corrupt or truncated {file}: {bad or _first_line(e)}") from None


def _safetensors_first_bad(file: Path) -> str | None:
    """The first tensor (in file order) whose bytes are cut off, read from the header alone."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"the file has {size} bytes, not even the 8-byte header length"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"the header is cut off ({size} of {8 + n} bytes)"
            header = json.loads(f.read(n))
        data = size - 8 - n
        spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()
                       if k != "__metadata__")
        for _, end, k in spans:
            if end > data:
                return f"first bad key {k}: its data ends at byte {8 + n + end} but the file has {size}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return None


class _StorageRef:
    def __init__(self, key: str, nbytes: int):
        self.key, self.nbytes = key, nbytes


class _TensorRef:
    def __init__(self, storage: _StorageRef):
        self.storage = storage


_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                  "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


class _IndexUnpickler(pickle.Unpickler):
    """Reads a torch.save key index (data.pkl) without creating any object but dicts and stubs: find_class
    answers only with the stubs below, so nothing in the file can run. Used only to name the first cut-off key."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return lambda storage, *a, **k: _TensorRef(storage)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *a, **k: data
        if module == "torch" and name.endswith("Storage"):
            return name[: -len("Storage")]
        if module == "torch" and name in ("device", "Size"):
            return lambda *a: None
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor index")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel)
        kind = pid[1] if isinstance(pid[1], str) else "Byte"
        return _StorageRef(str(pid[2]), int(pid[4]) * _ELEMENT_BYTES.get(kind, 1))


def _pt_first_bad(file: Path) -> str | None:
    """For a truncated torch.save zip: walk the local file headers (the central directory at the end is gone),
    read the key index (data.pkl, first in the archive) and name the first key whose storage is cut off."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            hdr = f.read(30)
            if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
                return None
            nlen, xlen = struct.unpack("<HH", hdr[26:30])
            name = f.read(nlen).decode("utf-8", "replace")
            if not name.endswith("data.pkl"):
                return None
            prefix = name[: -len("data.pkl")]
            f.seek(30 + nlen + xlen)
            try:
                index = _IndexUnpickler(f).load()
            except Exception:
                return "the key index (data.pkl) itself is cut off"
            storages: dict[str, int] = {}

            def walk(obj, path):
                if isinstance(obj, dict):
                    for k, v in obj.items():
                        yield from walk(v, f"{path}{k}" if not path else f"{path}/{k}")
                elif isinstance(obj, (list, tuple)):
                    for i, v in enumerate(obj):
                        yield from walk(v, f"{path}[{i}]")
                elif isinstance(obj, _TensorRef):
                    storages[obj.storage.key] = obj.storage.nbytes
                    yield path, obj.storage.key

            keys = list(walk(index, ""))
            complete: set[str] = set()
            pos = 30 + nlen + xlen  # scan from data.pkl's start: the unpickler may have read ahead
            while True:
                j = _find(f, b"PK\x03\x04", pos, size)
                if j is None:
                    break
                f.seek(j)
                hdr = f.read(30)
                if len(hdr) < 30:
                    break
                nlen, xlen = struct.unpack("<HH", hdr[26:30])
                entry = f.read(nlen).decode("utf-8", "replace")
                start = j + 30 + nlen + xlen
                skey = entry[len(prefix) + len("data/"):] if entry.startswith(prefix + "data/") else None
                if skey in storages:
                    if start + storages[skey] > size:
                        break
                    complete.add(skey)
                    pos = start + storages[skey]
                else:  # another archive entry, or these four bytes inside data: look further
                    pos = start if entry.startswith(prefix) else j + 4
        for path, skey in keys:
            if skey not in complete:
                return f"first bad key {path}: its data is cut off ({size} bytes in the file)"
        return f"all {len(keys)} tensors are whole, the archive's directory at the end is cut off or damaged"
    except (OSError, struct.error, ValueError):
        return None


def _find(f, needle: bytes, start: int, size: int, window: int = 1 << 16) -> int | None:
    pos = start
    while pos < size:
        f.seek(pos)
        buf = f.read(window + len(needle))
        i = buf.find(needle)
        if i >= 0:
            return pos + i
        if len(buf) <= len(needle):
            return None
        pos += window
    return None


def read_sharded(folder: Path, stem: str) -> tuple[dict, Path]:
    """`{stem}.safetensors`, or the shards listed in `{stem}.safetensors.index.json` -> (state, file for errors)."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return read_tensors(single), single
    if not index.is_file():
        pickles = sorted(p.name for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES)
        hint = (f" (found {', '.join(pickles)}: pickled weights are not loaded, convert them to safetensors)"
                if pickles else "")
        raise ModelLoadError(f"missing {single} (or {index.name}){hint}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ModelLoadError(f"unreadable shard index {index}: {_first_line(e)}") from None
    state: dict = {}
    for shard in dict.fromkeys(weight_map.values()):
        part = read_tensors(folder / shard)
        state.update(part)
    for k, shard in weight_map.items():
        if k not in state:
            raise ModelLoadError(f"{folder / shard}: missing key {k} (listed in {index.name})")
    return state, index


# ==============================================================================================================
# Wrappers and prefixes
# ==============================================================================================================


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_entry(obj, file: Path, weights: str = "auto", lora: bool = False) -> tuple[str | None, dict]:
    """A training checkpoint's dict -> (entry name, the generator's state dict)."""
    if _is_state(obj):
        if weights == "ema":
            raise ModelLoadError(f"{file}: --weights ema: the file is a bare state dict without 'generator_ema'")
        return None, obj
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{file}: expected a state dict or a dict of them, found {type(obj).__name__}")
    if weights == "ema":
        order = ["generator_ema"]
    elif weights == "generator":
        order = ["generator"]
    elif lora:
        order = ["generator", "model", "state_dict", "generator_ema"]
    else:
        order = ["generator_ema", "generator", "model", "state_dict"]
    for name in order:
        if name in obj and _is_state(obj[name]):
            return name, obj[name]
    entries = sorted(str(k) for k in obj)
    raise ModelLoadError(f"{file}: no generator weights (looked for {', '.join(order)}; the file has "
                         f"{', '.join(entries[:8]) or 'nothing'})")


def strip_wrappers(sd: dict) -> tuple[dict, dict]:
    """Remove FSDP / checkpoint / compile segments and a DDP `module.` prefix -> (state, clean key -> raw key)."""
    out, raw = {}, {}
    for k, v in sd.items():
        c = k
        for seg in WRAPPER_SEGMENTS:
            c = c.replace(seg, "")
        if c.startswith("module."):
            c = c[len("module."):]
        out[c], raw[c] = v, k
    return out, raw


def common_prefix(keys, candidates=("model.diffusion_model.", "diffusion_model.", "model.")) -> str:
    keys = list(keys)
    for p in candidates:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


# ==============================================================================================================
# Transformer key names: original Wan <-> diffusers (the engine's)
# ==============================================================================================================

_WAN_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_WAN_BLOCK = {
    "norm3": "norm2",  # Wan's affine cross-attention norm; its norm2 (pre-FFN) has no parameters
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _w, _d in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _p, _q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                   ("norm_k", "norm_k")):
        _WAN_BLOCK[f"{_w}.{_p}"] = f"{_d}.{_q}"
_WAN_TOP_INV = {v: k for k, v in _WAN_TOP.items()}
_WAN_BLOCK_INV = {v: k for k, v in _WAN_BLOCK.items()}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, top: dict, block: dict, tables: tuple[str, str]) -> str | None:
    """Rename one key with a top-level table and a per-block table; `tables` = (modulation name here, there)."""
    here, there = tables
    if key == ("head.modulation" if here == "modulation" else "scale_shift_table"):
        return "scale_shift_table" if here == "modulation" else "head.modulation"
    m = _BLOCK_KEY.match(key)
    rest = m.group(2) if m else key
    if m and rest == here:
        return f"blocks.{m.group(1)}.{there}"
    mod, _, param = rest.rpartition(".")
    table = block if m else top
    if param not in ("weight", "bias") or mod not in table:
        return None
    return f"blocks.{m.group(1)}.{table[mod]}.{param}" if m else f"{table[mod]}.{param}"


def wan_to_diffusers_key(key: str) -> str | None:
    """An original Wan transformer key -> the diffusers / engine name (None: not a Wan T2V key)."""
    return _rename(key, _WAN_TOP, _WAN_BLOCK, ("modulation", "scale_shift_table"))


def diffusers_to_wan_key(key: str) -> str | None:
    """The inverse of wan_to_diffusers_key (used to name keys in errors as the file spells them)."""
    return _rename(key, _WAN_TOP_INV, _WAN_BLOCK_INV, ("scale_shift_table", "modulation"))


@dataclass
class Weights:
    """A transformer state dict in the engine's (diffusers) names, with what is needed to name keys as the file
    spells them in errors."""
    state: dict
    file: Path
    naming: str = "diffusers"  # how the file names keys: 'wan' or 'diffusers'
    prefix: str = ""  # e.g. 'model.' (WanDiffusionWrapper)
    entry: str | None = None  # e.g. 'generator_ema'
    raw: dict = field(default_factory=dict)  # clean source key -> key as stored
    heads: int | None = None  # from a config.json, when the file came with one
    extra: dict = field(default_factory=dict)

    def source_key(self, key: str) -> str:
        """An engine key -> the key as this file would spell it."""
        k = diffusers_to_wan_key(key) if self.naming == "wan" else key
        k = self.prefix + (k or key)
        k = self.raw.get(k, k)
        return f"{self.entry}/{k}" if self.entry else k

    def where(self) -> str:
        return str(self.file)


def to_engine_names(sd: dict, file: Path, entry: str | None = None, raw: dict | None = None) -> Weights:
    """A (wrapper-free) transformer state dict in original Wan or diffusers names -> Weights in engine names."""
    raw = raw or {}
    prefix = common_prefix(sd)
    body = {k[len(prefix):]: v for k, v in sd.items()}
    shown = (lambda k: (f"{entry}/" if entry else "") + raw.get(prefix + k, prefix + k))
    if "proj_out.weight" in body or "condition_embedder.time_proj.weight" in body:
        naming, state = "diffusers", body
    elif "head.head.weight" in body or "time_projection.1.weight" in body or any(
            k.startswith("blocks.0.self_attn.") for k in body):
        naming, state = "wan", {}
        for k, v in body.items():
            new = wan_to_diffusers_key(k)
            if new is None:
                what = ("not supported: image-conditioning (I2V) weights" if "img" in k
                        else "not a Wan2.1 text-to-video key")
                raise ModelLoadError(f"{file}: unexpected key {shown(k)} ({what})")
            state[new] = v
    else:
        first = next(iter(sd), "nothing")
        raise ModelLoadError(f"{file}: no Wan transformer weights found (first key: {(raw or {}).get(first, first)})")
    return Weights(state, Path(file), naming, prefix, entry, raw)


def infer_config(w: Weights) -> ModelConfig:
    """ModelConfig from tensor shapes (heads: from a config.json when known, else width / 128 as in Wan2.1)."""
    sd = w.state

    def need(k):
        if k not in sd:
            raise ModelLoadError(f"{w.where()}: missing key {w.source_key(k)}")
        return sd[k]

    pe = need("patch_embedding.weight")
    if pe.ndim != 5:
        raise ModelLoadError(f"{w.where()}: key {w.source_key('patch_embedding.weight')} has shape "
                             f"{tuple(pe.shape)}, expected a 3-D convolution [dim, in, t, h, w]")
    dim, cin, patch = pe.shape[0], pe.shape[1], tuple(int(s) for s in pe.shape[2:])
    text_dim = need("condition_embedder.text_embedder.linear_1.weight").shape[1]
    freq_dim = need("condition_embedder.time_embedder.linear_1.weight").shape[1]
    out = need("proj_out.weight").shape[0] // max(1, math.prod(patch))
    layers = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    ffn = need("blocks.0.ffn.net.0.proj.weight").shape[0] if layers else 4 * dim
    heads = w.heads
    if heads is None:
        if dim % HEAD_DIM:
            raise ModelLoadError(f"{w.where()}: cannot tell the number of attention heads of width {dim} "
                                 f"(Wan uses {HEAD_DIM}-wide heads)")
        heads = dim // HEAD_DIM
    if dim % heads:
        raise ModelLoadError(f"{w.where()}: width {dim} is not a multiple of {heads} heads")
    try:
        return ModelConfig(patch_size=patch, num_attention_heads=heads, attention_head_dim=dim // heads,
                           in_channels=cin, out_channels=out, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn,
                           num_layers=layers, cross_attn_norm="blocks.0.norm2.weight" in sd or layers == 0)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{w.where()}: {e}") from None


def check_state(want: dict, w: Weights) -> None:
    """Strict key and shape check, in the model's order; the message names the first bad key as stored."""
    for k, v in want.items():
        if k not in w.state:
            raise ModelLoadError(f"{w.where()}: missing key {w.source_key(k)}")
        if tuple(w.state[k].shape) != tuple(v.shape):
            raise ModelLoadError(f"{w.where()}: key {w.source_key(k)} has shape {tuple(w.state[k].shape)}, "
                                 f"expected {tuple(v.shape)}")
    for k in w.state:
        if k not in want:
            raise ModelLoadError(f"{w.where()}: unexpected key {w.source_key(k)}")


def build_transformer(w: Weights, cfg: ModelConfig | None = None, device="cpu", dtype=torch.float32):
    from .model import CausalWanModel
    cfg = cfg or infer_config(w)
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    check_state(model.state_dict(), w)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        model.load_state_dict(w.state, strict=True)  # copy_ casts to the model's dtype
    return model.to(device).eval().requires_grad_(False)


# ==============================================================================================================
# LoRA (LongLive)
# ==============================================================================================================

_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def merge_lora(sd: dict, lora_obj, file: Path, alpha: float | None = None, into: str = "") -> dict:
    """Merge a peft LoRA state dict into `sd` (original names, wrapper-free, prefix `into`): W += alpha/r * B @ A.
    Returns a summary {modules, rank, scale}."""
    file = Path(file)
    if isinstance(lora_obj, dict) and "generator_lora" in lora_obj:
        lora_obj = lora_obj["generator_lora"]
    if not _is_state(lora_obj):
        raise ModelLoadError(f"{file}: not a LoRA state dict (expected 'generator_lora' or lora_A/lora_B tensors)")
    cfg_file = file.parent / "adapter_config.json"
    rs = False
    if cfg_file.is_file():
        try:
            acfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"unreadable {cfg_file}: {_first_line(e)}") from None
        if acfg.get("use_dora"):
            raise ModelLoadError(f"{cfg_file}: not supported: DoRA adapters (use_dora)")
        alpha = alpha if alpha is not None else acfg.get("lora_alpha")
        rs = bool(acfg.get("use_rslora"))
    pairs: dict[str, dict] = {}
    for k, v in lora_obj.items():
        c = k
        for seg in WRAPPER_SEGMENTS:
            c = c.replace(seg, "")
        for p in ("base_model.model.", "module."):
            if c.startswith(p):
                c = c[len(p):]
        m = _LORA_KEY.match(c)
        if not m:
            what = ("DoRA magnitude vectors" if "lora_magnitude" in c else "LoRA on embeddings" if "lora_embedding" in c
                    else "LoRA biases" if ".lora_B" in c and c.endswith("bias") else "a non-LoRA tensor")
            raise ModelLoadError(f"{file}: not supported: key {k} ({what}; only plain LoRA lora_A/lora_B weights "
                                 "on Linear layers are merged)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = (k, v)
    ranks = set()
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))[0]
            raise ModelLoadError(f"{file}: key {have} has no lora_{'B' if 'A' in ab else 'A'} partner")
        (ka, a), (kb, b) = ab["A"], ab["B"]
        target = next((t for t in (into + mod + ".weight", mod + ".weight") if t in sd), None)
        if target is None:
            raise ModelLoadError(f"{file}: key {ka} targets {into}{mod}.weight, which the base checkpoint lacks")
        wt = sd[target]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(wt.shape):
            raise ModelLoadError(f"{file}: key {ka} / {kb} shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit "
                                 f"{target} {tuple(wt.shape)}")
        scale = (alpha if alpha is not None else r) / (math.sqrt(r) if rs else r)
        sd[target] = (wt.float() + scale * (b.float() @ a.float())).to(wt.dtype)
        ranks.add(r)
    if not pairs:
        raise ModelLoadError(f"{file}: empty LoRA")
    r = max(ranks)
    scale = (alpha if alpha is not None else r) / (math.sqrt(r) if rs else r)
    return {"modules": len(pairs), "rank": r, "scale": scale}


# ==============================================================================================================
# The original Wan VAE (Wan2.1_VAE.pth) -> AutoencoderKLWan
# ==============================================================================================================

_RES = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
        "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
        "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_VAE_TOP = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
            "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
for _side in ("encoder", "decoder"):
    for _p in ("weight", "bias"):
        _VAE_TOP[f"{_side}.conv1.{_p}"] = f"{_side}.conv_in.{_p}"
        _VAE_TOP[f"{_side}.head.2.{_p}"] = f"{_side}.conv_out.{_p}"
    _VAE_TOP[f"{_side}.head.0.gamma"] = f"{_side}.norm_out.gamma"
_SAMPLE_PART = re.compile(r"^(resample\.\d+|time_conv)\.(weight|bias)$")


def _vae_groups(sd: dict, side: str, name: str) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict] = {}
    pre = f"{side}.{name}."
    for k, v in sd.items():
        if k.startswith(pre):
            i, _, rest = k[len(pre):].partition(".")
            if i.isdigit():
                out.setdefault(int(i), {})[rest] = v
    return dict(sorted(out.items()))


def wan_vae_to_diffusers(sd: dict, file: Path) -> tuple[dict, dict]:
    """Original Wan VAE keys -> (AutoencoderKLWan state, its config kwargs inferred from shapes)."""
    file = Path(file)
    sd, _ = strip_wrappers(sd)
    if "decoder.middle.0.residual.0.gamma" not in sd:
        first = next(iter(sd), "nothing")
        raise ModelLoadError(f"{file}: not a Wan VAE (no decoder.middle.0.residual.0.gamma; first key: {first})")
    out, done = {}, set()

    def put(src, dst):
        out[dst] = sd[src]
        done.add(src)

    def bad(k, why):
        raise ModelLoadError(f"{file}: unexpected key {k} ({why})")

    for k in sd:
        if k in _VAE_TOP:
            put(k, _VAE_TOP[k])
    for side in ("encoder", "decoder"):
        for i, parts in _vae_groups(sd, side, "middle").items():
            for rest in parts:
                src = f"{side}.middle.{i}.{rest}"
                if i == 1:
                    put(src, f"{side}.mid_block.attentions.0.{rest}")
                elif i in (0, 2) and rest in _RES:
                    put(src, f"{side}.mid_block.resnets.{i // 2}.{_RES[rest]}")
                else:
                    bad(src, "not part of the Wan VAE middle block")

    # encoder: a flat list of residual blocks and resamplers, same indices in diffusers
    enc = _vae_groups(sd, "encoder", "downsamples")
    stages, res_in_stage, dim_mult, temporal = [], 0, [], []
    base_dim = sd["encoder.conv1.weight"].shape[0] if "encoder.conv1.weight" in sd else None
    for i, parts in enc.items():
        for rest in parts:
            src = f"encoder.downsamples.{i}.{rest}"
            if rest in _RES:
                put(src, f"encoder.down_blocks.{i}.{_RES[rest]}")
            elif _SAMPLE_PART.match(rest):
                put(src, f"encoder.down_blocks.{i}.{rest}")
            else:
                bad(src, "attention inside the encoder stages is not a Wan2.1 VAE")
        if any(r.startswith("resample.") for r in parts):
            stages.append(res_in_stage)
            temporal.append(any(r.startswith("time_conv.") for r in parts))
            res_in_stage = 0
        elif "residual.6.weight" in parts:
            res_in_stage += 1
            if res_in_stage == 1 and base_dim:
                dim_mult.append(parts["residual.6.weight"].shape[0] // base_dim)
    stages.append(res_in_stage)

    # decoder: residual blocks then one upsampler per stage (none after the last)
    #          -> up_blocks.b.resnets.r / up_blocks.b.upsamplers.0
    b = r = 0
    for i, parts in _vae_groups(sd, "decoder", "upsamples").items():
        is_sampler = any(x.startswith(("resample.", "time_conv.")) for x in parts)
        for rest in parts:
            src = f"decoder.upsamples.{i}.{rest}"
            if is_sampler and _SAMPLE_PART.match(rest):
                put(src, f"decoder.up_blocks.{b}.upsamplers.0.{rest}")
            elif not is_sampler and rest in _RES:
                put(src, f"decoder.up_blocks.{b}.resnets.{r}.{_RES[rest]}")
            else:
                bad(src, "not a Wan2.1 VAE decoder part")
        if is_sampler:
            b, r = b + 1, 0
        else:
            r += 1
    for k in sd:
        if k not in done:
            bad(k, "not a Wan2.1 VAE key")

    if base_dim is None or "conv2.weight" not in sd:
        raise ModelLoadError(f"{file}: missing key {'encoder.conv1.weight' if base_dim is None else 'conv2.weight'}")
    z_dim = sd["conv2.weight"].shape[0]
    nres = stages[0] if stages else 0
    if len(set(stages)) > 1 or not nres:
        raise ModelLoadError(f"{file}: the encoder stages have {stages} residual blocks; a Wan VAE has the same "
                             "number in every stage")
    cfg = dict(base_dim=int(base_dim), z_dim=int(z_dim), dim_mult=[int(d) for d in dim_mult], num_res_blocks=nres,
               attn_scales=[], temperal_downsample=temporal,
               latents_mean=list(WAN_LATENTS_MEAN) if z_dim == 16 else [0.0] * z_dim,
               latents_std=list(WAN_LATENTS_STD) if z_dim == 16 else [1.0] * z_dim)
    return out, cfg


def build_vae(state: dict, cfg: dict, file: Path, device="cpu", dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    from .vae import VideoVAE
    try:
        with torch.device("meta"):
            vae = AutoencoderKLWan(**cfg)
    except (TypeError, ValueError, IndexError) as e:
        raise ModelLoadError(f"{file}: unusable VAE shapes ({_first_line(e)})") from None
    want = vae.state_dict()
    check_keys(file, want, state)
    vae = vae.to_empty(device="cpu")
    with torch.no_grad():
        vae.load_state_dict(state, strict=True)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return VideoVAE(vae.to(device))


# ==============================================================================================================
# Wan's umT5 encoder (models_t5_umt5-xxl-enc-bf16.pth) -> transformers UMT5EncoderModel
# ==============================================================================================================

_T5_BLOCK = {"attn.q.weight": "layer.0.SelfAttention.q.weight", "attn.k.weight": "layer.0.SelfAttention.k.weight",
             "attn.v.weight": "layer.0.SelfAttention.v.weight", "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm1.weight": "layer.0.layer_norm.weight", "norm2.weight": "layer.1.layer_norm.weight",
             "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
             "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}


def wan_t5_to_transformers(sd: dict, file: Path):
    """-> (UMT5EncoderModel state dict, UMT5Config)."""
    from transformers import UMT5Config
    file = Path(file)
    sd, _ = strip_wrappers(sd)
    if "token_embedding.weight" not in sd:
        first = next(iter(sd), "nothing")
        raise ModelLoadError(f"{file}: not Wan's umT5 encoder (no token_embedding.weight; first key: {first})")
    if "pos_embedding.embedding.weight" in sd:
        raise ModelLoadError(f"{file}: not supported: a T5 with one shared position table "
                             "(Wan's umT5 has one per layer)")
    out = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        elif (m := _BLOCK_KEY.match(k)) and m.group(2) in _T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"] = v
        else:
            raise ModelLoadError(f"{file}: unexpected key {k} (not part of Wan's umT5 encoder)")
    for k in ("blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight", "blocks.0.ffn.fc1.weight"):
        if k not in sd:
            raise ModelLoadError(f"{file}: missing key {k}")
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    inner = sd["blocks.0.attn.q.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
    cfg = UMT5Config(vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner // heads),
                     d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]), num_layers=int(layers),
                     num_decoder_layers=int(layers), num_heads=int(heads), relative_attention_num_buckets=int(buckets),
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                     architectures=["UMT5EncoderModel"])
    return out, cfg


def build_umt5(state: dict, cfg, file: Path, dtype: torch.dtype | None = torch.float32):
    from transformers import UMT5EncoderModel
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    want = model.state_dict()
    check_keys(file, want, state)
    model.load_state_dict({k: state[k] for k in want}, strict=True, assign=True)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


# ==============================================================================================================
# Hub ids (huggingface_hub's local cache; a one-line error when offline)
# ==============================================================================================================


def hub_cache_dir() -> str:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    if env.get("HF_HOME"):
        return str(Path(env["HF_HOME"]) / "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_hub_id(spec: str) -> bool:
    """`hf://org/name[/file]`, or a bare `org/name` that is not a local path."""
    return bool(HUB_URL.match(spec)) or (bool(HUB_REPO.match(spec)) and not Path(spec).exists())


def _download(repo: str, cache: str, sub: str | None, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    kw = {"allow_patterns": [sub]} if sub else {}
    return Path(snapshot_download(repo, cache_dir=cache, local_files_only=local_only, **kw))


def hub_path(spec: str) -> Path:
    """`org/name` / `hf://org/name` (a snapshot folder) or `hf://org/name/path/in/repo` (one file) -> a local
    path: the local cache first, then a download unless offline."""
    parts = spec[len("hf://"):].split("/") if spec.startswith("hf://") else spec.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    cache = hub_cache_dir()

    def found(root: Path) -> Path | None:
        p = root / sub if sub else root
        return p if p.exists() else None

    try:
        if (p := found(_download(repo, cache, sub, True))) is not None:
            return p
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        pass
    if hub_offline():
        raise ModelLoadError(f"{spec}: not a local path, and not in the Hugging Face cache {cache} (offline: "
                             f"HF_HUB_OFFLINE is set); fetch it once with `huggingface-cli download {repo}"
                             f"{' ' + sub if sub else ''}` or give a local path")
    try:
        root = _download(repo, cache, sub, False)
    except Exception as e:
        raise ModelLoadError(f"{spec}: not a local path, not in the Hugging Face cache {cache}, and the hub "
                             f"cannot be reached ({_first_line(e)[:160]}); download it where online, or give a "
                             "local path") from None
    if (p := found(root)) is None:
        raise ModelLoadError(f"{spec}: {sub} is not in the hub repo {repo}")
    return p


# ==============================================================================================================
# Layout detection and the spec grammar
# ==============================================================================================================


def _wan_weights(folder: Path) -> bool:
    return (folder / "diffusion_pytorch_model.safetensors").is_file() or \
        (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _longlive_files(folder: Path) -> tuple[Path, Path | None] | None:
    for d in (folder, folder / "models"):
        if (d / "longlive_base.pt").is_file():
            return d / "longlive_base.pt", (d / "lora.pt") if (d / "lora.pt").is_file() else None
    return None


def detect_layout(path: Path) -> str | None:
    """A local folder or file -> one of LAYOUTS, 'engine', or None."""
    path = Path(path)
    if path.is_file():
        return file_layout(path)
    if not path.is_dir():
        return None
    if (path / "engine.json").is_file():
        return "engine"
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return "diffusers"
    if (path / WAN_VAE_FILE).is_file() and ((path / WAN_T5_FILE).is_file() or _wan_weights(path)) or \
            _wan_weights(path) and (path / "config.json").is_file():
        return "wan"
    if _longlive_files(path):
        return "longlive"
    files = _weight_files(path)
    if len(files) == 1:
        return file_layout(files[0])
    return None


def file_layout(file: Path) -> str:
    """Which peer a transformer checkpoint file belongs to, from its name and its folders' names (the hub cache
    keeps the repo name: models--gdhe17--Self-Forcing), nearest first; Self-Forcing's when nothing says."""
    return _guess_peer(file)[0]


def _guess_peer(file: Path) -> tuple[str, bool]:
    hints = (("longlive", "longlive"), ("reward", "reward-forcing"), ("causvid", "causvid"),
             ("self_forcing", "self-forcing"), ("self-forcing", "self-forcing"), ("selfforcing", "self-forcing"))
    for part in [Path(file).name, *[p.name for p in Path(file).parents][:4]]:
        low = part.lower()
        for needle, layout in hints:
            if needle in low:
                return layout, False
    return "self-forcing", True


@dataclass
class Source:
    spec: str
    layout: str
    path: Path  # the folder (diffusers, wan) or the transformer checkpoint file (causal layouts)
    base: Path | None = None  # the folder the VAE and text encoder come from
    base_layout: str | None = None
    lora: Path | None = None
    guessed: bool = False  # the peer was not named (preset taken from Self-Forcing)
    base_found: str | None = None  # how the base was found, when it was not given

    @property
    def component_root(self) -> Path:
        return self.base if self.base is not None else self.path

    @property
    def component_layout(self) -> str:
        return self.base_layout or self.layout


def _local(part: str, role: str) -> Path:
    p = Path(part).expanduser()
    if p.exists():
        return p
    if is_hub_id(part):
        return hub_path(part)
    raise ModelLoadError(f"{role} not found: {part} (not a local path, nor a hub id like org/name or "
                         "hf://org/name/file)")


def _check_base(p: Path) -> str:
    layout = detect_layout(p) if p.is_dir() else None
    if layout not in ("diffusers", "wan"):
        raise ModelLoadError(f"{p}: not a Wan2.1 base folder (want the diffusers layout with model_index.json, "
                             f"or the original one with {WAN_VAE_FILE} and {WAN_T5_FILE})")
    return layout


def _discover_base(file: Path) -> tuple[Path, str] | None:
    for anc in list(Path(file).absolute().parents)[:4]:
        for rel in BASE_DIRS:
            p = anc / rel
            if p.is_dir() and detect_layout(p) in ("diffusers", "wan"):
                return p, f"found at {p}"
    cache = hub_cache_dir()
    for repo in BASE_HUB_IDS:
        try:
            p = _download(repo, cache, None, True)
        except Exception:
            continue
        if detect_layout(p) in ("diffusers", "wan"):
            return p, f"{repo} from the hub cache"
    return None


def parse_spec(spec: str | Path, layout: str = "auto", base: str | Path | None = None,
               lora: str | Path | None = None) -> Source:
    """`[LAYOUT:]SOURCE[+EXTRA]...` (plus explicit base / lora) -> a Source with every path checked."""
    spec = str(spec)
    text = spec
    m = re.match(rf"^({'|'.join(map(re.escape, LAYOUTS))}):(.+)$", text)
    if m and not Path(text).exists():
        if layout not in ("auto", m.group(1)):
            raise ModelLoadError(f"{spec}: layout {m.group(1)} in the spec contradicts --layout {layout}")
        layout, text = m.group(1), m.group(2)
    if layout not in ("auto", *LAYOUTS):
        raise ModelLoadError(f"unknown layout {layout!r}: expected auto or one of {', '.join(LAYOUTS)}")
    parts = [text] if Path(text).expanduser().exists() else text.split("+")
    if any(not p for p in parts):
        raise ModelLoadError(f"{spec}: empty part in a '+' spec")
    main = _local(parts[0], "model")
    extras = [_local(p, "extra") for p in parts[1:]]
    if base is not None:
        extras.append(_local(str(base), "--base"))
    if lora is not None:
        extras.append(_local(str(lora), "--lora"))
    bases = [p for p in extras if p.is_dir()]
    loras = [p for p in extras if p.is_file()]
    if len(bases) > 1 or len(loras) > 1:
        raise ModelLoadError(f"{spec}: give at most one base folder and one LoRA file")

    guessed = False
    detected = detect_layout(main)
    if detected == "engine":
        raise ModelLoadError(f"{main}: already an engine model folder (engine.json); load it directly")
    if main.is_dir() and detected in CAUSAL:
        files = _longlive_files(main) if detected == "longlive" else None
        if files:
            main, auto_lora = files
            if not loras and auto_lora is not None:
                loras = [auto_lora]
        else:
            main = _weight_files(main)[0]
    if layout == "auto":
        if detected is None:
            raise ModelLoadError(f"{main}: no known checkpoint layout (want a diffusers Wan2.1 folder, the original "
                                 "Wan2.1 folder, or a .pt/.safetensors checkpoint)")
        layout = detected
        if main.is_file():
            layout, guessed = _guess_peer(main)
    src = Source(spec, layout, main, lora=loras[0] if loras else None, guessed=guessed)
    if layout in ("diffusers", "wan"):
        if not main.is_dir() or detect_layout(main) != layout:
            raise ModelLoadError(f"{main}: not a {layout} Wan2.1 folder")
        if bases:
            raise ModelLoadError(f"{spec}: a {layout} folder brings its own VAE and text encoder; no base is needed")
    else:
        if not main.is_file():
            raise ModelLoadError(f"{main}: expected a .pt or .safetensors checkpoint file for layout {layout}")
        if bases:
            src.base = bases[0]
        else:
            hit = _discover_base(main)
            if hit is None:
                raise ModelLoadError(
                    f"{main}: a {layout} checkpoint holds only the transformer; give the Wan2.1 base for the VAE and "
                    f"text encoder as '{parts[0]}+BASE' (BASE: Wan-AI/Wan2.1-T2V-1.3B or its -Diffusers version, a "
                    f"folder or hub id; none found in {', '.join(BASE_DIRS[:2])} above the file or in the hub cache)")
            src.base, src.base_found = hit
        src.base_layout = _check_base(src.base)
    return src


def claims(model: str | Path) -> bool:
    """Whether `--model` names something this module loads (rather than an engine folder or an assets/ name)."""
    s = str(model)
    p = Path(s).expanduser()
    if p.is_file():
        return True
    if p.is_dir():
        return detect_layout(p) not in (None, "engine")
    if re.match(rf"^({'|'.join(map(re.escape, LAYOUTS))}):", s):
        return True
    head = s.split("+")[0]
    return ("+" in s and Path(head).expanduser().exists()) or is_hub_id(head)


# ==============================================================================================================
# Reading a source's parts
# ==============================================================================================================

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def read_transformer(src: Source, weights: str = "auto", lora_alpha: float | None = None,
                     progress: Progress = _quiet) -> Weights:
    """The source's transformer as Weights in engine names (LoRA merged)."""
    if src.layout == "diffusers":
        folder = src.path / "transformer"
        cfg_file = folder / "config.json"
        cfg = transformer_config(_json_file(cfg_file), cfg_file)
        progress(f"transformer: reading {folder}")
        state, f = read_sharded(folder, "diffusion_pytorch_model")
        w = Weights(state, f, "diffusers", heads=cfg.num_attention_heads)
        w.extra["config"] = cfg
        return w
    if src.layout == "wan":
        cfg_file = src.path / "config.json"
        heads = None
        if cfg_file.is_file():
            c = _json_file(cfg_file)
            if c.get("model_type", "t2v") != "t2v":
                raise ModelLoadError(f"{cfg_file}: not supported: model_type {c.get('model_type')!r} "
                                     "(text-to-video only)")
            heads = c.get("num_heads")
        progress(f"transformer: reading {src.path}")
        state, f = read_sharded(src.path, "diffusion_pytorch_model")
        clean, raw = strip_wrappers(state)
        w = to_engine_names(clean, f, raw=raw)
        w.heads = heads
        return w
    # causal checkpoints
    progress(f"transformer: reading {src.path}")
    obj = read_tensors(src.path)
    entry, sd = pick_entry(obj, src.path, weights, lora=src.lora is not None)
    clean, raw = strip_wrappers(sd)
    if src.lora is not None:
        prefix = common_prefix(clean)
        progress(f"LoRA: merging {src.lora}")
        info = merge_lora(clean, read_tensors(src.lora), src.lora, lora_alpha, into=prefix)
        progress(f"LoRA: {info['modules']} layers, rank {info['rank']}, scale {info['scale']:g}")
    w = to_engine_names(clean, src.path, entry, raw)
    if src.lora is not None:
        w.extra["lora"] = info
    return w


def _json_file(path: Path) -> dict:
    return _json(Path(path))


def _vae_state(src: Source) -> tuple[dict, dict, Path] | None:
    """Original-layout VAE -> (diffusers state, config, file); None for a diffusers base (a vae/ folder)."""
    if src.component_layout != "wan":
        return None
    f = src.component_root / WAN_VAE_FILE
    obj = read_tensors(f)
    if not _is_state(obj):
        raise ModelLoadError(f"{f}: expected a VAE state dict")
    state, cfg = wan_vae_to_diffusers(obj, f)
    return state, cfg, f


def load_vae(src: Source, device="cpu", dtype=torch.float32):
    from .vae import VideoVAE
    got = _vae_state(src)
    if got is not None:
        return build_vae(*got, device=device, dtype=dtype)
    folder = src.component_root / "vae"
    for f in (folder / "config.json", folder / WEIGHTS):
        if not f.is_file():  # diffusers would fall back to pickled weights
            raise ModelLoadError(f"missing {f}")
    try:
        return VideoVAE.from_folder(folder, device=device, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"unreadable VAE in {folder}: {_first_line(e)}") from None


def _t5_state(src: Source):
    f = src.component_root / WAN_T5_FILE
    obj = read_tensors(f)
    if not _is_state(obj):
        raise ModelLoadError(f"{f}: expected a text encoder state dict")
    state, cfg = wan_t5_to_transformers(obj, f)
    return state, cfg, f


def load_text(src: Source, device="cpu", dtype=torch.float32, offload: bool = False):
    from .text import UMT5TextEncoder, load_text_encoder
    root = src.component_root
    if src.component_layout == "wan":
        tok_dir = root / WAN_TOKENIZER_DIR
        if not tok_dir.is_dir():
            raise ModelLoadError(f"missing tokenizer folder {tok_dir}")
        state, cfg, f = _t5_state(src)
        model = build_umt5(state, cfg, f, dtype)
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"could not load the tokenizer in {tok_dir}: {_first_line(e)}") from None
        return UMT5TextEncoder(model.to("cpu" if offload else device), tok, output_device=device)
    try:
        return load_text_encoder(root / "text_encoder", device=device, dtype=dtype, offload=offload)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_first_line(e)) from None


def make_preset(layout: str, model: ModelConfig, vae: VAEConfig) -> tuple[Preset, str]:
    base = get_preset("wan2.1-1.3b")
    if layout in PEER_SETTINGS:
        cache, sampler, note = PEER_SETTINGS[layout]
    else:
        cache, sampler, note = base.cache, base.sampler, BIDIRECTIONAL_NOTE
    try:
        preset = Preset(name=layout, model=model, cache=cache, sampler=sampler, vae=vae, height=base.height,
                        width=base.width, fps=base.fps, text_encoder="umt5")
    except ValueError as e:
        raise ModelLoadError(f"{layout}: {e}") from None
    return preset, note


def _info(src: Source, w: Weights, note: str) -> dict:
    info = {"name": src.path.stem if src.path.is_file() else src.path.name, "layout": src.layout,
            "source": src.spec, "notes": note}
    if w.entry:
        info["weights"] = w.entry
    if src.base is not None:
        info["base"] = str(src.base)
    if src.lora is not None:
        info["lora"] = {"file": str(src.lora), **w.extra.get("lora", {})}
    if src.guessed:
        info["layout_guessed"] = True
    return info


def load_checkpoint(spec: str | Path, device="cpu", dtype=torch.float32, *, layout: str = "auto",
                    weights: str = "auto", text_offload: bool = False, lora_alpha: float | None = None) -> LoadedModel:
    """Any supported layout -> a LoadedModel, as `load_model_folder` gives for an engine folder."""
    src = parse_spec(spec, layout)
    w = read_transformer(src, weights, lora_alpha)
    transformer = build_transformer(w, w.extra.get("config"), device, dtype)
    vae = load_vae(src, device, dtype)
    text = load_text(src, device, dtype, text_offload)
    if getattr(text, "dim", transformer.cfg.text_dim) != transformer.cfg.text_dim:
        raise ModelLoadError(f"{src.component_root}: the text encoder gives {text.dim}-wide embeddings, the "
                             f"transformer takes {transformer.cfg.text_dim}")
    preset, note = make_preset(src.layout, transformer.cfg, vae.config())
    return LoadedModel(src.path, preset, transformer, vae, text, _info(src, w, note))


# ==============================================================================================================
# Conversion to the engine's folder format
# ==============================================================================================================

_COPY_SKIP = PICKLE_SUFFIXES + (".msgpack", ".h5", ".onnx")


def _copy_folder(src: Path, dst: Path, what: str) -> None:
    if not src.is_dir():
        raise ModelLoadError(f"missing {what} folder {src}")
    files = [p for p in src.iterdir() if p.is_file()]
    if what == "text encoder" and not any(p.suffix == ".safetensors" for p in files):
        raise ModelLoadError(f"{src}: no safetensors weights (pickled weights are not loaded)")
    dst.mkdir(parents=True, exist_ok=True)
    for p in files:
        if p.suffix not in _COPY_SKIP:
            shutil.copy2(p, dst / p.name)


def convert(spec: str | Path, out: str | Path, *, layout: str = "auto", base=None, lora=None,
            lora_alpha: float | None = None, weights: str = "auto", dtype: torch.dtype | None = None,
            overwrite: bool = False, progress: Progress = _quiet) -> Path:
    """Write `spec` as an engine model folder at `out` (atomically: a partial folder is removed on failure)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelLoadError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    src = parse_spec(spec, layout, base, lora)
    how = " (guessed from the file name; pass --layout to choose)" if src.guessed else ""
    progress(f"source: {src.path} -> layout {src.layout}{how}")
    if src.base is not None:
        progress(f"base (VAE, text encoder): {src.base} [{src.base_layout}]"
                 + (f" ({src.base_found})" if src.base_found else ""))

    w = read_transformer(src, weights, lora_alpha, progress)
    cfg = w.extra.get("config") or infer_config(w)
    from .model import CausalWanModel
    with torch.device("meta"):
        shapes = CausalWanModel(cfg).state_dict()
    check_state(shapes, w)
    n = sum(v.numel() for v in w.state.values())
    progress(f"transformer: {cfg.num_layers} layers, width {cfg.dim} ({cfg.num_attention_heads} x "
             f"{cfg.attention_head_dim}), ffn {cfg.ffn_dim}, text {cfg.text_dim}: {n / 1e9:.3f} B parameters"
             + (f" from '{w.entry}'" if w.entry else ""))

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tdir = tmp / "transformer"
        tdir.mkdir(parents=True)
        kw = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", **cfg.diffusers_kwargs()}
        kw["patch_size"] = list(kw["patch_size"])
        (tdir / "config.json").write_text(json.dumps(kw, indent=2) + "\n")
        state = {k: (w.state[k].to(dtype) if dtype is not None else w.state[k]).contiguous() for k in shapes}
        progress(f"transformer: writing {out / 'transformer' / WEIGHTS}"
                 + (f" as {str(dtype).replace('torch.', '')}" if dtype is not None else ""))
        save_file(state, str(tdir / WEIGHTS), metadata={"format": "pt"})
        del state

        progress("VAE: converting" if src.component_layout == "wan" else "VAE: copying")
        got = _vae_state(src)
        if got is not None:
            vae = build_vae(*got)
            vae.save(tmp / "vae")
        else:
            vdir = src.component_root / "vae"
            for f in (vdir / "config.json", vdir / WEIGHTS):
                if not f.is_file():
                    raise ModelLoadError(f"missing {f}")
            _copy_folder(vdir, tmp / "vae", "VAE")
        from .vae import VideoVAE
        try:
            vae_cfg = VideoVAE.from_folder(tmp / "vae").config()
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"unreadable VAE from {src.component_root}: {_first_line(e)}") from None

        if src.component_layout == "wan":
            progress(f"text encoder: converting {src.component_root / WAN_T5_FILE}")
            tstate, tcfg, tf = _t5_state(src)
            build_umt5(tstate, tcfg, tf, dtype=None).save_pretrained(str(tmp / "text_encoder"), safe_serialization=True,
                                                         max_shard_size="5GB")
            _copy_folder(src.component_root / WAN_TOKENIZER_DIR, tmp / "tokenizer", "tokenizer")
        else:
            progress("text encoder: copying")
            _copy_folder(src.component_root / "text_encoder", tmp / "text_encoder", "text encoder")
            _copy_folder(src.component_root / "tokenizer", tmp / "tokenizer", "tokenizer")

        preset, note = make_preset(src.layout, cfg, vae_cfg)
        info = _info(src, w, note)
        info["name"] = out.name
        meta = {"format": FORMAT, "version": 1, **info, "converted_by": "engine.convert", "preset": to_dict(preset)}
        (tmp / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return out
