"""python -m benchmarks: speed of the streaming engine, side by side with the no-cache baseline, in one run.

    python -m benchmarks --quick                    # < 2 min on a 2-core CPU
    python -m benchmarks --json results.json --plot results.png
    python -m benchmarks --preset tiny --quick      # a random model of a preset instead of the shipped one

Systems (same model, resolution, frame count, seed), each with the oracle's adherence to the prompt beside it:
  engine        the cached stream (rolling window + sink), decode included
  recompute     no KV cache: every forward re-runs the whole history (clean frames, block-causal) + the chunk
  wan_pipeline  diffusers' WanPipeline with the bidirectional teacher at its usual 30 CFG steps (--teacher;
                with --preset, a random teacher of that preset): what a user would otherwise run
  engine[native-vae]  the engine as it decoded before the VAE's CPU fast paths (engine/vae.py): PyTorch's own
                choice of convolution and RMS norm kernels, and one latent frame per decoder call (as diffusers)
  engine[...]   the engine under each other sink policy (none / static / ema), block-sparse attention at 20%
                density, linear memory, and both; at 2 denoising steps (steps=2); decoded by the model's fast
                preview decoder (preview, preview+steps=2: engine/preview.py, when the model has one); with
                --compile, with the transformer blocks (and on a GPU the VAE decoder) compiled by torch.compile (compile,
                compile+steps=2, compile+preview+steps=2)
Stages: text encode, each denoising forward (step_1 .. step_N) and the clean pass, VAE decode; then, on the
engine's frames, JPEG and H.264 encode and websocket transport on loopback (benchmarks/stages.py).
First-chunk latency is reported warm (after a warm-up pass, as a server would be) and cold (a fresh process).
Every system streams the same 10 s of video (--quick: 5 s, so that the run stays under 2 minutes even on a slow day of
this VM; --video-seconds overrides it).
Scaling: per-chunk cost, FPS and memory at stream positions 10 s, 60 s, 300 s, 600 s (quick: 10 s, 20 s). The
engine is streamed there for real; the recompute baseline is timed for a few chunks (quick: one) after its history
has been filled with clean latents of that length (its cost depends on the length, not on the values), and skipped
where its attention would not fit in this machine's memory (the JSON says how much it would need).
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks import git_sha
from benchmarks.oracle import adherence
from engine.cli import OneLineParser
from engine.folder import ModelLoadError, load_model_folder
from engine.pipeline import VideoGenerator, _sync

from benchmarks.stages import ForwardTimer, available_mb, peak_mb, reset_peak, rss_mb
from benchmarks.stages import delivery as stages_delivery

PROMPT = "a red circle bouncing on a black background"


def device_info(device: str, dtype: torch.dtype) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"name": name, "type": device, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(chunks_ms, stages, frames, seconds, first_ms):
    p50, p95 = (float(np.percentile(chunks_ms, q)) for q in (50, 95))
    return {"fps": frames / seconds, "frames": frames, "seconds": seconds, "first_frame_ms": first_ms,
            "chunk_ms": {"p50": p50, "p95": p95},
            "stage_ms": {k: float(np.mean(v)) for k, v in stages.items()},
            "fps_without_decode": frames / max(seconds - sum(stages.get("decode", [])) / 1000, 1e-9),
            "peak_memory_mb": peak_rss_mb()}


def stream_system(model, frames: int, recompute: bool, seed: int = 0, marks=(), score: bool = True,
                  cache_cfg=None, sampler_cfg=None, first_runs: int = 5, delivery: bool = False,
                  preview: bool = False, decoder_frames_per_call: int | None = None) -> tuple[dict, dict]:
    """Stream `frames` frames and time it; `marks` are frame counts at which to report the local FPS and the
    resident memory. With `score`, the result holds the oracle's adherence of the streamed video; with
    `delivery`, the JPEG / H.264 / websocket timings of its chunks (benchmarks/stages.py)."""
    gen = VideoGenerator(model, recompute=recompute, cache_cfg=cache_cfg, sampler_cfg=sampler_cfg, preview=preview,
                         decoder_frames_per_call=decoder_frames_per_call)
    t_warm = time.perf_counter()
    gen.warmup()
    t_warm = time.perf_counter() - t_warm
    timer = ForwardTimer(gen.stream, len(gen.stream.sampler_cfg.timesteps), lambda: _sync(gen.device))
    chunks_ms, stages, ends, video, rss = [], {}, [], [], {}
    t0 = time.perf_counter()
    first = None
    tc = t0
    for c in gen.run([(0, PROMPT)], frames, seed=seed):
        now = time.perf_counter()
        chunks_ms.append((now - tc) * 1000)
        tc = now
        if first is None:
            first = (now - t0) * 1000
        for k, v in c.timings_ms.items():
            stages.setdefault(k, []).append(v)
        end = c.first_frame + len(c.frames)
        ends.append((end, len(c.frames)))
        for m in marks:  # resident memory as the stream passes each mark
            if end >= m and m not in rss:
                rss[m] = rss_mb()
        if score or delivery:
            video.append(c.frames)
    total = time.perf_counter() - t0
    timer.remove()
    at = {}
    full = ends[min(1, len(ends) - 1)][1]  # frames of a whole chunk (the first one is shorter)
    for m in marks:  # speed at a stream position: median over the last 25 whole chunks that end by it
        ms = float(np.median([chunks_ms[i] for i, (end, n) in enumerate(ends) if end <= m and n == full][-25:]))
        at[m] = {"chunk_ms": ms, "fps": full / (ms / 1000), "rss_mb": rss[m], "state_mb": state_mb(gen.stream)}
    firsts = [first]
    for rep in range(first_runs - 1):  # first-chunk latency is noisy on a shared CPU: the median of fresh starts
        t0 = time.perf_counter()
        next(iter(gen.run([(0, PROMPT)], frames, seed=seed + 1 + rep)))
        firsts.append((time.perf_counter() - t0) * 1000)
    out = summarize(chunks_ms, stages, frames, total, float(np.median(firsts)))
    out["first_frame_ms_runs"] = firsts
    out["warmup_s"] = t_warm  # with --compile: the compilation
    out["steps"] = len(gen.stream.sampler_cfg.timesteps)
    out["forward_ms"] = timer.summary()
    if delivery:
        out["delivery_ms"] = stages_delivery(video, model.preset.fps)
        per_chunk = sum(out["delivery_ms"][k]["mean"] for k in ("jpeg_encode", "websocket"))
        out["fps_streamed"] = frames / (total + per_chunk * len(video) / 1000)
    if score:
        out["oracle"] = adherence([(np.concatenate(video), PROMPT)])
    return out, at


def state_mb(stream) -> float:
    """Memory the stream's state holds: the KV cache (fixed size) or, without one, the clean history."""
    if stream.cache is not None:
        ts = [t for t in vars(stream.cache).values() if isinstance(t, torch.Tensor)]  # k, v (+ linear memory)
    else:
        ts = list(stream.history)
    return sum(t.numel() * t.element_size() for t in ts) / 2**20


