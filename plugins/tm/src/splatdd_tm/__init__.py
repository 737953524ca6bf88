"""splatdd algorithm plugin ``tm``: trajectory matching (MTT), and ``splatdd buffer`` for its
expert trajectories."""
from .algorithm import FMNIST_DEFAULTS, TrajectoryMatching
from .buffer import BufferError, ExpertBuffer, train_experts
from .unroll import student_unroll, tm_loss

__version__ = "0.1.0"
__all__ = ["TrajectoryMatching", "FMNIST_DEFAULTS", "ExpertBuffer", "BufferError",
           "train_experts", "student_unroll", "tm_loss"]
