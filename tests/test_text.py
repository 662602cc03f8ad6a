"""Tests for engine/text.py: the Shapes encoder, umT5 through transformers (a tiny model
built here, nothing downloaded) and load_text_encoder's errors."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.text import (
    ShapesTextConfig,
    ShapesTextEncoder,
    TextEncoder,
    UMT5TextEncoder,
    load_text_encoder,
)

# -----------------------------------------------------------------------------
# ShapesTextEncoder

PROMPTS = [
    "a small red circle moving left on a black background",
    "a large blue square bouncing",
    "",
]


@pytest.fixture(scope="module")
def shapes():
    return ShapesTextEncoder(ShapesTextConfig(), seed=0).eval()


def test_shapes_shape_dtype_and_protocol(shapes):
    cfg = ShapesTextConfig()
    out = shapes.encode(PROMPTS)
    assert out.shape == (3, cfg.max_len, cfg.dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert isinstance(shapes, TextEncoder)
    assert (shapes.dim, shapes.max_len) == (cfg.dim, cfg.max_len)
    ids = shapes.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (3, cfg.max_len)


def test_shapes_padding_is_exactly_zero(shapes):
    out = shapes.encode(PROMPTS)
    for b, n in enumerate([10, 5, 0]):
        assert (out[b, n:] == 0).all()
        if n:
            assert (out[b, :n].abs().sum(-1) > 0).all()  # real tokens are not zero


def test_shapes_same_seed_same_weights():
    a, b, c = ShapesTextEncoder(seed=0), ShapesTextEncoder(seed=0), ShapesTextEncoder(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_shapes_case_and_full_stop_ignored(shapes):
    a = shapes.encode(["a red circle moving left"])
    b = shapes.encode(["  A Red CIRCLE moving LEFT.  "])
    assert torch.equal(shapes.tokenize(["a red circle moving left"]), shapes.tokenize(["A Red CIRCLE moving LEFT."]))
    assert torch.equal(a, b)


def test_shapes_unknown_word_warns_once_with_vocab():
    enc = ShapesTextEncoder(seed=0)
    with pytest.warns(UserWarning, match="zebra") as record:
        out = enc.encode(["a red zebra", "a zebra on a blue background"])
    msgs = [str(w.message) for w in record if "zebra" in str(w.message)]
    assert len(msgs) == 1
    assert "circle, cyan, down" in msgs[0]  # the alphabetical vocabulary is listed
    assert out.shape == (2, enc.max_len, enc.dim) and torch.isfinite(out).all()
    assert enc.tokenize(["zebra"])[0, 0].item() == enc.unk_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second time: silent
        enc.encode(["a zebra"])


def test_shapes_truncates_long_prompts_with_warning():
    enc = ShapesTextEncoder(ShapesTextConfig(max_len=4), seed=0)
    with pytest.warns(UserWarning, match="truncated"):
        out = enc.encode(["a small red circle moving left"])
    assert out.shape == (1, 4, enc.dim)
    assert (out[0].abs().sum(-1) > 0).all()


def test_shapes_save_load_round_trip(tmp_path, shapes):
    shapes.save(tmp_path / "te")
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    assert cfg["type"] == "shapes" and cfg["dim"] == shapes.dim
    assert sorted(p.name for p in (tmp_path / "te").iterdir()) == ["config.json", "model.safetensors"]
    for loaded in (ShapesTextEncoder.from_folder(tmp_path / "te"), load_text_encoder(tmp_path / "te")):
        assert isinstance(loaded, ShapesTextEncoder)
        assert loaded.cfg == shapes.cfg
        assert torch.equal(loaded.encode(PROMPTS), shapes.encode(PROMPTS))


def test_shapes_different_prompts_differ(shapes):
    out = shapes.encode(["a red circle moving left", "a red circle moving right", "a blue circle moving left"])
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


def test_shapes_forward_is_differentiable(shapes):
    ids = shapes.tokenize(["a red circle"])
    shapes(ids).sum().backward()
    assert shapes.tok_emb.weight.grad is not None
    shapes.zero_grad(set_to_none=True)


# the fixed code (ShapesTextConfig.fixed_code)


def test_fixed_code_keeps_every_word_apart_and_tells_the_objects_apart():
    enc = ShapesTextEncoder(ShapesTextConfig.fixed_code(dim=96, max_len=24))
    assert list(enc.parameters()) == []  # nothing to train
    two = "a red circle moving left and a small blue square moving up quickly on a black background"
    pairs = ["a red circle moving left on a black background", "a red circle moving right on a black background"]
    x = enc.encode([two] + pairs)
    n = len(two.split())
    assert torch.allclose(x[0, :n].norm(dim=-1), torch.full((n,), 96 ** 0.5))  # like a LayerNorm output
    assert (x[0, n:] == 0).all() and (x[1, 10:] == 0).all()
    # swapping one word changes exactly that token, by the same amount for any two words
    diff = (x[1] - x[2]).norm(dim=-1)
    assert diff[4].item() == pytest.approx((2 * 96 / 3) ** 0.5) and (diff[torch.arange(24) != 4] == 0).all()
    # a token is word + position + phrase: first object up to "and", second from "and", background from "on"
    w = two.split()

    def phrase(t):
        return x[0, t] - enc.word_code[enc.word_to_id[w[t]]] - enc.pos_code[t]

    for t, ph in ((0, 0), (w.index("and") - 1, 0), (w.index("and"), 1), (w.index("on") - 1, 1), (w.index("on"), 2),
                  (n - 1, 2)):
        assert torch.equal(phrase(t), enc.phrase_code[ph]), (t, w[t])
    assert enc.encode([""]).abs().sum() == 0  # the unconditional prompt is all zeros


def test_fixed_code_round_trip_and_config_errors(tmp_path):
    enc = ShapesTextEncoder(ShapesTextConfig.fixed_code())
    enc.save(tmp_path / "te")
    loaded = load_text_encoder(tmp_path / "te")
    assert loaded.cfg.fixed and torch.equal(loaded.encode(PROMPTS), enc.encode(PROMPTS))
    with pytest.raises(ValueError, match="num_layers must be 0"):
        ShapesTextConfig(fixed=True)
    narrow = ShapesTextEncoder(ShapesTextConfig.fixed_code(dim=32), seed=0)  # 59 one-hots do not fit
    code = torch.cat([narrow.word_code, narrow.pos_code, narrow.phrase_code])
    assert torch.allclose(code.norm(dim=1), torch.full((59,), (32 / 3) ** 0.5))
    cos = F.normalize(code, dim=1) @ F.normalize(code, dim=1).T
    assert (cos - torch.eye(59)).abs().max() < 0.9  # every word, position and phrase distinct
    with pytest.raises(ValueError, match="'and' and 'on'"):
        ShapesTextConfig(vocab=("<pad>", "<unk>", "a", "red"), num_layers=0, fixed=True)


# -----------------------------------------------------------------------------
# UMT5TextEncoder with a tiny model and tokenizer built here

WORDS = ["a", "red", "blue", "circle", "square", "moving", "left", "right", "on", "background"]


def make_tiny_umt5(root: Path):
    """diffusers Wan layout: root/text_encoder (config.json + model.safetensors), root/tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(root / "tokenizer")

    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=len(vocab), d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    model = UMT5EncoderModel(cfg).eval()
    model.save_pretrained(root / "text_encoder", safe_serialization=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_umt5(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    model, tokenizer = make_tiny_umt5(root)
    return root, model, tokenizer


def test_umt5_matches_transformers_and_zero_pads(tiny_umt5):
    root, model, tokenizer = tiny_umt5
    enc = load_text_encoder(root / "text_encoder", max_len=16)
    assert isinstance(enc, UMT5TextEncoder) and isinstance(enc, TextEncoder)
    assert (enc.dim, enc.max_len) == (32, 16)

    prompts = ["a red circle moving left", "a blue square"]
    out = enc.encode(prompts)
    assert out.shape == (2, 16, 32) and out.dtype == torch.float32

    for b, p in enumerate(prompts):
        ids = torch.tensor([tokenizer(p).input_ids])  # words + </s>, no padding
        n = ids.shape[1]
        assert n == len(p.split()) + 1
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(out[b, :n], ref, atol=1e-6, rtol=1e-6)
        assert (out[b, n:] == 0).all()
        assert (out[b, :n].abs().sum(-1) > 0).all()


def test_umt5_lru_cache(tiny_umt5):
    root, _, _ = tiny_umt5
    enc = UMT5TextEncoder.from_folder(root / "text_encoder", root / "tokenizer", max_len=16, cache_size=2)
    calls = []
    run = enc._run
    enc._run = lambda prompts: calls.append(list(prompts)) or run(prompts)

    a = enc.encode(["a red circle"])
    b = enc.encode(["a red circle"])
    assert torch.equal(a, b) and calls == [["a red circle"]]  # second call served from the cache
    b[0, 0, 0] = 123.0  # mutating a result does not corrupt the cache
    assert torch.equal(enc.encode(["a red circle"]), a)

    enc.encode(["a blue square", "a red circle", "a blue square"])  # one new prompt, deduplicated
    assert calls[-1] == ["a blue square"]
    enc.encode(["left"])  # cache_size=2: evicts the least recently used ("a red circle")
    assert list(enc._cache) == ["a blue square", "left"]


def test_umt5_offload_to_output_device(tiny_umt5):
    root, _, _ = tiny_umt5
    enc = load_text_encoder(root / "text_encoder", max_len=8, offload=True, output_device="cpu")
    assert enc.model.device.type == "cpu" and enc.device == torch.device("cpu")
    assert enc.encode(["a red circle"]).shape == (1, 8, 32)


# -----------------------------------------------------------------------------
# load_text_encoder errors


def test_load_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_text_encoder(missing)


def test_load_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        load_text_encoder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


def test_load_unknown_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unknown text encoder type 'bert'"):
        load_text_encoder(tmp_path)


def test_load_corrupt_safetensors(tmp_path, shapes):
    shapes.save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_text_encoder(tmp_path)


def test_load_umt5_without_tokenizer(tmp_path, tiny_umt5):
    import shutil

    root, _, _ = tiny_umt5
    shutil.copytree(root / "text_encoder", tmp_path / "text_encoder")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_text_encoder(tmp_path / "text_encoder")
