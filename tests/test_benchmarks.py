"""python -m benchmarks: the diffusers WanPipeline baseline is the teacher's own sampler, and a whole run on the
tiny preset writes the contract's JSON fields for every system, with the oracle beside each speed."""

import json

import numpy as np
import torch

from engine.config import get_preset
from engine.vae import VideoVAE


def test_wan_pipeline_baseline_is_the_teachers_sampler():
    """The pipeline's frames equal distill.teacher.sample (30-step Euler with CFG) on the same noise, decoded by
    the same VAE: the baseline times what the teacher's users would run, not some other sampler."""
    from benchmarks.baselines import load_wan_pipeline, wan_pipeline_system
    from distill.data import to_uint8
    from distill.teacher import sample

    pr = get_preset("tiny")
    vae = VideoVAE.from_config(pr.vae, seed=3)
    pipe, text = load_wan_pipeline(None, vae, "tiny")
    prompt, seed, steps = "a blue square moving up on a black background", 11, 4
    res, video = wan_pipeline_system(pipe, text, prompt, 6, pr.width, pr.height, steps=steps, seed=seed)
    assert res["frames"] == 9 and video.shape == (9, pr.height, pr.width, 3) and video.dtype == np.uint8
    assert res["first_frame_ms"] >= res["stage_ms"]["decode"] > 0 and res["fps"] > 0
    assert pipe.vae.decode.__func__ is type(pipe.vae).decode  # the timing hook is removed again

    s = vae.spatial
    shape = (1, pipe.transformer.config.in_channels, 3, pr.height // s, pr.width // s)
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    z = sample(pipe.transformer, text.encode([prompt]), text.encode([""]), noise, steps=steps, guidance=4.0,
               shift=3.0)
    ref = to_uint8(vae.decode(z))[0]
    assert np.abs(ref.astype(int) - video.astype(int)).max() <= 1


def test_benchmark_run_on_tiny_writes_every_system(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = tmp_path / "r.json"
    assert main(["--preset", "tiny", "--quick", "--seconds", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["systems"]) == {"engine", "recompute", "wan_pipeline"}
    for name, s in r["systems"].items():
        for key in ("fps", "first_frame_ms", "chunk_ms", "stage_ms", "peak_memory_mb", "oracle"):
            assert key in s, (name, key)
        assert 0 <= s["oracle"] <= 1 and s["fps"] > 0
    assert r["systems"]["wan_pipeline"]["stage_ms"]["decode"] > 0
    assert "engine vs wan_pipeline" in capsys.readouterr().out


def test_benchmark_skips_the_pipeline_without_a_teacher(tmp_path):
    import argparse

    from benchmarks.__main__ import pipeline_system, table
    from engine.folder import load_model_folder
    from engine.init_model import random_model_folder

    random_model_folder("tiny", tmp_path / "m")
    model = load_model_folder(tmp_path / "m")
    a = argparse.Namespace(no_pipeline=False, preset=None, teacher=str(tmp_path / "none"), device="cpu",
                           dtype="float32")
    skipped = pipeline_system(a, model, 16)
    assert "no teacher folder" in skipped["skipped"]
    assert pipeline_system(argparse.Namespace(**{**vars(a), "no_pipeline": True}), model, 16) == {
        "skipped": "--no-pipeline"}
    eng = {"fps": 10.0, "first_frame_ms": 5.0, "chunk_ms": {"p50": 1.0, "p95": 2.0}, "fps_without_decode": 20.0,
           "stage_ms": {"denoise": 1.0}, "oracle": 0.5}
    text = table({"model": {"fps": 16}, "systems": {"engine": eng, "wan_pipeline": skipped}, "scaling": []})
    assert "wan_pipeline skipped: no teacher folder" in text and "0.500" in text
