"""Winograd F(4x4, 3x3) convolution (splatdd.winograd) against F.conv2d in float64 (the oracle),
the weight transform against a hand-computed G g G^T, bad input, and thread independence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from splatdd.render import _C
from splatdd.winograd import (MIN_CHANNELS, conv3x3_winograd, winograd_available,
                              winograd_weight)

pytestmark = pytest.mark.skipif(
    not hasattr(_C(), "winograd_input_transform"),
    reason="splatdd._C has no winograd transforms (an old build): rebuild with pip install -e .")

# Error bound, relative to the conditioning of the output plane: the largest over the plane of
# sum_{c,i,j} |x| |w| + |bias| (per output it is not a bound: a tile's error comes from its whole
# 6x6 patch, which can be large where one output's 3x3 window is small). Direct fp32 convolution
# stays near 1e-7 of it; F(4, 3)'s transforms (entries up to 8 and 5, 1/24 and 1/6 in G) amplify
# rounding: measured up to ~4e-6 on ConvNet-size layers and random sizes. 2e-5 leaves margin and
# is still far below the effect of one wrong term (an indexing slip moves an output by about
# |x| |w|, 1 / (9 C) of the conditioning, >= 1e-3 here).
REL_TOL = 2e-5


def _case(n, c, k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(k, c, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    return x, wt, b


def _relative_error(x, wt, b, padding):
    """max |winograd(fp32) - conv2d(fp64)| over each output plane, relative to the plane's
    largest conditioning; and the result's dtype, shape and layout."""
    y = conv3x3_winograd(x.float(), winograd_weight(wt), b.float(), padding=padding)
    ref = F.conv2d(x, wt, b, padding=padding)
    assert y.dtype == torch.float32 and y.shape == ref.shape and y.is_contiguous()
    cond = F.conv2d(x.abs(), wt.abs(), b.abs(), padding=padding).amax(dim=(2, 3), keepdim=True)
    return float(((y.double() - ref).abs() / cond).max())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), k=st.integers(1, 40), h=st.integers(1, 23),
       w=st.integers(1, 23), padding=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
def test_matches_float64_conv2d(n, c, k, h, w, padding, seed):
    """Odd sizes, sizes that are not multiples of the 4x4 tile or smaller than one tile, channel
    counts that are not multiples of the 16-channel blocks, padding 0, 1 and 2."""
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        with pytest.raises(ValueError, match="at least 3 x 3"):
            _relative_error(*_case(n, c, k, h, w, seed), padding)
        return
    assert _relative_error(*_case(n, c, k, h, w, seed), padding) < REL_TOL


@pytest.mark.parametrize("n,h", [(8, 16), (8, 8), (3, 28), (2, 14)])
def test_matches_at_convnet_sizes(n, h):
    """ConvNet's 128 -> 128 layers, with inputs like a ConvNet's (ReLU'd, pooled: non-negative)."""
    x, wt, b = _case(n, 128, 128, h, h, 7)
    x = F.relu(x)
    wt = wt * (2.0 / (9 * 128)) ** 0.5   # Kaiming-like scale
    assert _relative_error(x, wt, b, 1) < REL_TOL


def test_many_images_cross_chunks():
    """More tiles than one chunk (TILES_PER_CHUNK): the chunks' results land in the right images."""
    x, wt, b = _case(37, 16, 20, 16, 16, 3)
    assert _relative_error(x, wt, b, 1) < REL_TOL


def test_no_bias_and_empty_batch():
    x, wt, _ = _case(2, 16, 5, 6, 7, 1)
    y = conv3x3_winograd(x.float(), winograd_weight(wt), None, padding=1)
    torch.testing.assert_close(y.double(), F.conv2d(x, wt, None, padding=1), rtol=0, atol=1e-4)
    empty = conv3x3_winograd(torch.zeros(0, 16, 6, 7), winograd_weight(wt), None, padding=1)
    assert empty.shape == (0, 5, 6, 7)


def test_out():
    """out is written and returned (same bits as without it), over several chunks of images."""
    x, wt, b = _case(40, 16, 24, 8, 8, 6)
    x, U, b = x.float(), winograd_weight(wt), b.float()
    want = conv3x3_winograd(x, U, b)
    out = torch.full((40, 24, 8, 8), float("nan"))
    got = conv3x3_winograd(x, U, b, out=out)
    assert got is out and torch.equal(out, want)
    for bad in (torch.empty(40, 24, 8, 9), torch.empty(40, 24, 8, 8, dtype=torch.float64),
                torch.empty(40, 24, 8, 16)[..., ::2]):
        with pytest.raises(ValueError, match="out must be None or a contiguous CPU float32"):
            conv3x3_winograd(x, U, b, out=bad)
    x16 = torch.randn(40, 16, 8, 8)
    with pytest.raises(ValueError, match="out must not overlap x"):
        conv3x3_winograd(x16, winograd_weight(torch.randn(16, 16, 3, 3)), None, out=x16)


