"""`python -m engine.generate`: determinism, output formats, prompt switching and one-line errors (CPU, fast).

A random `tiny` model folder is built once per module; the CLI runs in-process through `engine.generate.main`
except where the real process matters (exit status, stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from engine.generate import main
from engine.init_model import random_model_folder

PROMPT = "a red circle bouncing on a black background"
OTHER = "a large blue square moving left"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generate-model") / "m"
    random_model_folder("tiny", path, seed=0, weights_dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def preset(model) -> dict:
    return json.loads((model / "engine.json").read_text())["preset"]


def cli(argv, capsys):
    """Run the CLI in-process -> (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def generate(capsys, model, out, *args, prompt=PROMPT):
    rc, stdout, err = cli(["--prompt", prompt, "--model", model, "--out", out, "--quiet", *args], capsys)
    assert rc == 0, err
    return stdout


def png_frames(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("frame_*.png"))
    assert files, f"no frames in {folder}"
    assert [f.name for f in files] == [f"frame_{i:06d}.png" for i in range(len(files))]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])


def gif_frame_count(path: Path) -> int:
    with Image.open(path) as im:
        assert im.format == "GIF"
        return im.n_frames


def snapshot(root: Path) -> dict:
    """Every path under root with its size (files) or None (folders): 'nothing was written' checks."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else None) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------------------


def test_same_seed_same_frames_other_seed_other_frames(model, tmp_path, capsys):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(capsys, model, tmp_path / name, "--frames", 13, "--seed", seed)
    a, b, c = (png_frames(tmp_path / n) for n in "abc")
    assert a.shape == (13, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b), "same seed and settings must give the same video"
    assert not np.array_equal(a, c), "a different seed must give a different video"
    assert a.std() > 0, "frames should not be constant"


def test_steps_cuts_the_schedule(model, tmp_path, capsys):
    for name, extra in (("default", []), ("four", ["--steps", 4]), ("one", ["--steps", 1])):
        generate(capsys, model, tmp_path / name, "--frames", 9, *extra)
    a, b, c = (png_frames(tmp_path / n) for n in ("default", "four", "one"))
    assert np.array_equal(a, b), "--steps 4 is the model's own 4-step schedule"
    assert c.shape == a.shape and not np.array_equal(a, c), "one step is another video of the same length"


# --------------------------------------------------------------------------------------------------------------
# Output formats and lengths
# --------------------------------------------------------------------------------------------------------------


def test_mp4_has_requested_frames(model, preset, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    generate(capsys, model, out, "--frames", 11)
    frames = mp4_frames(out)
    assert frames.shape == (11, preset["height"], preset["width"], 3)
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == preset["fps"]
    assert not list(tmp_path.glob(".*partial*"))


def test_gif_has_requested_frames(model, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    generate(capsys, model, out, "--frames", 9)
    assert gif_frame_count(out) == 9
    assert not list(tmp_path.glob(".*partial*"))


def test_png_folder_has_requested_frames(model, preset, tmp_path, capsys):
    out = tmp_path / "frames"
    generate(capsys, model, out, "--frames", 6)
    assert png_frames(out).shape == (6, preset["height"], preset["width"], 3)


def test_png_folder_frames_match_mp4_roughly(model, tmp_path, capsys):
    generate(capsys, model, tmp_path / "png", "--frames", 5)
    generate(capsys, model, tmp_path / "v.mp4", "--frames", 5)
    png, mp4 = png_frames(tmp_path / "png"), mp4_frames(tmp_path / "v.mp4")
    assert png.shape == mp4.shape
    # same video, H.264 is lossy: a loose bound only (random-model frames are noisy, hence hard to encode)
    assert np.abs(png.astype(np.int16) - mp4.astype(np.int16)).mean() < 20


def test_seconds_gives_fps_frames(model, preset, tmp_path, capsys):
    out = tmp_path / "one-second"
    generate(capsys, model, out, "--seconds", 1)
    assert len(png_frames(out)) == preset["fps"]


def test_default_length_and_path(model, preset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = cli(["--prompt", PROMPT, "--model", model, "--quiet"], capsys)
    assert rc == 0, err
    written = list((tmp_path / "outputs").glob("*.mp4"))
    assert len(written) == 1, written
    assert Path(stdout.splitlines()[0]).resolve() == written[0].resolve()
    assert len(mp4_frames(written[0])) == 5 * preset["fps"]


def test_stdout_path_then_timing_summary(model, tmp_path, capsys):
    out = tmp_path / "x.gif"
    stdout = generate(capsys, model, out, "--frames", 7)
    lines = stdout.splitlines()
    assert len(lines) >= 2, stdout
    assert Path(lines[0]) == out
    summary = lines[1]
    assert "frames/s" in summary and "first chunk" in summary, summary
    assert summary.startswith("7 frames"), summary


# --------------------------------------------------------------------------------------------------------------
# Prompt switching
# --------------------------------------------------------------------------------------------------------------


def test_switch_at_changes_only_frames_after_the_switch(model, tmp_path, capsys):
    # tiny: 2 latent frames a chunk -> chunks start at video frames 0, 5, 13, 21
    n, at = 21, 13
    generate(capsys, model, tmp_path / "one", "--frames", n)
    rc, _, err = cli(["--prompt", PROMPT, "--prompt", OTHER, "--switch-at", at, "--model", model,
                      "--frames", n, "--out", tmp_path / "two", "--quiet"], capsys)
    assert rc == 0, err
    one, two = png_frames(tmp_path / "one"), png_frames(tmp_path / "two")
    assert one.shape == two.shape == (n, 32, 32, 3)
    assert np.array_equal(one[:at], two[:at]), "frames before the switch must not change"
    assert not np.array_equal(one[at:], two[at:]), "the second prompt must change the frames after the switch"
    for i in range(at, n):
        assert not np.array_equal(one[i], two[i]), f"frame {i} is after the switch but unchanged"


def test_switch_takes_effect_at_next_chunk_boundary(model, tmp_path, capsys):
    # a switch at frame 10 (inside the chunk 5..12) waits for the chunk starting at 13
    for name, at in (("at10", 10), ("at13", 13)):
        rc, _, err = cli(["--prompt", PROMPT, "--prompt", OTHER, "--switch-at", at, "--model", model,
                          "--frames", 16, "--out", tmp_path / name, "--quiet"], capsys)
        assert rc == 0, err
    assert np.array_equal(png_frames(tmp_path / "at10"), png_frames(tmp_path / "at13"))


def test_two_frame_latent_groups_lengths_and_switch_boundary(tmp_path, capsys):
    """A VAE with 2 frames a latent frame (the shapes-t2 layout): chunks of 2 latent frames start at video
    frames 0, 3, 7, 11; lengths are exact and a switch waits for the next chunk."""
    import dataclasses

    from engine.config import get_preset
    from engine.folder import save_model_folder
    from engine.model import CausalWanModel
    from engine.text import ShapesTextConfig, ShapesTextEncoder
    from engine.vae import VideoVAE

    pr = get_preset("tiny")
    pr = pr.replace(vae=dataclasses.replace(pr.vae, temperal_downsample=(False, False, True), scale_factor_temporal=2))
    torch.manual_seed(0)
    folder = tmp_path / "t2"
    save_model_folder(folder, pr, CausalWanModel(pr.model), VideoVAE.from_config(pr.vae, seed=0),
                      ShapesTextEncoder(ShapesTextConfig(dim=pr.model.text_dim), seed=0), placeholder=True)
    for n in (1, 4, 9):
        generate(capsys, folder, tmp_path / f"n{n}", "--frames", n)
        assert png_frames(tmp_path / f"n{n}").shape == (n, 32, 32, 3)
    for name, at in (("at5", 5), ("at7", 7)):
        rc, _, err = cli(["--prompt", PROMPT, "--prompt", OTHER, "--switch-at", at, "--model", folder,
                          "--frames", 9, "--out", tmp_path / name, "--quiet"], capsys)
        assert rc == 0, err
    at5, at7, one = (png_frames(tmp_path / x) for x in ("at5", "at7", "n9"))
    assert np.array_equal(at5, at7) and np.array_equal(at7[:7], one[:7]) and not np.array_equal(at7[7:], one[7:])


# --------------------------------------------------------------------------------------------------------------
# Errors: exit 2, one line on stderr, nothing written
# --------------------------------------------------------------------------------------------------------------

# (case id, extra argv, --out relative to the tmp cwd)
BAD = [
    ("negative-frames", ["--frames", "-3"], "out.mp4"),
    ("zero-frames", ["--frames", "0"], "out.mp4"),
    ("zero-seconds", ["--seconds", "0"], "out.mp4"),
    ("nan-seconds", ["--seconds", "nan"], "out.mp4"),
    ("infinite-seconds", ["--seconds", "inf"], "out.mp4"),
    ("missing-model", ["--model", "no/such/model-folder"], "out.mp4"),
    ("out-under-a-file", [], "afile/x.mp4"),
    ("out-under-a-file-png", [], "afile/frames"),
    ("out-is-a-directory", [], "adir.mp4"),
    ("out-is-a-file-for-png", [], "afile"),
    ("two-prompts-no-switch", ["--prompt", OTHER], "out.mp4"),
    ("switch-without-prompt", ["--switch-at", "5"], "out.mp4"),
    ("switch-past-last-frame", ["--prompt", OTHER, "--switch-at", "9"], "out.mp4"),
    ("switch-far-past-last-frame", ["--prompt", OTHER, "--switch-at", "40"], "out.mp4"),
    ("unknown-flag", ["--no-such-flag"], "out.mp4"),
    ("unsupported-suffix", [], "out.avi"),
    ("bad-sink", ["--sink", "bogus"], "out.mp4"),
    ("bad-window", ["--window", "3"], "out.mp4"),
    ("zero-steps", ["--steps", "0"], "out.mp4"),
    ("too-many-steps", ["--steps", "9"], "out.mp4"),
    ("empty-prompt", ["--prompt", "", "--switch-at", "5"], "out.mp4"),
    ("frames-and-seconds", ["--frames", "9", "--seconds", "1"], "out.mp4"),
    ("frames-not-int", ["--frames", "many"], "out.mp4"),
]


def _bad_argv(model, extra, out):
    argv = ["--prompt", PROMPT, "--model", str(model), "--out", out]
    if "--frames" not in extra and "--seconds" not in extra:
        argv += ["--frames", "9"]  # tiny: chunks start at frames 0 and 5, last frame 8
    return argv + extra  # a --model in extra overrides the fixture's (argparse keeps the last one)


@pytest.fixture
def bad_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "adir.mp4").mkdir()
    return tmp_path


@pytest.mark.parametrize("extra,out", [pytest.param(e, o, id=i) for i, e, o in BAD])
def test_bad_arguments_exit_2_with_one_line(model, bad_cwd, capsys, extra, out):
    before = snapshot(bad_cwd)
    rc, stdout, err = cli(_bad_argv(model, extra, out), capsys)
    assert rc == 2, (rc, stdout, err)
    assert len(err.splitlines()) == 1 and err.endswith("\n"), repr(err)
    assert err.startswith("engine.generate: error: "), err
    assert "Traceback" not in err
    assert stdout == ""
    assert snapshot(bad_cwd) == before, "a failing run must not write anything"
    assert (bad_cwd / "afile").read_text() == "keep me\n"
    assert not (bad_cwd / "outputs").exists()


def test_bad_arguments_messages_say_what_is_wrong(model, bad_cwd, capsys):
    def err_of(extra, out="out.mp4"):
        rc, _, err = cli(_bad_argv(model, extra, out), capsys)
        assert rc == 2
        return err

    assert "-3" in err_of(["--frames", "-3"])
    assert "no/such/model-folder" in err_of(["--model", "no/such/model-folder"])
    assert "shapes" in err_of(["--model", "no/such/model-folder"])  # lists the built-in names
    assert "afile" in err_of([], "afile/x.mp4")
    assert "adir.mp4" in err_of([], "adir.mp4")
    assert "--switch-at" in err_of(["--prompt", OTHER])
    assert "9" in err_of(["--prompt", OTHER, "--switch-at", "9"])
    assert "--no-such-flag" in err_of(["--no-such-flag"])
    assert ".avi" in err_of([], "out.avi")
    assert "bogus" in err_of(["--sink", "bogus"])
    assert "--steps" in err_of(["--steps", "9"]) and "1..4" in err_of(["--steps", "9"])


SUBPROCESS_BAD = [
    ("unknown-flag", ["--no-such-flag"], "out.mp4"),
    ("missing-model", ["--model", "no/such/model-folder"], "out.mp4"),
    ("out-under-a-file", [], "afile/x.mp4"),
]


def test_bad_arguments_in_a_real_process(model, tmp_path):
    """The real `python -m engine.generate`: exit status 2, exactly one stderr line, no traceback."""
    (tmp_path / "afile").write_text("keep me\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for case, extra, out in SUBPROCESS_BAD:
        before = snapshot(tmp_path)
        p = subprocess.run([sys.executable, "-m", "engine.generate", *_bad_argv(model, extra, out)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (case, p.returncode, p.stderr)
        assert len(p.stderr.splitlines()) == 1, (case, p.stderr)
        assert "Traceback" not in p.stderr, case
        assert p.stderr.startswith("engine.generate: error: "), (case, p.stderr)
        assert p.stdout == "", (case, p.stdout)
        assert snapshot(tmp_path) == before, case


def test_unknown_word_warns_in_one_line_in_a_real_process(model, tmp_path):
    """A prompt word the model never saw: the video is still written, and stderr says so in one line that lists the
    known vocabulary (no Python source line, no traceback)."""
    p = subprocess.run([sys.executable, "-m", "engine.generate", "--prompt", "a red circel on a black background",
                        "--model", str(model), "--frames", "5", "--out", "w.gif"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    warned = [line for line in p.stderr.splitlines() if "circel" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "known vocabulary" in warned[0]
    assert "circle" in warned[0] and "Traceback" not in p.stderr and "encode(" not in p.stderr
    assert (tmp_path / "w.gif").is_file()
