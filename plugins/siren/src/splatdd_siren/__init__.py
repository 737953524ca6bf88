"""splatdd-siren: DDiF-style parameterization (every distilled image is a small SIREN field)."""
from splatdd_siren.siren import SirenImages, coordinate_grid, default_architecture, siren_param_count

__all__ = ["SirenImages", "coordinate_grid", "default_architecture", "siren_param_count"]
__version__ = "0.1.0"
