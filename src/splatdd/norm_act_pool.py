"""Fused instance norm -> ReLU -> 2x2 average pool: the block of ConvNet-D, on the CPU (issue 15).

ConvNet-D's block after each convolution is ``GroupNorm(C, C)`` (instance norm with a per-channel
affine), ``ReLU`` and ``AvgPool2d(2, 2)``. On the CPU PyTorch runs these as three memory passes
each (the NCHW average pool alone costs about as much as the convolution before it at 28 px), so
:func:`instance_norm_act_pool` does all three in one compiled call per block (``splatdd._C``:
two reads of each plane for its statistics, one for the output; the backward two).

:func:`instance_norm_act_pool_reference` is the pure-PyTorch twin (gsplat style): the same
maths through ``F.group_norm``, ``F.relu`` and ``F.avg_pool2d``. It serves every case the fused
kernel does not: other devices, dtypes other than float32 / bfloat16, a bfloat16 input that needs
a gradient, and double backward. The fused backward is first-order only
(``once_differentiable``), so models call the fused path under a graph only when told that no
second derivative will be taken (:func:`splatdd.models.first_order`); without a graph (inference,
dm's real-batch embeddings, the test pass) it is always safe.

>>> import torch
>>> x = torch.randn(2, 4, 8, 8)
>>> w, b = torch.ones(4), torch.zeros(4)
>>> y = instance_norm_act_pool(x, w, b)
>>> y.shape
torch.Size([2, 4, 4, 4])
>>> torch.allclose(y, instance_norm_act_pool_reference(x, w, b), atol=1e-5)
True
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .render import _C

__all__ = ["instance_norm_act_pool", "instance_norm_act_pool_reference", "fused_available",
           "conv_instance_norm_act_pool", "CONV_FUSED_MAX_CIN"]

#: Input channels up to which :func:`conv_instance_norm_act_pool` computes the convolution itself
#: (a ConvNet's first block: the image's 1 or 3 channels). There oneDNN's convolution is bound by
#: writing its (N, 128, H, W) output, which the fused call never stores; wider inputs are
#: compute-bound and stay with the library's convolution.
CONV_FUSED_MAX_CIN = 4

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def _ptr(t: Optional[torch.Tensor]) -> int:
    """A tensor's address for the compiled ops; 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           eps: float, act: str, pool: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-d (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (C,)):
            raise ValueError(f"{name} must be None or a tensor of shape ({C},), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if act not in ("relu", "none"):
        raise ValueError(f"act must be 'relu' or 'none', got {act!r}")
    if pool not in ("avg", "none"):
        raise ValueError(f"pool must be 'avg' or 'none', got {pool!r}")
    if not (isinstance(eps, (int, float)) and 0 < float(eps) < 1e30):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if pool == "avg" and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"pool='avg' needs H, W >= 2, got {tuple(x.shape[2:])}")


def instance_norm_act_pool_reference(x: torch.Tensor, weight: Optional[torch.Tensor],
                                     bias: Optional[torch.Tensor], *, eps: float = 1e-5,
                                     act: str = "relu", pool: str = "avg") -> torch.Tensor:
    """``avg_pool2d(relu(group_norm(x, C, weight, bias, eps)), 2, 2)`` in plain PyTorch (the
    twin of :func:`instance_norm_act_pool`; any device, dtype and order of derivative).

    >>> x = torch.randn(1, 2, 4, 4)
    >>> instance_norm_act_pool_reference(x, None, None, pool="none").shape
    torch.Size([1, 2, 4, 4])
    """
    _check(x, weight, bias, eps, act, pool)
    y = F.group_norm(x, x.shape[1], weight, bias, eps)
    if act == "relu":
        y = F.relu(y)
    if pool == "avg":
        y = F.avg_pool2d(y, 2, 2)
    return y


def fused_available(x: torch.Tensor, *, grad: bool) -> bool:
    """Whether the compiled kernel handles ``x``: a CPU float32 tensor, or bfloat16 when no
    gradient is needed (``grad``), and a compiled module that has the op.

    >>> fused_available(torch.zeros(1, 1, 2, 2), grad=True)
    True
    >>> fused_available(torch.zeros(1, 1, 2, 2, dtype=torch.float64), grad=False)
    False
    """
    if x.device.type != "cpu" or x.dtype not in _DTYPE_CODE or x.dim() != 4:
        return False
    if grad and x.dtype != torch.float32:
        return False
    try:
        return hasattr(_C(), "norm_act_pool_forward")
    except ImportError:
        return False


