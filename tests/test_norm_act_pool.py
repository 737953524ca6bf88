"""The fused instance norm -> ReLU -> avg pool block (splatdd.norm_act_pool) against its pure-PyTorch
twin in float64 (an independent oracle: F.group_norm, F.relu, F.avg_pool2d), and ConvNet's use of it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from splatdd.models import first_order, get_network
import torch.nn.functional as F

from splatdd.norm_act_pool import (CONV_FUSED_MAX_CIN, conv_instance_norm_act_pool,
                                   fused_available, instance_norm_act_pool,
                                   instance_norm_act_pool_reference)

pytestmark = pytest.mark.skipif(
    not fused_available(torch.zeros(1, 1, 2, 2), grad=True),
    reason="splatdd._C has no norm_act_pool op (an old build): rebuild with pip install -e .")


def _case(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + 1.0
    w = torch.randn(shape[1], generator=g, dtype=torch.float64)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    return x, w, b


def _fused_and_reference(shape, seed, act, pool):
    """Forward and all three gradients of the fused fp32 op and the float64 reference."""
    x, w, b = _case(shape, seed)
    fused_in = [t.float().requires_grad_() for t in (x, w, b)]
    ref_in = [t.clone().requires_grad_() for t in (x, w, b)]
    y = instance_norm_act_pool(*fused_in, act=act, pool=pool)
    y_ref = instance_norm_act_pool_reference(*ref_in, act=act, pool=pool)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    y.backward(g.float())
    y_ref.backward(g)
    return y, y_ref, [t.grad for t in fused_in], [t.grad for t in ref_in]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 6), h=st.integers(2, 13), w=st.integers(2, 13),
       act=st.sampled_from(["relu", "none"]), pool=st.sampled_from(["avg", "none"]),
       seed=st.integers(0, 2 ** 16))
def test_fused_matches_float64_reference(n, c, h, w, act, pool, seed):
    """Forward and gradients (x, weight, bias) within fp32 rounding of the float64 twin, for odd
    and even sizes (the pool drops an odd last row / column)."""
    y, y_ref, grads, grads_ref = _fused_and_reference((n, c, h, w), seed, act, pool)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        # a gradient is a sum over the plane: compare relative to the gradient's scale
        # (x's gradient is ~0 everywhere when a plane pools to one value: its mean is removed)
        scale = max(float(want.abs().max()), 1.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("hw", [(7, 7), (3, 5), (8, 8), (14, 14), (15, 17), (16, 16), (17, 33),
                                (28, 28), (29, 31), (32, 32)])
@pytest.mark.parametrize("act, pool", [("relu", "avg"), ("none", "avg"), ("relu", "none")])
def test_fused_matches_float64_at_row_lengths_around_the_vectors(hw, act, pool):
    """Planes of fewer than 16 values, rows shorter than, equal to and longer than the kernel's
    16-lane vectors (ConvNet's 7/14/28 and 8/16/32), odd rows and columns: forward and gradients
    within fp32 rounding of the float64 twin."""
    y, y_ref, grads, grads_ref = _fused_and_reference((2, 3) + hw, sum(hw), act, pool)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        scale = max(float(want.abs().max()), 1.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("hw", [(7, 7), (14, 14), (15, 9), (28, 28), (33, 17)])
def test_bf16_forward_close_to_fp32_at_row_lengths(hw):
    """The bf16 forward (converted to fp32 per plane) at short, odd and 16-straddling rows."""
    x, w, b = (t.float() for t in _case((2, 4) + hw, 8))
    with torch.no_grad():
        y16 = instance_norm_act_pool(x.bfloat16(), w, b)
        y32 = instance_norm_act_pool_reference(x.bfloat16().float(), w, b)
    torch.testing.assert_close(y16.float(), y32, rtol=2 ** -7, atol=2 ** -7 * float(y32.abs().max()))


def test_fused_matches_reference_at_convnet_size():
    y, y_ref, grads, grads_ref = _fused_and_reference((4, 128, 32, 32), 3, "relu", "avg")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4,
                                   atol=1e-5 * float(want.abs().max()))


def test_bf16_forward_close_to_fp32():
    """bf16 in and out, fp32 arithmetic: within bf16 rounding (8-bit mantissa) of the fp32 result."""
    x, w, b = (t.float() for t in _case((3, 16, 16, 16), 5))
    with torch.no_grad():
        y16 = instance_norm_act_pool(x.bfloat16(), w, b)
        y32 = instance_norm_act_pool_reference(x, w, b)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2 ** -7, atol=2 ** -7 * float(y32.abs().max()))


def test_bits_do_not_depend_on_threads():
    # large enough for 3 workers (a call uses one worker per 2^21 values)
    x, w, b = (t.float() for t in _case((6, 64, 128, 128), 6))
    x.requires_grad_()
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x.grad = None
            y = instance_norm_act_pool(x, w, b)
            y.sum().backward()
            outs.append((y.detach().clone(), x.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for y, g in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(g, outs[0][1])


def test_falls_back_to_reference_where_not_fused():
    """float64 and bf16-with-gradient run the twin (double backward works there)."""
    x, w, b = _case((2, 3, 6, 6), 7)
    x.requires_grad_()
    y = instance_norm_act_pool(x, w, b)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.sum().backward()                       # second derivative through the twin
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not fused_available(x.bfloat16(), grad=True)
    assert fused_available(x.bfloat16(), grad=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.zeros(2, 3, 4)), "4-d"),
    (dict(weight=torch.ones(4)), "weight"),
    (dict(bias=torch.ones(2, 3)), "bias"),
    (dict(act="gelu"), "act"),
    (dict(pool="max"), "pool"),
    (dict(eps=0.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(x=torch.zeros(1, 3, 1, 5)), "H, W >= 2"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    args = dict(x=torch.zeros(1, 3, 4, 4), weight=torch.ones(3), bias=torch.zeros(3))
    args.update({k: v for k, v in kwargs.items() if k in args})
    opts = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        instance_norm_act_pool(args["x"], args["weight"], args["bias"], **opts)


def test_convnet_fused_equals_sequential_and_first_order_restores():
    """ConvNet's fused path: same logits (inference) and same parameter gradients (inside
    first_order) as the layer-by-layer modules; outside first_order a graph uses the modules,
    so second derivatives (dc, tm) still work."""
    net = get_network("ConvNet", 1, 10, 28, seed=0)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    seq = net.classifier(net.features(x).flatten(1))
    with torch.no_grad():
        fused = net(x)
    torch.testing.assert_close(fused, seq.detach(), rtol=1e-4, atol=1e-5)
    net.zero_grad()
    seq.square().sum().backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    with first_order(net):
        assert net.first_order_only
        net(x).square().sum().backward()
    assert not net.first_order_only
    for name, p in net.named_parameters():
        if name.endswith("bias") and p.dim() == 1 and name.startswith("features.") and \
                isinstance(net.features[int(name.split(".")[1])], torch.nn.Conv2d):
            continue       # a conv bias before instance norm has zero gradient: both are rounding
        torch.testing.assert_close(p.grad, want[name], rtol=1e-3,
                                   atol=1e-5 * float(want[name].abs().max()))
    # a second derivative outside first_order: through the modules, no error
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(xg).sum(), xg, create_graph=True)
    g.square().sum().backward()
    assert xg.grad is not None


# ---- the fused first block: 3x3 convolution on few channels -> norm -> ReLU -> pool ------------
def _conv_case(n, cin, k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cin, h, w, generator=g, dtype=torch.float64)        # image-like inputs
    cw = torch.randn(k, cin, 3, 3, generator=g, dtype=torch.float64) / 3
    cb = torch.randn(k, generator=g, dtype=torch.float64) / 10
    nw = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    nb = torch.randn(k, generator=g, dtype=torch.float64) / 10
    return x, cw, cb, nw, nb


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, CONV_FUSED_MAX_CIN), k=st.integers(1, 5),
       h=st.integers(1, 37), w=st.integers(1, 37), pad=st.integers(0, 3),
       act=st.sampled_from(["relu", "none"]), pool=st.sampled_from(["avg", "none"]),
       seed=st.integers(0, 2 ** 16))
def test_conv_fused_matches_float64_reference(n, cin, k, h, w, pad, act, pool, seed):
    """One compiled call == F.conv2d then the float64 twin, for row lengths below, at and above
    the kernel's 16-lane blocks, every padding, odd sizes; the convolution's rounding is divided
    by each plane's standard deviation (>= 0.05 here), hence atol 2e-5."""
    ho, wo = h + 2 * pad - 2, w + 2 * pad - 2
    if ho < (2 if pool == "avg" else 1) or wo < (2 if pool == "avg" else 1):
        with pytest.raises(ValueError):
            conv_instance_norm_act_pool(torch.zeros(n, cin, h, w), torch.zeros(k, cin, 3, 3),
                                        None, None, None, padding=pad, act=act, pool=pool)
        return
    assume(ho * wo >= 2)       # F.group_norm, the oracle, rejects one-value planes
    x, cw, cb, nw, nb = _conv_case(n, cin, k, h, w, seed)
    want = instance_norm_act_pool_reference(F.conv2d(x, cw, cb, padding=pad), nw, nb, act=act,
                                            pool=pool)
    got = conv_instance_norm_act_pool(*(t.float() for t in (x, cw, cb, nw, nb)), padding=pad,
                                      act=act, pool=pool)
    assert got.dtype == torch.float32 and got.shape == want.shape
    std = F.conv2d(x, cw, cb, padding=pad).flatten(2).std(-1, unbiased=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5,
                               atol=2e-5 / max(min(float(std.min()), 1.0), 0.05))


