"""engine/accel.py on the CPU: regional compilation equals eager and compiles once for all blocks; the CUDA-graph
option is a no-op off CUDA and refused by the CLI; a (fake) graph capture keeps alive every tensor it reads. (Graph
replay itself needs a GPU: benchmarks/gpu.py checks it against eager there.)"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from engine import accel
from engine.config import get_preset
from engine.model import CausalWanModel
from engine.stream import Stream


def stream_chunks(model, preset, text, n, seed):
    s = Stream(model, preset, cuda_graphs=True)  # ignored on the CPU
    assert s.graphs is None
    s.set_prompt(text)
    g = torch.Generator().manual_seed(seed)
    return [s.next_chunk(g) for _ in range(n)]


@pytest.fixture
def restore_eager():
    yield
    accel.reset_compiled()
    torch._dynamo.reset()


def test_compiled_blocks_equal_eager_and_compile_once_for_all_blocks(restore_eager):
    import torch._dynamo.utils as dyn

    seed = int.from_bytes(os.urandom(2), "little")
    base = get_preset("tiny")
    graphs = {}
    for layers in (2, 5):
        preset = base.replace(model=dataclasses.replace(base.model, num_layers=layers))
        torch.manual_seed(seed)
        model = CausalWanModel(preset.model).eval().requires_grad_(False)
        text = torch.randn(1, 7, preset.model.text_dim)
        accel.reset_compiled()
        want = stream_chunks(model, preset, text, 5, seed)  # past the window: eviction and the EMA sink in play
        torch._dynamo.reset()
        dyn.counters.clear()
        accel.compile_blocks(backend="aot_eager")
        assert accel.is_compiled()
        got = stream_chunks(model, preset, text, 5, seed)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")
        graphs[layers] = dyn.counters["stats"]["unique_graphs"]
    assert graphs[2] > 0
    assert graphs[5] == graphs[2], f"compiled graphs grow with the number of blocks: {graphs}"
    accel.reset_compiled()
    assert not accel.is_compiled()


@pytest.fixture
def tiny_folder_and_traced_compile(tmp_path, monkeypatch, restore_eager):
    """A tiny random model folder, and compile_blocks patched to trace with aot_eager (inductor on a CPU costs
    minutes) while recording the backend it was asked for."""
    from engine.init_model import random_model_folder

    model = tmp_path / "m"
    random_model_folder("tiny", model, seed=0, weights_dtype=torch.float32)
    calls = []
    real = accel.compile_blocks

    def traced(backend="inductor", mode=None):
        calls.append(backend)
        real(backend="aot_eager")

    def traced_decoder(vae, backend="inductor", mode=None):
        calls.append(f"decoder:{backend}")
        real_decoder(vae, backend="aot_eager")

    real_decoder = accel.compile_decoder
    monkeypatch.setattr(accel, "compile_blocks", traced)
    monkeypatch.setattr(accel, "compile_decoder", traced_decoder)
    return model, calls


def test_generate_compile_flag_compiles_and_gives_the_same_video(tmp_path, tiny_folder_and_traced_compile):
    import numpy as np
    from PIL import Image

    from engine.generate import main

    model, calls = tiny_folder_and_traced_compile
    videos = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        assert main(["--prompt", "a red circle", "--frames", "13", "--model", str(model), "--out", str(out),
                     "--device", "cpu", "--quiet", *extra]) == 0
        videos[name] = np.stack([np.asarray(Image.open(f)) for f in sorted(out.glob("*.png"))])
        accel.reset_compiled()
    # generate --compile compiles the blocks, and the decoder only where that pays: not on a CPU (engine/accel.py)
    assert calls == ["inductor"]
    assert videos["eager"].shape == (13, 32, 32, 3)
    assert np.abs(videos["eager"].astype(int) - videos["compiled"].astype(int)).max() <= 1


def test_the_decoder_is_compiled_only_where_its_cpu_fast_paths_do_not_apply():
    from engine.vae import VideoVAE

    vae = VideoVAE.from_config(get_preset("tiny").vae)
    assert not accel.decoder_gains_from_compile(vae)  # a CPU with the fast paths: eager is as fast
    vae.fast_cpu = False
    assert accel.decoder_gains_from_compile(vae)


def test_gpu_benchmark_dry_run_writes_every_system(tmp_path, restore_eager):
    from benchmarks.gpu import main

    out = tmp_path / "gpu.json"
    assert main(["--dry-run", "--seconds", "1.5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["preset"] == "tiny" and res["device"]["type"] == "cpu"
    assert res["git_sha"] and res["git_sha"] != "unknown"  # this checkout's, with no --git-sha
    assert set(res["systems"]) == {"engine", "engine[graphs]", "engine[compile]", "engine[compile+graphs]",
                                   "engine[sparse]", "engine[compile+preview]"}
    for name, r in res["systems"].items():
        assert "error" not in r, (name, r)
        assert r["frames"] == 24 and r["fps"] > 0 and r["fps_without_decode"] >= r["fps"]
        assert r["chunk_ms"]["p95"] >= r["chunk_ms"]["p50"] > 0
        assert set(r["stage_ms"]) >= {"denoise", "decode", "context"}
    # on the CPU the graph option is a no-op and aot_eager traces the same ops: identical latents
    assert res["checks"]["compile_vs_eager_clean_latents"]["max"] == 0.0
    assert res["checks"]["graphs_vs_eager_clean_latents"]["max"] == 0.0
    assert res["systems"]["engine"]["repeat_vs_warmup_run"]["max"] == 0.0
    # the preview system decodes with the other decoder: the same latents, its own frames
    assert res["checks"]["compile+preview_vs_eager_clean_latents"]["max"] == 0.0
    dec = res["decode_ms_per_chunk"]
    assert set(dec) == {"eager", "fpc3", "channels_last", "compile", "preview"}
    for name, r in dec.items():
        assert "error" not in r and r["ms_per_chunk"] > 0, (name, r)
        if name != "preview":
            assert r["max_abs_diff_vs_first_variant"] < 1e-4, (name, r)


def test_gpu_benchmark_rejects_unknown_options():
    from benchmarks.gpu import main

    with pytest.raises(SystemExit) as e:
        main(["--dry-run", "--systems", "compile+turbo"])
    assert e.value.code == 2


@pytest.mark.parametrize("preset", ["tiny", "shapes"])
def test_decoder_frames_per_call_and_compiled_decoder_equal_the_plain_stream(preset, restore_eager):
    from engine.vae import VideoVAE

    seed = int.from_bytes(os.urandom(2), "little")
    pr = get_preset(preset)
    vae = VideoVAE.from_config(pr.vae, seed=seed)
    h, w = pr.latent_hw
    z = torch.randn(1, pr.vae.z_dim, 7, h, w, generator=torch.Generator().manual_seed(seed))
    chunks = [z[:, :, :3], z[:, :, 3:5], z[:, :, 5:]]  # odd sizes: a group may straddle chunks

    def decode(fpc):
        dec = vae.stream(fpc)
        return torch.cat([dec.decode(c) for c in chunks], 2)

    want = vae.decode(z)
    # other frame groupings reorder fp32 sums: up to ~2e-5 seen (seed 112, fpc 2) on outputs in [-1, 1]
    for fpc in (1, 2, 3):
        torch.testing.assert_close(decode(fpc), want, atol=1e-4, rtol=1e-5, msg=f"seed={seed} fpc={fpc}")
    accel.compile_decoder(vae, backend="aot_eager")
    torch.testing.assert_close(decode(1), want, atol=1e-5, rtol=1e-5, msg=f"seed={seed} compiled")
    accel.reset_decoder(vae)
    assert vae.vae.decoder._compiled_call_impl is None
    with pytest.raises(ValueError):
        vae.stream(0)


def test_server_compile_flag_compiles_and_batched_sessions_get_the_same_frames(tiny_folder_and_traced_compile):
    import numpy as np

    from server.__main__ import build_parser, engine_backend
    from server.backend import SessionSpec, Work

    model, calls = tiny_folder_and_traced_compile
    parser = build_parser()
    frames = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        backend = engine_backend(parser.parse_args(["--model", str(model), "--device", "cpu", *extra]), parser)
        assert accel.is_compiled() == (name == "compiled")
        states = [backend.open(SessionSpec(p, seed)) for p, seed in (("a red circle", 0), ("a blue square", 1))]
        out = [backend.step([Work(s) for s in states]) for _ in range(3)]  # two sessions, batched
        frames[name] = np.stack([np.concatenate([step[i].frames for step in out]) for i in range(2)])
        accel.reset_compiled()
    assert calls == ["inductor"]
    assert np.abs(frames["eager"].astype(int) - frames["compiled"].astype(int)).max() <= 1


def test_gpu_benchmark_dry_run_fp8_system_quantizes_a_copy(tmp_path, restore_eager):
    from benchmarks.gpu import main

    out = tmp_path / "gpu.json"
    assert main(["--dry-run", "--seconds", "1", "--json", str(out), "--systems", "fp8", "engine",
                 "--decode-variants"]) == 0
    res = json.loads(out.read_text())
    r = res["systems"]["engine[fp8]"]
    assert "error" not in r, r
    assert r["fp8_linears"] == 20 and r["fp8_mode"] == "weight_only" and r["fps"] > 0  # tiny: 2 blocks x 10
    # eager ran after it on the original weights: the FP8 copy's latents differ from them, a little
    d = res["checks"]["fp8_vs_eager_clean_latents"]
    assert 0 < d["max"] < 0.5, d


@pytest.mark.parametrize("sink", ["ema", "static", "none"])
def test_steady_warmup_reaches_the_shapes_every_later_chunk_sees(sink):
    """warmup(steady=True), what compiled runs get, streams until the cache layout stops changing: every chunk
    after it sees the layout of its last chunk, so compilation happens in the warm-up, not in the stream."""
    from engine.folder import load_model_folder
    from engine.init_model import random_model_folder
    from engine.pipeline import VideoGenerator, steady_chunks
    from server.batching import phase

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        random_model_folder("tiny", d, seed=0, weights_dtype=torch.float32)
        model = load_model_folder(d)
    cfg = dataclasses.replace(model.preset.cache, sink=sink)
    gen = VideoGenerator(model, cache_cfg=cfg)
    layouts, real_sample = [], gen.stream.sample_chunk

    def sample(*a, **k):
        layouts.append(phase(gen.stream.cache))
        return real_sample(*a, **k)

    gen.stream.sample_chunk = sample
    gen.warmup(steady=True)
    n = steady_chunks(cfg)
    assert len(layouts) == n and phase(gen.stream.cache)[:2] == (0, 0)  # and the stream is reset
    warm = layouts[-1]
    layouts.clear()
    for _ in gen.run([(0, "a red circle")], gen.frames_for_chunks(n + 3)):
        pass
    assert layouts[n - 1:] == [warm] * 4, layouts  # from the warm-up's last chunk on, one layout
    assert layouts[n - 3] != warm or sink == "none", layouts  # and not much longer than needed
    gen.warmup()  # not compiled: one chunk
    assert len(layouts) == n + 4


class _ReadRecorder(torch.overrides.TorchFunctionMode):
    """Inside a (fake) CUDA-graph capture: weak references to every tensor an op reads that was not made inside
    the capture. A real graph replays its kernels on those tensors' raw addresses, so each must outlive it."""

    def __init__(self):
        super().__init__()
        self.made, self.read = set(), {}
        self.keep = []  # what the capture made, held while it runs so that ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        kwargs = kwargs or {}
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and id(a) not in self.made and id(a) not in self.read:
                self.read[id(a)] = (weakref.ref(a), tuple(a.shape), getattr(func, "__name__", str(func)))
        out = func(*args, **kwargs)
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.made.add(id(o))
                self.keep.append(o)
        return out


