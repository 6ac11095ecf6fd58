"""SGR's covariance of adversarial perturbations: the tracker callback that keeps Sigma up to date during training
(:class:`CovarianceTracker`), and the representations of Sigma it keeps (full d x d, stationary (eq. 16), identity).
It lives with its only users, the tracker and the SGR/GN defenses that read it through the tracker."""

from .sigma import (
    REPRESENTATIONS,
    Covariance,
    FullCovariance,
    IdentityCovariance,
    StationaryCovariance,
    decay_lengths,
    load_covariance,
    make_covariance,
)
from .tracker import SCALES, SOURCES, CovarianceTracker, all_reduce_sums

__all__ = ["REPRESENTATIONS", "SCALES", "SOURCES", "Covariance", "CovarianceTracker", "FullCovariance",
           "IdentityCovariance", "StationaryCovariance", "all_reduce_sums", "decay_lengths", "load_covariance",
           "make_covariance"]
