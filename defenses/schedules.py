"""Learning-rate schedules that are written in (fractional) epochs but stepped every batch.

The number of batches per epoch is only known once training starts: the defense's ``configure_optimizers`` builds
the scheduler from the config, then tells it that number (:meth:`PerBatchLR.set_steps_per_epoch`) and steps it
every batch. A scheduler built by hand can be given ``steps_per_epoch`` at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, MultiplicativeLR, SequentialLR


class PerBatchLR(ABC):
    """A scheduler written in epochs and stepped every batch (Lightning interval "step"): ``configure_optimizers``
    calls :meth:`set_steps_per_epoch` before the first step."""

    @abstractmethod
    def set_steps_per_epoch(self, steps_per_epoch: float) -> None:
        """Convert the schedule's epochs into steps."""


class PiecewiseLinearLR(PerBatchLR, LambdaLR):
    """Multiply the optimizer's learning rate by a factor interpolated linearly between knots.

    ``epochs=[0, 6, 15], factors=[0, 1, 0]`` is the cyclic (triangular) schedule of 'Fast is better than free': the
    configured lr is the peak. The defense steps it every batch and tells it the number of batches per epoch
    (:meth:`set_steps_per_epoch`), so configs stay in epochs. The NuAT schedules use :class:`CyclicLRInEpochs`.
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


class MultiplyAt:
    """``MultiplicativeLR`` factor: ``gamma`` at the given steps, 1 otherwise (a callable object, so its state is
    saved with the scheduler's)."""

    def __init__(self, steps: Sequence[int], gamma: float):
        self.steps, self.gamma = sorted(int(s) for s in steps), float(gamma)

    def __call__(self, step: int) -> float:
        return self.gamma if step in self.steps else 1.0


class CyclicLRInEpochs(PerBatchLR, SequentialLR):
    """torch's :class:`~torch.optim.lr_scheduler.CyclicLR` (one triangle ``base_lr -> max_lr -> base_lr``), written in
    epochs and stepped every batch, as the official NuAT scripts use it; optionally frozen after ``stop_epoch`` and
    then multiplied by ``gamma`` from each of ``milestones`` on.

    The lr of the batches of epoch e (counted from 0) is that of the official scripts, which step CyclicLR after
    every batch:

      * ``NuAT_WA_cifar10.py``: ``up_epochs=25, down_epochs=75``.
      * ``NuAT_cifar10.py``: ``up_epochs=40, down_epochs=50, stop_epoch=80, milestones=[86, 91]``: the cycle is
        stepped in epochs 0-79 only (the lr stays at the 0.02 it reached), and the script divides the lr by 10 at
        the end of epochs 85 and 90, so epochs 86-90 train with 0.002 and 91-99 with 0.0002.

    Built as ``SequentialLR([CyclicLR, MultiplicativeLR], milestones=[stop + 1])`` (in steps): at the switch
    SequentialLR restarts the second scheduler at its step 0, where MultiplicativeLR keeps the lr reached
    (MultiStepLR would go back to the optimizer's initial lr); the step that reaches a milestone already belongs
    to the next scheduler, hence the + 1. With ``cycle_momentum`` (torch's default, so the official scripts' too)
    CyclicLR also sets the optimizer's momentum (or Adam's beta1): ``max_momentum`` at ``base_lr``,
    ``base_momentum`` at ``max_lr``; it stays where it is after ``stop_epoch``. The optimizer's own lr and momentum
    are overwritten at once.

    Args:
        max_lr, base_lr: the peak and the start / end of the triangle (the optimizer's own lr is not used).
        up_epochs, down_epochs: the triangle's slopes, in epochs.
        stop_epoch: the epoch from which the cycle is no longer stepped (None: always stepped).
        milestones: epochs (> stop_epoch) from which the lr is multiplied by ``gamma``.
        steps_per_epoch: optimizer steps per epoch; None (configs): the defense's ``configure_optimizers`` tells it
            (:meth:`set_steps_per_epoch`), and the schedule is built then.
    """

    def __init__(self, optimizer: Optimizer, max_lr: float, up_epochs: float, down_epochs: float,
                 base_lr: float = 0.0, stop_epoch: float | None = None, milestones: Sequence[float] = (),
                 gamma: float = 0.1, cycle_momentum: bool = True, base_momentum: float = 0.8,
                 max_momentum: float = 0.9, steps_per_epoch: float | None = None):
        if up_epochs <= 0 or down_epochs <= 0:
            raise ValueError(f"CyclicLRInEpochs needs up_epochs and down_epochs > 0, got {up_epochs}, {down_epochs}")
        milestones = sorted(float(m) for m in milestones)
        if milestones and stop_epoch is None:
            raise ValueError("CyclicLRInEpochs milestones need stop_epoch (the epoch the cycle stops)")
        if stop_epoch is not None and (stop_epoch <= 0 or any(m <= stop_epoch for m in milestones)):
            raise ValueError(f"CyclicLRInEpochs needs 0 < stop_epoch < every milestone, got stop_epoch={stop_epoch}, "
                             f"milestones={milestones}")
        self._settings = dict(optimizer=optimizer, max_lr=max_lr, up_epochs=up_epochs, down_epochs=down_epochs,
                              base_lr=base_lr, stop_epoch=stop_epoch, milestones=milestones, gamma=gamma,
                              cycle_momentum=cycle_momentum, base_momentum=base_momentum, max_momentum=max_momentum)
        self.steps_per_epoch = None
        if steps_per_epoch is not None:
            self.set_steps_per_epoch(steps_per_epoch)

    def set_steps_per_epoch(self, steps_per_epoch: float) -> None:
        """Build the schedule for ``steps_per_epoch`` optimizer steps per epoch (the cycle's lr is set at once)."""
        if steps_per_epoch <= 0:
            raise ValueError(f"CyclicLRInEpochs needs steps_per_epoch > 0, got {steps_per_epoch}")
        if self.steps_per_epoch is not None:
            raise RuntimeError("CyclicLRInEpochs was already told its steps per epoch")
        self.steps_per_epoch = float(steps_per_epoch)
        s = self.__dict__.pop("_settings")  # not scheduler state: it would take the optimizer into checkpoints
        optimizer = s["optimizer"]
        cyclic = CyclicLR(optimizer, base_lr=s["base_lr"], max_lr=s["max_lr"],
                          step_size_up=s["up_epochs"] * self.steps_per_epoch,
                          step_size_down=s["down_epochs"] * self.steps_per_epoch, cycle_momentum=s["cycle_momentum"],
                          base_momentum=s["base_momentum"], max_momentum=s["max_momentum"])
        if s["stop_epoch"] is None:
            SequentialLR.__init__(self, optimizer, [cyclic], milestones=[])
            return
        # SequentialLR hands step number `switch` to the second scheduler: CyclicLR takes its last step, the one
        # that gives the lr of the batches from stop_epoch on, at step_of(stop_epoch), so the switch is one later
        switch = self.step_of(s["stop_epoch"]) + 1
        decay = MultiplicativeLR(optimizer, MultiplyAt([self.step_of(m) - switch for m in s["milestones"]],
                                                       s["gamma"]))
        SequentialLR.__init__(self, optimizer, [cyclic, decay], milestones=[switch])

    def step(self, *args, **kwargs):
        if self.steps_per_epoch is None:
            raise RuntimeError("CyclicLRInEpochs is written in epochs and stepped every batch: tell it the batches "
                               "per epoch first (set_steps_per_epoch; the defense's configure_optimizers does)")
        return super().step(*args, **kwargs)

    def step_of(self, epoch: float) -> int:
        """The scheduler step at which ``epoch`` begins."""
        return int(round(epoch * self.steps_per_epoch))
