"""Winograd F(4x4, 3x3) convolution for CPU inference: 3x3, stride 1, float32, no grad (issue 15).

On one CPU thread ConvNet's 128 -> 128 convolutions already run near the core's fp32 peak in
oneDNN's direct kernels; Winograd F(4x4, 3x3) needs 36 multiplies per 4x4 output tile per
(input, output) channel pair instead of 144. :func:`conv3x3_winograd` is

1. the input transform ``V = B^T d B`` of every 6x6 input patch (compiled, ``splatdd._C``),
   layout ``V (36, C, R)``: ``R >= P = N * T`` tiles (a multiple of 16),
   ``T = ceil(Ho / 4) * ceil(Wo / 4)``; the compiled loops run over 16 tiles at a time (a
   masked gather per patch element, a masked scatter per output pixel on AVX-512);
2. one ``(K x C) @ (C x R)`` GEMM per transform point: ``M = torch.bmm(U, V)``;
3. the output transform ``y = A^T m A + bias`` (compiled), written straight into NCHW.

Images go through in chunks of about :data:`TILES_PER_CHUNK` tiles (V and M a few megabytes,
reused from chunk to chunk). ``U = G g G^T`` comes from :func:`winograd_weight` (one float32
GEMM), computed once per weight by the caller. Points 0, +-1, +-2 and infinity
(Lavin & Gray 2015, "Fast algorithms for convolutional neural networks").

Accuracy: F(4, 3) amplifies rounding (the transforms have entries up to 8 and 5, G has 1/6 and
1/24), so the float32 result is further from the exact convolution than ``F.conv2d``'s. Against a
float64 convolution on ConvNet-like inputs (ReLU'd activations, Kaiming-scaled 128 -> 128 filters)
the largest error relative to the largest output was measured at about 1e-5 for this function
and 2e-7 for ``F.conv2d`` (benchmarks/results/winograd_speed.md, written by
benchmarks/winograd_speed.py); relative to the conditioning of an output plane (the largest
``sum |x| |w| + |bias|`` in the plane) up to about 5e-6 over random sizes. tests/test_winograd.py
holds it to 2e-5 of that conditioning. That is far below what bf16 (4e-3) or the run-to-run
spread of trained networks would notice, but it is not bit-compatible with ``F.conv2d``.

>>> import torch
>>> import torch.nn.functional as F
>>> x, w, b = torch.randn(2, 16, 9, 11), torch.randn(32, 16, 3, 3), torch.randn(32)
>>> y = conv3x3_winograd(x, winograd_weight(w), b, padding=1)
>>> y.shape
torch.Size([2, 32, 9, 11])
>>> torch.allclose(y, F.conv2d(x, w, b, padding=1), atol=1e-3)
True
"""
from __future__ import annotations

from typing import Optional

import torch

from .render import _C

__all__ = ["winograd_weight", "winograd_weight_pair", "conv3x3_winograd", "conv3x3_winograd_grad_weight",
           "WinogradWorkspace", "winograd_available", "MIN_CHANNELS",
           "TILES_PER_CHUNK"]

#: Input channels below which :func:`winograd_available` says no: with few channels the GEMMs
#: are too thin to pay for the transforms (benchmarks/winograd_speed.py measures the crossover:
#: at K = 128, 32 x 32, one thread, about 0.9x at C = 8 and 1.3x at C = 16).
MIN_CHANNELS = 16

#: Tiles (columns of V and M) per chunk of images: enough for the GEMMs to run near peak, few
#: enough to bound V and M (measured best between 256 and 384 at C = K = 128, one thread).
TILES_PER_CHUNK = 256

_G = ((1 / 4, 0.0, 0.0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0.0, 0.0, 1.0))


