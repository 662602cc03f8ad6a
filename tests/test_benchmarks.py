"""python -m benchmarks: the diffusers WanPipeline baseline is the teacher's own sampler, and a whole run on the
tiny preset writes the contract's JSON fields for every system, with the oracle beside each speed."""

import json
import subprocess
import sys

import numpy as np
import pytest
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


def test_benchmark_run_on_tiny_writes_every_system(tmp_path, capsys, monkeypatch):
    from benchmarks.__main__ import main
    from engine import accel

    compiled = []  # --compile, traced with aot_eager (inductor on a CPU costs minutes)
    real_blocks, real_decoder = accel.compile_blocks, accel.compile_decoder
    monkeypatch.setattr(accel, "compile_blocks", lambda: compiled.append("blocks") or real_blocks("aot_eager"))
    monkeypatch.setattr(accel, "compile_decoder", lambda vae: compiled.append("vae") or real_decoder(vae, "aot_eager"))
    out = tmp_path / "r.json"
    try:
        assert main(["--preset", "tiny", "--quick", "--seconds", "1", "3", "--json", str(out), "--compile"]) == 0
    finally:
        accel.reset_compiled()
        torch._dynamo.reset()
    r = json.loads(out.read_text())
    configs = {"engine[sink=none]", "engine[sink=static]", "engine[sparse=0.2]", "engine[linear]",
               "engine[sparse=0.2+linear]",  # tiny's default sink is ema: that is `engine`
               "engine[steps=2]", "engine[compile]", "engine[compile+steps=2]",
               "engine[preview]", "engine[preview+steps=2]", "engine[compile+preview+steps=2]", "engine[native-vae]"}
    assert set(r["systems"]) == {"engine", "recompute", "wan_pipeline"} | configs
    # --quick: 5 s of video for every system alike (the pipeline's frame count is the VAE's framing of it)
    fps = get_preset("tiny").fps
    assert r["video_seconds"] == 5
    assert {s["frames"] for n, s in r["systems"].items() if n != "wan_pipeline"} == {5 * fps}
    # the blocks compiled for those three, then eager; the VAE's decoder not on a CPU (accel.decoder_gains_from_compile)
    assert compiled == ["blocks"] * 3 and not accel.is_compiled()
    assert r["model"]["preview_parameters"] > 0
    assert r["systems"]["engine[preview+steps=2]"]["steps"] == r["systems"]["engine[compile+preview+steps=2]"]["steps"] == 2
    assert r["systems"]["engine[preview]"]["stage_ms"]["decode"] > 0
    assert r["model"]["steps"] == r["systems"]["engine"]["steps"] == r["systems"]["engine[compile]"]["steps"] > 2
    assert r["systems"]["engine[steps=2]"]["steps"] == r["systems"]["engine[compile+steps=2]"]["steps"] == 2
    assert list(r["systems"]["engine[steps=2]"]["forward_ms"]) == ["step_1", "step_2", "clean"]
    # the same weights, noise and schedule: compiling changes the speed, not the video
    assert abs(r["systems"]["engine[compile]"]["oracle"] - r["systems"]["engine"]["oracle"]) < 1e-3
    # and so does decoding with PyTorch's own kernels, a latent frame a call (the VAE's CPU fast paths off)
    assert abs(r["systems"]["engine[native-vae]"]["oracle"] - r["systems"]["engine"]["oracle"]) < 1e-3
    for name, s in r["systems"].items():
        for key in ("fps", "first_frame_ms", "chunk_ms", "stage_ms", "peak_memory_mb", "oracle"):
            assert key in s, (name, key)
        assert 0 <= s["oracle"] <= 1 and s["fps"] > 0
    assert r["systems"]["engine[sparse=0.2+linear]"]["cache"]["linear_memory"] is True
    assert r["systems"]["wan_pipeline"]["stage_ms"]["decode"] > 0
    eng = r["systems"]["engine"]
    steps = r["model"]["steps"]
    assert list(eng["forward_ms"]) == [f"step_{i + 1}" for i in range(steps)] + ["clean"]
    assert all(v > 0 for v in eng["forward_ms"].values())
    for stage in ("jpeg_encode", "h264_encode", "websocket"):
        assert eng["delivery_ms"][stage]["p95"] >= eng["delivery_ms"][stage]["p50"] > 0
    assert 0 < eng["fps_streamed"] < eng["fps"]
    # memory against stream length: the cache is a fixed size, the no-cache history grows with the stream
    (a, b) = r["scaling"]
    assert a["engine"]["state_mb"] == b["engine"]["state_mb"] > 0
    assert a["engine"]["rss_mb"] > 0 and b["engine"]["rss_mb"] > 0
    assert b["recompute"]["state_mb"] > a["recompute"]["state_mb"] and b["recompute"]["peak_rss_mb"] > 0
    printed = capsys.readouterr().out
    assert "engine vs wan_pipeline" in printed and "websocket loopback" in printed and "VAE decode: " in printed


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
    # a teacher exported for another preset's latents is not this model's baseline
    t = tmp_path / "teacher-shapes"
    t.mkdir()
    (t / "teacher.json").write_text('{"preset": "shapes"}')
    other = pipeline_system(argparse.Namespace(**{**vars(a), "teacher": str(t)}), model, 16)
    assert "trained for preset shapes, this model is tiny" in other["skipped"]
    eng = {"fps": 10.0, "first_frame_ms": 5.0, "chunk_ms": {"p50": 1.0, "p95": 2.0}, "fps_without_decode": 20.0,
           "stage_ms": {"denoise": 1.0}, "oracle": 0.5}
    text = table({"model": {"fps": 16}, "systems": {"engine": eng, "wan_pipeline": skipped}, "scaling": []})
    assert "wan_pipeline skipped: no teacher folder" in text and "0.500" in text