def _forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             eps: float, relu: bool, pool: bool, save_stats: bool):
    N, C, H, W = x.shape
    out_hw = (H // 2, W // 2) if pool else (H, W)
    out = torch.empty((N, C) + out_hw, dtype=x.dtype)
    mean = rstd = None
    if save_stats:
        mean = torch.empty((N, C), dtype=torch.float32)
        rstd = torch.empty((N, C), dtype=torch.float32)
    _C().norm_act_pool_forward(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _ptr(weight), _ptr(bias), N, C, H, W, float(eps),
        relu, pool, out.data_ptr(), _ptr(mean), _ptr(rstd), torch.get_num_threads())
    return out, mean, rstd


class _NormActPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, pool):
        out, mean, rstd = _forward(x, weight, bias, eps, relu, pool, save_stats=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.meta = (eps, relu, pool)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        eps, relu, pool = ctx.meta
        N, C, H, W = x.shape
        grad_out = grad_out.to(torch.float32).contiguous()
        grad_x = torch.empty_like(x)
        gw = torch.empty((N, C), dtype=torch.float32)
        gb = torch.empty((N, C), dtype=torch.float32)
        _C().norm_act_pool_backward(
            x.data_ptr(), _ptr(weight), _ptr(bias), N, C, H, W, float(eps), relu, pool,
            mean.data_ptr(), rstd.data_ptr(), grad_out.data_ptr(), grad_x.data_ptr(),
            gw.data_ptr(), gb.data_ptr(), torch.get_num_threads())
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (grad_x if need_x else None, gw.sum(0) if need_w else None,
                gb.sum(0) if need_b else None, None, None, None)


def instance_norm_act_pool(x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], *, eps: float = 1e-5, act: str = "relu",
                           pool: str = "avg") -> torch.Tensor:
    """Instance norm with a per-channel affine (``GroupNorm(C, C)``), then ``act`` (``"relu"`` or
    ``"none"``), then ``pool`` (``"avg"``: 2x2 stride 2, floor; or ``"none"``), fused on the CPU.

    Equal to :func:`instance_norm_act_pool_reference` up to float rounding (tests/test_norm_act_pool.py);
    first-order differentiable in x, weight and bias. Falls back to the reference where the
    compiled kernel does not apply (:func:`fused_available`).

    >>> x = torch.randn(3, 8, 6, 6, requires_grad=True)
    >>> instance_norm_act_pool(x, torch.ones(8), torch.zeros(8)).sum().backward()
    >>> x.grad.shape
    torch.Size([3, 8, 6, 6])
    """
    _check(x, weight, bias, eps, act, pool)
    affine = [t for t in (weight, bias) if t is not None]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x] + affine)
    if not fused_available(x, grad=grad) or any(
            t.device.type != "cpu" or (grad and t.dtype != torch.float32) for t in affine):
        return instance_norm_act_pool_reference(x, weight, bias, eps=eps, act=act, pool=pool)
    relu, pooled = act == "relu", pool == "avg"
    if not grad:       # the affine in fp32 whatever its dtype (a bf16 copy of a network)
        weight, bias = (None if t is None else t.detach().float().contiguous()
                        for t in (weight, bias))
        return _forward(x.contiguous(), weight, bias, eps, relu, pooled, save_stats=False)[0]
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    return _NormActPool.apply(x.contiguous(), weight, bias, float(eps), relu, pooled)


class _ConvNormActPool(torch.autograd.Function):
    """The fused first block with its first-order backward (the convolution is recomputed there,
    never stored)."""

    @staticmethod
    def forward(ctx, x, cw, cb, weight, bias, padding, eps, relu, pool):
        out, mean, rstd = _conv_forward(x, cw, cb, weight, bias, padding, eps, relu, pool,
                                        save_stats=True)
        ctx.save_for_backward(x, cw, cb, weight, bias, mean, rstd)
        ctx.meta = (padding, eps, relu, pool)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, cw, cb, weight, bias, mean, rstd = ctx.saved_tensors
        padding, eps, relu, pool = ctx.meta
        N, Cin, Hin, Win = x.shape
        K = cw.shape[0]
        need = ctx.needs_input_grad
        grad_out = grad_out.to(torch.float32).contiguous()
        gx = torch.empty_like(x) if need[0] else None
        gcw = torch.empty((N, K, Cin, 3, 3), dtype=torch.float32)
        gcb = torch.empty((N, K), dtype=torch.float32) if need[2] else None
        gw = torch.empty((N, K), dtype=torch.float32)
        gb = torch.empty((N, K), dtype=torch.float32)
        _C().conv_norm_act_pool_backward(
            x.data_ptr(), cw.data_ptr(), _ptr(cb), Cin, Hin, Win, padding, _ptr(weight),
            _ptr(bias), N, K, float(eps), relu, pool, mean.data_ptr(), rstd.data_ptr(),
            grad_out.data_ptr(), _ptr(gx), gcw.data_ptr(), _ptr(gcb), gw.data_ptr(), gb.data_ptr(),
            torch.get_num_threads())
        return (gx, gcw.sum(0) if need[1] else None, gcb.sum(0) if need[2] else None,
                gw.sum(0) if need[3] else None, gb.sum(0) if need[4] else None,
                None, None, None, None)


