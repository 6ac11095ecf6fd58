"""TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advtrain.attacks import attack_mode, kl_from, parse_budget, projected_gradient

from .base import AdversarialDefense
from .outputs import DefenseOutput


class TRADES(AdversarialDefense):
    """CE(f(x), y) + beta * KL(p(x) || p(x_adv)), x_adv maximizing the KL term in the eps-ball.

    Follows the official code (yaodongyu/TRADES): the inner maximization starts at x + 0.001 N(0, I)
    (projected onto the box here), takes ``steps`` signed steps of ``step`` on the summed KL with the
    network in eval mode; the outer KL is 'batchmean'.

    Args:
        beta: the trade-off (6.0 in the paper's CIFAR-10 and MNIST results).
        step: inner step (CIFAR-10 0.007 ~ 2/255, MNIST 0.01); steps: 10 (CIFAR-10) / 40 (MNIST).
    """

    def __init__(self, *args, beta: float = 6.0, step: float | str = "2/255", steps: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.beta = beta
        self.step = parse_budget(step, "step")
        self.steps = steps

    def make_adversarial(self, x, y):
        with attack_mode(self.network):
            with torch.no_grad():
                clean_logits = self.network(x)
            return projected_gradient(self.network, x, y, eps=self.eps, step=self.step, steps=self.steps,
                                      loss=kl_from(clean_logits), start="normal", start_scale=0.001,
                                      bounds=self.input_bounds)

    def defense_loss(self, x, y, batch_idx):
        x_adv = self.make_adversarial(x, y)
        logits_clean = self.network(x)
        logits_adv = self.network(x_adv)
        ce = F.cross_entropy(logits_clean.float(), y)
        kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                      reduction="batchmean")
        return DefenseOutput(ce + self.beta * kl, {"ce": ce, "kl": kl}, logits_clean, logits_adv, x_adv)