def test_conv_fused_is_used_and_matches_at_convnet_size():
    """FashionMNIST's first block (1 -> 128 channels, 28 px, padding 3) and an RGB one."""
    for cin, size, pad in ((1, 28, 3), (3, 32, 1)):
        x, cw, cb, nw, nb = _conv_case(4, cin, 128, size, size, cin)
        want = instance_norm_act_pool_reference(F.conv2d(x, cw, cb, padding=pad), nw, nb)
        got = conv_instance_norm_act_pool(*(t.float() for t in (x, cw, cb, nw, nb)), padding=pad)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


def test_conv_fused_bits_do_not_depend_on_threads():
    x, cw, cb, nw, nb = (t.float() for t in _conv_case(40, 1, 128, 28, 28, 9))  # 5M values: 2+ workers
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(conv_instance_norm_act_pool(x, cw, cb, nw, nb, padding=3))
    finally:
        torch.set_num_threads(old)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, CONV_FUSED_MAX_CIN), k=st.integers(1, 4),
       h=st.integers(3, 35), w=st.integers(3, 35), pad=st.integers(0, 3),
       act=st.sampled_from(["relu", "none"]), pool=st.sampled_from(["avg", "none"]),
       wants_x=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv_fused_gradients_match_float64(n, cin, k, h, w, pad, act, pool, wants_x, seed):
    """The first-order backward (the convolution recomputed, never stored) against autograd
    through F.conv2d and the float64 twin: gradients of x (when it wants one), the convolution's
    weight and bias and the norm's affine, relative to each gradient's scale. The conv bias's true
    gradient is ~0 (instance norm removes a constant), so it is compared on the weight's scale."""
    ho, wo = h + 2 * pad - 2, w + 2 * pad - 2
    assume(ho >= 2 and wo >= 2)
    ins = _conv_case(n, cin, k, h, w, seed)
    ref = [t.clone().requires_grad_(i > 0 or wants_x) for i, t in enumerate(ins)]
    got = [t.float().requires_grad_(i > 0 or wants_x) for i, t in enumerate(ins)]
    y_ref = instance_norm_act_pool_reference(F.conv2d(ref[0], ref[1], ref[2], padding=pad),
                                             ref[3], ref[4], act=act, pool=pool)
    y = conv_instance_norm_act_pool(*got, padding=pad, act=act, pool=pool)
    assert type(y.grad_fn).__name__ == "_ConvNormActPoolBackward"        # the fused backward
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    y_ref.backward(g)
    y.backward(g.float())
    assert (got[0].grad is not None) == wants_x
    for i, (a, b) in enumerate(zip(got, ref)):
        if b.grad is None:
            continue
        # floor 1: a gradient summed over a plane can cancel to near zero (or be zero in exact
        # arithmetic: a plane pooled to one value loses its normalised part), leaving the fp32
        # rounding of its O(1) terms (a seed gave 0.041 +- 3.4e-6 over 1404 terms)
        scale = max(float((ref[1] if i == 2 else b).grad.abs().max()), 1.0)
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=2e-5 * scale)


