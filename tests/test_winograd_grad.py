"""The Winograd filter gradient (splatdd.winograd.conv3x3_winograd_grad_weight) against the
float64 autograd gradient of F.conv2d (the oracle), its compiled transform against the matrix
form A dY A^T, every instruction set, thread independence, bad input, and the training layer's
kept input transform (splatdd.winograd_train) when a workspace is reused between passes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from splatdd.render import _C
from splatdd.winograd import (TILES_PER_CHUNK, WinogradWorkspace, conv3x3_winograd_grad_weight,
                              winograd_weight)
from splatdd.winograd_train import winograd_conv_first_order, winograd_filters

pytestmark = pytest.mark.skipif(
    not hasattr(_C(), "winograd_grad_transform"),
    reason="splatdd._C has no winograd grad transform (an old build): rebuild with "
           "pip install -e .")

# Error bound relative to the conditioning of a filter's gradient: the largest over (c, i, j) of
# sum_{n, h, w} |dY[n, k, h, w]| |x[n, c, h + i - p, w + j - p]|. A wrong term (an indexing slip)
# moves one entry by about |dY| |x|, far above this; Winograd's rounding was measured up to
# ~2e-6 of it (random sizes and ConvNet layers).
REL_TOL = 1e-5

A_T = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                    [0, 1, -1, 8, -8, 1]], dtype=torch.float64)


def _case(n, c, k, h, w, padding, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    dy = torch.randn(n, k, h + 2 * padding - 2, w + 2 * padding - 2, generator=g,
                     dtype=torch.float64)
    return x, dy


def _oracle(x, dy, padding):
    """float64 d/dw of sum(conv2d(x, w) * dy) by autograd, and its conditioning per filter."""
    k, c = dy.shape[1], x.shape[1]
    w = torch.zeros(k, c, 3, 3, dtype=torch.float64, requires_grad=True)
    ref, = torch.autograd.grad(F.conv2d(x, w, padding=padding), w, dy)
    wa = torch.zeros(k, c, 3, 3, dtype=torch.float64, requires_grad=True)
    cond, = torch.autograd.grad(F.conv2d(x.abs(), wa, padding=padding), wa, dy.abs())
    return ref, cond.amax(dim=(1, 2, 3), keepdim=True)


def _relative_error(x, dy, padding, **kw):
    got = conv3x3_winograd_grad_weight(x.float(), dy.float(), padding, **kw)
    ref, cond = _oracle(x, dy, padding)
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
    return float(((got.double() - ref).abs() / cond).max())


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 24), k=st.integers(1, 24), h=st.integers(1, 19),
       w=st.integers(1, 19), padding=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
def test_matches_float64_autograd(n, c, k, h, w, padding, seed):
    """Odd sizes, planes smaller than a tile or not a multiple of it, padding 0, 1 and 2."""
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        with pytest.raises(ValueError, match="at least 3 x 3"):
            conv3x3_winograd_grad_weight(torch.zeros(n, c, h, w),
                                         torch.zeros(n, k, 1, 1), padding)
        return
    assert _relative_error(*_case(n, c, k, h, w, padding, seed), padding) < REL_TOL


@pytest.mark.parametrize("n,c,h", [(16, 128, 14), (16, 128, 7), (3, 32, 28)])
def test_matches_at_convnet_sizes(n, c, h):
    assert _relative_error(*_case(n, c, c, h, h, 1, n + h), 1) < REL_TOL


def test_many_images_cross_chunks():
    """More tiles than one chunk (TILES_PER_CHUNK): the chunks' products are summed."""
    n = TILES_PER_CHUNK // 4 + 5          # 4 x 4 tiles of 16 x 16 outputs: > 1 chunk
    assert _relative_error(*_case(n, 16, 8, 16, 16, 1, 3), 1) < REL_TOL


def test_grad_transform_against_matrix_form():
    """dm[6a + b, k, tile] = (A dY A^T)[a, b] of the tile's 4x4 block of dY (zero outside the
    plane), columns past the last tile zero."""
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(2, 3, 7, 5, generator=g)
    th, tw = 2, 2
    P, rows = 2 * th * tw, 16
    dm = torch.full((36, 3, rows), float("nan"))
    _C().winograd_grad_transform(dy.data_ptr(), 2, 3, 7, 5, rows, dm.data_ptr(), 1)
    assert float(dm[:, :, P:].abs().max()) == 0.0
    dyp = F.pad(dy.double(), (0, 4 * tw - 5, 0, 4 * th - 7))
    for n in range(2):
        for ty in range(th):
            for tx in range(tw):
                blk = dyp[n, :, 4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4]
                want = (A_T.T @ blk @ A_T).reshape(3, 36).T
                got = dm[:, :, n * th * tw + ty * tw + tx].double()
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def _isas():
    bits = _C().winograd_isas()
    return [i for i in (1, 2, 3) if bits >> i & 1]


