"""engine/preview.py: the TAEHV-style preview decoder. Chunked streaming equals the whole clip and a frame-at-a-time
reference; TAEHV's weight layout (taew2_1's key names and widths) loads; bad files give one-line errors."""

import random

import pytest
import torch

from engine.config import VAEConfig
from engine.folder import ModelLoadError
from engine.preview import MemBlock, PreviewConfig, PreviewDecoder, TGrow, load_preview


def _random(model: PreviewDecoder, seed: int) -> PreviewDecoder:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
    return model.eval()


@torch.no_grad()
def frame_at_a_time(model: PreviewDecoder, z: torch.Tensor) -> torch.Tensor:
    """The obvious reference: latent frames one by one, each layer in turn; a memory block keeps its last input; a
    time grow's output channel group s is sub-frame s, and each sub-frame runs the rest of the network before the
    next. z [B, C, F, h, w] -> [B, 3, 1 + t(F - 1), H, W] in [-1, 1]."""
    layers, memory, out = list(model.decoder), {}, []

    def go(x, i):
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                y, C = layer.conv(x), x.shape[1]
                for s in range(layer.stride):
                    go(y[:, s * C:(s + 1) * C], i + 1)
                return
            else:
                x = layer(x)
            i += 1
        p = model.cfg.patch_size
        out.append((torch.nn.functional.pixel_shuffle(x, p) if p > 1 else x).clamp(0, 1))

    for f in range(z.shape[2]):
        go(z[:, :, f], 0)
    return torch.stack(out[model.cfg.temporal - 1:], dim=2) * 2 - 1


CONFIGS = [
    PreviewConfig(z_dim=5, channels=(7, 6, 4, 3), blocks=1, space_upscale=(False, True, False),
                  time_upscale=(True, False, True)),
    PreviewConfig(z_dim=3, channels=(4, 4, 5, 2), blocks=2, space_upscale=(True, True, True),
                  time_upscale=(False, False, False), patch_size=2),
    PreviewConfig.for_vae(VAEConfig(base_dim=8, z_dim=8, dim_mult=(1, 2, 2), temperal_downsample=(False, True),
                                    scale_factor_temporal=2, scale_factor_spatial=4), channels=(6, 5, 4, 3)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["time-x4-odd", "patch2-no-time", "shapes-t2-like"])
def test_streaming_equals_whole_clip_and_the_frame_reference(cfg):
    seed = random.randrange(2**31)
    model = _random(PreviewDecoder(cfg), seed)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, cfg.z_dim, 7, 5, 3, generator=g)  # odd sizes
    whole = model.decode(z)
    T = 1 + cfg.temporal * 6
    assert whole.shape == (2, 3, T, 5 * cfg.spatial, 3 * cfg.spatial), seed
    torch.testing.assert_close(whole, frame_at_a_time(model, z), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    stream = model.stream()
    parts = [stream.decode(c) for c in z.split([1, 3, 2, 1], dim=2)]
    assert [p.shape[2] for p in parts] == [1, 3 * cfg.temporal, 2 * cfg.temporal, cfg.temporal]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    stream.reset()  # a new stream starts from empty memory
    torch.testing.assert_close(stream.decode(z), whole, rtol=1e-5, atol=1e-5)


def taehv_decoder_keys(z: int = 16, c=(256, 128, 64, 64), time=(False, True, True)) -> dict[str, tuple]:
    """TAEHV's decoder layout written out by hand (taehv.py's nn.Sequential): index -> key names and shapes."""
    keys = {"decoder.1.weight": (c[0], z, 3, 3), "decoder.1.bias": (c[0],)}
    for s in range(3):
        base = 3 + 6 * s
        for i in range(base, base + 3):  # MemBlock: conv = Sequential(conv(2n, n), relu, conv, relu, conv)
            keys |= {f"decoder.{i}.conv.0.weight": (c[s], 2 * c[s], 3, 3), f"decoder.{i}.conv.0.bias": (c[s],),
                     f"decoder.{i}.conv.2.weight": (c[s], c[s], 3, 3), f"decoder.{i}.conv.2.bias": (c[s],),
                     f"decoder.{i}.conv.4.weight": (c[s], c[s], 3, 3), f"decoder.{i}.conv.4.bias": (c[s],)}
        keys[f"decoder.{base + 4}.conv.weight"] = (c[s] * (2 if time[s] else 1), c[s], 1, 1)  # TGrow
        keys[f"decoder.{base + 5}.weight"] = (c[s + 1], c[s], 3, 3)  # conv, no bias
    keys |= {"decoder.22.weight": (3, c[3], 3, 3), "decoder.22.bias": (3,)}
    return keys


def test_taew2_1_layout_loads_from_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    want = taehv_decoder_keys()
    model = PreviewDecoder()  # the defaults are taew2_1's
    assert {f"decoder.{k}" if not k.startswith("decoder.") else k: tuple(v.shape)
            for k, v in model.state_dict().items()} == want
    g = torch.Generator().manual_seed(random.randrange(2**31))
    sd = {k: torch.randn(s, generator=g) / (s[1] * 9 if len(s) > 1 else 100) ** 0.5 for k, s in want.items()}
    sd["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # the encoder's tensors are ignored
    save_file(sd, str(tmp_path / "taew2_1.safetensors"))
    torch.save(sd, tmp_path / "taew2_1.pth")
    z = torch.randn(1, 16, 2, 4, 6, generator=g)
    outs = []
    for name in ("taew2_1.safetensors", "taew2_1.pth"):
        m = load_preview(tmp_path / name)
        assert m.cfg == PreviewConfig()
        assert m.cfg.spatial == 8 and m.cfg.temporal == 4
        outs.append(m.decode(z))
        assert outs[-1].shape == (1, 3, 5, 32, 48)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], frame_at_a_time(m, z), rtol=1e-5, atol=1e-5)
    # a folder round trip
    m.save(tmp_path / "folder")
    torch.testing.assert_close(load_preview(tmp_path / "folder").decode(z), outs[0], rtol=0, atol=0)