def recompute_at(model, frames_before: int, chunks: int = 2, seed: int = 0) -> dict:
    """Time the no-cache baseline at a stream position of `frames_before` frames.

    With chunks=0 only one forward is timed and a chunk is counted as (steps x forward + decode): the
    baseline's commit runs no forward. Used where one chunk would take minutes.
    """
    gen = VideoGenerator(model, recompute=True)
    st = gen.stream
    st.set_prompt(gen.embed(PROMPT))
    g = torch.Generator().manual_seed(seed)
    n_hist = max(0, gen.chunks_for_frames(frames_before) - 1)
    need = recompute_attention_mb(model, n_hist + 1)
    if need > 0.7 * available_mb():
        return {"skipped": f"its attention over {n_hist + 1} chunks needs ~{need / 1024:.1f} GB "
                           f"(this machine has {available_mb() / 1024:.1f} GB free)",
                "context_frames": n_hist * st.cache_cfg.frames_per_chunk, "attention_mb_estimate": need}
    reset_peak()
    st.history = [torch.randn(st.chunk_shape, generator=g).to(st.device, st.dtype) for _ in range(n_hist)]
    st.chunks = n_hist
    decoder = model.vae.stream(None)  # as the engine decodes: a chunk a call
    # move the decoder past its first-frame path, as it would be this far into a stream
    decoder.decode(torch.zeros(st.chunk_shape)[:, :, :1])
    times = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        clean = st.sample_chunk(g)
        st.commit(clean)
        frames = decoder.decode(clean).shape[2]
        times.append((time.perf_counter() - t0) * 1000)
    if not chunks:
        x = torch.randn(st.chunk_shape, generator=g).to(st.device, st.dtype)
        t0 = time.perf_counter()
        st.denoise(x, 500.0)
        fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = decoder.decode(x).shape[2]
        times.append((fwd * len(st.sampler_cfg.timesteps) + time.perf_counter() - t0) * 1000)
    ms = float(np.median(times))
    return {"chunk_ms": ms, "fps": frames / (ms / 1000), "context_frames": n_hist * st.cache_cfg.frames_per_chunk,
            "method": f"{chunks} chunks timed" if chunks else "one forward timed, x steps, + decode",
            "state_mb": state_mb(st), "peak_rss_mb": peak_mb()}


