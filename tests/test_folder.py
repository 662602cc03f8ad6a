"""Model folders (engine/folder.py): round trip, diffusers' format both ways, one-line load errors, resolve()."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from engine.config import get_preset
from engine.folder import (ASSETS, WEIGHTS, LoadedModel, ModelLoadError, load_model_folder, load_transformer,
                           resolve, save_transformer)
from engine.init_model import random_model_folder
from engine.model import CausalWanModel
from engine.text import ShapesTextConfig, ShapesTextEncoder
from engine.vae import VideoVAE

SEED = 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("folder-model") / "m"
    random_model_folder("tiny", path, seed=SEED, weights_dtype=torch.float32)
    return path


@pytest.fixture
def copy(folder, tmp_path) -> Path:
    """A private copy of the model folder, free to break."""
    return Path(shutil.copytree(folder, tmp_path / "broken"))


def assert_same_state(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].to(want[k].dtype), want[k]), k


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_inputs(cfg, seed=1, batch=2, fhw=(3, 4, 6), text_len=5):
    """x [B, C, F, h, w], t [B] in 0..1000, text embeddings [B, Lt, text_dim]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *fhw, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    e = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    return x, t, e


# --------------------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------------------


def test_the_vae_folder_decides_the_presets_vae(copy):
    """A model folder whose VAE was replaced by one with a wider decoder (`train_vae --decoder-base-dim`):
    the loaded preset describes the VAE it loaded, not the one engine.json was written with."""
    import dataclasses

    cfg = dataclasses.replace(get_preset("tiny").vae, decoder_base_dim=6)
    shutil.rmtree(copy / "vae")
    VideoVAE.from_config(cfg, seed=3).save(copy / "vae")
    m = load_model_folder(copy)
    assert m.preset.vae == cfg == m.vae.config()
    assert json.loads((copy / "engine.json").read_text())["preset"]["vae"]["decoder_base_dim"] != 6


def test_layout(folder):
    for rel in ("engine.json", "transformer/config.json", f"transformer/{WEIGHTS}", "vae/config.json",
                f"vae/{WEIGHTS}", "text_encoder/config.json"):
        assert (folder / rel).is_file(), rel
    info = json.loads((folder / "engine.json").read_text())
    assert info["format"] == "streamgen-model"
    assert info["preset"]["name"] == "tiny"


def test_round_trip_weights_and_preset(folder):
    m = load_model_folder(folder)
    assert isinstance(m, LoadedModel)
    preset = get_preset("tiny")

    # transformer: the same weights as a model rebuilt from the same seed, and as the saved file
    torch.manual_seed(SEED)
    rebuilt = CausalWanModel(preset.model)
    assert_same_state(m.transformer.state_dict(), rebuilt.state_dict())
    assert_same_state(m.transformer.state_dict(), load_file(str(folder / "transformer" / WEIGHTS)))
    assert m.transformer.cfg == preset.model
    assert not m.transformer.training
    assert all(not p.requires_grad for p in m.transformer.parameters())

    # VAE and text encoder are seeded too
    assert_same_state(m.vae.vae.state_dict(), VideoVAE.from_config(preset.vae, seed=SEED).vae.state_dict())
    text = ShapesTextEncoder(ShapesTextConfig(dim=preset.model.text_dim), seed=SEED)
    assert_same_state(m.text.state_dict(), text.state_dict())

    # the preset's streaming fields survive engine.json
    assert m.preset == preset
    assert m.preset.cache == preset.cache
    assert m.preset.sampler == preset.sampler
    assert m.preset.vae == preset.vae
    assert (m.preset.height, m.preset.width, m.preset.fps) == (preset.height, preset.width, preset.fps)
    assert m.preset.text_encoder == preset.text_encoder
    assert m.name == "m"


def test_float16_storage_round_trip(tmp_path):
    random_model_folder("tiny", tmp_path / "h", seed=SEED, weights_dtype=torch.float16)
    stored = load_file(str(tmp_path / "h" / "transformer" / WEIGHTS))
    assert all(v.dtype == torch.float16 for v in stored.values())
    m = load_model_folder(tmp_path / "h", dtype=torch.float32)
    assert m.transformer.dtype == torch.float32
    torch.manual_seed(SEED)
    rebuilt = CausalWanModel(get_preset("tiny").model)
    want = {k: v.half().float() for k, v in rebuilt.state_dict().items()}
    assert_same_state(m.transformer.state_dict(), want)


def test_save_then_load_transformer(tmp_path):
    cfg = get_preset("tiny").model
    torch.manual_seed(3)
    model = CausalWanModel(cfg)
    save_transformer(model, tmp_path / "t")
    back = load_transformer(tmp_path / "t")
    assert back.cfg == cfg
    assert_same_state(back.state_dict(), model.state_dict())


# --------------------------------------------------------------------------------------------------------------
# diffusers' format, both ways
# --------------------------------------------------------------------------------------------------------------


def test_transformer_folder_loads_in_diffusers(folder):
    ref = WanTransformer3DModel.from_pretrained(str(folder / "transformer")).eval()
    ours = load_transformer(folder / "transformer")
    assert_same_state(ref.state_dict(), ours.state_dict())
    x, t, e = random_inputs(ours.cfg)
    with torch.no_grad():
        want = ref(x, t, e, return_dict=False)[0]
        got = ours(x, t, e)
    assert got.shape == want.shape == x.shape
    assert rel_err(got, want) <= 1e-5


