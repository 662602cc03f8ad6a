"""python -m benchmarks.kernels_bench: block-sparse attention and linear memory against dense attention.

    python -m benchmarks.kernels_bench                      # CUDA if present, else the CPU part
    python -m benchmarks.kernels_bench --json benchmarks/results/kernels-h100.json
    python -m benchmarks.kernels_bench --cpu --quick        # CPU only, small
    python -m benchmarks.kernels_bench --frames 9 21 --sweep   # + launch settings of the Triton kernels

CUDA (bf16, Wan2.1-1.3B self-attention of one chunk: B=1, H=12, D=128, 4,680 queries = 3 latent frames of
1,560 tokens, keys = 9..21 latent frames, 64x64 blocks, 20% of the key blocks per query block by pooled score):
  - correctness at bf16: Triton and flex against the fp32 torch path on the same table;
  - forward and forward+backward times of dense SDPA, flex attention (compiled, same block mask) and the
    Triton kernel; block selection; linear-memory read-out for the 4,680 queries and the fold of one chunk.
  Targets (issue 6): Triton >= 3x faster than dense SDPA at 20% density; read-out < 5% of window attention.
CPU (fp32, the torch paths, which the engine uses on a CPU):
  - one attention call at a small shape: dense SDPA vs the gather path at 20% (ratio), Triton not timed
    (the interpreter is for correctness only);
  - the Shapes model streaming per chunk (transformer only): dense vs sparse 20% + linear memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import git_sha
import kernels  # noqa: F401  (on a CPU: TRITON_INTERPRET=1 before anything imports triton)
from kernels.block_sparse import BlockTable, block_sparse_attention, block_sparse_attention_torch, select_blocks
from kernels.linear_memory import fold, readout
from engine.attention import flex_kernel_options

WAN = dict(B=1, H=12, D=128, tokens_per_frame=1560, chunk_frames=3)


def cuda_time_ms(fn, warmup=5, reps=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


CLOCK = time.perf_counter  # --process-time: CPU time of this process (steadier on a shared machine, 1 thread)


def cpu_times_ms(fns: dict, reps=7) -> dict:
    """Median time of each function, run round-robin (a shared CPU's drift hits every one alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = CLOCK()
            fn()
            times[name].append((CLOCK() - t) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def flex_block_mask(table: BlockTable, B, H):
    from torch.nn.attention.flex_attention import BlockMask

    from kernels.block_sparse import ordered_from_mask

    t = table.expand(B, H)
    blocks, bm, bn, Lk = t.block_mask(), t.block_m, t.block_n, t.k_len

    def mask_mod(b, h, qi, ki):
        return blocks[b, h, qi // bm, ki // bn] & (ki < Lk)

    idx, cnt = ordered_from_mask(blocks)
    return BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(bm, bn), mask_mod=mask_mod, seq_lengths=(t.q_len, Lk))


SWEEP = {  # --sweep: the launch settings tried ("full"; "small" for --dry-run)
    "full": dict(block_m=(64, 128), warps=(4, 8), stages=(1, 2, 3, 4),
                 readout_block_m=(32, 64), readout_block_dv=(64, 128), readout_warps=(4, 8),
                 readout_row_blocks=(1, 4, 16)),
    "small": dict(block_m=(16, 32), warps=(4,), stages=(2,), readout_block_m=(16,), readout_block_dv=(8, 16),
                  readout_warps=(4,), readout_row_blocks=(1, 2)),
}


def sweep_launch(q, k, v, M, z, block, density, timer, reps, which: str) -> dict:
    """Times the Triton forward over query-block sizes (each its own table: selection per query block) x warps
    x pipeline stages, and the read-out over its tiles and warps; each with its error against the fp32 torch
    path, so a fast but wrong setting shows; and the fastest of each (the defaults' times are the row's
    triton_sparse_fwd_ms and readout_ms)."""
    from kernels import block_sparse_triton as tri
    from kernels import linear_memory_triton as ltri
    from kernels.linear_memory import EPS

    cfg = SWEEP[which]
    B, H, _, D = q.shape
    fwd = []
    for bm in cfg["block_m"]:
        t = select_blocks(q, k, bm, block, density).expand(B, H)
        ref = block_sparse_attention_torch(q.float(), k.float(), v.float(), t)
        for w in cfg["warps"]:
            for st in cfg["stages"]:
                entry = {"block_m": bm, "block_n": block, "warps": w, "stages": st, "density": t.density()}

                def call(t=t, bm=bm, w=w, st=st):
                    return tri.forward(q, k, v, t.kv_idx, t.kv_cnt, bm, block, D ** -0.5, num_warps=w,
                                       num_stages=st)[0]
                try:
                    entry["max_err"] = (call().float() - ref).abs().max().item()
                    entry["fwd_ms"] = timer(call, reps=reps)
                except Exception as e:  # a setting a chip cannot compile (shared memory): recorded, not fatal
                    entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                fwd.append(entry)
                print(json.dumps({"sweep_fwd": entry}), flush=True)
    ro = []
    ref = readout(q, M, z, impl="torch").float()
    for bm, dv, w, rb in itertools.product(cfg["readout_block_m"], cfg["readout_block_dv"], cfg["readout_warps"],
                                           cfg["readout_row_blocks"]):
        entry = {"block_m": bm, "block_dv": dv, "warps": w, "row_blocks": rb}

        def call(bm=bm, dv=dv, w=w, rb=rb):
            return ltri.readout_forward(q, M, z, EPS, block_m=bm, block_dv=dv, num_warps=w, row_blocks=rb)
        try:
            entry["max_rel_err"] = ((call().float() - ref).abs().max() / ref.abs().max()).item()
            entry["ms"] = timer(call, reps=reps)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ro.append(entry)
        print(json.dumps({"sweep_readout": entry}), flush=True)
    out = {"sweep_fwd": fwd, "sweep_readout": ro}
    ok = [e for e in fwd if "fwd_ms" in e]
    if ok:
        out["sweep_fwd_best"] = min(ok, key=lambda e: e["fwd_ms"])
    ok = [e for e in ro if "ms" in e]
    if ok:
        out["sweep_readout_best"] = min(ok, key=lambda e: e["ms"])
    return out


def bench_cuda(frames_list, density, block, reps, dims=WAN, dev="cuda", sweep: str | None = None) -> list[dict]:
    """dev="cpu" (--dry-run): the same code at toy sizes, fp32, Triton interpreted, flex eager."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    if dev == "cuda":
        flex, dt, timer = torch.compile(flex_attention, dynamic=False), torch.bfloat16, cuda_time_ms
    else:
        flex, dt = flex_attention, torch.float32

        def timer(fn, reps):
            return cpu_times_ms({"fn": fn}, reps)["fn"]
    B, H, D, n, cf = (dims[k] for k in ("B", "H", "D", "tokens_per_frame", "chunk_frames"))
    Lq = n * cf
    rows = []
    for frames in frames_list:
        Lk = frames * n
        g = torch.Generator(device=dev).manual_seed(frames)
        q = torch.randn(B, H, Lq, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, H, Lk, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, H, Lk, D, device=dev, dtype=dt, generator=g)
        table = select_blocks(q, k, block, block, density)
        t_select = timer(lambda: select_blocks(q, k, block, block, density), reps=reps)
        bmask = flex_block_mask(table, B, H)
        opts = flex_kernel_options(block, block) if dev == "cuda" else None

        def flex_call(q, k, v):
            return flex(q, k, v, block_mask=bmask, kernel_options=opts)
        row = {"key_frames": frames, "Lq": Lq, "Lk": Lk, "density": table.density(), "select_ms": t_select}
        # correctness at bf16 against the fp32 torch path on the same table
        ref = block_sparse_attention_torch(q.float(), k.float(), v.float(), table)
        tri = block_sparse_attention(q, k, v, table, impl="triton")
        row["max_err_triton"] = (tri.float() - ref).abs().max().item()
        try:  # a flex failure (a torch version's limits) must not lose the Triton kernel's numbers
            row["max_err_flex"] = (flex_call(q, k, v).float() - ref).abs().max().item()
        except Exception as e:
            row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        fwd = {
            "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "flex_sparse": lambda: flex_call(q, k, v),
            "triton_sparse": lambda: block_sparse_attention(q, k, v, table, impl="triton"),
        }
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)
        fb = {
            "sdpa_dense": lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(do),
            "flex_sparse": lambda: flex_call(qg, kg, vg).backward(do),
            "triton_sparse": lambda: block_sparse_attention(qg, kg, vg, table, impl="triton").backward(do),
        }
        if dev != "cuda" or "flex_error" in row:
            del fb["flex_sparse"]  # flex attention has no backward on the CPU
        if "flex_error" in row:
            del fwd["flex_sparse"]
        for name, fn in fwd.items():
            row[f"{name}_fwd_ms"] = timer(fn, reps=reps)
        if dev == "cuda":  # which dense SDPA kernel is fastest here (the default picks one)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(be):
                        row[f"sdpa_dense_{name}_fwd_ms"] = timer(fwd["sdpa_dense"], reps=reps)
                except Exception as e:
                    row[f"sdpa_dense_{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for name, fn in fb.items():
            try:
                row[f"{name}_fwdbwd_ms"] = timer(fn, reps=reps)
            except Exception as e:
                row[f"{name}_fwdbwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        # linear memory: read-out for the chunk's queries, fold of one evicted chunk (state fp32)
        M = torch.rand(B, H, D, D, device=dev) * 100
        z = torch.rand(B, H, D, device=dev) * 100
        row["readout_ms"] = timer(lambda: readout(q, M, z, impl="triton"), reps=reps)
        row["readout_torch_ms"] = timer(lambda: readout(q, M, z, impl="torch"), reps=reps)
        kc, vc = k[:, :, :Lq], v[:, :, :Lq]
        row["fold_ms"] = timer(lambda: fold(M, z, kc, vc, impl="triton"), reps=reps)
        row["readout_max_rel_err"] = ((readout(q, M, z, impl="triton").float() - readout(q, M, z, impl="torch").float())
                                      .abs().max() / readout(q, M, z, impl="torch").float().abs().max()).item()
        row["speedup_triton_vs_sdpa_fwd"] = row["sdpa_dense_fwd_ms"] / row["triton_sparse_fwd_ms"]
        if "triton_sparse_fwdbwd_ms" in row:
            row["speedup_triton_vs_sdpa_fwdbwd"] = row["sdpa_dense_fwdbwd_ms"] / row["triton_sparse_fwdbwd_ms"]
        if "flex_sparse_fwdbwd_ms" in row:
            row["speedup_flex_vs_sdpa_fwdbwd"] = row["sdpa_dense_fwdbwd_ms"] / row["flex_sparse_fwdbwd_ms"]
        if "flex_sparse_fwd_ms" in row:
            row["speedup_flex_vs_sdpa_fwd"] = row["sdpa_dense_fwd_ms"] / row["flex_sparse_fwd_ms"]
        row["readout_fraction_of_window_attn"] = row["readout_ms"] / row["triton_sparse_fwd_ms"]
        if sweep:
            row.update(sweep_launch(q, k, v, M, z, block, density, timer, reps, sweep))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_cpu_attention(quick: bool) -> dict:
    B, H, D, Lq, Lk, blk = 1, 4, 64, 768, (2048 if quick else 3072), 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    table = select_blocks(q, k, blk, blk, 0.2)
    import torch.nn.functional as F

    out = {"shape": dict(B=B, H=H, D=D, Lq=Lq, Lk=Lk, block=blk), "density": table.density()}
    ms = cpu_times_ms({"sdpa_dense_ms": lambda: F.scaled_dot_product_attention(q, k, v),
                       "gather_sparse_ms": lambda: block_sparse_attention_torch(q, k, v, table),
                       "select_ms": lambda: select_blocks(q, k, blk, blk, 0.2)})
    out.update(ms)
    out["speed_ratio_dense_over_sparse"] = out["sdpa_dense_ms"] / (out["gather_sparse_ms"] + out["select_ms"])
    print(json.dumps(out), flush=True)
    return out


def bench_cpu_shapes_stream(quick: bool) -> dict:
    import dataclasses

    from engine.config import get_preset
    from engine.model import CausalWanModel
    from engine.stream import Stream

    preset = get_preset("shapes")
    torch.manual_seed(0)
    model = CausalWanModel(preset.model).eval()
    text = torch.randn(1, 8, preset.model.text_dim)
    n_warm, n_time = (4, 4) if quick else (6, 10)
    res = {"preset": "shapes", "tokens_per_frame": preset.tokens_per_frame,
           "live_tokens": (preset.cache.sink_size + preset.cache.window_frames + preset.cache.frames_per_chunk)
           * preset.tokens_per_frame}
    variants = {
        "dense": preset.cache,
        "sparse20_block16": dataclasses.replace(preset.cache, sparse_topk=0.2, sparse_block=16),
        "sparse20_block16_memory": dataclasses.replace(preset.cache, sparse_topk=0.2, sparse_block=16,
                                                       linear_memory=True),
        "memory_only": dataclasses.replace(preset.cache, linear_memory=True),
    }
    model.enable_linear_memory()  # zero projections: same maths as a trained one, for timing
    streams = {}
    for name, cache in variants.items():
        s = Stream(model, preset, cache_cfg=cache)
        s.set_prompt(text)
        g = torch.Generator().manual_seed(0)
        for _ in range(n_warm):  # fill the window and the sink: steady state
            s.next_chunk(g)
        streams[name] = (s, g)
    ms = cpu_times_ms({name: (lambda s=s, g=g: s.next_chunk(g)) for name, (s, g) in streams.items()}, reps=n_time)
    for name, t in ms.items():
        res[f"{name}_chunk_ms"] = t
    for name in variants:
        if name != "dense":
            res[f"speed_ratio_dense_over_{name}"] = res["dense_chunk_ms"] / res[f"{name}_chunk_ms"]
    print(json.dumps(res), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU part only, even with CUDA present")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", type=int, nargs="+", default=[9, 13, 17, 21], help="latent frames of keys (CUDA)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--git-sha", help="the commit measured (default: this checkout's; a device copy has no .git)")
    ap.add_argument("--sweep", action="store_true",
                    help="CUDA: also time the Triton forward and read-out over launch settings (block sizes, "
                         "warps, pipeline stages), each checked against the torch path")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the CUDA benchmark's code on the CPU at toy sizes (checks the script, times nothing)")
    ap.add_argument("--process-time", action="store_true",
                    help="CPU part: time with this process's CPU time, one thread (for a busy shared machine)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.process_time:
        CLOCK, args.threads = time.process_time, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": "python -m benchmarks.kernels_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "git_sha": args.git_sha or git_sha(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
              "clock": "process_time" if args.process_time else "wall"}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if args.dry_run:
        toy = dict(B=1, H=2, D=16, tokens_per_frame=16, chunk_frames=3)
        result["device"] = "cpu (dry run)"
        result["cuda"] = bench_cuda([4, 6], args.density, 16, reps=1, dims=toy, dev="cpu",
                                    sweep="small" if args.sweep else None)
    elif torch.cuda.is_available() and not args.cpu:
        result["device"] = torch.cuda.get_device_name()
        frames = args.frames[:2] if args.quick else args.frames
        result["cuda"] = []
        for f in frames:  # written after each shape: a later failure or timeout keeps the earlier rows
            result["cuda"] += bench_cuda([f], args.density, args.block, reps=10 if args.quick else 30,
                                         sweep="full" if args.sweep else None)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    else:
        result["device"] = platform.processor() or platform.machine()
        try:
            result["device"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                    if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        result["cpu_attention"] = bench_cpu_attention(args.quick)
        result["cpu_shapes_stream"] = bench_cpu_shapes_stream(args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
