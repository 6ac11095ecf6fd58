"""Lightning callbacks: robustness evaluation (EMA, covariance tracking and plots come with later issues)."""

from .robustness import RobustnessEvaluation, model_hash

__all__ = ["RobustnessEvaluation", "model_hash"]
