"""Standard (non-adversarial) training: the baseline every table starts with."""

from __future__ import annotations

import torch.nn.functional as F

from .base import AdversarialDefense
from .outputs import DefenseOutput


class Standard(AdversarialDefense):
    """Cross-entropy on clean inputs. Validation still reports PGD accuracy at ``eps``."""

    def defense_loss(self, x, y, batch_idx):
        logits = self.network(x)
        ce = F.cross_entropy(logits.float(), y)
        return DefenseOutput(ce, {"ce": ce}, logits_clean=logits)
