"""Lightning callbacks: EMA weight averaging and robustness evaluation."""

from .ema import EMA
from .landscape import LossLandscape, landscape_directions, loss_surface
from .robustness import RobustnessEvaluation, model_hash

__all__ = ["EMA", "LossLandscape", "RobustnessEvaluation", "landscape_directions", "loss_surface", "model_hash"]
