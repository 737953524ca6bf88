"""The two pieces of the splatdd core that tm uses, behind one seam (tests substitute stand-ins by
patching these module attributes)."""
from __future__ import annotations

import torch


def get_network(model: str, channels: int, num_classes: int, im_size: tuple[int, int], *,
                width: int, depth: int | None, seed: int) -> torch.nn.Module:
    """A freshly initialised network whose initialisation depends only on ``seed``."""
    from splatdd.models import get_network as _get
    return _get(model, channels, num_classes, im_size, width=width, depth=depth, seed=seed)


def dsa(x: torch.Tensor, strategy: str, seed: int, per_sample: bool) -> torch.Tensor:
    """DSA with all randomness from ``seed`` (``per_sample``: one transform per image)."""
    from splatdd.augment import dsa as _dsa
    return _dsa(x, strategy, seed=seed, per_sample=per_sample)