def recompute_attention_mb(model, n_chunks: int) -> float:
    """Rough working set of one no-cache forward over n_chunks chunks: the [L, L] mask and one layer's
    attention scores [heads, L, L] in float32 (the masked SDPA path materialises them on the CPU)."""
    cfg = model.transformer.cfg
    h, w = model.preset.latent_hw
    _, ph, pw = cfg.patch_size
    L = n_chunks * model.preset.cache.frames_per_chunk * (h // ph) * (w // pw)
    return (L * L * (1 + 4 * cfg.num_attention_heads)) / 2**20


@contextmanager
def native_vae(model):
    """The VAE without the engine's CPU fast paths (engine/vae.py `fast_cpu`): diffusers' modules as they are."""
    model.vae.fast_cpu = False
    try:
        yield
    finally:
        model.vae.fast_cpu = True


def engine_configs(base, model) -> dict:
    """The engine under each sink, sparse and linear option (the default config is the `engine` system)."""
    from dataclasses import replace

    block = replace(model.preset, cache=base).sparse_cache().sparse_block  # a few blocks per chunk on small grids
    opts = {"sink=none": dict(sink="none"), "sink=static": dict(sink="static"), "sink=ema": dict(sink="ema"),
            "sparse=0.2": dict(sparse_topk=0.2, sparse_block=block), "linear": dict(linear_memory=True),
            "sparse=0.2+linear": dict(sparse_topk=0.2, sparse_block=block, linear_memory=True)}
    out = {}
    for name, kw in opts.items():
        cfg = replace(base, **kw)
        if cfg != base:
            out[f"engine[{name}]"] = cfg
    return out


def variant_systems(preset, compiled: bool, preview: bool = False) -> list:
    """(name, sampler config, compiled, preview decoder) of the engine's step-count, preview-decoder and
    torch.compile variants."""
    from engine.sampler import few_step_sampler

    samplers = {"": None}
    if len(preset.sampler.timesteps) > 2:
        samplers["steps=2"] = few_step_sampler(preset.sampler, 2)
    fastest = list(samplers)[-1]

    def name(*opts):
        return f"engine[{'+'.join(filter(None, opts))}]"

    out = [(name(label), s, False, False) for label, s in samplers.items() if label]
    if preview:
        out += [(name("preview", label), s, False, True) for label, s in samplers.items()]
    if compiled:
        out += [(name("compile", label), s, True, False) for label, s in samplers.items()]
        if preview:
            out.append((name("compile", "preview", fastest), samplers[fastest], True, True))
    return out


def compile_engine(model, on: bool, decoder: bool = True):
    """Process-wide: compiled transformer blocks and (with `decoder`) VAE decoder (engine/accel.py), or back to
    eager."""
    from engine import accel

    if on:
        accel.compile_blocks()
        if decoder and accel.decoder_gains_from_compile(model.vae):  # not on a CPU (engine/accel.py)
            accel.compile_decoder(model.vae)
    else:
        accel.reset_compiled()
        accel.reset_decoder(model.vae)


def cold_first_chunk(model_arg, device, dtype) -> float:
    """First chunk in a fresh process, without warm-up (what a one-shot CLI user sees)."""
    code = ("import time,torch,sys;torch.set_num_threads(%d);from engine.folder import load_model_folder;"
            "from engine.pipeline import VideoGenerator;m=load_model_folder(%r,device=%r,dtype=torch.%s);"
            "g=VideoGenerator(m);t=time.perf_counter();next(g.run([(0,%r)],None));"
            "print((time.perf_counter()-t)*1000)") % (torch.get_num_threads(), model_arg, device,
                                                      str(dtype).removeprefix("torch."), PROMPT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    rows = [("system", "fps", "x realtime", "x pipeline", "first ms", "chunk p50", "chunk p95", "fps no decode",
             "oracle")]
    fps_rt = results["model"]["fps"]
    wan_fps = results["systems"].get("wan_pipeline", {}).get("fps")
    skipped = []
    for name, r in results["systems"].items():
        if "skipped" in r:
            skipped.append(f"{name} skipped: {r['skipped']}")
            continue
        rows.append((name, f"{r['fps']:.1f}", f"{r['fps'] / fps_rt:.2f}",
                     f"{r['fps'] / wan_fps:.1f}" if wan_fps else "-", f"{r['first_frame_ms']:.0f}",
                     f"{r['chunk_ms']['p50']:.0f}", f"{r['chunk_ms']['p95']:.0f}", f"{r['fps_without_decode']:.1f}",
                     f"{r['oracle']:.3f}" if "oracle" in r else "-"))
    lines = [f"{row[0]:>26}  " + "  ".join(f"{c:>13}" for c in row[1:]) for row in rows] + skipped
    eng, wan = results["systems"]["engine"], results["systems"].get("wan_pipeline", {})
    if "fps" in wan:
        lines.append(f"engine vs wan_pipeline: {eng['fps'] / wan['fps']:.1f}x the fps, first frame in "
                     f"{eng['first_frame_ms'] / wan['first_frame_ms']:.3f} of its time")
    nat = results["systems"].get("engine[native-vae]", {})
    if "stage_ms" in nat:
        dn, de = nat["stage_ms"]["decode"], eng["stage_ms"]["decode"]
        lines.append(f"VAE decode: {de:.1f} ms a chunk against {dn:.1f} with PyTorch's own kernels and a latent frame a "
                     f"call (engine[native-vae]): {dn / de:.2f}x")
    lines.append("")
    lines.append("stage ms per chunk (engine): " + ", ".join(f"{k} {v:.1f}" for k, v in eng["stage_ms"].items()))
    lines.append("  each forward: " + ", ".join(f"{k} {v:.1f}" for k, v in eng.get("forward_ms", {}).items()))
    if "delivery_ms" in eng:
        d = eng["delivery_ms"]
        lines.append(f"  delivery: jpeg encode {d['jpeg_encode']['mean']:.1f}, h264 encode {d['h264_encode']['mean']:.1f}, "
                     f"websocket loopback {d['websocket']['mean']:.1f} ({d['jpeg_kb_per_frame']:.1f} kB/frame) "
                     f"-> {eng['fps_streamed']:.1f} fps streamed as JPEG")
    if "cold_first_chunk_ms" in eng:
        lines.append(f"  first chunk: warm {eng['first_frame_ms']:.0f} ms, cold (fresh process) "
                     f"{eng['cold_first_chunk_ms']:.0f} ms")
    lines.append("scaling (stream position: engine | recompute; fps, ms/chunk, state memory):")
    for s in results["scaling"]:
        e, r = s["engine"], s["recompute"]
        line = f"  {s['seconds']:>5} s: engine {e['fps']:7.1f} fps {e['chunk_ms']:6.0f} ms {e.get('state_mb', 0):7.2f} MB  | "
        if "skipped" in r:
            line += f"recompute skipped: {r['skipped']}"
        else:
            line += (f"recompute {r['fps']:7.2f} fps {r['chunk_ms']:8.0f} ms {r.get('state_mb', 0):7.2f} MB "
                     f"(peak rss {r.get('peak_rss_mb', 0):.0f} MB) -> cache advantage {r['chunk_ms'] / e['chunk_ms']:.1f}x")
        lines.append(line)
    return "\n".join(lines)


def plot(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    eng = results["systems"]["engine"]
    st = dict(eng["stage_ms"])
    for k, v in eng.get("delivery_ms", {}).items():
        if isinstance(v, dict):
            st[k] = v["mean"]
    a.bar(list(st), list(st.values()))
    a.tick_params(axis="x", rotation=30)
    a.set_ylabel("ms per chunk")
    a.set_title(f"engine stages ({results['device']['name'][:30]})")
    sc = results["scaling"]
    secs = [s["seconds"] for s in sc]
    rec = [(s["seconds"], s["recompute"]) for s in sc if "skipped" not in s["recompute"]]
    b.plot(secs, [s["engine"]["fps"] for s in sc], "o-", label="engine (KV cache)")
    b.plot([x for x, _ in rec], [r["fps"] for _, r in rec], "s-", label="recompute (no cache)")
    c.plot(secs, [s["engine"].get("state_mb", 0) for s in sc], "o-", label="engine: KV cache")
    c.plot([x for x, _ in rec], [r.get("state_mb", 0) for _, r in rec], "s-", label="recompute: history")
    c.plot([x for x, _ in rec], [r.get("peak_rss_mb", 0) for _, r in rec], "^--", label="recompute: peak RSS")
    c.plot(secs, [s["engine"].get("rss_mb", 0) for s in sc], "v--", label="engine: RSS")
    c.set_xscale("log")
    c.set_yscale("log")
    c.set_xlabel("stream position (s)")
    c.set_ylabel("MB")
    c.legend(fontsize=7)
    c.set_title("memory vs stream length")
    b.axhline(results["model"]["fps"], ls="--", c="gray", label="real time")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("stream position (s)")
    b.set_ylabel("frames/s")
    b.legend()
    b.set_title("speed vs stream length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def pipeline_system(a, model, frames: int) -> dict:
    """The wan_pipeline baseline (benchmarks/baselines.py), or {"skipped": why}."""
    from benchmarks.baselines import load_wan_pipeline, wan_pipeline_system
    from distill.train_teacher import teacher_preset

    pr = model.preset
    if a.no_pipeline:
        return {"skipped": "--no-pipeline"}
    teacher = None if a.preset else Path(a.teacher)
    if teacher is not None and not teacher.exists():
        print(f"warning: no teacher at {teacher}: the wan_pipeline baseline is skipped", file=sys.stderr)
        return {"skipped": f"no teacher folder at {teacher}"}
    trained_for = teacher_preset(teacher) if teacher is not None else None  # None: a run folder does not say
    if trained_for not in (None, pr.name):  # its latents are another VAE's: not this model's baseline
        return {"skipped": f"the teacher {teacher} was trained for preset {trained_for}, this model is {pr.name}"}
    print("wan_pipeline baseline (teacher, 30 CFG steps) ...", file=sys.stderr)
    pipe, text = load_wan_pipeline(teacher, model.vae, pr.name)
    pipe.transformer.to(a.device, getattr(torch, a.dtype))  # the VAE is the engine's, already placed
    text.to(a.device)
    res, video = wan_pipeline_system(pipe, text, PROMPT, frames, pr.width, pr.height)
    res["teacher"] = str(teacher) if teacher else f"random {pr.name} teacher"
    res["peak_memory_mb"] = peak_rss_mb()
    res["oracle"] = adherence([(video, PROMPT)])
    return res


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a run under 2 minutes on a 2-core CPU")
    p.add_argument("--json", help="write machine-readable results here")
    p.add_argument("--plot", help="write figures (PNG) here")
    p.add_argument("--preset", help="benchmark a random model of this preset instead of the shipped model")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, the reference machine)")
    p.add_argument("--seconds", type=float, nargs="*", help="scaling positions in seconds")
    p.add_argument("--video-seconds", type=float, metavar="S",
                   help="seconds of video every system streams side by side (default 10; --quick: 5)")
    p.add_argument("--teacher", default="assets/shapes-teacher",
                   help="teacher folder for the wan_pipeline baseline (ignored with --preset: a random teacher)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the wan_pipeline baseline")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine with torch.compile (blocks, and on a GPU the VAE decoder; needs a C++ compiler on "
                        "the CPU; compilation is reported as warmup_s, not in the timings)")
    a = p.parse_args(argv)
    if a.threads < 1 or any(not s > 0 for s in a.seconds or []):
        p.error(f"--threads must be >= 1 and --seconds positive (got {a.threads} and {a.seconds})")
    if a.video_seconds is not None and not a.video_seconds > 0:
        p.error(f"--video-seconds must be positive (got {a.video_seconds})")
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model_arg = a.model
    if a.preset:
        import tempfile

        from engine.init_model import random_model_folder
        model_arg = str(Path(tempfile.mkdtemp()) / a.preset)
        try:
            random_model_folder(a.preset, model_arg, weights_dtype=torch.float32)
        except ValueError as e:
            p.error(str(e))
        from engine.config import get_preset
        from engine.preview import PreviewConfig, PreviewDecoder

        torch.manual_seed(0)  # and a random preview decoder: its speed does not depend on its weights either
        PreviewDecoder(PreviewConfig.for_vae(get_preset(a.preset).vae)).save(Path(model_arg) / "preview")
    try:
        model = load_model_folder(model_arg, device=a.device, dtype=dtype)
    except ModelLoadError as e:
        p.error(str(e))
    pr = model.preset
    secs = a.seconds or ([10, 20] if a.quick else [10, 60, 300, 600])
    video_s = a.video_seconds or (5.0 if a.quick else 10.0)
    n_params = sum(x.numel() for x in model.transformer.parameters())
    results = {
        "git_sha": git_sha(),
        "device": device_info(a.device, dtype),
        "model": {"preset": pr.name, "path": str(model.path), "placeholder": bool(model.info.get("placeholder")),
                  "parameters": n_params, "resolution": [pr.width, pr.height], "fps": pr.fps,
                  "preview_parameters": sum(x.numel() for x in model.preview.parameters()) if model.preview else None,
                  "frames_per_chunk": pr.cache.frames_per_chunk, "latent_frames_per_chunk": pr.cache.frames_per_chunk,
                  "video_frames_per_chunk": pr.cache.frames_per_chunk * model.vae.temporal,
                  "steps": len(pr.sampler.timesteps), "window_frames": pr.cache.window_frames,
                  "sink": pr.cache.sink, "sink_frames": pr.cache.sink_frames},
        "video_seconds": video_s,
        "systems": {},
        "scaling": [],
    }
    frames = max(1, int(video_s * pr.fps))  # the side-by-side run: the same video length for every system
    print(f"benchmarking {pr.name} ({n_params / 1e6:.1f} M parameters, {pr.width}x{pr.height}) on "
          f"{results['device']['name']}, {a.threads} threads", file=sys.stderr)
    results["systems"]["engine"], _ = stream_system(model, frames, recompute=False, delivery=True)
    print("engine[native-vae] ...", file=sys.stderr)
    with native_vae(model):
        results["systems"]["engine[native-vae]"], _ = stream_system(model, frames, recompute=False, first_runs=3,
                                                                    decoder_frames_per_call=1)
    results["systems"]["recompute"], _ = stream_system(model, frames, recompute=True)
    for name, cfg in engine_configs(pr.cache, model).items():
        print(f"{name} ...", file=sys.stderr)
        r, _ = stream_system(model, frames, recompute=False, cache_cfg=cfg, first_runs=3)
        r["cache"] = {k: getattr(cfg, k) for k in ("sink", "sink_frames", "window_frames", "sparse_topk",
                                                   "sparse_block", "linear_memory")}
        results["systems"][name] = r
    for name, sampler_cfg, compiled, preview in variant_systems(pr, a.compile, model.preview is not None):
        print(f"{name} ...", file=sys.stderr)
        if compiled:
            compile_engine(model, True, decoder=not preview)
        try:
            results["systems"][name], _ = stream_system(model, frames, recompute=False, sampler_cfg=sampler_cfg,
                                                        first_runs=3, preview=preview)
        finally:
            if compiled:
                compile_engine(model, False)
    with native_vae(model):  # what a user would otherwise run: diffusers' modules as they are
        results["systems"]["wan_pipeline"] = pipeline_system(a, model, frames)
    colds = [cold_first_chunk(str(model.path), a.device, dtype) for _ in range(1 if a.quick else 3)]
    results["systems"]["engine"]["cold_first_chunk_ms"] = float(np.median(colds))
    longest = int(max(secs) * pr.fps)
    print(f"streaming {max(secs):.0f} s with the engine ...", file=sys.stderr)
    marks = [int(s * pr.fps) for s in secs]
    _, at = stream_system(model, longest, recompute=False, marks=marks, score=False, first_runs=1)
    for s, m in zip(secs, marks):
        print(f"recompute baseline at {s:.0f} s ...", file=sys.stderr)
        chunks = (1 if a.quick else 2) if s <= 60 else 0
        results["scaling"].append({"seconds": s, "engine": at[m], "recompute": recompute_at(model, m, chunks)})
    results["scaling_peak_rss_mb"] = peak_mb()
    print(table(results))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    if a.plot:
        plot(results, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