def test_conv_fused_backward_bits_do_not_depend_on_threads():
    ins = [t.float().requires_grad_() for t in _conv_case(40, 1, 128, 28, 28, 13)]
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for t in ins:
                t.grad = None
            conv_instance_norm_act_pool(*ins, padding=3).square().sum().backward()
            grads.append([t.grad.clone() for t in ins])
    finally:
        torch.set_num_threads(old)
    for gs in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(gs, grads[0]))


def test_conv_fused_is_first_order_and_falls_back_for_float64_and_wide_inputs():
    """The fused backward refuses a second derivative (like instance_norm_act_pool: models use
    it only inside first_order); float64 or more than CONV_FUSED_MAX_CIN channels run F.conv2d
    and the block, where a second derivative works."""
    x, cw, cb, nw, nb = _conv_case(2, 2, 3, 9, 9, 11)
    xs = x.float().requires_grad_()
    y = conv_instance_norm_act_pool(xs, cw.float(), cb.float(), nw.float(), nb.float())
    (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
    x64 = x.clone().requires_grad_()
    y64 = conv_instance_norm_act_pool(x64, cw, cb, nw, nb)
    assert y64.dtype == torch.float64
    (g64,) = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)
    g64.sum().backward()
    assert x64.grad is not None and torch.isfinite(x64.grad).all()
    wide = _conv_case(1, CONV_FUSED_MAX_CIN + 1, 2, 6, 6, 12)
    torch.testing.assert_close(
        conv_instance_norm_act_pool(*(t.float() for t in wide)).double(),
        instance_norm_act_pool_reference(F.conv2d(wide[0], wide[1], wide[2], padding=1), *wide[3:]),
        rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(1, 2, 8, 8)), "x must be"),
    (dict(x=torch.zeros(2, 8, 8)), "x must be"),
    (dict(conv_weight=torch.zeros(4, 1, 5, 5)), "conv_weight"),
    (dict(conv_bias=torch.zeros(3)), "conv_bias"),
    (dict(weight=torch.ones(3)), "weight"),
    (dict(padding=-1), "padding"),
    (dict(padding=1.5), "padding"),
    (dict(x=torch.zeros(1, 1, 1, 1), padding=0), "smaller than the 3x3 kernel"),
    (dict(act="tanh"), "act"),
    (dict(pool="max"), "pool"),
])
def test_conv_fused_bad_input_is_a_clear_error(change, match):
    args = dict(x=torch.zeros(1, 1, 8, 8), conv_weight=torch.zeros(4, 1, 3, 3),
                conv_bias=torch.zeros(4), weight=torch.ones(4), bias=torch.zeros(4))
    opts = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        conv_instance_norm_act_pool(*args.values(), **opts)