def test_graph_capture_keeps_alive_every_tensor_the_captured_forward_reads(monkeypatch):
    """GraphedForward._capture under a fake torch.cuda graph API (this CPU has none): every tensor the captured
    forward reads and did not make must still be alive after the capture, or a replay reads freed memory. (It
    once built the timestep tensor inside _capture and kept nothing of it: the suspected cause of the wrong
    replays measured on an H200.)"""
    import contextlib
    import gc

    recorders = []

    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeGraph:
        def pool(self):
            return None

    @contextlib.contextmanager
    def fake_graph(g, pool=None):
        rec = _ReadRecorder()
        recorders.append(rec)
        with rec:
            yield
        rec.keep.clear()  # what the capture made lives in the graph's pool in reality; here it may go

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)

    seed = int.from_bytes(os.urandom(2), "little")
    preset = get_preset("tiny")
    torch.manual_seed(seed)
    model = CausalWanModel(preset.model).eval().requires_grad_(False)
    s = Stream(model, preset)
    s.set_prompt(torch.randn(1, 5, preset.model.text_dim))
    g = torch.Generator().manual_seed(seed)
    while not (s.cache.sink_frames == s.cache.S and s.cache.window_frames == s.cache.W):
        s.next_chunk(g)
    graphed = accel.GraphedForward(s)
    x = torch.randn(s.chunk_shape, generator=g)
    with torch.no_grad():
        graphed._sync_text()
        want = s.model(x, torch.full((1,), 750.0), text_kv=s.text_kv, ctx=s.cache)
        got = graphed._capture(x, 750.0)  # the warm-up's result: the call's real output
    torch.testing.assert_close(got, want, msg=f"seed={seed}")
    gc.collect()
    (rec,) = recorders
    assert len(rec.read) > 10  # it saw the forward: parameters, the cache, the inputs
    dead = [(shape, op) for ref, shape, op in rec.read.values() if ref() is None]
    assert not dead, f"the captured forward reads tensors freed after the capture (shape, first op): {dead}"
