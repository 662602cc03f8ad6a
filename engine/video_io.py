"""Incremental video writers for streamed generation.

Frames arrive chunk by chunk while a stream generates, so every writer takes
``write(frames)`` calls with uint8 ``[T, H, W, 3]`` RGB chunks and finishes on
``close()``.  ``open_writer`` picks the writer from the destination path:

* ``*.mp4``  -> H.264 (libx264, yuv420p) via PyAV, encoded as frames arrive.
* ``*.gif``  -> animated GIF via Pillow (frames are buffered, written on close).
* no suffix, or an existing directory -> a folder of ``frame_000000.png`` ...

Design points:

* Destinations are checked in ``open_writer`` -- before any frame is generated --
  so a bad path fails in milliseconds, not after minutes of sampling.  All such
  failures are a one-line ``ValueError("cannot write to <path>: <reason>")``.
* Files are written atomically: data goes to a hidden temporary file next to
  the target (``.<stem>.partial<suffix>``) which is ``os.replace``-d onto the
  target on ``close()``.  An interrupted run never leaves a truncated file at
  the target, and an exception inside ``with open_writer(...)`` removes the
  temporary file.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

__all__ = ["VideoWriter", "open_writer", "frames_to_uint8", "SUPPORTED"]

SUPPORTED = "'.mp4' (H.264), '.gif', or a directory / suffix-less path (PNG frames)"


# --------------------------------------------------------------------------- #
# Base class
# --------------------------------------------------------------------------- #
class VideoWriter:
    """Base incremental writer.

    Subclasses implement ``_write(frames)`` (frames already validated,
    uint8 ``[T, H, W, 3]`` C-contiguous), ``_finish() -> Path`` and
    ``_abort()`` (discard partial output after an error).
    """

    def __init__(self, path: Path, fps: int, width: int, height: int):
        self.path = Path(path)
        self.fps = fps
        self.width = width
        self.height = height
        self.frames_written = 0
        self._closed = False
        self._result: Path | None = None

    # -- public API --------------------------------------------------------- #
    def write(self, frames: np.ndarray) -> None:
        """Append a chunk of frames, uint8 ``[T, H, W, 3]`` RGB with T >= 1."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is already closed")
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise TypeError("frames must be a uint8 numpy array [T, H, W, 3]")
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[1:] != expected:
            raise ValueError(
                f"frames must have shape [T>=1, {self.height}, {self.width}, 3], "
                f"got {list(frames.shape)}"
            )
        self._write(np.ascontiguousarray(frames))
        self.frames_written += frames.shape[0]

    def close(self) -> Path:
        """Finish the output and return its final path (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._result = self._finish()
            except BaseException:
                self._abort()
                raise
        assert self._result is not None
        return self._result

    def abort(self) -> None:
        """Discard partial output (temporary files); the target is untouched."""
        if not self._closed:
            self._closed = True
            self._abort()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # never publish a half-written video

    # -- subclass hooks ----------------------------------------------------- #
    def _write(self, frames: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> Path:
        raise NotImplementedError

    def _abort(self) -> None:
        pass


def _partial_path(target: Path) -> Path:
    # Same directory (so os.replace is an atomic rename, never a cross-device
    # copy) and same suffix (so format detection by extension still works).
    return target.with_name(f".{target.stem}.partial{target.suffix}")


def _remove(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- #
# MP4 / H.264
# --------------------------------------------------------------------------- #
class Mp4Writer(VideoWriter):
    """H.264 in MP4, encoded incrementally with PyAV/libx264.

    yuv420p subsamples chroma 2x2, so libx264 requires even width and height.
    Odd sizes are padded by one pixel on the right / bottom by replicating the
    edge column / row (``np.pad(mode="edge")``); the file is then
    ``ceil_even(width) x ceil_even(height)``.
    """

    def __init__(self, path: Path, fps: int, width: int, height: int):
        super().__init__(path, fps, width, height)
        import av  # local import: only MP4 output needs PyAV

        self._pad_w = width % 2
        self._pad_h = height % 2
        self._tmp = _partial_path(self.path)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        try:
            stream = self._container.add_stream("libx264", rate=Fraction(fps))
            stream.width = width + self._pad_w
            stream.height = height + self._pad_h
            stream.pix_fmt = "yuv420p"
            # crf 18: visually near-lossless; veryfast keeps up with generation;
            # zerolatency disables lookahead / B-frame buffering so packets are
            # emitted (and muxed) as chunks arrive instead of piling up.
            stream.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
            stream.codec_context.time_base = Fraction(1, fps)
        except BaseException:
            self._abort()
            raise
        self._stream = stream

    def _write(self, frames: np.ndarray) -> None:
        import av

        if self._pad_w or self._pad_h:
            # [T, H, W, 3] -> [T, H + pad_h, W + pad_w, 3], edge-replicated.
            frames = np.pad(frames, ((0, 0), (0, self._pad_h), (0, self._pad_w), (0, 0)), mode="edge")
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = self.frames_written + i  # in units of time_base = 1/fps
            self._container.mux(self._stream.encode(frame))

    def _finish(self) -> Path:
        self._container.mux(self._stream.encode())  # flush the encoder
        self._container.close()
        os.replace(self._tmp, self.path)
        return self.path

    def _abort(self) -> None:
        try:
            self._container.close()
        except Exception:
            pass  # container may be in a broken state; we discard it anyway
        _remove(self._tmp)


# --------------------------------------------------------------------------- #
# GIF
# --------------------------------------------------------------------------- #
class GifWriter(VideoWriter):
    """Animated GIF via Pillow.

    GIF is written in one pass, so frames are buffered in memory until
    ``close()``.  Each frame lasts ``round(1000 / fps)`` ms (GIF timing is in
    10 ms units, so most fps are approximate); ``loop=0`` repeats forever.
    Pillow may merge identical consecutive frames (summing their durations).
    """

    def __init__(self, path: Path, fps: int, width: int, height: int):
        super().__init__(path, fps, width, height)
        self._tmp = _partial_path(self.path)
        self._frames: list[np.ndarray] = []  # each [H, W, 3] uint8

    def _write(self, frames: np.ndarray) -> None:
        self._frames.extend(frames.copy())  # copy: caller may reuse its buffer

    def _finish(self) -> Path:
        from PIL import Image

        if not self._frames:
            raise ValueError(f"cannot write {self.path}: no frames were written")
        images = [Image.fromarray(f) for f in self._frames]
        images[0].save(
            self._tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=round(1000 / self.fps),
            loop=0,
        )
        self._frames.clear()
        os.replace(self._tmp, self.path)
        return self.path

    def _abort(self) -> None:
        self._frames.clear()
        _remove(self._tmp)


# --------------------------------------------------------------------------- #
# PNG folder
# --------------------------------------------------------------------------- #
class PngDirWriter(VideoWriter):
    """A directory of ``frame_000000.png``, ``frame_000001.png``, ...

    Each frame is written as soon as it arrives (lossless, pixel-exact).  Every
    PNG is itself written atomically (temp file + ``os.replace``), but frames
    already written stay in place if the run is aborted.  Existing files in the
    directory are not removed.
    """

    def _write(self, frames: np.ndarray) -> None:
        from PIL import Image

        for i, rgb in enumerate(frames):
            name = f"frame_{self.frames_written + i:06d}.png"
            tmp = self.path / f".{name}.partial.png"
            Image.fromarray(rgb).save(tmp, format="PNG")
            os.replace(tmp, self.path / name)

    def _finish(self) -> Path:
        return self.path


# --------------------------------------------------------------------------- #
# Factory
# --------------------------------------------------------------------------- #
def _ensure_writable_dir(directory: Path, path: Path) -> None:
    """Create ``directory`` (with parents) and prove we can create files in it.

    Raises a one-line ``ValueError("cannot write to <path>: <reason>")``.
    """
    # Find the nearest existing ancestor, to give a precise reason when a
    # component of the path is a regular file.
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot write to {path}: '{probe}' is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write to {path}: cannot create '{directory}' ({e.strerror or e})") from None
    # os.access is only advisory (it ignores e.g. read-only mounts, and is
    # always true for root), so actually create and delete a file.
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(f"cannot write to {path}: directory '{directory}' is not writable ({e.strerror or e})") from None


def open_writer(path: str | os.PathLike, fps: int, width: int, height: int) -> VideoWriter:
    """Open an incremental writer; the kind is chosen from ``path``.

    ``*.mp4`` -> H.264, ``*.gif`` -> GIF, no suffix or an existing directory ->
    PNG folder.  Any other suffix raises ``ValueError``.  The destination is
    validated (and missing parent directories created) here, before any frames
    exist, so unwritable paths fail early with a one-line ``ValueError``.
    """
    path = Path(path).expanduser()
    if int(fps) != fps or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    fps = int(fps)

    suffix = path.suffix.lower()
    if suffix in (".mp4", ".gif"):
        if path.is_dir():
            raise ValueError(f"cannot write to {path}: is an existing directory, expected a {suffix} file")
        _ensure_writable_dir(path.parent, path)
        cls = Mp4Writer if suffix == ".mp4" else GifWriter
        return cls(path, fps, width, height)
    if suffix == "" or path.is_dir():
        if path.exists() and not path.is_dir():
            raise ValueError(f"cannot write to {path}: is an existing file, expected a directory for PNG frames")
        _ensure_writable_dir(path, path)
        return PngDirWriter(path, fps, width, height)
    raise ValueError(f"unsupported output {str(path)!r}: supported are {SUPPORTED}")


# --------------------------------------------------------------------------- #
# Tensor -> frames
# --------------------------------------------------------------------------- #
def frames_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded video ``[1, 3, T, H, W]`` or ``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]``.

    Values outside [-1, 1] are clamped; -1 -> 0, 1 -> 255.
    """
    if x.dim() == 5:
        if x.shape[0] != 1:
            raise ValueError(f"expected batch size 1, got shape {list(x.shape)}")
        x = x[0]
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"expected [1, 3, T, H, W] or [3, T, H, W], got {list(x.shape)}")
    # float32 first: bf16/fp16 cannot represent all of 0..255 exactly after *127.5.
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    # [3, T, H, W] -> [T, H, W, 3] (channels-last, as image/video libraries expect)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
