"""distill/self_forcing.py: the training rollout is the engine's stream, the DMD and Re-DMD losses, resume, export."""

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch

from distill import self_forcing as sf
from distill.shapes import render_prompt
from distill.teacher import Teacher
from engine.config import get_preset
from engine.model import CausalWanModel
from engine.sampler import sigmas
from engine.stream import Stream
from engine.text import ShapesTextConfig, ShapesTextEncoder


def _randomise(model, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _stream_reference(model, preset, text, exits, seed, grad_last=False):
    """The rollout written with the engine's Stream: chunk c takes exits[c] + 1 steps of the preset's sampler
    (a shorter schedule is the same sigmas, cut), its x0 is committed. With grad_last, the last chunk's final
    forward keeps its gradient, through the Stream's own cache."""
    stream = Stream(model, preset, batch=text.shape[0])
    stream.set_prompt(text)
    ts = preset.sampler.timesteps
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for c, e in enumerate(exits):
        stream.sampler_cfg = dataclasses.replace(preset.sampler, timesteps=ts[:e + 1])
        if grad_last and c == len(exits) - 1:
            sig = sigmas(preset.sampler)
            x = torch.randn(stream.chunk_shape, generator=gen)
            for i in range(e):
                x0 = x - sig[i] * stream.denoise(x, sig[i] * 1000)
                x = (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(stream.chunk_shape, generator=gen)
            v = model(x, torch.full((x.shape[0],), sig[e] * 1000), text_kv=stream.text_kv, ctx=stream.cache)
            outs.append(x - sig[e] * v)
            break
        outs.append(stream.next_chunk(gen))
    return outs


@pytest.mark.parametrize("sink", ["ema", "static", "none"])
def test_rollout_is_the_streaming_engine_chunk_by_chunk(sink):
    """Random exit steps, a rollout past the window (eviction, the sink in play): every chunk equals the engine's."""
    preset = get_preset("tiny")
    preset = preset.replace(cache=sf.cache_with_sink(preset.cache, sink))
    model = _randomise(CausalWanModel(preset.model), 3).eval()
    seed = random.randrange(1 << 30)
    text = torch.randn(2, 5, preset.model.text_dim, generator=torch.Generator().manual_seed(seed))
    exits = [3, 0, 2, 1, 3, 2]  # 6 chunks of 2 frames: the window (4 frames) overflows from the third
    h, w = preset.latent_hw
    shape = (2, preset.model.in_channels, preset.cache.frames_per_chunk, h, w)
    with torch.no_grad():
        got = sf.rollout(model, model.text_kv(text), preset.cache, preset.sampler, shape, exits,
                         torch.Generator().manual_seed(seed))
    ref = _stream_reference(model, preset, text, exits, seed)
    assert len(got) == len(ref) == len(exits)
    for c, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"chunk {c}")
    # the exits matter: another exit step in the first chunk changes every later chunk (it is their context)
    with torch.no_grad():
        other = sf.rollout(model, model.text_kv(text), preset.cache, preset.sampler, shape, [1, *exits[1:]],
                           torch.Generator().manual_seed(seed))
    assert not torch.allclose(other[-1], got[-1], atol=1e-4)


def test_rollout_gradient_is_the_exit_forward_with_a_constant_context():
    """The gradient of a chunk's output is that of its exit forward over the engine's cache; recomputing the block
    halves in the backward (engine.accel.checkpoint_blocks) gives the same gradient."""
    from engine.accel import checkpoint_blocks, is_compiled, reset_compiled

    plain = _rollout_gradient_check()
    checkpoint_blocks()
    try:
        assert not is_compiled()
        ckpt = _rollout_gradient_check()
    finally:
        reset_compiled()
    for a, b in zip(plain, ckpt):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def _rollout_gradient_check():
    preset = get_preset("tiny")
    model = _randomise(CausalWanModel(preset.model), 5)
    text = torch.randn(1, 4, preset.model.text_dim, generator=torch.Generator().manual_seed(1))
    exits, seed = [2, 1, 3, 1], 77
    h, w = preset.latent_hw
    shape = (1, preset.model.in_channels, preset.cache.frames_per_chunk, h, w)
    text_kv = [(k.detach(), v.detach()) for k, v in model.text_kv(text)]
    got = sf.rollout(model, text_kv, preset.cache, preset.sampler, shape, exits, torch.Generator().manual_seed(seed),
                     grad_chunks=1)
    assert [c.requires_grad for c in got] == [False, False, False, True]
    weight = torch.randn(got[-1].shape, generator=torch.Generator().manual_seed(2))
    g_got = torch.autograd.grad((got[-1] * weight).sum(), list(model.parameters()), allow_unused=True)

    model.zero_grad()
    ref = _stream_reference(model, preset, text, exits, seed, grad_last=True)
    torch.testing.assert_close(got[-1], ref[-1], atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad((ref[-1] * weight).sum(), list(model.parameters()), allow_unused=True)
    assert sum(g is not None for g in g_got) > 10
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_ref):
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    return g_got


class _Fixed(torch.nn.Module):
    """A 'network' whose x0 prediction is a fixed tensor: v = (x_t - x0) / sigma."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, xt, t, text_kv=None):
        return (xt - self.x0) / (t / 1000).view(-1, 1, 1, 1, 1)


def test_dmd_direction_and_loss_move_samples_toward_the_teacher():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    x = torch.randn(3, 2, 5, 3, 4, generator=g)
    real, uncond = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    sigma, eps = torch.rand(3, generator=g) * 0.9 + 0.05, torch.randn(x.shape, generator=g)

    class CFGTeacher(torch.nn.Module):  # cond -> x0 = real, uncond -> x0 = uncond
        def forward(self, xt, t, text_kv=None):
            return _Fixed(real if text_kv == "cond" else uncond)(xt, t)

    # the critic agreeing with the guided teacher: no gradient at all
    guided = uncond + 3.0 * (real - uncond)
    d0 = sf.dmd_direction(x, CFGTeacher(), _Fixed(guided), "cond", "uncond", None, sigma, eps, 3.0)
    torch.testing.assert_close(d0, torch.zeros_like(x), atol=1e-5, rtol=0)
    # a critic that has learned the samples themselves (x0_fake = x): the step goes from x toward the teacher's x0
    d = sf.dmd_direction(x, CFGTeacher(), _Fixed(x), "cond", "uncond", None, sigma, eps, 1.0)
    norm = (x - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(d, (x - real) / norm, atol=1e-4, rtol=1e-4)
    xs = x.clone().requires_grad_(True)
    per = sf.dmd_loss(xs, d)
    assert per.shape == (3,)
    per.sum().backward()
    torch.testing.assert_close(xs.grad, d / d[0].numel())
    stepped = x - 0.1 * d
    assert ((stepped - real).abs().flatten(1).mean(1) < (x - real).abs().flatten(1).mean(1)).all()


def test_dmd_context_is_the_teachers_clean_context_convention():
    """With a context, the teacher and the critic see the rollout's earlier frames clean, exactly as --p-context
    trained the teacher: predict_v's prediction for the scored frames (through the engine's model) is the one the
    teacher's own training loss scores (distill.train_teacher.noisy_frames_loss through diffusers' transformer,
    clean frames at sigma 0), and it depends on the context."""
    from distill.train_teacher import noisy_frames_loss

    preset = get_preset("tiny")
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    teacher = Teacher.from_preset(preset, seed=seed % 1000, text="fixed")  # diffusers' transformer, as trained
    _randomise(teacher.transformer, seed % 1000, 0.1)
    tr = sf._as_causal(teacher.transformer)  # what self_forcing scores with
    B, C, fc, nf = 2, preset.model.in_channels, 3, 2
    ctx, x = torch.randn(B, C, fc, 4, 6, generator=g), torch.randn(B, C, nf, 4, 6, generator=g)
    sigma, eps = torch.rand(B, generator=g) * 0.9 + 0.05, torch.randn(B, C, nf, 4, 6, generator=g)
    prompts = ["a red circle moving left on a black background"] * B
    ids, lengths = teacher.text._tokenize(prompts)
    kv = tr.text_kv(teacher.text(ids, lengths))
    s = sigma.view(B, 1, 1, 1, 1)
    with torch.no_grad():
        v = sf.predict_v(tr, (1 - s) * x + s * eps, sigma, kv, ctx)
        assert v.shape == x.shape
        mine = (v - (eps - x)).square().mean().item()
        sf_ = torch.cat([torch.zeros(B, fc), sigma[:, None].expand(B, nf)], dim=1)
        theirs = noisy_frames_loss(teacher, torch.cat([ctx, x], 2), torch.cat([torch.zeros_like(ctx), eps], 2), sf_,
                                   ids, lengths).item()
        assert mine == pytest.approx(theirs, rel=1e-5)
        other = sf.predict_v(tr, (1 - s) * x + s * eps, sigma, kv, torch.randn(ctx.shape, generator=g))
        assert (other - v).abs().max() > 1e-3  # the context reaches the prediction
        no_ctx = sf.predict_v(tr, (1 - s) * x + s * eps, sigma, kv)
        torch.testing.assert_close(no_ctx, tr((1 - s) * x + s * eps, sigma * 1000, text_kv=kv))


def test_dmd_step_shows_teacher_and_critic_the_rollout_before_the_scored_chunks():
    """context_frames: on a 3-chunk rollout scoring its last chunk, the teacher and the critic get the last
    context_frames latent frames of the first two chunks (clean, timestep 0: the rollout's own frames, rolled out
    again here from the same generator) before the scored chunk; a rollout with nothing before its scored chunks, or
    context_frames 0, gives them the scored chunks alone."""
    preset = get_preset("tiny")
    fpc = preset.cache.frames_per_chunk
    seen = []

    class Spy(torch.nn.Module):  # records what a bidirectional network is shown, and predicts with the real one
        def __init__(self, net, name):
            super().__init__()
            self.net, self.name = net, name

        def text_kv(self, emb):
            return self.net.text_kv(emb)

        def forward(self, x, t, text_kv=None, **kw):
            seen.append((self.name, x.shape[2], t.detach().clone(), x.detach().clone()))
            return self.net(x, t, text_kv=text_kv, **kw)

    def step(context_frames, chunks):
        seed = random.randrange(1 << 20)
        gen_model = _randomise(CausalWanModel(preset.model), seed, 0.1)
        critic, teacher = (_randomise(CausalWanModel(preset.model), seed + i, 0.1) for i in (1, 2))
        cfg = sf.DMDConfig(rollout_chunks=(chunks,), dmd_chunks=1, ttur=1, context_frames=context_frames)
        nets = sf.DMDNets(gen_model, Spy(critic, "critic"), Spy(teacher, "teacher"), cfg, preset.cache,
                          preset.sampler, preset.latent_hw)
        emb = torch.randn(2, 4, preset.model.text_dim)
        seen.clear()
        loss, _ = nets(emb, emb, torch.zeros_like(emb), ["p"] * 2, [1] * chunks, torch.Generator().manual_seed(seed),
                       generator_step=True)
        assert torch.isfinite(loss)
        with torch.no_grad():  # the rollout the step made: the generator's noise is drawn first
            chunks_ = sf.rollout(gen_model, gen_model.text_kv(emb), preset.cache, preset.sampler,
                                 (2, preset.model.in_channels, fpc, *preset.latent_hw), [1] * chunks,
                                 torch.Generator().manual_seed(seed))
        return list(seen), chunks_

    calls, chunks = step(context_frames=4, chunks=3)
    assert {n for n, *_ in calls} == {"critic", "teacher"} and len(calls) == 4  # critic loss, teacher x2, critic
    context = torch.cat(chunks[:2], dim=2)[:, :, -4:]
    for _, frames, t, x in calls:
        assert frames == 4 + fpc and t.shape == (2, 4 + fpc)
        assert (t[:, :4] == 0).all() and (t[:, 4:] > 0).all()
        torch.testing.assert_close(x[:, :, :4], context)
    for ctx, n in ((0, 3), (4, 1)):  # off, or nothing before the scored chunk: the scored frames alone
        assert all(frames == fpc and t.shape == (2,) for _, frames, t, _ in step(ctx, n)[0])


def test_reward_weights():
    r = torch.tensor([0.0, 0.5, 1.0, 1.0])
    torch.testing.assert_close(sf.reward_weights(r, 0.0), torch.ones(4))
    w = sf.reward_weights(r, 2.0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[2] / w[0], torch.tensor(np.e ** 2, dtype=torch.float32))
    assert w[0] < w[1] < w[2] == w[3]


def test_motion_reward_is_the_oracle_on_decoded_rollouts():
    """The reward of a rendered clip is 1; the same clip frozen, or played backwards, scores lower."""
    prompt = "a red square moving right quickly on a black background"
    clip = render_prompt(prompt, 17, seed=3)  # uint8 [T, H, W, 3]
    video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, T, H, W]
    frozen, backwards = video[:, :1].expand_as(video), video.flip(1)

    class Decoder:  # "decodes" latents that are the videos themselves
        dtype = torch.float32

        def decode(self, z):
            return z

    r = sf.motion_rewards(Decoder(), torch.stack([video, frozen, backwards]), [prompt] * 3)
    assert r[0] == 1.0 and r[1] < 0.5 and r[2] < 0.9, r  # backwards: wrong direction, right speed


def _tiny_folders(root):
    """A random tiny student (engine model folder) and teacher (exported teacher folder), the same fixed text code."""
    from diffusers import WanTransformer3DModel

    from distill.train_teacher import export_teacher
    from engine.folder import save_model_folder
    from engine.vae import VideoVAE

    preset = get_preset("tiny")
    text = ShapesTextEncoder(ShapesTextConfig.fixed_code(dim=preset.model.text_dim))
    torch.manual_seed(0)
    teacher = Teacher(_randomise(WanTransformer3DModel(**preset.model.diffusers_kwargs()), 1, 0.1), text)
    export_teacher(teacher, root / "teacher", preset="tiny")
    student = CausalWanModel(preset.model)
    student.load_state_dict(teacher.transformer.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_model_folder(root / "student", preset, student, VideoVAE.from_config(preset.vae), text, placeholder=False)
    return root / "student", root / "teacher"


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_cli_trains_resumes_exactly_and_exports_a_student(tmp_path, capsys):
    from engine.folder import load_model_folder
    from engine.pipeline import VideoGenerator

    student, teacher = _tiny_folders(tmp_path)
    common = ["--student", str(student), "--teacher", str(teacher), "--batch-size", "2", "--ttur", "2",
              "--rollout-chunks", "2", "4", "--dmd-chunks", "2", "--sink", "static", "--lr", "1e-3", "--quiet",
              "--log-every", "1", "--ckpt-every", "2", "--reward-beta", "2"]
    assert sf.main(common + ["--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    assert sf.main(common + ["--out", str(tmp_path / "split"), "--steps", "2"]) == 0
    assert sf.main(common + ["--out", str(tmp_path / "split"), "--steps", "4"]) == 0
    assert "ignoring changed" not in capsys.readouterr().err  # the same settings resume silently
    full, split = _log(tmp_path / "full"), _log(tmp_path / "split")
    assert [r["gen"] for r in full] == [1.0, 0.0, 1.0, 0.0]  # TTUR 2: the generator trains on every other step
    for key in ("loss", "critic", "dmd", "reward", "grad_norm_generator", "grad_norm_critic"):
        assert [r[key] for r in split] == [r[key] for r in full], key
    assert all(r["grad_norm_generator"] == 0.0 for r in full if not r["gen"])  # critic-only steps leave it alone
    assert all(0.0 <= r["reward"] <= 1.0 for r in full)

    # an older run's dmd.json lacks the keys added since (None then): still silent; a changed setting is named
    saved = json.loads((tmp_path / "split" / "dmd.json").read_text())
    (tmp_path / "split" / "dmd.json").write_text(json.dumps({k: v for k, v in saved.items()
                                                             if k not in ("prompts", "hybrid")}))
    assert sf.main(common + ["--out", str(tmp_path / "split"), "--steps", "4"]) == 0
    assert "ignoring changed" not in capsys.readouterr().err
    assert sf.main(common[:-2] + ["--out", str(tmp_path / "split"), "--steps", "4"]) == 0  # no --reward-beta 2
    assert "(ignoring changed dmd)" in capsys.readouterr().err

    out = tmp_path / "model"
    assert sf.main(["--out", str(tmp_path / "full"), "--export", str(out), "--quiet"]) == 0
    m = load_model_folder(out)
    assert m.preset.cache.sink == "static" and not m.info["placeholder"]
    ref = load_model_folder(student)  # the generator moved away from the student it started from
    assert any(not torch.equal(a, b.half().float()) for a, b in zip(m.transformer.state_dict().values(),
                                                                      ref.transformer.state_dict().values()))
    frames = np.concatenate([c.frames for c in VideoGenerator(m).run([(0, "a red circle bouncing on a black "
                                                                          "background")], 9, seed=0)])
    assert frames.shape == (9, 32, 32, 3)


def test_cli_bad_input_one_line_exit_2(tmp_path, capsys):
    assert sf.main(["--out", str(tmp_path / "r"), "--rollout-chunks", "2", "--dmd-chunks", "3"]) == 2
    assert "must be >= dmd_chunks" in capsys.readouterr().err
    assert sf.main(["--out", str(tmp_path / "r"), "--dmd-context", "-1"]) == 2
    assert "context_frames must be >= 0" in capsys.readouterr().err
    assert sf.main(["--out", str(tmp_path / "none"), "--export", str(tmp_path / "x")]) == 2
    assert "not a self_forcing run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sf.main(["--sink", "sometimes"])
    assert e.value.code == 2
    for bad in (["--streams", "-1"], ["--stream-seconds", "nan"], ["--eval-steps", "0"], ["--eval", "-1"]):
        with pytest.raises(SystemExit) as e:
            sf.main(["--eval", "2", *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--streams and --stream-seconds must be >= 0" in err and "Traceback" not in err


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_match_grad_accum(tmp_path, fsdp):
    """DDP or FSDP over 2 processes (gloo) equals one process with 2 micro-batches, critic-only steps included
    (under FSDP the ranks must run the same forwards: the rollout plan is drawn per step, not per rank), with the
    GAN term on (rank 0 makes the real clips' cache, the other waits; the head reads a middle critic block)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distill.trainer import load_weights

    student, teacher = _tiny_folders(tmp_path)
    common = ["--student", str(student), "--teacher", str(teacher), "--batch-size", "1", "--ttur", "2",
              "--rollout-chunks", "2", "3", "--dmd-chunks", "2", "--lr", "1e-3", "--quiet", "--log-every", "1",
              "--steps", "4", "--gan-weight", "0.1", "--real", str(tmp_path / "real.safetensors"), "--real-clips", "4"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")} | {"OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    loud = [a for a in common if a != "--quiet"]  # FSDP reports what each rank holds
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "distill.self_forcing",
                           *(loud if fsdp else common), "--out", str(tmp_path / "ddp"), "--grad-accum", "1",
                           *(["--fsdp"] if fsdp else [])], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if fsdp:  # every network is split over the 2 ranks, the frozen teacher too
        held = dict(re.findall(r"(generator|critic|teacher) (\d+)% of", proc.stderr))
        assert sorted(held) == ["critic", "generator", "teacher"], proc.stderr[-2000:]
        assert all(45 <= int(v) <= 55 for v in held.values()), held
    assert sf.main(common + ["--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    one, ddp = _log(tmp_path / "one"), _log(tmp_path / "ddp")
    assert [r["gen"] for r in ddp] == [1.0, 0.0, 1.0, 0.0]
    for key in ("loss", "critic", "dmd", "disc", "gan"):
        torch.testing.assert_close(torch.tensor([r[key] for r in ddp]), torch.tensor([r[key] for r in one]),
                                   rtol=1e-4, atol=1e-6, msg=key)
    for which in ("model", "ema"):
        a, b = load_weights(tmp_path / "one", which), load_weights(tmp_path / "ddp", which)
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{which} {k}")
    assert all(k.startswith("generator.") for k in a)  # the EMA is the generator's only


def test_a_larger_teacher_with_a_student_sized_critic(tmp_path, capsys):
    """Self-Forcing's 14B setting in small: the teacher wider and deeper than the student, the critic started from
    another model (here the student's own folder). A critic with another text encoder, or a teacher in another
    latent space, is refused in one line."""
    from diffusers import WanTransformer3DModel

    from distill.train_teacher import export_teacher
    from distill.trainer import load_weights
    from engine.folder import load_model_folder, save_model_folder

    student, _ = _tiny_folders(tmp_path)
    preset = get_preset("tiny")
    text = ShapesTextEncoder(ShapesTextConfig.fixed_code(dim=preset.model.text_dim))
    for name, change in [("big", {"num_attention_heads": 3, "num_layers": 3, "ffn_dim": 96}),
                         ("other-latents", {"in_channels": 6, "out_channels": 6})]:
        kw = preset.model.diffusers_kwargs() | change
        export_teacher(Teacher(_randomise(WanTransformer3DModel(**kw), 2, 0.1), text), tmp_path / name, preset="tiny")
    common = ["--student", str(student), "--batch-size", "1", "--ttur", "1", "--rollout-chunks", "2",
              "--dmd-chunks", "2", "--quiet", "--steps", "1"]
    assert sf.main(common + ["--teacher", str(tmp_path / "big"), "--critic", str(student),
                             "--out", str(tmp_path / "run")]) == 0
    weights = load_weights(tmp_path / "run", "model")
    critic = {k.removeprefix("critic."): v.shape for k, v in weights.items() if k.startswith("critic.")}
    assert critic == {k: v.shape for k, v in load_model_folder(student).transformer.state_dict().items()}
    assert json.loads((tmp_path / "run/dmd.json").read_text())["critic"] == str(student)
    # without --critic the critic is the teacher's size
    assert sf.main(common + ["--teacher", str(tmp_path / "big"), "--out", str(tmp_path / "run2")]) == 0
    assert load_weights(tmp_path / "run2", "model")["critic.blocks.2.attn1.to_q.weight"].shape == (36, 36)

    assert sf.main(common + ["--teacher", str(tmp_path / "other-latents"), "--out", str(tmp_path / "r3")]) == 2
    assert "takes 6 latent channels and the student 4" in capsys.readouterr().err
    m = load_model_folder(student)
    learned = ShapesTextEncoder(ShapesTextConfig(dim=preset.model.text_dim, num_layers=1, num_heads=2))
    save_model_folder(tmp_path / "other-text", preset, m.transformer, m.vae, learned, placeholder=False)
    assert sf.main(common + ["--teacher", str(tmp_path / "big"), "--critic", str(tmp_path / "other-text"),
                             "--out", str(tmp_path / "r4")]) == 2
    assert "its text encoder is not the teacher's" in capsys.readouterr().err


def test_any_model_folder_as_teacher_and_a_prompt_file(tmp_path, capsys):
    """Outside Shapes: the real score from a model folder (here the student's own), prompts from a file."""
    student, _ = _tiny_folders(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one a line\na lighthouse at dusk\n\na fox running through snow\n")
    common = ["--student", str(student), "--teacher", str(student), "--batch-size", "2", "--rollout-chunks", "2",
              "--dmd-chunks", "2", "--quiet", "--steps", "1", "--prompts", str(prompts)]
    assert sf.main(common + ["--out", str(tmp_path / "run")]) == 0
    assert sf.PromptFile(str(prompts)).prompts == ["a lighthouse at dusk", "a fox running through snow"]
    assert json.loads((tmp_path / "run/dmd.json").read_text())["prompts"] == str(prompts)
    assert sf.main(common + ["--out", str(tmp_path / "r2"), "--reward-beta", "1"]) == 2
    assert "needs Shapes prompts" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert sf.main(common[:-1] + [str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r3")]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_decoupled_switch_to_sparse_window_and_linear_memory(tmp_path):
    """Hybrid Forcing's schedule: dense rollouts first (the memory projections stay exactly zero), then the
    sparse / linear-memory cache; the exported student carries the projections and the hybrid cache."""
    from distill.trainer import load_weights
    from engine.folder import load_model_folder
    from engine.pipeline import VideoGenerator

    student, teacher = _tiny_folders(tmp_path)
    run = tmp_path / "run"
    # no sink: the window (2 chunks) evicts into the memory from the third chunk's commit, read by the fourth
    assert sf.main(["--student", str(student), "--teacher", str(teacher), "--batch-size", "1", "--ttur", "1",
                    "--rollout-chunks", "4", "--dmd-chunks", "2", "--sink", "none", "--lr", "1e-2", "--quiet",
                    "--log-every", "1", "--ckpt-every", "2", "--keep", "3", "--steps", "4", "--sparse-topk", "0.5",
                    "--linear-memory", "--hybrid-from", "2", "--out", str(run)]) == 0
    assert [r["hybrid"] for r in _log(run)] == [0.0, 0.0, 1.0, 1.0]
    mem = lambda ckpt: {k: v for k, v in load_weights(run / "checkpoints" / ckpt, "model").items() if "mem_proj" in k}
    at2, at4 = mem("step_000002"), mem("step_000004")
    assert len(at2) == 2 * 2 and all(not v.any() for v in at2.values())  # 2 layers x (weight, bias)
    assert any(v.any() for v in at4.values())
    out = tmp_path / "model"
    assert sf.main(["--out", str(run), "--export", str(out), "--quiet"]) == 0
    m = load_model_folder(out)
    assert m.transformer.has_linear_memory
    assert m.preset.cache.linear_memory and m.preset.cache.sparse_topk == 0.5 and m.preset.cache.sink == "none"
    frames = np.concatenate([c.frames for c in VideoGenerator(m).run([(0, "a red circle bouncing on a black "
                                                                          "background")], 13, seed=0)])
    assert frames.shape == (13, 32, 32, 3)


def test_memory_projections_get_their_own_lr_group(tmp_path):
    """--memory-lr-scale: the generator's memory projections form the first group (first match wins), so they
    are not also in the generator's; without the flag the groups are generator and critic only."""
    from torch import nn

    from distill.trainer import TrainConfig, Trainer

    attn = nn.Module()
    attn.to_q, attn.mem_proj = nn.Linear(3, 3), nn.Linear(3, 3)
    block = nn.Module()
    block.attn1 = attn
    gen = nn.Module()
    gen.blocks = nn.ModuleList([block])
    model = nn.Module()
    model.generator, model.critic = gen, nn.Linear(3, 3)
    settings = {"critic_lr_scale": 0.5, "hybrid": {"linear_memory": True, "memory_lr_scale": 20.0}}
    groups = sf.param_groups(settings)
    assert list(groups) == [sf.MEMORY_PARAMS, "generator.", "critic."]
    tr = Trainer(model, None, TrainConfig(steps=1, lr=1e-3), tmp_path, groups=groups, quiet=True)
    scale = {n: g["lr_scale"] for g, names in zip(tr.optimizer.param_groups, tr.param_names) for n in names}
    assert scale == {"generator.blocks.0.attn1.mem_proj.weight": 20.0, "generator.blocks.0.attn1.mem_proj.bias": 20.0,
                     "generator.blocks.0.attn1.to_q.weight": 1.0, "generator.blocks.0.attn1.to_q.bias": 1.0,
                     "critic.weight": 0.5, "critic.bias": 0.5}
    assert sf.param_groups({"critic_lr_scale": 1.0, "hybrid": None}) == {"generator.": 1.0, "critic.": 1.0}
    with pytest.raises(SystemExit) as e:
        sf.main(["--out", str(tmp_path / "r"), "--memory-lr-scale", "0"])
    assert e.value.code == 2


def test_gan_gradient_is_the_generator_loss_gradient_and_leaves_the_judge_alone():
    """DMD2's GAN term: the gradient handed to the generator is d mean softplus(-logit) / dx through the critic and
    the head (autograd on the same graph), and neither the critic nor the head gets a gradient from it."""
    preset = get_preset("tiny")
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    critic = _randomise(CausalWanModel(preset.model), int(torch.randint(1 << 20, (1,), generator=g)), 0.1)
    head = sf.DiscHead(preset.model.dim)
    x = torch.randn(3, preset.model.in_channels, 3, 6, 4, generator=g)
    kv = critic.text_kv(torch.randn(3, 5, preset.model.text_dim, generator=g))
    sigma, eps = torch.rand(3, generator=g), torch.randn(x.shape, generator=g)
    grad, loss = sf.gan_gradient(critic, head, 1, x, kv, sigma, eps)
    assert all(p.grad is None for p in [*critic.parameters(), *head.parameters()])
    xr = x.clone().requires_grad_(True)
    ref = torch.nn.functional.softplus(-sf.gan_logits(critic, head, 1, xr, kv, sigma, eps)).mean()
    ref.backward(inputs=[xr])
    torch.testing.assert_close(grad, xr.grad)
    assert loss == pytest.approx(ref.item())
    assert grad.abs().sum() > 0


def test_cli_gan_term_trains_on_real_clips_and_resumes_exactly(tmp_path, capsys):
    """--gan-weight: the real clips' latent cache is made on first use (long enough for the longest rollout), the
    head trains with the critic in its lr group, the logs carry its loss and accuracy, and a split run equals a
    whole one. Without the flag dmd.json has no GAN fields (older runs resume unchanged)."""
    from distill.data import LatentSet
    from distill.trainer import load_weights

    student, teacher = _tiny_folders(tmp_path)
    real = tmp_path / "real.safetensors"
    common = ["--student", str(student), "--teacher", str(teacher), "--batch-size", "2", "--ttur", "2",
              "--rollout-chunks", "2", "3", "--dmd-chunks", "2", "--lr", "1e-3", "--quiet", "--log-every", "1",
              "--ckpt-every", "2", "--gan-weight", "0.1", "--disc-weight", "0.5", "--real", str(real),
              "--real-clips", "5"]
    assert sf.main(common + ["--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    cache = LatentSet(real)
    assert len(cache) == 5 and cache.latents.shape[2] >= 3 * get_preset("tiny").cache.frames_per_chunk
    assert sf.main(common + ["--out", str(tmp_path / "split"), "--steps", "2"]) == 0
    assert sf.main(common + ["--out", str(tmp_path / "split"), "--steps", "4"]) == 0
    assert "ignoring changed" not in capsys.readouterr().err  # the same settings resume silently
    full, split = _log(tmp_path / "full"), _log(tmp_path / "split")
    for key in ("loss", "critic", "dmd", "disc", "d_acc", "gan", "grad_norm_generator", "grad_norm_critic"):
        assert [r[key] for r in split] == [r[key] for r in full], key
    assert all(r["disc"] > 0 and 0 <= r["d_acc"] <= 1 for r in full)
    assert all((r["gan"] > 0) == bool(r["gen"]) for r in full)  # the generator's GAN loss on its own steps only
    w0, w4 = (load_weights(tmp_path / "full" / "checkpoints" / c, "model") for c in ("step_000002", "step_000004"))
    head = [k for k in w4 if k.startswith("disc_head.")]
    assert head and any(not torch.equal(w0[k], w4[k]) for k in head)
    settings = json.loads((tmp_path / "full/dmd.json").read_text())
    assert settings["real"] == {"path": str(real), "clips": 5} and settings["dmd"]["gan_weight"] == 0.1
    assert sf.param_groups(settings)["disc_head."] == settings["disc_lr_scale"] == 20.0  # the head starts from nothing
    plain = common[:common.index("--gan-weight")]
    assert sf.main(plain + ["--out", str(tmp_path / "plain"), "--steps", "1"]) == 0
    settings = json.loads((tmp_path / "plain/dmd.json").read_text())
    assert "real" not in settings and "gan_weight" not in settings["dmd"]
    assert not any(k.startswith("disc_head.") for k in load_weights(tmp_path / "plain", "model"))

    # a cache of another latent size, and Shapes clips with a prompt file, are refused in one line
    assert capsys.readouterr().err == ""  # --quiet: no progress bar while the cache is made either
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    save_file({"latents": torch.zeros(2, 4, 2, 8, 8, dtype=torch.float16)}, str(bad),
              metadata={"prompts": json.dumps(["a", "b"]), "clips": json.dumps({})})
    assert sf.main(common[:-4] + ["--real", str(bad), "--out", str(tmp_path / "r2"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors: latents of shape [4, 2, 8, 8]" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "p.txt").write_text("a fox\n")
    assert sf.main(common + ["--out", str(tmp_path / "r3"), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "--gan-weight: the real clips are rendered Shapes clips" in capsys.readouterr().err


def test_real_clips_cover_the_longest_rollout_under_a_two_frame_vae(tmp_path):
    """The VAE encoder takes 1 + 4k frames, so a 2-frame-per-latent VAE needs clips rounded up to that framing:
    6 latent frames ask for 11 frames, which it would cut to 9 (5 latents); 13 give 7 latent frames."""
    from types import SimpleNamespace

    from engine.vae import VideoVAE

    tiny = get_preset("tiny")
    vae_cfg = dataclasses.replace(tiny.vae, temperal_downsample=(False, False, True), scale_factor_temporal=2)
    student = SimpleNamespace(preset=tiny.replace(vae=vae_cfg), vae=VideoVAE.from_config(vae_cfg))
    real = sf.real_clips(str(tmp_path / "real.safetensors"), 3, student, 6, quiet=True)
    assert tuple(real.latents.shape) == (3, tiny.model.in_channels, 7, *tiny.latent_hw)
    assert len(set(real.prompts)) > 1
