"""`python -m engine.convert`: existing checkpoints -> engine model folders that load with `--model` alone.

Sources are the synthetic checkpoints of tests/test_checkpoints.py (real key names and wrappers); one conversion
runs at the real Wan2.1-1.3B widths (one layer), the rest at small widths. The CLI runs in-process except where
the real process matters (exit status, stderr, no traceback).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from engine import checkpoints as ck
from engine.convert import main
from engine.folder import FORMAT, WEIGHTS, load_model_folder
from test_checkpoints import (LORA_TARGETS, SMALL, Parts, check_loaded, write_diffusers_folder, write_longlive,
                              write_reward_forcing, write_self_forcing, write_wan_folder)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hf-cache"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def small_wan(small, tmp_path_factory) -> Path:
    return write_wan_folder(small, tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-1.3B")


def cli(argv, capsys):
    """-> (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def convert_ok(capsys, *argv) -> tuple[Path, str]:
    rc, out, err = cli(argv, capsys)
    assert rc == 0, err
    return Path(out.strip().splitlines()[-1]), err


def engine_json(folder: Path) -> dict:
    return json.loads((folder / "engine.json").read_text())


def assert_engine_folder(folder: Path):
    for rel in ("engine.json", "transformer/config.json", f"transformer/{WEIGHTS}", "vae/config.json",
                f"vae/{WEIGHTS}", "text_encoder/config.json", "tokenizer/tokenizer.json"):
        assert (folder / rel).is_file(), rel
    assert not [p for p in folder.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".ckpt")]
    assert engine_json(folder)["format"] == FORMAT


def test_self_forcing_at_real_width(tmp_path, capsys):
    parts = Parts(tmp_path / "parts")  # Wan2.1-1.3B widths, one layer
    src = write_self_forcing(parts, tmp_path / "sf")
    base = write_wan_folder(parts, tmp_path / "Wan2.1-T2V-1.3B", transformer=False)
    out, err = convert_ok(capsys, src, "--base", base, "--out", tmp_path / "models" / "sf")
    assert out == tmp_path / "models" / "sf"
    assert "layout self-forcing" in err and "0.072 B parameters from 'generator_ema'" in err and "done in" in err
    assert_engine_folder(out)
    info = engine_json(out)
    assert (info["layout"], info["weights"], info["base"], info["name"]) == ("self-forcing", "generator_ema",
                                                                             str(base), "sf")
    assert info["preset"]["cache"]["window_frames"] == 18 and info["preset"]["cache"]["sink"] == "none"
    check_loaded(load_model_folder(out), parts, "self-forcing")
    # the transformer is diffusers' own format
    ref = WanTransformer3DModel.from_pretrained(str(out / "transformer")).eval()
    with torch.no_grad():
        assert torch.allclose(ref(*parts.inputs, return_dict=False)[0], parts.want, rtol=0, atol=1e-5)
    shutil.rmtree(tmp_path)


def test_wan_original_folder(small, small_wan, tmp_path, capsys):
    out, err = convert_ok(capsys, small_wan, "--out", tmp_path / "wan")
    assert "VAE: converting" in err and "text encoder: converting" in err
    assert_engine_folder(out)
    check_loaded(load_model_folder(out), small, "wan")
    assert engine_json(out)["notes"] == ck.BIDIRECTIONAL_NOTE


def test_preview_decoder_goes_into_the_folder(small, small_wan, tmp_path, capsys):
    """--preview FILE: TAEHV-layout weights (a .pth, read with weights_only) are written as the folder's preview/,
    which --model then loads; weights for other latents are refused and the folder is kept without them."""
    from engine.preview import PreviewConfig, PreviewDecoder

    out, _ = convert_ok(capsys, small_wan, "--out", tmp_path / "plain")
    z = json.loads((out / "vae" / "config.json").read_text())["z_dim"]
    torch.save(PreviewDecoder(PreviewConfig(z_dim=z, channels=(8, 8, 4, 4))).state_dict(),
               tmp_path / "taew.pth")
    out, err = convert_ok(capsys, small_wan, "--out", tmp_path / "wan", "--preview", tmp_path / "taew.pth")
    assert "preview decoder:" in err
    pv = load_model_folder(out).preview
    assert pv is not None and pv.cfg == PreviewConfig(z_dim=z, channels=(8, 8, 4, 4))
    torch.save(PreviewDecoder(PreviewConfig(z_dim=z + 1, channels=(8, 8, 4, 4))).state_dict(),
               tmp_path / "other.pth")
    rc, _, err = cli([small_wan, "--out", tmp_path / "w2", "--preview", tmp_path / "other.pth"], capsys)
    assert rc == 2 and f"reads {z + 1} latent channels, the VAE makes {z}" in err
    assert load_model_folder(tmp_path / "w2").preview is None
    rc, _, err = cli([small_wan, "--out", tmp_path / "w3", "--preview", tmp_path / "none.pth"], capsys)
    assert rc == 2 and "none.pth" in err and not (tmp_path / "w3").exists()