def test_recompute_is_skipped_where_its_attention_would_not_fit(monkeypatch):
    import benchmarks.__main__ as bm
    from engine.folder import load_model_folder
    from engine.init_model import random_model_folder

    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp()) / "m"
    random_model_folder("tiny", d)
    model = load_model_folder(d)
    need = bm.recompute_attention_mb(model, 11)
    assert bm.recompute_attention_mb(model, 22) > 3.9 * need  # quadratic in the stream length
    monkeypatch.setattr(bm, "available_mb", lambda: 1e-3)  # a machine with (almost) no memory free
    r = bm.recompute_at(model, 40, chunks=1)
    assert "skipped" in r and "GB" in r["skipped"] and r["attention_mb_estimate"] > 0
    monkeypatch.setattr(bm, "available_mb", lambda: 1e9)
    assert "skipped" not in bm.recompute_at(model, 40, chunks=1)


def test_forward_timer_names_each_forward_and_restores_the_stream():
    from benchmarks.stages import ForwardTimer
    from engine.pipeline import VideoGenerator
    from engine.folder import load_model_folder
    from engine.init_model import random_model_folder

    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp()) / "m"
    random_model_folder("tiny", d)
    gen = VideoGenerator(load_model_folder(d))
    steps = len(gen.stream.sampler_cfg.timesteps)
    timer = ForwardTimer(gen.stream, steps)
    chunks = list(gen.run([(0, "a red circle bouncing on a black background")], 20, seed=1))
    timer.remove()
    assert {k: len(v) for k, v in timer.times.items()} == {
        **{f"step_{i + 1}": len(chunks) for i in range(steps)}, "clean": len(chunks) - 1}
    assert gen.stream.denoise.__func__ is type(gen.stream).denoise


def test_delivery_stages_encode_and_carry_every_frame():
    from benchmarks.stages import delivery, websocket_ms

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (n, 37, 29, 3), dtype=np.uint8) for n in (3, 4, 4)]  # odd sizes: h264 pads
    d = delivery(chunks, 16)
    assert all(d[k]["mean"] > 0 for k in ("jpeg_encode", "h264_encode", "websocket"))
    assert d["jpeg_kb_per_frame"] > 0 and d["h264_kbit_per_s"] > 0
    assert len(websocket_ms(chunks)) == 3


@pytest.mark.parametrize("module,args,needle", [
    ("benchmarks", ["--threads", "0"], "--threads must be >= 1"),
    ("benchmarks", ["--seconds", "10", "nan"], "--seconds positive"),
    ("benchmarks", ["--video-seconds", "0"], "--video-seconds must be positive"),
    ("benchmarks.server_bench", ["--threads", "-1"], "--threads >= 1"),
    ("benchmarks.server_bench", ["--seconds", "nan"], "--seconds > 0"),
])
def test_benchmark_clis_refuse_bad_numbers_in_one_line(module, args, needle):
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr


def test_gpu_session_script_runs_each_step_under_its_limit(tmp_path):
    """benchmarks/gpu_session.sh (one prepared device call): env.txt, then the three steps in order with their
    flags and the commit, each under `timeout`; a failing or cut-off step is logged with its status and the next one
    still runs. A stand-in Python records each call (the steps' own dry runs are tested beside their modules)."""
    import os
    import subprocess
    from pathlib import Path

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase "$*" in *"engine graphs"*) exit 3;; esac\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"
    r = subprocess.run(["bash", str(script), str(out), "abc1234"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": str(fake)})
    assert r.returncode == 0, r.stderr
    runs = [line for line in calls.read_text().splitlines() if line.startswith("-m ")]
    assert [line.split()[1] for line in runs] == ["benchmarks.gpu", "benchmarks.gpu", "benchmarks.kernels_bench"]
    assert "--systems engine graphs" in runs[0] and "--systems compile+vae compile+preview" in runs[1]
    assert all("--git-sha abc1234" in line and f"--json {out}/" in line for line in runs)
    assert "--sweep" in runs[2] and "--dry-run" not in " ".join(runs)
    log = (out / "log.txt").read_text()
    assert "== graphs: exit 3" in log and "== preview: exit 0" in log and "== kernels: exit 0" in log
    assert "git abc1234" in (out / "env.txt").read_text()
    with_dry = subprocess.run(["bash", str(script), str(tmp_path / "dry"), "x"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHON": str(fake), "DRY": "1"})
    assert with_dry.returncode == 0
    dry_runs = [line for line in calls.read_text().splitlines() if line.startswith("-m ")][3:]
    assert len(dry_runs) == 3 and all("--dry-run" in line for line in dry_runs)
