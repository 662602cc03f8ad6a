"""engine/checkpoints.py: existing checkpoints through `--model` (load_model_folder), CPU only.

Every supported layout is built here synthetically with the real key names, the real wrappers / prefixes and
the real transformer widths (1536 wide, 12 heads, ffn 8960, text 4096, freq 256, 16 channels) but one layer,
then loaded and compared with diffusers' WanTransformer3DModel holding the same weights. The original-Wan names
are checked against diffusers' own converters (code nobody here wrote); the umT5 and VAE are tiny configs with
the real key names (umT5 keeps d_model 4096 so it feeds the real transformer).

Builders are plain functions so tests/test_convert.py reuses them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from engine import checkpoints as ck
from engine.config import ModelConfig
from engine.folder import LoadedModel, ModelLoadError, load_model_folder, resolve

REAL = ModelConfig(num_layers=1)  # Wan2.1-T2V-1.3B widths, one block
SMALL = ModelConfig(num_layers=1, ffn_dim=32, freq_dim=32, num_attention_heads=2)  # 2 x 128 wide, text 4096
WORDS = ["a", "red", "blue", "circle", "square", "moving", "left", "right", "on", "background"]
PROMPTS = ["a red circle moving left", "a blue square"]
VAE_KW = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
T5_KW = dict(d_model=4096, num_layers=1, num_heads=2, d_kv=8, d_ff=16, relative_attention_num_buckets=32)


# ==============================================================================================================
# Reference models (diffusers / transformers) and the original Wan key names, checked against diffusers
# ==============================================================================================================


def randomise_(module: torch.nn.Module, seed: int, std: float = 0.02):
    """Every parameter random (norm gains around 1), deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, std, generator=g)
            if name.endswith(("gamma", "norm_q.weight", "norm_k.weight", "norm2.weight", "layer_norm.weight")):
                p.add_(1.0)
    return module


def reference_transformer(cfg: ModelConfig = REAL, seed: int = 0) -> WanTransformer3DModel:
    with torch.device("meta"):  # skip diffusers' own initialisation: every parameter is overwritten
        model = WanTransformer3DModel(**cfg.diffusers_kwargs())
    model = model.to_empty(device="cpu")
    model.rope = type(model.rope)(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)  # its buffers
    return randomise_(model.eval(), seed)


def transformer_inputs(cfg: ModelConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)  # 8 tokens
    t = torch.tensor([700.0])
    e = torch.randn(1, 6, cfg.text_dim, generator=g)
    return x, t, e


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def to_wan_names(sd: dict) -> dict:
    """diffusers transformer names -> the original Wan2.1 names (wan/modules/model.py), written out here and
    checked against diffusers' convert_wan_transformer_to_diffusers below."""
    top = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
           "condition_embedder.time_embedder.linear_2": "time_embedding.2",
           "condition_embedder.text_embedder.linear_1": "text_embedding.0",
           "condition_embedder.text_embedder.linear_2": "text_embedding.2",
           "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
           "patch_embedding": "patch_embedding"}
    block = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
             "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
             "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
             "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q",
             "attn2.norm_k": "cross_attn.norm_k", "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            out["head.modulation"] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)", k)
        if m and m.group(2) == "scale_shift_table":
            out[f"blocks.{m.group(1)}.modulation"] = v
            continue
        mod, param = (m.group(2) if m else k).rsplit(".", 1)
        out[f"blocks.{m.group(1)}.{block[mod]}.{param}" if m else f"{top[mod]}.{param}"] = v
    return out


