"""Per-example losses that attacks maximize. Each returns a tensor of shape (B,)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttackLoss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    # float32 even under bf16 autocast: the sign of a gradient is only as good as the loss behind it
    return F.cross_entropy(logits.float(), y, reduction="none")


def kl_from(clean_logits: Tensor) -> AttackLoss:
    """TRADES' inner loss: KL(p(x) || p(x_adv)) per example, p(x) fixed."""
    clean_probs = F.softmax(clean_logits.detach().float(), dim=1)

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="none").sum(1)

    return loss


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def misclassified(logits: Tensor, y: Tensor) -> Tensor:
    return logits.argmax(1) != y


__all__ = ["AttackLoss", "cross_entropy", "kl_from", "margin", "misclassified", "torch"]
