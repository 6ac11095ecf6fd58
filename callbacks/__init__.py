"""Lightning callbacks: EMA weight averaging and robustness evaluation."""

from .ema import EMA
from .robustness import RobustnessEvaluation, model_hash

__all__ = ["EMA", "RobustnessEvaluation", "model_hash"]