def t5_to_wan_names(sd: dict) -> dict:
    """transformers UMT5EncoderModel names -> Wan's T5Encoder names (wan/modules/t5.py)."""
    layer = {"layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
             "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
             "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
             "layer.0.layer_norm.weight": "norm1.weight", "layer.1.layer_norm.weight": "norm2.weight",
             "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
             "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
             "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}
    out = {}
    for k, v in sd.items():
        if k == "shared.weight":
            out["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif m := re.match(r"encoder\.block\.(\d+)\.(.+)", k):
            out[f"blocks.{m.group(1)}.{layer[m.group(2)]}"] = v
    return out


def vae_to_wan_names(sd: dict, res_blocks: int = 2) -> dict:
    """AutoencoderKLWan names -> the original Wan2.1_VAE.pth names (wan/modules/vae.py), checked against
    diffusers' convert_wan_vae_to_diffusers below."""
    res = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
           "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
    out = {}
    for k, v in sd.items():
        if k.startswith(("quant_conv.", "post_quant_conv.")):
            new = k.replace("post_quant_conv", "conv2").replace("quant_conv", "conv1")
        elif m := re.match(r"(\w+)\.(conv_in|norm_out|conv_out)\.(.+)", k):
            new = f"{m.group(1)}.{dict(conv_in='conv1', norm_out='head.0', conv_out='head.2')[m.group(2)]}.{m.group(3)}"
        elif m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(.+)", k):
            new = f"{m.group(1)}.middle.1.{m.group(2)}"
        elif m := re.match(r"(\w+)\.mid_block\.resnets\.(\d)\.(.+)", k):
            new = f"{m.group(1)}.middle.{2 * int(m.group(2))}.{res[m.group(3)]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", k):
            new = f"encoder.downsamples.{m.group(1)}.{res.get(m.group(2), m.group(2))}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"decoder.upsamples.{int(m.group(1)) * (res_blocks + 2) + int(m.group(2))}.{res[m.group(3)]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            new = f"decoder.upsamples.{int(m.group(1)) * (res_blocks + 2) + res_blocks + 1}.{m.group(2)}"
        else:
            raise AssertionError(k)
        out[new] = v
    return out


def reference_vae(seed: int = 3) -> AutoencoderKLWan:
    return randomise_(AutoencoderKLWan(**VAE_KW).eval(), seed, std=0.05)


def reference_t5(vocab: int, seed: int = 4):
    from transformers import UMT5Config, UMT5EncoderModel
    cfg = UMT5Config(vocab_size=vocab, **T5_KW, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = randomise_(UMT5EncoderModel(cfg).eval(), seed, std=0.05)
    with torch.no_grad():  # bf16-exact, so that Wan's bf16 .pth holds the same weights
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def save_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(folder))
    return tok, len(vocab)


def t5_reference_embeddings(model, tok, max_len=16) -> torch.Tensor:
    b = tok(PROMPTS, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    return h.masked_fill(b.attention_mask[..., None] == 0, 0.0)


class Parts:
    """The shared reference weights of a test module."""

    def __init__(self, root: Path, cfg: ModelConfig = REAL):
        self.cfg = cfg
        self.ref = reference_transformer(cfg)
        self.state = {k: v.clone() for k, v in self.ref.state_dict().items()}
        self.wan = to_wan_names(self.state)
        self.inputs = transformer_inputs(cfg)
        with torch.no_grad():
            self.want = self.ref(*self.inputs, return_dict=False)[0]
        self.tok_dir = root / "tokenizer"
        self.tok, vocab = save_tokenizer(self.tok_dir)
        self.t5 = reference_t5(vocab)
        self.t5_want = t5_reference_embeddings(self.t5, self.tok)
        self.vae = reference_vae()
        self.vae_state = {k: v.clone() for k, v in self.vae.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Writers: one per layout, with the peers' file names, wrappers and prefixes
# ---------------------------------------------------------------------------------------------------------------


def write_diffusers_folder(parts: Parts, folder: Path, transformer: bool = True, shard: str = "150MB") -> Path:
    """Wan-AI/Wan2.1-T2V-1.3B-Diffusers: model_index.json, transformer/ (sharded + index), vae/, text_encoder/
    (sharded + index), tokenizer/."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}))
    if transformer:
        parts.ref.save_pretrained(str(folder / "transformer"), safe_serialization=True, max_shard_size=shard)
    else:
        (folder / "transformer").mkdir(exist_ok=True)
    parts.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    parts.t5.save_pretrained(str(folder / "text_encoder"), safe_serialization=True, max_shard_size="2MB")
    shutil.copytree(parts.tok_dir, folder / "tokenizer", dirs_exist_ok=True)
    return folder


def write_wan_folder(parts: Parts, folder: Path, transformer: bool = True) -> Path:
    """Wan-AI/Wan2.1-T2V-1.3B: config.json (WanModel), diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth,
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    c = parts.cfg
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": c.dim, "eps": 1e-06, "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim, "in_dim": c.in_channels, "model_type": "t2v", "num_heads": c.num_attention_heads,
        "num_layers": c.num_layers, "out_dim": c.out_channels, "text_len": 512}))
    if transformer:
        save_file({k: v.contiguous() for k, v in parts.wan.items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))
    torch.save(vae_to_wan_names(parts.vae_state), folder / ck.WAN_VAE_FILE)
    t5 = {k: v.bfloat16() for k, v in t5_to_wan_names(parts.t5.state_dict()).items()}
    torch.save(t5, folder / ck.WAN_T5_FILE)
    shutil.copytree(parts.tok_dir, folder / "google" / "umt5-xxl", dirs_exist_ok=True)
    return folder


def wrapper_keys(sd: dict, fsdp: bool = False, compiled: bool = False) -> dict:
    """Original names under WanDiffusionWrapper ('model.'), optionally as FSDP / torch.compile leave them."""
    out = {}
    for k, v in sd.items():
        if fsdp:  # FSDP units around the model and around each block
            k = re.sub(r"^blocks\.(\d+)\.", r"blocks.\1._fsdp_wrapped_module.", k)
            k = "_fsdp_wrapped_module." + k
        out[("model._orig_mod." if compiled else "model.") + k] = v
    return out


def critic_stub() -> dict:
    return {"model.patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2), "model.head.modulation": torch.zeros(1, 2, 4)}


def perturbed(sd: dict, seed: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def write_self_forcing(parts: Parts, root: Path) -> Path:
    """checkpoints/self_forcing_dmd.pt = {'generator', 'critic', 'generator_ema'} (trainer/distillation.py save());
    the EMA copy carries FSDP segments. The README runs --use_ema, so the EMA weights are the reference here."""
    f = root / "checkpoints" / "self_forcing_dmd.pt"
    f.parent.mkdir(parents=True, exist_ok=True)
    decoy = perturbed({k: parts.wan[k] for k in ("head.head.bias", "blocks.0.modulation")})  # kept small
    torch.save({"generator": wrapper_keys(decoy), "critic": critic_stub(),
                "generator_ema": wrapper_keys(parts.wan, fsdp=True)}, f)
    return f


def write_causvid(parts: Parts, root: Path) -> Path:
    """autoregressive_checkpoint/model.pt = {'generator', 'critic'} (causvid/train_distillation.py save())."""
    f = root / "autoregressive_checkpoint" / "model.pt"
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": wrapper_keys(parts.wan), "critic": critic_stub()}, f)
    return f


def write_reward_forcing(parts: Parts, root: Path) -> Path:
    """Reward-Forcing-T2V-1.3B/rewardforcing.pt: the bare generator state dict (inference.py loads it as is)."""
    f = root / "checkpoints" / "Reward-Forcing-T2V-1.3B" / "rewardforcing.pt"
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrapper_keys(parts.wan), f)
    return f


LORA_TARGETS = ("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2")


def write_longlive(parts: Parts, root: Path, rank: int = 8, alpha: float | None = None) -> Path:
    """longlive_models/models/{longlive_base.pt, lora.pt}: base {'generator', 'critic', 'step'}, LoRA
    {'generator_lora': peft keys 'base_model.model.blocks.0.self_attn.q.lora_A.weight' ..., 'critic_lora', 'step'}.
    base + alpha/rank * B @ A equals the reference."""
    d = root / "longlive_models" / "models"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(11)
    scale = (alpha if alpha is not None else rank) / rank
    base, lora = dict(parts.wan), {}
    for b in range(parts.cfg.num_layers):
        for t in LORA_TARGETS:
            w = parts.wan[f"blocks.{b}.{t}.weight"]
            a_ = torch.randn(rank, w.shape[1], generator=g) * 0.05
            b_ = torch.randn(w.shape[0], rank, generator=g) * 0.05
            base[f"blocks.{b}.{t}.weight"] = w - scale * (b_ @ a_)
            lora[f"base_model.model.blocks.{b}.{t}.lora_A.weight"] = a_
            lora[f"base_model.model.blocks.{b}.{t}.lora_B.weight"] = b_
    torch.save({"generator": wrapper_keys(base), "critic": critic_stub(), "step": 700}, d / "longlive_base.pt")
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 3000}, d / "lora.pt")
    return root / "longlive_models"


