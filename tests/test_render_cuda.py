"""CUDA backend parity with the CPU backend (itself checked against the dense reference in
test_render_reference.py): outputs and every gradient, fp32 / bf16 / fp64, ragged batches with
empty images, C = 1..4 (and 8), ssaa 1/2/4, prefilter on and off, one tile crowded with far more
than 256 Gaussians. Skipped cleanly without a CUDA device or without the compiled CUDA backend."""
from __future__ import annotations

import pytest
import torch

import splatdd

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("cuda" not in splatdd.backends(), reason="splatdd built without the CUDA backend"),
]


def make_params(gen, n, C, *, size=(0.04, 0.4), spread=1.1, dtype=torch.float32):
    p = torch.empty(n, 6 + C, dtype=torch.float64)
    p[:, 0:2] = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    lo, hi = size
    p[:, 2] = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    p[:, 4] = (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)) * torch.where(
        torch.rand(n, generator=gen) < 0.8, 1.0, -1.0).double()
    p[:, 3] = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3 * hi
    p[:, 5 : 5 + C] = torch.randn(n, C, generator=gen, dtype=torch.float64)
    p[:, 5 + C] = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    return p.to(dtype)


def fwd_bwd(params, v, **kw):
    x = params.detach().clone().requires_grad_(True)
    out = splatdd.render(x, **kw)
    (out * v.to(device=out.device, dtype=out.dtype)).sum().backward()
    return out.detach().cpu(), x.grad.detach().cpu()


