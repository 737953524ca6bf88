"""The CPU backend against the dense PyTorch reference (an independent oracle): forward values and
the gradients of (out * v).sum() with respect to every parameter; gradcheck in fp64; the cut-off
error bound against the untruncated mixture."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import splatdd
from splatdd import reference

TAIL = 3.3546262790251185e-04


def make_params(gen, B, N, C, *, size=(0.05, 0.6), dtype=torch.float64, spread=1.2, samples=None):
    """Random Gaussians: centres in [-spread, spread]^2 (some off-image), Cholesky diagonals of
    either sign with |l| in `size` (normalised units) -- or, with samples=(Ws, Hs), |l| chosen so
    that the standard deviations are `size` in *sample* units --, a correlated l21, colours
    N(0, 1), opacities in [-1, 1]."""
    p = torch.empty(B, N, 6 + C, dtype=torch.float64)
    p[..., 0:2] = (torch.rand(B, N, 2, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    lo, hi = size
    scale = (1.0, 1.0) if samples is None else (2.0 / samples[0], 2.0 / samples[1])
    for q, sc in ((2, scale[0]), (4, scale[1])):
        mag = lo + (hi - lo) * torch.rand(B, N, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(B, N, generator=gen) < 0.8, 1.0, -1.0).to(torch.float64)
        p[..., q] = mag * sign * sc
    p[..., 3] = torch.randn(B, N, generator=gen, dtype=torch.float64) * 0.5 * (lo + hi) / 2 * scale[1]
    p[..., 5 : 5 + C] = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    p[..., 5 + C] = torch.rand(B, N, generator=gen, dtype=torch.float64) * 2 - 1
    return p.to(dtype)


def forward_and_grad(fn, params, v, **kw):
    x = params.detach().clone().requires_grad_(True)
    out = fn(x, **kw)
    (out * v.to(out.dtype)).sum().backward()
    return out.detach(), x.grad.detach()


def rel_err(a, b):
    """Normwise relative error max|a - b| / max|b| (0 when both vanish)."""
    a = a.double()
    b = b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def grad_col_errs(a, b, mag=None):
    """Relative error per parameter column ([u, v, l11, l21, l22, c.., alpha]), normwise over
    blocks of like quantities: each geometry column against the largest geometry gradient (u, v and
    the l's share units), colours against the largest colour gradient, alpha against itself.

    `mag`, when given, is a gradient of the same loss with every sign made positive (see
    magnitude_grad): a scale of the summed terms' magnitudes, which a gradient that nearly
    cancels (a sum of terms of both signs) is judged against instead of its own small value --
    the usual floating-point error bound |fl(sum t) - sum t| <= c * eps * sum |t|."""
    a = a.double().reshape(-1, a.shape[-1])
    b = b.double().reshape(-1, b.shape[-1])
    if b.numel() == 0:
        return [0.0]
    P = b.shape[-1]
    gmax = b.abs().max().item()
    blocks = [range(0, 5), range(5, P - 1), range(P - 1, P)]
    errs = [0.0] * P
    for blk in blocks:
        cols = list(blk)
        scale = max(b[:, cols].abs().max().item(), 1e-6 * gmax, 1e-300)
        if mag is not None:
            scale = max(scale, mag.double().reshape(-1, P)[:, cols].abs().max().item())
        for j in cols:
            errs[j] = (a[:, j] - b[:, j]).abs().max().item() / scale
    return errs


def magnitude_grad(params, v, **kw):
    """fp64 reference gradient of (out * |v|).sum() with |colours| and |alpha|: no cancellation
    between pixels, channels or Gaussians (see grad_col_errs)."""
    p = params.detach().double().clone()
    p[..., 5:] = p[..., 5:].abs()  # colours and alpha
    return forward_and_grad(reference.render, p, v.abs(), **kw)[1]


def render_cpu(x, **kw):
    return splatdd.render(x, backend="cpu", **kw)


# ----------------------------------------------------------------------------------------------
# fp64: the backend against the reference to ~machine precision (the maths, exactly)


@pytest.mark.parametrize("ssaa", [1, 2, 4])
@pytest.mark.parametrize("prefilter", [True, False])
def test_fp64_matches_reference(ssaa, prefilter):
    gen = torch.Generator().manual_seed(100 + ssaa * 2 + prefilter)
    B, N, C, H, W = 3, 9, 3, 11, 14
    p = make_params(gen, B, N, C, dtype=torch.float64)
    v = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    kw = dict(H=H, W=W, ssaa=ssaa, prefilter=prefilter)
    out, g = forward_and_grad(render_cpu, p, v, **kw)
    rout, rg = forward_and_grad(reference.render, p, v, **kw)
    assert out.dtype == torch.float64 and g.dtype == torch.float64
    assert rout.abs().max() > 0.05  # a non-trivial image
    assert rel_err(out, rout) < 1e-11
    assert max(grad_col_errs(g, rg)) < 1e-9


# ----------------------------------------------------------------------------------------------
# hypothesis over shapes, channels, ssaa, prefilter, ragged counts (incl. 0)


@st.composite
def cases(draw):
    C = draw(st.sampled_from([1, 2, 3, 4, 8]))
    ragged = draw(st.booleans())
    B = draw(st.integers(1, 3))
    if ragged:
        counts = draw(st.lists(st.integers(0, 6), min_size=B, max_size=B))
        N = None
    else:
        counts = None
        N = draw(st.integers(1, 6))
    H = draw(st.integers(1, 13))
    W = draw(st.integers(1, 13))
    ssaa = draw(st.sampled_from([1, 2, 4]))
    prefilter = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return C, B, N, counts, H, W, ssaa, prefilter, seed


def _draw_params(case, dtype, size, in_samples):
    C, B, N, counts, H, W, ssaa, prefilter, seed = case
    gen = torch.Generator().manual_seed(seed)
    samples = (W * ssaa, H * ssaa) if in_samples else None
    if counts is None:
        p = make_params(gen, B, N, C, size=size, samples=samples)
    else:
        p = make_params(gen, 1, sum(counts), C, size=size, samples=samples)[0]
    v = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    kw = dict(H=H, W=W, ssaa=ssaa, prefilter=prefilter, counts=counts)
    return p.to(dtype), v, kw


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fp64_matches_reference_hypothesis(case):
    """Any sizes, tiny and huge Gaussians included: fp64 agrees to ~machine precision."""
    p, v, kw = _draw_params(case, torch.float64, (0.01, 1.0), in_samples=False)
    out, g = forward_and_grad(render_cpu, p, v, **kw)
    assert out.shape == (v.shape) and out.dtype == torch.float64
    rout, rg = forward_and_grad(reference.render, p, v, **kw)
    assert rel_err(out, rout) < 1e-10
    assert max(grad_col_errs(g, rg)) < 1e-8


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fp32_matches_reference_hypothesis(case):
    """fp32 against the fp64 reference (same input numbers) within 1e-5 relative, for Gaussians
    with standard deviations of 1 to 6 samples. (Smaller ones are ill-conditioned in fp32 for any
    implementation -- the fp32 reference itself then misses by up to ~3e-5 --, see
    test_fp32_tiny_gaussians.)"""
    p32, v, kw = _draw_params(case, torch.float32, (1.0, 6.0), in_samples=True)
    out, g = forward_and_grad(render_cpu, p32, v, **kw)
    assert out.shape == v.shape and out.dtype == torch.float32
    assert g.dtype == torch.float32 and g.shape == p32.shape
    rout, rg = forward_and_grad(reference.render, p32.double(), v, **kw)
    assert rel_err(out, rout) < 1e-5
    errs = grad_col_errs(g, rg, magnitude_grad(p32, v, **kw))
    assert max(errs) < 1e-5, f"per-column relative errors {errs}"


def test_fp32_tiny_gaussians():
    """Sub-sample Gaussians, prefilter off, in fp32: looser tolerance (conditioning, not a bug)."""
    gen = torch.Generator().manual_seed(9)
    B, N, C, H, W = 3, 12, 3, 12, 10
    for ssaa in (1, 4):
        p = make_params(gen, B, N, C, size=(0.05, 1.0), samples=(W * ssaa, H * ssaa), dtype=torch.float32)
        v = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        kw = dict(H=H, W=W, ssaa=ssaa, prefilter=False)
        out, g = forward_and_grad(render_cpu, p, v, **kw)
        rout, rg = forward_and_grad(reference.render, p.double(), v, **kw)
        assert rel_err(out, rout) < 1e-4
        assert max(grad_col_errs(g, rg)) < 1e-3


@pytest.mark.parametrize("ssaa", [1, 2, 4])
def test_fp32_well_conditioned_strict(ssaa):
    """Gaussians of at least a few samples: plain 1e-5 relative, no adaptive slack."""
    gen = torch.Generator().manual_seed(7 + ssaa)
    B, N, C, H, W = 4, 12, 3, 24, 20
    p = make_params(gen, B, N, C, size=(0.1, 0.5), dtype=torch.float32, spread=0.9)
    v = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    kw = dict(H=H, W=W, ssaa=ssaa, prefilter=True)
    out, g = forward_and_grad(render_cpu, p, v, **kw)
    rout, rg = forward_and_grad(reference.render, p.double(), v, **kw)
    assert rel_err(out, rout) < 1e-5
    assert max(grad_col_errs(g, rg)) < 1e-5


def test_large_image_many_gaussians():
    """A 64 x 48 image with 150 Gaussians per image, rows longer than the vector width."""
    gen = torch.Generator().manual_seed(11)
    B, N, C, H, W = 2, 150, 3, 48, 64
    p = make_params(gen, B, N, C, size=(0.03, 0.25), dtype=torch.float32, spread=1.0)
    v = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    kw = dict(H=H, W=W, ssaa=2, prefilter=True)
    out, g = forward_and_grad(render_cpu, p, v, **kw)
    rout, rg = forward_and_grad(reference.render, p.double(), v, **kw)
    assert rel_err(out, rout) < 1e-5
    assert max(grad_col_errs(g, rg)) < 1e-5


def test_simple_kernel_matches(monkeypatch):
    """The plain per-sample loops on splat_math.h's kernel_value / accumulate_sample (selected by
    SPLATDD_CPU_KERNEL=simple) agree with the reference too, so the shared maths is covered."""
    gen = torch.Generator().manual_seed(5)
    B, N, C, H, W = 2, 7, 4, 9, 13
    p = make_params(gen, B, N, C, dtype=torch.float64)
    v = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    for ssaa in (1, 2, 4):
        kw = dict(H=H, W=W, ssaa=ssaa, prefilter=True)
        rout, rg = forward_and_grad(reference.render, p, v, **kw)
        for kernel in ("simple", "generic"):
            monkeypatch.setenv("SPLATDD_CPU_KERNEL", kernel)
            out, g = forward_and_grad(render_cpu, p, v, **kw)
            assert rel_err(out, rout) < 1e-11, kernel
            assert max(grad_col_errs(g, rg)) < 1e-9, kernel
        monkeypatch.delenv("SPLATDD_CPU_KERNEL")


# ----------------------------------------------------------------------------------------------
# gradcheck (fp64, finite differences: independent of both implementations' gradient code)


@pytest.mark.parametrize("ssaa,prefilter", [(1, True), (2, False), (4, True)])
def test_gradcheck(ssaa, prefilter):
    gen = torch.Generator().manual_seed(3 + ssaa)
    B, N, C, H, W = 2, 3, 2, 5, 6
    p = make_params(gen, B, N, C, size=(0.15, 0.6), dtype=torch.float64, spread=0.8)
    p.requires_grad_(True)
    fn = lambda x: render_cpu(x, H=H, W=W, ssaa=ssaa, prefilter=prefilter)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_ragged():
    gen = torch.Generator().manual_seed(21)
    counts = [2, 0, 3]
    p = make_params(gen, 1, 5, 1, size=(0.15, 0.6), dtype=torch.float64, spread=0.8)[0]
    p.requires_grad_(True)
    fn = lambda x: render_cpu(x, H=4, W=5, ssaa=2, counts=counts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# cut-off error bound: |render - untruncated| <= exp(-8) * sum_k |alpha_k| |c_k| per pixel


@pytest.mark.parametrize("ssaa", [1, 2])
def test_cutoff_error_within_bound(ssaa):
    gen = torch.Generator().manual_seed(17)
    B, N, C, H, W = 3, 10, 3, 16, 16
    p = make_params(gen, B, N, C, size=(0.1, 1.5), dtype=torch.float64)
    out = render_cpu(p, H=H, W=W, ssaa=ssaa)
    full = reference.render_untruncated(p, H=H, W=W, ssaa=ssaa)
    alpha = p[..., 5 + C].abs()
    bound = TAIL * torch.einsum("bn,bnc->bc", alpha, p[..., 5 : 5 + C].abs())  # (B, C)
    err = (out - full).abs().amax(dim=(2, 3))
    assert torch.all(err <= bound * (1 + 1e-9) + 1e-14)
    assert err.max() > 0.05 * bound.max()  # the cut-off is really there


def test_cutoff_bound_is_attained():
    """One Gaussian much larger than the image: every sample is inside the support, so the
    truncated kernel is exactly exp(-d2/2) - exp(-8): the bound is met with equality."""
    p = torch.tensor([[[0.1, -0.2, 3.0, 0.5, 2.5, 0.7, -1.3, 0.9]]], dtype=torch.float64)
    out = render_cpu(p, H=8, W=8, ssaa=2)
    full = reference.render_untruncated(p, H=8, W=8, ssaa=2)
    bound = TAIL * 0.9 * torch.tensor([0.7, 1.3], dtype=torch.float64)
    err = (out - full).abs().amax(dim=(2, 3))[0]
    assert torch.allclose(err, bound, rtol=1e-9, atol=0)


def test_constants():
    from splatdd import _C

    assert math.isclose(_C.TAIL_VALUE, TAIL, rel_tol=1e-15)
    assert math.isclose(_C.TAIL_VALUE, math.exp(-0.5 * _C.CUTOFF_RADIUS**2), rel_tol=1e-15)
    assert _C.CUTOFF_RADIUS == 4.0 and _C.MAX_CHANNELS == 8
    assert reference.TAIL_VALUE == _C.TAIL_VALUE