def write_compiled_safetensors(parts: Parts, root: Path) -> Path:
    """A Self-Forcing generator exported as safetensors from a torch.compile'd model ('model._orig_mod.')."""
    f = root / "sf_export" / "generator.safetensors"
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in wrapper_keys(parts.wan, compiled=True).items()}, str(f))
    return f


def link(target: Path, at: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, at, target_is_directory=True)
    return at


def fake_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    snap = root / "snapshots" / sha
    for rel, src in files.items():
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return snap


# ==============================================================================================================
# Fixtures
# ==============================================================================================================


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def diffusers_dir(parts, tmp_path_factory) -> Path:
    return write_diffusers_folder(parts, tmp_path_factory.mktemp("hub") / "Wan2.1-T2V-1.3B-Diffusers")


@pytest.fixture(scope="module")
def wan_dir(parts, tmp_path_factory) -> Path:
    return write_wan_folder(parts, tmp_path_factory.mktemp("hub") / "Wan2.1-T2V-1.3B")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path_factory):
    """Never the network, never the user's own hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hf-cache"))


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # the real-width files are large


def check_loaded(m: LoadedModel, parts: Parts, layout: str, tol: float = 1e-5):
    """Transformer weights and output, VAE weights, text embeddings, and the layout's streaming preset."""
    assert isinstance(m, LoadedModel)
    assert m.transformer.cfg == parts.cfg
    got_state = m.transformer.state_dict()
    assert sorted(got_state) == sorted(parts.state)
    tol_w = 1e-6 if layout == "longlive" else 0  # exact, except where a LoRA was merged in float32
    for k, v in parts.state.items():
        assert got_state[k].shape == v.shape and (got_state[k] - v).abs().max() <= tol_w, k
    with torch.no_grad():
        got = m.transformer(*parts.inputs)
    assert got.shape == parts.want.shape
    assert rel_err(got, parts.want) <= tol
    vae_state = m.vae.vae.state_dict()
    assert all(torch.equal(vae_state[k], v) for k, v in parts.vae_state.items())
    assert m.vae.vae.config.latents_mean == list(ck.WAN_LATENTS_MEAN)
    m.text.max_len = 16
    torch.testing.assert_close(m.text.encode(PROMPTS), parts.t5_want, rtol=1e-5, atol=1e-5)
    assert m.preset.name == layout and m.preset.text_encoder == "umt5"
    assert (m.preset.height, m.preset.width) == (480, 832)
    assert m.info["layout"] == layout
    if layout in ck.PEER_SETTINGS:
        assert m.preset.cache == ck.PEER_SETTINGS[layout][0]
        assert m.preset.sampler == ck.PEER_SETTINGS[layout][1]


