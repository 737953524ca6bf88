"""A ConvNet's training-batch loss gradient in one compiled call on the CPU (issue 15).

An evaluation epoch (110 images, ConvNet-3, passes of 16) spent about a quarter of its time in
the framework around the kernels: Python, dispatch, tensor objects, autograd nodes and gradient
accumulation. :func:`loss_backward` runs the same kernels (the fused first block and norm blocks
of :mod:`splatdd.norm_act_pool`, the Winograd transforms of :mod:`splatdd.winograd`) and the
batched GEMMs from one compiled call (``splatdd._C.convnet_step``, cpp/convnet_step.cpp): every
pass's forward, softmax cross-entropy and first-order backward, the gradients added to each
parameter's ``.grad`` as autograd would. The GEMMs are ``cblas_sgemm_batch`` from torch's own
BLAS (MKL in the x86 wheels; :func:`sgemm_batch_address`), else a plain compiled loop.

Its PyTorch twin is the network's own modules under autograd, which the tests compare it with
(tests/test_convnet_step.py): the same gradient up to float32 rounding (the Winograd error of
docs/speed.md and a different summation order). :func:`applies` says when it serves a network;
:func:`splatdd.evaluate.train_network` uses it where it does, autograd elsewhere.

>>> import torch
>>> from splatdd.models import get_network
>>> net = get_network("ConvNet", 1, 10, 28, width=16, seed=0)
>>> x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
>>> applies(net, x)
True
>>> loss = loss_backward(net, x, y, chunk=2)
>>> net.classifier.weight.grad.shape
torch.Size([10, 256])
"""
from __future__ import annotations

import ctypes
import functools
import math
import os

import torch
import torch.nn as nn

from .checks import positive_int
from .models import ConvNet
from .norm_act_pool import CONV_FUSED_MAX_CIN
from .render import _C
from .winograd import MIN_CHANNELS, TILES_PER_CHUNK, winograd_weight_pair

__all__ = ["applies", "serves", "loss_backward", "sgemm_batch_address"]


@functools.lru_cache(maxsize=None)
def sgemm_batch_address() -> int:
    """The address of ``cblas_sgemm_batch`` in the BLAS torch was built with (MKL in the x86
    wheels, LP64), or 0 when that build has none (the compiled step then multiplies with a
    plain loop, slower but the same maths).

    >>> isinstance(sgemm_batch_address(), int)
    True
    """
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        try:
            fn = getattr(ctypes.CDLL(path), "cblas_sgemm_batch")
        except (OSError, AttributeError):
            return 0
        return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)
    return 0


def _has_hooks(net: nn.Module) -> bool:
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or getattr(m, "_backward_pre_hooks", None) for m in net.modules())


def applies(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`splatdd.evaluate.train_network` hands ``net``'s steps on the batch ``x`` to
    :func:`loss_backward`: where it :func:`serves` them and torch's BLAS was found
    (:func:`sgemm_batch_address`); without that BLAS the step's plain compiled GEMM loop would be
    slower than autograd's ``torch.bmm``.

    >>> from splatdd.models import get_network
    >>> net, x = get_network("ConvNet", 1, 10, 28, width=16), torch.zeros(2, 1, 28, 28)
    >>> applies(net, x) == (serves(net, x) and sgemm_batch_address() != 0)
    True
    """
    return serves(net, x) and sgemm_batch_address() != 0


def serves(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`loss_backward` serves ``net`` on the batch ``x``: a :class:`ConvNet` with
    instance norm, ReLU and average pooling (or none), its first convolution on at most
    :data:`~splatdd.norm_act_pool.CONV_FUSED_MAX_CIN` channels and the others on at least
    :data:`~splatdd.winograd.MIN_CHANNELS` (3x3, stride 1, zero padding of at most 2), every
    parameter a CPU float32 tensor that requires a gradient, x a CPU float32 batch that does not,
    gradients enabled, no module hooks, and a compiled module with the step.

    >>> from splatdd.models import get_network
    >>> serves(get_network("ConvNet", 1, 10, 28, width=16), torch.zeros(2, 1, 28, 28))
    True
    >>> serves(get_network("ConvNet", 1, 10, 28, width=16, norm="batchnorm"),
    ...         torch.zeros(2, 1, 28, 28))
    False
    """
    if not (isinstance(net, ConvNet) and net._fusable and torch.is_grad_enabled()):
        return False
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype == torch.float32 and not x.requires_grad):
        return False
    convs = [conv for _, conv, _ in net.blocks()]
    if not convs or x.shape[1] != convs[0].in_channels or convs[0].in_channels > \
            CONV_FUSED_MAX_CIN:
        return False
    for j, conv in enumerate(convs):
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros" and conv.padding[0] == conv.padding[1]):
            return False
        if j > 0 and (conv.in_channels < MIN_CHANNELS or conv.padding[0] > 2):
            return False
    for p in net.parameters():
        if not (p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad
                and p.is_contiguous()):
            return False
        if p.grad is not None and not (p.grad.dtype == torch.float32 and p.grad.is_contiguous()
                                       and p.grad.shape == p.shape and not p.grad.is_sparse):
            return False
    if _has_hooks(net):
        return False
    try:
        return hasattr(_C(), "convnet_step")
    except ImportError:
        return False


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _grad(p: torch.Tensor | None) -> torch.Tensor | None:
    """``p.grad``, made (zeros) when missing: the step adds to it."""
    if p is None:
        return None
    if p.grad is None:
        p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return p.grad


