"""Learning-rate schedules that are defined in (fractional) epochs but stepped every batch."""

from __future__ import annotations

import numpy as np
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class PiecewiseLinearLR(LambdaLR):
    """Multiply the optimizer's learning rate by a factor interpolated linearly between knots.

    ``epochs=[0, 50, 100], factors=[0, 1, 0]`` is the cyclic (triangular) schedule of NuAT and
    'Fast is better than free': the configured lr is the peak. The defense steps it every batch and
    tells it the number of batches per epoch (:meth:`set_steps_per_epoch`), so configs stay in epochs.
    """

    def __init__(self, optimizer: Optimizer, epochs: list[float], factors: list[float]):
        if len(epochs) != len(factors) or len(epochs) < 2:
            raise ValueError("PiecewiseLinearLR needs epochs and factors of the same length (>= 2), got "
                             f"{epochs} and {factors}")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"PiecewiseLinearLR epochs must increase strictly, got {epochs}")
        self.epochs, self.factors = list(map(float, epochs)), list(map(float, factors))
        self.steps_per_epoch = 1.0
        super().__init__(optimizer, self.factor_at_step)

    def factor_at_step(self, step: int) -> float:
        return float(np.interp(step / self.steps_per_epoch, self.epochs, self.factors))

    def set_steps_per_epoch(self, steps_per_epoch: float) -> None:
        self.steps_per_epoch = float(steps_per_epoch)
        # the first lr was computed with steps_per_epoch = 1; recompute it for the current step
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor_at_step(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        # the bound method cannot be pickled; everything it needs is saved here
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict):
        self.__dict__.update(state_dict)