# ==============================================================================================================
# The key names are the real ones (checked against diffusers' converters)
# ==============================================================================================================


def test_wan_transformer_names_match_diffusers_converter(parts):
    converted = convert_wan_transformer_to_diffusers(dict(parts.wan))  # diffusers' own code
    assert sorted(converted) == sorted(parts.state)
    assert {ck.wan_to_diffusers_key(k) for k in parts.wan} == set(parts.state)
    assert all(ck.diffusers_to_wan_key(ck.wan_to_diffusers_key(k)) == k for k in parts.wan)
    for k in ("blocks.0.self_attn.q.weight", "head.head.weight", "patch_embedding.weight", "text_embedding.0.weight",
              "time_embedding.0.weight", "time_projection.1.weight", "blocks.0.modulation", "head.modulation",
              "blocks.0.norm3.weight", "blocks.0.ffn.0.weight"):
        assert k in parts.wan, k


def test_wan_vae_names_match_diffusers_converter(parts):
    wan = vae_to_wan_names(parts.vae_state)
    assert "decoder.middle.0.residual.0.gamma" in wan and "decoder.upsamples.4.shortcut.weight" in wan
    reference = convert_wan_vae_to_diffusers(dict(wan))  # diffusers' own mapping (hard-coded for 2 res blocks)
    assert sorted(reference) == sorted(parts.vae_state)
    ours, cfg = ck.wan_vae_to_diffusers(wan, Path("Wan2.1_VAE.pth"))
    assert sorted(ours) == sorted(reference) and all(ours[k] is reference[k] for k in ours)
    assert {k: cfg[k] for k in VAE_KW} == VAE_KW
    assert cfg["latents_mean"] == list(ck.WAN_LATENTS_MEAN) and cfg["latents_std"] == list(ck.WAN_LATENTS_STD)
    vae = ck.build_vae(ours, cfg, Path("Wan2.1_VAE.pth"))
    vae.fast_cpu = False  # diffusers' own kernels on both sides: the weights are under test here, bit for bit
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = parts.vae.decode(z).sample
    torch.testing.assert_close(vae.vae.decode(z).sample, want, rtol=0, atol=0)