def rel_err(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def block_errs(a, b):
    """Per-column error, normwise over [geometry | colours | alpha] blocks (see
    test_render_reference.grad_col_errs)."""
    a = a.double().reshape(-1, a.shape[-1])
    b = b.double().reshape(-1, b.shape[-1])
    if b.numel() == 0:
        return [0.0]
    P = b.shape[-1]
    gmax = b.abs().max().item()
    errs = [0.0] * P
    for cols in (list(range(0, 5)), list(range(5, P - 1)), [P - 1]):
        scale = max(b[:, cols].abs().max().item(), 1e-6 * gmax, 1e-300)
        for j in cols:
            errs[j] = (a[:, j] - b[:, j]).abs().max().item() / scale
    return errs


def check_parity(p, counts, v, H, W, ssaa, prefilter, *, out_tol, grad_tol):
    kw = dict(H=H, W=W, ssaa=ssaa, prefilter=prefilter, counts=counts)
    out_cpu, g_cpu = fwd_bwd(p, v, backend="cpu", **kw)
    out_gpu, g_gpu = fwd_bwd(p.cuda(), v, backend="cuda", **kw)
    assert out_gpu.dtype == out_cpu.dtype and g_gpu.dtype == g_cpu.dtype
    assert out_gpu.shape == out_cpu.shape and g_gpu.shape == g_cpu.shape
    assert torch.isfinite(out_gpu).all() and torch.isfinite(g_gpu.float()).all()
    assert rel_err(out_gpu, out_cpu) < out_tol
    errs = block_errs(g_gpu, g_cpu)
    assert max(errs) < grad_tol, f"per-column relative errors {errs}"


@pytest.mark.parametrize("C", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("ssaa", [1, 2, 4])
@pytest.mark.parametrize("prefilter", [True, False])
def test_fp32_parity(C, ssaa, prefilter):
    gen = torch.Generator().manual_seed(C * 100 + ssaa * 10 + prefilter)
    counts = [7, 0, 12, 3, 0, 20]
    H, W = 29, 35
    p = make_params(gen, sum(counts), C)
    v = torch.randn(len(counts), C, H, W, generator=gen)
    check_parity(p, counts, v, H, W, ssaa, prefilter, out_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("ssaa", [1, 2, 4])
def test_fp64_parity(ssaa):
    gen = torch.Generator().manual_seed(40 + ssaa)
    counts = [5, 0, 9]
    H, W = 17, 21
    p = make_params(gen, sum(counts), 3, dtype=torch.float64)
    v = torch.randn(len(counts), 3, H, W, generator=gen, dtype=torch.float64)
    check_parity(p, counts, v, H, W, ssaa, True, out_tol=1e-11, grad_tol=1e-9)


@pytest.mark.parametrize("C", [1, 3, 4])
def test_bf16_parity(C):
    gen = torch.Generator().manual_seed(70 + C)
    counts = [10, 4, 0, 16]
    H, W = 24, 24
    p = make_params(gen, sum(counts), C).bfloat16()
    v = torch.randn(len(counts), C, H, W, generator=gen)
    # outputs accumulate in fp32 on both; gradients are fp32 sums rounded to bf16 (2^-8 relative)
    check_parity(p, counts, v, H, W, 2, True, out_tol=1e-5, grad_tol=1e-2)


def test_dense_batch_and_counts_tensor_on_device():
    gen = torch.Generator().manual_seed(3)
    B, N, C, H, W = 8, 40, 3, 32, 32
    p = make_params(gen, B * N, C).reshape(B, N, 6 + C)
    v = torch.randn(B, C, H, W, generator=gen)
    out_cpu, g_cpu = fwd_bwd(p, v, H=H, W=W)
    out_gpu, g_gpu = fwd_bwd(p.cuda(), v, H=H, W=W)  # backend="auto" picks cuda
    assert rel_err(out_gpu, out_cpu) < 1e-5
    assert max(block_errs(g_gpu, g_cpu)) < 1e-4
    flat = p.reshape(B * N, 6 + C).cuda()
    out_r = splatdd.render(flat, H, W, counts=torch.full((B,), N, device="cuda"))
    assert rel_err(out_r.cpu(), out_cpu) < 1e-5


@pytest.mark.parametrize("ssaa", [1, 2])
def test_crowded_tile(ssaa):
    """1000 Gaussians within a few pixels of one spot (one tile holds far more than 256): every
    one of them must be drawn (the GSDD reference code stops at 256)."""
    gen = torch.Generator().manual_seed(8)
    n, C, H, W = 1000, 3, 32, 32
    p = make_params(gen, n, C, size=(0.02, 0.08))
    p[:, 0:2] = 0.1 + 0.05 * torch.randn(n, 2, generator=gen)
    p[:, 5 + C] = torch.rand(n, generator=gen) * 0.1  # all positive: no cancellation
    p[0, 5 + C] = 0.1
    counts = [n, 0]
    v = torch.randn(2, C, H, W, generator=gen)
    check_parity(p, counts, v, H, W, ssaa, True, out_tol=1e-5, grad_tol=1e-4)
    # dropping any Gaussian would change the image by much more than the tolerance
    one_less = splatdd.render(p[1:].cuda(), H, W, counts=[n - 1, 0], ssaa=ssaa).cpu()
    full = splatdd.render(p.cuda(), H, W, counts=counts, ssaa=ssaa).cpu()
    assert rel_err(one_less, full) > 1e-5


def test_empty_images_and_empty_batch():
    gen = torch.Generator().manual_seed(9)
    C, H, W = 2, 16, 12
    p = make_params(gen, 6, C)
    counts = [0, 6, 0]
    v = torch.randn(3, C, H, W, generator=gen)
    out, g = fwd_bwd(p.cuda(), v, H=H, W=W, counts=counts)
    assert torch.equal(out[0], torch.zeros(C, H, W)) and torch.equal(out[2], torch.zeros(C, H, W))
    check_parity(p, counts, v, H, W, 2, True, out_tol=1e-5, grad_tol=1e-4)
    z = torch.zeros(0, 6 + C, device="cuda", requires_grad=True)
    out = splatdd.render(z, H, W, counts=[0, 0])
    assert out.shape == (2, C, H, W) and out.abs().max().item() == 0
    out.sum().backward()
    assert z.grad.shape == (0, 6 + C)


def test_large_images_and_all_off_screen():
    gen = torch.Generator().manual_seed(10)
    C, H, W = 3, 130, 97  # sizes not multiple of a tile
    p = make_params(gen, 300, C, size=(0.01, 0.3), spread=1.3)
    p[:20, 0] = 5.0  # off screen
    counts = [150, 150]
    v = torch.randn(2, C, H, W, generator=gen)
    check_parity(p, counts, v, H, W, 2, True, out_tol=1e-5, grad_tol=1e-4)


def test_degenerate_covariances_finite_on_cuda():
    C = 3
    rows = [[0.0, 0.0, 0.0, 0.0, 0.0], [0.1, -0.2, 0.0, 0.3, 0.2], [-0.3, 0.4, 0.2, 0.1, 0.0],
            [0.0, 0.0, 300.0, -100.0, 300.0], [40.0, -35.0, 0.1, 0.0, 0.1]]
    p = torch.zeros(len(rows), 6 + C)
    p[:, :5] = torch.tensor(rows)
    p[:, 5:] = 0.7
    for prefilter in (True, False):
        x = p.cuda().requires_grad_(True)
        out = splatdd.render(x, 9, 8, counts=[len(rows)], prefilter=prefilter)
        out.square().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        ref = splatdd.render(p, 9, 8, counts=[len(rows)], prefilter=prefilter)
        assert rel_err(out.detach().cpu(), ref) < 1e-5


def test_runs_on_current_stream_without_host_sync_errors():
    """Render on a side stream; the result must equal the default-stream one."""
    gen = torch.Generator().manual_seed(11)
    p = make_params(gen, 64, 3).reshape(4, 16, 9).cuda()
    base = splatdd.render(p, 32, 32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        other = splatdd.render(p, 32, 32)
    torch.cuda.current_stream().wait_stream(s)
    assert rel_err(other.cpu(), base.cpu()) < 1e-6