@pytest.mark.parametrize("isa", [1, 2, 3])
def test_every_instruction_set(isa):
    """Each compiled build of the transforms against the oracle, with edge tiles and partial
    blocks of 16 tiles."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run isa {isa}")
    for (n, c, k, h, w, padding, seed) in [(3, 17, 5, 9, 11, 1, 1), (2, 8, 3, 7, 6, 0, 2),
                                           (1, 5, 33, 5, 13, 2, 3)]:
        x, dy = _case(n, c, k, h, w, padding, seed)
        assert _relative_error(x, dy, padding, isa=isa) < REL_TOL


def test_bits_independent_of_thread_count():
    """The compiled transform gives the same bits on 1, 2 and 3 threads (large enough for three
    workers)."""
    dy = torch.randn(200, 80, 15, 13, generator=torch.Generator().manual_seed(1))
    rows = 200 * 16
    outs = []
    for threads in (1, 2, 3):
        dm = torch.empty(36, 80, rows)
        _C().winograd_grad_transform(dy.data_ptr(), 200, 80, 15, 13, rows, dm.data_ptr(), threads)
        outs.append(dm)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_workspace_gives_the_same_bits():
    x, dy = _case(4, 16, 8, 12, 12, 1, 7)
    ws = WinogradWorkspace()
    a = conv3x3_winograd_grad_weight(x.float(), dy.float(), 1, workspace=ws)
    b = conv3x3_winograd_grad_weight(x.float(), dy.float(), 1, workspace=ws)
    assert torch.equal(a, b)
    assert torch.equal(a, conv3x3_winograd_grad_weight(x.float(), dy.float(), 1))


def _layer_grads(x, w, b, dy, ws):
    U, Ut = winograd_filters(w)
    xs, ws_, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = winograd_conv_first_order(xs, ws_, bs, U, Ut, padding=1, workspace=ws)
    return y, (xs, ws_, bs)


def test_kept_input_transform_survives_interleaved_passes():
    """The training layer keeps its forward's V in the workspace for the filters' gradient. Two
    forwards on one workspace before either backward overwrite it: the first backward must
    notice (the workspace's generation) and recompute V; both gradients match F.conv2d's."""
    g = torch.Generator().manual_seed(9)
    w, b = torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, generator=g)
    xa, xb = torch.randn(3, 16, 10, 10, generator=g), torch.randn(3, 16, 10, 10, generator=g)
    dy = torch.randn(3, 8, 10, 10, generator=g)
    ws = WinogradWorkspace()
    ya, (xa_s, wa, ba) = _layer_grads(xa, w, b, dy, ws)
    yb, (xb_s, wb, bb) = _layer_grads(xb, w, b, dy, ws)
    ya.backward(dy)          # V in the workspace is xb's by now
    yb.backward(dy)
    for xin, ws_, bs in ((xa_s, wa, ba), (xb_s, wb, bb)):
        xr, wr, br = (t.detach().double().requires_grad_(True) for t in (xin, w, b))
        F.conv2d(xr, wr, br, padding=1).backward(dy.double())
        scale = float(xr.grad.abs().max())
        assert float((xin.grad.double() - xr.grad).abs().max()) < 1e-4 * scale
        _, cond = _oracle(xin.detach().double(), dy.double(), 1)
        assert float(((ws_.grad.double() - wr.grad).abs() / cond).max()) < REL_TOL
        torch.testing.assert_close(bs.grad.double(), br.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make,match", [
    (lambda x, g: (x[0], g, 1), "x must be a 4-d"),
    (lambda x, g: (x.double(), g, 1), "x must be a CPU float32"),
    (lambda x, g: (x, g[:, :, :-1], 1), "grad_out must be a"),
    (lambda x, g: (x, g[:1], 1), "grad_out must be a"),
    (lambda x, g: (x, g.double(), 1), "grad_out must be a CPU float32"),
    (lambda x, g: (x, g, -1), "padding must be"),
    (lambda x, g: (x, "g", 1), "grad_out must be a"),
])
def test_bad_input(make, match):
    x, g = torch.zeros(2, 4, 6, 6), torch.zeros(2, 3, 6, 6)
    with pytest.raises(ValueError, match=match):
        conv3x3_winograd_grad_weight(*make(x, g))


def test_bad_workspace():
    x, g = torch.zeros(2, 4, 6, 6), torch.zeros(2, 3, 6, 6)
    with pytest.raises(ValueError, match="workspace must be"):
        conv3x3_winograd_grad_weight(x, g, 1, workspace={})
    U, Ut = winograd_filters(torch.zeros(3, 4, 3, 3))
    with pytest.raises(ValueError, match="workspace must be"):
        winograd_conv_first_order(x, torch.zeros(3, 4, 3, 3), None, U, Ut, workspace=[])


def test_compiled_transform_rejects_bad_sizes():
    buf = torch.zeros(36 * 16)
    with pytest.raises(ValueError, match="rows must be"):
        _C().winograd_grad_transform(buf.data_ptr(), 5, 1, 8, 8, 16, buf.data_ptr(), 1)
    with pytest.raises(ValueError, match="isa must be"):
        _C().winograd_grad_transform(buf.data_ptr(), 1, 1, 4, 4, 16, buf.data_ptr(), 1, 4)
    with pytest.raises(ValueError, match="num_threads"):
        _C().winograd_grad_transform(buf.data_ptr(), 1, 1, 4, 4, 16, buf.data_ptr(), -1)
    assert winograd_weight(torch.zeros(1, 1, 3, 3)).shape == (36, 1, 1)


def _gg64():
    g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                     dtype=torch.float64)
    return torch.kron(g, g)                     # (36, 9): vec(G^T dU G) = GG^T vec(dU)


@pytest.mark.parametrize("isa", [1, 2, 3])
@pytest.mark.parametrize("pairs", [1, 15, 16, 17, 130])
def test_filter_grad_transform_against_matrix_form(isa, pairs):
    """The compiled G^T dU G (whole blocks of 16 channel pairs and the partial last one) against
    float64 (G kron G)^T vec(dU)."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run isa {isa}")
    du = torch.randn(36, pairs, generator=torch.Generator().manual_seed(pairs), dtype=torch.float64)
    want = (du.T @ _gg64()).view(pairs, 3, 3)
    g = torch.full((pairs, 3, 3), float("nan"))
    duf = du.float().contiguous()
    _C().winograd_filter_grad_transform(duf.data_ptr(), pairs, g.data_ptr(), 1, isa)
    scale = float(du.abs().max())
    assert float((g.double() - want).abs().max()) < 1e-6 * scale