def loss_backward(net: ConvNet, x: torch.Tensor, y: torch.Tensor, *, chunk: int | None = None,
                  loss_scale: float | None = None, tiles_per_chunk: int | None = None,
                  blas: bool = True, _checked: bool = False) -> float:
    """Add the gradient of ``loss_scale * sum_i cross_entropy(net(x)[i], y[i])`` to every
    parameter's ``.grad`` (made when missing), in passes of ``chunk`` images (None: one pass);
    ``loss_scale`` defaults to ``1 / len(x)`` (the batch-mean loss, ``F.cross_entropy``'s).
    Returns that loss. Only where :func:`applies` (else ValueError; labels outside the classes
    too, before anything is written).

    ``tiles_per_chunk``: Winograd tiles per GEMM (default
    :data:`splatdd.winograd.TILES_PER_CHUNK`); ``blas=False`` multiplies with the compiled plain
    loop instead of torch's BLAS (for tests; slow), as it does anyway where no BLAS was found.

    >>> from splatdd.models import get_network
    >>> net = get_network("ConvNet", 1, 10, 28, width=16, seed=0)
    >>> x, y = torch.randn(3, 1, 28, 28), torch.tensor([4, 5, 6])
    >>> loss = loss_backward(net, x, y)
    >>> ref = torch.nn.functional.cross_entropy(net(x), y).item()
    >>> abs(loss - ref) < 1e-4
    True
    """
    if not (_checked or serves(net, x)):           # _checked: the caller just asked applies
        raise ValueError("loss_backward serves a CPU float32 ConvNet with instance norm, ReLU and "
                         "average pooling whose parameters all require gradients, on a float32 "
                         "batch that does not, under grad mode and without hooks "
                         "(see splatdd.convnet_step.serves)")
    B = x.shape[0]
    if not (isinstance(y, torch.Tensor) and y.dim() == 1 and y.shape[0] == B
            and not y.dtype.is_floating_point and not y.dtype.is_complex):
        raise ValueError(f"y must be {B} integer class indices, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    classes = net.classifier.out_features
    y = y.to(device="cpu", dtype=torch.int64).contiguous()
    if B and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"y must hold class indices in [0, {classes}), got "
                         f"{int(y.min())}..{int(y.max())}")
    positive_int("chunk", chunk, allow_none=True)
    tiles = positive_int("tiles_per_chunk", tiles_per_chunk, allow_none=True) or TILES_PER_CHUNK
    scale = 1.0 / max(B, 1) if loss_scale is None else float(loss_scale)
    if not math.isfinite(scale):
        raise ValueError(f"loss_scale must be finite, got {loss_scale!r}")
    if B == 0:
        return 0.0
    ptrs, eps, pads = [], [], []
    alive = []                     # the transformed filters, held until the call returns
    for j, (_, conv, norm) in enumerate(net.blocks()):
        U, Uf = winograd_weight_pair(conv.weight) if j > 0 else (None, None)
        alive += [U, Uf]
        for t in (conv.weight, conv.bias, norm.weight, norm.bias, U, Uf):
            ptrs.append(_ptr(t))
        for t in (conv.weight, conv.bias, norm.weight, norm.bias):
            ptrs.append(_ptr(_grad(t)))
        eps.append(float(norm.eps))
        pads.append(int(conv.padding[0]))
    fc = net.classifier
    x = x.contiguous()
    loss = torch.zeros(1, dtype=torch.float32)
    args = [x.data_ptr(), y.data_ptr(), B, x.shape[1], x.shape[2], x.shape[3], classes, scale,
            B if chunk is None else chunk, tiles, net.feature_shape[0],
            net._pool != "none", ptrs, eps, pads, fc.weight.data_ptr(), _ptr(fc.bias),
            _grad(fc.weight).data_ptr(), _ptr(_grad(fc.bias)), loss.data_ptr()]
    lib = _C()
    gemm, threads = (sgemm_batch_address() if blas else 0), torch.get_num_threads()
    need = lib.convnet_step(*args, 0, 0, gemm, threads)
    ws = net.workspace("step").buffer("step", need)
    lib.convnet_step(*args, ws.data_ptr(), need, gemm, threads)
    return float(loss)
