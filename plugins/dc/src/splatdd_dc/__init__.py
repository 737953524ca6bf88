"""splatdd algorithm plugin ``dc``: dataset condensation by gradient matching (with DSA)."""
from .algorithm import DC_LOOPS, GradientMatching, dc_loops, layer_distance, match_loss

__version__ = "0.1.0"
__all__ = ["GradientMatching", "layer_distance", "match_loss", "dc_loops", "DC_LOOPS"]
