"""Engine integration of the kernels: CacheConfig's sparse_topk / linear_memory, the model's optional memory
projection, and `switch_attention` (the trainer's dense -> sparse/linear switch).

- The defaults are today's dense engine (no new parameters, strict checkpoint loading).
- Streaming at 100% density (every key block through the sparse machinery) with the memory on and its
  projection at zero equals dense streaming, on every block-sparse backend.
- Streaming at 75% density with a trained (random) memory projection: Triton equals the torch paths.
- Gradients reach the new projection and the queries through the cache (a rollout's last step).
- The memory folds exactly the chunks that leave the live context, for every sink policy.
Kernel outputs start as NaN (poison_outputs) so unwritten elements fail.
"""

import dataclasses

import pytest
import torch

from engine.attention import force_backend
from engine.cache import KVCache, switch_attention
from engine.config import CacheConfig, get_preset
from engine.model import CausalWanModel
from engine.stream import Stream
from kernels._common import poison_outputs
from kernels.linear_memory import phi
from kernels.testing import DEVICE, HAS_TRITON, TOL, fresh_seed

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
TINY = get_preset("tiny")
BASE = CacheConfig(frames_per_chunk=2, window_frames=6, sink="static", sink_frames=2)
BLOCK = 32  # tokens per block: the live context (<= 120 tokens) has up to 4 key blocks, a chunk 1 query block


def make_model(seed):
    torch.manual_seed(seed)
    m = CausalWanModel(TINY.model).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.to(DEVICE)


def run_stream(model, cache_cfg, seed, n, backend=None):
    """Outputs of n chunks (denoise a noisy chunk, commit a clean one); 48x64 px -> 12 tokens per frame."""
    preset = TINY.replace(cache=cache_cfg, height=48, width=64)
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 5, 32, generator=g).to(DEVICE)
    force_backend(backend)
    try:
        s = Stream(model, preset)
        s.set_prompt(text)
        outs = []
        for _ in range(n):
            y, x = (torch.randn(1, 4, 2, 6, 8, generator=g).to(DEVICE) for _ in range(2))
            with poison_outputs():
                outs.append(s.denoise(y, float(torch.randint(1, 1000, (1,), generator=g))))
                s.commit(x)
    finally:
        force_backend(None)
    return torch.cat(outs, 2), s


def test_defaults_are_the_dense_engine():
    c = CacheConfig()
    assert c.sparse_topk is None and not c.linear_memory
    for preset in ("tiny", "shapes", "wan2.1-1.3b"):
        assert get_preset(preset).cache.sparse_topk is None and not get_preset(preset).cache.linear_memory
    m = make_model(0)
    assert not m.has_linear_memory and not any("mem_proj" in k for k in m.state_dict())
    CausalWanModel(TINY.model).load_state_dict(m.state_dict(), strict=True)
    with pytest.raises(ValueError):
        CacheConfig(sparse_topk=0.0)
    with pytest.raises(ValueError):
        CacheConfig(sparse_topk=1.5)


def test_switch_attention_adds_zero_projections_and_returns_them():
    m = make_model(1)
    sd = m.state_dict()
    cfg, new = switch_attention(m, BASE, sparse_topk=0.2, linear_memory=True)
    assert cfg.sparse_topk == 0.2 and cfg.linear_memory and cfg.window_frames == BASE.window_frames
    assert len(new) == 2 * TINY.model.num_layers and all(p.abs().sum() == 0 for p in new)
    assert m.has_linear_memory and switch_attention(m, cfg)[1] == []  # idempotent
    keys = set(m.state_dict()) - set(sd)
    assert keys == {f"blocks.{i}.attn1.mem_proj.{n}" for i in range(2) for n in ("weight", "bias")}
    fresh = CausalWanModel(TINY.model)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(m.state_dict(), strict=True)
    fresh.enable_linear_memory()
    fresh.load_state_dict(m.state_dict(), strict=True)
    back, _ = switch_attention(m, cfg, sparse_topk=None, linear_memory=False)
    assert back.sparse_topk is None and not back.linear_memory


