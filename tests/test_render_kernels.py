"""The CPU backend's fp32 loops for every instruction set this machine runs (AVX-512, AVX2,
baseline x86-64; SPLATDD_CPU_KERNEL forces a narrower one) against the dense fp64 reference,
including the forward-differenced long rows, their determinism across thread counts, and that the
kernel's flush-to-zero setting does not leak into the caller's floating-point state."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import splatdd
from splatdd import _C, reference

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ["auto", "avx2", "generic"]


def params(gen, B, N, C, sigma, spread=1.0):
    p = torch.empty(B, N, 6 + C, dtype=torch.float64)
    p[..., 0:2] = (torch.rand(B, N, 2, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    p[..., 2] = sigma * (0.5 + torch.rand(B, N, generator=gen, dtype=torch.float64))
    p[..., 4] = sigma * (0.5 + torch.rand(B, N, generator=gen, dtype=torch.float64))
    p[..., 3] = torch.randn(B, N, generator=gen, dtype=torch.float64) * 0.3 * sigma
    p[..., 5 : 5 + C] = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    p[..., 5 + C] = torch.rand(B, N, generator=gen, dtype=torch.float64) * 2 - 1
    return p.float()


def fwd_bwd(p, v, **kw):
    x = p.detach().clone().requires_grad_(True)
    out = splatdd.render(x, **kw)
    (out * v.to(out.dtype)).sum().backward()
    return out.detach().double(), x.grad.double()


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("SPLATDD_CPU_KERNEL", request.param)
    return request.param


def test_kernel_name(kernel):
    name = _C.cpu_kernel_name()
    assert name in ("avx512", "avx2", "generic")
    if kernel == "generic":
        assert name == "generic"
    if kernel == "avx2":
        assert name in ("avx2", "generic")  # falls back where the CPU lacks AVX2


# sizes: small Gaussians (one chunk per row), and wide ones at 128 px whose rows are several
# chunks long (the forward-differenced path), for ssaa 1, 2, 4; C = 1 and 3 have loops compiled
# for their channel count, C = 5 the general one
@pytest.mark.parametrize("C", [1, 3, 5])
@pytest.mark.parametrize("ssaa", [1, 2, 4])
@pytest.mark.parametrize("R,sigma,N", [(24, 0.2, 6), (128, 0.15, 5)])
def test_fast_loops_match_reference(kernel, ssaa, R, sigma, N, C):
    gen = torch.Generator().manual_seed(ssaa * 100 + R + 7 * C)
    B = 2
    p = params(gen, B, N, C, sigma)
    v = torch.randn(B, C, R, R, generator=gen, dtype=torch.float64)
    kw = dict(H=R, W=R, ssaa=ssaa, prefilter=True)
    out, g = fwd_bwd(p, v, **kw)
    rout, rg = fwd_bwd(p.double(), v, **kw)  # fp64 backend (gradchecked in test_render_reference)
    ref = reference.render(p.double(), R, R, ssaa=ssaa)
    torch.testing.assert_close(rout, ref, rtol=1e-10, atol=1e-12)
    scale = (p[..., 5:5 + C].double().abs() * p[..., 5 + C:].double().abs()).sum(1).max()
    assert float((out - ref).abs().max()) <= 4e-6 * float(scale) + N * 2**-24 * float(scale)
    # gradients: 1e-4 of the norm. A sample lying on a Gaussian's cut-off ellipse can fall inside
    # in fp32 and outside in fp64 (the plain per-sample float path, SPLATDD_CPU_KERNEL=simple,
    # flips the same way): one such sample moved one gradient entry by 1.3e-3 relative (3.7e-5 of
    # the norm) at C = 3, ssaa 4, 24 px, a Gaussian at the image's edge.
    assert float((g - rg).norm() / rg.norm()) < 1e-4


def test_differenced_rows_error_bound(kernel):
    """One very wide Gaussian (rows of ~10 chunks): the drift of the differencing stays inside the
    documented bound, and the kernel values stay in [0, 1)."""
    p = torch.tensor([[[0.1, -0.05, 0.45, 0.1, 0.4, 1.0, 1.0]]])
    out = splatdd.render(p, 256, 256)
    ref = reference.render(p.double(), 256, 256)
    assert float((out.double() - ref).abs().max()) <= 4e-6
    assert 0.0 <= float(out.min()) and float(out.max()) < 1.0


def test_thread_count_does_not_change_bits(kernel):
    gen = torch.Generator().manual_seed(9)
    p = params(gen, 3, 20, 3, 0.15)
    v = torch.randn(3, 3, 96, 96, generator=gen)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = fwd_bwd(p, v, H=96, W=96)
        torch.set_num_threads(3)
        b = fwd_bwd(p, v, H=96, W=96)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_flush_to_zero_does_not_leak(kernel):
    """The loops set FTZ/DAZ while they run and restore the caller's MXCSR: afterwards a denormal
    still survives float32 arithmetic in this thread."""
    tiny = np.float32(1e-39)  # a float32 denormal
    assert tiny * np.float32(1.0) != 0.0
    p = torch.rand(2, 4, 9) * 0.5
    x = p.clone().requires_grad_(True)
    splatdd.render(x, 16, 16).sum().backward()
    assert tiny * np.float32(1.0) != 0.0
    assert float(torch.tensor(1e-39, dtype=torch.float32) * 1.0) != 0.0
