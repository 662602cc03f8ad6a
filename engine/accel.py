"""GPU speed paths for the streaming step: regional torch.compile and CUDA-graph replay.

compile_blocks()
    Compiles the two pure tensor halves of a transformer block (`engine.model.block_pre`: modulated norm and
    q/k/v projections; `block_post`: output projection, cross-attention, feed-forward) and RoPE. The 30 blocks
    of a Wan model share one compiled graph per half (the block's parameters are graph inputs), so compiling
    costs seconds, not a whole-model trace. The attention context in between (cache writes, the live slice,
    the attention call) stays eager: its Python bookkeeping changes while the window fills, and compiling it
    would recompile at every change. Process-wide; `reset_compiled()` restores the eager functions.

checkpoint_blocks()
    Activation checkpointing for training at scale (distill/self_forcing.py --checkpoint-activations): the same two
    pure halves keep only their inputs for the backward and recompute the rest, above all the feed-forward's wide
    activations. The attention context in between is not recomputed: its cache writes are side effects, and a
    recompute would read a cache that later chunks have since changed.

compile_decoder(vae)
    Compiles the VAE decoder in place: on a GPU at 832x480 it is the largest stage after the transformer. The CLIs
    and the benchmark compile it only where `decoder_gains_from_compile` says so: not on a CPU, where the VAE's own
    fast paths (engine/vae.py) decode as fast as Inductor's code and compiling costs minutes.

GraphedForward (Stream(cuda_graphs=True)) -- EXPERIMENTAL, not offered by the CLIs: on an H200 (torch 2.11,
benchmarks/results/gpu-h200-2026-11-26.md) a replayed forward differed from the eager forward on the same input
and cache (max 0.57 at outputs of scale 2.6) while eager was bit-reproducible, and it gained only 3% (the step
is GPU-bound). The likely cause, found since by reading the code: the captured forward read its timestep from
a tensor that nothing kept alive after the capture, so replays read whatever the allocator had put in its
place (a replayed graph reads raw addresses). Every tensor a graph reads is now held with the graph, and a CPU
test (tests/test_accel.py) checks that each tensor the captured forward reads outlives the capture. Equality
on a GPU is still to be measured: `python -m benchmarks.gpu --systems engine graphs`.

    Once the cache is in steady state (sink and window full), every forward of the current chunk reads and
    writes the same buffers with the same shapes: the KV buffers are preallocated, the live region is the
    whole buffer, the RoPE tables are memoised. So each distinct timestep of the schedule (and the clean pass
    at t = 0) is captured once as a CUDA graph and replayed from then on: one launch instead of ~1,000
    kernel launches a forward. The graphs read a static copy of the prompt's cross-attention K/V, refreshed in
    place when the prompt changes (dropped and recaptured if its length changes). Before steady state, and for
    the sparse and linear-memory paths (data-dependent block tables; a memory state that is replaced, not
    updated in place), the eager forward runs. By design a replay runs the eager forward's kernels on the
    same buffers; on the H200 it did not, most likely because one input (the timestep tensor) had been freed.
    benchmarks/gpu.py's replay check compares a replay with eager and names the first layer whose keys differ.
"""

from __future__ import annotations

import torch

from . import attention as _attention
from . import model as _model

_EAGER = {"pre": _model.block_pre, "post": _model.block_post, "rope": _attention.rope_reference}


def compile_blocks(backend: str = "inductor", mode: str | None = None):
    """Swap in compiled block halves and RoPE (see the module doc). backend="aot_eager" traces without
    generating code (tests use it: it checks the capture, fast)."""
    kw = dict(backend=backend, mode=mode, dynamic=None)
    _model._STAGES["pre"] = torch.compile(_EAGER["pre"], **kw)
    _model._STAGES["post"] = torch.compile(_EAGER["post"], **kw)
    _attention._ROPE["fn"] = torch.compile(_EAGER["rope"], **kw)


def checkpoint_blocks():
    """Swap in checkpointed block halves (see the module doc). Process-wide; reset_compiled() undoes it."""
    from torch.utils.checkpoint import checkpoint

    pre, post = _EAGER["pre"], _EAGER["post"]

    def pre_ckpt(blk, x, mod):
        return checkpoint(pre, blk, x, mod, use_reentrant=False)

    def post_ckpt(blk, x, o, mods, text_kv):
        return checkpoint(post, blk, x, o, mods, text_kv, use_reentrant=False)

    pre_ckpt.checkpointed = post_ckpt.checkpointed = True
    _model._STAGES["pre"], _model._STAGES["post"] = pre_ckpt, post_ckpt


