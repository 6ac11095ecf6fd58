"""What every representation of SGR's perturbation covariance Sigma shares (Roth, Kilcher, Hofmann 2018, eqs. 14-16).

Pure tensor code, no Lightning. A representation holds two tensors:

* ``values``: Sigma itself in the representation's form (a (d, d) matrix, or (C, C, R) covariance functions of
  rounded pixel displacement), the running *raw* second moments of the perturbations xi (not centred: eq. 14);
* ``mean``: the running mean perturbation mu, of the input's shape (the uncentred SGR variant, eq. 12).

The update (eq. 15) is an exponential moving average with rate beta (paper: 0.1)::

    Sigma <- (1 - beta) Sigma + beta * batch mean of xi xi^T,        mu <- (1 - beta) mu + beta * batch mean of xi

split in two so that DDP ranks can sum their batch statistics before the update: :meth:`batch_statistics`
returns *sums* (``count`` m, ``first`` = sum_i xi_i, ``second`` = the representation's sum of xi_i xi_i^T), all
reducible by summation across ranks; :meth:`update_from_statistics` divides by the (global) counts and moves
the averages. Neither reads a tensor value back to the host (no ``.item()``): both run inside a training step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_TINY = 1e-30  # guards the scale factor of an all-zero Sigma (0 / tiny = 0, never nan)


def decay_lengths(functions: Tensor) -> Tensor:
    """Where each covariance function ``functions[..., r]`` (r = 0, 1, 2, ... pixels) first falls to 1/e of its
    value at r = 0, linearly interpolated between the two integer displacements around the crossing (the paper's
    decay length, Fig. 2). ``inf`` for a function that never falls that far, ``nan`` where the value at 0 is not
    positive (an inter-channel function can be zero or negative there). Shape: ``functions.shape[:-1]``."""
    f = functions.double()
    f0 = f[..., :1]
    ratio = f / torch.where(f0 > 0, f0, torch.ones_like(f0))
    below = ratio <= math.exp(-1.0)
    # index of the first displacement at or under 1/e (argmax of a 0/1 tensor returns its first 1)
    first = below.to(torch.uint8).argmax(-1, keepdim=True).clamp_min(1)
    before, after = ratio.gather(-1, first - 1), ratio.gather(-1, first)
    step = (before - math.exp(-1.0)) / (before - after).clamp_min(1e-300)
    length = (first - 1).double() + step
    length = torch.where(below.any(-1, keepdim=True), length, torch.full_like(length, math.inf))
    length = torch.where(f0 > 0, length, torch.full_like(length, math.nan))
    return length.squeeze(-1)


class Covariance:
    """Base of the representations: the EMA update, the scaling, the state. Subclasses define
    :meth:`batch_statistics`, :meth:`_moment` (batch statistics -> batch second moment in ``values``' form),
    :meth:`matvec`, :meth:`mean_diagonal`, :meth:`to_dense` and :meth:`covariance_functions`."""

    def __init__(self, shape: tuple[int, ...], values: Tensor, mean: Tensor | None = None):
        self.shape = tuple(int(n) for n in shape)
        self.values = values
        self.mean = torch.zeros(self.shape, dtype=values.dtype, device=values.device) if mean is None else mean
        if tuple(self.mean.shape) != self.shape:
            raise ValueError(f"the mean perturbation has shape {tuple(self.mean.shape)}, expected {self.shape}")

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    # ---- estimation -------------------------------------------------------------------------------
    def batch_statistics(self, xi: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _moment(self, stats: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _first_and_flat(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """The perturbations as float32 (B, *shape) (autocast off: the sums must not be bf16) and their count."""
        if tuple(xi.shape[1:]) != self.shape:
            raise ValueError(f"perturbations of shape {tuple(xi.shape)} do not fit a covariance over inputs of shape "
                             f"{self.shape}")
        xi = xi.detach().to(self.values.dtype)
        count = torch.full((), xi.shape[0], dtype=self.values.dtype, device=xi.device)
        return xi, count

    def update_from_statistics(self, stats: dict[str, Tensor], beta: float) -> None:
        """Sigma <- (1 - beta) Sigma + beta * second / count, mu <- (1 - beta) mu + beta * first / count, in place
        (the objects handed out keep seeing the current estimate). beta = 1 replaces the estimate by the batch's."""
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        moment = self._moment(stats)
        self.values.mul_(1.0 - beta).add_(moment, alpha=beta)
        self.mean.mul_(1.0 - beta).add_(stats["first"].to(self.mean) / stats["count"].to(self.mean), alpha=beta)
        self._changed()

    def update(self, xi: Tensor, beta: float) -> None:
        """One EMA step from a batch of perturbations xi (B, *shape), without any cross-process reduction."""
        self.update_from_statistics(self.batch_statistics(xi), beta)

    def _changed(self) -> None:
        """Drop what was derived from ``values`` (the stationary representation caches its kernel spectrum)."""

    # ---- what a regularizer reads -------------------------------------------------------------------
    def matvec(self, g: Tensor) -> Tensor:
        raise NotImplementedError

    def mean_diagonal(self) -> Tensor:
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    def covariance_functions(self) -> Tensor:
        raise NotImplementedError

    def psd_change(self) -> Tensor:
        """How far keeping Sigma positive semi-definite moved it: ||projected - Sigma||_F / ||Sigma||_F (a
        tensor; see :mod:`.psd`). 0 for representations that are positive semi-definite by construction."""
        return self.values.new_zeros(())

    def decay_lengths(self) -> Tensor:
        """(C, C) decay lengths in pixels of :meth:`covariance_functions` (see :func:`decay_lengths`)."""
        return decay_lengths(self.covariance_functions())

    # ---- scaling ------------------------------------------------------------------------------------
    def scaled_to(self, mean_diagonal: float | Tensor, out: Covariance | None = None) -> Covariance:
        """Sigma * s with s = mean_diagonal / (Sigma's mean diagonal), so the result's mean diagonal is
        ``mean_diagonal`` (SGR's scaling: the data's mean variance in the arXiv text, 1 in the ICLR version).
        The mean perturbation is scaled by sqrt(s), as a perturbation scaled by a has second moments scaled by
        a^2. Written into ``out`` (same type and shape) in place when given, else into a new object. s stays a
        tensor: no host sync."""
        factor = torch.as_tensor(mean_diagonal, dtype=self.values.dtype).to(self.values.device)
        factor = factor / self.mean_diagonal().clamp_min(_TINY)
        if out is None:
            out = self.copy()
        elif type(out) is not type(self) or out.shape != self.shape:
            raise ValueError(f"cannot scale a {type(self).__name__} over {self.shape} into a "
                             f"{type(out).__name__} over {out.shape}")
        out.values.copy_(self.values * factor)
        out.mean.copy_(self.mean * factor.sqrt())
        out._changed()
        return out

    def copy(self) -> Covariance:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.values, new.mean = self.values.clone(), self.mean.clone()
        new._changed()
        return new

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values.clone(), "mean": self.mean.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("values", "mean"):
            current, saved = getattr(self, name), state[name]
            if saved.shape != current.shape:
                raise ValueError(f"{type(self).__name__} state {name!r} has shape {tuple(saved.shape)}, expected "
                                 f"{tuple(current.shape)}: the checkpoint was made for other inputs or another "
                                 f"representation")
            current.copy_(saved)
        self._changed()

    def to(self, device: torch.device | str) -> Covariance:
        """Move the tensors to ``device`` in place (the object keeps its identity) and return self."""
        self.values, self.mean = self.values.to(device), self.mean.to(device)
        self._changed()
        return self

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"