def test_bad_files_give_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    sd = {k: torch.zeros(s) for k, s in taehv_decoder_keys().items()}
    (tmp_path / "cut.safetensors").write_bytes(b"\x00" * 40)
    bad_shape = dict(sd, **{"decoder.9.conv.2.weight": torch.zeros(128, 64, 3, 3)})
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    missing = {k: v for k, v in sd.items() if k != "decoder.4.conv.0.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    save_file({"encoder.0.weight": torch.zeros(2)}, str(tmp_path / "encoder-only.safetensors"))
    torch.save({"decoder": [1, 2]}, tmp_path / "odd.pth")
    for name, words in [("cut.safetensors", "corrupt or truncated"), ("nothing.pth", "missing"),
                        ("shape.safetensors", "decoder.9.conv.2.weight has shape (128, 64, 3, 3)"),
                        ("missing.safetensors", "missing key decoder.4.conv.0.bias"),
                        ("encoder-only.safetensors", "not a TAEHV decoder"), ("odd.pth", "flat dict of tensors")]:
        with pytest.raises(ModelLoadError) as e:
            load_preview(tmp_path / name)
        assert name in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/config.json").write_text('{"format": "other"}')
    with pytest.raises(ModelLoadError, match="not a preview decoder"):
        load_preview(tmp_path / "notes")


@pytest.fixture(scope="module")
def tiny_with_preview(tmp_path_factory):
    from engine.config import get_preset
    from engine.init_model import random_model_folder

    path = tmp_path_factory.mktemp("preview-model") / "m"
    random_model_folder("tiny", path, seed=0, weights_dtype=torch.float32)
    bare = path.parent / "bare"
    random_model_folder("tiny", bare, seed=0, weights_dtype=torch.float32)
    _random(PreviewDecoder(PreviewConfig.for_vae(get_preset("tiny").vae, channels=(8, 8, 6, 6))), 5).save(path / "preview")
    return path, bare


def test_the_engine_streams_through_the_preview_decoder(tiny_with_preview, monkeypatch):
    """VideoGenerator(preview=True): the chunks' frames are the preview decoder's frames of the whole clip's
    latents, and the video differs from the VAE's (another decoder)."""
    import numpy as np

    from engine.folder import load_model_folder
    from engine.pipeline import VideoGenerator
    from engine.preview import StreamingPreview
    from engine.video_io import frames_to_uint8

    model = load_model_folder(tiny_with_preview[0])
    assert model.preview is not None and load_model_folder(tiny_with_preview[1]).preview is None
    latents, decode = [], StreamingPreview.decode
    monkeypatch.setattr(StreamingPreview, "decode", lambda self, z: latents.append(z.clone()) or decode(self, z))
    prompt = [(0, "a red circle bouncing on a black background")]
    gen = VideoGenerator(model, preview=True)
    frames = np.concatenate([c.frames for c in gen.run(prompt, 21, seed=3)])
    assert frames.shape == (21, 32, 32, 3) and len(latents) == gen.chunks_for_frames(21) > 1
    whole = frames_to_uint8(model.preview.decode(torch.cat(latents, dim=2))[0].float())
    assert np.array_equal(frames, whole[:21])
    vae = np.concatenate([c.frames for c in VideoGenerator(model).run(prompt, 21, seed=3)])
    assert not np.array_equal(frames, vae)


def test_generate_preview_flag(tiny_with_preview, tmp_path, capsys):
    from engine.generate import main

    with_preview, bare = tiny_with_preview

    def run(model, *extra):
        try:
            rc = main(["--prompt", "a red circle bouncing on a black background", "--model", str(model), "--frames",
                       "9", "--quiet", *map(str, extra)])
        except SystemExit as e:
            rc = e.code
        return rc, capsys.readouterr()

    rc, io = run(with_preview, "--preview", "--out", tmp_path / "own")
    assert rc == 0, io.err
    rc, io = run(bare, "--preview", with_preview / "preview", "--out", tmp_path / "given")
    assert rc == 0, io.err
    own, given = (sorted((tmp_path / d).glob("*.png")) for d in ("own", "given"))
    assert len(own) == 9 and [f.read_bytes() for f in own] == [f.read_bytes() for f in given]
    rc, io = run(bare, "--preview", "--out", tmp_path / "x")
    assert rc == 2 and "has no preview decoder" in io.err and "Traceback" not in io.err
    PreviewDecoder(PreviewConfig(z_dim=5)).save(tmp_path / "wan-sized")
    rc, io = run(bare, "--preview", tmp_path / "wan-sized", "--out", tmp_path / "y")
    assert rc == 2 and "reads 5 channels at x8 space and x4 time" in io.err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written


def test_train_preview_cli_trains_resumes_and_exports(tmp_path, capsys):
    """python -m distill.train_preview on a random tiny VAE: a run split in two equals one run, the export loads as
    a preview folder and evaluates beside the VAE; bad arguments exit 2."""
    import json

    from distill.train_preview import main
    from engine.config import get_preset
    from engine.vae import VideoVAE

    VideoVAE.from_config(get_preset("tiny").vae).save(tmp_path / "vae")
    common = ["--vae", str(tmp_path / "vae"), "--size", "32", "32", "--frames", "9", "--batch-size", "2",
              "--channels", "8", "8", "6", "6", "--blocks", "1", "--quiet", "--log-every", "1", "--ckpt-every", "2"]
    assert main(common + ["--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "2"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "4"]) == 0
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("full", "split")]
    assert len(logs[0]) == 4 and logs[0] == logs[1]
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "full"), "--export", str(tmp_path / "pv"), "--eval", "2", "--eval-stream", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) >= {"preview", "vae", "decode_ms_per_frame"} and 0 <= res["preview"]["oracle_reconstruction"] <= 1
    pv = load_preview(tmp_path / "pv")
    assert pv.cfg.channels == (8, 8, 6, 6) and pv.cfg.blocks == 1
    # a later phase starts from an export
    assert main(common[:-4] + ["--init", str(tmp_path / "pv"), "--out", str(tmp_path / "phase2"), "--steps", "1"]) == 0
    with pytest.raises(SystemExit) as e:
        main(common + ["--out", str(tmp_path / "bad"), "--frames", "6"])
    assert e.value.code == 2 and "--frames must be 1 + 4k" in capsys.readouterr().err


