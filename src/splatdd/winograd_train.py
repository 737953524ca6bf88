"""Winograd convolutions under a first-order graph: ConvNet training on the CPU (issue 15).

:func:`splatdd.winograd.conv3x3_winograd` is inference only. :func:`winograd_conv_first_order`
makes it a layer that can be trained: the forward by Winograd F(4x4, 3x3), the input's gradient
by Winograd too (the gradient of a stride-1 3x3 convolution with padding ``p`` is the
convolution of the output gradient with the filters turned 180 degrees and their channels
swapped, padding ``2 - p``), and the filters' gradient by Winograd as well
(:func:`splatdd.winograd.conv3x3_winograd_grad_weight`, reusing the forward's input transform
when the batch was one chunk of tiles). The backward is first-order only
(``once_differentiable``), so models call it only inside :func:`splatdd.models.first_order`.

>>> import torch
>>> import torch.nn.functional as F
>>> from splatdd.winograd import winograd_weight
>>> x = torch.randn(2, 16, 8, 8, requires_grad=True)
>>> w = torch.randn(8, 16, 3, 3, requires_grad=True)
>>> U, Ut = winograd_filters(w)
>>> y = winograd_conv_first_order(x, w, None, U, Ut, padding=1)
>>> torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-3)
True
>>> y.sum().backward()
>>> x.grad.shape, w.grad.shape
(torch.Size([2, 16, 8, 8]), torch.Size([8, 16, 3, 3]))
"""
from __future__ import annotations

from typing import Optional

import torch

from .winograd import (WinogradWorkspace, _conv3x3_winograd, _shape, conv3x3_winograd,
                       conv3x3_winograd_grad_weight, winograd_weight)

__all__ = ["winograd_conv_first_order", "winograd_filters", "winograd_grad_weight",
           "MAX_TRAIN_PADDING"]

#: The input gradient is a Winograd convolution with padding ``2 - padding``.
MAX_TRAIN_PADDING = 2


def winograd_filters(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, Ut)``: the transformed filters of the forward and of the input gradient (the
    filters turned 180 degrees with input and output channels swapped).

    >>> U, Ut = winograd_filters(torch.randn(8, 16, 3, 3))
    >>> U.shape, Ut.shape
    (torch.Size([36, 8, 16]), torch.Size([36, 16, 8]))
    """
    return winograd_weight(weight), winograd_grad_weight(weight)


def winograd_grad_weight(weight: torch.Tensor) -> torch.Tensor:
    """``Ut``: the transformed filters of the input gradient alone (``winograd_filters(w)[1]``).

    >>> winograd_grad_weight(torch.randn(8, 16, 3, 3)).shape
    torch.Size([36, 16, 8])
    """
    return winograd_weight(weight.flip(2, 3).transpose(0, 1))


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, U, Ut, padding, ws):
        ctx.save_for_backward(x)
        y, kept = _conv3x3_winograd(x, U, bias, padding, None, 0, ws,
                                    keep=ctx.needs_input_grad[1])
        ctx.meta = (padding, Ut, ws, kept)   # kept: x's input transform, when it is one chunk
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, = ctx.saved_tensors
        padding, Ut, ws, kept = ctx.meta
        ctx.meta = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(torch.float32).contiguous()
        # the filters' gradient first: it reads the kept V before anything can overwrite it;
        # with it, the bias's from the same transform of grad_out (its point (1, 1))
        gw = gb = None
        if need_w:
            got = conv3x3_winograd_grad_weight(x, grad_out, padding, workspace=ws, _kept=kept,
                                               _bias=need_b)
            gw, gb = got if need_b else (got, None)
        elif need_b:
            gb = grad_out.sum((0, 2, 3))
        gx = conv3x3_winograd(grad_out, Ut, None, padding=2 - padding,
                              workspace=ws) if need_x else None
        return gx, gw, gb, None, None, None, None


def winograd_conv_first_order(x: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], U: torch.Tensor, Ut: torch.Tensor,
                              *, padding: int = 1,
                              workspace: Optional[WinogradWorkspace] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (3x3, stride 1, CPU float32) by Winograd,
    differentiable once in x, weight and bias; ``(U, Ut) = winograd_filters(weight)`` for the
    current weight. Equal to F.conv2d up to Winograd's float32 rounding
    (tests/test_convnet_fast_paths.py). ``workspace``: a
    :class:`~splatdd.winograd.WinogradWorkspace` of this thread and layer for the buffers (and
    the input transform kept for the backward), else they are allocated per call.
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or \
            not 0 <= padding <= MAX_TRAIN_PADDING:
        raise ValueError(f"padding must be an int in 0..{MAX_TRAIN_PADDING}, got {padding!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a (K, C, 3, 3) tensor, got {_shape(weight)}")
    K, C = weight.shape[:2]
    if not (isinstance(U, torch.Tensor) and tuple(U.shape) == (36, K, C)
            and isinstance(Ut, torch.Tensor) and tuple(Ut.shape) == (36, C, K)):
        raise ValueError(f"(U, Ut) must be winograd_filters(weight): shapes (36, {K}, {C}) and "
                         f"(36, {C}, {K})")
    if workspace is not None and not isinstance(workspace, WinogradWorkspace):
        raise ValueError("workspace must be None or a WinogradWorkspace, got "
                         f"{type(workspace).__name__}")
    return _WinogradConv.apply(x, weight, bias, U, Ut, padding, workspace)
