"""splatdd-ld3m: the ``ld3m`` parameterization (latent dataset distillation through a diffusion model).

Importing this package is cheap: diffusers is imported only when a model is loaded or built.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .param import LatentDiffusionImages  # noqa: E402

__all__ = ["LatentDiffusionImages", "__version__"]