@pytest.mark.parametrize("backend,n", [("gather", 6), ("flex", 3), pytest.param("triton", 5, marks=needs_triton)])
def test_full_density_stream_equals_dense_stream(backend, n):
    seed = fresh_seed()
    model = make_model(seed % 1000)
    base = dataclasses.replace(BASE, sink="none")  # evictions from chunk 4 on, all folded into the memory
    dense, _ = run_stream(model, base, seed, n)
    cfg, _ = switch_attention(model, base, sparse_topk=1.0, linear_memory=True, sparse_block=BLOCK)
    got, s = run_stream(model, cfg, seed, n, backend)
    assert s.cache.memory_chunks == max(0, n - 3)  # filled and read (through a zero projection) from chunk 5
    tol = dict(rtol=1e-5, atol=1e-5) if DEVICE == "cpu" else TOL[torch.float32]
    torch.testing.assert_close(got, dense, **tol, msg=lambda m: f"seed={seed} {backend}: {m}")


@needs_triton
def test_sparse_stream_with_memory_triton_equals_torch_paths():
    seed = fresh_seed()
    model = make_model(seed % 1000)
    cfg, new = switch_attention(model, BASE, sparse_topk=0.75, linear_memory=True, sparse_block=BLOCK)
    with torch.no_grad():
        for p in new:
            p.normal_(0, 0.3)
    n = 6  # 4 key blocks from chunk 4 on (sink, 2 window blocks, current): 3 kept, one window block by score
    dense, _ = run_stream(model, BASE, seed, n)
    torch_paths, s = run_stream(model, cfg, seed, n, "gather")
    triton, _ = run_stream(model, cfg, seed, n, "triton")
    tol = dict(rtol=1e-5, atol=1e-5) if DEVICE == "cpu" else TOL[torch.float32]
    torch.testing.assert_close(triton, torch_paths, **tol, msg=lambda m: f"seed={seed}: {m}")
    # not vacuous: sparse attention and the memory change the output once the context is long enough
    per_chunk = (torch_paths - dense).abs().amax(dim=(0, 1, 3, 4)).view(n, 2).amax(1)
    assert per_chunk[0] < 1e-5 and per_chunk[-1] > 1e-3, f"seed={seed}: {per_chunk}"
    assert s.cache.memory_chunks == n - 4  # evictions from commit 4 on; the first fills the static sink


def test_block_table_keeps_sink_and_current_chunk():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cfg = dataclasses.replace(BASE, sparse_topk=0.25, sparse_block=4)
    cache = KVCache(cfg, num_layers=1, batch=2, heads=2, head_dim=8, grid_hw=(2, 3))  # 6 tokens per frame
    for _ in range(4):
        k = torch.randn(2, 12, 2, 8, generator=g)
        cache.attend(0, k, k, k)
        cache.commit()
    q = torch.randn(2, 12, 2, 8, generator=g)
    keys = torch.randn(2, cache.live_frames * 6, 2, 8, generator=g)  # 60 tokens: 15 blocks of 4
    t = cache.block_table(q, keys)
    blocks = t.block_mask()  # [B, H, 3, 15]
    assert t.nkb == 15 and t.nqb == 3
    assert blocks[..., :3].all() and blocks[..., -3:].all(), f"seed={seed}"  # sink (12 tokens), current chunk
    assert t.kv_cnt.eq(9).all()  # 6 kept + ceil(0.25 * the window's 9 blocks)
    # the window's share goes to its best blocks by pooled score, per query block and head
    from kernels.block_sparse import _pool_blocks

    score = _pool_blocks(q.transpose(1, 2), 4) @ _pool_blocks(keys.transpose(1, 2), 4).transpose(-1, -2)
    window = score[..., 3:12]
    best = window.topk(3, dim=-1).indices + 3
    assert torch.equal(blocks.gather(-1, best), torch.ones_like(best, dtype=torch.bool)), f"seed={seed}"
    assert blocks[..., 3:12].sum(-1).eq(3).all()


