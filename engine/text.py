"""
Text encoders: prompt strings -> conditioning embeddings for the video transformer.

Every encoder returns a float32 tensor [B, max_len, dim] where dim is the transformer's
`text_dim`. As in Wan (umT5 outputs padded with zeros to 512 tokens), positions past a
prompt's real tokens are exactly zero, so the transformer's cross-attention always sees a
fixed-length context and padding carries no information.

Two implementations:
- ShapesTextEncoder: word-level, for the synthetic "Shapes" dataset (prompts like "a small
  red circle moving left on a black background"). Either a tiny transformer trained with
  the rest of the toy model, or (`fixed=True`) a fixed code with nothing to train. Saved as
  config.json + model.safetensors.
- UMT5TextEncoder: umT5 (Wan 2.x) through `transformers`, from a local folder only.

load_text_encoder(folder) picks the right one from folder/config.json.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# interface


@runtime_checkable
class TextEncoder(Protocol):
    dim: int  # embedding width (== transformer text_dim)
    max_len: int  # number of context tokens the transformer sees

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> float32 [B, max_len, dim] on the encoder's output device; zeros past each prompt."""
        ...


# -----------------------------------------------------------------------------
# the small built-in encoder for the Shapes dataset

SPECIAL_TOKENS = ("<pad>", "<unk>")
SHAPES_WORDS = (
    "a", "and", "on", "background",
    "small", "large",
    "red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white", "black", "gray", "navy",
    "circle", "square", "triangle",
    "moving", "left", "right", "up", "down", "bouncing", "standing", "still", "slowly", "quickly",
)  # fmt: skip


PHRASES = ("first object", "second object", "background")  # the fixed code's phrase slots