def test_non_contiguous_input():
    """A channels_last or sliced x gives the same bits as its contiguous copy."""
    x, wt, b = _case(2, 16, 8, 9, 9, 5)
    U, xf, bf = winograd_weight(wt), x.float(), b.float()
    want = conv3x3_winograd(xf, U, bf)
    assert torch.equal(conv3x3_winograd(xf.to(memory_format=torch.channels_last), U, bf), want)
    wide = torch.zeros(2, 16, 9, 12)
    wide[..., :9] = xf
    assert torch.equal(conv3x3_winograd(wide[..., :9], U, bf), want)


def test_weight_transform_by_hand():
    """U = G g G^T with G written out (Lavin & Gray's F(4, 3) with points 0, +-1, +-2, inf),
    for one filter, checked entry by entry in float64 arithmetic done here."""
    G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    g = [[1.0, 2.0, -3.0], [0.5, -1.0, 4.0], [2.0, 0.0, 1.0]]
    w = torch.zeros(2, 3, 3, 3)
    w[1, 2] = torch.tensor(g)
    U = winograd_weight(w)
    assert U.shape == (36, 2, 3) and U.dtype == torch.float32 and U.is_contiguous()
    for a in range(6):
        for b in range(6):
            want = sum(G[a][i] * g[i][j] * G[b][j] for i in range(3) for j in range(3))
            assert abs(float(U[6 * a + b, 1, 2]) - want) < 1e-6 * max(1.0, abs(want))
    assert float(U[:, :, :2].abs().max()) == 0.0 and float(U[:, 0, 2].abs().max()) == 0.0


def test_bits_independent_of_thread_count():
    """The transforms (compiled) give the same bits on 1, 2 and 3 threads (sizes large enough
    for the kernels to use three workers: they stay on one thread below ~1M values each)."""
    x, wt, b = _case(200, 32, 80, 15, 13, 11)
    x, U, b = x.float(), winograd_weight(wt), b.float()
    N, C, H, W = x.shape
    K, T = U.shape[1], 4 * 4
    R = N * T   # a multiple of 16
    results_v, results_y = [], []
    m = torch.randn(36, K, R, generator=torch.Generator().manual_seed(2))
    for threads in (1, 2, 3):
        v = torch.empty(36, C, R)
        _C().winograd_input_transform(x.data_ptr(), N, C, H, W, 1, R, v.data_ptr(), threads)
        y = torch.empty(N, K, H, W)
        _C().winograd_output_transform(m.data_ptr(), R, b.data_ptr(), N, K, H, W, y.data_ptr(),
                                       threads)
        results_v.append(v)
        results_y.append(y)
    for v, y in zip(results_v[1:], results_y[1:]):
        assert torch.equal(v, results_v[0]) and torch.equal(y, results_y[0])