def test_train_preview_on_a_students_own_latents(tmp_path, capsys):
    """--student MODEL: the student's latents, generated through the streaming engine and decoded by the VAE, are
    cached in the run and mixed into the batches (the fraction asked for, the VAE's frames as the targets); a run
    split in two equals one run; the export evaluates on held-out student latents; p 0 batches are VAETask's."""
    import json

    import numpy as np

    from distill.data import ShapesClips, to_tensor
    from distill.train_preview import STUDENT_SET, PreviewTask, StudentSet, main, student_latents
    from distill.train_vae import VAETask
    from engine.folder import load_model_folder
    from engine.init_model import random_model_folder

    random_model_folder("tiny", tmp_path / "m", seed=1, weights_dtype=torch.float32)
    common = ["--vae", str(tmp_path / "m" / "vae"), "--size", "32", "32", "--frames", "9", "--batch-size", "4",
              "--channels", "8", "8", "6", "6", "--blocks", "1", "--quiet", "--log-every", "1", "--ckpt-every", "2",
              "--student", str(tmp_path / "m"), "--student-clips", "5", "--p-student", "0.5"]
    assert main(common + ["--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "2"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--steps", "4"]) == 0
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("full", "split")]
    assert len(logs[0]) == 4 and logs[0] == logs[1]

    # the cached set: 5 clips of 3 latent frames (9 video frames), each target the VAE's decode of its latents
    st = StudentSet(tmp_path / "full" / STUDENT_SET)
    assert len(st) == 5 and st.latents.shape == (5, 4, 3, 4, 4) and st.frames.shape == (5, 9, 32, 32, 3)
    vae = load_model_folder(tmp_path / "m").vae
    with torch.no_grad():
        again = vae.decode(st.latents[3:4])
    assert (to_tensor(st.frames[3:4]) - again).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding
    # the latents are the engine's own: one stream's first half is what VideoGenerator makes of its prompt and seed
    from engine.pipeline import VideoGenerator

    prompts, z, frames = student_latents(tmp_path / "m", 2, 3, seed=7, batch=1)
    assert z.shape == (2, 4, 3, 4, 4) and frames.shape == (2, 9, 32, 32, 3) and prompts[0] == prompts[1]
    assert not torch.equal(z[0], z[1])  # the two halves of one stream: its start and its continuation
    run = VideoGenerator(load_model_folder(tmp_path / "m")).run([(0, prompts[0])], 9, seed=7 * 1_000_003)
    engine_frames = np.concatenate([c.frames for c in run])
    assert engine_frames.shape == frames[0].shape
    assert np.abs(engine_frames.astype(int) - frames[0]).max() <= 1  # streaming decode vs whole: rounding

    # batches: about half of the clips are the student's, rendered clips first; with p 0 they are VAETask's
    clips = ShapesClips(32, 32, 9, seed=0)
    task = PreviewTask(clips, "cpu", st, 0.5)
    flags = [task.is_student(i) for i in range(1000)]
    assert abs(sum(flags) / 1000 - 0.5) < 0.01
    ids = list(range(8, 16))
    b = task.batch(ids)
    own = [i for i in ids if task.is_student(i)]
    assert 0 < len(own) < 8 and b["z"].shape[0] == len(own) and b["video"].shape[0] == 8
    assert torch.equal(b["z"], st.latents[[i % 5 for i in own]])
    assert torch.equal(b["video"][8 - len(own):], to_tensor(st.frames[[i % 5 for i in own]]))
    plain = PreviewTask(clips, "cpu", None, 0.5).batch(ids)
    assert plain["z"] is None and torch.equal(plain["video"], VAETask(clips, 0.0, "cpu").batch(ids))

    capsys.readouterr()
    assert main(["--out", str(tmp_path / "full"), "--export", str(tmp_path / "pv"), "--eval", "2",
                 "--eval-stream", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["student_latents"]
    assert res["clips"] == 2 and np.isfinite(res["psnr_db_vs_vae"]) and 0 <= res["preview"]["adherence"] <= 1
    with pytest.raises(SystemExit) as e:
        main(common + ["--out", str(tmp_path / "bad"), "--p-student", "1.5"])
    assert e.value.code == 2 and "--p-student in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(common + ["--out", str(tmp_path / "bad"), "--size", "0", "0"])
    assert e.value.code == 2 and "multiples of the VAE's stride 8" in capsys.readouterr().err
    # a VAE other than the student's (8 latent channels against its 4): one line, exit 2
    from engine.config import get_preset
    from engine.vae import VideoVAE

    VideoVAE.from_config(get_preset("shapes").vae).save(tmp_path / "other-vae")
    assert main(common + ["--out", str(tmp_path / "other"), "--steps", "1", "--vae", str(tmp_path / "other-vae")]) == 2
    err = capsys.readouterr().err
    assert "latents have 4 channels, the VAE" in err and err.count("\n") == 1