@dataclass(frozen=True)
class ShapesTextConfig:
    vocab: tuple[str, ...] = SPECIAL_TOKENS + SHAPES_WORDS
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_len: int = 24
    # True: no trained weights; each token is [word one-hot | position one-hot | phrase one-hot], see
    # ShapesTextEncoder. Needs num_layers == 0.
    fixed: bool = False

    def __post_init__(self):
        # JSON gives lists; keep the config hashable/immutable
        object.__setattr__(self, "vocab", tuple(self.vocab))
        for tok in SPECIAL_TOKENS:
            if tok not in self.vocab:
                raise ValueError(f"ShapesTextConfig.vocab must contain {tok!r}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("ShapesTextConfig.vocab has duplicate entries")
        if not self.fixed and self.dim % self.num_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.max_len < 1 or self.num_layers < 0:
            raise ValueError(f"bad max_len={self.max_len} / num_layers={self.num_layers}")
        if self.fixed and self.num_layers != 0:
            raise ValueError(f"a fixed code has no layers: num_layers must be 0, not {self.num_layers}")
        if self.fixed and not {"and", "on"} <= set(self.vocab):
            raise ValueError("a fixed code finds its phrases at 'and' and 'on': the vocab must contain both")

    @classmethod
    def fixed_code(cls, dim: int = 128, max_len: int = 24) -> "ShapesTextConfig":
        return cls(dim=dim, num_layers=0, max_len=max_len, fixed=True)


class Block(nn.Module):
    """Pre-norm transformer encoder block (bidirectional attention, padded keys masked)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x [B, T, C]; keep [B, 1, 1, T] bool, True = real token (a key we may attend to)
        B, T, C = x.shape
        H = self.num_heads
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # [B, H, T, C/H]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + self.mlp(self.ln2(x))
        return x


class ShapesTextEncoder(nn.Module):
    """Word-level tokenizer + small transformer. `forward(tokens)` is differentiable (for
    training); `encode(prompts)` is the no-grad inference entry point of TextEncoder.

    With `cfg.fixed` there is no transformer and nothing to train: token t of a prompt is the sum of
    three one-hots in disjoint slots of the dim channels: its word, its position t, and its phrase
    (first object until "and", second object from "and", background from "on"), scaled so that a
    token's norm is sqrt(dim), as after a LayerNorm. (Below len(vocab) + max_len + 3 channels the
    one-hots do not fit, and fixed random unit vectors take their place.)

    Why: trained jointly with the teacher, the transformer encoder kept the words the teacher used
    early (colour moves the prompt's embedding by 19 of 33) and collapsed the rest (left and right
    ended 0.95 apart), so the teacher never got the signal to learn them. A fixed code keeps every word of the 30-word grammar as distinct as
    any other, and the phrase slot tells which object a word belongs to; the transformer's own text
    projection is the learned part."""

    def __init__(self, cfg: ShapesTextConfig = ShapesTextConfig(), seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.max_len = cfg.max_len
        self.word_to_id = {w: i for i, w in enumerate(cfg.vocab)}
        self.pad_id = self.word_to_id["<pad>"]
        self.unk_id = self.word_to_id["<unk>"]
        self._warned: set[str] = set()  # unknown words already reported by this instance

        if cfg.fixed:  # buffers, not parameters: saved and loaded like weights, never trained
            nw, nt, n = len(cfg.vocab), cfg.max_len, len(cfg.vocab) + cfg.max_len + len(PHRASES)
            if n <= cfg.dim:  # one-hots in disjoint channels (the shapes preset: 59 of 128)
                code = torch.eye(cfg.dim)[:n]
            else:  # too narrow (test presets): fixed random unit vectors, nearly orthogonal
                code = F.normalize(torch.randn(n, cfg.dim, generator=torch.Generator().manual_seed(seed)), dim=1)
            code = code * math.sqrt(cfg.dim / 3)
            self.register_buffer("word_code", code[:nw].clone())
            self.register_buffer("pos_code", code[nw:nw + nt].clone())
            self.register_buffer("phrase_code", code[nw + nt:].clone())
            return

        self.tok_emb = nn.Embedding(len(cfg.vocab), cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)

        # deterministic init from `seed` with a private generator (global RNG untouched):
        # GPT-2 style N(0, 0.02), residual projections scaled down by depth, LayerNorms identity
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    std = 0.02
                    if name.endswith("proj") or name.endswith("mlp.2"):
                        std = 0.02 / math.sqrt(2 * max(cfg.num_layers, 1))
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    @property
    def device(self) -> torch.device:
        return self.word_code.device if self.cfg.fixed else self.tok_emb.weight.device

    @property
    def known_words(self) -> list[str]:
        return sorted(w for w in self.cfg.vocab if w not in SPECIAL_TOKENS)

    def unknown_words(self, prompt: str) -> list[str]:
        """The prompt's words this encoder reads as <unk> (each once, in order): what `_tokenize` warns about."""
        return [w for w in dict.fromkeys(self.split_words(prompt)) if self._word_id(w) is None]

    def _word_id(self, w: str) -> int | None:
        return self.word_to_id.get(w) if w not in SPECIAL_TOKENS else None  # "<pad>" typed by a user is unknown

    # -- tokenizer -------------------------------------------------------------

    @staticmethod
    def split_words(prompt: str) -> list[str]:
        # lower-case, strip surrounding whitespace and a trailing full stop, split on whitespace
        s = prompt.strip().lower()
        if s.endswith("."):
            s = s[:-1]
        return s.split()

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # -> ids [B, max_len] (padded with <pad>), lengths [B] (real tokens per prompt)
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_len), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = self.split_words(prompt)
            if len(words) > self.max_len:
                warnings.warn(
                    f"ShapesTextEncoder: prompt has {len(words)} words, truncated to max_len={self.max_len}: {prompt!r}",
                    UserWarning,
                    stacklevel=3,
                )
                words = words[: self.max_len]
            for t, w in enumerate(words):
                i = self._word_id(w)
                if i is None:
                    i = self.unk_id
                    if w not in self._warned:
                        self._warned.add(w)
                        warnings.warn(
                            f"ShapesTextEncoder: unknown word {w!r} mapped to <unk>; "
                            f"known vocabulary: {', '.join(self.known_words)}",
                            UserWarning,
                            stacklevel=3,
                        )
                ids[b, t] = i
            lengths[b] = len(words)
        return ids.to(self.device), lengths.to(self.device)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> LongTensor [B, max_len] of token ids, <pad> after each prompt."""
        return self._tokenize(prompts)[0]

    # -- model -----------------------------------------------------------------

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # ids [B, T<=max_len] -> [B, T, dim], zero past each prompt's length
        B, T = ids.shape
        if lengths is None:  # prompts are contiguous from position 0, so count non-pad tokens
            lengths = (ids != self.pad_id).sum(dim=1)
        pos = torch.arange(T, device=ids.device)
        real = pos[None, :] < lengths[:, None]  # [B, T] True on real tokens
        # an empty prompt would mask every key (softmax over nothing = NaN): let it see position 0,
        # its output is zeroed below anyway
        keep = real.clone()
        keep[:, 0] = True
        keep = keep[:, None, None, :]  # [B, 1, 1, T], broadcast over heads and queries

        if self.cfg.fixed:
            return self._code(ids, pos).masked_fill(~real[..., None], 0.0)

        x = self.tok_emb(ids) + self.pos_emb(pos)[None]  # [B, T, C]
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_f(x)
        return x.masked_fill(~real[..., None], 0.0)  # exact zeros on padding

    def _code(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # the fixed code: ids [B, T] -> [B, T, dim]. Phrase 0 up to "and", 1 from "and", 2 from "on".
        seen_and = (ids == self.word_to_id["and"]).cumsum(1) > 0
        seen_on = (ids == self.word_to_id["on"]).cumsum(1) > 0
        phrase = torch.where(seen_on, 2, seen_and.long())
        return self.word_code[ids] + self.pos_code[pos][None] + self.phrase_code[phrase]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids, lengths = self._tokenize(prompts)
        with torch.no_grad():  # not inference_mode: outputs may feed a training graph as inputs
            return self(ids, lengths).float()

    # -- save / load (safetensors only) ----------------------------------------

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        cfg = asdict(self.cfg)
        cfg["vocab"] = list(cfg["vocab"])
        (folder / "config.json").write_text(json.dumps({"type": "shapes", **cfg}, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ShapesTextEncoder":
        folder = Path(folder)
        config = _read_config(folder)
        if config.get("type") != "shapes":
            raise ValueError(f"{folder / 'config.json'}: expected \"type\": \"shapes\", got {config.get('type')!r}")
        known = {f.name for f in fields(ShapesTextConfig)}
        unknown = set(config) - known - {"type"}
        if unknown:
            raise ValueError(f"{folder / 'config.json'}: unknown ShapesTextConfig fields {sorted(unknown)}")
        try:
            cfg = ShapesTextConfig(**{k: v for k, v in config.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'config.json'}: invalid shapes config: {e}") from e

        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"text encoder weights not found: {weights}")
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except Exception as e:  # SafetensorError, OSError, ... -> one clear line naming the file
            raise ValueError(f"corrupt or unreadable safetensors file {weights}: {_first_line(e)}") from e
        model = cls(cfg, seed=0)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights} does not match {folder / 'config.json'}: {_first_line(e)}") from e
        return model.to(device).eval()


# -----------------------------------------------------------------------------
# umT5 (Wan 2.x) through transformers, local files only


class UMT5TextEncoder:
    """umT5 encoder + tokenizer. encode() follows the Wan / diffusers WanPipeline convention:
    tokenize with padding to max_len (512) and truncation, run the encoder with the attention
    mask, then zero every position past the prompt's real length (prompt_embeds[i, len_i:] = 0).

    offload=True keeps the encoder on the CPU (it is the largest resident model: umT5-XXL is
    ~11 GB in bf16) and moves only the [B, max_len, dim] results to output_device.
    An LRU cache (prompt -> embedding) skips the encoder for repeated prompts.
    """

    def __init__(
        self,
        model,  # transformers UMT5EncoderModel / T5EncoderModel
        tokenizer,
        max_len: int = 512,
        output_device: str | torch.device | None = None,
        cache_size: int = 32,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.dim = int(model.config.d_model)
        self.max_len = int(max_len)
        self.output_device = torch.device(output_device) if output_device is not None else model.device
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # prompt -> [max_len, dim] float32

    @property
    def device(self) -> torch.device:
        return self.output_device

    @classmethod
    def from_folder(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_len: int = 512,
        offload: bool = False,
        output_device: str | torch.device | None = None,
        cache_size: int = 32,
    ) -> "UMT5TextEncoder":
        """Load from local folders (never the hub). `device` is where the encoder runs, or with
        offload=True where results go (the encoder then stays on the CPU); output_device
        overrides where results go."""
        import transformers
        from transformers import AutoTokenizer

        text_encoder_dir = Path(text_encoder_dir)
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else text_encoder_dir
        model_type = _read_config(text_encoder_dir).get("model_type")
        model_cls = {"umt5": transformers.UMT5EncoderModel, "t5": transformers.T5EncoderModel}.get(model_type)
        if model_cls is None:
            raise ValueError(f"{text_encoder_dir / 'config.json'}: expected model_type 'umt5' or 't5', got {model_type!r}")
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_dir}")

        # transformers renamed torch_dtype -> dtype (4.56); use_safetensors: never unpickle weights
        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        dtype_kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
        try:
            model = model_cls.from_pretrained(text_encoder_dir, local_files_only=True, use_safetensors=True, **dtype_kw)
        except Exception as e:
            raise ValueError(f"could not load {model_type} weights from {text_encoder_dir}: {_first_line(e)}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except Exception as e:
            raise ValueError(f"could not load tokenizer from {tokenizer_dir}: {_first_line(e)}") from e

        model = model.to("cpu" if offload else device)
        return cls(model, tokenizer, max_len=max_len, output_device=output_device or device, cache_size=cache_size)

    @staticmethod
    def clean(prompt: str) -> str:
        # diffusers' WanPipeline whitespace_clean (its ftfy/html basic_clean is skipped: no ftfy dep)
        return re.sub(r"\s+", " ", prompt).strip()

    def _run(self, prompts: list[str]) -> torch.Tensor:
        # prompts -> float32 [B, max_len, dim] on the encoder's device, zeros past each prompt
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(self.model.device)
        mask = tok.attention_mask.to(self.model.device)  # [B, max_len], 1 on real tokens (incl. </s>)
        with torch.no_grad():
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, max_len, dim]
        return h.float().masked_fill(mask[..., None] == 0, 0.0)  # prompt_embeds[i, len_i:] = 0 (right padding)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [self.clean(p) for p in prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))  # unique, in order
        if missing:
            out = self._run(missing).to(self.output_device)
            for p, e in zip(missing, out):
                self._cache[p] = e.clone()  # own storage: don't pin the whole batch
        for p in prompts:  # mark as recently used
            self._cache.move_to_end(p)
        result = torch.stack([self._cache[p] for p in prompts])  # a copy: callers may mutate it
        while len(self._cache) > self.cache_size:  # evict least recently used
            self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        self._cache.clear()


# -----------------------------------------------------------------------------
# loading by folder


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise FileNotFoundError(f"text encoder folder not found: {folder}")
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder path is not a folder: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        hint = f" (did you mean {folder / 'text_encoder'}?)" if (folder / "text_encoder" / "config.json").is_file() else ""
        raise FileNotFoundError(f"no config.json in text encoder folder {folder}{hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {_first_line(e)}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def load_text_encoder(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> TextEncoder:
    """folder/config.json with "type": "shapes" -> ShapesTextEncoder (always float32, it is tiny);
    a transformers config with model_type umt5/t5 -> UMT5TextEncoder, tokenizer from the same
    folder or from the sibling ../tokenizer (diffusers Wan layout). kwargs go to
    UMT5TextEncoder.from_folder (max_len, offload, output_device, cache_size)."""
    folder = Path(folder)
    config = _read_config(folder)
    if config.get("type") == "shapes":
        return ShapesTextEncoder.from_folder(folder, device=device)
    model_type = config.get("model_type")
    if model_type in ("umt5", "t5"):
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            tokenizer_dir = folder
        elif (folder.parent / "tokenizer").is_dir():
            tokenizer_dir = folder.parent / "tokenizer"
        else:
            raise FileNotFoundError(f"no tokenizer for {folder}: looked in it and in {folder.parent / 'tokenizer'}")
        return UMT5TextEncoder.from_folder(folder, tokenizer_dir, device=device, dtype=dtype, **kwargs)
    kind = config.get("type", model_type)
    raise ValueError(f"{folder / 'config.json'}: unknown text encoder type {kind!r} (expected \"type\": \"shapes\" or model_type umt5/t5)")
