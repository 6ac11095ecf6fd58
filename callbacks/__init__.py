"""Lightning callbacks: EMA weight averaging, covariance tracking, robustness evaluation (over ``evaluation/``),
loss landscapes, latent t-SNE."""

from .covariance import CovarianceTracker
from .ema import EMA
from .landscape import LossLandscape, landscape_directions, loss_surface
from .latent_tsne import LatentTSNE
from .robustness import RobustnessEvaluation

__all__ = [
    "CovarianceTracker", "EMA", "LatentTSNE", "LossLandscape", "RobustnessEvaluation", "landscape_directions",
    "loss_surface",
]