@pytest.mark.parametrize("policy", ["none", "static", "ema"])
def test_memory_folds_exactly_the_chunks_that_leave_the_context(policy):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cfg = CacheConfig(frames_per_chunk=1, window_frames=2, sink=policy, sink_frames=1, linear_memory=True)
    cache = KVCache(cfg, num_layers=2, batch=1, heads=2, head_dim=6, grid_hw=(1, 2))
    written = []
    for _ in range(6):
        k, v = torch.randn(1, 2, 2, 6, generator=g), torch.randn(1, 2, 2, 6, generator=g)
        for layer in range(2):
            cache.attend(layer, v, k * (layer + 1), v)
        written.append((k, v))
        cache.commit()
    # chunk c is evicted at commit c + 2; with a sink the first evicted chunk fills it and is not folded
    evicted = written[:4]
    folded = evicted if policy == "none" else evicted[1:]
    assert cache.memory_chunks == len(folded)
    for layer in range(2):
        M = sum(torch.einsum("bthd,bthe->bhde", phi(k * (layer + 1)), v) for k, v in folded)
        z = sum(phi(k * (layer + 1)).sum(1) for k, _ in folded)
        torch.testing.assert_close(cache.mem_M[layer], M, msg=f"seed={seed}")
        torch.testing.assert_close(cache.mem_z[layer], z, msg=f"seed={seed}")
    q = torch.randn(1, 2, 2, 6, generator=g)
    r = cache.memory_readout(1, q)
    fq = phi(q)
    want = torch.einsum("bthd,bhde->bthe", fq, cache.mem_M[1]) / torch.einsum("bthd,bhd->bth", fq,
                                                                              cache.mem_z[1])[..., None]
    torch.testing.assert_close(r, want)
    # a prompt switch with an ema sink keeps it (reset_window); a new video clears it (reset)
    state = cache.memory_state()
    cache.reset_window()
    assert cache.memory_chunks == len(folded)
    cache.reset()
    assert cache.memory_chunks == 0 and cache.mem_M.abs().sum() == 0 and cache.memory_readout(0, q) is None
    cache.set_memory_state(state)
    torch.testing.assert_close(cache.memory_readout(1, q), r)


def test_memory_projection_and_sparse_path_train_through_the_cache():
    """With autograd on (a self-forcing rollout's last step), gradients reach the new projection, through the
    memory read-out, and the queries, through the sparse attention and the read-out."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    model = make_model(seed % 1000)
    cfg, new = switch_attention(model, BASE, sparse_topk=0.5, linear_memory=True, sparse_block=BLOCK)
    cache = KVCache(cfg, num_layers=2, batch=1, heads=2, head_dim=12, grid_hw=(3, 4), device=DEVICE)
    text_kv = model.text_kv(torch.randn(1, 5, 32, generator=g).to(DEVICE))
    with torch.no_grad():  # context chunks (no gradient, as in a rollout): 5 commits, 1 folded into the memory
        for _ in range(5):
            model(torch.randn(1, 4, 2, 6, 8, generator=g).to(DEVICE), torch.zeros(1, device=DEVICE),
                  text_kv=text_kv, ctx=cache)
            cache.commit()
    assert cache.memory_chunks == 1
    x = torch.randn(1, 4, 2, 6, 8, generator=g).to(DEVICE).requires_grad_()
    out = model(x, torch.full((1,), 500.0, device=DEVICE), text_kv=text_kv, ctx=cache)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new), f"seed={seed}"
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_kernel_benchmark_dry_run_sweeps_launch_settings(tmp_path):
    """`benchmarks.kernels_bench --dry-run --sweep` runs the GPU benchmark's code at toy sizes on the CPU: every
    launch setting of the sweep is timed and matches the torch path, and the best of each is named."""
    import json

    from benchmarks.kernels_bench import SWEEP, main

    out = tmp_path / "k.json"
    main(["--dry-run", "--sweep", "--json", str(out)])
    rows = json.loads(out.read_text())["cuda"]
    small = SWEEP["small"]
    for row in rows:
        assert len(row["sweep_fwd"]) == len(small["block_m"]) * len(small["warps"]) * len(small["stages"])
        assert all(e["max_err"] < 1e-4 and e["fwd_ms"] > 0 for e in row["sweep_fwd"])
        assert len(row["sweep_readout"]) == (len(small["readout_block_m"]) * len(small["readout_block_dv"])
                                             * len(small["readout_warps"]) * len(small["readout_row_blocks"]))
        assert {e["row_blocks"] for e in row["sweep_readout"]} == set(small["readout_row_blocks"])
        assert all(e["max_rel_err"] < 1e-4 for e in row["sweep_readout"])
        assert row["sweep_fwd_best"] in row["sweep_fwd"] and row["sweep_readout_best"] in row["sweep_readout"]
