"""Exponential moving averages of the weights (NuAT-WA, NuAT2-WA), on Lightning's WeightAveraging."""

from __future__ import annotations

import itertools
from typing import Any

from pytorch_lightning.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn


class HostCountedAverage(AveragedModel):
    """torch's ``AveragedModel`` with the same update, minus its host syncs: torch's ``update_parameters`` branches on
    the tensor ``n_averaged`` twice per update (a GPU would wait for the host each step, for each average). The
    count is also kept here on the host; it is read back from ``n_averaged`` once, after the average is loaded from a
    checkpoint. The update is torch's ``avg_fn`` path, operation for operation (bitwise the same)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._count: int | None = 0  # the host's copy of n_averaged; None (after a load): read it once

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None

    def update_parameters(self, model: nn.Module) -> None:
        if self.avg_fn is None or self.multi_avg_fn is not None:
            raise ValueError("HostCountedAverage takes an avg_fn (e.g. get_ema_avg_fn(decay)), not a multi_avg_fn")
        if self._count is None:
            self._count = int(self.n_averaged)
        if self.use_buffers:
            own = itertools.chain(self.module.parameters(), self.module.buffers())
            theirs = itertools.chain(model.parameters(), model.buffers())
        else:
            own, theirs = self.parameters(), model.parameters()
        for averaged, current in zip(own, theirs, strict=False):
            current = current.detach().to(averaged.device)
            if self._count == 0:
                averaged.detach().copy_(current)
            else:
                averaged.detach().copy_(self.avg_fn(averaged.detach(), current, self.n_averaged.to(averaged.device)))
        if not self.use_buffers:  # the buffers follow the model, as in torch
            for averaged, current in zip(self.module.buffers(), model.buffers(), strict=True):
                averaged.detach().copy_(current.detach().to(averaged.device))
        self.n_averaged += 1
        self._count += 1


class EMA(WeightAveraging):
    """omega <- decay * omega + (1 - decay) * theta after every optimizer step, weights and buffers.

    Lightning's ``WeightAveraging`` does the bookkeeping: the average lives in an ``AveragedModel``; it
    is swapped in for validation (so ``val/*`` and the best checkpoint are the averaged network's),
    copied into the module when training ends, and written as the checkpoint's ``state_dict`` (the raw
    weights go to ``current_model_state``), so ``advtrain test`` evaluates the averaged weights.

    On top of it:

    * ``attack_decay`` keeps a second, fast average (NuAT2-WA: 0.99) for the defense's attack; the
      defense finds this callback in ``trainer.callbacks`` and reads :meth:`attack_network` (None during the first
      epoch, as in NuAT2-WA where the current model stands in for it). Its state is part of this callback's
      ``state_dict``.
    * during validation the raw network is offered to the defense (:meth:`validation_networks`), so TensorBoard
      shows ``val/acc_robust_raw`` next to the averaged model's ``val/acc_robust``.
    * ``start_step`` delays the first update.

    Resume is exact: the slow average and its update count travel in the checkpoint (WeightAveraging),
    the fast one in this callback's state.

    Args:
        decay: tau of the evaluated average (NuAT-WA 0.9998).
        attack_decay: tau of the fast average used by the attack (NuAT2-WA 0.99), or None.
        start_step: first optimizer step (0-based) whose weights enter the averages.
    """

    def __init__(self, decay: float = 0.9998, attack_decay: float | None = None, start_step: int = 0,
                 device: str | None = None, use_buffers: bool = True):
        for name, value in (("decay", decay), ("attack_decay", attack_decay)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"EMA {name} must be in [0, 1), got {value}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=get_ema_avg_fn(decay))
        self.decay, self.attack_decay, self.start_step = decay, attack_decay, start_step
        self._attack_model: HostCountedAverage | None = None
        self._trainer = None
        self._validating = False

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    # ---- what the defense reads ----------------------------------------------------------------
    @property
    def averaged_network(self) -> nn.Module | None:
        return None if self._average_model is None else self._average_model.module.network

    def attack_network(self) -> nn.Module | None:
        """The fast average's network, or None while it does not exist yet (first epoch)."""
        if self._attack_model is None or self._trainer is None or self._trainer.current_epoch < 1:
            return None
        return self._attack_model.module

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._trainer = trainer
        device = self._device or pl_module.device
        # the same average as WeightAveraging built, updated without host syncs
        self._average_model = HostCountedAverage(pl_module, device=device, use_buffers=self._use_buffers,
                                                 **self._kwargs)
        averaged = [self._average_model]
        if self.attack_decay is not None:
            self._attack_model = HostCountedAverage(pl_module.network, device=device, use_buffers=self._use_buffers,
                                                    avg_fn=get_ema_avg_fn(self.attack_decay))
            averaged.append(self._attack_model)
        for model in averaged:  # averages are never trained: no gradient can flow into them
            model.requires_grad_(False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        updating = trainer.global_step > self._latest_update_step and self.should_update(
            step_idx=trainer.global_step - 1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if updating and self._attack_model is not None:
            self._attack_model.update_parameters(pl_module.network)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._validating = self._average_model is not None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._validating = False
        super().on_validation_epoch_end(trainer, pl_module)

    def validation_networks(self) -> dict[str, nn.Module]:
        """While the average is validated (swapped into the module), the raw weights (here): the defense validates
        them too, as ``val/acc_*_raw``."""
        return {"raw": self._average_model.module.network} if self._validating else {}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # outside fit the checkpoint's state_dict already is the average
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._attack_model is not None:
            state["attack_model"] = self._attack_model.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._attack_model is not None and "attack_model" in state_dict:
            self._attack_model.load_state_dict(state_dict["attack_model"])


__all__ = ["EMA", "HostCountedAverage"]
