"""The model's mode while adversarial examples are generated."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def attack_mode(model: nn.Module):
    """Run the body with every submodule in eval mode; restore each one's own mode afterwards.

    Attacks are generated with BatchNorm using its running statistics (no update from adversarial
    batches in the middle of a step) and dropout off. ``model.train()`` afterwards would be wrong for
    a model whose submodules had mixed modes (a frozen BatchNorm, say), so each flag is restored.
    """
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training


@torch.no_grad()
def is_randomized(model: nn.Module, x: Tensor) -> bool:
    """True when two forward passes of the same input differ: the model is random at this mode (a Tucker layer
    with theta < 1, dropout left on), so one forward pass is one sample, and attacks need EOT."""
    return not torch.equal(model(x), model(x))
