"""Tests for engine.video_io (CPU, fast)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from engine.video_io import VideoWriter, frames_to_uint8, open_writer


def smooth_frames(t: int, h: int, w: int, start: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: moving colour gradients (smooth, so H.264 error is small)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.empty((t, h, w, 3), np.float64)
    for i in range(t):
        phase = (start + i) / 12.0
        out[i, ..., 0] = xx
        out[i, ..., 1] = yy
        out[i, ..., 2] = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy + phase) / 2)
    return (out * 220 + 16).round().astype(np.uint8)


def decode_mp4(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        codec, w, h = s.codec_context.name, s.codec_context.width, s.codec_context.height
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
    return codec, w, h, frames


def test_mp4_round_trip_two_chunks(tmp_path):
    a, b = smooth_frames(5, 48, 64), smooth_frames(7, 48, 64, start=5)
    target = tmp_path / "out.mp4"
    with open_writer(target, fps=16, width=64, height=48) as w:
        assert isinstance(w, VideoWriter)
        w.write(a)
        w.write(b)
        assert w.frames_written == 12
    assert w.close() == target  # idempotent after the with block closed it
    assert target.is_file()
    assert not list(tmp_path.glob(".*partial*"))

    codec, width, height, got = decode_mp4(target)
    assert codec == "h264"
    assert (width, height) == (64, 48)
    assert got.shape == (12, 48, 64, 3)
    err = np.abs(got.astype(np.int16) - np.concatenate([a, b]).astype(np.int16)).mean()
    assert err < 10, err
    with av.open(str(target)) as c:
        assert c.streams.video[0].average_rate == 16


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_frames(4, 47, 63)
    target = tmp_path / "odd.mp4"
    with open_writer(target, fps=16, width=63, height=47) as w:
        w.write(frames)
    codec, width, height, got = decode_mp4(target)
    assert codec == "h264"
    assert (width, height) == (64, 48)
    assert got.shape == (4, 48, 64, 3)
    # The original region round-trips; the padding replicates the edge.
    assert np.abs(got[:, :47, :63].astype(np.int16) - frames.astype(np.int16)).mean() < 10
    assert np.abs(got[:, :, 63].astype(np.int16) - got[:, :, 62].astype(np.int16)).mean() < 10


def test_gif_round_trip(tmp_path):
    target = tmp_path / "anim.gif"
    with open_writer(target, fps=10, width=40, height=30) as w:
        w.write(smooth_frames(3, 30, 40))
        w.write(smooth_frames(4, 30, 40, start=3))
    with Image.open(target) as im:
        assert im.format == "GIF"
        assert im.size == (40, 30)
        assert im.n_frames == 7
        assert im.info["loop"] == 0
        assert im.info["duration"] == 100
        assert all(f.size == (40, 30) for f in ImageSequence.Iterator(im))
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("existing", [False, True])
def test_png_folder_round_trip(tmp_path, existing):
    target = tmp_path / ("existing.dir" if existing else "frames") / "sub"
    if existing:
        target.mkdir(parents=True)  # existing directory, even with a dotted name
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 9, 11, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    with open_writer(target, fps=8, width=11, height=9) as w:
        w.write(a)
        w.write(b)
    assert w.close() == target
    names = sorted(p.name for p in target.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(5)]
    got = np.stack([np.asarray(Image.open(target / n).convert("RGB")) for n in names])
    np.testing.assert_array_equal(got, np.concatenate([a, b]))


@pytest.mark.parametrize("name", ["out.avi", "notes.txt"])
def test_unsupported_suffix(tmp_path, name):
    with pytest.raises(ValueError) as ei:
        open_writer(tmp_path / name, fps=16, width=8, height=8)
    msg = str(ei.value)
    assert "\n" not in msg
    for kind in (".mp4", ".gif", "PNG"):
        assert kind in msg
    assert list(tmp_path.iterdir()) == []


def test_parent_is_regular_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for target in (blocker / "out.mp4", blocker / "deeper" / "out.gif", blocker / "frames"):
        with pytest.raises(ValueError, match=r"^cannot write to .*not a directory") as ei:
            open_writer(target, fps=16, width=8, height=8)
        assert "\n" not in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    assert blocker.read_text() == "x"


def test_existing_directory_for_mp4(tmp_path):
    target = tmp_path / "clip.mp4"
    target.mkdir()
    with pytest.raises(ValueError, match=r"^cannot write to .*existing directory"):
        open_writer(target, fps=16, width=8, height=8)
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_existing_file_for_png_folder(tmp_path):
    target = tmp_path / "frames"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"^cannot write to "):
        open_writer(target, fps=16, width=8, height=8)


def test_missing_parents_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "clip.mp4"
    w = open_writer(target, fps=16, width=16, height=16)
    assert target.parent.is_dir()
    w.write(smooth_frames(2, 16, 16))
    assert w.close() == target and target.is_file()


@pytest.mark.parametrize("name", ["boom.mp4", "boom.gif"])
def test_exception_in_with_block_leaves_nothing(tmp_path, name):
    target = tmp_path / name
    with pytest.raises(RuntimeError, match="generation failed"):
        with open_writer(target, fps=16, width=32, height=32) as w:
            w.write(smooth_frames(3, 32, 32))
            raise RuntimeError("generation failed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no partial file either


def test_exception_keeps_previous_target(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with open_writer(target, fps=16, width=16, height=16) as w:
            w.write(smooth_frames(1, 16, 16))
            raise RuntimeError
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_write_validates_shape_and_dtype(tmp_path):
    with open_writer(tmp_path / "v.gif", fps=16, width=8, height=6) as w:
        with pytest.raises(ValueError):
            w.write(np.zeros((1, 8, 6, 3), np.uint8))  # H and W swapped
        with pytest.raises(ValueError):
            w.write(np.zeros((0, 6, 8, 3), np.uint8))  # T == 0
        with pytest.raises(TypeError):
            w.write(np.zeros((1, 6, 8, 3), np.float32))
        w.write(np.zeros((1, 6, 8, 3), np.uint8))
        assert w.frames_written == 1


def test_frames_to_uint8():
    # [1, 3, T=2, H=1, W=3]; channel c of frame t holds known values.
    vals = torch.tensor([-1.0, 0.0, 1.0])
    x = torch.stack([torch.stack([vals, vals * 0.5, vals.flip(0)]) for _ in range(2)], dim=1)
    x = x[:, :, None, :].unsqueeze(0)  # [3, 2, 3] -> [1, 3, 2, 1, 3]
    assert x.shape == (1, 3, 2, 1, 3)
    out = frames_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 3, 3)
    # pixel w=0: R=-1 -> 0, G=-0.5 -> 64 (63.75 rounded), B=1 -> 255
    np.testing.assert_array_equal(out[0, 0, 0], [0, 64, 255])
    np.testing.assert_array_equal(out[1, 0, 2], [255, 191, 0])  # 191.25 -> 191
    # unbatched input, clamping out-of-range values, and bf16 input
    y = torch.full((3, 1, 2, 2), 5.0)
    y[1] = -7.0
    got = frames_to_uint8(y.to(torch.bfloat16))
    assert got.shape == (1, 2, 2, 3)
    assert (got[..., 0] == 255).all() and (got[..., 1] == 0).all()
    with pytest.raises(ValueError):
        frames_to_uint8(torch.zeros(2, 3, 1, 2, 2))