def test_diffusers_folder_shards_become_one_file(small, tmp_path, capsys):
    src = write_diffusers_folder(small, tmp_path / "src", shard="6MB")
    assert len(list((src / "transformer").glob("diffusion_pytorch_model-*"))) > 1
    out, _ = convert_ok(capsys, src, "--out", tmp_path / "d", "--layout", "diffusers")
    assert_engine_folder(out)
    assert (out / "text_encoder" / "model.safetensors.index.json").is_file()  # copied as diffusers shards it
    check_loaded(load_model_folder(out), small, "diffusers")


def test_longlive_lora_flag_and_bfloat16(small, small_wan, tmp_path, capsys):
    folder = write_longlive(small, tmp_path / "ll")
    lora = folder / "models" / "lora.pt"
    moved = tmp_path / "adapter" / "lora.pt"  # explicit --lora, not the one next to the base
    moved.parent.mkdir()
    lora.rename(moved)
    out, err = convert_ok(capsys, folder / "models" / "longlive_base.pt", "--base", small_wan, "--lora", moved,
                          "--dtype", "bfloat16", "--out", tmp_path / "longlive")
    assert f"LoRA: {len(LORA_TARGETS)} layers, rank 8, scale 1" in err
    stored = load_file(str(out / "transformer" / WEIGHTS))
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    want = {k: v.bfloat16() for k, v in small.state.items()}
    for k, v in want.items():
        assert (stored[k].float() - v.float()).abs().max() <= 2 * v.float().abs().max() * 2 ** -8, k
    info = engine_json(out)
    assert info["layout"] == "longlive" and info["lora"]["file"] == str(moved) and info["weights"] == "generator"
    assert info["preset"]["cache"]["sink"] == "static" and info["preset"]["cache"]["window_frames"] == 6
    m = load_model_folder(out)
    assert m.transformer.dtype == torch.float32 and m.preset.cache.sink_frames == 3


def test_reward_forcing_preset_and_weights_choice(small, small_wan, tmp_path, capsys):
    src = write_reward_forcing(small, tmp_path)
    rc, _, err = cli([src, "--base", small_wan, "--weights", "ema", "--out", tmp_path / "rf", "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "generator_ema" in err
    out, _ = convert_ok(capsys, src, "--base", small_wan, "--out", tmp_path / "rf", "--quiet")
    cache = engine_json(out)["preset"]["cache"]
    assert (cache["sink"], cache["sink_frames"], cache["window_frames"], cache["ema_alpha"]) == ("ema", 3, 3, 0.999)


# --------------------------------------------------------------------------------------------------------------
# Arguments and errors: exit 2, one line, nothing written
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["x"], ["x", "--out", "y", "--layout", "nope"],
                                  ["x", "--out", "y", "--dtype", "int8"], ["x", "--out", "y", "--lora-alpha", "0"],
                                  ["x", "--out", "y", "--lora-alpha", "nan"], ["x", "--out", "y", "--lora-alpha", "inf"],
                                  ["", "--out", "y"]])
def test_bad_arguments_exit_2(argv, capsys):
    rc, out, err = cli(argv, capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("engine.convert: error:")


def test_missing_source(tmp_path, capsys):
    rc, _, err = cli([tmp_path / "nope.pt", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path / "nope.pt") in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_unless_overwrite(small, small_wan, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = cli([small_wan, "--out", out], capsys)
    assert rc == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    convert_ok(capsys, small_wan, "--out", out, "--overwrite", "--quiet")
    assert not (out / "keep.txt").exists() and (out / "engine.json").is_file()


def test_failure_leaves_nothing_behind(small, small_wan, tmp_path, capsys):
    base = Path(shutil.copytree(small_wan, tmp_path / "base"))
    (base / ck.WAN_T5_FILE).write_bytes((base / ck.WAN_T5_FILE).read_bytes()[:5000])  # truncated text encoder
    src = write_reward_forcing(small, tmp_path / "rf")
    rc, _, err = cli([src, "--base", base, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and str(base / ck.WAN_T5_FILE) in err.splitlines()[-1] and "truncated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "rf"]  # no output, no partial folder


def test_real_process_one_line_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine.convert", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                            "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "missing" in r.stderr