def reset_compiled():
    _model._STAGES["pre"], _model._STAGES["post"] = _EAGER["pre"], _EAGER["post"]
    _attention._ROPE["fn"] = _EAGER["rope"]


def compile_decoder(vae, backend: str = "inductor", mode: str | None = None):
    """Compile a VideoVAE's decoder in place (its state-dict keys are unchanged). The streaming decoder calls it
    with the same shapes every chunk (the first call, one latent frame, is its own graph)."""
    import torch._dynamo.config as dc

    # On an H200, inside an sdpa_kernel context (the suspected cause of a graph break), dynamo compiled the
    # decoder's blocks one by one, one entry per channel width, and the default limit of 8 sent the rest to eager.
    dc.recompile_limit = max(dc.recompile_limit, 64)
    vae.vae.decoder.compile(backend=backend, mode=mode, dynamic=False)


def decoder_gains_from_compile(vae) -> bool:
    """False on a CPU with the VAE's fast paths on (engine/vae.py `fast_cpu`): there the eager decoder ran a chunk of
    the shipped model in 67 ms against 74-78 compiled by Inductor (which keeps the oneDNN convolutions), after a
    144-s compilation (2-core CPU, 2026-11-28). On a GPU the compiled decoder ran 157 ms a chunk against 254 (H200)."""
    return vae.device.type != "cpu" or not vae.fast_cpu


def reset_decoder(vae):
    vae.vae.decoder._compiled_call_impl = None


def decoder_compiled(vae) -> bool:
    return getattr(vae.vae.decoder, "_compiled_call_impl", None) is not None


def is_compiled() -> bool:
    stage = _model._STAGES["pre"]
    return stage is not _EAGER["pre"] and not getattr(stage, "checkpointed", False)


class GraphedForward:
    """CUDA-graph replay of a Stream's cached chunk forward, one graph per timestep (see the module doc)."""

    def __init__(self, stream):
        self.s = stream
        # timestep -> (graph, static input x, static timestep tensor, output): a replay reads the inputs' memory by
        # address, so every tensor the graph reads must live as long as the graph (hence tt is kept too)
        self.graphs: dict[float, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # one memory pool for all graphs: they replay one after another on one stream
        self.text_kv = None  # static copy the graphs read
        self._text_src = None  # the stream's text_kv it was copied from
        self.captures = 0

    def usable(self, x, t) -> bool:
        c = self.s.cache
        return (x.is_cuda and c is not None and isinstance(t, (int, float)) and c.sink_frames == c.S
                and c.window_frames == c.W and c.W > 0 and c.cfg.sparse_topk is None and not c.cfg.linear_memory)

    def _sync_text(self):
        src = self.s.text_kv
        if src is self._text_src:
            return
        same = self.text_kv is not None and all(a.shape == b.shape for a, b in
                                                zip((t for kv in self.text_kv for t in kv), (t for kv in src for t in kv)))
        if same:
            for (k, v), (k2, v2) in zip(self.text_kv, src):
                k.copy_(k2)
                v.copy_(v2)
        else:  # first use, or a prompt of another length: the graphs read tensors that no longer fit
            self.graphs.clear()
            self.text_kv = [(k.clone(), v.clone()) for k, v in src]
        self._text_src = src

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self._sync_text()
        key = float(t)
        if key in self.graphs:
            g, xs, _, out = self.graphs[key]
            xs.copy_(x)
            g.replay()
            return out.clone()
        return self._capture(x, key)

    def _capture(self, x, t):
        s = self.s
        xs = x.clone()
        tt = torch.full((s.batch,), t, dtype=torch.float32, device=x.device)

        def forward():
            return s.model(xs, tt, text_kv=self.text_kv, ctx=s.cache)

        # Warm-up on a side stream (as torch.cuda.graph asks): this is the call's real result, and it writes
        # the chunk's K/V into the cache. Capture records the same kernels without running them.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = forward()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = forward()
        self.pool = g.pool()
        self.graphs[t] = (g, xs, tt, out)
        self.captures += 1
        return result
