"""Lightning callbacks: EMA weight averaging, robustness evaluation (over ``evaluation/``), loss landscapes."""

from .ema import EMA
from .landscape import LossLandscape, landscape_directions, loss_surface
from .robustness import RobustnessEvaluation

__all__ = ["EMA", "LossLandscape", "RobustnessEvaluation", "landscape_directions", "loss_surface"]
