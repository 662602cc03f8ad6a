"""Linear-attention memory: the torch path against the definition; Triton fold and read-out (values and
gradients) against the torch path; the zero-initialised projection.

Seeds are fresh each run (KERNEL_TEST_SEED=N reproduces a failure); kernel outputs and gradients start as
NaN (poison_outputs). Triton tests are skipped only when triton is not installed.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels._common import poison_outputs
from kernels.linear_memory import EPS, MemoryProjection, fold, phi, readout
from kernels.testing import DEVICE, DTYPES, DTYPE_IDS, HAS_TRITON, TOL, bhld, fresh_seed

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def test_torch_path_matches_the_definition():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 6
    M = torch.zeros(B, H, D, D, device=DEVICE)
    z = torch.zeros(B, H, D, device=DEVICE)
    q = bhld(g, B, H, 5, D)
    assert readout(q, M, z, impl="torch").abs().max() == 0  # an empty memory reads out 0
    chunks = [(bhld(g, B, H, T, D), bhld(g, B, H, T, D)) for T in (3, 7)]
    for k, v in chunks:
        M, z = fold(M, z, k, v, decay=0.5, impl="torch")
    # by hand: token by token, decay 0.5 per fold
    for b in range(B):
        for h in range(H):
            Mh, zh = torch.zeros(D, D, device=DEVICE), torch.zeros(D, device=DEVICE)
            for k, v in chunks:
                Mh, zh = 0.5 * Mh, 0.5 * zh
                for t in range(k.shape[2]):
                    f = F.elu(k[b, h, t]) + 1
                    Mh, zh = Mh + torch.outer(f, v[b, h, t]), zh + f
            torch.testing.assert_close(M[b, h], Mh, msg=f"seed={seed}")
            torch.testing.assert_close(z[b, h], zh, msg=f"seed={seed}")
            for i in range(q.shape[2]):
                f = phi(q[b, h, i])
                torch.testing.assert_close(readout(q, M, z, impl="torch")[b, h, i], (f @ Mh) / (f @ zh),
                                           msg=f"seed={seed}")


CASES = [dict(B=1, H=2, T=45, L=37, D=24, strided=True), dict(B=2, H=1, T=70, L=66, D=16, strided=False)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_fold_and_readout_equal_torch_path(dtype, case):
    c = CASES[case]
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, T, L, D = (c[x] for x in "BHTLD")
    k = bhld(g, B, H, T, D, dtype, strided=c["strided"]).requires_grad_()
    v = bhld(g, B, H, T, D, dtype, strided=c["strided"]).requires_grad_()
    q = bhld(g, B, H, L, D, dtype, strided=c["strided"]).requires_grad_()
    M0 = torch.rand(B, H, D, D, generator=g).to(DEVICE).requires_grad_()
    z0 = torch.rand(B, H, D, generator=g).to(DEVICE).requires_grad_()
    do = torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype)
    dM, dz = torch.randn(B, H, D, D, generator=g).to(DEVICE), torch.randn(B, H, D, generator=g).to(DEVICE)
    inputs = (q, k, v, M0, z0)

    def run(impl):
        M1, z1 = fold(M0, z0, k, v, decay=0.75, impl=impl)
        r = readout(q, M1, z1, impl=impl)
        # gradients through both the read-out and the new state (as a later chunk's read-out would use it)
        loss = (r.float() * do.float()).sum() + (M1 * dM).sum() + (z1 * dz).sum()
        return (M1, z1, r), torch.autograd.grad(loss, inputs)

    with poison_outputs():
        got, g_got = run("triton")
    want, g_want = run("torch")
    st = dict(atol=1e-4, rtol=1e-5) if DEVICE == "cpu" else dict(atol=1e-2, rtol=1e-2)  # state: sums of T terms
    msg = lambda what: lambda m: f"seed={seed} {what}: {m}"  # noqa: E731
    torch.testing.assert_close(got[0], want[0], **st, msg=msg("M"))
    torch.testing.assert_close(got[1], want[1], **st, msg=msg("z"))
    assert got[2].dtype == dtype and got[2].stride() == q.stride()
    torch.testing.assert_close(got[2], want[2], **TOL[dtype], msg=msg("read-out"))
    for name, a, b in zip(["q", "k", "v", "M", "z"], g_got, g_want):
        tol = TOL[dtype] if name in "qkv" else st
        torch.testing.assert_close(a, b, **tol, msg=msg(f"d{name}"))


@needs_triton
def test_triton_readout_of_an_empty_memory_is_zero():
    q = bhld(torch.Generator().manual_seed(fresh_seed()), 1, 2, 20, 16)
    M, z = torch.zeros(1, 2, 16, 16, device=DEVICE), torch.zeros(1, 2, 16, device=DEVICE)
    with poison_outputs():
        assert readout(q, M, z, impl="triton").abs().max() == 0


def test_memory_projection_starts_at_zero():
    p = MemoryProjection(12)
    assert p.weight.abs().sum() == 0 and p.bias.abs().sum() == 0
    assert p(torch.randn(2, 5, 3, 12)).abs().max() == 0
    assert p.weight.requires_grad


@needs_triton
@pytest.mark.parametrize("nsplit", [2, 3, 100])
def test_triton_fold_split_over_tokens_equals_one_run(nsplit):
    """The fold's token split (a GPU fills its multiprocessors with it; the interpreter takes one run) adds
    partial sums of uneven runs, including a last short one and more runs asked for than token blocks."""
    from kernels import linear_memory_triton as tri

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, T, D = 2, 3, 101, 20
    k, v = bhld(g, B, H, T, D, strided=True), bhld(g, B, H, T, D)
    M0, z0 = torch.rand(B, H, D, D, generator=g).to(DEVICE), torch.rand(B, H, D, generator=g).to(DEVICE)
    with poison_outputs():
        got = tri.fold_forward(M0, z0, k, v, 0.5, nsplit=nsplit)
    want = fold(M0, z0, k, v, decay=0.5, impl="torch")
    st = dict(atol=1e-4, rtol=1e-5) if DEVICE == "cpu" else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **st, msg=f"seed={seed} nsplit={nsplit}")
    empty = tri.fold_forward(M0, z0, k[:, :, :0], v[:, :, :0], 0.5)
    torch.testing.assert_close(empty[0], 0.5 * M0)


@needs_triton
@pytest.mark.parametrize("block_m,block_dv,row_blocks", [(16, 16, 1), (32, 8, 1), (64, None, 1), (16, 8, 3),
                                                         (16, None, 8)])
def test_triton_readout_tiled_over_columns_equals_torch_path(block_m, block_dv, row_blocks):
    """The read-out's launch settings (a slice of the output's columns a program, query rows a block, blocks a
    program) change how the work is cut, not the result: odd head dims and lengths (77 rows: the last program's
    blocks run past the end, one of them wholly), a strided q, poisoned outputs."""
    from kernels import linear_memory_triton as tri

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = 2, 3, 77, 20
    q = bhld(g, B, H, L, D, strided=True)
    M, z = torch.rand(B, H, D, D, generator=g).to(DEVICE), torch.rand(B, H, D, generator=g).to(DEVICE)
    with poison_outputs():
        got = tri.readout_forward(q, M, z, EPS, block_m=block_m, block_dv=block_dv, row_blocks=row_blocks)
    st = dict(atol=1e-5, rtol=1e-5) if DEVICE == "cpu" else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, readout(q, M, z, impl="torch"), **st, msg=f"seed={seed}")
