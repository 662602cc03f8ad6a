"""Streaming through the KV cache equals one masked full forward (CPU, fp32, tiny preset).

Setting: n chunks of clean latents X_c (the context the stream commits) and noisy inputs Y_c at timestep t_c.
Stream:    for c: v_c = stream.denoise(Y_c, t_c); stream.commit(X_c)
Reference: one forward over [X_0..X_{n-1}, Y_0..Y_{n-1}] with per-frame timesteps (0 for X), where each chunk
           sees the clean chunks its rule allows (+ itself), positioned by rank (ChunkedContext), and,
           where positions are plain offsets (no sink), also the ordinary bool-masked forward (FullContext).
"""

import dataclasses
import zlib

import pytest
import torch

from engine.attention import ChunkedContext, FullContext, force_backend
from engine.cache import KVCache
from engine.config import CacheConfig, SamplerConfig, get_preset
from engine.model import CausalWanModel
from engine.stream import Stream

TINY = get_preset("tiny")


def make_model(seed, preset=TINY):
    torch.manual_seed(seed)
    m = CausalWanModel(preset.model).eval()
    with torch.no_grad():  # every parameter random (some are zero/one at init), so nothing is vacuous
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def context_rule(c, cache: CacheConfig):
    """Clean chunks that chunk c sees, in order (sink chunks, then window chunks)."""
    C = cache.frames_per_chunk
    win = range(max(0, c - cache.window_frames // C), c)
    sink = range(min(cache.sink_size // C, c)) if cache.sink != "none" else range(0)
    return sorted(set(sink) | set(win))


def reference(model, X, Y, ts, text, cache: CacheConfig, hw):
    n = len(X)
    visible = [context_rule(c, cache) + [c] for c in range(n)] + [context_rule(c, cache) + [n + c] for c in range(n)]
    C = cache.frames_per_chunk
    tf = torch.cat([torch.zeros(n * C), torch.tensor(ts).repeat_interleave(C)])[None]
    seq = torch.cat(X + Y, dim=2)
    with torch.no_grad():
        out = model(seq, tf, text_kv=text, ctx=ChunkedContext(visible, C, hw, model.cfg.attention_head_dim))
    return out[:, :, n * C:].split(C, dim=2), visible


def masked_full(model, X, Y, ts, text, visible, cache, hw):
    """The ordinary masked forward: bool mask from `visible`, absolute frame positions."""
    n, C = len(X), cache.frames_per_chunk
    tok = C * hw[0] * hw[1]
    vis = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i, keys in enumerate(visible):
        vis[i, keys] = True
    mask = vis.repeat_interleave(tok, 0).repeat_interleave(tok, 1)
    pos = torch.arange(n * C).repeat(2)
    tf = torch.cat([torch.zeros(n * C), torch.tensor(ts).repeat_interleave(C)])[None]
    ctx = FullContext((2 * n * C, *hw), model.cfg.attention_head_dim, "cpu", frame_pos=pos, mask=mask)
    with torch.no_grad():
        return model(torch.cat(X + Y, dim=2), tf, text_kv=text, ctx=ctx)[:, :, n * C:].split(C, dim=2)


def run_stream(model, preset, X, Y, ts, text):
    s = Stream(model, preset)
    s.set_prompt(text)
    outs = []
    for x, y, t in zip(X, Y, ts):
        outs.append(s.denoise(y, t))
        s.commit(x)
    return outs, s


CASES = {
    "block_causal": dict(sink="none", window_frames=20, frames_per_chunk=2),
    "sliding_window": dict(sink="none", window_frames=4, frames_per_chunk=2),
    "static_sink": dict(sink="static", window_frames=4, sink_frames=2, frames_per_chunk=2),
    "static_sink_2chunks": dict(sink="static", window_frames=3, sink_frames=2, frames_per_chunk=1),
    "chunk3_window6": dict(sink="none", window_frames=6, frames_per_chunk=3),
    "patch4_static_sink": dict(sink="static", window_frames=6, sink_frames=3, frames_per_chunk=3, patch=4),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_streaming_equals_masked_full_forward(name, backend):
    seed = zlib.crc32(f"{name}-{backend}".encode()) % 10_000
    kw = dict(CASES[name])
    p = kw.pop("patch", 2)  # latent (3p)x(2p) -> 3x2 tokens per frame
    cache = dataclasses.replace(CacheConfig(), **kw)
    preset = TINY.replace(cache=cache, height=24 * p, width=16 * p,
                          model=dataclasses.replace(TINY.model, patch_size=(1, p, p)))
    model = make_model(seed, preset)
    g = torch.Generator().manual_seed(seed)
    n, C = 7, cache.frames_per_chunk
    shape = (1, 4, C, 3 * p, 2 * p)
    X = [torch.randn(shape, generator=g) for _ in range(n)]
    Y = [torch.randn(shape, generator=g) for _ in range(n)]
    ts = torch.rand(n, generator=g).mul(1000).tolist()
    text = torch.randn(1, 5, 32, generator=g)
    force_backend(backend)
    try:
        got, stream = run_stream(model, preset, X, Y, ts, text)
        want, visible = reference(model, X, Y, ts, model.text_kv(text), cache, (3, 2))
        for c in range(n):
            torch.testing.assert_close(got[c], want[c], rtol=1e-5, atol=1e-5, msg=f"{name}: chunk {c}")
        if cache.sink == "none":  # positions are plain offsets: the ordinary masked forward agrees too
            full = masked_full(model, X, Y, ts, model.text_kv(text), visible, cache, (3, 2))
            for c in range(n):
                torch.testing.assert_close(full[c], want[c], rtol=1e-5, atol=1e-5)
    finally:
        force_backend(None)
    # the test is not vacuous: the window really evicted (except block-causal, which never does)
    assert stream.cache.chunks_committed == n
    if name != "block_causal":
        assert len(visible[n - 1]) < n


def test_ema_update_rule():
    cfg = CacheConfig(frames_per_chunk=1, window_frames=1, sink="ema", sink_frames=1, ema_alpha=0.75)
    cache = KVCache(cfg, num_layers=2, batch=1, heads=1, head_dim=6, grid_hw=(1, 2))
    g = torch.Generator().manual_seed(3)
    written = []
    expect_k = None
    for step in range(6):
        k = torch.randn(1, 2, 1, 6, generator=g)
        for layer in range(2):
            cache.attend(layer, k, k, k * 2)
        written.append(k)
        cache.commit()
        # the chunk written at step s is evicted at step s+1 (window of one chunk)
        if step == 1:
            expect_k = written[0]
        elif step > 1:
            expect_k = 0.75 * expect_k + 0.25 * written[step - 1]
        if expect_k is not None:
            torch.testing.assert_close(cache.k[1, :, :2], expect_k)
            torch.testing.assert_close(cache.v[0, :, :2], 2 * expect_k)
    assert cache.sink_frames == 1


def test_ema_alpha_one_equals_static():
    base = dict(frames_per_chunk=2, window_frames=4, sink_frames=2)
    model = make_model(11)
    outs = {}
    for policy, alpha in [("static", 0.9), ("ema", 1.0)]:
        preset = TINY.replace(cache=CacheConfig(sink=policy, ema_alpha=alpha, **base))
        s = Stream(model, preset)
        g = torch.Generator().manual_seed(5)
        s.set_prompt(torch.randn(1, 5, 32, generator=g))
        outs[policy] = torch.cat([s.next_chunk(g) for _ in range(8)], 2)
    torch.testing.assert_close(outs["static"], outs["ema"], rtol=0, atol=0)
    # and an alpha < 1 really differs once the sink has been updated
    preset = TINY.replace(cache=CacheConfig(sink="ema", ema_alpha=0.5, **base))
    s = Stream(model, preset)
    g = torch.Generator().manual_seed(5)
    s.set_prompt(torch.randn(1, 5, 32, generator=g))
    other = torch.cat([s.next_chunk(g) for _ in range(8)], 2)
    assert not torch.allclose(other, outs["static"])


def test_eviction_hook_sees_every_evicted_chunk():
    cfg = CacheConfig(frames_per_chunk=2, window_frames=4, sink="none")
    cache = KVCache(cfg, num_layers=1, batch=1, heads=2, head_dim=12, grid_hw=(1, 1))
    seen = []
    cache.evict_hooks.append(lambda k, v: seen.append(k[0, 0, :, 0, 0].clone()))
    for c in range(5):
        k = torch.full((1, 2, 2, 12), float(c))
        cache.attend(0, k, k, k)
        cache.commit()
    assert [s.tolist() for s in seen] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]


@pytest.mark.timeout(300)
def test_two_thousand_chunks_constant_memory_and_positions():
    preset = TINY.replace(sampler=SamplerConfig(timesteps=(1000.0,)))
    model = make_model(2, preset)
    s = Stream(model, preset)
    g = torch.Generator().manual_seed(0)
    s.set_prompt(torch.randn(1, 5, 32, generator=g))
    ptr, nbytes = s.cache.k.data_ptr(), s.cache.nbytes()
    max_live = 0
    for i in range(2000):
        x = s.next_chunk(g)
        assert torch.isfinite(x).all()
        max_live = max(max_live, s.cache.live_frames)
    c = preset.cache
    assert s.chunks == 2000
    assert s.cache.k.data_ptr() == ptr and s.cache.nbytes() == nbytes  # never reallocated
    assert max_live == c.sink_frames + c.window_frames + c.frames_per_chunk  # positions stay in [0, live)
    assert len(s.window_latents) * c.frames_per_chunk <= c.window_frames and not s.history


@pytest.mark.parametrize("policy", ["none", "static"])
def test_prompt_switch_equals_fresh_stream_primed_with_same_latents(policy):
    cache = CacheConfig(frames_per_chunk=2, window_frames=4, sink=policy, sink_frames=2)
    preset = TINY.replace(cache=cache)
    model = make_model(21)
    g = torch.Generator().manual_seed(8)
    p1, p2 = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    a = Stream(model, preset)
    a.set_prompt(p1)
    made = [a.next_chunk(g) for _ in range(6)]
    a.set_prompt(p2)  # switch: re-cache under p2
    # a fresh stream, primed from scratch under p2 with the clean latents the cache held
    b = Stream(model, preset)
    b.set_prompt(p2)
    held = (made[:1] if policy == "static" else []) + made[-2:]
    b.prime(held)
    state = g.get_state()
    xa = [a.next_chunk(g) for _ in range(3)]
    g.set_state(state)
    xb = [b.next_chunk(g) for _ in range(3)]
    for u, v in zip(xa, xb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    # and the switch mattered: without the re-cache the continuation differs
    c = Stream(model, preset)
    c.set_prompt(p1)
    c.prime(held)
    c.text_kv = model.text_kv(p2)
    g.set_state(state)
    xc = c.next_chunk(g)
    assert not torch.allclose(xc, xa[0], atol=1e-4)


def test_ema_prompt_switch_keeps_sink_and_recaches_window():
    preset = TINY  # ema sink
    model = make_model(4)
    g = torch.Generator().manual_seed(1)
    s = Stream(model, preset)
    s.set_prompt(torch.randn(1, 5, 32, generator=g))
    for _ in range(6):
        s.next_chunk(g)
    sink_k = s.cache.k[:, :, : preset.cache.sink_frames * s.cache.n].clone()
    win_before = s.cache.k[:, :, preset.cache.sink_frames * s.cache.n:].clone()
    s.set_prompt(torch.randn(1, 5, 32, generator=g))
    torch.testing.assert_close(s.cache.k[:, :, : preset.cache.sink_frames * s.cache.n], sink_k, rtol=0, atol=0)
    assert s.cache.window_frames == preset.cache.window_frames
    assert not torch.allclose(s.cache.k[:, :, preset.cache.sink_frames * s.cache.n:], win_before)


def test_same_seed_same_latents_and_recompute_runs():
    model = make_model(9)
    outs = []
    for _ in range(2):
        s = Stream(model, TINY)
        g = torch.Generator().manual_seed(77)
        s.set_prompt(torch.randn(1, 5, 32, generator=g))
        outs.append(torch.cat([s.next_chunk(g) for _ in range(4)], 2))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # recompute baseline (no cache, whole history): first chunk equals the cached stream's (no context yet)
    r = Stream(model, TINY, recompute=True)
    g = torch.Generator().manual_seed(77)
    r.set_prompt(torch.randn(1, 5, 32, generator=g))
    first = r.next_chunk(g)
    torch.testing.assert_close(first, outs[0][:, :, :2], rtol=1e-5, atol=1e-5)
    r.next_chunk(g)
    assert len(r.history) == 2


def test_batched_stream_equals_separate_streams():
    """Batch rows are independent sessions: one batched stream equals one stream per row."""
    model = make_model(13)
    g = torch.Generator().manual_seed(14)
    B, n = 3, 5
    text = torch.randn(B, 5, 32, generator=g)
    X = [torch.randn(B, 4, 2, 4, 4, generator=g) for _ in range(n)]
    Y = [torch.randn(B, 4, 2, 4, 4, generator=g) for _ in range(n)]
    ts = [900.0, 10.0, 500.0, 250.0, 640.0]
    batched = Stream(model, TINY, batch=B)
    batched.set_prompt(text)
    got = []
    for x, y, t in zip(X, Y, ts):
        got.append(batched.denoise(y, t))
        batched.commit(x)
    for b in range(B):
        single = Stream(model, TINY)
        single.set_prompt(text[b:b + 1])
        for c, (x, y, t) in enumerate(zip(X, Y, ts)):
            torch.testing.assert_close(single.denoise(y[b:b + 1], t), got[c][b:b + 1], rtol=1e-5, atol=1e-5)
            single.commit(x[b:b + 1])