def test_diffusers_saved_transformer_loads_as_ours(tmp_path):
    cfg = get_preset("tiny").model
    torch.manual_seed(4)
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():  # randomise everything, including zero/one-initialised parameters
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ref.save_pretrained(str(tmp_path / "teacher"), safe_serialization=True)
    assert (tmp_path / "teacher" / WEIGHTS).is_file()

    ours = load_transformer(tmp_path / "teacher")
    assert ours.cfg == cfg
    assert_same_state(ours.state_dict(), ref.state_dict())
    x, t, e = random_inputs(cfg, seed=5, batch=1, fhw=(2, 6, 4), text_len=3)
    with torch.no_grad():
        want = ref(x, t, e, return_dict=False)[0]
        got = ours(x, t, e)
    assert rel_err(got, want) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Clear errors: ModelLoadError, one line, naming the file
# --------------------------------------------------------------------------------------------------------------


def load_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model_folder(path)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def rewrite_weights(copy: Path, edit):
    f = copy / "transformer" / WEIGHTS
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return f


def test_missing_engine_json(copy):
    (copy / "engine.json").unlink()
    assert str(copy / "engine.json") in load_error(copy)


def test_bad_json_in_engine_json(copy):
    (copy / "engine.json").write_text('{"format": "streamgen-model", "preset": ')
    msg = load_error(copy)
    assert str(copy / "engine.json") in msg


def test_not_a_model_folder(copy):
    (copy / "engine.json").write_text('{"format": "something-else"}')
    assert str(copy / "engine.json") in load_error(copy)


def test_bad_preset(copy):
    info = json.loads((copy / "engine.json").read_text())
    info["preset"]["height"] = 33
    (copy / "engine.json").write_text(json.dumps(info))
    assert str(copy / "engine.json") in load_error(copy)


def test_truncated_transformer_weights(copy):
    f = copy / "transformer" / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert str(f) in load_error(copy)


def test_missing_transformer_weights(copy):
    f = copy / "transformer" / WEIGHTS
    f.unlink()
    assert str(f) in load_error(copy)


def test_missing_key(copy):
    f = rewrite_weights(copy, lambda sd: sd.pop("blocks.1.attn1.to_q.weight"))
    msg = load_error(copy)
    assert str(f) in msg and "blocks.1.attn1.to_q.weight" in msg


def test_wrong_shape(copy):
    f = rewrite_weights(copy, lambda sd: sd.__setitem__("proj_out.bias", torch.zeros(3)))
    msg = load_error(copy)
    assert str(f) in msg and "proj_out.bias" in msg


def test_unexpected_key(copy):
    f = rewrite_weights(copy, lambda sd: sd.__setitem__("blocks.9.extra.weight", torch.zeros(2)))
    msg = load_error(copy)
    assert str(f) in msg and "blocks.9.extra.weight" in msg


def test_unsupported_transformer_option(copy):
    f = copy / "transformer" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["image_dim"] = 16  # an image-conditioning (I2V) option we do not implement
    f.write_text(json.dumps(cfg))
    msg = load_error(copy)
    assert str(f) in msg and "image_dim" in msg


def test_missing_vae_folder(copy):
    shutil.rmtree(copy / "vae")
    assert str(copy / "vae") in load_error(copy)


def test_truncated_vae_weights(copy):
    f = copy / "vae" / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert str(copy / "vae") in load_error(copy)


def test_missing_vae_weights_refuse_pickle_fallback(copy):
    (copy / "vae" / WEIGHTS).unlink()
    (copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    assert str(copy / "vae" / WEIGHTS) in load_error(copy)


def test_missing_text_encoder(copy):
    shutil.rmtree(copy / "text_encoder")
    assert str(copy / "text_encoder") in load_error(copy)


@pytest.mark.parametrize("rel", ["engine.json", "transformer/config.json"])
def test_json_that_is_not_an_object(copy, rel):
    (copy / rel).write_text("[1, 2]\n")
    assert str(copy / rel) in load_error(copy)


def test_missing_folder():
    msg = load_error("/no/such/model/folder")
    assert "/no/such/model/folder" in msg


# --------------------------------------------------------------------------------------------------------------
# resolve(): folders and built-in names
# --------------------------------------------------------------------------------------------------------------


def test_resolve_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./shapes here: the name must come from assets/
    assert (ASSETS / "shapes" / "engine.json").is_file()
    assert resolve("shapes") == ASSETS / "shapes"
    assert resolve(None) == ASSETS / "shapes"  # the shipped default


def test_resolve_folder_path(folder):
    assert resolve(folder) == folder
    assert resolve(str(folder)) == folder


def test_resolve_unknown_name_lists_builtin_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        resolve("no-such-model")
    msg = str(info.value)
    assert "\n" not in msg
    assert "no-such-model" in msg
    builtin = sorted(d.name for d in ASSETS.iterdir() if (d / "engine.json").is_file())
    assert "shapes" in builtin
    for name in builtin:
        assert name in msg


def test_shipped_model_loads():
    m = load_model_folder("shapes")
    assert m.path == ASSETS / "shapes"
    assert m.preset.name == "shapes-t2"  # the built-in model: Shapes widths, a latent frame per 2 video frames
    assert m.vae.temporal == 2 and m.preset.model == get_preset("shapes").model