def test_filter_grad_transform_bits_independent_of_threads():
    pairs = 70_003                                   # enough for two workers, a partial block
    du = torch.randn(36, pairs, generator=torch.Generator().manual_seed(5))
    outs = []
    for threads in (1, 2, 3):
        g = torch.empty(pairs, 9)
        _C().winograd_filter_grad_transform(du.data_ptr(), pairs, g.data_ptr(), threads)
        outs.append(g)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="pairs"):
        _C().winograd_filter_grad_transform(du.data_ptr(), -1, g.data_ptr(), 1)
    with pytest.raises(ValueError, match="isa must be"):
        _C().winograd_filter_grad_transform(du.data_ptr(), 1, g.data_ptr(), 1, 4)


@pytest.mark.parametrize("n,h,w,padding,need_w", [(3, 9, 11, 1, True), (20, 16, 16, 1, True),
                                                  (2, 7, 6, 0, True), (2, 5, 13, 2, True),
                                                  (3, 9, 11, 1, False)])
def test_bias_gradient_matches_float64(n, h, w, padding, need_w):
    """The layer's bias gradient (from point (1, 1) of A dY A^T when the filters' gradient is
    taken, else dY's sum) against float64 autograd, across chunks of tiles (n = 20 at 16 x 16)
    and edge tiles."""
    gen = torch.Generator().manual_seed(n + h)
    x = torch.randn(n, 6, h, w, generator=gen)
    wt = torch.randn(5, 6, 3, 3, generator=gen).requires_grad_(need_w)
    b = torch.randn(5, generator=gen, requires_grad=True)
    U, Ut = winograd_filters(wt)
    y = winograd_conv_first_order(x, wt, b, U, Ut, padding=padding)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    b64 = b.detach().double().requires_grad_()
    F.conv2d(x.double(), wt.detach().double(), b64, padding=padding).backward(dy.double())
    cond = float(dy.abs().sum((0, 2, 3)).max())
    assert float((b.grad.double() - b64.grad).abs().max()) < 1e-6 * cond
    assert (wt.grad is not None) == need_w