# (G kron G)[6a + b, 3i + j] = G[a, i] G[b, j]: vec(G w G^T) = (G kron G) vec(w)
_GG = torch.kron(torch.tensor(_G, dtype=torch.float64),
                 torch.tensor(_G, dtype=torch.float64)).to(torch.float32)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """The transformed filters ``U (36, K, C)``: ``U[6a + b, k, c] = (G w[k, c] G^T)[a, b]``,
    as one float32 GEMM ``(G kron G) @ w.reshape(K * C, 9).T`` (nine-term sums: rounding far
    below Winograd's own; a few tenths of a millisecond at 128 x 128, so training can redo it
    every step), a contiguous CPU float32 tensor (no gradient).

    >>> w = torch.zeros(1, 1, 3, 3); w[0, 0, 1, 1] = 1.0   # the identity filter
    >>> U = winograd_weight(w)
    >>> U.shape
    torch.Size([36, 1, 1])
    >>> round(float(U[7, 0, 0]) * 36, 6)   # (G e G^T)[1, 1] = G[1, 1] ** 2 = (1/6) ** 2
    1.0
    """
    return _filter_transforms(weight, (_GG,))[0]


# the same for the filter turned 180 degrees: tap 3i + j read from 3 (2 - i) + (2 - j) = 8 - (3i + j)
_GG_TURNED = _GG.flip(1).contiguous()


def _filter_transforms(weight: torch.Tensor, maps: tuple) -> list[torch.Tensor]:
    """``(m @ w.reshape(K * C, 9).T).view(36, K, C)`` for each (36, 9) map ``m``, after checking
    ``weight``."""
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 4
            or tuple(weight.shape[2:]) != (3, 3)):
        raise ValueError(f"weight must be a (K, C, 3, 3) tensor, got {_shape(weight)}")
    if not (weight.dtype.is_floating_point and weight.numel() > 0):
        raise ValueError(f"weight must be a non-empty floating-point tensor, got {weight.dtype} "
                         f"of shape {tuple(weight.shape)}")
    K, C = weight.shape[:2]
    w = weight.detach().to("cpu", torch.float32).reshape(K * C, 9)
    return [(m @ w.T).view(36, K, C) for m in maps]


