"""The two pieces of the splatdd core that tm uses, behind one seam (tests substitute stand-ins by
patching these module attributes)."""
from __future__ import annotations

import torch


def get_network(model: str, channels: int, num_classes: int, im_size: tuple[int, int], *,
                width: int, depth: int | None, seed: int) -> torch.nn.Module:
    """A freshly initialised network whose initialisation depends only on ``seed`` (the global RNG
    is left untouched)."""
    from splatdd.models import get_network as _get
    try:
        return _get(model, channels, num_classes, im_size, width=width, depth=depth, seed=seed)
    except TypeError as exc:             # a get_network without the ``seed`` keyword
        if "seed" not in str(exc):
            raise
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return _get(model, channels, num_classes, im_size, width=width, depth=depth)


def dsa(x: torch.Tensor, strategy: str, seed: int, per_sample: bool) -> torch.Tensor:
    """DSA with all randomness from ``seed`` (``per_sample``: one transform per image; without
    that keyword in the core, one transform per batch)."""
    from splatdd.augment import dsa as _dsa
    try:
        return _dsa(x, strategy, seed=seed, per_sample=per_sample)
    except TypeError as exc:
        if "per_sample" not in str(exc):
            raise
    return _dsa(x, strategy, seed=seed)