def test_input_transform_against_matrix_form():
    """V[6a + b, tile, c] = (B^T d B)[a, b] for the zero-padded 6x6 patch d, computed here with
    B^T as a float64 matrix."""
    BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                      dtype=torch.float64)
    x = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(4))
    pad = 2
    Ho, Wo = 7 + 2 * pad - 2, 5 + 2 * pad - 2
    th, tw = -(-Ho // 4), -(-Wo // 4)
    P, rows = 2 * th * tw, 32   # columns P .. rows - 1 of every (point, channel): zeros
    v = torch.full((36, 3, rows), float("nan"))
    _C().winograd_input_transform(x.data_ptr(), 2, 3, 7, 5, pad, rows, v.data_ptr(), 1)
    assert float(v[:, :, P:].abs().max()) == 0.0
    xp = F.pad(x.double(), (pad, 4 * tw + 2 - 5 - pad, pad, 4 * th + 2 - 7 - pad))
    for n in range(2):
        for ty in range(th):
            for tx in range(tw):
                d = xp[n, :, 4 * ty:4 * ty + 6, 4 * tx:4 * tx + 6]
                want = (BT @ d @ BT.T).reshape(3, 36).T
                got = v[:, :, n * th * tw + ty * tw + tx].double()
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("make,match", [
    (lambda x, U, b: (x[0], U, b), "x must be a 4-d"),
    (lambda x, U, b: (x.double(), U, b), "x must be a CPU float32"),
    (lambda x, U, b: (x.to(torch.bfloat16), U, b), "x must be a CPU float32"),
    (lambda x, U, b: (x, U[:35], b), "U must be a \\(36, K, C\\)"),
    (lambda x, U, b: (x, U.double(), b), "U must be a CPU float32"),
    (lambda x, U, b: (x, U[:, :, :8], b), "U has 8 input channels but x has 16"),
    (lambda x, U, b: (x, U, b[:3]), "bias must be None or a CPU tensor of shape \\(5,\\)"),
    (lambda x, U, b: (x, U, "bias"), "bias must be None"),
    (lambda x, U, b: (x[..., :1, :1], U, b), "at least 3 x 3"),
])
def test_bad_input(make, match):
    x = torch.randn(2, 16, 6, 6)
    U = winograd_weight(torch.randn(5, 16, 3, 3))
    b = torch.randn(5)
    xx, UU, bb = make(x, U, b)
    padding = 0 if xx.dim() == 4 and xx.shape[-1] == 1 else 1
    with pytest.raises(ValueError, match=match):
        conv3x3_winograd(xx, UU, bb, padding=padding)


@pytest.mark.parametrize("padding", [-1, 1.0, True, "1"])
def test_bad_padding(padding):
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        conv3x3_winograd(torch.randn(1, 16, 4, 4), winograd_weight(torch.randn(2, 16, 3, 3)),
                         None, padding=padding)


def test_rejects_input_that_needs_grad():
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    U = winograd_weight(torch.randn(2, 16, 3, 3))
    with pytest.raises(ValueError, match="x requires a gradient"):
        conv3x3_winograd(x, U, None)
    with torch.no_grad():
        assert conv3x3_winograd(x, U, None).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("weight,match", [
    (torch.randn(4, 3, 5, 5), "weight must be a \\(K, C, 3, 3\\)"),
    (torch.randn(4, 3, 3), "weight must be a \\(K, C, 3, 3\\)"),
    (torch.zeros(4, 3, 3, 3, dtype=torch.int32), "floating-point"),
    (torch.zeros(0, 3, 3, 3), "non-empty"),
])
def test_bad_weight(weight, match):
    with pytest.raises(ValueError, match=match):
        winograd_weight(weight)


def test_compiled_transforms_reject_bad_sizes():
    """The compiled entry points check their integer arguments themselves (ValueError, no crash)."""
    buf = torch.zeros(36 * 16 * 4)
    with pytest.raises(ValueError, match="at least 3 x 3"):
        _C().winograd_input_transform(buf.data_ptr(), 1, 1, 1, 1, 0, 16, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="C, H, W >= 1"):
        _C().winograd_input_transform(buf.data_ptr(), 1, 0, 4, 4, 1, 16, buf.data_ptr(), 1)
    for rows in (8, 17):   # fewer than the 4 tiles of an 8 x 8 image is fine; not a multiple of 16
        with pytest.raises(ValueError, match="rows must be >= N"):
            _C().winograd_input_transform(buf.data_ptr(), 1, 1, 8, 8, 1, rows, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="rows must be >= N"):
        _C().winograd_input_transform(buf.data_ptr(), 5, 1, 8, 8, 1, 16, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="must not be null"):
        _C().winograd_input_transform(0, 1, 1, 4, 4, 1, 16, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="K, Ho, Wo >= 1"):
        _C().winograd_output_transform(buf.data_ptr(), 16, 0, 1, 1, 0, 4, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="rows must be >= N"):
        _C().winograd_output_transform(buf.data_ptr(), 16, 0, 5, 1, 8, 8, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C().winograd_output_transform(buf.data_ptr(), 16, 0, 1, 1, 4, 4, buf.data_ptr(), -1)
    with pytest.raises(ValueError, match="isa must be"):
        _C().winograd_output_transform(buf.data_ptr(), 16, 0, 1, 1, 4, 4, buf.data_ptr(), 1, 4)


def _isas():
    bits = _C().winograd_isas()
    return [i for i in (1, 2, 3) if bits >> i & 1]


@pytest.mark.parametrize("isa", [1, 2, 3])
def test_every_instruction_set(isa):
    """Each compiled build of the transforms (baseline, AVX2 gathers, AVX-512 gathers and
    scatters) against the float64 oracle, with edge tiles, padding 0 / 2 and channel counts that
    leave partial blocks of 16 tiles."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run isa {isa}")
    for (n, c, k, h, w, padding, seed) in [(3, 17, 5, 9, 11, 1, 1), (2, 8, 3, 7, 6, 0, 2),
                                           (1, 5, 33, 5, 13, 2, 3), (9, 16, 16, 8, 8, 1, 4)]:
        x, wt, b = _case(n, c, k, h, w, seed)
        y = conv3x3_winograd(x.float(), winograd_weight(wt), b.float(), padding=padding, isa=isa)
        ref = F.conv2d(x, wt, b, padding=padding)
        cond = F.conv2d(x.abs(), wt.abs(), b.abs(), padding=padding).amax(dim=(2, 3), keepdim=True)
        assert float(((y.double() - ref).abs() / cond).max()) < REL_TOL


def test_available():
    w = torch.zeros(32, MIN_CHANNELS, 3, 3)
    x = torch.zeros(1, MIN_CHANNELS, 8, 8)
    assert winograd_available(x, w, grad=False)
    assert not winograd_available(x, w, grad=True)
    assert not winograd_available(x, w, grad=False, stride=2)
    assert not winograd_available(x, w, grad=False, dilation=2)
    assert not winograd_available(x, w, grad=False, groups=2)
    assert not winograd_available(x.double(), w.double(), grad=False)
    assert not winograd_available(x[:, :MIN_CHANNELS - 1], w[:, :MIN_CHANNELS - 1], grad=False)
    assert not winograd_available(x, torch.zeros(32, MIN_CHANNELS, 5, 5), grad=False)
    assert not winograd_available(x, torch.zeros(32, MIN_CHANNELS + 1, 3, 3), grad=False)