def wan_t5_forward(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int, buckets=32, max_dist=128):
    """Wan's T5Encoder forward (wan/modules/t5.py), written out: RMS norms, unscaled attention with a per-layer
    bidirectional relative-position bias, gated tanh-GELU feed-forward (gate.0 carries the GELU)."""
    x = sd["token_embedding.weight"].float()[ids]
    B, L, _ = x.shape
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    half = buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    bucket = bucket + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    def norm(h, w):
        return w.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    def lin(h, k):
        return h @ sd[k].float().T

    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (lin(h, p + f"attn.{n}.weight").view(B, L, heads, -1) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"].float()[bucket].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        a = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + lin(torch.einsum("bnij,bjnc->binc", a, v).reshape(B, L, -1), p + "attn.o.weight")
        h = norm(x, sd[p + "norm2.weight"])
        x = x + lin(F.gelu(lin(h, p + "ffn.gate.0.weight"), approximate="tanh") * lin(h, p + "ffn.fc1.weight"),
                    p + "ffn.fc2.weight")
    return norm(x, sd["norm.weight"])


def test_wan_t5_names_and_semantics(parts, wan_dir):
    wan = ck.read_tensors(wan_dir / ck.WAN_T5_FILE)
    assert all(v.dtype == torch.bfloat16 for v in wan.values())
    state, cfg = ck.wan_t5_to_transformers(wan, wan_dir / ck.WAN_T5_FILE)
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.relative_attention_num_buckets) == \
        (4096, 2, 8, 16, 1, 32)
    model = ck.build_umt5(state, cfg, wan_dir / ck.WAN_T5_FILE)
    ref = parts.t5.state_dict()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    b = parts.tok(PROMPTS, padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        got = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    want = wan_t5_forward(wan, b.input_ids, b.attention_mask, heads=2)
    keep = b.attention_mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


# ==============================================================================================================
# Every layout through --model: real widths, the reference output
# ==============================================================================================================


def test_diffusers_folder(parts, diffusers_dir):
    assert (diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    assert (diffusers_dir / "text_encoder" / "model.safetensors.index.json").is_file()
    m = load_model_folder(diffusers_dir)
    check_loaded(m, parts, "diffusers")
    assert m.info["notes"] == ck.BIDIRECTIONAL_NOTE


def test_wan_original_folder(parts, wan_dir):
    m = load_model_folder(str(wan_dir))
    check_loaded(m, parts, "wan")
    # the converted Wan VAE streams: latent frames one chunk at a time equal the full decode
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    dec = m.vae.stream()
    streamed = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:])], dim=2)
    torch.testing.assert_close(streamed, m.vae.decode(z), rtol=0, atol=0)
    assert streamed.shape == (1, 3, 13, 32, 32)


def test_self_forcing_ema_with_fsdp_names_and_discovered_base(parts, wan_dir, scratch):
    f = write_self_forcing(parts, scratch)
    link(wan_dir, scratch / "wan_models" / "Wan2.1-T2V-1.3B")  # where Self-Forcing's README downloads it
    m = load_model_folder(f)
    check_loaded(m, parts, "self-forcing")
    assert m.info["weights"] == "generator_ema"
    assert m.info["base"] == str(scratch / "wan_models" / "Wan2.1-T2V-1.3B")


def test_causvid_folder_plus_base(parts, diffusers_dir, scratch):
    root = scratch / "CausVid"
    write_causvid(parts, root)
    m = load_model_folder(f"{root / 'autoregressive_checkpoint'}+{diffusers_dir}")
    check_loaded(m, parts, "causvid")
    assert m.info["weights"] == "generator"


def test_reward_forcing_bare_state_dict(parts, diffusers_dir, scratch):
    f = write_reward_forcing(parts, scratch)
    link(diffusers_dir, scratch / "checkpoints" / "Wan2.1-T2V-1.3B")  # download_checkpoints.sh's place
    m = load_model_folder(f)
    check_loaded(m, parts, "reward-forcing")
    assert "weights" not in m.info