def winograd_weight_pair(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, Uf)``: :func:`winograd_weight` of ``weight`` and of ``weight`` turned 180 degrees
    (``weight.flip(2, 3)``, channels not swapped), both (36, K, C), one float32 GEMM each (no
    flipped copy of the weight). The input gradient's filters are ``Uf`` with each point's matrix
    transposed.

    >>> w = torch.randn(8, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    >>> U, Uf = winograd_weight_pair(w)
    >>> bool((U == winograd_weight(w)).all())
    True
    >>> torch.allclose(Uf, winograd_weight(w.flip(2, 3)), atol=1e-6)
    True
    """
    U, Uf = _filter_transforms(weight, (_GG, _GG_TURNED))
    return U, Uf


def winograd_available(x: torch.Tensor, weight: torch.Tensor, *, grad: bool, stride=1,
                       dilation=1, groups: int = 1) -> bool:
    """Whether :func:`conv3x3_winograd` serves ``conv2d(x, weight)``: CPU float32 x and weight,
    a 3x3 filter, stride 1, dilation 1, groups 1, no gradient (``grad``), at least
    :data:`MIN_CHANNELS` input channels, and a compiled module that has the transforms.

    >>> winograd_available(torch.zeros(1, 64, 8, 8), torch.zeros(64, 64, 3, 3), grad=False)
    True
    >>> winograd_available(torch.zeros(1, 64, 8, 8), torch.zeros(64, 64, 3, 3), grad=True)
    False
    >>> winograd_available(torch.zeros(1, 1, 8, 8), torch.zeros(64, 1, 3, 3), grad=False)
    False
    """
    if grad or groups != 1 or stride not in (1, (1, 1)) or dilation not in (1, (1, 1)):
        return False
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.shape[1] != weight.shape[1] or x.shape[1] < MIN_CHANNELS:
        return False
    try:
        return hasattr(_C(), "winograd_input_transform")
    except ImportError:
        return False


def _check_x(x: torch.Tensor, padding: int, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-d (N, C, H, W) tensor, got {_shape(x)}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU float32 tensor, got {x.dtype} on {x.device}")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"x requires a gradient: {fn} builds no autograd graph "
                         "(use F.conv2d, or torch.no_grad())")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    H, W = x.shape[2:]
    if H + 2 * padding < 3 or W + 2 * padding < 3:
        raise ValueError(f"the padded input must be at least 3 x 3, got {H} x {W} with padding "
                         f"{padding}")
    if x.shape[1] < 1:
        raise ValueError("x must have at least one channel")


def _check(x: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> None:
    _check_x(x, padding, "conv3x3_winograd")
    if not isinstance(U, torch.Tensor) or U.dim() != 3 or U.shape[0] != 36:
        raise ValueError(f"U must be a (36, K, C) tensor from winograd_weight, got {_shape(U)}")
    if U.dtype != torch.float32 or U.device.type != "cpu":
        raise ValueError(f"U must be a CPU float32 tensor, got {U.dtype} on {U.device}")
    if U.shape[2] != x.shape[1]:
        raise ValueError(f"U has {U.shape[2]} input channels but x has {x.shape[1]}")
    if U.shape[1] < 1:
        raise ValueError("U must have at least one output channel")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (U.shape[1],) or bias.device.type != "cpu"):
        raise ValueError(f"bias must be None or a CPU tensor of shape ({U.shape[1]},), got "
                         f"{_shape(bias)}")


def _check_out(out: Optional[torch.Tensor], shape, x: torch.Tensor) -> None:
    if out is None:
        return
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != shape
            or out.dtype != torch.float32 or out.device.type != "cpu"
            or not out.is_contiguous() or out.requires_grad):
        raise ValueError(f"out must be None or a contiguous CPU float32 tensor of shape {shape} "
                         f"without grad, got {_shape(out)}")
    o0, x0 = out.data_ptr(), x.data_ptr()
    o1, x1 = o0 + 4 * out.numel(), x0 + x.element_size() * max(1, x.numel())
    if out.numel() and x.numel() and o0 < x1 and x0 < o1:
        raise ValueError("out must not overlap x (the chunks after the first would read outputs)")


class WinogradWorkspace:
    """The V and M buffers of :func:`conv3x3_winograd` and its gradients, kept between calls so
    that passes of a few images map no fresh pages (fresh ones cost 8 % of a ConvNet training
    epoch here: about 6,000 page faults per epoch of 110 images). Not thread-safe: keep one per
    thread (and, to keep a layer's input transform for its backward, one per layer).

    ``generation`` counts the writes into the forward's V buffer: a V kept for a backward is
    valid while the count is unchanged (else the backward recomputes it).

    >>> ws = WinogradWorkspace()
    >>> a = ws.buffer("v", 100); b = ws.buffer("v", 50)
    >>> a.data_ptr() == b.data_ptr(), b.numel()
    (True, 50)
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self.generation = 0

    def buffer(self, name: str, numel: int) -> torch.Tensor:
        """A float32 buffer of ``numel`` values (the contents are undefined), grown as needed."""
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or (      # one made under inference_mode
                buf.is_inference() and not torch.is_inference_mode_enabled()):
            buf = torch.empty(numel, dtype=torch.float32)
            self._bufs[name] = buf
        return buf[:numel]


def _buffer(ws: Optional[WinogradWorkspace], name: str, numel: int) -> torch.Tensor:
    if ws is None:
        return torch.empty(numel, dtype=torch.float32)
    if not isinstance(ws, WinogradWorkspace):
        raise ValueError(f"workspace must be None or a WinogradWorkspace, got {type(ws).__name__}")
    return ws.buffer(name, numel)


def conv3x3_winograd(x: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: int = 1, *, out: Optional[torch.Tensor] = None,
                     isa: int = 0, workspace: Optional[WinogradWorkspace] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` for a 3x3 filter, stride 1, by Winograd
    F(4x4, 3x3): x (N, C, H, W) CPU float32, ``U = winograd_weight(weight)`` (36, K, C), bias
    (K) or None. Returns a (N, K, H + 2 padding - 2, W + 2 padding - 2) float32 tensor: ``out``
    when given (contiguous, that shape), else a new one. Inference only (no autograd graph; x
    must not require a gradient under grad mode). Uses ``torch.get_num_threads()`` threads; the
    transforms' bits do not depend on the count.

    ``isa``: the instruction set of the compiled transforms, 0 (default) the best this CPU has;
    1 baseline, 2 AVX2, 3 AVX-512 force one (``_C.winograd_isas()`` says which exist; for tests).

    ``out``: a buffer the caller keeps between calls (it must not overlap x). A fresh output of
    256 images of 16 x 16 x 128 costs its page faults on every call (measured 16 % of the call
    here). ``workspace``: a :class:`WinogradWorkspace` for the intermediate V and M (one chunk
    of images), else they are allocated per call.

    >>> x = torch.randn(1, 16, 4, 4)
    >>> U = winograd_weight(torch.randn(8, 16, 3, 3))
    >>> conv3x3_winograd(x, U, None, padding=0).shape
    torch.Size([1, 8, 2, 2])
    >>> out = torch.empty(1, 8, 4, 4)
    >>> conv3x3_winograd(x, U, None, out=out) is out
    True
    """
    return _conv3x3_winograd(x, U, bias, padding, out, isa, workspace, keep=False)[0]


def _rows(n: int, T: int) -> int:
    """Columns of V and M for n images of T tiles each: a multiple of 16 (the transforms'
    vectors)."""
    return -(-n * T // 16) * 16


def _chunking(N: int, Ho: int, Wo: int) -> tuple[int, int, int]:
    """(tiles per image T, images per chunk, columns R of V and M for a full chunk)."""
    T = ((Ho + 3) // 4) * ((Wo + 3) // 4)
    per_chunk = max(1, min(N, TILES_PER_CHUNK // T))
    return T, per_chunk, _rows(per_chunk, T)


def _conv3x3_winograd(x, U, bias, padding, out, isa, ws, keep):
    """conv3x3_winograd's body; with ``keep`` and all of x in one chunk, also returns the input
    transform V (36, C, R) and the workspace generation it was written at, for the filters'
    gradient (else ``None``)."""
    _check(x, U, bias, padding)
    N, C, H, W = x.shape
    K = U.shape[1]
    Ho, Wo = H + 2 * padding - 2, W + 2 * padding - 2
    _check_out(out, (N, K, Ho, Wo), x)
    x = x.detach().contiguous()
    U = U.detach().contiguous()
    y = torch.empty((N, K, Ho, Wo), dtype=torch.float32) if out is None else out
    if N == 0:
        return y, None
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    T, per_chunk, R = _chunking(N, Ho, Wo)
    v_buf = _buffer(ws, "v", 36 * C * R)
    m_buf = _buffer(ws, "m", 36 * K * R)
    if ws is not None:
        ws.generation += 1
    threads = torch.get_num_threads()
    lib = _C()
    v = None
    for n0 in range(0, N, per_chunk):
        n = min(per_chunk, N - n0)
        rows = _rows(n, T)
        v = v_buf[:36 * C * rows].view(36, C, rows)
        m = m_buf[:36 * K * rows].view(36, K, rows)
        lib.winograd_input_transform(x[n0].data_ptr(), n, C, H, W, padding, rows, v.data_ptr(),
                                     threads, isa)
        torch.bmm(U, v, out=m)
        lib.winograd_output_transform(m.data_ptr(), rows, 0 if b is None else b.data_ptr(), n, K,
                                      Ho, Wo, y[n0].data_ptr(), threads, isa)
    kept = keep and per_chunk >= N
    return y, ((v, None if ws is None else ws.generation) if kept else None)


def conv3x3_winograd_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, padding: int = 1, *,
                                 isa: int = 0, workspace: Optional[WinogradWorkspace] = None,
                                 _kept=None, _bias: bool = False):
    """The filters' gradient of ``F.conv2d(x, weight, padding=padding)`` (3x3, stride 1) for the
    output gradient ``grad_out`` (N, K, Ho, Wo), by Winograd F(4x4, 3x3): a (K, C, 3, 3) float32
    tensor, ``G^T (sum over tiles of (A dY A^T) V^T) G`` per transform point (36 multiplies per
    tile and channel pair instead of 144). CPU float32, no autograd graph; ``isa`` as in
    :func:`conv3x3_winograd`, ``workspace`` too. Equal to PyTorch's up to Winograd's float32
    rounding (tests/test_winograd.py). ``_bias`` (internal, for the training layer): also return
    the bias's gradient, ``(gw, gb)``, read off the same transform of ``grad_out`` (its point
    (1, 1) is each tile's pixel sum) instead of a pass over ``grad_out``.

    >>> x, w = torch.randn(2, 16, 8, 8), torch.randn(4, 16, 3, 3)
    >>> g = torch.randn(2, 4, 8, 8)
    >>> ref = torch.ops.aten.convolution_backward(g, x, w, [4], [1, 1], [1, 1], [1, 1], False,
    ...                                           [0, 0], 1, [False, True, False])[1]
    >>> torch.allclose(conv3x3_winograd_grad_weight(x, g, 1), ref, atol=1e-3)
    True
    """
    _check_x(x, padding, "conv3x3_winograd_grad_weight")
    N, C, H, W = x.shape
    Ho, Wo = H + 2 * padding - 2, W + 2 * padding - 2
    if (not isinstance(grad_out, torch.Tensor) or grad_out.dim() != 4
            or grad_out.shape[0] != N or tuple(grad_out.shape[2:]) != (Ho, Wo)
            or grad_out.shape[1] < 1):
        raise ValueError(f"grad_out must be a ({N}, K, {Ho}, {Wo}) tensor for x of shape "
                         f"{tuple(x.shape)} and padding {padding}, got {_shape(grad_out)}")
    if grad_out.dtype != torch.float32 or grad_out.device.type != "cpu":
        raise ValueError(f"grad_out must be a CPU float32 tensor, got {grad_out.dtype} on "
                         f"{grad_out.device}")
    K = grad_out.shape[1]
    if N == 0:
        gw = torch.zeros(K, C, 3, 3, dtype=torch.float32)
        return (gw, torch.zeros(K, dtype=torch.float32)) if _bias else gw
    dU = torch.empty(36, K, C, dtype=torch.float32)
    gb = torch.zeros(K, dtype=torch.float32) if _bias else None
    x = x.detach().contiguous()
    dy = grad_out.detach().contiguous()
    T, per_chunk, R = _chunking(N, Ho, Wo)
    kept = _kept is not None and per_chunk >= N and \
        tuple(_kept[0].shape) == (36, C, _rows(N, T)) and \
        (_kept[1] is None or (workspace is not None and workspace.generation == _kept[1]))
    v_buf = None if kept else _buffer(workspace, "grad_v", 36 * C * R)
    m_buf = _buffer(workspace, "m", 36 * K * R)
    threads = torch.get_num_threads()
    lib = _C()
    for n0 in range(0, N, per_chunk):
        n = min(per_chunk, N - n0)
        rows = _rows(n, T)
        if kept:
            v = _kept[0]
        else:
            v = v_buf[:36 * C * rows].view(36, C, rows)
            lib.winograd_input_transform(x[n0].data_ptr(), n, C, H, W, padding, rows,
                                         v.data_ptr(), threads, isa)
        m = m_buf[:36 * K * rows].view(36, K, rows)
        lib.winograd_grad_transform(dy[n0].data_ptr(), n, K, Ho, Wo, rows, m.data_ptr(),
                                    threads, isa)
        if n0 == 0:
            torch.bmm(m, v.transpose(1, 2), out=dU)
        else:
            dU.baddbmm_(m, v.transpose(1, 2))
        if gb is not None:
            # point (1, 1) of A dY A^T is the sum of the tile's 16 pixels (A's row 1 is all
            # ones; pixels outside the image and columns past the tiles are zero): the bias's
            # gradient from 1/16 of dY's values
            gb += m[7].sum(1)
    # G^T dU G per (output, input) channel pair, compiled (the filter transform's adjoint)
    gw = torch.empty(K, C, 3, 3, dtype=torch.float32)
    lib.winograd_filter_grad_transform(dU.data_ptr(), K * C, gw.data_ptr(), threads, isa)
    return (gw, gb) if _bias else gw
