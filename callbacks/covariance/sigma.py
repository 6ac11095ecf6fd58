"""Representations of the covariance Sigma of adversarial perturbations, for structured gradient regularization
(SGR: Roth, Kilcher, Hofmann 2018, arXiv 1805.08736, eqs. 11-16; see docs/methods.md, section SGR).

Pure tensor code. Each representation has ``matvec(g)`` (Sigma g_i for each example of g (B, *input_shape)),
``mean`` (the running mean perturbation, input shape), ``mean_diagonal()``, ``to_dense()``,
``covariance_functions()`` (C, C, R values against rounded displacement r), ``decay_lengths()``,
``scaled_to(mean_diagonal)``, ``batch_statistics(xi)`` / ``update_from_statistics(stats, beta)`` (the EMA update
of eq. 15, split so that DDP ranks can sum the statistics in between), ``update(xi, beta)`` and
``state_dict()`` / ``load_state_dict()``:

* :class:`FullCovariance`: the d x d matrix (paper: for low-dimensional inputs; CIFAR-10's 3072^2 floats are
  38 MB, also fine);
* :class:`StationaryCovariance`: one covariance function of rounded pixel displacement per channel pair (eq. 16),
  Sigma g by FFT or convolution, never a d x d matrix;
* :class:`IdentityCovariance`: Sigma = s I (gradient-norm regularization, GN), fixed.

:class:`advtrain.callbacks.CovarianceTracker` keeps one of them up to date during training and hands it to the defense.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .psd import check_psd_mode, project_dense_psd, relative_change
from .sigma_base import Covariance, decay_lengths
from .stationary import StationaryCovariance, position_radius

REPRESENTATIONS = ("full", "stationary")


class FullCovariance(Covariance):
    """Sigma as a (d, d) matrix over the flattened input (``x.flatten(1)``'s order); starts as the identity.

    ``batch_statistics`` sums xi_i xi_i^T with one (d x B) @ (B x d) matmul; ``matvec`` is g @ Sigma (Sigma is
    symmetric). Its covariance functions (for plots and decay lengths) are those of the closest stationary
    covariance (:meth:`StationaryCovariance.from_dense`), for (C, H, W) or (C, L) inputs.
    """

    def __init__(self, shape: tuple[int, ...], matrix: Tensor | None = None, mean: Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        d = 1
        for n in shape:
            d *= int(n)
        if matrix is None:
            matrix = torch.eye(d, dtype=dtype, device=device)
        elif tuple(matrix.shape) != (d, d):
            raise ValueError(f"a covariance over inputs {tuple(shape)} is ({d}, {d}), got {tuple(matrix.shape)}")
        super().__init__(shape, matrix, mean)
        self._psd_change: Tensor | None = None  # set by load_covariance when it projects a file's matrix

    @property
    def matrix(self) -> Tensor:
        return self.values

    def batch_statistics(self, xi: Tensor) -> dict[str, Tensor]:
        xi, count = self._first_and_flat(xi)
        with torch.autocast(xi.device.type, enabled=False):
            flat = xi.flatten(1)
            second = flat.T @ flat
        return {"count": count, "first": xi.sum(0), "second": second}

    def _moment(self, stats: dict[str, Tensor]) -> Tensor:
        return stats["second"].to(self.values) / stats["count"].to(self.values)

    def matvec(self, g: Tensor) -> Tensor:
        with torch.autocast(g.device.type, enabled=False):
            out = g.flatten(1).to(self.values.dtype) @ self.values
        return out.reshape(g.shape).to(g.dtype)

    def mean_diagonal(self) -> Tensor:
        return self.values.diagonal().mean()

    def psd_change(self) -> Tensor:
        """How far the projection of a matrix read from a file moved it (relative Frobenius norm; see
        :func:`load_covariance`). The EMA of outer products xi xi^T needs none: it is positive semi-definite."""
        return self.values.new_zeros(()) if self._psd_change is None else self._psd_change

    def to_dense(self) -> Tensor:
        return self.values.clone()

    def covariance_functions(self) -> Tensor:
        return StationaryCovariance.from_dense(self.values, self.shape, dtype=self.values.dtype).values


class IdentityCovariance(Covariance):
    """Sigma = scale * I, never updated: SGR with it is gradient-norm regularization (GN). ``mean`` is zero."""

    def __init__(self, shape: tuple[int, ...], scale: float = 1.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__(shape, torch.full((), float(scale), dtype=dtype, device=device))

    def batch_statistics(self, xi: Tensor) -> dict[str, Tensor]:
        raise TypeError("IdentityCovariance is fixed: it has no estimate to update")

    def matvec(self, g: Tensor) -> Tensor:
        return g * self.values.to(g.dtype)

    def mean_diagonal(self) -> Tensor:
        return self.values

    def to_dense(self) -> Tensor:
        return self.values * torch.eye(self.dim, dtype=self.values.dtype, device=self.device)

    def covariance_functions(self) -> Tensor:
        functions = StationaryCovariance(self.shape, dtype=self.values.dtype, device=self.device).values
        return functions * self.values


def make_covariance(representation: str, shape: tuple[int, ...], psd: str = "project", **kwargs) -> Covariance:
    """A new identity Sigma over inputs of ``shape`` in the named representation (``full`` or ``stationary``);
    ``psd`` for the stationary one (a full Sigma estimated from outer products needs no projection)."""
    check_psd_mode(psd, "make_covariance")
    if representation == "full":
        return FullCovariance(shape, **kwargs)
    if representation == "stationary":
        return StationaryCovariance(shape, psd=psd, **kwargs)
    raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")


def load_covariance(path: str | os.PathLike, representation: str, shape: tuple[int, ...], psd: str = "project",
                    **kwargs) -> Covariance:
    """A fixed Sigma from a torch file holding a (d, d) covariance over the flattened input, the format
    ``advtrain covariance`` and :func:`advtrain.attacks.covariance_of` write (e.g. the data set's own covariance).
    ``stationary`` keeps its closest stationary covariance (:meth:`StationaryCovariance.from_dense`). With
    ``psd="project"`` a ``full`` matrix loses its negative eigenvalues here, once (a file may hold any symmetric
    matrix), and a ``stationary`` one projects as every stationary Sigma does."""
    check_psd_mode(psd, "load_covariance")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"covariance file {path!r} not found; write one with `advtrain covariance -c "
                                f"<config> --output {path}`")
    matrix = torch.load(path, map_location="cpu", weights_only=True)
    d = 1
    for n in shape:
        d *= int(n)
    if not isinstance(matrix, Tensor) or tuple(matrix.shape) != (d, d):
        got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{path!r} holds {got}, but inputs of shape {tuple(shape)} need a ({d}, {d}) covariance")
    if representation == "stationary":
        return StationaryCovariance.from_dense(matrix.double(), shape, psd=psd, **kwargs)
    if representation == "full":
        dtype = kwargs.pop("dtype", torch.float32)
        projected = project_dense_psd(matrix.double()) if psd == "project" else matrix.double()
        sigma = FullCovariance(shape, matrix=projected.to(dtype), dtype=dtype, **kwargs)
        sigma._psd_change = relative_change(matrix.double(), projected).to(dtype)
        return sigma
    raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")


__all__ = ["REPRESENTATIONS", "Covariance", "FullCovariance", "IdentityCovariance", "StationaryCovariance",
           "decay_lengths", "load_covariance", "make_covariance", "position_radius"]
