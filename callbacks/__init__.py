"""Lightning callbacks: EMA weight averaging, covariance tracking, robustness evaluation (over ``evaluation/``),
loss landscapes, latent t-SNE, and the requeue of a signalled job."""

from .covariance import CovarianceTracker
from .ema import EMA
from .landscape import LossLandscape, landscape_directions, loss_surface
from .latent_tsne import LatentTSNE
from .requeue import Requeue
from .robustness import RobustnessEvaluation

__all__ = [
    "CovarianceTracker", "EMA", "LatentTSNE", "LossLandscape", "Requeue", "RobustnessEvaluation",
    "landscape_directions", "loss_surface",
]
