"""python -m benchmarks.gpu: the streaming engine at Wan2.1-1.3B size on one GPU, decode included.

    python -m benchmarks.gpu --json benchmarks/results/gpu-wan2.1-1.3b.json --git-sha SHA
    python -m benchmarks.gpu --dry-run         # the same code on the CPU: tiny preset, fp32 (checks the script)

Random weights at the real widths (speed does not depend on the values): the `wan2.1-1.3b` preset (30 blocks,
dim 1536, 832x480, 3 latent frames = 12 video frames a chunk, 4 steps + the clean pass, EMA sink 3 + window 6
latent frames) and the Wan2.1 VAE (diffusers' AutoencoderKLWan at its default widths), streaming decode.
The prompt is a fixed [1, 512, 4096] embedding: umT5 runs once per prompt, not per chunk, and is not timed.

Every system streams the same 10 s (160 frames, seed 0) through `engine.pipeline.VideoGenerator`, the loop
behind generate and the server: once to warm up (allocator, cuDNN autotuning, compilation, graph capture), then
measured from a fresh stream. A system is `engine` (eager, dense SDPA) or `engine[a+b+...]` with options:
    graphs    steady-state forwards replayed as CUDA graphs (engine/accel.py)
    compile   regional torch.compile of the blocks and RoPE (engine/accel.py)
    cudnn     SDPA prefers cuDNN's attention kernel
    flash     SDPA prefers FlashAttention (torch 2.11 on an H200 picks cuDNN's by default)
    vae       the VAE decoder compiled (engine/accel.py)
    fpc3      the streaming decoder takes 3 latent frames per call instead of 1
    sparse    block-sparse window attention at 20% (Triton) + linear memory
    fp8       FP8 weights in the blocks (engine/fp8.py: torch._scaled_mm on compute capability 8.9+), on a copy
    preview   decode with the preview decoder (engine/preview.py) at taew2_1's widths instead of the Wan VAE
Reported per system: fps (decode included), fps without decode, first-frame latency (warm), per-chunk p50/p95,
stage means, one steady-state forward (CUDA events), peak GPU memory; the eager system's cold first chunk (the
first call in the process) and each system's warm-up time (compilation, capture). Checks, each system against
eager on the same seed: the clean latents of every chunk; with graphs, one replayed forward against the eager
forward on the same input and cache (this isolates the replay from the drift of a random-weight model); the
eager system against its own warm-up run (run-to-run determinism). First, the VAE's streaming decode alone
(ms per chunk) for each decoder variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks import git_sha
import kernels  # noqa: F401  (TRITON_INTERPRET on a CPU, before anything imports triton)
from engine import accel
from engine.config import get_preset
from engine.model import CausalWanModel
from engine.pipeline import VideoGenerator, _sync
from engine.preview import PreviewConfig, PreviewDecoder
from engine.vae import VideoVAE


class FixedText:
    """Stands in for the text encoder: one fixed prompt embedding."""

    def __init__(self, emb):
        self.emb = emb

    def encode(self, prompts):
        return self.emb


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            out["driver"] = None
    return out


def stream_once(gen: VideoGenerator, frames: int, device: str) -> tuple[dict, list[torch.Tensor]]:
    """One 10-s stream through the real loop; wall times per chunk and per stage; the clean latents."""
    cleans, chunk_ms, stages = [], [], {}
    it = gen.run([(0, "prompt")], frames, seed=0)
    n_frames, decode_ms = 0, 0.0
    _sync(device)
    t_start = t_prev = time.perf_counter()
    first_ms = None
    for chunk in it:
        _sync(device)
        now = time.perf_counter()
        chunk_ms.append((now - t_prev) * 1000)
        if first_ms is None:
            first_ms = (now - t_start) * 1000
        t_prev = now
        n_frames += len(chunk.frames)
        decode_ms += chunk.timings_ms.get("decode", 0.0)
        for k, v in chunk.timings_ms.items():
            stages.setdefault(k, []).append(v)
        cleans.append(gen.stream.window_latents[-1].clone() if gen.stream.window_latents else None)
    total = time.perf_counter() - t_start
    # window_latents holds the chunks committed so far: the last chunk is committed by the next call only
    cleans = cleans[1:]
    steady = chunk_ms[1:] or chunk_ms
    return {
        "frames": n_frames,
        "seconds": total,
        "fps": n_frames / total,
        "fps_without_decode": n_frames / (total - decode_ms / 1000),
        "first_frame_ms": first_ms,
        "chunk_ms": {"p50": float(np.percentile(steady, 50)), "p95": float(np.percentile(steady, 95)),
                     "all": [round(c, 2) for c in chunk_ms]},
        "stage_ms": {k: statistics.mean(v) for k, v in stages.items()},
    }, cleans


def forward_ms(gen: VideoGenerator, device: str, reps: int) -> float:
    """One steady-state forward of the chunk (the cache is full after a stream), median over reps."""
    s = gen.stream
    x = torch.randn(s.chunk_shape, generator=torch.Generator().manual_seed(1)).to(s.device, s.dtype)
    t = 1000.0 * 0.9375
    for _ in range(3):
        s.denoise(x, t)
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            s.denoise(x, t)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            s.denoise(x, t)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def chunk_diffs(a: list, b: list) -> dict:
    """Max |a - b| of the clean latents, chunk by chunk."""
    d = [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)]
    scale = max((x.float().abs().max().item() for x in a), default=1.0)
    return {"first_chunk": d[0] if d else None, "max": max(d) if d else None, "scale": scale, "per_chunk": d}


@torch.no_grad()
def replay_check(gen: VideoGenerator) -> dict:
    """One replayed forward against the eager forward on the same input and cache state (the cache is in
    steady state after a stream; a forward rewrites only the current slot, with the same K/V both times)."""
    s = gen.stream
    x = torch.randn(s.chunk_shape, generator=torch.Generator().manual_seed(4)).to(s.device, s.dtype)
    t = 1000.0 * 0.9375
    assert s.graphs.usable(x, t)
    c = s.cache
    cur = c._frames(c.S + c.W, c.S + c.W + c.C)
    replayed = s.denoise(x, t)
    k_replayed = c.k[:, :, cur].float().clone()  # every layer's keys of the chunk, as the replay wrote them
    tt = torch.full((s.batch,), t, dtype=torch.float32, device=s.device)
    eager = s.model(x, tt, text_kv=s.text_kv, ctx=c)
    k_diff = (c.k[:, :, cur].float() - k_replayed).flatten(1).abs().max(1).values.tolist()
    return {"max_abs_diff": (replayed.float() - eager.float()).abs().max().item(),
            "scale": eager.float().abs().max().item(),
            "first_layer_with_other_keys": next((i for i, d in enumerate(k_diff) if d > 0), None),
            "keys_max_abs_diff_per_layer": k_diff}


class sdpa_order:
    """SDPA prefers one kernel ("cudnn" or "flash"), then the others; None leaves torch's order."""

    def __init__(self, first: str | None):
        self.cm = None
        if first is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
            if first == "flash":
                order.reverse()
            order.append(SDPBackend.EFFICIENT_ATTENTION)
            try:
                self.cm = sdpa_kernel(order, set_priority=True)
            except TypeError:  # a torch without priorities: that kernel alone
                self.cm = sdpa_kernel(order[:1])

    def __enter__(self):
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc):
        if self.cm is not None:
            return self.cm.__exit__(*exc)


