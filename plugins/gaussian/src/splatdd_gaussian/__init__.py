"""splatdd-gaussian: the GSDD parameterization (distilled images as a few bf16 2D Gaussians).
Image fitting at equal storage (the paper's Table 5) is the core's ``splatdd fit``."""
from splatdd_gaussian.gaussian import (REGIME_OPTIMIZERS, GaussianImages, bf16_round_ste,
                                       boundary_loss, default_gpc, gaussian_bytes, gaussian_points,
                                       points_for_budget)
from splatdd_gaussian.plots import plot_centres, plot_ellipses

__all__ = ["GaussianImages", "REGIME_OPTIMIZERS", "bf16_round_ste", "boundary_loss", "default_gpc",
           "gaussian_bytes", "gaussian_points", "points_for_budget", "plot_centres", "plot_ellipses"]
__version__ = "0.1.0"
