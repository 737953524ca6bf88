"""Properties of splatdd.render that hold whatever the implementation: permutation invariance,
linearity in colour and opacity, the supersampling identity, bf16 = fp32 on the same numbers,
bitwise determinism across thread counts, finite results for degenerate covariances."""
from __future__ import annotations

import pytest
import torch

import splatdd
from splatdd import reference


def make_params(gen, B, N, C, *, size=(0.05, 0.5), dtype=torch.float32, spread=1.1):
    p = torch.empty(B, N, 6 + C, dtype=torch.float64)
    p[..., 0:2] = (torch.rand(B, N, 2, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    lo, hi = size
    p[..., 2] = lo + (hi - lo) * torch.rand(B, N, generator=gen, dtype=torch.float64)
    p[..., 4] = lo + (hi - lo) * torch.rand(B, N, generator=gen, dtype=torch.float64)
    p[..., 3] = torch.randn(B, N, generator=gen, dtype=torch.float64) * 0.3 * hi
    p[..., 5 : 5 + C] = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    p[..., 5 + C] = torch.rand(B, N, generator=gen, dtype=torch.float64) * 2 - 1
    return p.to(dtype)


def fwd_bwd(params, v, **kw):
    x = params.detach().clone().requires_grad_(True)
    out = splatdd.render(x, **kw)
    (out * v.to(out.dtype)).sum().backward()
    return out.detach(), x.grad.detach()


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_output_shape_dtype_and_default_ssaa():
    gen = torch.Generator().manual_seed(0)
    p = make_params(gen, 2, 4, 3)
    out = splatdd.render(p, 7, 9)
    assert out.shape == (2, 3, 7, 9) and out.dtype == torch.float32
    assert torch.equal(out, splatdd.render(p, 7, 9, ssaa=2, prefilter=True, backend="cpu"))
    assert splatdd.render(p.double(), 7, 9).dtype == torch.float64
    assert splatdd.render(p.bfloat16(), 7, 9).dtype == torch.float32


def test_permutation_invariance():
    gen = torch.Generator().manual_seed(1)
    B, N, C, H, W = 3, 10, 3, 12, 15
    p = make_params(gen, B, N, C)
    v = torch.randn(B, C, H, W, generator=gen)
    perm = torch.randperm(N, generator=gen)
    out, g = fwd_bwd(p, v, H=H, W=W)
    out_p, g_p = fwd_bwd(p[:, perm], v, H=H, W=W)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_p, g[:, perm], rtol=1e-5, atol=1e-5)
    # images are independent: permuting the batch permutes the output
    bperm = torch.tensor([2, 0, 1])
    assert torch.equal(splatdd.render(p[bperm], H, W), out[bperm])


def test_zero_opacity_renders_zeros():
    gen = torch.Generator().manual_seed(2)
    B, N, C, H, W = 2, 6, 4, 8, 8
    p = make_params(gen, B, N, C)
    p[..., 5 + C] = 0
    v = torch.randn(B, C, H, W, generator=gen)
    out, g = fwd_bwd(p, v, H=H, W=W)
    assert torch.equal(out, torch.zeros_like(out))
    # geometry and colour gradients vanish with alpha; the opacity gradient does not
    assert torch.equal(g[..., : 5 + C], torch.zeros_like(g[..., : 5 + C]))
    assert g[..., 5 + C].abs().max() > 0


def test_linear_in_colour_and_opacity():
    gen = torch.Generator().manual_seed(3)
    B, N, C, H, W = 2, 8, 3, 10, 11
    p = make_params(gen, B, N, C, dtype=torch.float64)
    c2 = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    q = p.clone()
    q[..., 5 : 5 + C] = c2
    s = p.clone()
    s[..., 5 : 5 + C] = p[..., 5 : 5 + C] + c2
    torch.testing.assert_close(
        splatdd.render(s, H, W), splatdd.render(p, H, W) + splatdd.render(q, H, W), rtol=1e-12, atol=1e-12
    )
    a = p.clone()
    a[..., 5 + C] *= -2.5
    torch.testing.assert_close(splatdd.render(a, H, W), -2.5 * splatdd.render(p, H, W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prefilter", [True, False])
def test_supersampling_identity(prefilter):
    """render(2H, 2W, ssaa=1) average-pooled 2x2 == render(H, W, ssaa=2): same sample grid, and
    the prefilter is in sample units. Likewise 4x with ssaa=4 and 2H ssaa=2 vs H ssaa=4."""
    gen = torch.Generator().manual_seed(4)
    B, N, C, H, W = 2, 9, 3, 9, 7
    p = make_params(gen, B, N, C, dtype=torch.float64)
    pool = torch.nn.functional.avg_pool2d
    base2 = splatdd.render(p, H, W, ssaa=2, prefilter=prefilter)
    torch.testing.assert_close(pool(splatdd.render(p, 2 * H, 2 * W, ssaa=1, prefilter=prefilter), 2), base2,
                               rtol=1e-12, atol=1e-13)
    base4 = splatdd.render(p, H, W, ssaa=4, prefilter=prefilter)
    torch.testing.assert_close(pool(splatdd.render(p, 4 * H, 4 * W, ssaa=1, prefilter=prefilter), 4), base4,
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(pool(splatdd.render(p, 2 * H, 2 * W, ssaa=2, prefilter=prefilter), 2), base4,
                               rtol=1e-12, atol=1e-13)


def test_bf16_equals_fp32_on_the_same_numbers():
    """bf16 parameters are read exactly and accumulated in fp32: the result is that of fp32
    parameters holding the same (bf16-representable) values, bit for bit; the gradient is the fp32
    gradient rounded to bf16."""
    gen = torch.Generator().manual_seed(5)
    B, N, C, H, W = 3, 12, 3, 16, 16
    p16 = make_params(gen, B, N, C).bfloat16()
    v = torch.randn(B, C, H, W, generator=gen)
    out16, g16 = fwd_bwd(p16, v, H=H, W=W)
    out32, g32 = fwd_bwd(p16.float(), v, H=H, W=W)
    assert out16.dtype == torch.float32 and g16.dtype == torch.bfloat16
    assert torch.equal(out16, out32)
    assert torch.equal(g16, g32.bfloat16())
    # and close to the fp32 render of the unrounded parameters
    p32 = make_params(torch.Generator().manual_seed(5), B, N, C)
    ref = splatdd.render(p32, H, W)
    assert (out16 - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_across_thread_counts(dtype, restore_threads):
    gen = torch.Generator().manual_seed(6)
    counts = [5, 0, 17, 1, 9, 30]
    C, H, W = 3, 23, 19
    p = make_params(gen, 1, sum(counts), C, dtype=dtype)[0]
    v = torch.randn(len(counts), C, H, W, generator=gen, dtype=dtype)
    results = []
    for nt in (1, 2, 3, 7):
        torch.set_num_threads(nt)
        for _ in range(2):
            results.append(fwd_bwd(p, v, H=H, W=W, ssaa=2, counts=counts))
    out0, g0 = results[0]
    for out, g in results[1:]:
        assert torch.equal(out, out0)
        assert torch.equal(g, g0)


def test_ragged_equals_dense_and_per_image():
    gen = torch.Generator().manual_seed(7)
    B, N, C, H, W = 3, 6, 2, 10, 12
    p = make_params(gen, B, N, C)
    dense = splatdd.render(p, H, W)
    ragged = splatdd.render(p.reshape(B * N, 6 + C), H, W, counts=[N] * B)
    assert torch.equal(dense, ragged)
    counts = torch.tensor([4, 0, 6, 2])
    flat = make_params(gen, 1, int(counts.sum()), C)[0]
    out = splatdd.render(flat, H, W, counts=counts)
    assert torch.equal(out[1], torch.zeros(C, H, W))
    start = 0
    for b, n in enumerate(counts.tolist()):
        single = splatdd.render(flat[start : start + n].unsqueeze(0), H, W)
        assert torch.equal(out[b], single[0])
        start += n


def test_empty_inputs():
    p = torch.zeros(0, 9, requires_grad=True)
    out = splatdd.render(p, 5, 4, counts=[0, 0])
    assert out.shape == (2, 3, 5, 4) and torch.equal(out, torch.zeros(2, 3, 5, 4))
    out.sum().backward()
    assert p.grad.shape == (0, 9)
    q = torch.zeros(0, 3, 7)
    assert splatdd.render(q, 5, 4).shape == (0, 1, 5, 4)
    r = torch.zeros(2, 0, 7, requires_grad=True)
    out = splatdd.render(r, 5, 4)
    assert torch.equal(out, torch.zeros(2, 1, 5, 4))
    out.sum().backward()
    assert r.grad.shape == (2, 0, 7)


@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_degenerate_covariances_are_finite(prefilter, dtype):
    """Sigma' = Sigma + delta I >= delta I, so l11 = 0 and/or l22 = 0 renders a finite thin or
    point Gaussian, with finite gradients; far-away and huge Gaussians too."""
    C = 3
    rows = [
        [0.0, 0.0, 0.0, 0.0, 0.0],     # point
        [0.1, -0.2, 0.0, 0.3, 0.2],    # l11 = 0: zero width in x
        [-0.3, 0.4, 0.2, 0.1, 0.0],    # l22 = 0: a line
        [0.2, 0.2, 0.0, 0.0, 0.3],     # l11 = l21 = 0
        [0.5, 0.5, 1e-20, 1e-20, 1e-20],
        [40.0, -35.0, 0.1, 0.0, 0.1],  # far outside
        [0.0, 0.0, 300.0, -100.0, 300.0],  # huge
        [1.0, -1.0, 0.05, 0.01, 0.05],     # centred on the image corner
    ]
    p = torch.zeros(1, len(rows), 6 + C, dtype=torch.float64)
    p[0, :, :5] = torch.tensor(rows, dtype=torch.float64)
    p[0, :, 5 : 5 + C] = torch.linspace(-1, 1, len(rows) * C, dtype=torch.float64).reshape(len(rows), C)
    p[0, :, 5 + C] = 0.8
    p = p.to(dtype)
    v = torch.randn(1, C, 9, 8, generator=torch.Generator().manual_seed(0))
    out, g = fwd_bwd(p, v, H=9, W=8, ssaa=2, prefilter=prefilter)
    assert torch.isfinite(out).all()
    assert torch.isfinite(g.float()).all()
    assert out.abs().max() > 0
    # the point Gaussian with prefilter: a peak of alpha * c * mean(k) at the centre pixel(s)
    if dtype == torch.float64:
        torch.testing.assert_close(out, reference.render(p, 9, 8, prefilter=prefilter), rtol=1e-10, atol=1e-12)


def test_gaussian_outside_image_has_zero_gradient():
    p = torch.tensor([[[5.0, 0.0, 0.1, 0.0, 0.1, 1.0, 1.0]]], requires_grad=True)
    out = splatdd.render(p, 8, 8)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(p.grad, torch.zeros_like(p))
