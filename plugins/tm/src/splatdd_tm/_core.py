"""The two pieces of the splatdd core that tm uses, behind one seam (a test substitutes a
two-parameter model by patching ``get_network`` here)."""
from __future__ import annotations

import torch
from splatdd.augment import dsa as _dsa
from splatdd.models import get_network as _get_network


def get_network(model: str, channels: int, num_classes: int, im_size: tuple[int, int], *,
                width: int, depth: int | None, seed: int) -> torch.nn.Module:
    """A freshly initialised network whose initialisation depends only on ``seed`` (the global RNG
    is left untouched)."""
    return _get_network(model, channels, num_classes, im_size, width=width, depth=depth, seed=seed)


def dsa(x: torch.Tensor, strategy: str, seed: int, per_sample: bool) -> torch.Tensor:
    """DSA with all randomness from ``seed`` (``per_sample``: one transform per image)."""
    return _dsa(x, strategy, seed=seed, per_sample=per_sample)