def conv_format(vae: VideoVAE, fmt):
    """Lay the decoder's 3D convolution weights out in `fmt` (cuDNN picks channels-last kernels for them)."""
    for mod in vae.vae.decoder.modules():
        if isinstance(mod, torch.nn.Conv3d):
            mod.weight.data = mod.weight.data.to(memory_format=fmt)


def decode_bench(vae: VideoVAE, preset, device: str, variants: list[str], backend: str, preview=None,
                 reps: int = 6) -> dict:
    """The streaming decode alone: ms per chunk (3 latent frames -> 12 frames) in steady state, per variant
    ("preview": the preview decoder instead of the VAE's)."""
    h, w = preset.latent_hw
    C = preset.cache.frames_per_chunk
    z = torch.randn(1, vae.z_dim, C * (reps + 2), h, w, generator=torch.Generator().manual_seed(3))
    z = z.to(device, vae.dtype)
    out = {}
    ref = None
    for name in variants:
        print(f"decode[{name}] ...", file=sys.stderr, flush=True)
        try:
            if name == "compile":
                accel.compile_decoder(vae, backend=backend)
            if name == "channels_last":
                conv_format(vae, torch.channels_last_3d)
            dec = preview.stream() if name == "preview" else vae.stream(3 if name == "fpc3" else 1)
            times, frames = [], []
            t_first = time.perf_counter()
            for i in range(reps + 2):
                _sync(device)
                t0 = time.perf_counter()
                frames.append(dec.decode(z[:, :, i * C:(i + 1) * C]))
                _sync(device)
                times.append((time.perf_counter() - t0) * 1000)
            video = torch.cat(frames, 2).float()
            if ref is None and name != "preview":
                ref = video
            out[name] = {"ms_per_chunk": statistics.median(times[2:]), "first_two_chunks_ms": times[:2],
                         "warm_s": time.perf_counter() - t_first,  # the preview is another decoder: no diff
                         "max_abs_diff_vs_first_variant": None if name == "preview" or ref is None
                         else (video - ref).abs().max().item()}
            print(f"  {out[name]['ms_per_chunk']:.1f} ms per chunk", file=sys.stderr, flush=True)
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            accel.reset_decoder(vae)
            if name == "channels_last":
                conv_format(vae, torch.contiguous_format)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--seconds", type=float, default=10.0, help="stream length per system (default 10)")
    p.add_argument("--systems", nargs="+", default=["engine", "graphs", "compile", "compile+graphs", "sparse",
                                                         "compile+preview"],
                   help="engine, or options joined by + (see the module doc)")
    p.add_argument("--decode-variants", nargs="*", default=["eager", "fpc3", "channels_last", "compile", "preview"],
                   choices=["eager", "fpc3", "channels_last", "compile", "preview", "none"],
                   help="VAE decoder variants timed alone first (none: skip); preview: the preview decoder")
    p.add_argument("--vae-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--git-sha", help="the commit measured (default: this checkout's; a device copy has no .git)")
    p.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU, fp32 (checks the script)")
    a = p.parse_args(argv)
    if a.dry_run:
        device, dtype, vae_dtype, a.preset = "cpu", torch.float32, torch.float32, "tiny"
        compile_backend = "aot_eager"
    elif not torch.cuda.is_available():
        p.error("no CUDA device (use --dry-run to check the script on a CPU)")
    else:
        device, dtype, vae_dtype, compile_backend = "cuda", torch.bfloat16, getattr(torch, a.vae_dtype), "inductor"
        torch.backends.cudnn.benchmark = True  # the VAE's 3D convolutions: pick the fastest algorithm once
    preset = get_preset(a.preset)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(preset.model)
    model = model.to(dtype).eval().requires_grad_(False)
    vae = VideoVAE.from_config(preset.vae)
    vae.vae.to(device, vae_dtype)
    emb = (torch.randn(1, 512, preset.model.text_dim, generator=torch.Generator().manual_seed(2)) * 0.1).to(device)
    # the preview decoder at TAEHV's taew2_1 widths (random weights: its speed does not depend on them)
    preview = PreviewDecoder(PreviewConfig.for_vae(preset.vae, channels=(256, 128, 64, 64), blocks=3))
    preview = preview.to(device, vae_dtype).eval().requires_grad_(False)
    m = SimpleNamespace(transformer=model, preset=preset, vae=vae, text=FixedText(emb), preview=preview)
    init_s = time.perf_counter() - t0
    frames = int(a.seconds * preset.fps)
    res = {
        "command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "git_sha": a.git_sha or git_sha(),
        "device": {"name": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
                   "type": device, "dtype": str(dtype).removeprefix("torch."),
                   "vae_dtype": str(vae_dtype).removeprefix("torch."), **versions()},
        "model": {"preset": preset.name, "weights": "random", "parameters": sum(x.numel() for x in model.parameters()),
                  "vae_parameters": sum(x.numel() for x in vae.vae.parameters()),
                  "resolution": [preset.width, preset.height], "fps": preset.fps,
                  "latent_frames_per_chunk": preset.cache.frames_per_chunk,
                  "video_frames_per_chunk": preset.cache.frames_per_chunk * vae.temporal,
                  "steps": len(preset.sampler.timesteps), "sink": preset.cache.sink,
                  "sink_frames": preset.cache.sink_frames, "window_frames": preset.cache.window_frames,
                  "text": "fixed [1, 512, text_dim] embedding (the text encoder runs once per prompt: not timed)",
                  "init_s": init_s},
        "stream_frames": frames,
        "systems": {},
        "checks": {},
    }
    print(f"{preset.name}: {res['model']['parameters'] / 1e9:.2f} B parameters on {res['device']['name']}",
          file=sys.stderr, flush=True)

    def write():
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(res, indent=2) + "\n")

    sparse_cfg = preset.sparse_cache(0.2, linear_memory=True)
    known = {"graphs", "compile", "cudnn", "flash", "vae", "fpc3", "sparse", "fp8", "preview"}
    for name in a.systems:
        if {"cudnn", "flash"} <= set(name.split("+")):
            p.error(f"--systems {name}: cudnn and flash are two orders of one preference, pick one")
    for name in a.systems:
        bad = set(name.split("+")) - known if name != "engine" else set()
        if bad:
            p.error(f"--systems {name}: unknown option(s) {', '.join(sorted(bad))}; expected engine or "
                    f"{'+'.join(sorted(known))}")
    variants = [v for v in a.decode_variants if v != "none"]  # `--decode-variants none` (or nothing): skip
    if variants:
        res["decode_ms_per_chunk"] = decode_bench(vae, preset, device, variants, compile_backend, preview)
        write()
    cleans = {}
    for name in a.systems:
        opts = set(name.split("+")) if name != "engine" else set()
        key = "engine" if name == "engine" else f"engine[{name}]"
        cache_cfg = sparse_cfg if "sparse" in opts else preset.cache
        print(f"{key} ...", file=sys.stderr, flush=True)
        gen = first_run = None
        try:
            if "compile" in opts:
                accel.compile_blocks(backend=compile_backend)
            if "vae" in opts:
                accel.compile_decoder(vae, backend=compile_backend)
            if "sparse" in opts and not model.has_linear_memory:
                model.enable_linear_memory()  # zero projections: a trained one's outputs differ, not its cost
            ms = m
            if "fp8" in opts:  # quantizing is in place: a copy, so the other systems keep their weights
                import copy

                from engine.fp8 import quantize_fp8, resolve_mode

                ms = SimpleNamespace(**{**vars(m), "transformer": copy.deepcopy(model)})
                r_fp8 = {"fp8_linears": quantize_fp8(ms.transformer), "fp8_mode": resolve_mode("auto", device)}
            gen = VideoGenerator(ms, cache_cfg=cache_cfg, cuda_graphs="graphs" in opts,
                                 decoder_frames_per_call=3 if "fpc3" in opts else 1, preview="preview" in opts)
            with sdpa_order(("cudnn" if "cudnn" in opts else "flash" if "flash" in opts else None)
                            if device == "cuda" else None):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                _sync(device)
                t = time.perf_counter()
                first_run, first_cl = stream_once(gen, frames, device)  # warm-up: compile, capture, autotune
                warm_s = time.perf_counter() - t
                r, cl = stream_once(gen, frames, device)
                r["warmup_run_s"] = warm_s
                r["warmup_first_chunk_ms"] = first_run["first_frame_ms"]
                r["forward_ms"] = forward_ms(gen, device, reps=10 if device == "cuda" else 2)
                r["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
                if gen.stream.graphs is not None:
                    r["graphs_captured"] = gen.stream.graphs.captures
                    r["replay_vs_eager_forward"] = replay_check(gen)
            r["options"] = sorted(opts)
            if "fp8" in opts:
                r.update(r_fp8)
            r["cache"] = {k: getattr(cache_cfg, k) for k in ("sink", "sink_frames", "window_frames",
                                                             "sparse_topk", "sparse_block", "linear_memory")}
            if name == "engine":
                r["cold_first_chunk_ms"] = first_run["first_frame_ms"]  # the first call in this process
                r["repeat_vs_warmup_run"] = chunk_diffs(cl, first_cl)
            cleans[name] = cl
            res["systems"][key] = r
            print(f"  fps {r['fps']:.1f} (no decode {r['fps_without_decode']:.1f}), first frame "
                  f"{r['first_frame_ms']:.0f} ms, chunk p50 {r['chunk_ms']['p50']:.0f} ms, forward "
                  f"{r['forward_ms']:.1f} ms, stages " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_ms"].items()),
                  file=sys.stderr, flush=True)
        except Exception as e:  # one failing system must not lose the others' numbers
            res["systems"][key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            accel.reset_compiled()
            accel.reset_decoder(vae)
            del gen
            ms = None
            if device == "cuda":
                torch.cuda.empty_cache()
        write()
    for name in cleans:
        if name != "engine" and "engine" in cleans:
            res["checks"][f"{name}_vs_eager_clean_latents"] = chunk_diffs(cleans[name], cleans["engine"])
    write()
    print(json.dumps(res.get("decode_ms_per_chunk"), indent=1))
    print(json.dumps({k: {f: v.get(f) for f in ("fps", "fps_without_decode", "first_frame_ms", "forward_ms",
                                                  "peak_memory_mb", "replay_vs_eager_forward", "error")}
                      for k, v in res["systems"].items()}, indent=1))
    print(json.dumps({k: {f: v[f] for f in ("first_chunk", "max", "scale")} for k, v in res["checks"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