def test_longlive_base_plus_lora_merged(parts, wan_dir, scratch):
    folder = write_longlive(parts, scratch)
    m = load_model_folder(f"{folder}+{wan_dir}")
    check_loaded(m, parts, "longlive")
    assert m.info["weights"] == "generator"  # the LoRA was trained on 'generator'
    assert m.info["lora"]["modules"] == len(LORA_TARGETS) and m.info["lora"]["rank"] == 8


def test_compiled_safetensors_with_layout_prefix(parts, diffusers_dir, scratch):
    f = write_compiled_safetensors(parts, scratch)
    m = load_model_folder(f"self-forcing:{f}+{diffusers_dir}")
    check_loaded(m, parts, "self-forcing")
    assert not m.info.get("layout_guessed")


# ==============================================================================================================
# Small widths from here: hub ids, spec grammar, errors
# ==============================================================================================================


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def small_base(small, tmp_path_factory) -> Path:
    """A diffusers base whose text encoder matches the small transformer (no transformer weights needed)."""
    return write_diffusers_folder(small, tmp_path_factory.mktemp("small-base") / "base", transformer=False)


@pytest.fixture
def small_sf(small, tmp_path) -> Path:
    return write_self_forcing(small, tmp_path)


def load_error(spec, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model_folder(spec, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def test_hub_ids_from_the_local_cache(small, small_base, small_sf, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    fake_hub_cache(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": small_sf})
    fake_hub_cache(cache, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", {p.name: p for p in small_base.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve("hf://gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt").name == "self_forcing_dmd.pt"
    m = load_model_folder("hf://gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt")  # base: found in the hub cache
    assert "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" in m.info["base"]
    check_loaded(m, small, "self-forcing")
    m = load_model_folder(f"{small_sf}+Wan-AI/Wan2.1-T2V-1.3B-Diffusers")  # explicit hub base
    assert m.transformer.cfg == SMALL


def test_hub_id_of_an_engine_folder(tmp_path, monkeypatch):
    from engine.folder import ASSETS
    cache = tmp_path / "hf"
    fake_hub_cache(cache, "someone/shapes-model", {p.name: p for p in (ASSETS / "shapes").iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    m = load_model_folder("someone/shapes-model")
    assert m.preset.name == "shapes-t2" and m.path.name == "0" * 40


def test_offline_hub_id_is_one_clean_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = load_error("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg and "offline" in msg and "huggingface-cli download" in msg
    with pytest.raises(ModelLoadError, match="offline"):
        resolve("hf://gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt")


def test_unreachable_hub_is_one_clean_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real = ck._download

    def no_network(repo, cache, sub, local_only):
        if local_only:
            return real(repo, cache, sub, True)
        raise ConnectionError("[Errno -2] Name or service not known\nmore detail")

    monkeypatch.setattr(ck, "_download", no_network)
    msg = load_error("hf://tianweiy/CausVid/autoregressive_checkpoint/model.pt")
    assert "tianweiy/CausVid" in msg and "cannot be reached" in msg and "Name or service not known" in msg


def test_generate_cli_reports_offline_hub_id(tmp_path, monkeypatch, capsys):
    from engine.generate import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "a red circle", "--model", "Wan-AI/Wan2.1-T2V-1.3B", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Wan-AI/Wan2.1-T2V-1.3B" in err and "offline" in err


def test_text_encoder_offload_option(small, small_sf, small_base):
    m = load_model_folder(f"{small_sf}+{small_base}", text_offload=True)
    assert m.text.model.device.type == "cpu" and m.text.output_device.type == "cpu"
    m.text.max_len = 16
    first = m.text.encode(PROMPTS)
    assert torch.equal(m.text.encode(PROMPTS), first) and len(m.text._cache) == len(PROMPTS)  # LRU prompt cache
    torch.testing.assert_close(first, small.t5_want, rtol=1e-5, atol=1e-5)


def test_causal_checkpoint_without_base(small_sf):
    msg = load_error(small_sf)
    assert str(small_sf) in msg and "+BASE" in msg and "Wan-AI/Wan2.1-T2V-1.3B" in msg


def test_engine_folders_and_builtin_names_are_untouched(small_base):
    assert not ck.claims("shapes") and not ck.claims("/no/such/model/folder") and not ck.claims("no-such-model")
    assert not ck.claims("no/such/model-folder")  # a bare a/b/c is a local path, never a hub lookup
    assert ck.claims(small_base) and ck.claims("Wan-AI/Wan2.1-T2V-1.3B")
    assert ck.detect_layout(Path(__file__).resolve().parents[1] / "assets" / "shapes") == "engine"


def test_layout_detection_and_guessing(small, tmp_path):
    assert ck.file_layout(tmp_path / "x" / "rewardforcing.pt") == "reward-forcing"
    assert ck.file_layout(tmp_path / "models--tianweiy--CausVid" / "snapshots" / "a" / "model.pt") == "causvid"
    assert ck.file_layout(tmp_path / "longlive_models" / "models" / "longlive_base.pt") == "longlive"
    assert ck._guess_peer(tmp_path / "ckpt" / "generator.pt") == ("self-forcing", True)


# ---------------------------------------------------------------------------------------------------------------
# Wrong or truncated files: one line naming the file and the first bad key
# ---------------------------------------------------------------------------------------------------------------


def rewrite(f: Path, edit, entry="generator_ema") -> Path:
    obj = torch.load(f, weights_only=True)
    edit(obj[entry] if entry else obj)
    torch.save(obj, f)
    return f


EMA_Q = "model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.self_attn.q.weight"


def test_missing_key_names_file_and_key(small_sf, small_base):
    rewrite(small_sf, lambda sd: sd.pop(EMA_Q))
    msg = load_error(f"{small_sf}+{small_base}")
    # the key as the file spells it, less the wrapper segments it lost with the key
    assert str(small_sf) in msg and "missing key generator_ema/model.blocks.0.self_attn.q.weight" in msg


def test_wrong_shape_names_file_and_key(small_sf, small_base):
    rewrite(small_sf, lambda sd: sd.__setitem__("model._fsdp_wrapped_module.head.head.bias", torch.zeros(3)))
    msg = load_error(f"{small_sf}+{small_base}")
    assert str(small_sf) in msg and "model._fsdp_wrapped_module.head.head.bias" in msg and "(3,)" in msg


def test_unexpected_key_names_file_and_key(small_sf, small_base):
    rewrite(small_sf, lambda sd: sd.__setitem__("model.blocks.0.extra_gate.weight", torch.zeros(2)))
    msg = load_error(f"{small_sf}+{small_base}")
    assert str(small_sf) in msg and "unexpected key generator_ema/model.blocks.0.extra_gate.weight" in msg


def test_image_to_video_weights_are_refused(small_sf, small_base):
    rewrite(small_sf, lambda sd: sd.__setitem__("model.img_emb.proj.0.weight", torch.zeros(2)))
    assert "not supported: image-conditioning" in load_error(f"{small_sf}+{small_base}")


def test_truncated_pt_names_the_first_cut_key(small_sf, small_base):
    data = small_sf.read_bytes()
    small_sf.write_bytes(data[: int(len(data) * 0.6)])
    msg = load_error(f"{small_sf}+{small_base}")
    assert str(small_sf) in msg and "truncated" in msg
    m = re.search(r"first bad key (\S+):", msg)
    assert m, msg
    assert m.group(1).split("/")[0] in ("generator", "critic", "generator_ema")


def test_truncated_pt_first_bad_key_is_exact(tmp_path, small_base):
    f = tmp_path / "checkpoints" / "self_forcing_dmd.pt"
    f.parent.mkdir(parents=True)
    sd = {f"model.blocks.{i}.w": torch.full((1000,), float(i)) for i in range(6)}
    torch.save({"generator": sd}, f)
    data = f.read_bytes()
    cut = data.index(b"data/3") + 200  # inside storage 3 (the 4th tensor)
    f.write_bytes(data[:cut])
    msg = load_error(f"{f}+{small_base}")
    assert "first bad key generator/model.blocks.3.w" in msg, msg


def test_truncated_safetensors_names_the_first_cut_key(small, small_base, tmp_path):
    f = write_compiled_safetensors(small, tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = load_error(f"{f}+{small_base}")
    assert str(f) in msg and "first bad key model._orig_mod." in msg


def test_truncated_diffusers_shard_names_the_file(small, tmp_path):
    d = write_diffusers_folder(small, tmp_path / "d", shard="6MB")
    shard = sorted((d / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    msg = load_error(d)
    assert str(shard) in msg and ("first bad key" in msg or "header" in msg)


def test_missing_shard_names_the_file(small, tmp_path):
    d = write_diffusers_folder(small, tmp_path / "d", shard="6MB")
    shard = sorted((d / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.unlink()
    assert f"missing {shard}" in load_error(d)


def test_pickled_diffusers_weights_are_not_loaded(small, tmp_path):
    d = write_diffusers_folder(small, tmp_path / "d", shard="1GB")
    t = d / "transformer"
    (t / "diffusion_pytorch_model.safetensors").unlink()
    (t / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    assert "pickled weights are not loaded" in load_error(d)


def test_wan_folder_with_broken_vae(small, tmp_path):
    d = write_wan_folder(small, tmp_path / "w")
    sd = torch.load(d / ck.WAN_VAE_FILE, weights_only=True)
    sd.pop("decoder.upsamples.4.shortcut.weight")
    torch.save(sd, d / ck.WAN_VAE_FILE)
    msg = load_error(d)
    assert str(d / ck.WAN_VAE_FILE) in msg and "up_blocks.1.resnets.0.conv_shortcut.weight" in msg


def test_wan_folder_with_wrong_text_encoder_file(small, tmp_path):
    d = write_wan_folder(small, tmp_path / "w")
    shutil.copy(d / ck.WAN_VAE_FILE, d / ck.WAN_T5_FILE)
    msg = load_error(d)
    assert str(d / ck.WAN_T5_FILE) in msg and "not Wan's umT5 encoder" in msg


def test_a_vae_given_as_the_transformer(small, small_base, tmp_path):
    d = write_wan_folder(small, tmp_path / "w", transformer=False)
    f = tmp_path / "self_forcing_vae.pt"
    shutil.copy(d / ck.WAN_VAE_FILE, f)
    msg = load_error(f"{f}+{small_base}")
    assert str(f) in msg and "no Wan transformer weights" in msg and "encoder.conv1.weight" in msg


def test_not_a_checkpoint(small_base, tmp_path):
    f = tmp_path / "self_forcing_dmd.pt"
    f.write_text("this is a text file\n" * 20)
    msg = load_error(f"{f}+{small_base}")
    assert str(f) in msg and "not a torch checkpoint" in msg


class Payload:
    """An object whose unpickling would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(small, small_base, tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": wrapper_keys(small.wan), "x": Payload(marker)}, f)
    msg = load_error(f"{f}+{small_base}")
    assert str(f) in msg and "refused" in msg and "weights_only" in msg
    lora = tmp_path / "lora.pt"
    torch.save({"generator_lora": Payload(marker)}, lora)
    assert "refused" in load_error(f"{write_self_forcing(small, tmp_path / 'sf')}+{small_base}+{lora}")
    assert not marker.exists()


def test_unsupported_lora_is_a_clear_error(small, small_base, tmp_path):
    folder = write_longlive(small, tmp_path)
    lora = folder / "models" / "lora.pt"
    obj = torch.load(lora, weights_only=True)
    obj["generator_lora"]["base_model.model.blocks.0.self_attn.q.lora_magnitude_vector"] = torch.ones(256)
    torch.save(obj, lora)
    msg = load_error(f"{folder}+{small_base}")
    assert str(lora) in msg and "not supported" in msg and "lora_magnitude_vector" in msg and "DoRA" in msg


def test_lora_that_does_not_fit(small, small_base, tmp_path):
    folder = write_longlive(small, tmp_path)
    lora = folder / "models" / "lora.pt"
    obj = torch.load(lora, weights_only=True)
    obj["generator_lora"]["base_model.model.blocks.0.ffn.0.lora_A.weight"] = torch.zeros(8, 7)
    torch.save(obj, lora)
    msg = load_error(f"{folder}+{small_base}")
    assert str(lora) in msg and "blocks.0.ffn.0.lora_A.weight" in msg and "do not fit" in msg


def test_lora_alpha_from_adapter_config(small, small_base, tmp_path):
    folder = write_longlive(small, tmp_path, rank=8, alpha=4.0)
    (folder / "models" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 4.0}))
    m = load_model_folder(f"{folder}+{small_base}")
    assert m.info["lora"]["scale"] == 0.5
    got = m.transformer.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in small.state.items())


def test_bad_spec_parts(small_sf, small_base, tmp_path):
    assert "not found" in load_error(f"{small_sf}+{tmp_path / 'nope'}")
    msg = load_error(f"{small_sf}+{tmp_path}")
    assert "not a Wan2.1 base folder" in msg
    assert "no base is needed" in load_error(f"{small_base}+{small_base}")
