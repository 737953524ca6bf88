"""SRe2L's BatchNorm-statistic loss, taken by forward hooks that exist only inside a ``with``.

For a BN layer ``l`` with running mean ``mu_l`` and running variance ``s2_l`` and a batch of inputs
``a`` (``(B, C, H, W)``), the layer's term is ``||mean(a) - mu_l||_2 + ||var(a) - s2_l||_2``, the mean
and the biased variance taken per channel over batch and space. The loss is the sum of the terms
over the layers in module order, the first multiplied by ``first_bn_multiplier`` (SRe2L: 10).

With ``sizes`` the batch is a concatenation of groups (SRe2L's batches of one image per class):
each group gets its own statistics and the loss is the mean over groups of the per-group sums.

Example::

    with BNStatistics(teacher, sizes=[10, 10]) as bn:
        logits = teacher(x)                  # x has 20 images, two groups of 10
        loss = ce + r_bn * bn.loss()
    # the hooks are gone here; nothing is left on the teacher
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["BNStatistics", "bn_layer_term"]


def bn_layer_term(a: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
                  ) -> torch.Tensor:
    """``||mean(a) - running_mean||_2 + ||var(a) - running_var||_2`` for ``a`` ``(B, C, ...)``,
    per-channel statistics over every other dimension, biased variance."""
    flat = a.transpose(0, 1).reshape(a.shape[1], -1)
    mean = flat.mean(1)
    var = flat.var(1, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(
        var - running_var)


class BNStatistics:
    """Context manager: while active, every ``nn.BatchNorm2d`` of ``net`` records the BN term of
    its input at each forward; :meth:`loss` combines them. Leaving the context removes the hooks
    and drops the recorded terms."""

    def __init__(self, net: nn.Module, *, sizes: Sequence[int] | None = None,
                 first_bn_multiplier: float = 1.0) -> None:
        self.net = net
        self.sizes = None if sizes is None else [int(s) for s in sizes]
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("sre2l: the teacher has no BatchNorm2d layer (train it with "
                             "`splatdd teacher`, which uses BatchNorm)")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._terms: list[list[torch.Tensor]] = []

    def _hook(self, layer_index: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
                 ) -> None:
            a = inputs[0]
            parts = [a] if self.sizes is None else list(a.split(self.sizes))
            terms = [bn_layer_term(p, module.running_mean, module.running_var) for p in parts]
            self._terms[layer_index].append(torch.stack(terms))
        return hook

    def __enter__(self) -> "BNStatistics":
        if self._handles:
            raise RuntimeError("BNStatistics is already active")
        self._terms = [[] for _ in self.layers]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms = []

    def loss(self) -> torch.Tensor:
        """Mean over groups of ``sum_l w_l * term_l`` (``w_0 = first_bn_multiplier``, else 1),
        for the last forward pass."""
        if any(len(t) == 0 for t in self._terms):
            raise RuntimeError("BNStatistics.loss() before a forward pass inside the context")
        per_layer = torch.stack([t[-1] for t in self._terms])          # (layers, groups)
        w = torch.ones(len(self.layers), dtype=per_layer.dtype, device=per_layer.device)
        w[0] = self.first_bn_multiplier
        return (w[:, None] * per_layer).sum(0).mean()