# ---- every compiled build (generic, AVX2, AVX-512) that this CPU runs ------------------------
def _isas():
    from splatdd.render import _C
    bits = _C().cpu_isas()
    return [i for i in (1, 2, 3) if bits & (1 << i)]


@pytest.mark.parametrize("isa", _isas())
def test_every_isa_build_matches_the_default(isa):
    """The norm block (forward fp32 and bf16, backward) and the fused first block (forward,
    backward) compiled for each instruction set agree with the default build within float
    rounding (the CPUs users run on may lack AVX-512 or AVX2: each build is run here)."""
    from splatdd.render import _C
    lib = _C()
    x, w, b = (t.float().contiguous() for t in _case((2, 5, 9, 12), 21))
    N, C, H, W = x.shape

    def nap(isa_, dtype):
        xi = x.to(dtype)
        out = torch.empty((N, C, H // 2, W // 2), dtype=dtype)
        mean, rstd = torch.empty(N, C), torch.empty(N, C)
        lib.norm_act_pool_forward(xi.data_ptr(), 0 if dtype == torch.float32 else 1, w.data_ptr(),
                                  b.data_ptr(), N, C, H, W, 1e-5, True, True, out.data_ptr(),
                                  mean.data_ptr(), rstd.data_ptr(), 1, isa=isa_)
        if dtype != torch.float32:
            return [out.float()]
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).contiguous()
        gx, gw, gb = torch.empty_like(x), torch.empty(N, C), torch.empty(N, C)
        lib.norm_act_pool_backward(x.data_ptr(), w.data_ptr(), b.data_ptr(), N, C, H, W, 1e-5,
                                   True, True, mean.data_ptr(), rstd.data_ptr(), g.data_ptr(),
                                   gx.data_ptr(), gw.data_ptr(), gb.data_ptr(), 1, isa=isa_)
        return [out, gx, gw, gb]

    ins = [t.float().contiguous() for t in _conv_case(2, 3, 4, 13, 18, 22)]
    cx, cw, cb, nw, nb = ins

    def conv(isa_):
        n, cin, h, wd = cx.shape
        k = cw.shape[0]
        out = torch.empty((n, k, (h - 2 + 2) // 2, (wd - 2 + 2) // 2))
        mean, rstd = torch.empty(n, k), torch.empty(n, k)
        lib.conv_norm_act_pool_forward(cx.data_ptr(), cw.data_ptr(), cb.data_ptr(), cin, h, wd, 1,
                                       nw.data_ptr(), nb.data_ptr(), n, k, 1e-5, True, True,
                                       out.data_ptr(), mean.data_ptr(), rstd.data_ptr(), 1,
                                       isa=isa_)
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).contiguous()
        gx, gcw, gcb = torch.empty_like(cx), torch.empty(n, k, cin, 3, 3), torch.empty(n, k)
        gw, gb = torch.empty(n, k), torch.empty(n, k)
        lib.conv_norm_act_pool_backward(cx.data_ptr(), cw.data_ptr(), cb.data_ptr(), cin, h, wd,
                                        1, nw.data_ptr(), nb.data_ptr(), n, k, 1e-5, True, True,
                                        mean.data_ptr(), rstd.data_ptr(), g.data_ptr(),
                                        gx.data_ptr(), gcw.data_ptr(), gcb.data_ptr(),
                                        gw.data_ptr(), gb.data_ptr(), 1, isa=isa_)
        return [out, gx, gcw, gcb, gw, gb]

    # fp32: float rounding of other vector widths; bf16 output: at most one bf16 step (2^-8)
    for got, want, tol in ((nap(isa, torch.float32), nap(0, torch.float32), 2e-5),
                           (nap(isa, torch.bfloat16), nap(0, torch.bfloat16), 2 ** -8),
                           (conv(isa), conv(0), 2e-5)):
        for a, e in zip(got, want):
            scale = max(float(e.abs().max()), 1.0)
            torch.testing.assert_close(a, e, rtol=0, atol=tol * scale)
    # and the conv block against the float64 twin, so a build is not only self-consistent
    ref = instance_norm_act_pool_reference(F.conv2d(*(t.double() for t in (cx, cw, cb)),
                                                    padding=1), nw.double(), nb.double())
    torch.testing.assert_close(conv(isa)[0].double(), ref, rtol=1e-5, atol=2e-5)


def test_isa_bad_input():
    from splatdd.render import _C
    x = torch.zeros(1, 1, 4, 4)
    out = torch.empty(1, 1, 2, 2)
    with pytest.raises(ValueError, match="isa must be"):
        _C().norm_act_pool_forward(x.data_ptr(), 0, 0, 0, 1, 1, 4, 4, 1e-5, True, True,
                                   out.data_ptr(), 0, 0, 1, isa=7)


def _nap_raw(lib, x, w, b, isa, backward=True):
    """The norm block's compiled forward (and backward for a fixed output gradient) with one isa."""
    N, C, H, W = x.shape
    out = torch.empty((N, C, H // 2, W // 2), dtype=x.dtype)
    mean, rstd = torch.empty(N, C), torch.empty(N, C)
    lib.norm_act_pool_forward(x.data_ptr(), 0 if x.dtype == torch.float32 else 1, w.data_ptr(),
                              b.data_ptr(), N, C, H, W, 1e-5, True, True, out.data_ptr(),
                              mean.data_ptr(), rstd.data_ptr(), 1, isa=isa)
    if not backward:
        return [out.float()]
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).contiguous()
    gx, gw, gb = torch.empty_like(x), torch.empty(N, C), torch.empty(N, C)
    lib.norm_act_pool_backward(x.data_ptr(), w.data_ptr(), b.data_ptr(), N, C, H, W, 1e-5, True,
                               True, mean.data_ptr(), rstd.data_ptr(), g.data_ptr(), gx.data_ptr(),
                               gw.data_ptr(), gb.data_ptr(), 1, isa=isa)
    return [out, gx, gw, gb]


def _conv_raw(lib, cx, cw, cb, nw, nb, pad, isa):
    """The fused first block's compiled forward and backward (every gradient) with one isa."""
    n, cin, h, wd = cx.shape
    k = cw.shape[0]
    ho, wo = h + 2 * pad - 2, wd + 2 * pad - 2
    out = torch.empty((n, k, ho // 2, wo // 2))
    mean, rstd = torch.empty(n, k), torch.empty(n, k)
    lib.conv_norm_act_pool_forward(cx.data_ptr(), cw.data_ptr(), cb.data_ptr(), cin, h, wd, pad,
                                   nw.data_ptr(), nb.data_ptr(), n, k, 1e-5, True, True,
                                   out.data_ptr(), mean.data_ptr(), rstd.data_ptr(), 1, isa=isa)
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).contiguous()
    gx, gcw, gcb = torch.empty_like(cx), torch.empty(n, k, cin, 3, 3), torch.empty(n, k)
    gw, gb = torch.empty(n, k), torch.empty(n, k)
    lib.conv_norm_act_pool_backward(cx.data_ptr(), cw.data_ptr(), cb.data_ptr(), cin, h, wd, pad,
                                    nw.data_ptr(), nb.data_ptr(), n, k, 1e-5, True, True,
                                    mean.data_ptr(), rstd.data_ptr(), g.data_ptr(), gx.data_ptr(),
                                    gcw.data_ptr(), gcb.data_ptr(), gw.data_ptr(), gb.data_ptr(), 1,
                                    isa=isa)
    return [out, gx, gcw, gcb, gw, gb], g


@pytest.mark.parametrize("isa", _isas())
def test_every_isa_build_at_convnet_row_lengths(isa):
    """Each compiled build at ConvNet's plane widths (28 / 14 / 7 and 32 / 16 / 8, where rows
    straddle or undershoot the 16-lane vectors): the norm block (fp32 forward and backward, bf16
    forward) within rounding of the default build, and the fused first block's forward and every
    gradient against autograd through F.conv2d and the float64 twin."""
    from splatdd.render import _C
    lib = _C()
    for hw in ((28, 28), (14, 14), (7, 7), (16, 16), (8, 8)):
        x, w, b = (t.float().contiguous() for t in _case((2, 3) + hw, hw[0]))
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2 ** -8)):
            xi = x.to(dtype).contiguous()
            got, want = (_nap_raw(lib, xi, w, b, i, dtype == torch.float32) for i in (isa, 0))
            for a, e in zip(got, want):
                torch.testing.assert_close(a, e, rtol=0, atol=tol * max(float(e.abs().max()), 1.0))
    for cin, size, pad in ((1, 28, 1), (1, 28, 3), (3, 32, 1), (2, 9, 2)):
        ins = [t.float().contiguous() for t in _conv_case(2, cin, 5, size, size, size + pad)]
        got, g = _conv_raw(lib, *ins, pad, isa)
        ref = [t.double().requires_grad_() for t in ins]
        y = instance_norm_act_pool_reference(F.conv2d(ref[0], ref[1], ref[2], padding=pad),
                                             ref[3], ref[4])
        torch.testing.assert_close(got[0].double(), y, rtol=1e-5, atol=2e-5)
        y.backward(g.double())
        sums = [got[1], got[2].sum(0), got[3].sum(0), got[4].sum(0), got[5].sum(0)]
        for i, (a, r) in enumerate(zip(sums, ref)):
            scale = max(float((ref[1] if i == 2 else r).grad.abs().max()), 1.0)
            torch.testing.assert_close(a.double(), r.grad, rtol=0, atol=2e-5 * scale)