def _conv_forward(x, cw, cb, weight, bias, padding, eps, relu, pool, save_stats):
    N, Cin, Hin, Win = x.shape
    K = cw.shape[0]
    Ho, Wo = Hin + 2 * padding - 2, Win + 2 * padding - 2
    out = torch.empty((N, K) + ((Ho // 2, Wo // 2) if pool else (Ho, Wo)), dtype=torch.float32)
    mean = torch.empty((N, K), dtype=torch.float32) if save_stats else None
    rstd = torch.empty((N, K), dtype=torch.float32) if save_stats else None
    _C().conv_norm_act_pool_forward(
        x.data_ptr(), cw.data_ptr(), _ptr(cb), Cin, Hin, Win, padding, _ptr(weight), _ptr(bias),
        N, K, float(eps), relu, pool, out.data_ptr(), _ptr(mean), _ptr(rstd),
        torch.get_num_threads())
    return out, mean, rstd


def conv_instance_norm_act_pool(x: torch.Tensor, conv_weight: torch.Tensor,
                                conv_bias: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], *, padding: int = 1,
                                eps: float = 1e-5, act: str = "relu",
                                pool: str = "avg") -> torch.Tensor:
    """``instance_norm_act_pool(conv2d(x, conv_weight, conv_bias, padding=padding), weight, bias)``
    for a 3x3 stride-1 convolution, in one compiled call on the CPU when every tensor is float32
    and x has at most :data:`CONV_FUSED_MAX_CIN` channels: each output plane is computed into
    scratch, normalised, activated and pooled, so the convolution's full-resolution output (the
    largest tensor of a ConvNet) is never written; its first-order backward recomputes the
    planes. Elsewhere it is those two calls. Like :func:`instance_norm_act_pool`, differentiable
    once (x, all four parameters), not twice.

    Equal to the two calls up to float rounding (the convolution sums in another order; the
    instance norm's division by the plane's standard deviation scales that rounding, bounded in
    tests/test_norm_act_pool.py).

    >>> x = torch.randn(2, 1, 28, 28)
    >>> cw, cb = torch.randn(8, 1, 3, 3), torch.randn(8)
    >>> y = conv_instance_norm_act_pool(x, cw, cb, torch.ones(8), torch.zeros(8), padding=3)
    >>> y.shape
    torch.Size([2, 8, 16, 16])
    >>> ref = instance_norm_act_pool_reference(F.conv2d(x, cw, cb, padding=3), None, None)
    >>> torch.allclose(y, ref, atol=1e-4)
    True
    """
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 4 or tuple(
            conv_weight.shape[2:]) != (3, 3):
        raise ValueError("conv_weight must be a (C_out, C_in, 3, 3) tensor, got "
                         f"{tuple(conv_weight.shape) if isinstance(conv_weight, torch.Tensor) else conv_weight!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != conv_weight.shape[1]:
        raise ValueError(f"x must be a 4-d (N, {conv_weight.shape[1]}, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= 16:
        raise ValueError(f"padding must be an int in 0..16, got {padding!r}")
    K = conv_weight.shape[0]
    if conv_bias is not None and (not isinstance(conv_bias, torch.Tensor)
                                  or conv_bias.shape != (K,)):
        raise ValueError(f"conv_bias must be None or a tensor of shape ({K},)")
    Ho, Wo = x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x of {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                         "3x3 kernel")
    _check(x.new_empty((0, K, Ho, Wo)), weight, bias, eps, act, pool)
    params = [t for t in (conv_weight, conv_bias, weight, bias) if t is not None]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x] + params)
    if (x.shape[1] > CONV_FUSED_MAX_CIN or not fused_available(x, grad=True)
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in params)
            or not hasattr(_C(), "conv_norm_act_pool_backward")):
        return instance_norm_act_pool(F.conv2d(x, conv_weight, conv_bias, padding=padding),
                                      weight, bias, eps=eps, act=act, pool=pool)
    relu, pooled = act == "relu", pool == "avg"
    cw, cb, w, b = (None if t is None else (t if grad else t.detach()).contiguous()
                    for t in (conv_weight, conv_bias, weight, bias))
    if not grad:
        return _conv_forward(x.contiguous(), cw, cb, w, b, padding, eps, relu, pooled,
                             save_stats=False)[0]
    return _ConvNormActPool.apply(x.contiguous(), cw, cb, w, b, padding, float(eps), relu, pooled)
