"""splatdd: dataset distillation with a fast differentiable batched 2D Gaussian renderer.

Importing :mod:`splatdd` is cheap: it does not import the plugin framework, and the compiled
renderer (:mod:`splatdd._C`) is loaded on the first call to :func:`render` or :func:`backends`.
"""
from __future__ import annotations

from .render import backends, render

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    try:
        __version__ = _dist_version("splatdd")
    except PackageNotFoundError:  # running from a source tree that is not installed
        __version__ = "0.1.0"
except ImportError:  # pragma: no cover
    __version__ = "0.1.0"

__all__ = ["render", "backends", "__version__"]
