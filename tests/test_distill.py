"""Distillation pieces against the engine: the student's one-pass training forward equals streaming."""

import json
import math
import random

import pytest
import torch

from distill.ode_init import ODETask, TeacherForced, teacher_forcing_forward, trajectory_grid
from distill.teacher import Teacher, sample, sigma_schedule
from engine.config import SamplerConfig, get_preset
from engine.model import CausalWanModel
from engine.sampler import sigmas as engine_sigmas
from engine.stream import Stream


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_forcing_forward_equals_streaming(seed):
    preset = get_preset("tiny")
    model = _randomise(CausalWanModel(preset.model), seed).eval()
    fpc = preset.cache.frames_per_chunk
    nchunks = (preset.cache.window_frames // fpc) + 1  # the longest stretch with no eviction
    g = torch.Generator().manual_seed(100 + seed)
    h, w = preset.latent_hw
    shape = (2, preset.model.in_channels, nchunks * fpc, h, w)
    clean, noisy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t_chunk = torch.rand(nchunks, generator=g) * 1000
    text = torch.randn(2, 5, preset.model.text_dim, generator=g)
    with torch.no_grad():
        v = teacher_forcing_forward(model, clean, noisy, t_chunk.repeat_interleave(fpc)[None].expand(2, -1),
                                    model.text_kv(text), fpc)
    s = Stream(model, preset, batch=2)
    s.set_prompt(text)
    for c in range(nchunks):
        sl = slice(c * fpc, (c + 1) * fpc)
        ref = s.denoise(noisy[:, :, sl], float(t_chunk[c]))
        torch.testing.assert_close(v[:, :, sl], ref, atol=2e-5, rtol=1e-4)
        s.commit(clean[:, :, sl])
    # the context matters: with other clean latents the last chunk's prediction changes
    with torch.no_grad():
        v2 = teacher_forcing_forward(model, torch.randn(shape, generator=g), noisy,
                                     t_chunk.repeat_interleave(fpc)[None].expand(2, -1), model.text_kv(text), fpc)
    assert not torch.allclose(v2[:, :, -fpc:], v[:, :, -fpc:], atol=1e-3)
    torch.testing.assert_close(v2[:, :, :fpc], v[:, :, :fpc])  # ... but not the first chunk's


def test_trajectory_grid_passes_through_student_sigmas():
    cfg = SamplerConfig(timesteps=(1000.0, 750.0, 500.0, 250.0), shift=3.0)
    sig, idx = trajectory_grid(cfg, 5)
    assert len(sig) == 4 * 5 + 1 and sig[0] == 1 and sig[-1] == 0
    assert (sig[:-1] > sig[1:]).all()
    torch.testing.assert_close(sig[idx], torch.tensor(engine_sigmas(cfg)[:4], dtype=torch.float32))


def test_ode_task_regresses_to_the_trajectory_end():
    """The ODE loss is zero for a model that predicts v = (x_k - x_0) / sigma_k exactly."""
    preset = get_preset("tiny")
    fpc = preset.cache.frames_per_chunk
    h, w = preset.latent_hw
    sig = [1.0, 0.9, 0.75, 0.5]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, preset.model.in_channels, 2 * fpc, h, w, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    states = torch.stack([(1 - s) * x0 + s * eps for s in sig] + [x0], dim=1)

    class P:
        prompts, sigmas = ["a", "b", "c"], sig

    P.states = states

    class Text:
        def encode(self, ps):
            return torch.zeros(len(ps), 4, preset.model.text_dim)

    task = ODETask(P(), Text(), fpc, "cpu")
    batch = task.batch([0, 1, 2])

    class Exact(torch.nn.Module):
        def forward(self, clean, noisy, t, text):
            return (noisy - clean) / (t[:, None, :, None, None] / 1000)

    loss, _ = task.loss(Exact(), batch, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    loss, _ = task.loss(TeacherForced(CausalWanModel(preset.model), fpc), batch, torch.Generator().manual_seed(0))
    assert loss.item() > 1e-3


def test_teacher_sampler_matches_diffusers_euler():
    """Our Euler loop with CFG equals diffusers' FlowMatchEulerDiscreteScheduler driving the same model."""
    preset = get_preset("tiny")
    teacher = Teacher.from_preset(preset, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, preset.model.in_channels, 3, *preset.latent_hw, generator=g)
    cond = teacher.text.encode(["a red circle bouncing on a black background"])
    uncond = teacher.text.encode([""])
    ours = sample(teacher.transformer, cond, uncond, noise, steps=6, guidance=3.0, shift=3.0)

    def velocity(x, t):
        vc, vu = (teacher.transformer(x, t, encoder_hidden_states=e, return_dict=False)[0] for e in (cond, uncond))
        return vu + 3.0 * (vc - vu)

    torch.testing.assert_close(ours, _diffusers_euler(velocity, noise, 6), atol=1e-4, rtol=1e-4)


def _diffusers_euler(velocity, noise, steps, shift=3.0):
    """diffusers' FlowMatchEulerDiscreteScheduler from noise with velocity(x, t [B]) -> v."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(velocity(x, t.expand(len(x))), t, x, return_dict=False)[0]
    return x


def test_autoguided_sampler_matches_a_hand_written_loop():
    """Autoguidance: each Euler step's velocity is vc + (g - 1)(vc - vu) + (a - 1)(vc - v_guide), the guide a weaker
    model called on the same x with its own prompt embeddings; at a = 1 the guide is never called and the sampler is
    the plain one; a != 1 without a guide is an error."""
    preset = get_preset("tiny")
    seed = random.randrange(1 << 30)
    teacher = _randomise(Teacher.from_preset(preset, seed=seed % 97), 1).eval()
    guide = _randomise(Teacher.from_preset(preset, seed=seed % 97 + 1), 2).eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, preset.model.in_channels, 3, *preset.latent_hw, generator=g)
    prompts = ["a red circle bouncing on a black background", "a blue square moving up on a gray background"]
    cond, uncond, gcond = teacher.text.encode(prompts), teacher.text.encode([""] * 2), guide.text.encode(prompts)
    for cfg, auto in ((3.0, 2.5), (1.0, 3.0)):
        ours = sample(teacher.transformer, cond, uncond, noise, steps=5, guidance=cfg, shift=3.0,
                      guide=guide.transformer, guide_cond=gcond, autoguidance=auto)

        def velocity(x, t):
            vc, vu = (teacher.transformer(x, t, encoder_hidden_states=e, return_dict=False)[0] for e in (cond, uncond))
            vg = guide.transformer(x, t, encoder_hidden_states=gcond, return_dict=False)[0]
            return vc + (cfg - 1) * (vc - vu) + (auto - 1) * (vc - vg)

        torch.testing.assert_close(ours, _diffusers_euler(velocity, noise, 5), atol=1e-4, rtol=1e-4)
        assert (ours - sample(teacher.transformer, cond, uncond, noise, steps=5, guidance=cfg)).abs().max() > 1e-3

    class Never(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the guide runs at autoguidance 1")

    plain = sample(teacher.transformer, cond, uncond, noise, steps=4, guidance=2.0)
    torch.testing.assert_close(sample(teacher.transformer, cond, uncond, noise, steps=4, guidance=2.0, guide=Never(),
                                      guide_cond=gcond, autoguidance=1.0), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="guide model"):
        sample(teacher.transformer, cond, uncond, noise, steps=4, autoguidance=2.0)


def test_history_guided_sampler_matches_a_hand_written_loop():
    """History guidance: with a clean context of K latent frames, each Euler step moves the sampled frames by
    vc + (g - 1)(vc - vu) + (h - 1)(vc - v_alone), v_alone the conditional prediction of those frames called as a clip
    of their own (no context, their own timesteps); the context stays as it was; h = 1 is the plain sampler, and h != 1
    without a context is an error."""
    preset = get_preset("tiny")
    seed = random.randrange(1 << 30)
    teacher = _randomise(Teacher.from_preset(preset, seed=seed % 97), 1).eval()
    tr = teacher.transformer
    g = torch.Generator().manual_seed(seed)
    frames, k = 5, 2
    noise = torch.randn(2, preset.model.in_channels, frames, *preset.latent_hw, generator=g)
    prompts = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]
    cond, uncond = teacher.text.encode(prompts), teacher.text.encode([""] * 2)
    cfg, hist, steps = 2.0, 2.5, 4
    ours = sample(tr, cond, uncond, noise, steps=steps, guidance=cfg, shift=3.0, context=k, history_guidance=hist)
    sig = sigma_schedule(steps, 3.0)
    x = noise.clone()
    n = (preset.latent_hw[0] // 2) * (preset.latent_hw[1] // 2)  # tokens a latent frame (2x2 patches)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2, frames), float(sig[i]) * 1000)
            t[:, :k] = 0
            tt = t.repeat_interleave(n, dim=1)
            vc, vu = (tr(x, tt, encoder_hidden_states=e, return_dict=False)[0] for e in (cond, uncond))
            xs = x[:, :, k:]
            alone = tr(xs, tt[:, k * n:], encoder_hidden_states=cond, return_dict=False)[0]
            v = (vc + (cfg - 1) * (vc - vu))[:, :, k:] + (hist - 1) * (vc[:, :, k:] - alone)
            x[:, :, k:] = xs + (sig[i + 1] - sig[i]) * v
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours[:, :, :k], noise[:, :, :k])
    plain = sample(tr, cond, uncond, noise, steps=steps, guidance=cfg, shift=3.0, context=k)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(sample(tr, cond, uncond, noise, steps=steps, guidance=cfg, shift=3.0, context=k,
                                      history_guidance=1.0), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="history guidance"):
        sample(tr, cond, uncond, noise, steps=steps, history_guidance=2.0)


def test_eval_guide_flag_errors(tmp_path, capsys):
    """--guide needs --eval and a folder; a guide trained on other latents is refused in one line (exit 2)."""
    from distill import train_teacher

    run = tmp_path / "t"
    run.mkdir()
    (run / "teacher.json").write_text('{"preset": "tiny"}\n')
    other = tmp_path / "g"
    other.mkdir()
    (other / "teacher.json").write_text('{"preset": "shapes-t2-s"}\n')
    for argv, msg in ((["--out", str(run), "--guide", str(other)], "needs --eval"),
                      (["--out", str(run), "--eval", "2", "--guide", str(tmp_path / "none")], "needs --eval"),
                      (["--out", str(run), "--eval", "2", "--guide", str(other)], "trained for preset shapes-t2-s")):
        with pytest.raises(SystemExit) as e:
            train_teacher.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_evaluate_splits_still_and_moving_clips():
    """--eval: the still / moving split covers every prompt once, and its adherences average to the whole."""
    from distill.shapes import parse_prompt, sample_prompt
    from distill.train_teacher import evaluate
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    n = 6
    res = evaluate(Teacher.from_preset(preset, seed=0).eval(), VideoVAE.from_config(preset.vae, seed=0), preset, n,
                   frames=5, steps=2, guidance=2.0, shift=3.0)
    rng = random.Random(1234)  # evaluate's prompts
    still = sum(all(o.motion == "still" for o in parse_prompt(sample_prompt(rng)).objects) for _ in range(n))
    parts = res["by_motion"]
    assert sum(v["clips"] for v in parts.values()) == n and parts.get("still", {"clips": 0})["clips"] == still
    assert sum(v["clips"] * v["adherence"] for v in parts.values()) / n == pytest.approx(res["adherence"])
    assert {"motion_ratio", "frozen_rate", "copy_rate"} <= res.keys()  # the motion summary of the same clips


def test_training_pipeline_end_to_end_on_tiny(tmp_path, capsys):
    """VAE -> latents -> teacher -> ODE pairs -> student -> a model folder the engine generates from."""
    import numpy as np

    from distill import ode_init, train_teacher, train_vae
    from engine.folder import load_model_folder
    from engine.pipeline import VideoGenerator

    common = ["--preset", "tiny", "--quiet", "--batch-size", "2", "--ckpt-every", "2"]
    assert train_vae.main(common + ["--out", str(tmp_path / "vae"), "--steps", "2"]) == 0
    assert train_vae.main(common + ["--out", str(tmp_path / "vae"), "--export", str(tmp_path / "vae_out"),
                                    "--eval", "0"]) == 0
    # decoder-only fine-tune from the exported folder: the encoder (and so any encoded latents) is unchanged
    assert train_vae.main(common + ["--out", str(tmp_path / "dec"), "--steps", "2", "--init", str(tmp_path / "vae_out"),
                                    "--freeze-encoder", "--lr", "1e-2"]) == 0
    from distill.trainer import load_weights
    from engine.vae import VideoVAE

    before = VideoVAE.from_folder(tmp_path / "vae_out").vae.state_dict()
    after = {k.removeprefix("vae."): v for k, v in load_weights(tmp_path / "dec", "model").items()}
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k].float(), after[k].float())}
    assert changed == {"decoder"} or changed == {"decoder", "post_quant_conv"}, changed
    lat = tmp_path / "lat.safetensors"
    args = common + ["--vae", str(tmp_path / "vae_out"), "--latents", str(lat), "--clips", "4", "--frames", "9"]
    assert train_teacher.main(args + ["--out", str(tmp_path / "teacher"), "--steps", "2"]) == 0
    assert lat.exists()
    # joint image-video training from an image cache (--frames 1: one latent frame a clip) made on first use
    images = tmp_path / "images.safetensors"
    assert train_teacher.main(common + ["--vae", str(tmp_path / "vae_out"), "--latents", str(images), "--clips", "6",
                                        "--frames", "1", "--out", str(tmp_path / "timg"), "--steps", "1"]) == 0
    assert train_teacher.main(args + ["--out", str(tmp_path / "tjoint"), "--steps", "2", "--image-batch", "3",
                                      "--images", str(images)]) == 0
    log = [json.loads(line) for line in (tmp_path / "tjoint/log.jsonl").read_text().splitlines()]
    assert any("image_loss" in r and "clip_loss" in r for r in log)
    # an image cache of other latents (here half the channels) is refused before any training
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(images), "pt") as f:
        meta, z = f.metadata(), f.get_tensor("latents")
    save_file({"latents": z[:, :2].contiguous()}, str(tmp_path / "half.safetensors"), metadata=meta)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_teacher.main(args + ["--out", str(tmp_path / "tbad"), "--steps", "2", "--image-batch", "3",
                                   "--images", str(tmp_path / "half.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "do not match" in err and err.count("\n") == 1, err
    assert not (tmp_path / "tbad").exists()
    # an exported teacher (fp16 transformer + text encoder) loads as the run's EMA weights, rounded to fp16
    assert train_teacher.main(common + ["--out", str(tmp_path / "teacher"), "--export", str(tmp_path / "t_out")]) == 0
    a, b = (train_teacher.load_teacher(tmp_path / d, "tiny") for d in ("teacher", "t_out"))
    # the export records its preset, and a command on the folder without --preset takes it from there
    assert train_teacher.teacher_preset(tmp_path / "t_out") == "tiny"
    assert train_teacher.teacher_preset(tmp_path / "teacher") == "tiny"  # so does the run folder
    for src in ("t_out", "teacher"):
        assert train_teacher.main(["--quiet", "--out", str(tmp_path / src), "--export", str(tmp_path / "t_out2")]) == 0
        assert train_teacher.teacher_preset(tmp_path / "t_out2") == "tiny"
    with pytest.raises(SystemExit) as e:  # another preset than the one it was trained for: a one-line error
        train_teacher.main(["--quiet", "--preset", "shapes", "--out", str(tmp_path / "teacher"), "--eval", "1"])
    assert e.value.code == 2
    x = torch.randn(1, 4, 2, 4, 4)
    emb = a.text.encode(["a red circle"])
    torch.testing.assert_close(b.text.encode(["a red circle"]), emb)
    va, vb = (m.transformer(x, torch.tensor([500.0]), encoder_hidden_states=emb, return_dict=False)[0] for m in (a, b))
    torch.testing.assert_close(vb, va, atol=2e-2, rtol=2e-2)
    # a new run can start from the export: its first checkpoint's weights are the export's, then it trains
    assert train_teacher.main(args + ["--out", str(tmp_path / "teacher2"), "--steps", "1", "--init",
                                      str(tmp_path / "t_out"), "--lr", "0"]) == 0
    c = train_teacher.load_teacher(tmp_path / "teacher2", "tiny", which="model")
    for k, v in b.state_dict().items():
        torch.testing.assert_close(c.state_dict()[k], v, atol=0, rtol=0)
    # --text fixed from that export: its transformer carries over, the text becomes the fixed code (no weights)
    assert train_teacher.main(args + ["--out", str(tmp_path / "teacher3"), "--steps", "1", "--init",
                                      str(tmp_path / "t_out"), "--lr", "0", "--text", "fixed"]) == 0
    assert train_teacher.main(common + ["--out", str(tmp_path / "teacher3"), "--export", str(tmp_path / "t3")]) == 0
    # sharded (what distill/gpu_teacher.sh brings back in small files): several weight files, the same teacher
    assert train_teacher.main(common + ["--out", str(tmp_path / "teacher3"), "--export", str(tmp_path / "t3s"),
                                        "--export-shard-mb", "0.02"]) == 0
    assert len(list((tmp_path / "t3s/transformer").glob("*.safetensors"))) > 1
    for d in (train_teacher.load_teacher(tmp_path / d, "tiny", which="model") for d in ("teacher3", "t3", "t3s")):
        assert d.text.cfg.fixed and list(d.text.parameters()) == []
        for k, v in b.transformer.state_dict().items():
            torch.testing.assert_close(d.transformer.state_dict()[k], v, atol=0, rtol=0)
    assert ode_init.main(common + ["--teacher", str(tmp_path / "t_out"), "--vae", str(tmp_path / "vae_out"),
                                   "--pairs", str(tmp_path / "pairs.safetensors"), "--num-pairs", "3",
                                   "--latent-frames", "4", "--substeps", "1", "--out", str(tmp_path / "ode"),
                                   "--steps", "2"]) == 0
    # a grown teacher (deeper, wider feed-forward) starts as the export's function, records its widths for resume,
    # export and --eval, and its student takes its widths
    grown = args + ["--out", str(tmp_path / "tg"), "--init", str(tmp_path / "t_out"), "--lr", "0"]
    assert train_teacher.main(grown + ["--steps", "1", "--grow-layers", "3", "--grow-ffn", "80"]) == 0
    assert train_teacher.run_model(tmp_path / "tg") == {"num_layers": 3, "ffn_dim": 80}
    assert train_teacher.main(args + ["--out", str(tmp_path / "tg"), "--steps", "2"]) == 0  # resumes grown
    assert train_teacher.main(common + ["--out", str(tmp_path / "tg"), "--export", str(tmp_path / "tg_out")]) == 0
    for g in (train_teacher.load_teacher(tmp_path / "tg", "tiny", which="model"),
              train_teacher.load_teacher(tmp_path / "tg_out", "tiny")):
        assert len(g.transformer.blocks) == 3 and g.transformer.config.ffn_dim == 80
        vg = g.transformer(x, torch.tensor([500.0]), encoder_hidden_states=emb, return_dict=False)[0]
        torch.testing.assert_close(vg, vb, atol=2e-2, rtol=2e-2)
    with pytest.raises(SystemExit) as e:  # a teacher only grows
        train_teacher.main(grown + ["--steps", "1", "--grow-layers", "1"])
    assert e.value.code == 2
    assert ode_init.main(common + ["--teacher", str(tmp_path / "tg"), "--pairs", str(tmp_path / "pairs.safetensors"),
                                   "--out", str(tmp_path / "ode_g"), "--steps", "1"]) == 0
    assert ode_init.main(common + ["--teacher", str(tmp_path / "tg"), "--vae", str(tmp_path / "vae_out"),
                                   "--out", str(tmp_path / "ode_g"), "--export", str(tmp_path / "student_g")]) == 0
    mg = load_model_folder(tmp_path / "student_g").preset.model
    assert (mg.num_layers, mg.ffn_dim) == (3, 80)
    out = tmp_path / "student"
    assert ode_init.main(common + ["--teacher", str(tmp_path / "teacher"), "--vae", str(tmp_path / "vae_out"),
                                   "--out", str(tmp_path / "ode"), "--export", str(out)]) == 0
    m = load_model_folder(out)
    assert not m.info["placeholder"]
    frames = np.concatenate([c.frames for c in VideoGenerator(m).run([(0, "a red circle bouncing on a black "
                                                                            "background")], 9, seed=0)])
    assert frames.shape == (9, 32, 32, 3)
    # its oracle evaluation through the engine, dense and block-sparse (blocks of one latent frame: 4 of 16 kept)
    res = {f: ode_init.evaluate_engine(out, n=2, seconds=1.0, quiet=True, sparse_topk=f) for f in (None, 0.25)}
    assert res[None]["sparse_topk"] is None and res[0.25]["sparse_topk"] == 0.25
    assert all(0.0 <= r["adherence"] <= 1.0 and r["prompts"] == 2 for r in res.values())
    # streams: the long ones are scored when asked for (--streams 0 asks for none)
    r = {k: ode_init.evaluate_engine(out, n=1, seconds=1.0, stream_seconds=11.0, streams=k, quiet=True) for k in (0, 1)}
    assert "stream_last_10s" not in r[0] and 0.0 <= r[1]["stream_last_10s"] <= 1.0 and r[1]["stream_prompts"]
    # and through a preview decoder (a random one: the evaluation runs, and says which decoder it used)
    from engine.preview import PreviewConfig, PreviewDecoder

    with pytest.raises(ValueError, match="has no preview decoder"):
        ode_init.evaluate_engine(out, n=1, seconds=1.0, quiet=True, preview=True)
    PreviewDecoder(PreviewConfig.for_vae(m.preset.vae, channels=(4, 4, 4, 4), blocks=1)).save(out / "preview")
    r = ode_init.evaluate_engine(out, n=2, seconds=1.0, quiet=True, preview=True)
    assert r["decoder"] == "preview" and res[None]["decoder"] == "vae" and 0.0 <= r["adherence"] <= 1.0


def test_training_clis_bad_input_one_line_exit_2(tmp_path, capsys):
    from distill import ode_init, train_teacher, train_vae

    cases = [
        (train_vae.main, ["--frames", "6"], "1 + 4k"),
        (train_vae.main, ["--halo-px", "0"], "--halo-px must be >= 1"),
        (train_vae.main, ["--eval", "-1"], "--eval and --eval-stream must be >= 0"),
        (train_vae.main, ["--freeze-encoder", "--out", str(tmp_path / "v")], "needs --init"),
        (train_teacher.main, ["--vae", str(tmp_path / "nope"), "--latents", str(tmp_path / "l.safetensors"),
                              "--out", str(tmp_path / "t")], "not a VAE folder"),
        (ode_init.main, ["--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no checkpoint"),
        (train_teacher.main, ["--init", str(tmp_path / "nope"), "--out", str(tmp_path / "t")], "no such folder"),
        (train_teacher.main, ["--grow-layers", "12", "--out", str(tmp_path / "t")], "give --init DIR"),
        (ode_init.main, ["--eval", "2", "--eval-sparse", "0"], "--eval-sparse"),
        (train_teacher.main, ["--renoise", "0.5", "--out", str(tmp_path / "t")], "needs --eval N"),
        (train_teacher.main, ["--eval", "2", "--renoise", "1.5", "--out", str(tmp_path / "t")], "sigmas in [0, 1]"),
        (train_teacher.main, ["--context", "1", "--out", str(tmp_path / "t")], "needs --eval N"),
        (train_teacher.main, ["--eval", "2", "--context", "9", "--out", str(tmp_path / "t")], "0 < K < 9"),
        (train_teacher.main, ["--frames", "0", "--out", str(tmp_path / "t")], "--frames 0: must be 1 + 4k"),
        (train_teacher.main, ["--preset", "shapes-t2", "--frames", "4", "--out", str(tmp_path / "t")], "1 + 2k"),
        (train_teacher.main, ["--eval", "0", "--out", str(tmp_path / "t")], "--eval must be >= 1"),
        (train_teacher.main, ["--shift", "0", "--out", str(tmp_path / "t")], "--shift must be positive"),
        (train_teacher.main, ["--image-batch", "-1", "--out", str(tmp_path / "t")], "both must be >= 0"),
        (train_teacher.main, ["--images", str(tmp_path / "i.safetensors"), "--out", str(tmp_path / "t")],
         "needs --image-batch N > 0"),
        (train_teacher.main, ["--motion-weight", "-0.5", "--out", str(tmp_path / "t")],
         "--motion-weight -0.5: must be"),
        (train_teacher.main, ["--p-independent", "2", "--out", str(tmp_path / "t")], "--p-independent 2.0: must lie"),
        (train_teacher.main, ["--p-context", "-1", "--out", str(tmp_path / "t")], "--p-context -1.0 / "),
        (train_teacher.main, ["--images", str(tmp_path / "i.safetensors"), "--image-batch", "2", "--out",
                              str(tmp_path / "t")], "no such latent cache"),
        *([(train_teacher.main, ["--eval", "2", "--device", "cuda", "--out", str(tmp_path / "t")],
            "no CUDA device")] if not torch.cuda.is_available() else []),
        (ode_init.main, ["--eval", "-1"], "--eval must be >= 1"),
        (ode_init.main, ["--stream-seconds", "nan", "--eval", "2"], "--stream-seconds must be >= 0"),
    ]
    for main, argv, needle in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_latent_cache_rendered_in_worker_processes_is_the_same_file(tmp_path):
    from safetensors import safe_open

    from distill.data import LatentSet, ShapesClips, encode_clips
    from engine.config import get_preset
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    vae = VideoVAE.from_config(preset.vae, seed=0)
    clips = ShapesClips(preset.width, preset.height, 5, seed=3)
    a = encode_clips(vae, clips, 7, tmp_path / "a.safetensors", batch=3, quiet=True)  # groups of 3, 3, 1
    b = encode_clips(vae, clips, 7, tmp_path / "b.safetensors", batch=3, quiet=True, workers=2)
    la, lb = LatentSet(a), LatentSet(b)
    assert la.prompts == lb.prompts == [clips.clip(i)[0] for i in range(7)]
    assert torch.equal(la.latents, lb.latents) and la.latents.shape[0] == 7
    with safe_open(str(a), "pt") as f, safe_open(str(b), "pt") as g:
        assert f.metadata() == g.metadata()


def test_vae_scene_cuts_at_latent_group_boundaries():
    from distill.train_vae import VAETask

    torch.manual_seed(0)
    video = torch.randn(4, 3, 13, 4, 4)
    task = VAETask(None, 0.0, "cpu", p_cut=1.0)
    out = task.cut(video, [8, 9, 10, 11])
    assert torch.equal(out, task.cut(video, [8, 9, 10, 11]))  # a pure function of the ids
    assert torch.equal(out[:, :, 0], video[:, :, 0])
    for b in range(4):  # each clip is its own up to 1 + 4k, then the next clip's
        c = next(t for t in range(13) if not torch.equal(out[b, :, t], video[b, :, t]))
        assert (c - 1) % 4 == 0
        assert torch.equal(out[b, :, c:], video[(b + 1) % 4, :, c:])
    assert torch.equal(VAETask(None, 0.0, "cpu", p_cut=0.0).cut(video, [0, 1, 2, 3]), video)


def test_vae_motion_loss_punishes_steppy_motion():
    """A square moving 1 px a frame vs the same square held at its group's mean position (what a decoder unsure
    of the motion inside a latent group draws): the motion term sees the steps, and is 0 for the exact video."""
    from distill.train_vae import VAETask

    T, W = 13, 24
    video = -torch.ones(1, 3, T, 8, W)
    steppy = video.clone()
    for t in range(T):
        video[0, :, t, 2:6, 2 + t:6 + t] = 1.0
        g = 0 if t == 0 else 1 + 4 * ((t - 1) // 4) + 1  # hold near the group's mean position
        steppy[0, :, t, 2:6, 2 + g:6 + g] = 1.0

    def loss(rec, weight):
        model = lambda x, gen: (rec, torch.tensor(0.0))
        return VAETask(None, 0.0, "cpu", motion_weight=weight).loss(model, video, None)

    exact, logs = loss(video, 1.0)
    assert exact.item() == 0 and logs["motion"] == 0
    plain, _ = loss(steppy, 0.0)
    with_motion, logs = loss(steppy, 1.0)
    assert logs["motion"] > 0.05 and with_motion.item() == pytest.approx(plain.item() + logs["motion"], rel=1e-6)


def test_vae_halo_weight_lies_on_the_background_ring_around_objects():
    from distill.train_vae import VAETask

    video = -torch.ones(2, 3, 3, 16, 20)
    video[0, :, 1, 5:8, 6:10] = 1.0  # one object in one frame of one clip
    plain = VAETask(None, 0.0, "cpu", object_weight=10.0).weights(video)
    w = VAETask(None, 0.0, "cpu", object_weight=10.0, halo_weight=4.0, halo_px=2).weights(video)
    assert torch.equal(plain[0, 0, 1, 5:8, 6:10], torch.full((3, 4), 11.0))
    assert plain.sum() == 11 * 12 + (plain.numel() - 12)
    ring = torch.zeros(16, 20, dtype=torch.bool)
    ring[3:10, 4:12] = True
    ring[5:8, 6:10] = False
    assert torch.equal(w[0, 0, 1][ring], torch.full((int(ring.sum()),), 5.0))  # 1 + halo on the 2-px ring
    assert torch.equal(w[0, 0, 1][~ring], plain[0, 0, 1][~ring])  # the object and the far background as before
    assert torch.equal(w[:, :, 0], plain[:, :, 0]) and torch.equal(w[1], plain[1])  # other frames, other clips


def test_vae_init_across_temporal_compressions_loads_every_shared_tensor():
    """A 2-frame-group VAE started from a 4-frame-group one: the time convs it lacks are dropped, everything
    else (same names and shapes) is carried over; a VAE with other widths keeps its own tensors."""
    import dataclasses

    from distill.train_vae import load_matching
    from engine.vae import VideoVAE

    four = dataclasses.replace(get_preset("tiny").vae, dim_mult=(1, 2, 2), temperal_downsample=(True, True),
                               scale_factor_spatial=4)
    two = dataclasses.replace(four, temperal_downsample=(False, True), scale_factor_temporal=2)
    src, dst = VideoVAE.from_config(four, seed=1).vae, VideoVAE.from_config(two, seed=2).vae
    assert load_matching(dst, src.state_dict()) == []
    own, theirs = dst.state_dict(), src.state_dict()
    assert set(theirs) - set(own) and all(".time_conv." in k for k in set(theirs) - set(own))
    assert all(torch.equal(own[k], theirs[k]) for k in own)
    wide = VideoVAE.from_config(dataclasses.replace(two, base_dim=12), seed=3).vae
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    fresh = load_matching(wide, src.state_dict())
    assert fresh and all(torch.equal(wide.state_dict()[k], before[k]) for k in fresh)


def test_widened_decoder_decodes_as_the_narrow_one_and_its_new_channels_learn():
    """widen_decoder: with the new rows at 0 the wider decoder equals the narrow one (so the q/k/v and
    time_conv groups, the RMS norms' sqrt(channels) and attention's 1/sqrt(channels) are all accounted for);
    at the default scale it is close, and the gradient reaches the new channels."""
    import dataclasses

    from distill.train_vae import load_matching, widen_decoder
    from engine.vae import VideoVAE

    base = dataclasses.replace(get_preset("tiny").vae, dim_mult=(1, 2, 2), temperal_downsample=(False, True),
                               scale_factor_spatial=4, scale_factor_temporal=2)
    narrow = VideoVAE.from_config(dataclasses.replace(base, decoder_base_dim=4), seed=1).vae
    with torch.no_grad():
        for k, v in narrow.state_dict().items():
            if k.endswith("gamma"):
                v.uniform_(0.5, 1.5)  # so that a wrong rescaling of the norms shows
    z = torch.randn(2, base.z_dim, 5, 6, 5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = narrow.decode(z).sample
    for scale, tol in ((0.0, 1e-5), (0.02, 0.02)):
        wide = VideoVAE.from_config(dataclasses.replace(base, decoder_base_dim=7), seed=2).vae
        load_matching(wide, narrow.state_dict())
        widened = widen_decoder(wide, narrow.state_dict(), scale=scale)
        assert "mid_block.attentions.0.to_qkv.weight" in widened and any("time_conv" in k for k in widened)
        with torch.no_grad():
            got = wide.decode(z).sample
        assert (got - want).abs().max() < tol, scale
    wide.requires_grad_(True)  # (VideoVAE builds it for inference)
    wide.decode(z).sample.square().mean().backward()
    w = wide.decoder.up_blocks[0].resnets[0].conv2.weight
    assert w.grad[:, 8:].abs().sum() > 0  # the new input channels get a gradient from the first step
    with pytest.raises(ValueError, match="does not fit"):
        widen_decoder(narrow, wide.state_dict())


@pytest.mark.parametrize("seed", [3, 11])
def test_grown_teacher_computes_as_the_smaller_one_and_its_new_weights_learn(seed):
    """grow_transformer: deeper (copied blocks whose residual outputs start at zero) and a wider feed-forward (new
    hidden units nothing reads yet) compute exactly what the smaller transformer did, on random weights and inputs;
    the zeroed projections and the new hidden units get a gradient; only depth and feed-forward width may differ."""
    import dataclasses

    from diffusers import WanTransformer3DModel

    from distill.teacher import grow_transformer, grown_block_sources

    assert grown_block_sources(8, 12) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True),
                                          (4, False), (5, False), (5, True), (6, False), (7, False), (7, True)]
    for old, new in ((1, 1), (2, 7), (3, 4), (5, 16)):
        src = grown_block_sources(old, new)
        assert len(src) == new and [i for i, c in src if not c] == list(range(old))
        assert all(i == src[j - 1][0] for j, (i, c) in enumerate(src) if c)  # a copy follows its original
    cfg = get_preset("tiny").model
    g = torch.Generator().manual_seed(seed)
    small = WanTransformer3DModel(**cfg.diffusers_kwargs())
    with torch.no_grad():
        for v in small.parameters():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)  # no zero-initialised branch to hide a mistake
    big = WanTransformer3DModel(**dataclasses.replace(cfg, num_layers=5, ffn_dim=cfg.ffn_dim + 27).diffusers_kwargs())
    grow_transformer(big, small.state_dict())
    x = torch.randn(2, cfg.in_channels, 3, 6, 4, generator=g)
    t, emb = torch.tensor([900.0, 130.0]), torch.randn(2, 5, cfg.text_dim, generator=g)
    with torch.no_grad():
        want = small(x, t, encoder_hidden_states=emb, return_dict=False)[0]
    got = big(x, t, encoder_hidden_states=emb, return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().mean().backward()
    copy = big.blocks[grown_block_sources(2, 5).index((0, True))]
    assert copy.attn1.to_out[0].weight.grad.abs().sum() > 0 and copy.ffn.net[2].weight.grad.abs().sum() > 0
    assert big.blocks[0].ffn.net[2].weight.grad[:, cfg.ffn_dim:].abs().sum() > 0  # the new hidden units
    other = WanTransformer3DModel(**dataclasses.replace(cfg, num_layers=5, freq_dim=48).diffusers_kwargs())
    with pytest.raises(ValueError, match="only depth and feed-forward width may grow"):
        grow_transformer(other, small.state_dict())
    with pytest.raises(ValueError, match="cannot grow"):
        grow_transformer(small, big.state_dict())
    narrow = WanTransformer3DModel(**dataclasses.replace(cfg, num_layers=5).diffusers_kwargs())
    with pytest.raises(ValueError, match="only depth and feed-forward width may grow"):
        grow_transformer(narrow, big.state_dict())  # a narrower feed-forward


def test_train_vae_widens_an_init_decoder_and_exports_its_width(tmp_path):
    import json

    from distill import train_vae
    from engine.vae import VideoVAE

    common = ["--preset", "tiny", "--quiet", "--batch-size", "2", "--ckpt-every", "2", "--eval", "0",
              "--eval-stream", "0"]
    assert train_vae.main(common + ["--out", str(tmp_path / "vae"), "--steps", "1"]) == 0
    assert train_vae.main(common + ["--out", str(tmp_path / "vae"), "--export", str(tmp_path / "v4")]) == 0
    args = common + ["--out", str(tmp_path / "w"), "--init", str(tmp_path / "v4"), "--freeze-encoder"]
    assert train_vae.main(args + ["--steps", "1", "--decoder-base-dim", "6"]) == 0
    assert train_vae.main(args + ["--steps", "2"]) == 0  # the run folder keeps the width when resumed
    assert train_vae.main(common + ["--out", str(tmp_path / "w"), "--export", str(tmp_path / "v6")]) == 0
    assert json.loads((tmp_path / "v6" / "config.json").read_text())["decoder_base_dim"] == 6
    assert VideoVAE.from_folder(tmp_path / "v6").vae.decoder.conv_out.weight.shape[1] == 6
    with pytest.raises(SystemExit) as e:
        train_vae.main(args + ["--steps", "3", "--decoder-base-dim", "8"])
    assert e.value.code == 2
    # started from the wide folder without --decoder-base-dim: its decoder as it is, every tensor carried over
    again = common + ["--out", str(tmp_path / "w2"), "--init", str(tmp_path / "v6"), "--freeze-encoder", "--lr", "0"]
    assert train_vae.main(again + ["--steps", "1", "--warmup", "0", "--ema", "0"]) == 0
    assert train_vae.main(common + ["--out", str(tmp_path / "w2"), "--export", str(tmp_path / "v6b")]) == 0
    a, b = (VideoVAE.from_folder(tmp_path / v).vae.state_dict() for v in ("v6", "v6b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_stream_evaluation_on_a_short_stream():
    from distill.train_vae import evaluate_stream
    from engine.vae import VideoVAE

    vae = VideoVAE.from_config(get_preset("tiny").vae, seed=0)
    res = evaluate_stream(vae, seconds=11.0, count=1, fps=4, width=32, height=32)  # 45 frames, 40-frame windows
    assert res["seconds"] == 11.0 and res["clips"] == 1
    assert all(0.0 <= res[f"{w}_10s_oracle"] <= 1.0 for w in ("first", "last"))
    assert all(0.0 < res[f"{w}_10s_psnr_db"] < 40.0 for w in ("first", "last"))  # an untrained VAE is no copy


def test_teacher_latent_prefixes_are_the_latents_of_shorter_clips():
    """--latent-lengths trains on latent prefixes: with the causal VAE the first n latent frames of a clip are
    exactly the latents of its first 1 + 4 (n - 1) frames, and micro-batches take the lengths in turn."""
    from distill.data import ShapesClips
    from distill.train_teacher import TeacherTask
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    vae = VideoVAE.from_config(preset.vae, seed=5)
    _, video = ShapesClips(preset.width, preset.height, 13, seed=4).videos([0, 1])
    with torch.no_grad():
        whole, short = vae.encode(video), vae.encode(video[:, :, :5])
    assert whole.shape[2] == 4 and short.shape[2] == 2
    torch.testing.assert_close(whole[:, :, :2], short, atol=1e-5, rtol=1e-4)

    class Data:
        def get(self, ids):
            return [str(i) for i in ids], torch.zeros(len(ids), 2, 9, 4, 4)

    task = TeacherTask(Data(), None, 0.1, 3.0, "cpu", lengths=(5, 5, 9))
    got = [task.batch(list(range(s * 4, s * 4 + 4)))[1].shape[2] for s in range(6)]
    assert got == [5, 5, 9, 5, 5, 9]
    assert TeacherTask(Data(), None, 0.1, 3.0, "cpu").batch([0, 1])[1].shape[2] == 9


class _OnePromptClips:
    """Latent clips x0 [N, C, F, h, w] that all carry one prompt: a LatentSet's `get` for TeacherTask."""

    def __init__(self, x0):
        self.x0 = x0

    def get(self, ids):
        return ["a red circle moving left on a black background"] * len(ids), self.x0[: len(ids)]


def _recording_zero_model():
    """A stand-in teacher that predicts v = 0 (a loss is then the mean of (eps - x0)^2 over what it scores) and keeps
    its last inputs in the returned dict."""
    seen = {}

    def model(xt, tt, ids, lengths):
        seen.update(xt=xt, t=tt)
        return torch.zeros_like(xt)

    return model, seen


@pytest.mark.parametrize("seed", [2, 3])
def test_teacher_clean_context_frames_are_clean_and_unscored(seed):
    """--p-context: a sample keeps its first n latent frames clean (x_0 at timestep 0) and the loss averages the
    squared error over its noisy frames only; per-frame timesteps that are all equal match a scalar one."""
    from distill.train_teacher import TeacherTask
    from engine.text import ShapesTextConfig, ShapesTextEncoder

    preset = get_preset("tiny")
    teacher = _randomise(Teacher.from_preset(preset, seed=seed), seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 6, generator=g)  # odd latent sizes
    ids, lengths = teacher.text._tokenize(["a red circle moving left on a black background", ""])
    t = torch.tensor([300.0, 700.0])
    torch.testing.assert_close(teacher(x, t[:, None].expand(2, 3), ids, lengths), teacher(x, t, ids, lengths),
                               atol=1e-5, rtol=1e-4)

    x0 = torch.randn(6, 4, 5, 4, 4, generator=g)

    data, (model, seen) = _OnePromptClips(x0), _recording_zero_model()

    tok = ShapesTextEncoder(ShapesTextConfig(dim=preset.model.text_dim))
    task = TeacherTask(data, tok, 0.0, 3.0, "cpu", p_context=1.0)
    loss, _ = task.loss(model, task.batch(range(6)), torch.Generator().manual_seed(seed))
    tt = seen["t"]
    assert tt.shape == (6, 5)
    clean = tt == 0
    n_ctx = clean.sum(1)
    assert ((n_ctx >= 1) & (n_ctx <= 4)).all() and (clean == (torch.arange(5) < n_ctx[:, None])).all()
    assert len(set(n_ctx.tolist())) > 1  # the context length varies across samples
    cm = clean[:, None, :, None, None].expand_as(x0)
    torch.testing.assert_close(seen["xt"][cm], x0[cm], rtol=0, atol=0)
    s = (tt / 1000).view(6, 1, 5, 1, 1)
    eps = (seen["xt"] - (1 - s) * x0) / s.clamp_min(1e-12)  # recovered noise on the noisy frames
    torch.testing.assert_close(loss, (eps - x0)[~cm].square().mean(), atol=1e-4, rtol=1e-4)

    plain = TeacherTask(data, tok, 0.0, 3.0, "cpu")  # without the flag: one scalar timestep per sample
    plain.loss(model, plain.batch(range(6)), torch.Generator().manual_seed(seed))
    assert seen["t"].shape == (6,)


@pytest.mark.parametrize("seed", [4, 9])
def test_teacher_joint_image_training_adds_first_frames_of_the_image_cache(seed):
    """--image-batch N: each micro-batch also trains on N images (first latent frames of the image cache), the
    same ones for the same ids and new ones for the next micro-batch; the loss is the clips' loss (unchanged: it
    draws its noise first) plus image_weight times the images' flow-matching loss on their own noise."""
    from distill.train_teacher import TeacherTask
    from engine.text import ShapesTextConfig, ShapesTextEncoder

    g = torch.Generator().manual_seed(seed)
    clips, images = torch.randn(8, 4, 5, 4, 6, generator=g), torch.randn(20, 4, 3, 4, 6, generator=g)

    class Data:
        def __init__(self, x, word):
            self.x, self.word = x, word

        def get(self, ids):
            ids = [int(i) % len(self.x) for i in ids]
            return [f"a {self.word} circle moving left on a black background"] * len(ids), self.x[ids]

    calls = []

    def model(xt, tt, ids, lengths):  # predicts v = 0: each loss is then the mean of (eps - x0)^2
        calls.append((xt, tt))
        return torch.zeros_like(xt)

    tok = ShapesTextEncoder(ShapesTextConfig(dim=8))
    plain = TeacherTask(Data(clips, "red"), tok, 0.0, 3.0, "cpu", lengths=(2, 5))
    joint = {w: TeacherTask(Data(clips, "red"), tok, 0.0, 3.0, "cpu", lengths=(2, 5), images=Data(images, "blue"),
                            image_batch=3, image_weight=w) for w in (1.0, 2.5)}
    b0, b1 = joint[1.0].batch(range(0, 4)), joint[1.0].batch(range(4, 8))
    assert len(b0) == 4 and b0[3].shape == (3, 4, 1, 4, 6) and b0[1].shape[2] == 2 and b1[1].shape[2] == 5
    assert torch.equal(b0[3], images[0:3, :, :1]) and torch.equal(b1[3], images[3:6, :, :1])
    assert "blue" in b0[2][0] and torch.equal(joint[1.0].batch(range(4, 8))[3], b1[3])  # a pure function of ids

    lp, _ = plain.loss(model, plain.batch(range(4, 8)), torch.Generator().manual_seed(seed))
    losses = {}
    for w, task in joint.items():
        calls.clear()
        losses[w] = task.loss(model, b1, torch.Generator().manual_seed(seed))
    (xi, ti), = calls[1:]  # the images' call of the last loss
    s = (ti / 1000).view(3, 1, 1, 1, 1)
    eps = (xi - (1 - s) * b1[3]) / s
    want_image = (eps - b1[3]).square().mean()
    for w, (loss, metrics) in losses.items():
        torch.testing.assert_close(torch.tensor(metrics["clip_loss"]), lp, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(torch.tensor(metrics["image_loss"]), want_image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss, lp + w * want_image, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed,p_context", [(5, 1.0), (6, 0.0)])
def test_teacher_motion_weight_adds_the_error_change_between_scored_frames(seed, p_context):
    """--motion-weight m: the clip loss is the flow-matching MSE over scored (noisy) frames plus m times the mean
    square of the error's change between neighbouring scored frames, written out here by loops; a clip's error that
    is the same in every frame adds nothing. Without a context every frame shares the clip's sigma."""
    from distill.train_teacher import TeacherTask, noisy_frames_loss
    from engine.text import ShapesTextConfig, ShapesTextEncoder

    g = torch.Generator().manual_seed(seed)
    x0, pred = torch.randn(5, 3, 6, 3, 5, generator=g), torch.randn(5, 3, 6, 3, 5, generator=g)  # odd sizes

    data = _OnePromptClips(x0)

    seen = {}

    def model(xt, tt, ids, lengths):  # a fixed random prediction, so the error varies across frames
        seen.update(xt=xt, t=tt)
        return pred[: xt.shape[0]].clone()

    tok = ShapesTextEncoder(ShapesTextConfig(dim=8))
    m = 0.7
    task = TeacherTask(data, tok, 0.0, 3.0, "cpu", p_context=p_context, motion_weight=m)
    loss, _ = task.loss(model, task.batch(range(5)), torch.Generator().manual_seed(seed))
    tt = seen["t"]
    assert tt.shape == (5, 6)
    if not p_context:
        assert (tt == tt[:, :1]).all() and (tt > 0).all()
    s = (tt / 1000).view(5, 1, 6, 1, 1)
    eps = (seen["xt"] - (1 - s) * x0) / s.clamp_min(1e-12)
    err = pred - (eps - x0)
    base, n, diff, pairs = 0.0, 0, 0.0, 0
    for b in range(5):
        scored = [f for f in range(6) if tt[b, f] > 0]
        for f in scored:
            base, n = base + err[b, :, f].square().mean(), n + 1
            if f + 1 in scored:
                diff, pairs = diff + (err[b, :, f + 1] - err[b, :, f]).square().mean(), pairs + 1
    assert pairs > 0
    torch.testing.assert_close(loss, base / n + m * diff / pairs, atol=1e-4, rtol=1e-4)

    sf = torch.full((5, 6), 0.5)
    x1 = torch.zeros(5, 3, 6, 3, 5)
    steady = torch.randn(5, 3, 1, 3, 5, generator=g).expand(5, 3, 6, 3, 5)  # the same error in every frame
    eps1 = torch.randn(5, 3, 6, 3, 5, generator=g)

    def model_steady(xt, tt, ids, lengths):
        return (eps1 - x1) + steady

    ids, lengths = tok._tokenize(["a red circle moving left on a black background"] * 5)
    plain = noisy_frames_loss(model_steady, x1, eps1, sf, ids, lengths)
    torch.testing.assert_close(noisy_frames_loss(model_steady, x1, eps1, sf, ids, lengths, motion_weight=m), plain,
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain, steady.square().mean(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed,p_context", [(7, 0.0), (8, 1.0)])
def test_teacher_independent_frame_sigmas_after_the_context(seed, p_context):
    """--p-independent 1: every noisy latent frame of a sample gets a sigma of its own (Diffusion Forcing), frames
    of the clean context stay clean, and the loss still averages the squared error over the noisy frames alone."""
    from distill.train_teacher import TeacherTask
    from engine.text import ShapesTextConfig, ShapesTextEncoder

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 7, 3, 5, generator=g)

    data, (model, seen) = _OnePromptClips(x0), _recording_zero_model()

    tok = ShapesTextEncoder(ShapesTextConfig(dim=8))
    task = TeacherTask(data, tok, 0.0, 3.0, "cpu", p_context=p_context, p_independent=1.0)
    loss, _ = task.loss(model, task.batch(range(6)), torch.Generator().manual_seed(seed))
    tt = seen["t"]
    assert tt.shape == (6, 7)
    clean = tt == 0
    n_ctx = clean.sum(1)
    assert (clean == (torch.arange(7) < n_ctx[:, None])).all() and bool((n_ctx > 0).all()) == bool(p_context)
    for b in range(6):  # the noisy frames' sigmas differ from each other
        assert len(set(tt[b, n_ctx[b]:].tolist())) == 7 - n_ctx[b]
    s = (tt / 1000).view(6, 1, 7, 1, 1)
    cm = clean[:, None, :, None, None].expand_as(x0)
    eps = (seen["xt"] - (1 - s) * x0) / s.clamp_min(1e-12)
    torch.testing.assert_close(loss, (eps - x0)[~cm].square().mean(), atol=1e-4, rtol=1e-4)


def test_prompt_probe_tells_a_used_word_from_an_ignored_one():
    """--probe swaps one prompt word at a time: the loss moves when the teacher reads the prompt and stays put,
    to the last digit, when its cross-attention is cut off."""
    from distill.train_teacher import prompt_probe

    preset = get_preset("tiny")
    teacher = _randomise(Teacher.from_preset(preset, seed=7), 7).eval()
    g = torch.Generator().manual_seed(8)

    class Data:
        prompts = ["a red circle moving left on a black background", "a blue square bouncing on a white background",
                   "a small green triangle moving up slowly on a gray background",
                   "a red circle moving down and a blue square moving up on a black background"]
        latents = torch.randn(4, 4, 3, 4, 4, generator=g)

        def get(self, ids):
            return [self.prompts[i] for i in ids], self.latents[list(ids)]

    res = prompt_probe(teacher, Data(), n=8, sigmas=(0.8,))
    assert res["clips"] == 2  # one object, moving in a direction
    assert set(res["loss"]) == {"sigma 0.8", "context 1, sigma 0.8"}
    row = res["loss"]["sigma 0.8"]
    assert set(row) == {"right", "colour swapped", "shape swapped", "direction swapped", "empty"}
    assert all(row[k] != row["right"] for k in row if k != "right")
    for blk in teacher.transformer.blocks:  # cut the text off: every variant scores the same
        torch.nn.init.zeros_(blk.attn2.to_out[0].weight), torch.nn.init.zeros_(blk.attn2.to_out[0].bias)
    for row in prompt_probe(teacher, Data(), n=8, sigmas=(0.8,))["loss"].values():
        assert len(set(row.values())) == 1


def test_renoise_eval_samples_from_each_sigma_and_an_exact_denoiser_gets_the_clips_back():
    """--renoise: a stand-in transformer that knows each clip's latent (velocity (x - z0) / sigma, found by the
    clip's prompt embedding) brings every noise level back to the clips' own latents, through the batching and
    CFG; the real (random) teacher does not. Sampling from sigma starts at sigma and follows the grid below it."""
    from distill.data import ShapesClips
    from distill.train_teacher import renoise_eval
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    vae = VideoVAE.from_config(preset.vae, seed=0)
    teacher = _randomise(Teacher.from_preset(preset, seed=3), 3).eval()
    n, frames = 3, 9
    prompts, video = ShapesClips(preset.width, preset.height, frames, seed=1234).videos(range(n))
    assert len(set(prompts)) == n
    z0, cond = vae.encode(video), teacher.text.encode(prompts)
    decoded, first_sigma, inputs = [], [], []
    decode = vae.decode
    vae.decode = lambda z: decoded.append(z.clone()) or decode(z)

    class Exact(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, return_dict):
            rows = []
            for j, e in enumerate(encoder_hidden_states):  # CFG: [cond rows, uncond rows] -> that clip
                m = [i for i in range(n) if torch.equal(e, cond[i])]
                rows.append(m[0] if m else rows[j - len(x) // 2])
            first_sigma.append(float(t[0]) / 1000)
            inputs.append(x[:len(x) // 2])  # the cond half
            return ((x - z0[rows]) / (t.view(-1, 1, 1, 1, 1) / 1000),)

    real = teacher.transformer
    teacher.transformer = Exact()
    res = renoise_eval(teacher, vae, preset, n, frames, [0.0, 0.37, 1.0], steps=6, guidance=4.0, shift=3.0, batch=2)
    assert list(res) == ["0.0", "0.37", "1.0"] and all(0 <= r["adherence"] <= 1 for r in res.values())
    assert len(decoded) == 6  # 2 batches at each sigma
    for i in (0, 2, 4):  # sigma 0 decodes the clean latents; 0.37 and 1 come back to them
        assert torch.allclose(torch.cat(decoded[i:i + 2]), z0, atol=1e-4)
    assert res["0.37"]["adherence"] == pytest.approx(res["0.0"]["adherence"], abs=0.02)
    noise = (inputs[0] - 0.63 * z0[:2]) / 0.37  # the first input is the clips noised to 0.37: unit Gaussian noise
    assert abs(float(noise.mean())) < 0.1 and 0.9 < float(noise.std()) < 1.1
    runs = [[first_sigma[0]]]  # one run of decreasing sigmas per batch
    for v in first_sigma[1:]:
        if v < runs[-1][-1]:
            runs[-1].append(v)
        else:
            runs.append([v])
    grid = [float(v) for v in sigma_schedule(6, 3.0)[:-1]]
    assert [r[0] for r in runs] == pytest.approx([0.37, 0.37, 1.0, 1.0])
    assert runs[0][1:] == pytest.approx([v for v in grid if v < 0.37]) and runs[2] == pytest.approx(grid)

    teacher.transformer, decoded[:] = real, []
    renoise_eval(teacher, vae, preset, n, frames, [1.0], steps=6, guidance=4.0, shift=3.0, batch=2)
    assert (torch.cat(decoded) - z0).abs().max() > 0.1


def test_context_eval_keeps_the_first_latent_frames_and_samples_the_rest():
    """--context K: the teacher gets per-token timesteps that are 0 on the first K latent frames' tokens and the
    grid's sigma elsewhere, those frames come out exactly as the clips' own latents whatever it predicts there, and
    an exact denoiser of the rest brings the whole clip back."""
    from types import SimpleNamespace

    from distill.data import ShapesClips
    from distill.train_teacher import renoise_eval
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    vae = VideoVAE.from_config(preset.vae, seed=0)
    teacher = _randomise(Teacher.from_preset(preset, seed=5), 5).eval()
    n, frames, k = 3, 9, 2
    prompts, video = ShapesClips(preset.width, preset.height, frames, seed=1234).videos(range(n))
    z0, cond = vae.encode(video), teacher.text.encode(prompts)
    nf, (h, w) = z0.shape[2], z0.shape[3:]
    _, ph, pw = preset.model.patch_size
    per_frame = (h // ph) * (w // pw)
    decoded, seen = [], []
    decode = vae.decode
    vae.decode = lambda z: decoded.append(z.clone()) or decode(z)
    g = torch.Generator().manual_seed(random.randrange(1 << 30))

    class Exact(torch.nn.Module):  # per-token timesteps, as diffusers' transformer takes them
        config = SimpleNamespace(patch_size=preset.model.patch_size)

        def forward(self, x, t, encoder_hidden_states, return_dict):
            assert t.shape == (len(x), nf * per_frame)
            tf = t.view(len(x), nf, per_frame)
            assert (tf == tf[:, :, :1]).all()  # one timestep a frame
            seen.append(tf[:, :, 0].clone())
            rows = []
            for j, e in enumerate(encoder_hidden_states):
                m = [i for i in range(n) if torch.equal(e, cond[i])]
                rows.append(m[0] if m else rows[j - len(x) // 2])
            s = (tf[:, :, 0] / 1000).view(len(x), 1, nf, 1, 1)
            v = (x - z0[rows]) / s.clamp_min(1e-6)
            v[:, :, :k] = torch.randn(v[:, :, :k].shape, generator=g)  # whatever it says about the context
            return (v,)

    teacher.transformer = Exact()
    res = renoise_eval(teacher, vae, preset, n, frames, [1.0], steps=5, guidance=4.0, shift=3.0, batch=2, context=k)
    assert list(res) == ["1.0"] and {"motion_ratio", "frozen_rate", "copy_rate"} <= set(res["1.0"])
    from distill.shapes import parse_prompt
    still = sum(all(o.motion == "still" for o in parse_prompt(p).objects) for p in prompts)
    for part in (res["1.0"], res["1.0"]["sampled_frames"]):  # the clips split by motion: counts add up
        assert sum(v["clips"] for v in part["by_motion"].values()) == n
        assert part["by_motion"].get("still", {"clips": 0})["clips"] == still
    sampled = res["1.0"]["sampled_frames"]
    assert sampled["from_frame"] == 1 + vae.temporal * (k - 1) and 0 <= sampled["adherence"] <= 1
    assert all((t[:, :k] == 0).all() and (t[:, k:] > 0).all() for t in seen)
    assert seen[0][0, k] == pytest.approx(1000.0)
    out = torch.cat(decoded)  # (renoise_eval encodes in batches of 2: the same latents up to float rounding)
    torch.testing.assert_close(out[:, :, :k], z0[:, :, :k], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, z0, atol=1e-4, rtol=0)

    # the real (random) teacher: the context frames still come out untouched, the rest does not
    teacher = _randomise(Teacher.from_preset(preset, seed=5), 5).eval()
    decoded.clear()
    renoise_eval(teacher, vae, preset, n, frames, [1.0], steps=5, guidance=4.0, shift=3.0, batch=2, context=k)
    out = torch.cat(decoded)
    torch.testing.assert_close(out[:, :, :k], z0[:, :, :k], atol=1e-5, rtol=0)
    assert (out[:, :, k:] - z0[:, :, k:]).abs().max() > 0.1


def test_heldout_loss_is_the_flow_matching_loss_on_fresh_clips_whatever_the_batching():
    """--heldout: at each sigma, the mean over clips of the per-clip flow-matching loss (with the first latent frame
    clean in the context rows), the same for any batch size, and equal to the loss computed by hand."""
    from distill.data import ShapesClips
    from distill.train_teacher import heldout_loss, noisy_frames_loss
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    vae = VideoVAE.from_config(preset.vae, seed=0)
    teacher = _randomise(Teacher.from_preset(preset, seed=5), 5).eval()
    a = heldout_loss(teacher, vae, preset, n=5, frames=9, sigmas=(0.9, 0.4), seed=77, batch=2)
    b = heldout_loss(teacher, vae, preset, n=5, frames=9, sigmas=(0.9, 0.4), seed=77, batch=10)
    assert a["loss"].keys() == {"sigma 0.9", "sigma 0.4", "context 1, sigma 0.9", "context 1, sigma 0.4"}
    for k in a["loss"]:
        assert abs(a["loss"][k] - b["loss"][k]) < 2e-5
    prompts, video = ShapesClips(preset.width, preset.height, 9, seed=77).videos(range(5))
    z0 = vae.encode(video)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(77))
    sf = torch.full((5, z0.shape[2]), 0.4)
    sf[:, 0] = 0.0
    with torch.no_grad():
        want = sum(float(noisy_frames_loss(teacher, z0[i:i + 1], eps[i:i + 1], sf[i:i + 1],
                                           *teacher.text._tokenize(prompts[i:i + 1]))) for i in range(5)) / 5
    assert abs(b["loss"]["context 1, sigma 0.4"] - want) < 2e-5
    assert a["loss"]["sigma 0.4"] != a["loss"]["context 1, sigma 0.4"]
    # single frames (images: the first latent frame alone) have no context rows, and no nan from an empty score
    one = heldout_loss(teacher, vae, preset, n=3, frames=1, sigmas=(0.9, 0.4), seed=78, batch=2)
    assert one["loss"].keys() == {"sigma 0.9", "sigma 0.4"} and "continuation" not in one
    assert all(math.isfinite(v) and v > 0 for v in one["loss"].values())


def test_continuation_error_scores_one_step_prediction_of_the_moving_clips_against_copying():
    """--heldout's continuation: on the moving clips only, the one-step x0 error of the frames after a clean chunk,
    from pure noise. A model that copies the last context frame scores the copy baseline (ratio 1), one that knows
    the answer scores 0, and the random teacher's numbers do not depend on the batching."""
    from distill.data import ShapesClips
    from distill.shapes import parse_prompt
    from distill.train_teacher import continuation_error, heldout_loss
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    vae = VideoVAE.from_config(preset.vae, seed=0)
    teacher = _randomise(Teacher.from_preset(preset, seed=5), 5).eval()
    seed = random.randrange(1 << 16)
    prompts, video = ShapesClips(preset.width, preset.height, 13, seed=seed).videos(range(7))
    z0 = vae.encode(video)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    moving = [i for i, p in enumerate(prompts) if any(o.motion != "still" for o in parse_prompt(p).objects)]
    held_has_moving = any(i < 6 for i in moving)  # heldout_loss below renders the first 6 of these clips
    if not moving:  # make one clip move (a still-only draw is possible on 7 prompts)
        prompts[0] = "a red circle moving left on a black background"
        moving = [0]

    class Fixed(torch.nn.Module):
        """A 'teacher' whose clean estimate x_t - sigma v is a given clip batch (by clip order)."""

        def __init__(self, answer):
            super().__init__()
            self.w, self.text, self.answer, self.seen = torch.nn.Parameter(torch.zeros(1)), teacher.text, answer, 0

        def forward(self, x, t, ids, lengths):
            a = self.answer[self.seen:self.seen + len(x)]
            self.seen += len(x)
            return (x - a) / (t[:, None, :, None, None] / 1000).clamp_min(1e-6)  # sigma 0 frames: unused

    k = 2
    z = z0[moving]
    copy = torch.cat([z[:, :, :k], z[:, :, k - 1:k].expand(-1, -1, z.shape[2] - k, -1, -1)], 2)
    c = continuation_error(Fixed(copy), z0, eps, prompts, context=k, batch=2)
    assert c["moving_clips"] == len(moving) and len(c["x0_error"]) == z0.shape[2] - k
    assert c["ratio"] == pytest.approx(1.0, abs=1e-3) and c["x0_error"] == pytest.approx(c["copy_last_error"], abs=2e-4)
    perfect = continuation_error(Fixed(z), z0, eps, prompts, context=k, batch=3)
    assert max(perfect["x0_error"]) < 1e-8 and perfect["ratio"] == 0
    a = continuation_error(teacher, z0, eps, prompts, context=k, batch=2)
    b = continuation_error(teacher, z0, eps, prompts, context=k, batch=10)
    assert a["x0_error"] == pytest.approx(b["x0_error"], abs=2e-4) and a["ratio"] > 0
    still = ["a red circle standing still on a black background"] * len(prompts)
    assert continuation_error(teacher, z0, eps, still) is None
    held = heldout_loss(teacher, vae, preset, n=6, frames=13, sigmas=(0.9,), seed=seed, batch=3)
    assert ("continuation" in held) == held_has_moving  # --heldout reports it on its own clips
